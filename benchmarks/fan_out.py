"""The fan-out case (n choices per prompt) against a live server started here with `--max-concurrent 4`: one
`/v1/completions` request of 64 prompts × n=16 (1,024 sequences), then an allowed fan-out (4 prompts ×
n=16 = 64 sequences, 32 tokens each) beside 8 single requests. Prints the status, time, choices run
and the peak admission gauges seen while it ran. Run it from a checkout to measure that checkout's code:

    .venv/bin/python -m benchmarks.fan_out
"""

from __future__ import annotations

import argparse
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from loadgen.server import start_server, stop_server
from serving.config import default_model_dir
from serving.engine.models.builder import ensure_model

KEY = "bench-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


class GaugeWatch:
    """Polls /metrics and keeps the peak of the admission gauges."""

    NAMES = ("epd:num_requests_running", "epd:num_sequences_running", "epd:num_requests_waiting")

    def __init__(self, url: str) -> None:
        self.url, self.peak = url, dict.fromkeys(self.NAMES, float("nan"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> GaugeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                text = httpx.get(f"{self.url}/metrics", timeout=5).text
            except httpx.HTTPError:
                continue
            for name in self.NAMES:
                if found := re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M):
                    value = float(found.group(1))
                    old = self.peak[name]
                    self.peak[name] = value if old != old else max(old, value)  # nan: first sample
            time.sleep(0.05)


def completions(url: str, prompts: list[str], n: int, max_tokens: int = 4) -> tuple[int, float, int]:
    body = {"model": "epd-tiny", "prompt": prompts, "n": n, "max_tokens": max_tokens, "temperature": 0}
    start = time.perf_counter()
    response = httpx.post(f"{url}/v1/completions", json=body, headers=HEADERS, timeout=600)
    choices = len(response.json().get("choices", [])) if response.status_code == 200 else 0
    return response.status_code, time.perf_counter() - start, choices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-concurrent", type=int, default=4)
    args = parser.parse_args()
    model = ensure_model(default_model_dir("tiny"), "tiny")
    log = Path(tempfile.mkdtemp()) / "serve.log"
    server_args = ["--model", str(model), "--api-key", KEY, "--max-concurrent", str(args.max_concurrent)]
    proc, url = start_server(server_args, log)
    try:
        completions(url, ["warm up"], 1)
        print(f"--max-concurrent {args.max_concurrent}; peaks of the gauges while each case ran")
        print(f"{'case':<34}{'status':>7}{'time (s)':>10}{'choices':>9}  peak running / sequences / waiting")
        with GaugeWatch(url) as watch:
            status, elapsed, choices = completions(url, ["hello"] * 64, 16)
        peaks = " / ".join(f"{watch.peak[n]:g}" for n in GaugeWatch.NAMES)
        print(f"{'64 prompts x n=16 (1,024 seqs)':<34}{status:>7}{elapsed:>10.2f}{choices:>9}  {peaks}")
        with GaugeWatch(url) as watch, ThreadPoolExecutor(9) as pool:
            big = pool.submit(completions, url, ["hello"] * 4, 16, 32)  # long enough to watch
            time.sleep(0.2)
            singles = [pool.submit(completions, url, [f"q{i}"], 1) for i in range(8)]
            status, elapsed, choices = big.result()
            single_statuses = sorted({f.result()[0] for f in singles})
        peaks = " / ".join(f"{watch.peak[n]:g}" for n in GaugeWatch.NAMES)
        print(f"{'4 prompts x n=16, + 8 singles':<34}{status:>7}{elapsed:>10.2f}{choices:>9}  {peaks}")
        print(f"  the 8 singles answered {single_statuses}")
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
