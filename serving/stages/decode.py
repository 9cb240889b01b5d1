"""Media decoded where they are encoded: a `MediaItem`'s compressed bytes → RGB pixels at the size the
gateway planned, on a small pool of threads of the worker's own (never the thread that runs the
vision tower). What does not decode is the client's fault: a `MediaRejected` that becomes its 400 (or
a 422 past the decode time cap), never a failure of the stage.

The gateway planned from the headers alone, so the bytes are untrusted here too: an image's header is
read again and its pixels checked before decoding; a video decodes only up to the last frame wanted,
under a deadline; frames a container declared but does not hold repeat the last decoded one, and
frames of another size than declared are resized to it, so the item keeps the token count its prompt
was laid out for.
"""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from serving.engine.image_processor import to_rgb
from serving.types import MediaItem, MediaRejected, Rejection

IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}
# Decodes in flight per worker: enough to overlap a request's items with the vision tower, few enough
# that a burst of large videos cannot take every core from it.
DECODE_THREADS = 2


def rejected(message: str, param: str, code: str, status: int = 400) -> MediaRejected:
    return MediaRejected(Rejection(status, code, param, message))


def decode_image(data: bytes, max_pixels: int, param: str) -> np.ndarray:
    """Bytes → RGB array of the first frame. The header is read first and the pixel count checked
    before decoding (decompression bombs), even when the caller probed already."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in IMAGE_FORMATS:
                raise rejected("Images must be PNG, JPEG, WebP or GIF.", param, "invalid_image")
            width, height = image.size
            if width * height > max_pixels:
                raise rejected("The image has more pixels than the server accepts.", param, "image_too_large")
            if min(width, height) < 1 or max(width, height) / min(width, height) > 200:
                raise rejected(
                    "The image's aspect ratio is too extreme (over 200:1).", param, "invalid_image"
                )
            image.seek(0)  # animated images: the first frame
            image.load()
            return np.asarray(to_rgb(image))
    except MediaRejected:
        raise
    except Exception:  # noqa: BLE001 - whatever a decoder raises on these bytes, they are the client's
        raise rejected("The image could not be decoded.", param, "invalid_image") from None


def decode_video(data: bytes, indices: list[int], timeout_s: float, param: str) -> list[np.ndarray]:
    """The chosen frames as RGB uint8 arrays, decoding in order and stopping after the last one wanted;
    past `timeout_s` the request is refused (422). Frames may differ in size (a stream that changes
    resolution): the caller resizes them."""
    import av

    wanted = set(indices)
    last = max(indices)
    frames: dict[int, np.ndarray] = {}
    deadline = time.monotonic() + timeout_s
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
                if time.monotonic() > deadline:
                    message = "Decoding the video took longer than the server allows."
                    raise rejected(message, param, "media_timeout", 422)
    except MediaRejected:
        raise
    except Exception:  # noqa: BLE001 - a decoder's error on these bytes: the frames so far, or the client's 400
        if not frames:
            raise rejected("The video could not be decoded.", param, "invalid_video") from None
    if not frames:
        raise rejected("The video has no decodable frames.", param, "invalid_video")
    # A container that declared more frames than it holds: the last decoded frame stands in for the
    # missing ones, so the clip keeps the length its tokens were counted for.
    got = [frames.get(i) for i in indices]
    fill = next(f for f in got if f is not None)
    out = []
    for f in got:
        fill = f if f is not None else fill
        out.append(fill)
    return out


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W, 3) array at `size` (height, width), bicubic; unchanged when it already is."""
    if pixels.shape[:2] == size:
        return pixels
    height, width = size
    return np.asarray(Image.fromarray(pixels).resize((width, height), resample=Image.Resampling.BICUBIC))


def decode_item(item: MediaItem, queued_at: float | None = None) -> np.ndarray:
    """The item's pixels as planned: (H, W, 3) for an image at its budgeted size, (T, H, W, 3) for a
    video's chosen frames at its declared size. A video's time cap counts from `queued_at` (when it
    was handed to the decode threads): waiting behind other videos spends it too."""
    if not item.video:
        return resize(decode_image(item.data, item.max_pixels, item.param), item.size)
    left = item.timeout_s - (time.monotonic() - queued_at if queued_at is not None else 0.0)
    if left <= 0:
        raise rejected(
            "Decoding the video took longer than the server allows.", item.param, "media_timeout", 422
        )
    frames = decode_video(item.data, list(item.frames), left, item.param)
    return np.stack([resize(f, item.size) for f in frames])


class Decoder:
    """A worker's decode threads, started on first use."""

    def __init__(self, threads: int = DECODE_THREADS) -> None:
        self.threads = threads
        self.decoded = {"image": 0, "video": 0}  # items decoded, by kind (the worker's stats)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def decode(self, items: list[MediaItem]) -> list[np.ndarray]:
        """The items decoded side by side; the first rejection, if any, once all have ended."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="media-decode")
        now = time.monotonic()
        futures = [self._pool.submit(decode_item, item, now) for item in items]
        errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error
        with self._lock:
            for item in items:
                self.decoded["video" if item.video else "image"] += 1
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
