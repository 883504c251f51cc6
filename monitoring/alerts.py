"""Alerts and where they go: the log, a JSON-lines file, a webhook.

A sink has one method, `send(alert)`, which raises when delivery failed. `dispatch` sends to every sink and turns
failures into returned messages, so that a dead webhook never breaks the monitor that raised the alert.

    errors = dispatch(Alert("support", "drift", "warning", "prompt_nll drifted", result.as_dict()),
                      [LogSink(), JsonFileSink("work/alerts.jsonl"), WebhookSink(url)])
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from common.jsonl import append_jsonl

logger = logging.getLogger(__name__)

SEVERITIES = ("info", "warning", "error", "critical")


@dataclass
class Alert:
    family: str
    """Adapter family the alert is about."""
    monitor: str
    """What raised it, e.g. "drift" or "canary"."""
    severity: str
    """One of SEVERITIES."""
    message: str
    details: dict
    """JSON-serialisable specifics, e.g. DriftResult.as_dict()."""
    ts: float = field(default_factory=time.time)

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"Alert severity {self.severity!r} is not one of {SEVERITIES}")

    def as_dict(self) -> dict:
        return asdict(self)


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):  # numpy arrays
        return obj.tolist()
    return str(obj)


def alert_json(alert: Alert) -> str:
    return json.dumps(alert.as_dict(), default=_json_default, sort_keys=True)


class LogSink:
    """Writes the alert to a Python logger (warning level unless the severity says otherwise)."""

    _LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}

    def __init__(self, logger_: logging.Logger | None = None):
        self.logger = logger_ or logger

    def send(self, alert: Alert) -> None:
        self.logger.log(self._LEVELS.get(alert.severity, logging.WARNING), "[%s/%s] %s %s", alert.family,
                        alert.monitor, alert.message, alert_json(alert))


class JsonFileSink:
    """Appends one JSON line per alert to `path` (created with its parent directories)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def send(self, alert: Alert) -> None:
        with self._lock:
            append_jsonl(self.path, alert.as_dict(), default=_json_default, sort_keys=True)  # = alert_json(alert)


class WebhookSink:
    """POSTs the alert as JSON to `url`.

    retries: extra attempts after the first one, for connection errors, timeouts, 429 and 5xx answers (with
    exponential backoff: backoff, 2*backoff, ...). Other 4xx answers are not retried: the request itself is wrong.
    """

    def __init__(self, url: str, retries: int = 3, timeout: float = 2.0, backoff: float = 0.2):
        if not str(url).startswith(("http://", "https://")):
            raise ValueError(f"webhook url must start with http:// or https://, got {url!r}")
        if retries < 0:
            raise ValueError(f"webhook retries must be >= 0, got {retries}")
        self.url, self.retries, self.timeout, self.backoff = str(url), int(retries), float(timeout), float(backoff)

    def send(self, alert: Alert) -> None:
        body = alert_json(alert)
        last = ""
        attempts = self.retries + 1
        with httpx.Client(timeout=self.timeout) as client:
            for attempt in range(attempts):
                if attempt:
                    time.sleep(self.backoff * 2 ** (attempt - 1))
                try:
                    r = client.post(self.url, content=body, headers={"content-type": "application/json"})
                except httpx.HTTPError as e:
                    last = f"{type(e).__name__}: {e}"
                    continue
                if r.status_code < 300:
                    return
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code < 500 and r.status_code != 429:
                    raise RuntimeError(f"webhook {self.url} rejected the alert ({last}); check the URL and payload")
        raise RuntimeError(f"webhook {self.url} failed after {attempts} attempts (last: {last})")


def dispatch(alert: Alert, sinks: list) -> list[str]:
    """Send `alert` to every sink; never raises because a sink failed. Returns one message per failed sink."""
    errors = []
    for sink in sinks:
        try:
            sink.send(alert)
        except Exception as e:  # noqa: BLE001 - one broken sink must not stop the others or the monitor
            msg = f"{type(sink).__name__}: {e}"
            logger.error("alert sink failed: %s", msg)
            errors.append(msg)
    return errors
