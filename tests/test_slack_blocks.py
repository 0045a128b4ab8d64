from __future__ import annotations

from datetime import UTC, datetime

from activities.slack import (
    ACK_ACTION,
    ESCALATE_ACTION,
    RESOLVE_ACTION,
    SNOOZE_ACTION,
    fallback_text,
    incident_blocks,
)
from domain.incident import IncidentState, IncidentStatus, Severity, Trigger
from tests.fakes.slack import block_errors


def state(**changes: object) -> IncidentState:
    base = IncidentState(
        incident_id="incident-error_rate-global-20261126T120000Z",
        trigger=Trigger.ERROR_RATE,
        scope="global",
        severity=Severity.SEV2,
        status=IncidentStatus.DETECTED,
        opened_at=datetime(2026, 11, 26, 12, tzinfo=UTC),
        summary="error rate 12.0% > 5% (6/50 calls in 300s)",
        metrics={"error_rate": 0.12, "calls": 50},
    )
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def buttons(blocks: list[dict]) -> dict[str, str]:
    found = {}
    for block in blocks:
        if block["type"] == "actions":
            found |= {e["action_id"]: e["value"] for e in block["elements"]}
    return found


def test_detected_incident_offers_every_action() -> None:
    blocks = incident_blocks(state())
    incident = "incident-error_rate-global-20261126T120000Z"
    assert buttons(blocks) == {
        ACK_ACTION: incident,
        RESOLVE_ACTION: incident,
        ESCALATE_ACTION: incident,
        SNOOZE_ACTION: incident,
    }
    text = str(blocks)
    assert "SEV2 · error_rate · global · DETECTED" in text
    assert "error_rate: *12.0%*" in text
    assert "calls: *50*" in text


def test_acknowledged_shows_who_and_no_acknowledge_button() -> None:
    blocks = incident_blocks(state(status=IncidentStatus.ACKNOWLEDGED, acknowledged_by="U024BE7LH"))
    assert list(buttons(blocks)) == [RESOLVE_ACTION, ESCALATE_ACTION, SNOOZE_ACTION]
    assert "acknowledged by <@U024BE7LH>" in str(blocks)


def test_resolved_has_no_buttons() -> None:
    blocks = incident_blocks(state(status=IncidentStatus.RESOLVED, resolved_by="alice"))
    assert buttons(blocks) == {}
    assert "resolved by alice" in str(blocks)


def test_huge_content_stays_within_block_kit_limits() -> None:
    big = state(
        scope="feature:" + "x" * 500,
        summary="y" * 10_000,
        metrics={f"metric_{i}_" + "z" * 40: float(i) for i in range(500)},
    )
    blocks = incident_blocks(big)
    assert block_errors(blocks) == []
    assert len(fallback_text(big)) <= 3000


def test_the_level_and_the_next_deadline_are_shown() -> None:
    from datetime import timedelta

    opened = datetime(2026, 11, 26, 12, tzinfo=UTC)
    blocks = incident_blocks(state(level=2, level_name="L2", ack_by=opened + timedelta(minutes=15)))
    text = str(blocks)
    assert "*Level*\\nL2" in text
    assert "*Next deadline*\\nacknowledged by <!date^" in text
