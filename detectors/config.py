"""The detector's rules: the seed's defaults, overridable with `PAGERLOOP_RULES_FILE` (TOML).

scopes = ["global", "model", "feature"]   # which scopes are evaluated
for_evaluations = 2                       # defaults for every rule
recover_evaluations = 3

[tpm_quota]                               # tokens per minute, per model ("*": global)
"gpt-4.1" = 2_000_000

[rpm_quota]                               # requests per minute, per model ("*": global)
"gpt-4.1" = 10_000

[rules.error_rate]                        # any field of a rule; names as in DEFAULT_RULES
warning = 0.03
critical = 0.08
min_samples = 50
critical_severity = "SEV1"
window_seconds = 300                      # whole minutes, 60..3600; 0: the detector's
include_rate_limited = true               # error_rate only: count 429s too (every non-200)
runbook_url = "https://wiki.example.com/runbooks/error-rate"  # linked before the runbook's page
cooldown_seconds = 600                    # reopen its resolved incident this soon after (0: never)

[rules.budget_runway]                     # hours until the daily budget runs out
warning = 12

[rules.quality_drift]
enabled = false

# Each [[relations]] adds to the built-in ones (README "One problem, one incident");
# `default_relations = false`, at the top beside `scopes`, drops those.
[[relations]]
source = "api_outage"
targets = ["quality_degradation"]
mutual = false                            # true: either way, the one open first takes in
across_scopes = true                      # false: the same scope only
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, UrlConstraints, field_validator

from config.tomlfile import read_toml
from detectors.correlation import DEFAULT_RELATIONS, Relation
from detectors.rules import DEFAULT_RULES, Rule
from domain.incident import Severity, Trigger

ScopeKind = Literal["global", "model", "feature"]


class RulesFileError(ValueError):
    pass


# A rule's window: whole minutes, which are what the rollups count (a 90 s window would count
# 2 or 3 minutes of them depending on the second it is read at, and be reported as 90 s); an
# hour at most (the rows one evaluation reads). At most MAX_RULE_WINDOWS distinct ones (besides
# the detector's): each is one more set of sums in the detector's activity result, which must
# stay below 2 MB.
MIN_WINDOW_SECONDS = 60
MAX_WINDOW_SECONDS = 3600
MAX_RULE_WINDOWS = 4
# A day: a breach later than that after the resolve is a new problem, not the same one back.
MAX_COOLDOWN_SECONDS = 86_400
# A rule's runbook_url: what every channel can carry (email's links stop at 2,000 characters).
RUNBOOK_URL_MAX = 2000


class RuleOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")

    warning: float | None = None
    critical: float | None = None
    warning_severity: Severity | None = None
    critical_severity: Severity | None = None
    min_samples: int | None = Field(default=None, ge=0)
    for_evaluations: int | None = Field(default=None, ge=1)
    recover_evaluations: int | None = Field(default=None, ge=1)
    hysteresis: float | None = Field(default=None, ge=0, lt=1)
    scopes: list[ScopeKind] | None = None
    enabled: bool | None = None
    window_seconds: int | None = Field(default=None, ge=0, le=MAX_WINDOW_SECONDS)
    cooldown_seconds: int | None = Field(default=None, ge=0, le=MAX_COOLDOWN_SECONDS)
    # error_rate only: read every non-200, 429s too (the seed's error rate), not just failures.
    include_rate_limited: bool | None = None
    # Absolute http(s) only: it becomes a link in Slack, PagerDuty, Jira, email and the page.
    runbook_url: Annotated[AnyHttpUrl, UrlConstraints(max_length=RUNBOOK_URL_MAX)] | None = None

    @field_validator("window_seconds")
    @classmethod
    def _whole_minutes_or_the_detectors(cls, value: int | None) -> int | None:
        if value is not None and value != 0 and (value < MIN_WINDOW_SECONDS or value % 60):
            raise ValueError(
                f"{value} s is not a window: 0 (the detector's window) or whole minutes, a "
                f"multiple of 60 from {MIN_WINDOW_SECONDS} to {MAX_WINDOW_SECONDS}"
            )
        return value


class RelationEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Trigger
    targets: list[Trigger] = Field(min_length=1)
    mutual: bool = False
    across_scopes: bool = True

    def relation(self) -> Relation:
        return Relation(self.source, tuple(self.targets), self.mutual, self.across_scopes)


class RulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scopes: list[ScopeKind] = ["global", "model", "feature"]
    for_evaluations: int | None = Field(default=None, ge=1)
    recover_evaluations: int | None = Field(default=None, ge=1)
    tpm_quota: dict[str, int] = {}
    rpm_quota: dict[str, int] = {}
    rules: dict[str, RuleOverride] = {}
    default_relations: bool = True
    relations: list[RelationEntry] = []


@dataclass(frozen=True)
class DetectorRules:
    rules: tuple[Rule, ...] = DEFAULT_RULES
    scopes: tuple[str, ...] = ("global", "model", "feature")
    tpm_quota: dict[str, int] = field(default_factory=dict)
    relations: tuple[Relation, ...] = DEFAULT_RELATIONS
    rpm_quota: dict[str, int] = field(default_factory=dict)

    def quota_for(self, scope: str) -> float | None:
        """The tokens per minute allowed to the scope; None: no quota there."""
        return _quota(self.tpm_quota, scope)

    def request_quota_for(self, scope: str) -> float | None:
        """The requests per minute allowed to the scope; None: no quota there."""
        return _quota(self.rpm_quota, scope)


def _quota(quotas: dict[str, int], scope: str) -> float | None:
    """A quota is the account's, per model ("*": all of them, on global); features have none."""
    if scope == "global":
        return quotas.get("*")
    kind, _, name = scope.partition(":")
    return quotas.get(name) if kind == "model" else None


