"""Runtime benchmark: NIXL pull throughput between two processes next to a plain memcpy of the same
bytes, and one request's per-stage time breakdown through E → P → D Ray actors (small preset)."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch

SIZES_MB = (1, 4, 16, 64)
REPEATS = 20


def _owner(conn) -> None:  # noqa: ANN001 - a multiprocessing connection
    from serving.transport import make_transport

    owner = make_transport("nixl", "bench-owner")
    data = torch.randint(0, 256, (max(SIZES_MB) << 20,), dtype=torch.uint8)
    owner.register("buf", data)
    conn.send(owner.metadata())
    peer_meta = conn.recv()
    owner.add_peer(peer_meta)
    conn.send({mb: owner.publish("buf", [(0, mb << 20)]) for mb in SIZES_MB})
    conn.recv()  # until the reader is done


def memcpy_rates(dst: torch.Tensor, src: torch.Tensor) -> dict[int, float]:
    """GB/s of copy_ between two pre-touched buffers, per size: measured before any NIXL agent
    exists, since their progress threads would share the cores."""
    rates = {}
    for mb in SIZES_MB:
        n = mb << 20
        copies = []
        for _ in range(REPEATS + 1):
            start = time.perf_counter()
            dst[:n].copy_(src[:n])
            copies.append(time.perf_counter() - start)
        rates[mb] = n / statistics.median(copies[1:]) / 1e9
    return rates


def transfer_table() -> None:
    from serving.transport import TransferStatus, make_transport

    dst = torch.zeros(max(SIZES_MB) << 20, dtype=torch.uint8)
    src_local = torch.ones_like(dst)
    dst.fill_(1)  # touch every page before timing anything
    copy_gbs = memcpy_rates(dst, src_local)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_owner, args=(child,), daemon=True)
    proc.start()
    reader = make_transport("nixl", "bench-reader")
    reader.register("buf", dst)
    owner_meta = parent.recv()
    parent.send(reader.metadata())
    reader.add_peer(owner_meta)
    refs = parent.recv()
    print(
        f"{'size':>6} | {'NIXL GB/s':>9} | {'memcpy GB/s':>11} | {'NIXL/memcpy':>11} | {'first pull ms':>13}"
    )
    for mb in SIZES_MB:
        n = mb << 20
        times = []
        for i in range(REPEATS + 1):
            start = time.perf_counter()
            transfer = reader.read(refs[mb], "buf", [(0, n)], tag=f"{mb}-{i}".encode())
            while not (status := transfer.poll()).final:
                pass
            assert status is TransferStatus.DONE
            times.append(time.perf_counter() - start)
        nixl_gbs = n / statistics.median(times[1:]) / 1e9
        ratio = nixl_gbs / copy_gbs[mb]
        first_ms = times[0] * 1000
        print(f"{mb:>4}MB | {nixl_gbs:>9.2f} | {copy_gbs[mb]:>11.2f} | {ratio:>10.2f}x | {first_ms:>13.1f}")
    parent.send("done")
    proc.join(timeout=10)
    print(f"(median of {REPEATS} pulls between two processes, UCX on loopback; memcpy in one process)")


def stage_table(preset: str, requests: int) -> None:
    from serving.cluster import Cluster
    from serving.config import default_model_dir
    from serving.engine.inputs import InputProcessor
    from serving.engine.models.builder import ensure_model
    from serving.types import SamplingParams
    from tests.conftest import make_image

    model = str(ensure_model(default_model_dir(preset), preset))
    inputs = InputProcessor.from_dir(model)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    rows = []
    for topology in ("e+p+d", "epd"):
        cluster = Cluster.start(model, topology, engine=dict(kv_cache_memory_gb=0.25))
        try:
            warm_spec, warm_arrays = inputs.spec_from_user_prompt("warm up", [make_image(448, 448, 99)])
            cluster.generate([(warm_spec, params, warm_arrays)])
            for i in range(requests):
                spec, arrays = inputs.spec_from_user_prompt(
                    f"Describe image {i}.", [make_image(448, 448, seed=i)]
                )
                rows.append((topology, cluster.generate([(spec, params, arrays)])[0].timings))
        finally:
            cluster.shutdown()
    keys = ["encode_s", "e2p_transfer_s", "prefill_s", "p2d_transfer_s", "decode_s", "e2e_s"]
    print(
        f"\nPer-stage ms, median of {requests} requests (one 448x448 image, 32 output tokens, epd-{preset})"
    )
    print(
        f"{'topology':>8} | "
        + " | ".join(f"{k[:-2]:>14}" for k in keys)
        + f" | {'e2p KB':>7} | {'p2d KB':>7}"
    )
    for topology in ("e+p+d", "epd"):
        got = [t for top, t in rows if top == topology]
        med = {
            k: statistics.median(getattr(t, k) or 0.0 for t in got) for k in keys + ["e2p_bytes", "p2d_bytes"]
        }
        cells = " | ".join(f"{med[k] * 1000:>14.1f}" for k in keys)
        print(f"{topology:>8} | {cells} | {med['e2p_bytes'] / 1024:>7.0f} | {med['p2d_bytes'] / 1024:>7.0f}")
    print("(decode = first to last decode-side token; e2e = pipeline arrival to last token)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args()
    transfer_table()
    stage_table(args.preset, args.requests)


if __name__ == "__main__":
    main()
