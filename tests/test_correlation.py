"""One problem, one incident: the relations between triggers and what they decide (pure), and
the rules file's section."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from detectors.config import RulesFileError, load_rules
from detectors.correlation import (
    DEFAULT_RELATIONS,
    LEGACY_RELATIONS,
    Key,
    Relation,
    Routing,
    covers,
    hidden,
    route,
    takes_in,
)
from domain.incident import Trigger

T = Trigger
OUTAGE: Key = (T.API_OUTAGE, "global")
ERRORS: Key = (T.ERROR_RATE, "global")
ERRORS_MINI: Key = (T.ERROR_RATE, "model:gpt-4.1-mini")
OUTAGE_MINI: Key = (T.API_OUTAGE, "model:gpt-4.1-mini")
SLOW: Key = (T.ELEVATED_LATENCY, "global")
SLOW_SEARCH: Key = (T.ELEVATED_LATENCY, "feature:search")
BUDGET: Key = (T.BUDGET_EXHAUSTION, "global")
COST: Key = (T.COST_SPIKE, "global")
COST_SUMMARIES: Key = (T.COST_SPIKE, "feature:summaries")
LIMITS: Key = (T.RATE_LIMIT_EXHAUSTION, "model:gpt-4.1")
QUOTA: Key = (T.TOKEN_QUOTA, "model:gpt-4.1")
QUOTA_GLOBAL: Key = (T.TOKEN_QUOTA, "global")
QUALITY: Key = (T.QUALITY_DEGRADATION, "global")


@pytest.mark.parametrize(
    ("source", "target", "expected"),
    [
        (OUTAGE, ERRORS, True),
        (OUTAGE, SLOW, True),
        (OUTAGE, ERRORS_MINI, True),  # global covers every model
        (OUTAGE, SLOW_SEARCH, True),  # and every feature
        (OUTAGE_MINI, ERRORS_MINI, True),
        (OUTAGE_MINI, ERRORS, False),  # a model does not cover global
        (OUTAGE_MINI, (T.ERROR_RATE, "model:o3"), False),  # nor another model
        (ERRORS, OUTAGE, False),  # not the other way round
        (BUDGET, COST, True),
        (BUDGET, COST_SUMMARIES, True),
        (COST, BUDGET, False),
        ((T.RATE_LIMIT_EXHAUSTION, "global"), ERRORS, True),
        (LIMITS, QUOTA, True),
        (QUOTA, LIMITS, True),  # mutual: one problem either way
        (QUOTA_GLOBAL, LIMITS, True),
        (LIMITS, QUOTA_GLOBAL, False),  # a model does not cover global, mutual or not
        (ERRORS, ERRORS_MINI, True),  # one trigger: global covers its narrower scopes
        (ERRORS_MINI, ERRORS, False),
        (ERRORS, ERRORS, False),
        (OUTAGE, QUALITY, False),  # unrelated
        (BUDGET, ERRORS, False),
    ],
)
def test_which_problem_covers_which(source: Key, target: Key, expected: bool) -> None:
    assert covers(DEFAULT_RELATIONS, source, target) is expected


@pytest.mark.parametrize(
    ("source", "target", "open_keys", "expected"),
    [
        (LIMITS, QUOTA, [], True),  # neither open: the declared source
        (QUOTA, LIMITS, [], False),
        (QUOTA, LIMITS, [QUOTA], True),  # the one open first takes the other in
        (LIMITS, QUOTA, [QUOTA], False),
        (LIMITS, QUOTA, [QUOTA, LIMITS], True),  # both open: the declared source
        (OUTAGE, ERRORS, [ERRORS], True),  # not mutual: being open first changes nothing
        (ERRORS, OUTAGE, [ERRORS], False),
    ],
)
def test_a_mutual_pair_goes_to_the_one_open_first(
    source: Key, target: Key, open_keys: list[Key], expected: bool
) -> None:
    assert takes_in(DEFAULT_RELATIONS, source, target, open_keys) is expected


@pytest.mark.parametrize(
    ("firing", "expected"),
    [
        ([OUTAGE, ERRORS], {ERRORS}),
        ([OUTAGE, ERRORS, SLOW, QUALITY], {ERRORS, SLOW}),
        ([OUTAGE, ERRORS_MINI], {ERRORS_MINI}),
        ([OUTAGE_MINI, ERRORS], set()),
        ([BUDGET, COST, COST_SUMMARIES], {COST, COST_SUMMARIES}),
        ([LIMITS, QUOTA], {QUOTA}),
        # one trigger on several scopes is left to the evaluation (global minus the rest)
        ([ERRORS, ERRORS_MINI], set()),
        ([QUALITY, COST], set()),
    ],
)
def test_targets_firing_with_their_source_are_hidden(firing: list[Key], expected: set[Key]) -> None:
    assert hidden(DEFAULT_RELATIONS, firing) == expected


@pytest.mark.parametrize(
    ("firing", "pending", "expected"),
    [
        ([ERRORS], [OUTAGE], {ERRORS}),  # the outage is about to fire: no page for its errors
        ([ERRORS_MINI, OUTAGE_MINI], [OUTAGE], {ERRORS_MINI, OUTAGE_MINI}),
        ([(T.API_OUTAGE, "feature:search")], [OUTAGE], {(T.API_OUTAGE, "feature:search")}),
        ([ERRORS], [OUTAGE_MINI], set()),  # a model does not cover global
        ([OUTAGE], [ERRORS], set()),  # a pending target holds nothing back
        ([QUOTA], [LIMITS], {QUOTA}),  # the declared source of a mutual pair
        ([LIMITS], [QUOTA], set()),
    ],
)
def test_a_target_waits_while_its_source_is_pending(
    firing: list[Key], pending: list[Key], expected: set[Key]
) -> None:
    assert hidden(DEFAULT_RELATIONS, firing, pending) == expected


def test_a_source_hidden_as_another_scopes_problem_hides_nothing() -> None:
    """The outage on global is gpt-4.1-mini's alone (the evaluation hid it): the error rate of
    o3 is a problem of its own."""
    errors_o3: Key = (T.ERROR_RATE, "model:o3")
    firing = [OUTAGE, OUTAGE_MINI, errors_o3]
    assert hidden(DEFAULT_RELATIONS, firing) == {errors_o3}
    assert hidden(DEFAULT_RELATIONS, firing, sources=[OUTAGE_MINI, errors_o3]) == set()


def test_the_legacy_relations_hide_error_rate_on_the_outage_scope_only() -> None:
    assert hidden(LEGACY_RELATIONS, [OUTAGE, ERRORS, SLOW]) == {ERRORS}
    assert hidden(LEGACY_RELATIONS, [OUTAGE, ERRORS_MINI]) == set()


@pytest.mark.parametrize(
    ("name", "firing", "open_keys", "expected"),
    [
        (
            "nothing open: each its own",
            [OUTAGE, QUALITY],
            [],
            Routing(absorbs={OUTAGE: (), QUALITY: ()}),
        ),
        (
            "a source fires while its target is open: merged into the source",
            [OUTAGE],
            [ERRORS],
            Routing(absorbs={OUTAGE: (ERRORS,)}),
        ),
        (
            "the target still fires then: the same, nothing of its own reported",
            [OUTAGE, ERRORS],
            [ERRORS],
            Routing(absorbs={OUTAGE: (ERRORS,)}, held=(ERRORS,)),
        ),
        (
            "a target fires while its source is open: it joins the source",
            [ERRORS, OUTAGE],
            [OUTAGE],
            Routing(joins={ERRORS: OUTAGE}, absorbs={OUTAGE: ()}),
        ),
        (
            "a target fires while only its source's incident is open (source quiet)",
            [ERRORS_MINI],
            [OUTAGE],
            Routing(joins={ERRORS_MINI: OUTAGE}),
        ),
        (
            "several targets, several scopes, one outage",
            [OUTAGE],
            [ERRORS, ERRORS_MINI, SLOW_SEARCH, QUALITY],
            Routing(absorbs={OUTAGE: (SLOW_SEARCH, ERRORS, ERRORS_MINI)}),
        ),
        (
            "a cost spike that becomes a budget exhaustion",
            [BUDGET, COST],
            [COST],
            Routing(absorbs={BUDGET: (COST,)}, held=(COST,)),
        ),
        (
            "a global incident opens while per-model ones of the trigger are open",
            [ERRORS],
            [ERRORS_MINI],
            Routing(absorbs={ERRORS: (ERRORS_MINI,)}),
        ),
        (
            "a model fires while the global incident of its trigger is open",
            [ERRORS_MINI],
            [ERRORS],
            Routing(joins={ERRORS_MINI: ERRORS}),
        ),
        (
            "chains go to the widest: a model's error rate under a global error rate "
            "under the outage",
            [OUTAGE],
            [ERRORS, ERRORS_MINI],
            Routing(absorbs={OUTAGE: (ERRORS, ERRORS_MINI)}),
        ),
        (
            "rate limits fire while the quota incident is open: they join it",
            [LIMITS],
            [QUOTA],
            Routing(joins={LIMITS: QUOTA}),
        ),
        (
            "the quota fires while the rate-limit incident is open: it joins that",
            [QUOTA],
            [LIMITS],
            Routing(joins={QUOTA: LIMITS}),
        ),
        (
            "a source on a model leaves the global target alone",
            [OUTAGE_MINI],
            [ERRORS],
            Routing(absorbs={OUTAGE_MINI: ()}),
        ),
        (
            "an open source that is not firing takes in a target firing, not one quiet",
            [ERRORS],
            [OUTAGE, SLOW],
            Routing(joins={ERRORS: OUTAGE}),
        ),
    ],
)
def test_routing(name: str, firing: list[Key], open_keys: list[Key], expected: Routing) -> None:
    assert route(DEFAULT_RELATIONS, firing, set(open_keys)) == expected, name


def test_without_relations_only_scopes_of_one_trigger_are_one_problem() -> None:
    assert route((), [OUTAGE], {ERRORS}) == Routing(absorbs={OUTAGE: ()})
    assert route((), [ERRORS], {ERRORS_MINI}) == Routing(absorbs={ERRORS: (ERRORS_MINI,)})


def test_the_rules_file_adds_relations_or_replaces_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        '[[relations]]\nsource = "api_outage"\ntargets = ["quality_degradation"]\n'
        "across_scopes = false\n"
    )
    added = load_rules(path).relations
    assert added[: len(DEFAULT_RELATIONS)] == DEFAULT_RELATIONS
    assert added[-1] == Relation(T.API_OUTAGE, (T.QUALITY_DEGRADATION,), across_scopes=False)
    assert covers(added, OUTAGE, QUALITY)
    assert not covers(added, OUTAGE, (T.QUALITY_DEGRADATION, "model:gpt-4.1"))

    path.write_text(
        'default_relations = false\n[[relations]]\nsource = "cost_spike"\n'
        'targets = ["budget_exhaustion"]\nmutual = true\n'
    )
    only = load_rules(path).relations
    assert only == (Relation(T.COST_SPIKE, (T.BUDGET_EXHAUSTION,), mutual=True),)
    assert not covers(only, OUTAGE, ERRORS)


@pytest.mark.parametrize(
    "relations",
    [
        '[[relations]]\nsource = "error_rate"\ntargets = ["api_outage"]\n',  # the default's back
        '[[relations]]\nsource = "cost_spike"\ntargets = ["quality_degradation"]\n'
        '[[relations]]\nsource = "quality_degradation"\ntargets = ["budget_exhaustion"]\n',
    ],
    ids=["two", "three"],
)
def test_relations_that_come_back_to_their_start_are_refused(
    tmp_path: Path, relations: str
) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(relations)
    with pytest.raises(RulesFileError, match="a cycle"):
        load_rules(path)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[[relations]]\nsource = "outage"\ntargets = ["error_rate"]\n', "relations.0.source"),
        ('[[relations]]\nsource = "api_outage"\ntargets = []\n', "relations.0.targets"),
        ('[[relations]]\nsource = "api_outage"\ntargets = ["api_outage"]\n', "itself"),
        ('[[relations]]\nsource = "api_outage"\ntarget = ["error_rate"]\n', "relations.0"),
    ],
)
def test_a_bad_relation_is_refused_with_its_field(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(RulesFileError, match=named.replace(".", r"\.")):
        load_rules(path)


def test_the_readme_table_lists_the_built_in_relations() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### One problem, one incident", 1)[1].split("\nWhat they do", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert "| any trigger on `global` | the same trigger on a model or feature |" in section
    for relation, row in zip(DEFAULT_RELATIONS, rows, strict=True):
        source, targets = row.split("|")[1:3]
        assert f"`{relation.source}`" in source
        assert {f"`{t}`" for t in relation.targets} == set(re.findall(r"`\w+`", targets))
        assert ("either way" in row) is relation.mutual
