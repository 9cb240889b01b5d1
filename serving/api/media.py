"""Images from requests, safely: data URLs and http(s) fetches under byte caps and timeouts (one
deadline and one byte budget per request), with loopback, private, link-local and metadata addresses
refused after DNS resolution and again on every redirect hop; headers probed (pixels, frames, aspect
ratio) and the request's pixels budgeted before anything is decoded (decompression bombs), decoding off
the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlparse

import httpx
import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.api.admission import Ticket
from serving.api.errors import APIError
from serving.api.video import VideoSampling, decode_video, frame_indices, probe_video, seconds_per_patch
from serving.config import GatewayConfig
from serving.engine.image_processor import to_rgb

FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}
_DATA_URL = re.compile(r"^data:image/([a-zA-Z0-9.+-]+);base64,(.*)$", re.DOTALL)
_VIDEO_DATA_URL = re.compile(r"^data:(?:video|application)/([a-zA-Z0-9.+-]+);base64,(.*)$", re.DOTALL)
# Characters no host name may hold (spaces, controls, percent escapes, backslashes): refused before they
# reach the resolver or the HTTP client.
_BAD_HOST = re.compile(r"[\s\x00-\x1f\x7f%\\]")


class RequestMedia:
    """One request's media budget: a byte total across its images (inline or fetched)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0

    def charge(self, size: int, param: str) -> None:
        self.bytes += size
        if self.bytes > self.max_bytes:
            raise APIError(
                413, "The request's images are larger in total than the server accepts.", param,
                "media_too_large",
            )  # fmt: skip


@dataclass(frozen=True)
class MediaRef:
    """One image or video of a request: a URL or inline bytes, and the field naming it in errors."""

    source: str | bytes
    param: str
    video: bool = False
    detail: str | None = None


@dataclass(frozen=True)
class Loaded:
    """A request's media, decoded: arrays in prompt order, and per video (in order) the seconds one
    temporal patch of its sampled frames spans."""

    arrays: list[np.ndarray]
    video_seconds: list[float]


@dataclass(frozen=True)
class Probe:
    """What an image's header declares, read without decoding its pixels."""

    width: int
    height: int
    frames: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


