"""Turns a chat (or a prompt and images) into what the engine runs: prompt token ids with every image
pad expanded to the image's token count, and the preprocessed images in prompt order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from serving.engine.image_processor import ImageProcessor, ProcessedImage, to_rgb
from serving.engine.models.config import ModelConfig
from serving.engine.tokenizer import Tokenizer
from serving.types import PromptSpec


@dataclass
class Prompt:
    """Prompt tokens (image pads expanded) and the images they stand for. A stage that receives the
    images' embeddings instead of their pixels carries only their grids."""

    token_ids: list[int]
    images: list[ProcessedImage] = field(default_factory=list)
    grids: list[tuple[int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images and not self.grids:
            self.grids = [im.grid_thw for im in self.images]


class InputProcessor:
    def __init__(
        self, model_config: ModelConfig, tokenizer: Tokenizer, image_processor: ImageProcessor
    ) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @classmethod
    def from_dir(cls, model_dir: str) -> InputProcessor:
        """Tokenizer and image processor only: what a gateway needs, without the weights."""
        from serving.engine.image_processor import ImageProcessorConfig
        from serving.engine.models.config import load_model_config

        processor = ImageProcessor(ImageProcessorConfig.from_dir(model_dir))
        return cls(load_model_config(model_dir), Tokenizer(model_dir), processor)

    def from_messages(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> Prompt:
        """`messages` in chat-template form; its image parts, in order, stand for `images`. Message text
        is plain text: only the template's own markup becomes control tokens (image pads included)."""
        processed = [self.image_processor(im) for im in images]
        return Prompt(self.expand(self.tokenizer.encode_chat(messages), processed), processed)

    def from_user_prompt(self, prompt: str, images: list[Image.Image]) -> Prompt:
        """One user message: the images in the order given, then the text."""
        content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": prompt})
        return self.from_messages([{"role": "user", "content": content}], images)

    def from_rendered(self, text: str, images: list[Image.Image]) -> Prompt:
        """Already-rendered, trusted text: special-token text in it is markup (control tokens)."""
        processed = [self.image_processor(im) for im in images]
        return Prompt(self.expand(self.tokenizer.encode(text), processed), processed)

    def spec_from_messages(
        self, messages: list[dict[str, Any]], images: list[Image.Image] | list[np.ndarray]
    ) -> tuple[PromptSpec, list[np.ndarray]]:
        """For a remote encode stage: the tokenized prompt with grids (from image sizes alone, no
        preprocessing here) and the images as RGB arrays to ship to it."""
        arrays = [im if isinstance(im, np.ndarray) else np.asarray(to_rgb(im)) for im in images]
        grids = [self.image_processor.grid(a.shape[1], a.shape[0]) for a in arrays]
        return PromptSpec(self.expand(self.tokenizer.encode_chat(messages), grids), grids), arrays

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
        self, token_ids: list[int], images: list[ProcessedImage] | list[tuple[int, int, int]]
    ) -> list[int]:
        """Each image pad repeated as many times as its image has tokens."""
        pad = self.model_config.image_token_id
        if token_ids.count(pad) != len(images):
            raise ValueError(
                f"the prompt has {token_ids.count(pad)} image placeholders for {len(images)} images"
            )
        grids = [im.grid_thw if isinstance(im, ProcessedImage) else im for im in images]
        sizes = iter(self.model_config.num_image_tokens(g) for g in grids)
        out: list[int] = []
        for token in token_ids:
            if token == pad:
                out.extend([pad] * next(sizes))
            else:
                out.append(token)
        return out
