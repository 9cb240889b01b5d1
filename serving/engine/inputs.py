"""Turns a chat (or a prompt and media) into what the engine runs: prompt token ids with every image
and video pad expanded to its item's token count, and the preprocessed media in prompt order.

A video is a list of frames; preprocessed, it is a `ProcessedImage` whose grid has several temporal
patches, and the vision tower encodes it as it encodes images. Only its pad token differs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from serving.engine.image_processor import ImageProcessor, ProcessedImage, to_rgb
from serving.engine.models.config import ModelConfig
from serving.engine.pruning import kept_count
from serving.engine.tokenizer import Tokenizer
from serving.engine.video_processor import VideoProcessor
from serving.types import MediaItem, PromptSpec

# An image, or a video as its frames in order.
Media = Image.Image | list[Image.Image]


@dataclass
class Prompt:
    """Prompt tokens (image and video pads expanded) and the media they stand for, in prompt order. A
    stage that receives the media's embeddings instead of their pixels carries only their grids."""

    token_ids: list[int]
    images: list[ProcessedImage] = field(default_factory=list)
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    video_seconds: list[float] = field(default_factory=list)  # per video: seconds per temporal patch
    keep: list[int] = field(default_factory=list)  # per item, the tokens pruning keeps (empty: all)
    kept: list[list[int] | None] | None = None  # per item, which: from the encoder, with its embeddings

    def __post_init__(self) -> None:
        if self.images and not self.grids:
            self.grids = [im.grid_thw for im in self.images]