# The error_rate rule's signal with `include_rate_limited = true`: every non-200, 429s too.
NON_200_SIGNAL = "non_200_rate"


def apply(parsed: RulesFile) -> DetectorRules:
    known = {rule.name: rule for rule in DEFAULT_RULES}
    unknown = sorted(set(parsed.rules) - known.keys())
    if unknown:
        raise RulesFileError(f"unknown rules {unknown}; the rules are {sorted(known)}")
    rules = []
    for rule in DEFAULT_RULES:
        defaults = {
            "for_evaluations": parsed.for_evaluations,
            "recover_evaluations": parsed.recover_evaluations,
        }
        changes: dict[str, Any] = {k: v for k, v in defaults.items() if v is not None}
        override = parsed.rules.get(rule.name)
        if override is not None:
            changes |= override.model_dump(exclude_unset=True)
        if "scopes" in changes:
            changes["scopes"] = tuple(changes["scopes"])
        if changes.get("window_seconds") == 0:
            changes["window_seconds"] = None  # the detector's
        if "include_rate_limited" in changes:
            changes |= _rate_limited(rule, changes.pop("include_rate_limited"))
        if changes.get("runbook_url") is not None:
            changes["runbook_url"] = str(changes["runbook_url"])  # plain data for Temporal
        rule = replace(rule, **changes)
        if rule.warning is None and rule.critical is None:
            raise RulesFileError(f"rules.{rule.name}: needs a warning or a critical threshold")
        rules.append(rule)
    windows = sorted({r.window_seconds for r in rules if r.enabled and r.window_seconds})
    if len(windows) > MAX_RULE_WINDOWS:
        raise RulesFileError(
            f"rules: at most {MAX_RULE_WINDOWS} distinct window_seconds besides the detector's, "
            f"not {len(windows)} ({', '.join(map(str, windows))})"
        )
    relations = DEFAULT_RELATIONS if parsed.default_relations else ()
    relations += tuple(entry.relation() for entry in parsed.relations)
    _check_relations(relations)
    return DetectorRules(
        tuple(rules),
        tuple(parsed.scopes),
        dict(parsed.tpm_quota),
        tuple(relations),
        rpm_quota=dict(parsed.rpm_quota),
    )


def _rate_limited(rule: Rule, include: bool | None) -> dict[str, Any]:
    """`include_rate_limited`: the error rate counts 429s too, or not (the default: they are
    the rate_limit rule's). Only the error rate has 429s to count or leave out."""
    if rule.name != "error_rate":
        raise RulesFileError(
            f"rules.{rule.name}.include_rate_limited: only rules.error_rate takes it (whether "
            "the error rate counts 429s too)"
        )
    return {"signal": NON_200_SIGNAL} if include else {}


def _check_relations(relations: tuple[Relation, ...]) -> None:
    """No trigger takes in itself, through any chain of relations: a cycle would hide every
    trigger on it (a mutual relation is one pair, declared once)."""
    edges: dict[str, set[str]] = {}
    for relation in relations:
        if relation.source in relation.targets:
            raise RulesFileError(f"relations: {relation.source} cannot take in itself")
        edges.setdefault(relation.source, set()).update(relation.targets)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for step in edges.get(start, ()):
            if step == goal or (step not in seen and reaches(step, goal, seen | {step})):
                return True
        return False

    for source, targets in edges.items():
        for target in targets:
            if reaches(target, source, {target}):
                raise RulesFileError(
                    f"relations: {source} and {target} take each other in (a cycle); "
                    "declare one mutual relation instead"
                )


def load_rules(path: Path | None) -> DetectorRules:
    if path is None:
        return DetectorRules()
    parsed = read_toml(path, RulesFile, "PAGERLOOP_RULES_FILE", RulesFileError)
    return apply(parsed)
