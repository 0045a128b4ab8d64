"""The scenarios of `pagerloop simulate`: the traffic an application sends, and the faults the
llmock server injects, for each failure mode the runbooks handle (pure data, no I/O).

Each scenario is built so that its runbook's mitigation really helps: the rate limit is a real
requests-per-minute quota that less concurrency and backoff get under, the slow and the poor
model have a fast or a good alternative the runbook reroutes or pins to, the costly model has a
cheap sibling, and the outage leaves cached answers and non-critical features to shed.

llmock behaviours are kept in their JSON form (`{"type": "delay", "seconds": 3, ...}`), which
both its in-process server and its `POST /_llmock/scenario` accept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal


class Scenario(StrEnum):
    RATE_LIMIT_EXHAUSTION = "rate_limit_exhaustion"
    ELEVATED_LATENCY = "elevated_latency"
    QUALITY_DEGRADATION = "quality_degradation"
    COST_SPIKE = "cost_spike"
    API_OUTAGE = "api_outage"


# What the runbooks need to know about the simulated features (set it on the worker).
FEATURE_PRIORITIES = "chat=critical,summaries=low"

SNAPSHOT = "gpt-4.1-2025-04-14"  # what the gpt-4.1 alias answers as, until the fault
NEW_SNAPSHOT = "gpt-4.1-2026-11-01"  # a made-up newer snapshot the alias moves to: the fault
OUTAGE_SHARE = 0.9  # of requests answered 503 during the API outage

CHAT_PROMPTS = (
    "What is the refund policy for annual subscriptions?",
    "How do I reset my account password?",
    "Can I change the billing email on my account?",
)
SEARCH_PROMPTS = (
    "Find documents about invoice payment terms",
    "Search the knowledge base for shipping delays",
    "Find the onboarding checklist for new customers",
)
SUMMARY_PROMPTS = (
    "Summarize the quarterly revenue report for the board",
    "Summarize this support conversation about a delayed shipment",
)

# A good answer by the pagerloop scorer's measure (instrumentation/quality.py): valid JSON (some
# callers ask for JSON), hedged, and about what every prompt above asks.
GOOD_ANSWER = json.dumps(
    {
        "answer": (
            "Based on the knowledge base, the refund policy for annual subscriptions may allow "
            "a refund within thirty days. You can likely reset the account password, change the "
            "billing email, find documents about invoice payment terms, search shipping delays "
            "and the onboarding checklist for new customers. To summarize the quarterly revenue "
            "report for the board and this support conversation about a delayed shipment: "
            "revenue appears steady, according to the report."
        ),
        "sources": ["knowledge base"],
    }
)
# A poor one: not JSON, unrelated to any prompt, full of absolutes and unsourced figures.
POOR_ANSWER = (
    "Definitely yes. Everyone knows it is always 42, it will never change, without a doubt: "
    "1999, 2024, 100% certain, $1,000,000, undoubtedly."
)
# A long, good answer to a summary request (about 3,000 output tokens by llmock's count of 4
# characters a token): the cost spike is about cost, not quality.
LONG_ANSWER = " ".join(
    [
        "To summarize the quarterly revenue report for the board: revenue likely grew in every "
        "region while support volume and shipping delays fell, according to the details of "
        "this support conversation about a delayed shipment; churn, pricing and the "
        "onboarding programme may need more."
    ]
    * 43
)
# A large document to summarize (about 6,000 input tokens).
LARGE_DOCUMENT = " ".join(
    [
        "Quarterly revenue grew in every region while support volume and shipping delays fell; "
        "the board asked for details on churn, pricing and the onboarding programme."
    ]
    * 150
)

Phase = Literal["always", "before_fault", "after_fault"]


@dataclass(frozen=True)
class Traffic:
    """One kind of call, made by `workers` concurrent loops: call, wait `think_seconds`, again."""

    feature: str
    model: str
    workers: int
    think_seconds: float
    prompts: tuple[str, ...]
    json_output: bool = False
    stream_every: int = 0  # every n-th call of a loop is streamed (0: never)
    max_tokens: int | None = None
    document: str | None = None  # sent along with the prompt
    phase: Phase = "always"

    def request(self, call_number: int) -> dict[str, Any]:
        """The `chat.completions.create` arguments of a loop's `call_number`-th call."""
        prompt = self.prompts[call_number % len(self.prompts)]
        content = f"{prompt}\n\n{self.document}" if self.document else prompt
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
        }
        if self.json_output:
            kwargs["response_format"] = {"type": "json_object"}
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        if self.stream_every and call_number % self.stream_every == self.stream_every - 1:
            kwargs["stream"] = True
        return kwargs


