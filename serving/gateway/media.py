"""Images from requests, safely: data URLs and http(s) fetches under byte caps and timeouts, with
loopback, private, link-local and metadata addresses refused after DNS resolution and again on every
redirect hop; decoding only after the pixel count is checked (decompression bombs), off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
from urllib.parse import urljoin, urlparse

import httpx
import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.config import GatewayConfig
from serving.engine.image_processor import to_rgb
from serving.gateway.errors import APIError

FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}
_DATA_URL = re.compile(r"^data:image/([a-zA-Z0-9.+-]+);base64,(.*)$", re.DOTALL)


class MediaFetcher:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.allowed_hosts = {h.lower() for h in cfg.allow_media_hosts}
        timeout = httpx.Timeout(cfg.media_read_timeout_s, connect=cfg.media_connect_timeout_s)
        self.client = httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)

    async def load(self, url: str, param: str) -> np.ndarray:
        """An image URL (data: or http(s)) → RGB uint8 array (H, W, 3)."""
        data = self._from_data_url(url, param) if url.startswith("data:") else await self._fetch(url, param)
        return await asyncio.to_thread(decode_image, data, self.cfg.max_image_pixels, param)

    def _from_data_url(self, url: str, param: str) -> bytes:
        match = _DATA_URL.match(url)
        if not match:
            raise APIError(400, "Image data URLs must look like data:image/<type>;base64,<data>.", param)
        if len(match.group(2)) > self.cfg.max_image_bytes * 4 // 3 + 4:
            raise APIError(400, "The image is larger than the server accepts.", param, "image_too_large")
        try:
            return base64.b64decode(match.group(2), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "The image data URL is not valid base64.", param, "invalid_image") from None

    async def _fetch(self, url: str, param: str) -> bytes:
        for _ in range(self.cfg.media_max_redirects + 1):
            await self._check_url(url, param)
            try:
                async with self.client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        message = f"Fetching the image failed with HTTP {response.status_code}."
                        raise APIError(422, message, param, "media_fetch_failed")
                    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
                    if not kind.startswith("image/"):
                        raise APIError(422, "The URL did not return an image.", param, "media_not_image")
                    return await self._read_capped(response, param)
            except httpx.HTTPError:
                raise APIError(422, "Fetching the image failed.", param, "media_fetch_failed") from None
        raise APIError(422, "Fetching the image failed: too many redirects.", param, "media_fetch_failed")

    async def _read_capped(self, response: httpx.Response, param: str) -> bytes:
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.cfg.max_image_bytes:
                raise APIError(
                    422, "The fetched image is larger than the server accepts.", param, "image_too_large"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    async def _check_url(self, url: str, param: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise APIError(400, "Image URLs must be http, https or data URLs.", param, "invalid_image_url")
        host = parsed.hostname.lower()
        if host in self.allowed_hosts:
            return
        try:
            infos = await asyncio.to_thread(
                socket.getaddrinfo, host, parsed.port or 80, type=socket.SOCK_STREAM
            )
        except OSError:
            raise APIError(
                422, "The image host could not be resolved.", param, "media_fetch_failed"
            ) from None
        for info in infos:
            if not is_public(info[4][0]):
                message = "The image URL points to an address the server does not fetch from."
                raise APIError(422, message, param, "media_address_blocked")

    async def close(self) -> None:
        await self.client.aclose()


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


def decode_image(data: bytes, max_pixels: int, param: str) -> np.ndarray:
    """Bytes → RGB array. The header is read first and the pixel count checked before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in FORMATS:
                raise APIError(400, "Images must be PNG, JPEG, WebP or GIF.", param, "invalid_image")
            width, height = image.size
            if width * height > max_pixels:
                raise APIError(
                    400, "The image has more pixels than the server accepts.", param, "image_too_large"
                )
            if max(width, height) / min(width, height) > 200:
                raise APIError(
                    400, "The image's aspect ratio is too extreme (over 200:1).", param, "invalid_image"
                )
            image.seek(0)  # animated images: the first frame
            image.load()
            return np.asarray(to_rgb(image))
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise APIError(400, "The image could not be decoded.", param, "invalid_image") from None
