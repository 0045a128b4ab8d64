"""P1: what instrumentation costs the caller, per OpenAI call, side by side in one run.

The same client (openai SDK, a mocked HTTP transport answering a canned chat completion) is
timed bare, with pagerloop's `instrument()` recording into a SQLite store, with Langfuse's
OpenAI wrapper and with OpenLLMetry's OpenAI instrumentation (both exporting spans over OTLP to
a local sink, their usual setup). Each variant runs in its own process (the peers patch the
openai module globally), in several interleaved rounds; the figures are the median of rounds.

    uv run --with langfuse --with opentelemetry-instrumentation-openai python bench/p1_overhead.py

Target: pagerloop's overhead <= 0.5x the lighter peer's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

VARIANTS = ("bare", "pagerloop", "langfuse", "openllmetry")
PEERS = ("langfuse", "openllmetry")
COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1_795_000_000,
    "model": "gpt-4.1-2025-04-14",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Revenue grew 12% on cloud services."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 42, "completion_tokens": 9, "total_tokens": 51},
}
MESSAGES = [{"role": "user", "content": "Summarize the quarterly report in one sentence."}]


def _client() -> Any:
    import httpx2
    import openai

    body = json.dumps(COMPLETION).encode()

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            200,
            content=body,
            headers={"content-type": "application/json", "x-request-id": "req_bench"},
        )

    transport = httpx2.MockTransport(answer)
    return openai.OpenAI(
        api_key="sk-bench",
        base_url="http://api.openai.test/v1",
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


def _setup(variant: str, sink: str) -> Any:
    if variant == "pagerloop":
        from pagerloop_sdk import Recorder, instrument

        from instrumentation.store_sink import StoreSink
        from stores.engine import create_schema, make_engine

        engine = make_engine(f"sqlite:///{tempfile.mkdtemp()}/bench.db")
        create_schema(engine)
        return instrument(_client(), recorder=Recorder(StoreSink(engine)))
    if variant == "langfuse":
        os.environ.update(
            LANGFUSE_PUBLIC_KEY="pk-lf-bench",
            LANGFUSE_SECRET_KEY="sk-lf-bench",  # noqa: S106 (a dummy for a local sink)
            LANGFUSE_HOST=sink,
        )
        from langfuse.openai import openai as langfuse_openai  # noqa: F401  (patches openai)

        return _client()
    if variant == "openllmetry":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.openai import OpenAIInstrumentor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(f"{sink}/v1/traces")))
        OpenAIInstrumentor().instrument(tracer_provider=provider)
        return _client()
    return _client()


def measure(variant: str, calls: int, warmup: int, sink: str) -> list[float]:
    """Per-call wall time in microseconds, on the caller's thread."""
    client = _setup(variant, sink)
    create = client.chat.completions.create
    for _ in range(warmup):
        create(model="gpt-4.1", messages=MESSAGES)
    timings = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        started = clock()
        create(model="gpt-4.1", messages=MESSAGES)
        timings.append((clock() - started) / 1000)
    return timings


class _Sink(BaseHTTPRequestHandler):
    """Accepts whatever the peers export (OTLP and Langfuse's ingestion), at once."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--sink", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:  # a child process: one variant, timings to stdout
        timings = measure(args.variant, args.calls, args.warmup, args.sink)
        print(json.dumps({"median": statistics.median(timings), "p99": percentile(timings, 0.99)}))
        sys.stdout.flush()
        os._exit(0)  # peers flush exporters at exit; the figures are in

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sink = f"http://127.0.0.1:{server.server_address[1]}"
    root = Path(__file__).resolve().parent.parent
    rounds: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--sink", sink,
                 "--calls", str(args.calls), "--warmup", str(args.warmup)],
                capture_output=True, text=True, check=True, cwd=root,
                env={**os.environ, "PYTHONPATH": str(root)},
            )  # fmt: skip
            rounds[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    server.shutdown()

    figures = {
        v: {k: statistics.median(r[k] for r in rounds[v]) for k in ("median", "p99")}
        for v in VARIANTS
    }
    bare = figures["bare"]
    overhead = {
        v: {k: figures[v][k] - bare[k] for k in ("median", "p99")} for v in VARIANTS if v != "bare"
    }
    print(
        f"P1 caller-path cost per chat.completions.create ({args.calls} calls x "
        f"{args.rounds} rounds,\nmocked transport; microseconds, median of rounds)\n"
    )
    header = ("variant", "call p50", "call p99", "overhead p50", "overhead p99")
    print(f"{header[0]:<12} {header[1]:>10} {header[2]:>10} {header[3]:>14} {header[4]:>14}")
    for variant in VARIANTS:
        extra = overhead.get(variant, {"median": 0.0, "p99": 0.0})
        print(
            f"{variant:<12} {figures[variant]['median']:>10.1f} {figures[variant]['p99']:>10.1f} "
            f"{extra['median']:>14.1f} {extra['p99']:>14.1f}"
        )
    lighter = min(PEERS, key=lambda peer: overhead[peer]["median"])
    ratio = overhead["pagerloop"]["median"] / overhead[lighter]["median"]
    ratio99 = overhead["pagerloop"]["p99"] / overhead[lighter]["p99"]
    verdict = "met" if ratio <= 0.5 else "NOT met"
    print(
        f"\npagerloop / lighter peer ({lighter}): {ratio:.2f}x at p50, {ratio99:.2f}x at p99 "
        f"(target <= 0.5x: {verdict})"
    )


if __name__ == "__main__":
    main()
