"""The side-effect lanes of an incident: one ordered queue per channel, and how a queue that
piled up while its vendor was down is compacted before it is sent or carried to a fresh run."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from domain.incident import LaneAction

# Thread replies and ticket comments queued back to back are sent as one message of at most
# this many characters: after an hour of outage, one catch-up message instead of hundreds
# (Slack posts about one message per second per channel).
MERGED_TEXT_MAX = 3000
MERGEABLE = frozenset({"reply", "comment"})


class Lane:
    """An ordered queue of side effects for one channel, drained by its own coroutine."""

    def __init__(self, name: str, enabled: bool) -> None:
        self.name = name
        self.enabled = enabled
        self.pending: deque[LaneAction] = deque()
        self.in_flight: LaneAction | None = None

    def push(self, kind: str, text: str = "", level: str = "", to: list[str] | None = None) -> None:
        if self.enabled:
            self.pending.append(LaneAction(kind, text, level, list(to or [])))

    def queued(self, kind: str) -> bool:
        return any(action.kind == kind for action in self.pending)

    def underway(self, kind: str) -> bool:
        """Queued or being performed right now."""
        return self.queued(kind) or (self.in_flight is not None and self.in_flight.kind == kind)

    def take(self) -> LaneAction:
        """The next action, with the replies or comments queued right behind it merged in."""
        action = self.pending.popleft()
        if action.kind not in MERGEABLE:
            return action
        texts = [action.text]
        size = len(action.text)
        while self.pending and _joins(self.pending[0], action.kind, size):
            texts.append(self.pending.popleft().text)
            size += len(texts[-1]) + 1
        return LaneAction(action.kind, "\n".join(texts), action.level)

    def put_back(self, action: LaneAction) -> None:
        """An action that did not happen goes first again."""
        self.pending.appendleft(action)


def _joins(action: LaneAction, kind: str, size: int) -> bool:
    return action.kind == kind and size + 1 + len(action.text) <= MERGED_TEXT_MAX


def compact(pending: Iterable[LaneAction]) -> list[LaneAction]:
    """What a lane still has to do, in fewer actions: only the last of its "update"s (each
    renders the whole current state), and back-to-back replies or comments merged."""
    actions = list(pending)
    last_update = max((i for i, a in enumerate(actions) if a.kind == "update"), default=-1)
    kept = [a for i, a in enumerate(actions) if a.kind != "update" or i == last_update]
    lane = Lane("compact", enabled=True)
    lane.pending.extend(kept)
    compacted = []
    while lane.pending:
        compacted.append(lane.take())
    return compacted
