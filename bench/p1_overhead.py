"""P1: what instrumentation costs the caller, per OpenAI call, side by side in one run.

The same client (openai SDK, a mocked HTTP transport answering a canned chat completion) is
timed bare; with pagerloop's SDK as apps use it (`instrument(client)` sending its records over
HTTP to the pagerloop API, a uvicorn process of its own over a SQLite store, at a lower
priority (nice 10: it stands in for another host), and polling the runbook controls from it);
with Langfuse's OpenAI wrapper; and with OpenLLMetry's OpenAI
instrumentation (both exporting spans over OTLP to a local sink, their usual setup). Each
variant runs in its own process (the peers patch the openai module globally), in several
interleaved rounds; the figures are the median of rounds.

Each variant's process measures, with its exporter running:

- back to back (the transport answers at once): each call's wall time on the caller's thread
  (p50, p99; the overhead is the difference with the bare client's), and the CPU the exporter
  takes per call: the process's CPU time minus the caller thread's, from the first call until
  the exporter has sent everything (flush / force_flush);
- paced (the transport takes `--latency-ms` to answer, asleep as on a network, so that the
  exporter works while calls wait): the caller's p99, against the bare client's.

    uv run --with langfuse --with opentelemetry-instrumentation-openai python bench/p1_overhead.py

Targets (issue #12, item 7): pagerloop's overhead <= 0.1x the lighter peer's at p50 and
<= 60 us at p99; its exporter's CPU per call <= 0.5x Langfuse's; with the exporters running,
a variant's paced p99 at most 0.1 ms above the bare client's.
"""

from __future__ import annotations

