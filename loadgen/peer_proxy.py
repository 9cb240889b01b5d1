"""The front of vLLM's disaggregated arms in the peer benchmark, as vLLM's own example proxies do it.

`--mode ec` (encoder-only + PD): each chat request goes to the encoder instance first with
`max_tokens: 1` (it runs the vision tower and writes the embeddings through its connector), then the
same request to the PD instance, whose reply streams back. `--mode kv` (P/D over NIXL): the request
goes to the prefill instance with `max_tokens: 1` and `kv_transfer_params: {do_remote_decode: true}`,
and then to the decode instance with the `kv_transfer_params` the prefill instance returned.

python -m loadgen.peer_proxy --mode ec --first URL --second URL --port N
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import AsyncIterator

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

_FIRST_LEG = {"max_tokens": 1, "max_completion_tokens": 1, "stream": False}


def first_leg(body: dict, mode: str) -> dict:
    """The request the first instance gets: one output token, not streamed (a `min_tokens` above one
    would make it a 400)."""
    out = copy.deepcopy(body)
    out.update(_FIRST_LEG)
    for key in ("stream_options", "min_tokens", "min_completion_tokens"):
        out.pop(key, None)
    if mode == "kv":
        out["kv_transfer_params"] = {
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None,
        }  # fmt: skip
    return out


def app(mode: str, first: str, second: str) -> FastAPI:
    api = FastAPI()
    client = httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=512))

    @api.get("/v1/models")
    async def models() -> Response:
        r = await client.get(f"{second}/v1/models")
        return Response(r.content, r.status_code, media_type="application/json")

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        r = await client.post(f"{first}/v1/chat/completions", json=first_leg(body, mode))
        if r.status_code != 200:
            return Response(r.content, r.status_code, media_type="application/json")
        if mode == "kv":
            body = {**body, "kv_transfer_params": r.json().get("kv_transfer_params")}
        if not body.get("stream"):
            r = await client.post(f"{second}/v1/chat/completions", json=body)
            return JSONResponse(r.json(), r.status_code)

        async def relay() -> AsyncIterator[bytes]:
            async with client.stream("POST", f"{second}/v1/chat/completions", json=body) as s:
                async for chunk in s.aiter_raw():
                    yield chunk

        return StreamingResponse(relay(), media_type="text/event-stream")

    return api


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["ec", "kv"], required=True)
    p.add_argument("--first", required=True, help="the encoder (ec) or prefill (kv) instance's URL")
    p.add_argument("--second", required=True, help="the PD (ec) or decode (kv) instance's URL")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    api = app(args.mode, args.first, args.second)
    uvicorn.run(api, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
