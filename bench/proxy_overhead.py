"""How much latency and throughput the gateway costs in front of an upstream.

A fast fake upstream (OpenAI ``/v1/completions`` SSE, ``--tokens`` chunks, ``--interval-ms`` apart) runs in its
own process; the real gateway app (``--backend openai --upstream <fake>``, the demo tokenizer) runs in another.
In the same run, the same streaming request is sent by a lean asyncio HTTP/1.1 client (keep-alive connections)
to the upstream directly and through the gateway, at 1, 50 and 200 concurrent streams. Reported: time to first
token and to last token (p50/p99), requests/s, the gateway's added latency (p50/p99 through gateway minus
direct) and the rps ratio. The last line is one JSON object.

    python bench/proxy_overhead.py [--tokens 16] [--interval-ms 20] [--requests-per-stream 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fake upstream (raw ASGI: as cheap as possible)
def upstream_app(tokens: int, interval: float) -> Any:
    models = json.dumps({"object": "list", "data": [{"id": "bench-base", "object": "model", "parent": None}]}).encode()
    pieces = [
        b"data: "
        + json.dumps(
            {
                "id": "c",
                "object": "text_completion",
                "created": 0,
                "model": "bench-base",
                "choices": [{"index": 0, "text": f" t{i}", "finish_reason": "length" if i == tokens - 1 else None}],
            }
        ).encode()
        + b"\n\n"
        for i in range(tokens)
    ]
    usage = json.dumps(
        {
            "id": "c",
            "object": "text_completion",
            "created": 0,
            "model": "bench-base",
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": tokens + 3},
        }
    )
    tail = b"data: " + usage.encode() + b"\n\ndata: [DONE]\n\n"

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        if scope["path"] in ("/health", "/v1/models"):
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": models})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for piece in pieces:
            if interval:
                await asyncio.sleep(interval)
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": tail})

    return app


def run_upstream(port: int, tokens: int, interval: float) -> None:
    import uvicorn

    uvicorn.run(
        upstream_app(tokens, interval),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


def run_gateway(port: int, upstream: str, workers: int) -> None:
    from gateway.demo import build_demo
    from gateway.lifecycle import run_server
    from gateway.settings import Settings

    settings = Settings(
        model=str(build_demo().base_dir),
        served_model_name="bench",
        template="qwen",
        backend="openai",
        upstream=(upstream,),
        upstream_model="bench-base",
        upstream_health_interval=0,
        host="127.0.0.1",
        port=port,
        workers=workers,
    )
    run_server(settings, log_level="warning", access_log=False)  # as `gateway serve --workers N` runs it


def run_backend_proxy(port: int, upstream: str) -> None:
    """The upstream backend alone behind a bare ASGI app: what the backend costs, without the gateway's routes."""
    import uvicorn

    from backends.base import GenerationRequest, SamplingParams
    from backends.openai_compat import OpenAICompatBackend
    from backends.upstream_pool import Timeouts, UpstreamPool

    state: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    pool = UpstreamPool([upstream], timeouts=Timeouts(health_interval=0))
                    state["backend"] = OpenAICompatBackend(pool, base_model="bench-base")
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await state["backend"].aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        data = json.loads(body)
        sampling = SamplingParams(max_tokens=data["max_tokens"])
        request = GenerationRequest("r", (1, 2, 3), data["prompt"], None, sampling)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        async for delta in state["backend"].generate(request):
            chunk = {"choices": [{"index": 0, "text": delta.text, "finish_reason": delta.finish_reason}]}
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + json.dumps(chunk).encode() + b"\n\n",
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def run_relay(port: int, upstream: str) -> None:
    """A byte relay: each client connection gets its own upstream connection, bytes copied both ways unparsed.
    No proxy that reads HTTP can add less than this: it is the floor this machine sets (processes, wakeups)."""
    host, _, up_port = upstream.removeprefix("http://").partition(":")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(host, int(up_port))
        with contextlib.suppress(asyncio.CancelledError):  # cancelled at shutdown: nothing left to relay
            await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=2048)  # as uvicorn's
        async with server:
            await server.serve_forever()

    with asyncio.Runner(loop_factory=_loop_factory()) as runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(serve())


