"""A live `epd serve` (Ray, E/P/D workers, Serve gateway) on 127.0.0.1, and an image server beside it."""

from __future__ import annotations

import http.server
import io
import threading
from pathlib import Path

import pytest

from loadgen.server import free_port, start_server, stop_server
from tests.conftest import make_image

API_KEY = "test-key"


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    make_image(width, height, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def grpc_port() -> int:
    """The session server's gRPC port (the same gateway serves HTTP and gRPC)."""
    return free_port()


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory, grpc_port: int):
    args = [
        "--model", str(tiny_model), "--api-key", API_KEY, "--allow-media-host", "127.0.0.1",
        "--max-body-mb", "2", "--max-model-len", "2048", "--grpc-port", str(grpc_port),
    ]  # fmt: skip
    proc, url = start_server(args, tmp_path_factory.mktemp("serve") / "serve.log", timeout_s=240)
    yield url
    stop_server(proc)


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    image = png_bytes(56, 42, seed=11)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        port = self.server.server_address[1]
        routes = {
            "/img.png": (200, "image/png", self.image),
            "/text": (200, "text/plain", b"not an image"),
            "/missing": (404, "text/plain", b"no"),
        }
        if self.path == "/redirect-private":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/img.png")
            self.end_headers()
            return
        status, kind, body = routes.get(self.path, (404, "text/plain", b"no"))
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="session")
def image_server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _ImageHandler.image
    httpd.shutdown()
