"""Plotly figures of the run report (issue #5): counts, shares, amounts and dates, never identifiers.

Each function takes the run's ``summary.json`` or the flattened outbox frames of
``etl.quality_frames.conversion_frames`` and returns a ``plotly.graph_objects.Figure``; ``etl.report``
lays them out and inlines plotly.js once, so the page needs no network.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

DESTINATION_LABELS = {"google_conversions": "Google Ads", "meta_events": "Meta"}
STAGE_COLORS = {"consultation": "#4c78a8", "purchase": "#f58518"}
DEST_COLORS = {"Google Ads": "#4285f4", "Meta": "#7b5cd6"}
# SPEC section 4 reasons in rule order, with what each one counts
DROP_LEVELS = {
    "test_record": "visits and leads", "not_attended": "visits", "no_lead": "visits",
    "outside_window": "visits", "duplicate_in_journey": "visits", "existing_patient": "conversions",
    "no_revenue": "conversions", "consent_revoked": "conversions", "no_consent": "conversions",
    "no_identifiers": "conversions", "too_old_for_google": "destination rows",
    "too_old_for_meta": "destination rows", "already_sent": "destination rows",
}  # fmt: skip
LEVEL_COLORS = {"visits and leads": "#9ecae9", "visits": "#4c78a8", "conversions": "#f58518",
                "destination rows": "#b279a2"}  # fmt: skip
_CONVERSION_DROPS = ("existing_patient", "no_revenue", "consent_revoked", "no_consent", "no_identifiers")


def _layout(fig: go.Figure, title: str, height: int = 380) -> go.Figure:
    fig.update_layout(title=title, height=height, template="plotly_white", margin={"l": 60, "r": 20, "t": 60, "b": 50},
                      legend={"orientation": "h", "y": -0.15})  # fmt: skip
    return fig


def conversion_funnel(summary: dict[str, Any]) -> go.Figure:
    """Conversion candidates -> kept by the rules -> already sent or planned, sent, accepted,
    per destination (a rerun of an interval plans none of what its first run sent)."""
    kept = sum(int(v) for v in summary.get("stages", {}).values())
    drops = summary.get("drops", {})
    candidates = kept + sum(int(drops.get(r, 0)) for r in _CONVERSION_DROPS)
    steps = ["conversion candidates", "kept after rules", "already sent (earlier runs)", "planned (new)",
             "sent", "accepted"]  # fmt: skip
    fig = go.Figure()
    for dest, label in DESTINATION_LABELS.items():
        counts = summary.get("destinations", {}).get(dest)
        if counts is None:
            continue
        values = [
            candidates,
            kept,
            counts.get("already_sent", 0) - counts.get("already_sent_at_upload", 0),
            counts.get("planned", 0),
            counts.get("sent", 0),
            counts.get("accepted", 0),
        ]
        fig.add_trace(go.Bar(name=label, y=steps, x=values, orientation="h", text=values, textposition="auto",
                             marker={"color": DEST_COLORS[label]}))  # fmt: skip
    fig.update_layout(barmode="group", xaxis_title="conversions")
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, "Conversions through the rules, per destination", 460)


def drop_reasons(summary: dict[str, Any]) -> go.Figure:
    """Every drop reason in rule order, coloured by what it counts (visits, conversions, rows)."""
    drops = summary.get("drops", {})
    reasons = [r for r in DROP_LEVELS if r in drops]
    fig = go.Figure()
    for level, color in LEVEL_COLORS.items():
        mine = [r for r in reasons if DROP_LEVELS[r] == level]
        fig.add_trace(go.Bar(name=level, y=mine, x=[int(drops[r]) for r in mine], orientation="h",
                             marker={"color": color}, text=[int(drops[r]) for r in mine],
                             textposition="auto"))  # fmt: skip
    fig.update_yaxes(categoryorder="array", categoryarray=list(reversed(reasons)))
    return _layout(fig, "Drop reasons (SPEC section 4, in rule order)", 460)


def conversions_per_day(conversions: pd.DataFrame) -> go.Figure:
    """Stacked bars of conversions per clinic-local day, one panel per destination."""
    labels = [d for d in DESTINATION_LABELS.values() if d in set(conversions["destination"])] or [
        "Google Ads"
    ]
    fig = make_subplots(rows=len(labels), cols=1, shared_xaxes=True, subplot_titles=labels,
                        vertical_spacing=0.12)  # fmt: skip
    for i, label in enumerate(labels, start=1):
        mine = conversions[conversions["destination"] == label]
        for stage, color in STAGE_COLORS.items():
            per_day = mine[mine["stage"] == stage].groupby("day").size()
            fig.add_trace(go.Bar(name=stage, x=list(per_day.index), y=per_day.to_numpy(), marker={"color": color},
                                 legendgroup=stage, showlegend=i == 1), row=i, col=1)  # fmt: skip
    fig.update_layout(barmode="stack")
    return _layout(fig, "Conversions per day by stage and destination", 260 * len(labels) + 80)


def value_distribution(conversions: pd.DataFrame) -> go.Figure:
    """Histogram of conversion values (purchases carry the revenue) per destination."""
    fig = go.Figure()
    valued = conversions[conversions["value"].notna()]
    for label, color in DEST_COLORS.items():
        mine = valued[valued["destination"] == label]
        if len(mine):
            fig.add_trace(go.Histogram(name=label, x=mine["value"].to_numpy(), nbinsx=30, opacity=0.65,
                                       marker={"color": color}))  # fmt: skip
    fig.update_layout(barmode="overlay", xaxis_title="value", yaxis_title="conversions")
    return _layout(fig, "Conversion value distribution")


def identifier_coverage(conversions: pd.DataFrame) -> go.Figure:
    """Share of each destination's rows carrying email, phone, click ID: the match-rate drivers."""
    fig = go.Figure()
    keys = {"email": "has_email", "phone": "has_phone", "click ID": "has_click"}
    for label, color in DEST_COLORS.items():
        mine = conversions[conversions["destination"] == label]
        if not len(mine):
            continue
        shares = [float(mine[col].mean()) for col in keys.values()]
        fig.add_trace(go.Bar(name=label, x=list(keys), y=shares, marker={"color": color},
                             text=[f"{s:.0%}" for s in shares], textposition="outside"))  # fmt: skip
    fig.update_layout(barmode="group", yaxis={"tickformat": ".0%", "range": [0, 1.1]})
    return _layout(fig, "Identifier coverage per destination")


