"""Runbook controls as the instrumentation sees them: which apply to a call (`Decision`), and
where they come from (`ControlSource`). The mechanics live beside: concurrency slots in
`pagerloop_sdk.limiter`, 429 backoff in `pagerloop_sdk.backoff`, the response cache in
`pagerloop_sdk.response_cache`; `pagerloop_sdk.enforce` applies a decision to one call.

Every process keeps the active controls of its store in memory (`ControlSource`): a daemon
thread reads them every `ttl` seconds, so a control set or reverted anywhere applies here
within seconds and no call waits for a query. The only exception is the first call of a
process, which waits (at most FIRST_LOAD_WAIT) for the first read, so that controls already
in force apply from the first call. A store error keeps the last known controls.

The rules matching a call's feature and requested model fold into one `Decision`, memoized
per (operation, feature, model) until the controls change: a call under no control pays one
attribute read, a controlled one a dict lookup.

A rule with a `fraction` below 1 is a canary: it applies only to the calls in its slice, those
whose session hashes (with the rule's incident) below the fraction (`in_slice`), so a session
stays on one side for the whole canary and keeps it when it is promoted. Every call in a slice
is tagged `canary#<id>` in its record, which is how the server compares canary and rest.
Snapshots with a canary memoize per (operation, feature, model, sides of the slices); the
others decide exactly as before.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
import math
import os
import random
import re
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import openai

# The mechanics, importable from here as before the split (the constants are copies: patch
# them in pagerloop_sdk.backoff).
from pagerloop_sdk.backoff import BACKOFF_BASE as BACKOFF_BASE
from pagerloop_sdk.backoff import BACKOFF_CAP as BACKOFF_CAP
from pagerloop_sdk.backoff import RETRY_AFTER_MAX as RETRY_AFTER_MAX
from pagerloop_sdk.backoff import backoff_delay as backoff_delay
from pagerloop_sdk.backoff import is_rate_limit as is_rate_limit
from pagerloop_sdk.backoff import retry_after as retry_after
from pagerloop_sdk.context import LLMContext
from pagerloop_sdk.context import current as current_context
from pagerloop_sdk.endpoints import route_problem, split_route
from pagerloop_sdk.limiter import Held as Held
from pagerloop_sdk.limiter import Limiter as Limiter
from pagerloop_sdk.limiter import Pacer
from pagerloop_sdk.limiter import acquire as acquire
from pagerloop_sdk.limiter import acquire_async as acquire_async
from pagerloop_sdk.metrics import counter
from pagerloop_sdk.queueing import Queue
from pagerloop_sdk.records import CONTROLS_MAX
from pagerloop_sdk.response_cache import ResponseCache as ResponseCache
from pagerloop_sdk.response_cache import cache_key as cache_key

log = logging.getLogger(__name__)

DEFAULT_TTL = 2.0
FIRST_LOAD_WAIT = 1.0  # seconds the first call of a process waits for the controls
MEMO_MAX = 4096  # (operation, feature, model) decisions kept per set of controls
# Model-rewriting kinds make no sense for embeddings (a chat model cannot embed).
GENERATIVE = frozenset({"chat", "responses"})
MODEL_KINDS = frozenset({"reroute", "pin", "max_tokens"})
# Kinds that read the output text, which embeddings do not have.
OUTPUT_KINDS = frozenset({"validate"})
KINDS = (
    "concurrency",
    "rpm",
    "tpm",
    "reroute",
    "pin",
    "max_tokens",
    "disable",
    "cache",
    "backoff",
    "queue",
    "validate",
)
# The kinds whose value is a positive count (calls in flight, per minute, tokens, attempts).
COUNTED = frozenset({"concurrency", "rpm", "tpm", "max_tokens", "backoff", "queue"})
# The limits of the whole application: the server gives each process its share, which may be 0.
SHARED = frozenset({"concurrency", "rpm", "tpm", "queue"})
# The kinds paced on a schedule of their own (a queue is a pacer with a waiting room).
PACED = frozenset({"rpm", "tpm", "queue"})
# A validate control's check: `json`, `schema:<name>`, or the name of an app's own check.
CHECK_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
TOKEN_LIMITS = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "responses": ("max_output_tokens",),
}

ACTIONS = counter(
    "pagerloop_control_actions_total",
    "Calls a runbook control acted on (rerouted, capped, throttled, paced, served from cache, "
    "retried, refused), by control kind.",
    ("kind",),
)


class FeatureDisabled(openai.OpenAIError):
    """A runbook control disabled this feature (or model): no request was sent.

    An `openai.OpenAIError`, so an app that already falls back on OpenAI errors degrades the
    same way here.
    """

    def __init__(
        self,
        feature: str | None,
        reason: str,
        incident_id: str,
        *,
        model: str | None = None,
        control_id: int | None = None,
    ) -> None:
        self.feature = feature
        self.reason = reason
        self.incident_id = incident_id
        self.model = model
        self.control_id = control_id
        call = ", ".join(
            f"{name} {value!r}" for name, value in (("feature", feature), ("model", model)) if value
        )
        by = f"a control of incident {incident_id}" if incident_id else "a control set by hand"
        super().__init__(
            f"LLM call ({call or 'any'}) disabled by {by}: {reason or 'no reason given'}"
        )

    def __reduce__(self) -> Any:
        return _rebuild_disabled, (
            self.feature,
            self.reason,
            self.incident_id,
            self.model,
            self.control_id,
        )


def _rebuild_disabled(
    feature: str | None, reason: str, incident_id: str, model: str | None, control_id: int | None
) -> FeatureDisabled:
    return FeatureDisabled(feature, reason, incident_id, model=model, control_id=control_id)


# --- rules and decisions (pure) ------------------------------------------------------------


def canary_tag(control_id: int) -> str:
    """The tag of a call in control `control_id`'s canary slice, in the call's `controls` label;
    the server's stores find the canary's side by it, so both read it from here."""
    return f"canary#{control_id}"


@dataclass(frozen=True, slots=True)
class Rule:
    """One active control, as enforced."""

    id: int
    kind: str
    feature: str | None = None
    model: str | None = None
    value: str = ""
    incident_id: str = ""
    reason: str = ""
    expires_at: float = math.inf  # time.time() at which the control stops, wherever it came from
    fraction: float = 1.0  # the share of the calls in its target it applies to (< 1: a canary)

    @property
    def tag(self) -> str:
        return f"{self.kind}#{self.id}"

    @property
    def canary_tag(self) -> str:
        return canary_tag(self.id)

    @property
    def number(self) -> int:
        return int(self.value)

    def matches(self, operation: str, feature: str | None, model: str) -> bool:
        if self.kind in MODEL_KINDS | OUTPUT_KINDS and operation not in GENERATIVE:
            return False
        return (self.feature is None or self.feature == feature) and (
            self.model is None or self.model == model
        )

    def rank(self) -> tuple[int, int]:
        """The most specific rule wins, then the newest."""
        return (self.feature is not None) + (self.model is not None), self.id


def problem(kind: str, value: str, *, share: bool = False) -> str | None:
    """Why a control cannot be enforced, or None when it can. A `share` of an application-wide
    limit may be 0 (this process waits its turn)."""
    if kind not in KINDS:
        return f"unknown control kind {kind!r} (one of {', '.join(KINDS)})"
    least = 0 if share and kind in SHARED else 1
    # isascii: "²".isdigit() is true, and int("²") fails.
    if kind in COUNTED and not (value.isascii() and value.isdigit() and int(value) >= least):
        return f"a {kind} control needs a whole number of at least {least}, not {value!r}"
    if kind in ("reroute", "pin"):
        return route_problem(kind, value)  # `model` or `model@endpoint`
    if kind == "validate":
        return check_problem(value)
    return None


def check_problem(check: str) -> str | None:
    """Why `check` cannot name a validate control's check (whether this process knows it is
    another matter: `pagerloop_sdk.validation`)."""
    if check == "schema:" or not CHECK_NAME.fullmatch(check):
        return (
            "a validate control needs a check: json, schema:<name> or the name of a check the "
            f"app registered (letters, digits, `_.:-`, at most 100), not {check!r}"
        )
    return None


def enforceable(rules: Iterable[Rule], *, shares: bool = False) -> tuple[Rule, ...]:
    """The rules this process can enforce; one it cannot (a kind newer than this SDK, a bad
    value) is skipped with a warning, once."""
    kept = []
    for rule in rules:
        why = problem(rule.kind, rule.value, share=shares)
        if why is None and not 0 < rule.fraction <= 1:  # NaN too
            why = f"a fraction is between 0 and 1, not {rule.fraction!r}"
        if why is None:
            kept.append(rule)
        else:
            _warn_once(f"invalid:{rule.id}", "ignoring control #%s: %s", rule.id, why)
    return tuple(kept)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the controls do to one kind of call."""

    disabled: Rule | None = None
    route: Rule | None = None  # reroute or pin: the model to send instead
    cap: Rule | None = None  # the tightest max_tokens
    limits: tuple[tuple[Rule, Limiter], ...] = ()  # every concurrency control, by id
    paces: tuple[tuple[Rule, Pacer], ...] = ()  # every rpm and tpm control, by id
    cache: Rule | None = None
    backoff: Rule | None = None
    queues: tuple[tuple[Rule, Queue], ...] = ()  # every queue control, by id
    validate: Rule | None = None  # the check of the output, retried once when it fails
    canary: tuple[Rule, ...] = ()  # the canaries whose slice the call is in (tagged canary#id)