import argparse
import gc
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

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/p1_overhead.py` from the repository

from bench.stack import INGEST_KEY, api_process  # noqa: E402

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


def _client(latency: float = 0.0) -> Any:
    import httpx2
    import openai

    body = json.dumps(COMPLETION).encode()

    def answer(request: httpx2.Request) -> httpx2.Response:
        if latency:
            time.sleep(latency)  # the network: the GIL is free meanwhile
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


class _Variant:
    """A variant's two clients (back to back, paced) and how to wait for its exporter."""

    def __init__(self, args: argparse.Namespace) -> None:
        variant, sink, latency = args.variant, args.sink, args.latency_ms / 1000
        self.flush: Any = lambda: None
        if variant == "pagerloop":
            from pagerloop_sdk import instrument

            controls = None if args.controls else False
            self.fast = instrument(_client(), url=args.api, api_key=INGEST_KEY, controls=controls)
            options = self.fast._pagerloop_options
            self.paced = instrument(
                _client(latency), recorder=options.recorder, controls=options.controls or False
            )
            if options.controls is not None:
                options.controls.snapshot()  # the first read, as an app's first call waits for
            self.flush = lambda: options.recorder.flush(timeout=60)
            return
        if variant == "langfuse":
            os.environ.update(
                LANGFUSE_PUBLIC_KEY="pk-lf-bench",
                LANGFUSE_SECRET_KEY="sk-lf-bench",  # noqa: S106 (a dummy for a local sink)
                LANGFUSE_HOST=sink,
            )
            from langfuse import get_client
            from langfuse.openai import openai as langfuse_openai  # noqa: F401  (patches openai)

            self.flush = get_client().flush
        elif variant == "openllmetry":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.instrumentation.openai import OpenAIInstrumentor
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider = TracerProvider()
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(f"{sink}/v1/traces")))
            OpenAIInstrumentor().instrument(tracer_provider=provider)
            self.flush = provider.force_flush
        self.fast = _client()
        self.paced = _client(latency)


def _timed(create: Any, calls: int) -> list[float]:
    """Per-call wall time in microseconds, on the caller's thread."""
    timings = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        started = clock()
        create(model="gpt-4.1", messages=MESSAGES)
        timings.append((clock() - started) / 1000)
    return timings


def measure(args: argparse.Namespace) -> dict[str, float]:
    """One variant's figures, in microseconds."""
    setup = _Variant(args)
    create = setup.fast.chat.completions.create
    _timed(create, args.warmup)
    _timed(setup.paced.chat.completions.create, args.warmup // 10)
    setup.flush()
    gc.collect()
    process, caller = time.process_time(), time.thread_time()
    timings = _timed(create, args.calls)
    caller = time.thread_time() - caller
    setup.flush()
    background = time.process_time() - process - caller
    paced = _timed(setup.paced.chat.completions.create, args.paced_calls)
    setup.flush()
    return {
        "median": statistics.median(timings),
        "p99": percentile(timings, 0.99),
        "background": background / args.calls * 1e6,
        "paced_p99": percentile(paced, 0.99),
    }


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


def _controls_served(api: str) -> bool:
    """Whether this API serves `GET /v1/controls` (else pagerloop runs with controls=False)."""
    response = httpx.get(
        f"{api}/v1/controls",
        headers={"Authorization": f"Bearer {INGEST_KEY}", "X-Pagerloop-Instance": "p1-probe"},
    )
    return response.status_code == 200


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--paced-calls", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=2.0, help="paced: the answer's")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--sink", help=argparse.SUPPRESS)
    parser.add_argument("--api", help=argparse.SUPPRESS)
    parser.add_argument("--controls", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:  # a child process: one variant, its figures to stdout
        print(json.dumps(measure(args)))
        sys.stdout.flush()
        os._exit(0)  # the exporters have flushed; the figures are in

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sink = f"http://127.0.0.1:{server.server_address[1]}"
    rounds: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    folder = tempfile.mkdtemp()
    with api_process(f"sqlite:///{folder}/p1.db", nice=10) as api:
        controls = _controls_served(api)
        for _ in range(args.rounds):
            for variant in VARIANTS:
                command = [
                    sys.executable, __file__, "--variant", variant, "--sink", sink, "--api", api,
                    "--calls", str(args.calls), "--paced-calls", str(args.paced_calls),
                    "--latency-ms", str(args.latency_ms), "--warmup", str(args.warmup),
                ]  # fmt: skip
                if controls:
                    command.append("--controls")
                out = subprocess.run(
                    command, capture_output=True, text=True, check=True, cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )  # fmt: skip
                rounds[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    server.shutdown()

    keys = ("median", "p99", "background", "paced_p99")
    figures = {v: {k: statistics.median(r[k] for r in rounds[v]) for k in keys} for v in VARIANTS}
    bare = figures["bare"]
    over = {v: {k: figures[v][k] - bare[k] for k in keys} for v in VARIANTS}
    print(
        f"P1 caller-path cost per chat.completions.create ({args.calls} calls back to back and "
        f"{args.paced_calls} paced\nat {args.latency_ms:g} ms, x {args.rounds} rounds; mocked "
        "transport; microseconds, median of rounds)\n"
        f"pagerloop: instrument(client) -> HttpSink -> API (uvicorn, 1 worker, nice 10, SQLite); "
        f"controls {'polled from GET /v1/controls' if controls else 'off (no GET /v1/controls)'}"
        "\n"
    )
    header = ("variant", "call p50", "call p99", "overhead p50", "overhead p99",
              "exporter CPU/call", "paced p99", "paced p99 - bare")  # fmt: skip
    print(" ".join(f"{h:>17}" if i else f"{h:<12}" for i, h in enumerate(header)))
    for v in VARIANTS:
        f, o = figures[v], over[v]
        print(
            f"{v:<12} {f['median']:>17.1f} {f['p99']:>17.1f} {o['median']:>17.1f} "
            f"{o['p99']:>17.1f} {f['background']:>17.1f} {f['paced_p99']:>17.1f} "
            f"{o['paced_p99']:>17.1f}"
        )
    lighter = min(PEERS, key=lambda peer: over[peer]["median"])
    ours = over["pagerloop"]
    ratio = ours["median"] / over[lighter]["median"]
    ratio99 = ours["p99"] / over[lighter]["p99"]
    cpu_ratio = figures["pagerloop"]["background"] / figures["langfuse"]["background"]
    print(
        f"\n(a) pagerloop overhead / lighter peer's ({lighter}): {ratio:.2f}x at p50 (target "
        f"<= 0.1x: {_verdict(ratio <= 0.1)}), {ratio99:.2f}x at p99; "
        f"{ours['median']:.1f} us at p50 (about 30 us), {ours['p99']:.1f} us at p99 "
        f"(target <= 60 us: {_verdict(ours['p99'] <= 60)})"
    )
    print(
        f"(b) exporter CPU per call, pagerloop / langfuse: {cpu_ratio:.2f}x "
        f"(target <= 0.5x: {_verdict(cpu_ratio <= 0.5)})"
    )
    for v in VARIANTS[1:]:
        pushed = over[v]["paced_p99"]
        print(
            f"(c) {v}: paced p99 {pushed:+.1f} us against the bare client "
            f"(target <= +100 us: {_verdict(pushed <= 100)})"
        )


if __name__ == "__main__":
    main()
