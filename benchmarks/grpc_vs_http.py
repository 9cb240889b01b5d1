"""gRPC vs HTTP/SSE on one `epd serve` (tiny model, e+p+d): the same text workload over both front
ends at the same concurrency, alternating rounds, in one run. Prints client-side TTFT and time per
streamed token (TPOT: (last token − first token) / (tokens − 1)) per protocol. Not asserted.

    python -m benchmarks.grpc_vs_http [--concurrency 16] [--requests 64] [--max-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from loadgen.server import free_port, start_server, stop_server
from serving.rpc.proto import generate_pb2 as pb
from serving.rpc.proto import generate_pb2_grpc


@dataclass
class Sample:
    ttft: float
    tpot: float
    tokens: int


def prompt(i: int) -> str:
    return f"Request {i}: write a long story about the number {i * 7919 % 1000}."


async def http_one(client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int) -> Sample:
    body = {
        "model": model, "messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    start, first, last, tokens = time.perf_counter(), None, None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in chunk["choices"]):
                last = time.perf_counter()
                first = first or last
    return Sample(first - start, (last - first) / max(tokens - 1, 1), tokens)


async def grpc_one(stub: generate_pb2_grpc.GenerationStub, i: int, max_tokens: int) -> Sample:
    request = pb.GenerateRequest(
        messages=[pb.Message(role="user", text=prompt(i))],
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
    )
    start, first, last, tokens = time.perf_counter(), None, None, 0
    async for response in stub.Generate(request):
        if response.token_ids:
            tokens += len(response.token_ids)
            last = time.perf_counter()
            first = first or last
    return Sample(first - start, (last - first) / max(tokens - 1, 1), tokens)


async def closed_loop(run_one, requests: int, concurrency: int) -> tuple[list[Sample], float]:
    """`concurrency` clients, each sending its next request when its last one ended."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    samples: list[Sample] = []

    async def client() -> None:
        while not queue.empty():
            samples.append(await run_one(queue.get_nowait()))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples, time.perf_counter() - start


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def bench(url: str, grpc_port: int, args: argparse.Namespace) -> dict[str, list]:
    results: dict[str, list] = {"HTTP/SSE": [], "gRPC": []}
    async with (
        httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=args.concurrency * 2)) as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
    ):
        stub = generate_pb2_grpc.GenerationStub(channel)
        model = (await http.get(f"{url}/v1/models")).json()["data"][0]["id"]
        runners = {
            "HTTP/SSE": lambda i: http_one(http, url, model, i, args.max_tokens),
            "gRPC": lambda i: grpc_one(stub, i, args.max_tokens),
        }
        for run_one in runners.values():  # warm both paths (connections, first batches)
            await closed_loop(run_one, args.concurrency, args.concurrency)
        for _ in range(args.rounds):
            for name, run_one in runners.items():
                results[name].append(await closed_loop(run_one, args.requests, args.concurrency))
    return results


def table(results: dict[str, list], args: argparse.Namespace) -> str:
    lines = [
        f"gRPC vs HTTP/SSE: tiny model, e+p+d, text, {args.concurrency} concurrent, "
        f"{args.rounds}x{args.requests} requests x {args.max_tokens} tokens per protocol (rounds alternate)",
        "| protocol | requests | TTFT p50 (ms) | TTFT p90 (ms) | TPOT p50 (ms) | TPOT p90 (ms) | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rounds in results.items():
        samples = [s for round_, _ in rounds for s in round_]
        seconds = sum(t for _, t in rounds)
        ttft, tpot = [s.ttft * 1e3 for s in samples], [s.tpot * 1e3 for s in samples]
        lines.append(
            f"| {name} | {len(samples)} | {pct(ttft, 50):.1f} | {pct(ttft, 90):.1f} | {pct(tpot, 50):.2f} | "
            f"{pct(tpot, 90):.2f} | {sum(s.tokens for s in samples) / seconds:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="requests per protocol per round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", help="model directory (default: the built-in epd-tiny)")
    args = parser.parse_args()
    grpc_port = free_port()
    flags = ["--grpc-port", str(grpc_port), "--max-concurrent", str(args.concurrency * 2)]
    flags += ["--model", args.model] if args.model else []
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(flags, Path(tmp) / "serve.log")
        try:
            results = asyncio.run(bench(url, grpc_port, args))
        finally:
            stop_server(proc)
    print(table(results, args))


if __name__ == "__main__":
    main()
