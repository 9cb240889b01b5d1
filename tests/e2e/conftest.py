"""A live `epd serve` (Ray, E/P/D workers, Serve gateway) on 127.0.0.1, and an image server beside it."""

from __future__ import annotations

import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import make_image

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    make_image(width, height, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = [
        sys.executable, "-m", "serving.cli", "serve", "--model", str(tiny_model), "--port", str(port),
        "--api-key", API_KEY, "--allow-media-host", "127.0.0.1", "--max-body-mb", "2",
        "--max-model-len", "2048",
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"epd serve exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        raise RuntimeError(f"epd serve did not become ready:\n{log.read_text()[-3000:]}")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


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