class MediaFetcher:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.allowed_hosts = {h.lower() for h in cfg.allow_media_hosts}
        timeout = httpx.Timeout(cfg.media_read_timeout_s, connect=cfg.media_connect_timeout_s)
        self.client = httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)

    async def load_all(
        self,
        refs: list[MediaRef],
        ticket: Ticket | None = None,
        sampling: VideoSampling | None = None,
    ) -> Loaded:
        """A request's images and videos → RGB uint8 arrays: (H, W, 3) for an image, (T, H, W, 3) for
        a video's sampled frames (`sampling`, or the server's defaults), and per video the seconds
        each temporal patch of its frames spans.

        Every fetch runs under one deadline and one byte budget for the request; every header is then
        checked (pixels, frames, aspect ratio, a video's duration and codec) and the request's declared
        pixels (a video's: its sampled frames') are checked against its own budget (413) and charged to
        the gateway's in-flight budget on `ticket` (429) before anything is decoded."""
        if not refs:
            return Loaded([], [])
        media = RequestMedia(self.cfg.max_request_media_bytes)
        try:
            async with asyncio.timeout(self.cfg.media_total_timeout_s):
                raws = await _all_or_none([self._bytes(r.source, r.param, media, r.video) for r in refs])
        except TimeoutError:
            message = "Fetching the request's media took longer than the server allows."
            raise APIError(422, message, refs[0].param, "media_fetch_timeout") from None
        sampling = sampling or VideoSampling()
        plans: list[list[int] | None] = []
        seconds: list[float] = []
        pixels = 0
        for raw, ref in zip(raws, refs, strict=True):
            if ref.video:
                video = await asyncio.to_thread(probe_video, raw, self.cfg, ref.param)
                indices = frame_indices(video, sampling, self.cfg)
                plans.append(indices)
                seconds.append(seconds_per_patch(video, len(indices)))
                pixels += video.width * video.height * len(indices)
            else:
                pixels += (await asyncio.to_thread(probe_image, raw, self.cfg, ref.param)).pixels
                plans.append(None)
        if pixels > self.cfg.max_request_image_pixels:
            message = "The request's images and videos have more pixels in total than the server accepts."
            raise APIError(413, message, "messages", "image_too_large")
        if ticket is not None:
            ticket.charge_pixels(pixels)
        arrays = list(
            await asyncio.gather(
                *(
                    asyncio.to_thread(decode_image, raw, self.cfg.max_image_pixels, ref.param)
                    if plan is None
                    else asyncio.to_thread(decode_video, raw, plan, self.cfg, ref.param)
                    for raw, ref, plan in zip(raws, refs, plans, strict=True)
                )
            )
        )
        return Loaded(arrays, seconds)

    async def load(self, url: str, param: str) -> np.ndarray:
        """One image URL (data: or http(s)) → RGB uint8 array (H, W, 3), under the request budgets."""
        return (await self.load_all([MediaRef(url, param)])).arrays[0]

    def _limit(self, video: bool) -> tuple[int, str]:
        return (self.cfg.max_video_bytes, "video") if video else (self.cfg.max_image_bytes, "image")

    async def _bytes(self, url: str | bytes, param: str, media: RequestMedia, video: bool = False) -> bytes:
        limit, noun = self._limit(video)
        if isinstance(url, bytes):  # inline bytes (gRPC): the same caps as a data URL
            if len(url) > limit:
                raise APIError(
                    400, f"The {noun} is larger than the server accepts.", param, f"{noun}_too_large"
                )
            media.charge(len(url), param)
            return url
        if url.startswith("data:"):
            data = self._from_data_url(url, param, video)
            media.charge(len(data), param)
            return data
        return await self._fetch(url, param, media, video)

    def _from_data_url(self, url: str, param: str, video: bool = False) -> bytes:
        limit, noun = self._limit(video)
        match = (_VIDEO_DATA_URL if video else _DATA_URL).match(url)
        if not match:
            kind = "video" if video else "image"
            raise APIError(
                400, f"{noun.title()} data URLs must look like data:{kind}/<type>;base64,<data>.", param
            )
        if len(match.group(2)) > limit * 4 // 3 + 4:
            raise APIError(400, f"The {noun} is larger than the server accepts.", param, f"{noun}_too_large")
        try:
            return base64.b64decode(match.group(2), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(
                400, f"The {noun} data URL is not valid base64.", param, f"invalid_{noun}"
            ) from None

    async def _fetch(self, url: str, param: str, media: RequestMedia, video: bool = False) -> bytes:
        limit, noun = self._limit(video)
        for _ in range(self.cfg.media_max_redirects + 1):
            await self._check_url(url, param)
            try:
                async with self.client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        message = f"Fetching the {noun} failed with HTTP {response.status_code}."
                        raise APIError(422, message, param, "media_fetch_failed")
                    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
                    accepted = ("video/", "application/octet-stream") if video else ("image/",)
                    if not kind.startswith(accepted):
                        raise APIError(
                            422,
                            f"The URL did not return {'a' if video else 'an'} {noun}.",
                            param,
                            f"media_not_{noun}",
                        )
                    return await self._read_capped(response, param, media, limit, noun)
            except (httpx.HTTPError, httpx.InvalidURL, ValueError):
                raise APIError(422, f"Fetching the {noun} failed.", param, "media_fetch_failed") from None
        raise APIError(422, f"Fetching the {noun} failed: too many redirects.", param, "media_fetch_failed")

    async def _read_capped(
        self, response: httpx.Response, param: str, media: RequestMedia, limit: int, noun: str
    ) -> bytes:
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise APIError(
                    422, f"The fetched {noun} is larger than the server accepts.", param, f"{noun}_too_large"
                )
            media.charge(len(chunk), param)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _check_url(self, url: str, param: str) -> None:
        invalid = APIError(
            400, "Image URLs must be valid http, https or data URLs.", param, "invalid_image_url"
        )
        try:
            parsed = urlparse(url)
            port = parsed.port  # ValueError for a port out of range or not a number
            host = (parsed.hostname or "").lower()
        except ValueError:
            raise invalid from None
        if parsed.scheme not in ("http", "https") or not host or len(host) > 253 or _BAD_HOST.search(host):
            raise invalid
        if host in self.allowed_hosts:
            return
        try:
            infos = await asyncio.to_thread(
                socket.getaddrinfo, host, port or (443 if parsed.scheme == "https" else 80),
                type=socket.SOCK_STREAM,
            )  # fmt: skip
        except (OSError, ValueError):  # ValueError: IDNA encoding of a malformed name
            raise APIError(
                422, "The image host could not be resolved.", param, "media_fetch_failed"
            ) from None
        for info in infos:
            if not is_public(info[4][0]):
                message = "The image URL points to an address the server does not fetch from."
                raise APIError(422, message, param, "media_address_blocked")

    async def close(self) -> None:
        await self.client.aclose()


async def _all_or_none(coros: list[Coroutine[Any, Any, bytes]]) -> list[bytes]:
    """Like gather, but the first failure cancels the rest (no fetch outlives its request)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def is_public(address: str) -> bool:
    """False for loopback, private, link-local (cloud metadata included), reserved and multicast."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
    )


def probe_image(data: bytes, cfg: GatewayConfig, param: str) -> Probe:
    """Read an image's header (and count its frames) without decoding pixels; refuse what the server
    will not decode: unknown formats, too many pixels or frames, extreme aspect ratios."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            probe = Probe(*image.size, frames=getattr(image, "n_frames", 1) if _animated(image) else 1)
            kind = image.format
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        raise APIError(400, "The image could not be decoded.", param, "invalid_image") from None
    if kind not in FORMATS:
        raise APIError(400, "Images must be PNG, JPEG, WebP or GIF.", param, "invalid_image")
    if probe.pixels > cfg.max_image_pixels:
        raise APIError(400, "The image has more pixels than the server accepts.", param, "image_too_large")
    if (
        min(probe.width, probe.height) < 1
        or max(probe.width, probe.height) / min(probe.width, probe.height) > 200
    ):
        raise APIError(400, "The image's aspect ratio is too extreme (over 200:1).", param, "invalid_image")
    if probe.frames > cfg.max_image_frames:
        message = f"The image has more than {cfg.max_image_frames} frames."
        raise APIError(400, message, param, "image_too_large")
    return probe


def _animated(image: Image.Image) -> bool:
    return bool(getattr(image, "is_animated", False))


def decode_image(data: bytes, max_pixels: int, param: str) -> np.ndarray:
    """Bytes → RGB array of the first frame. The header is read first and the pixel count checked
    before decoding (decompression bombs), even when the caller probed already."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in FORMATS:
                raise APIError(400, "Images must be PNG, JPEG, WebP or GIF.", param, "invalid_image")
            width, height = image.size
            if width * height > max_pixels:
                raise APIError(
                    400, "The image has more pixels than the server accepts.", param, "image_too_large"
                )
            if min(width, height) < 1 or max(width, height) / min(width, height) > 200:
                raise APIError(
                    400, "The image's aspect ratio is too extreme (over 200:1).", param, "invalid_image"
                )
            image.seek(0)  # animated images: the first frame
            image.load()
            return np.asarray(to_rgb(image))
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        raise APIError(400, "The image could not be decoded.", param, "invalid_image") from None