def quality_overview(results: list[Any]) -> go.Figure:
    """Checks per suite: passed, failed warnings, failed critical."""
    frame = pd.DataFrame([{"suite": r.suite, "outcome": _outcome(r)} for r in results],
                         columns=["suite", "outcome"])  # fmt: skip
    fig = go.Figure()
    colors = {"passed": "#54a24b", "warning": "#eeca3b", "critical failure": "#e45756"}
    suites = list(dict.fromkeys(frame["suite"]))
    for outcome, color in colors.items():
        counts = frame[frame["outcome"] == outcome].groupby("suite").size().reindex(suites, fill_value=0)
        fig.add_trace(
            go.Bar(name=outcome, y=suites, x=counts.to_numpy(), orientation="h", marker={"color": color})
        )
    fig.update_layout(barmode="stack", xaxis_title="checks")
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, "Data-quality checks per suite", 120 + 34 * max(len(suites), 1))


def _outcome(result: Any) -> str:
    if result.success:
        return "passed"
    return "critical failure" if result.severity == "critical" else "warning"


def upload_outcomes(summary: dict[str, Any]) -> go.Figure:
    """Per conversion destination, each conversion once: accepted, rejected, deferred, already
    sent (left out while planning, or found final at upload), not attempted (a dry run, or rows a
    stop left planned)."""
    fig = go.Figure()
    outcomes = {"accepted": "#54a24b", "rejected": "#e45756", "deferred": "#eeca3b",
                "already_sent": "#bab0ac", "not attempted (dry run or planned)": "#9ecae9"}  # fmt: skip
    dests = [d for d in DESTINATION_LABELS if d in summary.get("destinations", {})]
    for outcome, color in outcomes.items():
        values = []
        for dest in dests:
            counts = summary["destinations"][dest]
            if outcome.startswith("not attempted"):
                decided = sum(int(counts.get(k, 0)) for k in ("accepted", "rejected", "deferred"))
                decided += int(counts.get("already_sent_at_upload", 0))
                values.append(max(int(counts.get("planned", 0)) - decided, 0))
            else:
                values.append(int(counts.get(outcome, 0)))
        fig.add_trace(go.Bar(name=outcome, y=[DESTINATION_LABELS[d] for d in dests], x=values, orientation="h",
                             marker={"color": color}))  # fmt: skip
    fig.update_layout(barmode="stack", xaxis_title="conversions")
    return _layout(fig, "Upload outcomes", 300)