# ---------------------------------------------------------------- lean client
async def one_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[float, float]:
    """Send one request on a keep-alive connection; return (time to first token, time to last token) in s."""
    start = time.perf_counter()
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace") + (await reader.read(2000)).decode(errors="replace"))
    first = last = 0.0
    buffer = b""
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            break
        data = await reader.readexactly(size + 2)
        buffer = (buffer + data[:-2])[-64:]
        if not first and b'"text"' in data or (not first and b'"content"' in data):
            first = time.perf_counter() - start
        if b"[DONE]" in buffer:
            last = time.perf_counter() - start
    return first, last


async def level(port: int, body: dict[str, Any], concurrency: int, per_stream: int) -> dict[str, Any]:
    payload = json.dumps(body).encode()
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    ttft: list[float] = []
    ttlt: list[float] = []

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(per_stream):
                first, last = await one_stream(reader, writer, request)
                ttft.append(first)
                ttlt.append(last)
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"ttft": ttft, "ttlt": ttlt, "rps": len(ttlt) / elapsed}


def pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000
        if len(values) > 1
        else values[0] * 1000
    )


def wait_port(port: int, timeout: float = 120) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listening on {port}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its live child processes (``--workers``) have used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(c) for c in children.read_text().split()] if children.exists() else []
    return own + sum(cpu_seconds(kid) for kid in kids)


