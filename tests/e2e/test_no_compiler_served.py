"""A server whose workers find no C compiler and no built kernels: they start, run the torch paths,
say so where an operator looks (`GET /admin/workers`, `epd:engine_backend_info` in /metrics), and
answer exactly what the engine with its kernels answers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import openai

from loadgen.server import start_server, stop_server
from serving.types import SamplingParams
from tests.e2e.conftest import API_KEY

COMPILERS = ("cc", "gcc")
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _without_compilers(path: str, tmp: Path) -> str:
    """PATH with each folder holding a compiler replaced by a copy of it, in links, without one."""
    out = []
    for i, folder in enumerate(path.split(os.pathsep)):
        here = Path(folder)
        if not any((here / c).exists() for c in COMPILERS):
            out.append(folder)
            continue
        shadow = tmp / f"path-{i}"
        shadow.mkdir()
        for entry in here.iterdir():
            if entry.name not in COMPILERS:
                (shadow / entry.name).symlink_to(entry)
        out.append(str(shadow))
    return os.pathsep.join(out)


def test_workers_without_a_compiler_say_so_and_answer_the_same(tiny_model, engine, tmp_path):
    # PATH as it is (Ray needs what is on it) but for the compilers the kernels look for, and no $CC.
    env = {
        **os.environ,
        "PATH": _without_compilers(os.environ["PATH"], tmp_path),
        "EPD_CACHE_DIR": str(tmp_path / "cache"),
    }
    env.pop("CC", None)
    assert shutil.which("cc", path=env["PATH"]) is None and shutil.which("gcc", path=env["PATH"]) is None
    args = ["--model", str(tiny_model), "--api-key", API_KEY, "--topology", "e+pd"]
    proc, url = start_server(args, tmp_path / "serve.log", timeout_s=240, env=env)
    try:
        workers = httpx.get(f"{url}/admin/workers", headers=AUTH, timeout=30).json()["workers"]
        assert workers and {w["kernels"] for w in workers} == {"no-compiler"}, workers
        info = [
            ln
            for ln in httpx.get(f"{url}/metrics", headers=AUTH, timeout=30).text.splitlines()
            if ln.startswith("epd:engine_backend_info{")
        ]
        assert len(info) == len(workers) and all('kernels="no-compiler"' in ln for ln in info), info
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model=tiny_model.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=10, temperature=0
        )
        prompt = engine.inputs.from_user_prompt("Hi", [])
        expected = engine.generate([(prompt, SamplingParams(max_tokens=10))])[0]
        assert reply.choices[0].message.content == expected.text
        assert reply.usage.completion_tokens == len(expected.token_ids)
    finally:
        stop_server(proc)
