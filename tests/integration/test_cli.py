"""`epd generate` runs the three stages in-process and prints the engine's greedy output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from serving.types import SamplingParams
from tests.conftest import make_image


def run_epd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_generate_json_matches_engine(tiny_model, engine, tmp_path):
    paths = []
    for i, (w, h) in enumerate([(60, 40), (30, 90)]):
        paths.append(tmp_path / f"{i}.png")
        make_image(w, h, seed=i).save(paths[-1])
    args = [
        "generate",
        "--model",
        str(tiny_model),
        "--prompt",
        "What is here?",
        "--max-tokens",
        "10",
        "--json",
    ]
    for p in paths:
        args += ["--image", str(p)]
    result = run_epd(*args)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    prompt = engine.inputs.from_user_prompt("What is here?", [make_image(60, 40, 0), make_image(30, 90, 1)])
    expected = engine.generate([(prompt, SamplingParams(max_tokens=10))])[0]
    assert out == {"token_ids": expected.token_ids, "text": expected.text, "finish_reason": "length"}


def test_generate_defaults_to_the_shipped_shapes_model(tmp_path):
    """No --model: the shipped, trained epd-shapes answers (nothing is built into the cache)."""
    from serving.evals.tasks import item

    it = item(2027, "colour", 0)
    image = tmp_path / "shape.png"
    image.write_bytes(it.media)
    env = dict(os.environ, EPD_CACHE_DIR=str(tmp_path / "cache"))
    result = run_epd(
        "generate", "--prompt", it.prompt, "--image", str(image), "--max-tokens", "8", "--json", env=env
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["text"] == it.answer and out["finish_reason"] == "stop"
    assert not (tmp_path / "cache" / "models").exists()


def test_bad_model_dir_is_a_clear_error(tmp_path):
    result = run_epd("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert result.returncode != 0 and "not a model directory" in result.stderr


def test_generate_on_a_ray_topology_matches_inproc(tiny_model, tmp_path):
    image = tmp_path / "img.png"
    make_image(70, 50, seed=4).save(image)
    args = [
        "generate",
        "--model",
        str(tiny_model),
        "--prompt",
        "Look.",
        "--image",
        str(image),
        "--max-tokens",
        "8",
    ]
    inproc = run_epd(*args, "--json")
    split = run_epd(*args, "--json", "--topology", "e+p+d")
    assert inproc.returncode == 0 and split.returncode == 0, split.stderr[-2000:]
    assert json.loads(split.stdout.strip().splitlines()[-1]) == json.loads(
        inproc.stdout.strip().splitlines()[-1]
    )


def test_a_topology_with_an_empty_pool_is_refused_at_start(tiny_model):
    """Before anything starts: `epd serve` exits with the reason (every pool: a unit test)."""
    flag, role = "--decode", "'d'"
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--model", str(tiny_model), "--topology", "e+p+d"]
    done = subprocess.run([*cmd, flag, "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"needs at least one {role} worker ({flag} is 0)" in done.stderr


def test_a_kv_pool_smaller_than_max_model_len_is_refused_at_start(tiny_model):
    """A pool that could not hold one request of --max-model-len tokens: refused before Ray starts,
    with the numbers and what to change (the gateway would otherwise admit requests a worker fails)."""
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--model", str(tiny_model), "--topology", "epd"]
    cmd += ["--max-model-len", "8192", "--kv-cache-memory", "1MiB", "--block-size", "8"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "fewer than --max-model-len 8192" in done.stderr and "--kv-cache-memory" in done.stderr
    assert "Traceback" not in done.stderr and "Ray" not in done.stdout


def test_without_a_compiler_the_torch_paths_answer_the_same_and_say_so(tiny_model, engine, tmp_path):
    """No C compiler on PATH and an empty kernel cache: the kernels' status says so (what a worker
    reports in /admin/workers and epd:engine_backend_info), a warning names the cause, and the engine
    still answers, the same tokens as with the kernels."""
    env = {**os.environ, "PATH": str(tmp_path / "nothing"), "EPD_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("CC", None)
    code = "from serving.engine import kernels; print(kernels.status())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "no-compiler", done.stderr
    assert done.stderr.count("no C compiler") == 1  # said once, as a warning
    result = run_epd(
        "generate", "--model", str(tiny_model), "--prompt", "Hi", "--max-tokens", "10", "--json", env=env
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    prompt = engine.inputs.from_user_prompt("Hi", [])
    assert out["token_ids"] == engine.generate([(prompt, SamplingParams(max_tokens=10))])[0].token_ids


def test_kernels_built_before_load_without_a_compiler(tmp_path):
    """What `make install` (or an image build) leaves in the cache is loaded by a process with no
    compiler: a slim worker image needs none at run time."""
    cache = str(tmp_path / "cache")
    code = "from serving.engine import kernels; print(kernels.status())"
    built = subprocess.run(
        [sys.executable, "-m", "serving.engine.kernels"],
        env={**os.environ, "EPD_CACHE_DIR": cache},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    env = {**os.environ, "PATH": str(tmp_path / "nothing"), "EPD_CACHE_DIR": cache}
    env.pop("CC", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "built", done.stderr
    assert "no C compiler" not in done.stderr