def decide(
    rules: Sequence[Rule],
    limiters: Mapping[int, Limiter],
    pacers: Mapping[int, Pacer],
    operation: str,
    feature: str | None,
    model: str,
) -> Decision | None:
    """The decision for a call, or None when no control applies to it."""
    matching = [r for r in rules if r.matches(operation, feature, model)]
    if not matching:
        return None

    def best(*kinds: str) -> Rule | None:
        found = [r for r in matching if r.kind in kinds]
        return max(found, key=Rule.rank) if found else None

    caps = [r for r in matching if r.kind == "max_tokens"]
    return Decision(
        disabled=best("disable"),
        route=best("reroute", "pin"),
        cap=min(caps, key=lambda r: (r.number, -r.id)) if caps else None,
        limits=tuple(
            (r, limiters[r.id])
            for r in sorted(matching, key=lambda r: r.id)
            if r.kind == "concurrency" and r.id in limiters
        ),
        paces=tuple(
            (r, pacers[r.id])
            for r in sorted(matching, key=lambda r: r.id)
            if r.kind in ("rpm", "tpm") and r.id in pacers
        ),
        cache=best("cache"),
        backoff=best("backoff"),
        queues=tuple(
            (r, queue)
            for r in sorted(matching, key=lambda r: r.id)
            if r.kind == "queue" and isinstance(queue := pacers.get(r.id), Queue)
        ),
        validate=best("validate"),
    )


