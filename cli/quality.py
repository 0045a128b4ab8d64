"""`pagerloop quality baseline ...`: quality baselines set by hand, per feature (the seed's
`set_baseline`). The drift rule of a `feature:` scope compares with one while it is set, instead
of the rolling 7 days; `clear` goes back to those."""

from __future__ import annotations

import getpass
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.stores import open_stores
from stores import quality_baselines
from stores.quality_baselines import BaselineRefusedError, StoredBaseline

app = typer.Typer(help="Output quality: the drift rule's baselines.", no_args_is_help=True)
baseline_app = typer.Typer(
    help="Quality baselines set by hand, per feature: the drift rule reads one instead of the "
    "rolling 7 days until it is cleared.",
    no_args_is_help=True,
)
app.add_typer(baseline_app, name="baseline")
out = Console()
err = Console(stderr=True)
_WINDOW = re.compile(r"^(\d+)([hd])$")
_LISTED = 10  # the features named when one is not found
_HINTS = {"feature": "--feature", "mean": "--mean", "stddev": "--stddev", "window": "--from-window"}


def parse_window(text: str) -> timedelta:
    """ "7d", "24h": a whole number of hours or days."""
    match = _WINDOW.match(text.strip())
    if match is None:
        raise typer.BadParameter(
            f"{text!r}: hours or days, like 24h or 7d", param_hint="--from-window"
        )
    amount, unit = int(match.group(1)), match.group(2)
    window = timedelta(hours=amount) if unit == "h" else timedelta(days=amount)
    if not quality_baselines.MIN_WINDOW <= window <= quality_baselines.MAX_WINDOW:
        raise typer.BadParameter(
            f"{text!r}: from 1h to {quality_baselines.MAX_WINDOW.days}d",
            param_hint="--from-window",
        )
    return window


def _measured(feature: str, from_window: str, by: str) -> StoredBaseline:
    """The feature's mean and deviation over the window's scores, set as its baseline."""
    days = parse_window(from_window) / timedelta(days=1)
    engine = open_stores()
    now = datetime.now(UTC)
    measured = quality_baselines.from_window(engine, feature, days, now)
    return quality_baselines.set_baseline(
        engine, feature, measured.mean, measured.stddev, set_by=by, at=now,
        scores=measured.scores, source=f"from the last {from_window.strip()}",
    )  # fmt: skip


def _refused(exc: BaselineRefusedError) -> typer.BadParameter:
    return typer.BadParameter(str(exc), param_hint=_HINTS.get(exc.field, exc.field))


@baseline_app.command("set")
def set_baseline(
    feature: Annotated[str, typer.Option(help="the feature (as the calls name it)")],
    mean: Annotated[float | None, typer.Option(help="the baseline mean score, 0 to 1")] = None,
    stddev: Annotated[
        float | None, typer.Option(help="its standard deviation, above 0 (at most 1)")
    ] = None,
    from_window: Annotated[
        str | None,
        typer.Option(
            "--from-window",
            help="measure mean and deviation once over the last 24h, 7d, ... of scores instead",
        ),
    ] = None,
    author: Annotated[str | None, typer.Option(help="default: your login")] = None,
) -> None:
    """Set a feature's baseline: typed in (--mean, --stddev) or measured (--from-window)."""
    if (mean is not None or stddev is not None) == (from_window is not None):
        raise typer.BadParameter(
            "either --mean and --stddev, or --from-window", param_hint="--mean / --from-window"
        )
    by = author or getpass.getuser()
    try:
        if from_window is not None:
            stored = _measured(feature, from_window, by)
        elif mean is not None and stddev is not None:
            # Refused before the stores are opened: nothing is touched for a bad number.
            quality_baselines.check(feature, mean, stddev)
            stored = quality_baselines.set_baseline(
                open_stores(), feature, mean, stddev, set_by=by, at=datetime.now(UTC)
            )
        else:
            raise typer.BadParameter(
                "a typed baseline needs --mean and --stddev",
                param_hint="--stddev" if mean is not None else "--mean",
            )
    except BaselineRefusedError as exc:
        raise _refused(exc) from None
    scores = f" from {stored.scores} scores" if stored.scores is not None else ""
    out.print(
        f"feature {stored.feature}: baseline {stored.mean:.3f} ± {stored.stddev:.3f}{scores} "
        f"({stored.source}); the drift rule reads it until `pagerloop quality baseline clear "
        f"--feature {stored.feature}`"
    )


def _table(found: list[StoredBaseline]) -> Table:
    table = Table("feature", "mean", "stddev", "scores", "source", "set by", "set at")
    for b in found:
        table.add_row(
            b.feature,
            f"{b.mean:.3f}",
            f"{b.stddev:.3f}",
            "-" if b.scores is None else str(b.scores),
            b.source,
            b.set_by,
            f"{b.set_at:%Y-%m-%d %H:%M} UTC",
        )
    return table


@baseline_app.command("show")
def show(
    feature: Annotated[str | None, typer.Option(help="one feature (default: all set)")] = None,
) -> None:
    """The baselines set by hand (the other features' drift reads the rolling 7 days)."""
    engine = open_stores()
    if feature is None:
        found = quality_baselines.listed(engine)
        out.print(_table(found) if found else "no baselines set: drift reads the rolling 7 days")
        return
    one = quality_baselines.get(engine, feature)
    if one is None:
        out.print(f"feature {feature}: no baseline set, drift reads the rolling 7 days")
        return
    out.print(_table([one]))


@baseline_app.command("clear")
def clear(
    feature: Annotated[str, typer.Option(help="the feature whose baseline to clear")],
) -> None:
    """Back to the rolling 7-day baseline for the feature."""
    engine = open_stores()
    if not quality_baselines.clear(engine, feature):
        known = [b.feature for b in quality_baselines.listed(engine)]
        shown = ", ".join(known[:_LISTED]) + (", ..." if len(known) > _LISTED else "")
        others = f"; set for: {shown}" if known else "; none is set"
        err.print(f"[red]feature {feature}: no baseline set{others}[/red]")
        raise typer.Exit(1)
    out.print(f"feature {feature}: baseline cleared, drift reads the rolling 7 days again")
