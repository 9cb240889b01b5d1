"""Videos from requests, at the gateway: the container's header probed with PyAV (no system FFmpeg),
checked against the server's limits, and the frames to take chosen by the request's sampling (`fps`
or `num_frames`, Qwen's rules). No frame is decoded here (the encode worker decodes only those frames).

What the header declares decides everything: dimensions, duration, frame count and codec are
checked, the number of frames to sample follows from the duration, and so the video's pixels (and its
tokens) are known and charged to the request first. A container that lies (fewer frames than it
declares, a truncated stream, frames of another size) gives repeated or resized frames on the
worker, never more work or another token count. Rotation metadata is not applied: frames are taken as
stored, so the header's size is the size encoded.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from serving.api.errors import APIError
from serving.config import GatewayConfig

TEMPORAL_PATCH = 2  # Qwen2-VL / Qwen2.5-VL: frames are paired into temporal patches
_CODECS = {"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"}


@dataclass(frozen=True)
class VideoSampling:
    """Per request (vLLM's `media_io_kwargs.video`): frames per second of video, or a frame count."""

    fps: float | None = None
    num_frames: int | None = None


@dataclass(frozen=True)
class VideoProbe:
    width: int
    height: int
    duration_s: float
    frames: int  # declared (or estimated from duration × rate)
    fps: float
    codec: str


def _bad(message: str, param: str, code: str = "invalid_video", status: int = 400) -> APIError:
    return APIError(status, message, param, code)


def probe_video(data: bytes, cfg: GatewayConfig, param: str) -> VideoProbe:
    """The first video stream's header, checked: a container PyAV opens, a known codec, dimensions,
    duration and frame count inside the server's limits."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise _bad("The file has no video stream.", param)
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            duration = (
                float(stream.duration * stream.time_base)
                if stream.duration is not None and stream.time_base is not None
                else (container.duration or 0) / 1e6
            )
            frames = stream.frames or (round(duration * rate) if rate else 0)
            codec = stream.codec_context.name
    except APIError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError, ZeroDivisionError):
        raise _bad("The video could not be opened.", param) from None
    if codec not in _CODECS:
        raise _bad(f"The video's codec ({codec}) is not supported.", param)
    if width < 1 or height < 1 or frames < 1 or not rate or not math.isfinite(duration) or duration <= 0:
        raise _bad("The video declares no frames, no size or no duration.", param)
    if width * height > cfg.max_image_pixels or max(width, height) / min(width, height) > 200:
        raise _bad("The video's frames are larger than the server accepts.", param, "video_too_large")
    if duration > cfg.video_max_seconds:
        message = f"The video is longer than {cfg.video_max_seconds:g} seconds."
        raise _bad(message, param, "video_too_large")
    if frames > cfg.video_max_seconds * 240:
        raise _bad("The video declares more frames than its length allows.", param, "video_too_large")
    return VideoProbe(width, height, duration, frames, rate, codec)


def frame_indices(probe: VideoProbe, sampling: VideoSampling, cfg: GatewayConfig) -> list[int]:
    """Which frames to decode: `num_frames` spread evenly, else one per 1/fps seconds (the server's
    `video_fps` by default); rounded to whole temporal patches and capped by `video_max_frames`."""
    if sampling.num_frames is not None:
        wanted = sampling.num_frames
    else:
        fps = sampling.fps or cfg.video_fps
        wanted = math.floor(probe.duration_s * fps + 1e-6)
    wanted = min(max(wanted, 1), probe.frames, cfg.video_max_frames)
    wanted = max(TEMPORAL_PATCH, wanted - wanted % TEMPORAL_PATCH) if probe.frames >= TEMPORAL_PATCH else 1
    return np.linspace(0, probe.frames - 1, wanted).round().astype(int).tolist()


def seconds_per_patch(probe: VideoProbe, frames: int) -> float:
    """Seconds of video one temporal patch of the sampled frames spans (Qwen2.5-VL's
    `second_per_grid_ts`: the temporal patch size over the sampling rate)."""
    return TEMPORAL_PATCH * probe.duration_s / frames
