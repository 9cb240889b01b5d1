"""Video files for the `motion` task: frames encoded with PyAV (H.264 in MP4, 2 fps) and decoded back.

The clip is stored as a real file so that a server decodes it the way it decodes any client's video.
Encoding runs on one thread so the same frames give the same bytes.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
from PIL import Image

FPS = 2


def encode_mp4(frames: list[Image.Image], fps: int = FPS) -> bytes:
    """H.264 (yuv420p) in an MP4 container."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        # Near-lossless, so the decoded frames keep the colours the answers depend on.
        stream.options = {"crf": "12", "preset": "medium", "threads": "1"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def decode_frames(data: bytes) -> list[Image.Image]:
    """Every frame of the first video stream, as RGB images."""
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_image().convert("RGB") for frame in container.decode(video=0)]


def frames_array(data: bytes) -> np.ndarray:
    """(frames, height, width, 3) uint8."""
    return np.stack([np.asarray(f) for f in decode_frames(data)])
