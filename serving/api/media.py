"""Images and videos from requests, safely: data URLs and http(s) fetches under byte caps and timeouts
(one deadline and one byte budget per request), with loopback, private, link-local and metadata
addresses refused after DNS resolution and again on every redirect hop; headers probed (pixels,
frames, aspect ratio, a video's duration and codec) and the request's pixels budgeted, off the event
loop. Nothing is decoded here: the compressed bytes go to the encode worker with their plan.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urljoin, urlparse

import httpx
from PIL import Image, UnidentifiedImageError

from serving.api.admission import Ticket
from serving.api.errors import APIError
from serving.api.video import VideoSampling, frame_indices, probe_video, seconds_per_patch
from serving.config import GatewayConfig
from serving.stages.decode import IMAGE_FORMATS as FORMATS
from serving.types import MediaItem

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
    uuid: str | None = None  # the client's name for it: with no source, the item sent before under it


@dataclass(frozen=True)
class Loaded:
    """A request's media, fetched and their headers checked, not decoded: items in prompt order at
    their declared sizes (the caller plans each item's size from its budget), and per video (in
    order) the seconds one temporal patch of its sampled frames spans."""

    items: list[MediaItem]
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


class UuidCache:
    """Fetched media (compressed, with their frame plans) by their clients' `uuid` (and, for a video,
    its sampling), least recently used first out past `max_bytes`. Per gateway replica: a client that
    spreads one uuid over replicas sends its data to each once."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[tuple, tuple[MediaItem, float | None]] = OrderedDict()

    def get(self, key: tuple) -> tuple[MediaItem, float | None] | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple, item: tuple[MediaItem, float | None]) -> None:
        if len(item[0].data) > self.max_bytes:
            return
        if (old := self._items.pop(key, None)) is not None:
            self.bytes -= len(old[0].data)
        self._items[key] = item
        self.bytes += len(item[0].data)
        while self.bytes > self.max_bytes:
            _, (dropped, _) = self._items.popitem(last=False)
            self.bytes -= len(dropped.data)


def _uuid_key(ref: MediaRef, sampling: VideoSampling) -> tuple:
    """What the item depends on besides its bytes: a video's frames, on its sampling."""
    return (ref.uuid, ref.video, (sampling.fps, sampling.num_frames) if ref.video else None)


class MediaFetcher:
    def __init__(self, cfg: GatewayConfig, on_reuse: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.uuids = UuidCache(cfg.media_uuid_cache_bytes)
        self.on_reuse = on_reuse  # metrics: uuid reuses
        self.allowed_hosts = {h.lower() for h in cfg.allow_media_hosts}
        timeout = httpx.Timeout(cfg.media_read_timeout_s, connect=cfg.media_connect_timeout_s)
        self.client = httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)

    async def load_all(
        self,
        refs: list[MediaRef],
        ticket: Ticket | None = None,
        sampling: VideoSampling | None = None,
    ) -> Loaded:
        """A request's images and videos, fetched and probed, never decoded here: each an item of its
        compressed bytes, its declared size and, for a video, the frames its sampling (`sampling`, or
        the server's defaults) takes; and per video the seconds each temporal patch spans.

        Every fetch runs under one deadline and one byte budget for the request; every header is then
        checked (pixels, frames, aspect ratio, a video's duration and codec) and the request's declared
        pixels (a video's: its sampled frames') are checked against its own budget (413) and charged to
        the gateway's in-flight budget on `ticket` (429). The encode worker decodes."""
        if not refs:
            return Loaded([], [])
        sampling = sampling or VideoSampling()
        reused: dict[int, tuple[MediaItem, float | None]] = {}
        for i, ref in enumerate(refs):
            if ref.uuid and not ref.source:  # vLLM's media identity: the item sent before under it
                hit = self.uuids.get(_uuid_key(ref, sampling))
                if hit is None:
                    message = f"No media is known by uuid '{ref.uuid[:64]}'; send it with its data first."
                    raise APIError(400, message, ref.param, "unknown_media_uuid")
                reused[i] = (replace(hit[0], param=ref.param), hit[1])
        fetch = [i for i in range(len(refs)) if i not in reused]
        media = RequestMedia(self.cfg.max_request_media_bytes)
        try:
            async with asyncio.timeout(self.cfg.media_total_timeout_s):
                fetched = await _all_or_none(
                    [self._bytes(refs[i].source, refs[i].param, media, refs[i].video) for i in fetch]
                )
        except TimeoutError:
            message = "Fetching the request's media took longer than the server allows."
            raise APIError(422, message, refs[0].param, "media_fetch_timeout") from None
        items = dict(reused)
        for i, raw in zip(fetch, fetched, strict=True):
            items[i] = await asyncio.to_thread(self._probe, refs[i], raw, sampling)
        pixels = sum(_pixels(item) for item, _ in items.values())
        if pixels > self.cfg.max_request_image_pixels:
            message = "The request's images and videos have more pixels in total than the server accepts."
            raise APIError(413, message, "messages", "image_too_large")
        if ticket is not None:
            ticket.charge_pixels(pixels)
        for i in fetch:
            if refs[i].uuid:
                self.uuids.put(_uuid_key(refs[i], sampling), items[i])
        if self.on_reuse is not None:
            for _ in reused:
                self.on_reuse()
        ordered = [items[i] for i in range(len(refs))]
        video_seconds = [s if s is not None else 1.0 for (item, s) in ordered if item.video]
        return Loaded([item for item, _ in ordered], video_seconds)

    def _probe(self, ref: MediaRef, raw: bytes, sampling: VideoSampling) -> tuple[MediaItem, float | None]:
        """An item from its header alone: its declared size and, for a video, its frame plan."""
        cfg = self.cfg
        limits = {
            "param": ref.param,
            "max_pixels": cfg.max_image_pixels,
            "timeout_s": cfg.video_decode_timeout_s,
        }
        if ref.video:
            video = probe_video(raw, cfg, ref.param)
            frames = frame_indices(video, sampling, cfg)
            item = MediaItem(raw, True, (video.height, video.width), tuple(frames), **limits)
            return item, seconds_per_patch(video, len(frames))
        image = probe_image(raw, cfg, ref.param)
        return MediaItem(raw, False, (image.height, image.width), **limits), None

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


def _pixels(item: MediaItem) -> int:
    """The pixels an item declares: a video's, over the frames it takes."""
    return item.size[0] * item.size[1] * max(len(item.frames), 1)
