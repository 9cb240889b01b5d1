"""A burst past the decode pool, through HTTP (printed, not asserted): the `small` preset, `e+p+d`
1/1/1, 32 concurrent chat requests of `max_tokens` 2000 with `ignore_eos`: more KV than a decode
worker's pool holds. Every request must end 200 with 2000 tokens (the decode worker queues what does
not fit instead of failing it); prints the status codes, the tokens, the wall time and the pool's size.

    python -m benchmarks.decode_burst [--requests 32] [--max-tokens 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
import time
from pathlib import Path

import httpx

from loadgen.server import start_server, stop_server
from serving.config import default_model_dir
from serving.engine.models.builder import ensure_model


async def one(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> tuple[int, int]:
    body = {
        "model": "epd-small", "messages": [{"role": "user", "content": f"Tell story number {i}."}],
        "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
    }  # fmt: skip
    response = await client.post(f"{url}/v1/chat/completions", json=body)
    tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
    return response.status_code, tokens


async def burst(url: str, n: int, max_tokens: int) -> list[tuple[int, int]]:
    async with httpx.AsyncClient(timeout=3600) as client:
        return await asyncio.gather(*(one(client, url, i, max_tokens) for i in range(n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=2000)
    args = parser.parse_args()
    model = ensure_model(default_model_dir("small"), "small")
    log = Path(tempfile.mkdtemp(prefix="decode-burst-")) / "serve.log"
    flags = ["--model", str(model), "--topology", "e+p+d", "--max-concurrent", str(args.requests)]
    proc, url = start_server(flags, log, timeout_s=300)
    try:
        workers = httpx.get(f"{url}/admin/workers", timeout=30).json()["workers"]
        pool = {w["name"]: w["kv_tokens_total"] for w in workers}
        start = time.perf_counter()
        results = asyncio.run(burst(url, args.requests, args.max_tokens))
        wall = time.perf_counter() - start
    finally:
        stop_server(proc)
    codes = collections.Counter(code for code, _ in results)
    whole = sum(tokens == args.max_tokens for _, tokens in results)
    n, m = args.requests, args.max_tokens
    print(f"decode burst: small preset, e+p+d 1/1/1, {n} × {m} tokens ({n * m} in all)")
    print(f"KV pools (tokens): {pool}")
    print(f"status codes: {dict(codes)}; requests with all {m} tokens: {whole}; wall {wall:.0f} s")


if __name__ == "__main__":
    main()
