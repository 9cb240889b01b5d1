"""`epd`: the command line. Subcommands parse flags into the typed config and call into the package."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

from serving.config import (
    DEFAULT_PRESET,
    ControlConfig,
    ControllerConfig,
    EngineConfig,
    GatewayConfig,
    default_model,
    default_model_dir,
)
from serving.engine.kv_sizing import parse_bytes


def _model_dir(arg: str | None) -> str:
    """The given model directory, or the default: the shipped, trained epd-shapes."""
    if arg:
        if not (Path(arg) / "config.json").exists():
            raise SystemExit(f"error: {arg} is not a model directory (no config.json)")
        return arg
    return str(default_model())


def cmd_model_build(args: argparse.Namespace) -> None:
    from serving.engine.models.builder import build_model

    out = Path(args.out) if args.out else default_model_dir(args.preset)
    build_model(out, args.preset, family=args.family, seed=args.seed)
    print(out)


def cmd_generate(args: argparse.Namespace) -> None:
    from PIL import Image

    from serving.engine.llm import LLMEngine
    from serving.types import SamplingParams

    images = []
    for path in args.image:
        with Image.open(path) as im:
            im.load()
            images.append(im)
    model = _model_dir(args.model)
    engine_cfg = EngineConfig(model=model, device=args.device, dtype=args.dtype)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    if args.topology == "inproc":
        engine = LLMEngine(engine_cfg)
        result = engine.generate([(engine.inputs.from_user_prompt(args.prompt, images), params)])[0]
    else:
        result = _generate_on_cluster(args, engine_cfg, images, params)
    if args.json:
        print(
            json.dumps(
                {"token_ids": result.token_ids, "text": result.text, "finish_reason": result.finish_reason}
            )
        )
    else:
        print(result.text)


def _generate_on_cluster(args: argparse.Namespace, engine_cfg: EngineConfig, images: list, params: object):
    """Start a local Ray cluster with one worker per role of the topology, run the request, stop."""
    from serving.cluster import Cluster
    from serving.engine.inputs import InputProcessor

    inputs = InputProcessor.from_dir(engine_cfg.model)
    spec, arrays = inputs.spec_from_user_prompt(args.prompt, images)
    cluster = Cluster.start(
        engine_cfg.model, args.topology, address=args.address, engine=engine_cfg.model_dump(exclude={"model"})
    )
    try:
        result = cluster.generate([(spec, params, arrays)])[0]
    finally:
        cluster.shutdown()
    if result.error:
        raise ValueError(result.error)
    return result


def _require_free_port(host: str, port: int, what: str) -> None:
    """Exit with the reason when host:port cannot be bound (the replica would fail to, over and over)."""
    from serving.gateway.serve import bind_socket

    try:
        bind_socket(host, port).close()
    except OSError as e:
        reason = "in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise SystemExit(f"epd serve: cannot serve {what} on {host}:{port}: {reason}") from None


def cmd_serve(args: argparse.Namespace) -> None:
    """Start Ray, the workers and the gateway; print the URL once ready; run until SIGINT / SIGTERM,
    then stop admitting, let in-flight requests finish (up to the grace period) and stop everything."""
    import contextlib
    import os
    import signal
    import threading

    from ray import serve

    from serving.cluster import init_ray, parse_cpus, spare_cpus, start_ray_workers
    from serving.gateway.serve import NAMESPACE, gateway_application
    from serving.stages.factory import RayWorkerFactory
    from serving.stages.placement import pin_threads

    # Serve's controller reconciles ten times a second by default: the largest share of an idle
    # server's CPU (at 0.5 s still ~0.5 % of a core). Once a second still starts and replaces
    # deployments promptly (replica health checks run every 10 s anyway); our workers' failure
    # detection is the control plane's own (`health_interval_s`).
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "1.0")
    if not args.address:  # the ports this machine will serve on: taken, say so now, not after Ray starts
        _require_free_port(args.host, args.port, "HTTP")
        if args.grpc_port:
            _require_free_port(args.host, args.grpc_port, "gRPC")
    # Workers pinned to cores of their own: the rest of a local server keeps off those cores. Ray's
    # daemons, Serve's controller and the gateway replicas are started from here and inherit its CPUs.
    if not args.address and args.pin_cpus and (spare := spare_cpus(parse_cpus(args.pin_cpus))):
        pin_threads(spare)
    import torch

    gpus = 1 if torch.cuda.is_available() else 0
    # Settings first: a deployment that cannot serve (an empty pool, a KV pool smaller than
    # --max-model-len) is refused before Ray starts.
    settings, plans = serve_settings(args, str(os.getpid()), gpus, local=not args.address)
    init_ray(args.address, NAMESPACE, host=_ray_host(args.host))
    # Keep the handles: Ray stops an actor once no handle to it is left, named or not.
    workers = start_ray_workers(RayWorkerFactory(settings.worker_template, NAMESPACE, gpus), plans)
    stop = threading.Event()
    url = f"http://{args.host}:{args.port}"
    try:
        # On a local Ray the gateway replica serves HTTP itself: no Serve proxy relaying every SSE chunk.
        proxies = "Disabled" if settings.gateway.http_in_replica else None
        serve.start(proxy_location=proxies, http_options={"host": args.host, "port": args.port})
        serve.run(gateway_application(settings), name="epd", route_prefix="/", blocking=False)
        # After Ray and Serve have installed theirs: ours decide what SIGTERM means (drain first).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.is_set():
            if _get(f"{url}/ready") == 200:
                print(
                    f"EPD Serve ready at {url}/v1 (model {settings.model_id}, topology {args.topology})",
                    flush=True,
                )
                if settings.gateway.grpc_port:
                    print(f"EPD Serve gRPC API at {args.host}:{settings.gateway.grpc_port}", flush=True)
                break
            stop.wait(0.5)
        stop.wait()
        print("EPD Serve: stopping admission, finishing in-flight requests", flush=True)
        gateway = settings.gateway
        key = gateway.api_keys[0] if gateway.api_keys else None
        _post(f"{url}/admin/shutdown", key, timeout=gateway.shutdown_grace_s + 10)
    finally:
        # Shutting Ray down stops Serve's replicas and the workers with it; serve.shutdown() first
        # would drain replicas again and took ~40 s here.
        import ray

        from serving.control.actor import control_name
        from serving.stages.factory import deployment_workers

        del workers
        if args.address:
            # On a Ray this process did not start, workers the gateway started since (replacements,
            # additions) are detached and would outlive it: stop them by name, within a bound (the
            # group's SIGTERM may have taken Ray's own processes down already). A local Ray ends below,
            # and every actor with it.
            def stop_detached() -> None:
                # The control actor first: it would start a worker in place of each one stopped here.
                with contextlib.suppress(Exception):
                    control = ray.get_actor(control_name(str(os.getpid())), namespace=NAMESPACE)
                    ray.kill(control, no_restart=True)
                for name in deployment_workers(
                    ray.util.list_named_actors(all_namespaces=True), str(os.getpid())
                ):
                    with contextlib.suppress(Exception):
                        ray.kill(ray.get_actor(name, namespace=NAMESPACE))

            stopper = threading.Thread(target=stop_detached, daemon=True)
            stopper.start()
            stopper.join(timeout=10)
        ray.shutdown()


def serve_settings(
    args: argparse.Namespace, cluster_id: str, gpus: int, local: bool = False
) -> tuple[Any, list[Any]]:
    """What `epd serve ARGS` deploys: the gateway's `GatewaySettings` and the plan of its first
    workers. The Ray Serve config entrypoint (`serving.gateway.app_builder`) parses the same flags
    and calls this too, so a Serve config and the command line cannot mean different things.
    `local`: every worker runs on this machine (a Ray started here), sharing its cores."""
    from serving.cluster import parse_cpus, plan_workers, spare_cpus
    from serving.config import ControlConfig, WorkerConfig, gateway_config_from_env
    from serving.gateway.serve import GatewaySettings

    model = _model_dir(args.model)
    gateway = gateway_config_from_env(
        host=args.host,
        port=args.port,
        http_in_replica=local,
        **({"api_keys": tuple(args.api_key)} if args.api_key else {}),
        allow_media_hosts=tuple(args.allow_media_host),
        metrics_require_key=args.metrics_require_key,
        slo_ttft_s=args.slo_ttft,
        slo_tpot_s=args.slo_tpot,
        max_queued_requests=args.max_queued,
        max_concurrent_requests=args.max_concurrent,
        max_body_bytes=int(args.max_body_mb * 2**20),
        video_fps=args.video_fps,
        video_max_frames=args.video_max_frames,
        video_max_seconds=args.video_max_seconds,
        max_visual_tokens=args.max_visual_tokens,
        media_decode=args.media_decode,
        image_pruning_rate=args.image_pruning_rate,
        video_pruning_rate=args.video_pruning_rate,
        max_pruning_rate=args.max_pruning_rate,
        visual_kv_budget=args.visual_kv_budget,
        shutdown_grace_s=args.shutdown_grace,
        expose_openapi=args.openapi,
        grpc_port=args.grpc_port,
        replicas=args.gateway_replicas,
    )
    engine = EngineConfig(
        model=model,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_step_tokens=args.max_step_tokens,
        max_encode_patches=args.max_encode_patches,
        kv_cache_memory_gb=args.kv_cache_memory / 2**30,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        block_size=args.block_size,
        enable_prefix_caching=not args.no_prefix_caching,
        image_pruning_method=args.image_pruning_method,
        video_pruning_method=args.video_pruning_method,
        kv_compaction_method=args.visual_kv_method,
    )
    if engine.gpu_memory_utilization is None:
        _check_kv_pool(engine, gpus)
    elif not gpus and engine.device != "cuda":
        raise SystemExit(
            "epd serve: --gpu-memory-utilization sizes the KV pool from GPU memory, and no GPU is "
            "used here: give the pool's size with --kv-cache-memory"
        )
    control = ControlConfig(
        max_worker_restarts=args.max_worker_restarts,
        drain_timeout_s=args.drain_timeout,
        wait_for_worker_s=args.wait_for_worker,
    )
    plans = plan_workers(
        args.topology,
        args.encode,
        args.prefill,
        args.decode,
        cluster_id,
        parse_cpus(args.pin_cpus) if args.pin_cpus else None,
    )
    # Unpinned workers on this machine share its cores: each gets its share of intra-op threads, so
    # OpenMP teams do not oversubscribe the cores (and spin against each other and the gateway).
    threads = max(1, (os.cpu_count() or 1) // len(plans)) if local and not (args.pin_cpus or gpus) else 0
    # A pinned worker's runtime threads (Ray, transport, streams) use the cores no worker is pinned to.
    runtime = spare_cpus(parse_cpus(args.pin_cpus)) if local and args.pin_cpus else ()
    template = WorkerConfig(
        name="template",
        engine=engine,
        transport="nixl",
        threads=threads,
        runtime_cpus=runtime,
        kv_transfer_dtype=args.kv_transfer_dtype,
    )
    controller = ControllerConfig(
        mode=args.controller,
        profile=args.controller_profile,
        tick_s=args.controller_tick,
        window_s=args.controller_window,
        cooldown_s=args.controller_cooldown,
        max_workers=args.controller_max_workers,
        min_workers=args.controller_min_workers,
        attainment_target=args.slo_attainment,
    )
    settings = GatewaySettings(
        gateway=gateway,
        control=control,
        controller=controller,
        worker_template=template,
        model_dir=model,
        model_id=Path(model).name,
        topology=args.topology,
        workers=tuple((p.name, p.cpus) for p in plans),
        cluster_id=cluster_id,
        max_model_len=engine.max_model_len,
        gpus_per_worker=gpus,
    )
    return settings, plans


def _check_kv_pool(engine: Any, gpus: int) -> None:
    """Refuse, before anything starts, a pool that cannot hold one `max_model_len` request (sized by
    the function the workers size their pools with). The engine alone does not refuse: tests and
    benchmarks run small pools on purpose."""
    import torch

    from serving.engine.kv_sizing import check_fits
    from serving.engine.models.config import load_model_config
    from serving.engine.runner import resolve_dtype

    device = (
        torch.device("cuda" if gpus else "cpu") if engine.device == "auto" else torch.device(engine.device)
    )
    dtype_bytes = torch.finfo(resolve_dtype(engine.dtype, device)).bits // 8
    check_fits(engine, load_model_config(engine.model), dtype_bytes)


def _ray_host(host: str) -> str:
    """Ray's own ports bind where the API does when that is loopback; otherwise Ray's default."""
    return "127.0.0.1" if host in ("127.0.0.1", "localhost", "::1") else ""


def _get(url: str, timeout: float = 5) -> int:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except OSError:
        return 0


def _post(url: str, key: str | None, timeout: float) -> None:
    import urllib.request

    request = urllib.request.Request(url, data=b"{}", method="POST")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except OSError:
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epd", description="EPD Serve: disaggregated VLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="manage models").add_subparsers(dest="model_command", required=True)
    build = model.add_parser("build", help="build the built-in random-weight model in Hugging Face format")
    build.add_argument("--out", help="output directory (default: the cache directory, epd-PRESET)")
    build.add_argument("--preset", choices=["tiny", "small"], default=DEFAULT_PRESET)
    build.add_argument("--family", choices=["qwen2_vl", "qwen2_5_vl"], default="qwen2_vl")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=cmd_model_build)
    from serving.training.cli import add_train_parser

    add_train_parser(model)

    gen = sub.add_parser("generate", help="run one request through encode, prefill and decode in-process")
    gen.add_argument("--model", help="model directory (default: the shipped epd-shapes)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    gen.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    gen.add_argument(
        "--topology", choices=["inproc", "epd", "e+p+d", "ep+d", "e+pd"], default="inproc",
        help="inproc: the three stages in this process; otherwise a local Ray cluster, one worker per role",
    )  # fmt: skip
    gen.add_argument("--address", help="join this Ray cluster instead of starting one")
    gen.add_argument(
        "--json", action="store_true", help="print one JSON line: token_ids, text, finish_reason"
    )
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve the OpenAI API over disaggregated worker pools")
    srv.add_argument("--model", help="model directory (default: the shipped epd-shapes)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--topology", choices=["epd", "e+p+d", "ep+d", "e+pd"], default="e+p+d")
    srv.add_argument("--encode", type=int, default=1, help="encode workers")
    srv.add_argument("--prefill", type=int, default=1, help="prefill workers (or ep / pd / epd workers)")
    srv.add_argument("--decode", type=int, default=1, help="decode workers")
    srv.add_argument("--address", help="join this Ray cluster instead of starting one")
    srv.add_argument("--api-key", action="append", default=[], help="accepted API key; repeat for several")
    srv.add_argument("--metrics-require-key", action="store_true", help="/metrics needs an API key too")
    srv.add_argument(
        "--allow-media-host",
        action="append",
        default=[],
        help="host whose images may be fetched even at a loopback or private address; repeat for several",
    )
    srv.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT SLO target, seconds")
    srv.add_argument("--slo-tpot", type=float, default=0.2, help="TPOT SLO target, seconds")
    srv.add_argument(
        "--max-concurrent", type=int, default=64, help="sequences (prompts x n) in the stages at once"
    )
    srv.add_argument("--max-queued", type=int, default=256, help="requests waiting for admission before 429")
    srv.add_argument("--max-model-len", type=int, default=8192, help="longest prompt plus output, tokens")
    engine_fields = EngineConfig.model_fields
    srv.add_argument(
        "--kv-cache-memory",
        type=parse_bytes,
        default=int(engine_fields["kv_cache_memory_gb"].default * 2**30),
        help="bytes of each worker's KV pool, e.g. 8GiB (it must hold --max-model-len tokens)",
    )
    srv.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="on GPUs: size each worker's KV pool to this fraction of its GPU's memory, less the weights, "
        "a profiled activation peak and other processes' use (instead of --kv-cache-memory); a pool "
        "that cannot hold --max-model-len stops the worker at start",
    )
    srv.add_argument(
        "--max-num-seqs",
        type=int,
        default=engine_fields["max_num_seqs"].default,
        help="most sequences in a worker's running batch",
    )
    srv.add_argument(
        "--block-size", type=int, default=engine_fields["block_size"].default, help="tokens per KV block"
    )
    srv.add_argument(
        "--max-step-tokens",
        type=int,
        default=EngineConfig.model_fields["max_step_tokens"].default,
        help="token budget of one engine step (decode tokens first, then prefill chunks)",
    )
    srv.add_argument(
        "--max-encode-patches",
        type=int,
        default=EngineConfig.model_fields["max_encode_patches"].default,
        help="vision patches encoded between two engine steps (queued requests' images, whole)",
    )
    srv.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="turn off automatic prefix caching (reuse of KV blocks of a shared prompt prefix)",
    )
    srv.add_argument("--pin-cpus", help="pin worker pools to CPUs, e.g. 'e=0;p=0;d=1' or 'epd=0,1'")
    srv.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body, MiB (413 above)")
    video = GatewayConfig.model_fields
    srv.add_argument(
        "--video-fps",
        type=float,
        default=video["video_fps"].default,
        help="frames sampled per second of video, unless a request says",
    )
    srv.add_argument(
        "--video-max-frames",
        type=int,
        default=video["video_max_frames"].default,
        help="most frames sampled from one video",
    )
    srv.add_argument(
        "--max-visual-tokens",
        type=int,
        default=None,
        help="image and video tokens one request may bring (400 above)",
    )
    srv.add_argument(
        "--image-pruning-rate",
        type=float,
        default=0.0,
        help="share of each image's tokens pruned at the encoder by default (lossy; 0: none)",
    )
    srv.add_argument(
        "--video-pruning-rate",
        type=float,
        default=0.0,
        help="share of each video's tokens pruned at the encoder by default (lossy; 0: none)",
    )
    srv.add_argument(
        "--max-pruning-rate",
        type=float,
        default=video["max_pruning_rate"].default,
        help="the most pruning a request may ask for in mm_processor_kwargs (400 above)",
    )
    srv.add_argument(
        "--image-pruning-method",
        choices=["divprune", "random"],
        default="divprune",
        help="which image tokens pruning keeps (random: the baseline)",
    )
    srv.add_argument(
        "--video-pruning-method",
        choices=["evs", "random"],
        default="evs",
        help="which video tokens pruning keeps (random: the baseline)",
    )
    srv.add_argument(
        "--visual-kv-budget",
        type=float,
        default=1.0,
        help="share of a prompt's visual tokens whose KV prefill hands to decode (1: all; lossy below)",
    )
    srv.add_argument(
        "--visual-kv-method",
        choices=["snapkv", "random"],
        default="snapkv",
        help="which visual tokens' KV compaction keeps (random: the baseline)",
    )
    srv.add_argument(
        "--kv-transfer-dtype",
        choices=["auto", "int8"],
        default="auto",
        help="KV from prefill to decode as the pool holds it (lossless) or int8 with per-token scales",
    )
    srv.add_argument(
        "--media-decode",
        choices=["worker", "gateway"],
        default=video["media_decode"].default,
        help="decode images and videos on the encode worker (ships compressed bytes) or on the gateway",
    )
    srv.add_argument(
        "--video-max-seconds",
        type=float,
        default=video["video_max_seconds"].default,
        help="longest video accepted",
    )
    srv.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    srv.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    srv.add_argument(
        "--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM"
    )
    srv.add_argument("--max-worker-restarts", type=int, default=10, help="failed workers replaced, at most")
    srv.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds a drain waits before decodes migrate"
    )
    srv.add_argument(
        "--wait-for-worker",
        type=float,
        default=ControlConfig.model_fields["wait_for_worker_s"].default,
        help="seconds a request waits for a stage's worker on its way, then 503 (none coming: 503 at once)",
    )
    srv.add_argument(
        "--gateway-replicas",
        type=int,
        default=1,
        help="gateway replicas in front of the one control plane (they share the HTTP and gRPC ports)",
    )
    srv.add_argument("--openapi", action="store_true", help="serve /openapi.json")
    ctl = srv.add_argument_group("SLO controller")
    defaults = {name: f.default for name, f in ControllerConfig.model_fields.items()}
    ctl.add_argument(
        "--controller",
        choices=["off", "advisory", "on"],
        default=defaults["mode"],
        help="move worker roles to where the SLO is missed: advisory logs and exports, on acts",
    )
    ctl.add_argument("--controller-profile", help="`epd profile` output to seed its cost model")
    ctl.add_argument(
        "--controller-tick", type=float, default=defaults["tick_s"], help="seconds between decisions"
    )
    ctl.add_argument(
        "--controller-window",
        type=float,
        default=defaults["window_s"],
        help="seconds of requests it judges by",
    )
    ctl.add_argument(
        "--controller-cooldown",
        type=float,
        default=defaults["cooldown_s"],
        help="quiet seconds after an action",
    )
    ctl.add_argument(
        "--controller-max-workers", type=int, default=0, help="it may add workers up to this many (0: never)"
    )
    ctl.add_argument(
        "--controller-min-workers",
        type=int,
        default=0,
        help="it may remove workers down to this many (0: never)",
    )
    ctl.add_argument(
        "--slo-attainment",
        type=float,
        default=defaults["attainment_target"],
        help="share of requests that must meet the SLO targets",
    )
    srv.add_argument(
        "--grpc-port", type=int, help="also serve the gRPC API (protos/epd/v1) on this port, beside HTTP"
    )
    srv.set_defaults(func=cmd_serve)

    from serving.ctl import add_ctl_parser
    from serving.sim.cli import add_sim_parsers

    add_ctl_parser(sub)
    add_sim_parsers(sub)
    from serving.evals.cli import add_eval_parser

    add_eval_parser(sub)

    bench = sub.add_parser(
        "bench", help="load-test a server (see `epd bench --help`), or `epd bench plot`", add_help=False
    )
    bench.add_argument("args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=lambda _: None)  # handled in main() before parsing
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the load generator parses its own flags
        from loadgen.cli import main as bench_main

        bench_main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
