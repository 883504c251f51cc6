"""Evidently HTML drift report for humans, next to the `drift.detect` verdict that machines act on.

The report covers the numeric monitor columns (the logit stats and `embedding_max_cos`); the HTML is self-contained
(scripts and fonts inlined), so it opens offline. Evidently's own per-column thresholds are its defaults: read the
report for the picture, and `drift.detect` for the decision.

    write_evidently_report(reference_df, current_df, Path("work/reports/drift.html"))
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import pandas as pd

from monitoring.drift import EMBEDDING_STAT
from monitoring.logit_stats import REQUEST_STATS

REPORT_COLUMNS = REQUEST_STATS + (EMBEDDING_STAT,)


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
                           title: str = "adapterops drift report") -> Path:
    """Write an Evidently data-drift HTML report (DataDriftPreset over the monitor columns) to `path`."""
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

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
