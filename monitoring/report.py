"""Evidently HTML drift report for humans, next to the `drift.detect` verdict that machines act on.

The report covers the numeric monitor columns (the logit stats, `embedding_max_cos` and `embedding_novelty`); the HTML
is self-contained (scripts and fonts inlined), so it opens offline. Evidently's own per-column thresholds are its
defaults (no multiplicity correction), so its flags can disagree with the decision: given `decision`, the report
opens with the product's own verdict (`drift.detect`'s tests, statistics, p-values, Holm thresholds), the version and
the window's size and time range, which is what the monitors acted on.

    write_evidently_report(reference_df, current_df, Path("work/reports/drift.html"))
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import pandas as pd

from common.atomic import write_text
from monitoring.drift import DRIFT_TESTS

REPORT_COLUMNS = tuple(DRIFT_TESTS)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def decision_html(decision: dict) -> str:
    """An HTML block with the adapterops verdict: `decision` = DriftResult.as_dict() plus optional "version",
    "window" ({"n", "first_ts", "last_ts", "first_id", "last_id"}) and "config" (DriftConfig.as_dict())."""
    window = decision.get("window") or {}
    import datetime as dt

    def ts(v):
        return "-" if v is None else dt.datetime.fromtimestamp(float(v), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")

    rows = "".join(
        f"<tr><td>{_fmt(t.get('name'))}</td><td>{_fmt(t.get('statistic'))}</td><td>{_fmt(t.get('p_value'))}</td>"
        f"<td>{_fmt(t.get('threshold'))}</td><td>{'FIRED' if t.get('fired') else 'no'}</td>"
        f"<td>{_fmt(t.get('n_reference'))}</td><td>{_fmt(t.get('n_current'))}</td><td>{_fmt(t.get('note'))}</td></tr>"
        for t in decision.get("tests", []))
    cfg = decision.get("config") or {}
    return (
        '<section id="adapterops-decision" style="font-family:sans-serif;margin:1em;padding:1em;'
        'border:2px solid #444">'
        f"<h2>adapterops decision: {_fmt(decision.get('status'))}</h2>"
        f"<p>{_fmt(decision.get('reason'))}</p>"
        f"<p>version: {_fmt(decision.get('version'))}; window: {_fmt(window.get('n'))} requests, "
        f"{ts(window.get('first_ts'))} to {ts(window.get('last_ts'))} (log ids {_fmt(window.get('first_id'))}.."
        f"{_fmt(window.get('last_id'))}); family-wise alpha {_fmt(cfg.get('alpha'))}, min_window "
        f"{_fmt(cfg.get('min_window'))}</p>"
        "<table border=1 cellpadding=4><tr><th>test</th><th>statistic</th><th>p-value</th><th>Holm threshold</th>"
        f"<th>fired</th><th>n reference</th><th>n window</th><th>note</th></tr>{rows}</table>"
        "<p>This verdict is the one the monitors act on. Evidently's per-column flags below use its own default "
        "tests and thresholds, one column at a time without multiplicity correction, so they can disagree.</p>"
        "</section>")


def report_columns(reference: pd.DataFrame, current: pd.DataFrame) -> list[str]:
    """The monitor columns that are numeric and have values in both frames."""
    cols = []
    for c in REPORT_COLUMNS:
        if c in reference.columns and c in current.columns:
            ref, cur = pd.to_numeric(reference[c], errors="coerce"), pd.to_numeric(current[c], errors="coerce")
            if ref.notna().any() and cur.notna().any():
                cols.append(c)
    return cols


def write_evidently_report(reference: pd.DataFrame, current: pd.DataFrame, path: Path,
                           title: str = "adapterops drift report", decision: dict | None = None) -> Path:
    """Write an Evidently data-drift HTML report (DataDriftPreset over the monitor columns) to `path`; with
    `decision` (see `decision_html`) the product's own verdict heads the page."""
    cols = report_columns(reference, current)
    if not cols:
        raise ValueError(f"no numeric monitor columns with values in both frames; expected some of "
                         f"{list(REPORT_COLUMNS)}, reference has {list(reference.columns)}, current has "
                         f"{list(current.columns)}")
    os.environ.setdefault("DO_NOT_TRACK", "1")  # Evidently's usage telemetry; the report needs no network
    from evidently import DataDefinition, Dataset, Report
    from evidently import __version__ as evidently_version
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=cols)

    def dataset(df: pd.DataFrame) -> Dataset:
        frame = df[cols].apply(pd.to_numeric, errors="coerce").astype("float64")
        return Dataset.from_pandas(frame, data_definition=definition)

    snapshot = Report([DataDriftPreset(columns=cols)]).run(dataset(current), dataset(reference), name=title)
    page = snapshot.get_html_str(as_iframe=False)
    # Evidently's page has no <title>; add one, and say what made it.
    head = (f"<head>\n<title>{html.escape(title)}</title>\n"
            f'<meta name="generator" content="Evidently {html.escape(evidently_version)} (adapterops monitoring)">')
    page = page.replace("<head>", head, 1)
    if decision is not None:
        page = page.replace("<body>", "<body>\n" + decision_html(decision), 1) if "<body>" in page else \
            decision_html(decision) + page

    return write_text(path, page)