def cap_tokens(operation: str, kwargs: MutableMapping[str, Any], cap: int) -> bool:
    """Lower the output-token limit of a request to `cap` (setting it when absent); whether
    the request changed."""
    names = TOKEN_LIMITS.get(operation)
    if names is None:
        return False
    changed = present = False
    for name in names:
        given = kwargs.get(name)
        if isinstance(given, int):  # None and the SDK's NotGiven mean "no limit"
            present = True
            if given > cap:
                kwargs[name] = cap
                changed = True
    if not present:
        kwargs[names[0]] = cap
        changed = True
    return changed


def rewrite(decision: Decision, operation: str, kwargs: MutableMapping[str, Any]) -> list[str]:
    """Apply the request-changing controls to `kwargs`; the tags of those that changed it."""
    tags = []
    route = decision.route
    if route is not None:
        model, endpoint = split_route(route.value)
        if endpoint is not None or kwargs.get("model") != model:
            kwargs["model"] = model
            tags.append(route.tag)
    cap = decision.cap
    if cap is not None and cap_tokens(operation, kwargs, cap.number):
        tags.append(cap.tag)
    return tags


def label(tags: Sequence[str]) -> str | None:
    return ",".join(tags)[:CONTROLS_MAX] or None


def count_actions(tags: Sequence[str]) -> None:
    for tag in tags:
        kind = tag.partition("#")[0]
        if kind != "canary":  # a call in a slice, not something a control did to it
            ACTIONS.labels(kind).inc()


# --- canary slices (pure) --------------------------------------------------------------------


def session_key(ctx: LLMContext) -> str | None:
    """What keeps a caller on one side of a canary: its session, else its user, else its
    trace; None when it has none of them (each call is then on its own)."""
    for key in (ctx.session_id, ctx.user_id, ctx.trace_id):
        if key is not None and key != "":
            return str(key)
    return None


