"""Media under budgets: headers checked (pixels, frames) and a request's pixels budgeted from them alone
(the gateway never decodes; the encode worker does), one byte budget and one fetch deadline per
request, malformed URLs and ports refused."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import struct
import threading
import time

import pytest
from PIL import Image

from serving.api.admission import Admission
from serving.api.errors import APIError
from serving.api.media import MediaFetcher, MediaRef, probe_image
from serving.config import GatewayConfig
from serving.stages import decode as decode_module
from tests.conftest import make_image


def declared_gif(width: int, height: int) -> bytes:
    """A ~40-byte GIF whose header declares width×height (one 1×1 frame inside): decoding it would
    allocate the whole declared canvas."""
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame + b"\x3b"


def animated_gif(frames: int) -> bytes:
    images = [Image.new("RGB", (2, 2), (i * 10 % 256, i // 25, 0)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=10)
    return buf.getvalue()


def png(width: int = 8, height: int = 8) -> bytes:
    buf = io.BytesIO()
    make_image(width, height).save(buf, format="PNG")  # noise: does not compress away
    return buf.getvalue()


def data_url(raw: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


TICKETS = []  # tickets stay held (as a running request would) until the test ends


def load(cfg: GatewayConfig, urls: list[str], admission: Admission | None = None):
    async def go():
        fetcher = MediaFetcher(cfg)
        try:
            ticket = await admission.acquire() if admission else None
            TICKETS.append(ticket)
            loaded = await fetcher.load_all(
                [MediaRef(u, f"messages.0.content.{i}") for i, u in enumerate(urls)], ticket
            )
            return loaded.items
        finally:
            await fetcher.close()

    return asyncio.run(go())


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """Counts image decodes (none happen at the gateway)."""
    calls: list[int] = []
    real = decode_module.decode_image

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_module, "decode_image", counting)
    return calls


def test_declared_gif_is_small_and_declares_its_size():
    raw = declared_gif(6000, 6000)
    assert len(raw) < 80
    probe = probe_image(raw, GatewayConfig(), "p")
    assert (probe.width, probe.height, probe.frames) == (6000, 6000, 1)


def test_eight_declared_6000px_gifs_refused_before_any_decode(decodes):
    with pytest.raises(APIError) as err:
        load(GatewayConfig(), [data_url(declared_gif(6000, 6000), "gif")] * 8)
    assert err.value.status == 413 and err.value.code == "image_too_large"
    assert decodes == []


def test_in_flight_pixel_budget_is_429_and_charged_to_the_ticket(decodes):
    cfg = GatewayConfig(max_image_pixels_in_flight=100)
    admission = Admission(8, 8, cfg.max_image_pixels_in_flight)
    assert load(cfg, [data_url(png(8, 8))], admission)[0].size == (8, 8)
    assert admission.pixels == 64  # held by the ticket until the request ends
    with pytest.raises(APIError) as err:
        load(cfg, [data_url(png(8, 8))], admission)
    assert err.value.status == 429 and decodes == []


def test_too_many_frames_refused():
    cfg = GatewayConfig(max_image_frames=16)
    assert load(cfg, [data_url(animated_gif(16), "gif")])[0].size == (2, 2)
    with pytest.raises(APIError) as err:
        load(cfg, [data_url(animated_gif(17), "gif")])
    assert err.value.status == 400 and "frames" in err.value.message


def test_request_byte_budget_is_413():
    raw = png(64, 64)
    cfg = GatewayConfig(max_request_media_bytes=max(1024, len(raw) * 3 // 2))
    load(cfg, [data_url(raw)])
    with pytest.raises(APIError) as err:
        load(cfg, [data_url(raw)] * 2)
    assert err.value.status == 413 and err.value.code == "media_too_large"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:99999/x.png",
        "http://127.0.0.1:abc/x.png",
        "http://127.0.0.1:-1/x.png",
        "http://[::1/x.png",
        "http://exa mple.com/x.png",
        "http://exa%41mple.com/x.png",
        "http://\x00host/x.png",
        "http:///x.png",
        "https://" + "a" * 300 + ".com/x.png",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
    ],
)
def test_malformed_urls_and_ports_are_400(url):
    with pytest.raises(APIError) as err:
        load(GatewayConfig(), [url])
    assert err.value.status == 400 and err.value.code == "invalid_image_url"


class _Slow(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        for _ in range(100):  # a trickle: each read is on time, the whole never is
            try:
                self.wfile.write(b"\x00" * 10)
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.1)

    def log_message(self, *args) -> None:
        pass


def test_one_deadline_for_all_of_a_request_s_fetches():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/slow.png"
    cfg = GatewayConfig(allow_media_hosts=("127.0.0.1",), media_total_timeout_s=0.5, media_read_timeout_s=5)
    try:
        start = time.perf_counter()
        with pytest.raises(APIError) as err:
            load(cfg, [url, url, url])
        assert time.perf_counter() - start < 2.0
        assert err.value.status == 422 and err.value.code == "media_fetch_timeout"
    finally:
        httpd.shutdown()