class InputProcessor:
    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        video_processor: VideoProcessor | None = None,
    ) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.video_processor = video_processor or VideoProcessor(image_processor.cfg)

    @classmethod
    def from_dir(cls, model_dir: str) -> InputProcessor:
        """Tokenizer and media processors only: what a gateway needs, without the weights."""
        from serving.engine.image_processor import ImageProcessorConfig
        from serving.engine.models.config import load_model_config
        from serving.engine.video_processor import video_config

        processor = ImageProcessor(ImageProcessorConfig.from_dir(model_dir))
        video = VideoProcessor(video_config(model_dir))
        return cls(load_model_config(model_dir), Tokenizer(model_dir), processor, video)

    def process(self, media: Media | np.ndarray) -> ProcessedImage:
        """An image, or a video as its frames (PIL images, or a (T, H, W, 3) array as the encode
        stage receives them)."""
        if isinstance(media, np.ndarray):
            media = [Image.fromarray(f) for f in media] if media.ndim == 4 else Image.fromarray(media)
        if not isinstance(media, list):
            return self.image_processor(media)
        return self.video_processor(media)

    def from_messages(
        self, messages: list[dict[str, Any]], media: list[Media], pruning: tuple[float, float] = (0.0, 0.0)
    ) -> Prompt:
        """`messages` in chat-template form; its image and video parts, in order, stand for `media`.
        Message text is plain text: only the template's own markup becomes control tokens (pads
        included). `pruning`: the (image, video) pruning rates at the encoder (0: keep every token)."""
        processed = [self.process(m) for m in media]
        keep = self.keep_counts([(im.grid_thw, im.video) for im in processed], pruning)
        return Prompt(
            self.expand(self.tokenizer.encode_chat(messages), processed, keep), processed, keep=keep
        )

    def from_user_prompt(
        self, prompt: str, media: list[Media], pruning: tuple[float, float] = (0.0, 0.0)
    ) -> Prompt:
        """One user message: the media in the order given, then the text."""
        content: list[dict[str, Any]] = [{"type": "video" if isinstance(m, list) else "image"} for m in media]
        content.append({"type": "text", "text": prompt})
        return self.from_messages([{"role": "user", "content": content}], media, pruning)

    def keep_counts(
        self, items: list[tuple[tuple[int, int, int], bool]], pruning: tuple[float, float]
    ) -> list[int]:
        """Per (grid, is video) item, the tokens pruning at these (image, video) rates keeps; empty
        when neither rate prunes anything."""
        if not any(pruning):
            return []
        merge = self.model_config.vision.spatial_merge_size
        return [kept_count(grid, merge, pruning[1] if video else pruning[0], video) for grid, video in items]

    def from_rendered(self, text: str, media: list[Media]) -> Prompt:
        """Already-rendered, trusted text: special-token text in it is markup (control tokens)."""
        processed = [self.process(m) for m in media]
        return Prompt(self.expand(self.tokenizer.encode(text), processed), processed)

    def spec_from_messages(
        self,
        messages: list[dict[str, Any]],
        images: list[Image.Image] | list[np.ndarray] | list[MediaItem],
        tools: list[dict[str, Any]] | None = None,
        video_seconds: list[float] | None = None,
        pruning: tuple[float, float] = (0.0, 0.0),
    ) -> tuple[PromptSpec, list[np.ndarray] | list[MediaItem]]:
        """For a remote encode stage: the tokenized prompt with grids (from media sizes alone, no
        preprocessing here) and the media to ship to it: planned items (compressed, decoded there) as
        they are, else RGB arrays, (H, W, 3) for an image, (T, H, W, 3) for a video's frames;
        `video_seconds`, per video, the seconds each temporal patch spans (from the frame rate it was
        sampled at)."""
        media = [im if isinstance(im, np.ndarray | MediaItem) else np.asarray(to_rgb(im)) for im in images]
        grids = [self.grid(m) for m in media]
        keep = self.keep_counts([(g, _is_video(m)) for g, m in zip(grids, media, strict=True)], pruning)
        token_ids = self.tokenizer.encode_chat(messages, tools=tools)
        spec = PromptSpec(self.expand(token_ids, grids, keep), grids, list(video_seconds or []), keep)
        return spec, media

    def grid(self, media: np.ndarray | MediaItem) -> tuple[int, int, int]:
        """The (t, h, w) grid an image or video becomes, from its size alone (a planned item's size
        and frame count, or an array's shape)."""
        if isinstance(media, MediaItem):
            (height, width), frames = media.size, (len(media.frames) if media.video else 0)
        else:
            height, width, frames = (
                media.shape[-3],
                media.shape[-2],
                (media.shape[0] if media.ndim == 4 else 0),
            )
        if frames:
            return self.video_processor.grid(frames, width, height)
        return self.image_processor.grid(width, height)

    def spec_from_text(self, prompt: str) -> PromptSpec:
        """A raw completions prompt: client text, so special-token text in it is plain text."""
        return PromptSpec(self.tokenizer.encode_text(prompt))

    def spec_from_user_prompt(
        self, prompt: str, images: list[Image.Image]
    ) -> tuple[PromptSpec, list[np.ndarray]]:
        content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": prompt})
        return self.spec_from_messages([{"role": "user", "content": content}], images)

    def expand(
        self,
        token_ids: list[int],
        images: list[ProcessedImage] | list[tuple[int, int, int]],
        keep: list[int] | None = None,
    ) -> list[int]:
        """Each image or video pad repeated as many times as its item has tokens (items in prompt
        order; `keep`: what pruning keeps of each)."""
        pads = self.model_config.media_pad_ids
        count = sum(token_ids.count(p) for p in pads)
        if count != len(images):
            raise ValueError(f"the prompt has {count} image or video placeholders for {len(images)} items")
        grids = [im.grid_thw if isinstance(im, ProcessedImage) else im for im in images]
        sizes = iter(self.model_config.media_tokens(grids, keep))
        out: list[int] = []
        for token in token_ids:
            if token in pads:
                out.extend([token] * next(sizes))
            else:
                out.append(token)
        return out


def _is_video(media: np.ndarray | MediaItem) -> bool:
    return media.video if isinstance(media, MediaItem) else media.ndim == 4