def unit(incident_id: str, session: str) -> float:
    """A stable number in [0, 1) for (incident, session): the same in every process and every
    Python (blake2b, not hash(), which is salted per process). Keyed by the incident rather
    than the control, so the canaries of one incident share a slice."""
    text = f"{incident_id}\x00{session}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") / 2.0**64


def in_slice(rule: Rule, session: str) -> bool:
    return unit(rule.incident_id, session) < rule.fraction


def sides(canaries: Sequence[Rule], session: str | None) -> tuple[bool, ...]:
    """Whether a call of `session` is in the slice of each canary; a call with no session
    draws a key of its own."""
    if session is None:
        session = f"~{random.getrandbits(64):016x}"
    return tuple(in_slice(rule, session) for rule in canaries)


# --- the process's view of the controls ---------------------------------------------------------


@dataclass(eq=False)
class Snapshot:
    rules: tuple[Rule, ...] = ()
    limiters: Mapping[int, Limiter] = field(default_factory=dict)
    pacers: Mapping[int, Pacer] = field(default_factory=dict)
    _memo: dict[tuple[str, str | None, str], Decision | None] = field(default_factory=dict)

    def __new__(cls, rules: tuple[Rule, ...] = (), *args: Any, **kwargs: Any) -> Snapshot:
        # Only a snapshot with a canary decides per session: the others keep the plain
        # lookup below, whatever the call.
        if cls is Snapshot and any(rule.fraction < 1 for rule in rules):
            cls = CanarySnapshot
        return object.__new__(cls)

    def decide(self, operation: str, feature: str | None, model: str) -> Decision | None:
        key = (operation, feature, model)
        memo = self._memo
        try:
            return memo[key]
        except KeyError:
            pass
        decision = decide(self.rules, self.limiters, self.pacers, operation, feature, model)
        if len(memo) >= MEMO_MAX:
            memo.clear()  # app-chosen model names must not grow this without bound
        memo[key] = decision
        return decision


@dataclass(eq=False)
class CanarySnapshot(Snapshot):
    """The controls, some of them canaries: a call's decision also depends on which slices
    its session is in."""

    def __post_init__(self) -> None:
        self.canaries = tuple(rule for rule in self.rules if rule.fraction < 1)
        self._matching: dict[tuple[str, str | None, str], tuple[Rule, ...]] = {}
        self._sliced: dict[tuple[str, str | None, str, tuple[bool, ...]], Decision | None] = {}

    def decide(self, operation: str, feature: str | None, model: str) -> Decision | None:
        target = (operation, feature, model)
        canaries = self._matching.get(target)
        if canaries is None:
            if len(self._matching) >= MEMO_MAX:
                self._matching.clear()
            canaries = tuple(r for r in self.canaries if r.matches(operation, feature, model))
            self._matching[target] = canaries
        inside = sides(canaries, session_key(current_context())) if canaries else ()
        key = (operation, feature, model, inside)
        memo = self._sliced
        try:
            return memo[key]
        except KeyError:
            pass
        chosen = tuple(rule for rule, side in zip(canaries, inside, strict=True) if side)
        rules = [r for r in self.rules if r.fraction >= 1 or r in chosen]
        decision = decide(rules, self.limiters, self.pacers, operation, feature, model)
        if decision is not None and chosen:
            decision = replace(decision, canary=chosen)
        if len(memo) >= MEMO_MAX:
            memo.clear()
        memo[key] = decision
        return decision


EMPTY = Snapshot()


