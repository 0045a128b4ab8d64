"""One problem, one incident (pure): which triggers are the same problem, and what that means
for what fires now and for the incidents already open.

A relation, declared like Alertmanager's inhibit rules, says a *source* trigger takes in
*target* triggers: on the same scope and, unless it says otherwise, on every scope the source's
covers (global covers every model and feature). A trigger on global also takes in the same
trigger on narrower scopes. A `mutual` relation is one problem either way: whichever of the two
is open first takes the other in (the declared source when both are new).

- In one evaluation, a target whose source fires too is hidden (`hidden`); so is one whose
  source is pending (breaching, not yet confirmed: seconds, see CONFIRM_AFTER), so that a
  wider problem about to fire is not preceded by a page for a narrower one.
- Across evaluations (`route`): a target firing while its source's incident is open joins that
  incident (nothing new opens); a source firing while a target's incident is open takes that
  incident in (the target is merged into the source).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from domain.incident import Trigger
from domain.scopes import GLOBAL

T = Trigger


@dataclass(frozen=True)
class Relation:
    source: Trigger
    targets: tuple[Trigger, ...]
    # One problem either way: the one open first takes the other in.
    mutual: bool = False
    # Also on the scopes the source's covers (global over models and features).
    across_scopes: bool = True


DEFAULT_RELATIONS: tuple[Relation, ...] = (
    # An outage's 5xx are errors too, and its timeouts are latency.
    Relation(T.API_OUTAGE, (T.ERROR_RATE, T.ELEVATED_LATENCY)),
    # A spend rate over budget is how a budget runs out.
    Relation(T.BUDGET_EXHAUSTION, (T.COST_SPIKE,)),
    # 429s whose retries gave up are errors too.
    Relation(T.RATE_LIMIT_EXHAUSTION, (T.ERROR_RATE,)),
    # Tokens per minute near the quota and the 429s it brings are one problem.
    Relation(T.RATE_LIMIT_EXHAUSTION, (T.TOKEN_QUOTA,), mutual=True),
)
# What the detector did before relations existed: its runs begun then replay with this.
LEGACY_RELATIONS: tuple[Relation, ...] = (
    Relation(T.API_OUTAGE, (T.ERROR_RATE,), across_scopes=False),
)

Key = tuple[Trigger, str]  # trigger, scope


def key_of(text: str) -> Key:
    """ "trigger|scope" (the detector's keys) as a Key."""
    trigger, _, scope = text.partition("|")
    return Trigger(trigger), scope


def _by_scope(keys: Iterable[Key]) -> dict[str, list[Key]]:
    found: dict[str, list[Key]] = {}
    for key in keys:
        found.setdefault(key[1], []).append(key)
    return found


def _coverers(index: dict[str, list[Key]], target: Key) -> list[Key]:
    """The keys that could cover `target`: on its scope or on global (not one per pair of
    keys: a wide outage has hundreds of scopes, and this runs in the detector workflow)."""
    near = index.get(target[1], [])
    return near if target[1] == GLOBAL else near + index.get(GLOBAL, [])


def covers(relations: Iterable[Relation], source: Key, target: Key) -> bool:
    """Whether `source` and `target` are one problem with `source` the wider one (for a
    mutual relation on one scope, either way)."""
    if source == target:
        return False
    same = source[1] == target[1]
    wider = source[1] == GLOBAL and target[1] != GLOBAL
    if source[0] == target[0]:
        return wider
    return any(
        (same or (wider and relation.across_scopes))
        and (
            (relation.source == source[0] and target[0] in relation.targets)
            or (relation.mutual and relation.source == target[0] and source[0] in relation.targets)
        )
        for relation in relations
    )


def takes_in(
    relations: Iterable[Relation], source: Key, target: Key, open_keys: Collection[Key] = ()
) -> bool:
    """Whether `source` takes `target` in: it covers it and, for a mutual pair, it is the one
    open (or, both open or neither, the declared source)."""
    relations = tuple(relations)
    if not covers(relations, source, target):
        return False
    if not covers(relations, target, source):
        return True
    if (source in open_keys) != (target in open_keys):
        return source in open_keys
    return any(
        relation.source == source[0] and target[0] in relation.targets for relation in relations
    )


def hidden(
    relations: Iterable[Relation],
    firing: Collection[Key],
    pending: Collection[Key] = (),
    sources: Collection[Key] | None = None,
) -> set[Key]:
    """The firing targets whose source fires in the same evaluation (one trigger's scopes
    firing together are the evaluation's own business, see detectors/evaluation.py) or is
    pending. `sources`: the firing keys that may hide others (all of them unless given)."""
    relations = tuple(relations)
    pending = set(pending)
    index = _by_scope([*(firing if sources is None else sources), *pending])
    return {
        target
        for target in firing
        for source in _coverers(index, target)
        if (source[0] != target[0] or source in pending) and takes_in(relations, source, target)
    }


@dataclass(frozen=True)
class Routing:
    """What one evaluation's findings mean for the incidents."""

    # Firing keys that join the open incident of another key (the key of that incident).
    joins: dict[Key, Key] = field(default_factory=dict)
    # Firing keys that report to their own incident, with the open incidents (by key) they
    # take in.
    absorbs: dict[Key, tuple[Key, ...]] = field(default_factory=dict)
    # Firing keys held back this evaluation: their source fires too but has no incident yet
    # (it opens now; they join it at the next evaluation).
    held: tuple[Key, ...] = ()


def route(
    relations: Iterable[Relation], firing: Iterable[Key], open_keys: Collection[Key]
) -> Routing:
    """For each firing key: join an open incident that takes it in, or report to its own and
    take in the open incidents it covers. `open_keys`: keys with an incident of their own."""
    relations = tuple(relations)
    firing = sorted(set(firing))
    index = _by_scope(sorted(set(firing) | set(open_keys)))

    def absorber(key: Key) -> Key | None:
        candidates = [c for c in _coverers(index, key) if takes_in(relations, c, key, open_keys)]
        # The one open first wins over one opening now; then the widest (global).
        candidates.sort(key=lambda c: (c not in open_keys, c[1] != GLOBAL, c))
        return candidates[0] if candidates else None

    def root(key: Key) -> Key:
        seen = {key}
        while (up := absorber(key)) is not None and up not in seen:
            seen.add(up)
            key = up
        return key

    joins: dict[Key, Key] = {}
    absorbs: dict[Key, list[Key]] = {}
    held: list[Key] = []
    for key in firing:
        top = root(key)
        if top == key:
            absorbs.setdefault(key, [])
        elif top in open_keys:
            joins[key] = top
        else:
            held.append(key)
    for key in sorted(open_keys):
        top = root(key)
        if top != key and top in absorbs:
            absorbs[top].append(key)
    return Routing(joins, {k: tuple(v) for k, v in absorbs.items()}, tuple(held))
