"""Video files for the end-to-end tests, written with PyAV: a valid clip and the hostile ones."""

from __future__ import annotations

import base64
import io
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from serving.evals.clips import encode_mp4


def data_url(raw: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def clip(frames: int = 8, size: tuple[int, int] = (64, 48)) -> bytes:
    images = [Image.new("RGB", size, (40 * i % 255, 80, 160)) for i in range(frames)]
    return encode_mp4(images)


def audio_only() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()


def _write(fmt: str, codec: str, rate, size: tuple[int, int], frames, setup=None) -> bytes:
    """`frames` (RGB arrays, or (array, pts) pairs in milliseconds) as one video stream of `codec` in a
    `fmt` container; `setup(stream)` before the first frame."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        if setup is not None:
            setup(stream)
        for item in frames:
            pixels, pts = item if isinstance(item, tuple) else (item, None)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def lossless(frames: int = 4) -> bytes:
    """FFV1 in Matroska: a real video in a codec the server does not take."""
    return _write("matroska", "ffv1", 2, (32, 32), [np.zeros((32, 32, 3), dtype=np.uint8)] * frames)


def long_clip(seconds: int) -> bytes:
    """One tiny frame a second for `seconds`: cheap to send, long by its header."""
    black = np.zeros((32, 32, 3), dtype=np.uint8)
    return _write("mp4", "libx264", Fraction(1, 1), (32, 32), [black] * seconds)


def rotated(degrees: int = 90, frames: int = 4) -> bytes:
    """A clip whose header asks players to rotate it (a phone's portrait video): served as stored."""
    images = [np.full((32, 64, 3), 40 * i, dtype=np.uint8) for i in range(frames)]
    return _write("mp4", "libx264", 2, (64, 32), images, lambda s: s.set_display_rotation(degrees))


def variable_rate(frames: int = 8) -> bytes:
    """Frames at irregular times (a screen recording's variable frame rate)."""
    gaps = [(50, 400, 120, 900)[i % 4] for i in range(frames)]
    times = [sum(gaps[:i]) for i in range(frames)]
    images = [(np.full((32, 48, 3), 30 * i, dtype=np.uint8), t) for i, t in enumerate(times)]

    def millisecond_clock(stream) -> None:
        stream.codec_context.time_base = Fraction(1, 1000)

    return _write("mp4", "libx264", 30, (48, 32), images, millisecond_clock)


def garbled(raw: bytes) -> bytes:
    """The clip with its coded frames overwritten: the header still reads, no frame decodes."""
    start = raw.index(b"mdat") + 4
    end = raw.index(b"moov") if raw.index(b"moov") > start else len(raw)
    return raw[:start] + bytes(end - start) + raw[end:]