async def metered(port: int, body: dict[str, Any], concurrency: int, per: int, pids: dict[str, int]) -> dict[str, Any]:
    """``level`` plus the CPU each process spent on it: ms per request, and cores in use over the run."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    start = time.perf_counter()
    run = await level(port, body, concurrency, per)
    elapsed = time.perf_counter() - start
    spent = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    run["cpu_ms"] = {name: seconds * 1000 / len(run["ttlt"]) for name, seconds in spent.items()}
    run["cores"] = sum(spent.values()) / elapsed
    return run


async def measure(args: argparse.Namespace, up_port: int, gw_port: int, pids: dict[str, int]) -> dict[str, Any]:
    direct_body = {"model": "bench-base", "prompt": "Say something.", "max_tokens": args.tokens, "stream": True}
    gateway_body = {**direct_body, "model": "bench" if args.through == "gateway" else "bench-base"}
    await level(up_port, direct_body, 4, 3)  # warm up both paths
    await level(gw_port, gateway_body, 4, 3)
    results: dict[str, Any] = {}
    for concurrency in args.concurrency:
        per = max(args.requests_per_stream, 40 // concurrency)
        direct = await metered(up_port, direct_body, concurrency, per, pids)
        gateway = await metered(gw_port, gateway_body, concurrency, per, pids)
        row: dict[str, Any] = {"concurrency": concurrency, "requests": len(direct["ttlt"])}
        for name, run in (("direct", direct), ("gateway", gateway)):
            row[name] = {
                "ttft_p50_ms": pct(run["ttft"], 50),
                "ttft_p99_ms": pct(run["ttft"], 99),
                "ttlt_p50_ms": pct(run["ttlt"], 50),
                "ttlt_p99_ms": pct(run["ttlt"], 99),
                "rps": run["rps"],
                "cpu_ms_per_request": run["cpu_ms"],
                "cores_busy": run["cores"],
            }
        for key in ("ttft_p50_ms", "ttft_p99_ms", "ttlt_p50_ms", "ttlt_p99_ms"):
            row["added_" + key] = row["gateway"][key] - row["direct"][key]
        row["rps_ratio"] = row["gateway"]["rps"] / row["direct"]["rps"]
        row["gateway_cpu_ms_per_request"] = gateway["cpu_ms"]["gateway"]
        results[str(concurrency)] = row
        cpu = " ".join(f"{name} {ms:.2f}" for name, ms in gateway["cpu_ms"].items())
        print(
            f"{concurrency:>4} streams x{per}: "
            f"TTFT p50 {row['direct']['ttft_p50_ms']:.2f} -> {row['gateway']['ttft_p50_ms']:.2f} ms "
            f"(+{row['added_ttft_p50_ms']:.2f}), p99 +{row['added_ttft_p99_ms']:.2f} | "
            f"TTLT p50 {row['direct']['ttlt_p50_ms']:.2f} -> {row['gateway']['ttlt_p50_ms']:.2f} ms "
            f"(+{row['added_ttlt_p50_ms']:.2f}), p99 +{row['added_ttlt_p99_ms']:.2f} | "
            f"rps {row['direct']['rps']:.1f} -> {row['gateway']['rps']:.1f} (x{row['rps_ratio']:.2f})\n"
            f"      CPU ms/request through the gateway: {cpu}; cores busy {direct['cores']:.2f} direct, "
            f"{gateway['cores']:.2f} through the gateway (of {os.cpu_count()})",
            flush=True,
        )
    return results


def _loop_factory() -> Any:
    """uvloop for the load generator when installed: the less CPU the client takes, the more is left to measure."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--interval-ms", type=float, default=20.0, help="upstream time between tokens")
    parser.add_argument("--requests-per-stream", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50, 200])
    parser.add_argument(
        "--through",
        choices=["gateway", "backend", "relay"],
        default="gateway",
        help="gateway: the real app; backend: only the upstream backend behind a bare ASGI app (attribution); "
        "relay: a byte relay that parses nothing (the floor any proxy pays here)",
    )
    parser.add_argument("--workers", type=int, default=1, help="gateway processes (gateway serve --workers)")
    parser.add_argument(
        "--role", choices=["bench", "upstream", "gateway", "backend", "relay"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "upstream":
        return run_upstream(args.port, args.tokens, args.interval_ms / 1000)
    if args.role == "gateway":
        return run_gateway(args.port, args.upstream, args.workers)
    if args.role == "backend":
        return run_backend_proxy(args.port, args.upstream)
    if args.role == "relay":
        return run_relay(args.port, args.upstream)

    up_port, gw_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--tokens", str(args.tokens), "--interval-ms", str(args.interval_ms)]
    upstream = subprocess.Popen([*me, "--role", "upstream", "--port", str(up_port), *common], env=env)
    gateway = subprocess.Popen(
        [*me, "--role", args.through, "--port", str(gw_port), "--upstream", f"http://127.0.0.1:{up_port}",
         "--workers", str(args.workers)],
        env=env,
    )
    try:
        wait_port(up_port)
        wait_port(gw_port)
        what = {
            "gateway": "real app, --backend openai",
            "backend": "OpenAICompatBackend in a bare ASGI app",
            "relay": "a byte relay (no HTTP parsing)",
        }[args.through]
        print(f"upstream: {args.tokens} tokens, {args.interval_ms:g} ms apart; through: {what}; "
              f"{args.workers} gateway worker(s)")
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            pids = {"client": os.getpid(), "upstream": upstream.pid, "gateway": gateway.pid}
            results = runner.run(measure(args, up_port, gw_port, pids))
    finally:
        for process in (gateway, upstream):
            process.send_signal(signal.SIGINT)
        for process in (gateway, upstream):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    top = results[str(max(args.concurrency))]
    summary = {
        "added_p50_ms": round(top["added_ttlt_p50_ms"], 3),
        "added_p99_ms": round(top["added_ttlt_p99_ms"], 3),
        "added_ttft_p50_ms": round(top["added_ttft_p50_ms"], 3),
        "gateway_rps": round(top["gateway"]["rps"], 1),
        "direct_rps": round(top["direct"]["rps"], 1),
        "concurrency": max(args.concurrency),
        "tokens": args.tokens,
        "interval_ms": args.interval_ms,
        "through": args.through,
        "workers": args.workers,
        "levels": {
            k: {kk: round(vv, 3) for kk, vv in v.items() if kk.startswith(("added", "rps", "gateway_cpu"))}
            for k, v in results.items()
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