class ControlSource(abc.ABC):
    """The controls in force, re-read every `ttl` seconds by a daemon thread; `read()` says
    from where (the API: `pagerloop_sdk.http_controls`; the server's own store in embedded
    mode). A read that fails keeps the last controls known, each until its own expiry."""

    def __init__(self, ttl: float = DEFAULT_TTL) -> None:
        self.ttl = ttl
        self.reads = 0  # successful reads, for tests and curiosity
        self._snapshot: Snapshot | None = None
        self._rules: tuple[Rule, ...] = ()  # as last read, expired ones included
        self._limiters: dict[int, Limiter] = {}
        self._pacers: dict[int, Pacer] = {}
        self._failing = False
        self._reset_process_state()
        _SOURCES.add(self)

    @abc.abstractmethod
    def read(self) -> tuple[Rule, ...] | None:
        """The controls in force now, or None when they have not changed since the last
        read; raises when they cannot be read."""

    def after_fork(self) -> None:  # noqa: B027 (optional: most sources hold nothing to drop)
        """In a forked child: drop what cannot be shared with the parent (connections)."""

    def _reset_process_state(self) -> None:
        self._running = False
        self._start_lock = threading.Lock()
        self._loaded = threading.Event()
        self._stop = threading.Event()

    # --- the caller's side ---------------------------------------------------------------

    def current(self) -> Snapshot | None:
        """The controls as last read; None before the first read."""
        if not self._running:
            self.start()
        return self._snapshot

    def snapshot(self, wait: float = FIRST_LOAD_WAIT) -> Snapshot:
        snap = self._snapshot
        if snap is not None and self._running:  # every call but a process's first
            return snap
        snap = self.current()
        if snap is None:
            self._loaded.wait(wait)
            snap = self._snapshot
        return snap or EMPTY

    async def snapshot_async(self, wait: float = FIRST_LOAD_WAIT) -> Snapshot:
        snap = self.current()
        if snap is None:
            await asyncio.to_thread(self._loaded.wait, wait)
            snap = self._snapshot
        return snap or EMPTY

    # --- the thread's side ---------------------------------------------------------------

    def start(self) -> None:
        with self._start_lock:
            if self._running:
                return
            self._running = True
            stop = self._stop
            thread = threading.Thread(
                target=_poll,
                args=(weakref.ref(self), stop, self.ttl),
                name="pagerloop-controls",
                daemon=True,
            )
            weakref.finalize(self, stop.set)
            thread.start()

    def close(self) -> None:
        """Stop re-reading (the last controls read stay in force)."""
        self._running = True
        self._stop.set()

    def refresh(self) -> Snapshot:
        """Read once and make what it says current."""
        try:
            rules = self.read()
        except Exception as exc:
            if not self._failing:
                self._failing = True
                log.warning("cannot read the runbook controls, keeping the last known: %s", exc)
        else:
            self.reads += 1
            if self._failing:
                self._failing = False
                log.info("reading the runbook controls again")
            if rules is not None:
                self._rules = rules
        now = time.time()
        self._apply(tuple(rule for rule in self._rules if rule.expires_at > now))
        self._loaded.set()
        return self._snapshot or EMPTY

    def _apply(self, rules: tuple[Rule, ...]) -> None:
        old = self._snapshot
        if old is not None and old.rules == rules:
            return  # unchanged: keep the memoized decisions
        limits = {r.id: r.number for r in rules if r.kind == "concurrency"}
        for control_id in set(self._limiters) - set(limits):
            # Gone: let its waiters through; calls holding a slot release into it harmlessly.
            self._limiters.pop(control_id).resize(1 << 62)
        for control_id, limit in limits.items():
            limiter = self._limiters.get(control_id)
            if limiter is None:
                self._limiters[control_id] = Limiter(limit)
            elif limiter.limit != limit:
                limiter.resize(limit)
        rates = {r.id: r.number for r in rules if r.kind in PACED}
        queued = {r.id for r in rules if r.kind == "queue"}
        for control_id in set(self._pacers) - set(rates):
            self._pacers.pop(control_id).resize(None)  # gone: its waiters go
        for control_id, per_minute in rates.items():
            pacer = self._pacers.get(control_id)
            if pacer is None:
                made = Queue if control_id in queued else Pacer
                self._pacers[control_id] = made(per_minute)
            elif pacer.per_minute != per_minute:
                pacer.resize(per_minute)
        self._snapshot = Snapshot(rules, dict(self._limiters), dict(self._pacers))


def _poll(ref: weakref.ref[ControlSource], stop: threading.Event, ttl: float) -> None:
    # Holds the source only while reading: a source nobody uses any more stops its thread.
    while not stop.is_set():
        source = ref()
        if source is None:
            return
        try:
            source.refresh()
        except Exception:  # never let the thread die: the controls would freeze silently
            log.exception("reading the runbook controls failed")
        del source
        stop.wait(ttl)


_SOURCES: weakref.WeakSet[ControlSource] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The parent's threads are gone and its locks may be held: start afresh, read again.
    for source in list(_SOURCES):
        source._reset_process_state()
        source._snapshot = None
        source._limiters = {}
        source._pacers = {}
        source._rules = ()  # the parent's, and its shares: this is another instance
        source.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)