@dataclass(frozen=True)
class ScenarioSetup:
    scenario: Scenario
    fault: str  # what goes wrong, one line
    mitigation: str  # what the runbook does about it, one line
    traffic: tuple[Traffic, ...]
    faults: tuple[dict[str, Any], ...]  # llmock behaviours while the fault lasts (checked first)
    baseline: tuple[dict[str, Any], ...] = ()  # llmock behaviours all along
    error_rates: tuple[tuple[int, float], ...] = ()  # (HTTP status, share) while the fault lasts
    rpm: int | None = None  # llmock's requests-per-minute quota
    # The snapshot an alias answers as (the `model` of the response), as OpenAI reports it;
    # llmock answers with the requested name otherwise.
    aliases: tuple[tuple[str, str], ...] = ()
    fault_aliases: tuple[tuple[str, str], ...] = ()
    fault_after_seconds: float = 0.0  # healthy traffic first (at most a tenth of the run)
    hint: str = ""  # what the person watching has to do for the runbook

    def fault_at(self, duration: float) -> float:
        return min(self.fault_after_seconds, duration / 10)

    def served_as(self, faulty: bool) -> dict[str, str]:
        return dict(self.fault_aliases if faulty else self.aliases)

    def behaviors(self, faulty: bool) -> list[dict[str, Any]]:
        """What llmock should do in this phase; the first matching behaviour of a kind wins."""
        return [*(self.faults if faulty else ()), *self.baseline]


def _delay(seconds: float, **match: Any) -> dict[str, Any]:
    return {"type": "delay", "seconds": seconds, "times": None, "match": match}


def _reply(text: str, **match: Any) -> dict[str, Any]:
    return {"type": "reply", "text": text, "times": None, "match": match}


def build(scenario: Scenario, concurrency: int = 4) -> ScenarioSetup:
    """The setup of `scenario`; `concurrency` is the number of loops of the main features."""
    n = max(1, concurrency)
    few = max(1, n // 2)
    if scenario is Scenario.RATE_LIMIT_EXHAUSTION:
        # Every call takes 0.5 s, so a feature's rate is its calls in flight / 0.5 s: 3.5 n in
        # flight make 7 n calls/s against a quota of 4 n/s. Halving the concurrency of those
        # hitting the limit and shedding the low-priority feature brings that under 4 n/s, and
        # backing off on 429s absorbs the rest.
        return ScenarioSetup(
            scenario,
            fault=f"llmock allows {240 * n} requests/min; the app sends about {420 * n}",
            mitigation="halve concurrency of the top features, back off on 429, disable summaries",
            traffic=(
                Traffic("chat", "gpt-4.1", n, 0.0, CHAT_PROMPTS),
                Traffic("search", "gpt-4.1-mini", 2 * n, 0.0, SEARCH_PROMPTS, json_output=True),
                Traffic("summaries", "gpt-4.1-mini", few, 0.0, SUMMARY_PROMPTS),
            ),
            faults=(),
            baseline=(_reply(GOOD_ANSWER), _delay(0.5)),
            rpm=240 * n,
        )
    if scenario is Scenario.ELEVATED_LATENCY:
        # gpt-4.1 answers in 3 s (p50 > 2 s) and its streamed calls in 9 s (p95 > 8 s);
        # gpt-4.1-mini answers in 0.2 s. Rerouting gpt-4.1 to gpt-4.1-mini ends it.
        return ScenarioSetup(
            scenario,
            fault="gpt-4.1 answers in 3 s, 9 s when streamed; gpt-4.1-mini in 0.2 s",
            mitigation="cap max_tokens, reroute gpt-4.1 -> gpt-4.1-mini",
            traffic=(
                Traffic("chat", "gpt-4.1", n, 0.2, CHAT_PROMPTS, stream_every=3, max_tokens=1024),
                Traffic("summaries", "gpt-4.1", few, 0.5, SUMMARY_PROMPTS, max_tokens=1024),
                Traffic("search", "gpt-4.1-mini", n, 0.3, SEARCH_PROMPTS, json_output=True),
            ),
            faults=(_delay(9.0, model="gpt-4.1", stream=True), _delay(3.0, model="gpt-4.1")),
            baseline=(_reply(GOOD_ANSWER), _delay(0.2)),
        )
    if scenario is Scenario.QUALITY_DEGRADATION:
        # The gpt-4.1 alias answers well as gpt-4.1-2025-04-14, then moves to a newer snapshot
        # that answers badly (not the JSON asked for, off topic, overconfident). The runbook
        # pins the snapshot that answered well; requested by its name, it still does.
        return ScenarioSetup(
            scenario,
            fault=f"the gpt-4.1 alias moves from {SNAPSHOT} to {NEW_SNAPSHOT}, which answers "
            "poorly (invalid JSON, off topic)",
            mitigation=f"pin gpt-4.1 to {SNAPSHOT} (after an acknowledgement)",
            traffic=(
                Traffic("chat", "gpt-4.1", n, 0.2, CHAT_PROMPTS),
                Traffic("search", "gpt-4.1", n, 0.2, SEARCH_PROMPTS, json_output=True),
                Traffic("summaries", "gpt-4.1-mini", few, 0.3, SUMMARY_PROMPTS),
            ),
            faults=(_reply(POOR_ANSWER, model="gpt-4.1"),),
            baseline=(_reply(GOOD_ANSWER), _delay(0.3)),
            aliases=(("gpt-4.1", SNAPSHOT),),
            fault_aliases=(("gpt-4.1", NEW_SNAPSHOT),),
            fault_after_seconds=30,
            hint="this runbook waits for an acknowledgement: "
            "`uv run pagerloop incidents ack <incident id>`",
        )
    if scenario is Scenario.COST_SPIKE:
        # After a calm start, summaries send ~6k-token documents to gpt-4.1 and get ~3k-token
        # answers: about $0.036 a call, ~$170/h at the default concurrency, 8x the default
        # budget's $20.8/h. gpt-4.1-nano costs 20x less.
        return ScenarioSetup(
            scenario,
            fault="summaries suddenly send large documents to gpt-4.1 and get long answers",
            mitigation="reroute gpt-4.1 -> gpt-4.1-nano, cap max_tokens, throttle summaries",
            traffic=(
                Traffic("chat", "gpt-4.1-mini", n, 0.3, CHAT_PROMPTS),
                Traffic("search", "gpt-4.1-mini", n, 0.3, SEARCH_PROMPTS, json_output=True),
                Traffic("summaries", "gpt-4.1", 1, 2.0, SUMMARY_PROMPTS, phase="before_fault"),
                Traffic(
                    "summaries",
                    "gpt-4.1",
                    few,
                    1.2,
                    SUMMARY_PROMPTS,
                    max_tokens=4096,
                    document=LARGE_DOCUMENT,
                    phase="after_fault",
                ),
            ),
            faults=(_reply(LONG_ANSWER, model="gpt-4.1"),),
            baseline=(_reply(GOOD_ANSWER), _delay(0.3)),
            fault_after_seconds=20,
        )
    # API outage: after a short healthy start, 9 calls in 10 get a 503. The answers of the
    # healthy start sit in the client's response cache (instrument(..., response_cache=N));
    # once the runbook's cache control is on, repeated questions are served from it, and
    # shedding summaries takes their failures away.
    return ScenarioSetup(
        scenario,
        fault=f"after a healthy start, llmock answers 503 to {OUTAGE_SHARE:.0%} of requests",
        mitigation="serve cached responses where enabled, disable non-critical features",
        traffic=(
            Traffic("chat", "gpt-4.1", n, 0.3, CHAT_PROMPTS),
            Traffic("search", "gpt-4.1-mini", n, 0.3, SEARCH_PROMPTS, json_output=True),
            Traffic("summaries", "gpt-4.1-mini", few, 0.5, SUMMARY_PROMPTS),
        ),
        faults=(),
        error_rates=((503, OUTAGE_SHARE),),
        baseline=(_reply(GOOD_ANSWER), _delay(0.3)),
        # Short, so that the outage rule, not the error-rate rule, sees the failures first.
        fault_after_seconds=5,
    )
