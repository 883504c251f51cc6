"""Automatic fallback on severe drift: while a family's drift is severe and no new version has been promoted since,
the champion's share of its traffic goes to a configured fallback ("base" or the registry's `previous` version).

    policy = FallbackPolicy(FallbackConfig(enabled=True, target="previous"), Path("work/fallback-state.json"))
    d = policy.observe("support-assistant", champion="2", drift=True, details=drift_result.as_dict())
    d["engage"]                    # True once the drift is severe: the server routes to the fallback, then
    policy.mark_engaged("support-assistant", "1", d["reason"])
    policy.champion_changed("support-assistant", "3")  # a promotion: returns the engagement to undo (or None)

Severe (FallbackConfig): `severe_windows` drift verdicts in a row about the same champion, or one drifted window
whose Holm-adjusted smallest p-value (m * min p over its m tested stats, the first comparison monitoring.drift.detect
makes) is at or below `severe_alpha`, or a verdict that its sender marked severe. One ordinary alert is not severe.
An "insufficient_data" window neither extends nor breaks the streak; an "ok" window resets it.

Once engaged, only a new champion (a rollout promoted, or the registry's champion alias moved) or the operator
(POST /admin/router/fallback with fallback null) releases the fallback: the monitors then see the fallback's traffic,
so a quiet window says nothing about the drifted champion. While a rollout of the family runs, engaging waits for its
end (the canary decides first): a promotion releases the drift, a rollback or an abort engages the fallback. The
state lives in one JSON file, so a restarted server puts the fallback back; with several replicas it lives in the
state database instead (serving/fallback_shared.py, `open_fallback_policy`): a verdict posted to any replica engages
or releases the fallback on all of them. Pure Python: serving/control.py carries the decisions out (router,
registry, metrics).
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from serving.rollout import write_json_atomic

TARGETS = ("base", "previous")


class FallbackStateUnavailable(RuntimeError):
    """The shared fallback state (serving/fallback_shared.py) cannot be reached: nothing was changed."""


@dataclass
class FallbackConfig:
    """When a family's drift counts as severe and where its traffic goes then."""

    enabled: bool = False
    """Act on drift verdicts (POST /admin/drift). Off by default: moving live traffic is an operator's choice."""
    target: str = "base"
    """"base" (adapters disabled) or "previous" (the registry's `previous` alias, the champion before this one; the
    server loads it, verified, from the registry, and refuses to engage when the family has none)."""
    severe_windows: int = 3
    """Drift verdicts in a row (about the same champion) that make the drift severe."""
    severe_alpha: float | None = 1e-6
    """One drifted window is severe at once when its Holm-adjusted smallest p-value is at or below this; None: only
    the streak (or the sender's own `severe`) counts. Far below the monitors' alpha, so an ordinary alert never is."""
    registry_poll_s: float | None = 30.0
    """How often the server reads the registry's champion aliases: a promotion made elsewhere (e.g. `adapterops
    registry promote`) moves the server's champion and releases the fallback. None: never."""

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"fallback target must be one of {TARGETS}, got {self.target!r}")
        if isinstance(self.severe_windows, bool) or not isinstance(self.severe_windows, int) or self.severe_windows < 1:
            raise ValueError(f"severe_windows must be an integer >= 1, got {self.severe_windows!r}")
        if self.severe_alpha is not None and not 0.0 < self.severe_alpha < 1.0:
            raise ValueError(f"severe_alpha must be in (0, 1) or None, got {self.severe_alpha!r}")
        if self.registry_poll_s is not None and not self.registry_poll_s > 0:
            raise ValueError(f"registry_poll_s must be > 0 or None, got {self.registry_poll_s!r}")


def combined_p_value(details: dict | None) -> float | None:
    """m * min p over the tested stats of a DriftResult.as_dict() (None when nothing was tested)."""
    ps = [t.get("p_value") for t in (details or {}).get("tests", []) if isinstance(t, dict)]
    ps = [float(p) for p in ps if isinstance(p, (int, float)) and math.isfinite(p)]
    return min(1.0, min(ps) * len(ps)) if ps else None


def _fresh(champion: str | None) -> dict:
    return {"champion": champion, "streak": 0, "severe": False, "reason": None, "pending": False, "engaged": None,
            "error": None, "last": None}


class FallbackPolicy:
    """Per family: the drift streak, whether the drift is severe, and the fallback engaged for it (thread-safe).

    Every change goes through `_change(family, fn)`, fn mutating the families dict it is given: here under a lock
    and saved to the JSON file; serving/fallback_shared.py runs the same fn as a compare-and-set on a database row."""

    def __init__(self, config: FallbackConfig, state_path: Path | None = None):
        self.config = config
        self.state_path = Path(state_path) if state_path is not None else None
        self._lock = threading.Lock()
        self._families: dict[str, dict] = self._load()

    def observe(self, family: str, champion: str, drift: bool | None, severe: bool = False,
                details: dict | None = None, version: str | None = None, defer: bool = False) -> dict:
        """Count one monitoring window's verdict (drift None: insufficient data) about `family`, whose champion is
        `champion`. Returns the decision: {"counted", "streak", "severe", "reason", "engage", "deferred", ...};
        "engage" asks the caller to route to the fallback now (then mark_engaged or mark_failed). `defer` (a rollout
        of the family is running) keeps a severe drift pending instead."""
        if (details or {}).get("status") == "insufficient_data":
            drift = None
        p = combined_p_value(details) if drift else None

        def change(fams: dict) -> dict:
            fam = fams.setdefault(family, _fresh(champion))
            if fam["champion"] != champion:
                if fam["engaged"] is not None:
                    raise RuntimeError(f"{family}: the champion moved from {fam['champion']} to {champion} while a "
                                       f"fallback is engaged; call champion_changed() first")
                fams[family] = fam = _fresh(champion)
            out = {"family": family, "champion": champion, "counted": False, "engage": False, "deferred": False,
                   "combined_p": p}
            if version is not None and str(version) != champion:
                out["ignored"] = (f"the verdict is about version {version}, but the champion is {champion}; "
                                  f"send verdicts about the serving champion")
                return {**out, **self._summary(fam)}
            fam["last"] = {"at": time.time(), "drift": drift, "severe": bool(severe), "combined_p": p}
            out["counted"] = drift is not None
            if drift is True:
                fam["streak"] += 1
                reason = self._severity(fam["streak"], p, severe)
                if reason and not fam["severe"]:
                    fam["severe"], fam["reason"] = True, reason
            elif drift is False and fam["engaged"] is None:
                # an ok window ends the streak; once engaged the window measures the fallback, not the champion
                fam.update(streak=0, severe=False, reason=None, pending=False)
            if fam["severe"] and fam["engaged"] is None:
                fam["pending"] = defer
                out["deferred"], out["engage"] = defer, not defer
            return {**out, **self._summary(fam)}

        return self._change(family, change)

    def _severity(self, streak: int, p: float | None, severe: bool) -> str | None:
        cfg = self.config
        if severe:
            return "the monitor marked the drift severe"
        if streak >= cfg.severe_windows:
            return f"drift in {streak} windows in a row (severe_windows={cfg.severe_windows})"
        if cfg.severe_alpha is not None and p is not None and p <= cfg.severe_alpha:
            return f"combined p-value {p:.2g} <= severe_alpha {cfg.severe_alpha:g}"
        return None

    def should_engage(self, family: str) -> bool:
        """A severe drift with no fallback engaged (e.g. one deferred while a rollout ran)."""
        with self._lock:
            fam = self._families.get(family)
            return fam is not None and fam["severe"] and fam["engaged"] is None

    def mark_engaged(self, family: str, version: str) -> None:
        def change(fams: dict) -> None:
            fam = fams[family]
            fam["engaged"] = {"version": version, "target": self.config.target, "champion": fam["champion"],
                              "reason": fam["reason"], "at": time.time()}
            fam["pending"], fam["error"] = False, None

        self._change(family, change)

    def mark_failed(self, family: str, error: str) -> None:
        """Engaging failed (e.g. no `previous` version): kept severe, retried on the next verdict."""
        def change(fams: dict) -> None:
            fams[family]["error"] = error

        self._change(family, change)

    def champion_changed(self, family: str, champion: str) -> dict | None:
        """The family's champion is `champion` now; a new one resets its drift state (the streak was about the old
        champion). Returns the engagement the caller must undo (route away from the fallback), or None."""
        with self._lock:
            fam = self._families.get(family)
            if fam is not None and fam["champion"] == champion:
                return None  # the common case (every verdict, every sync) reads, never writes

        def change(fams: dict) -> dict | None:
            fam = fams.get(family)
            if fam is not None and fam["champion"] == champion:
                return None
            fams[family] = _fresh(champion)
            return fam["engaged"] if fam is not None else None

        return self._change(family, change)

    def release(self, family: str) -> dict | None:
        """The operator cleared the fallback: forget the drift of the current champion; returns the old engagement."""
        def change(fams: dict) -> dict | None:
            fam = fams.get(family)
            if fam is None:
                return None
            fams[family] = _fresh(fam["champion"])
            return fam["engaged"]

        return self._change(family, change)

    def engaged(self) -> dict[str, str]:
        """family -> fallback version, for every engaged fallback."""
        with self._lock:
            return {f: fam["engaged"]["version"] for f, fam in self._families.items() if fam["engaged"]}

    def engagement(self, family: str) -> dict | None:
        """The engagement of `family` (version, target, champion, reason, at), or None."""
        with self._lock:
            fam = self._families.get(family)
            return json.loads(json.dumps(fam["engaged"])) if fam is not None and fam["engaged"] else None

    def status(self, family: str | None = None) -> dict:
        with self._lock:
            if family is not None:
                fam = self._families.get(family)
                return self._summary(fam) if fam is not None else self._summary(_fresh(None))
            return {"config": {k: getattr(self.config, k) for k in self.config.__dataclass_fields__},
                    "families": {f: self._summary(fam) for f, fam in self._families.items()},
                    "state": self._state_info()}

    def _state_info(self) -> dict:
        return {"kind": "file", "path": str(self.state_path) if self.state_path is not None else None}

    @staticmethod
    def _summary(fam: dict) -> dict:
        return {k: json.loads(json.dumps(fam[k])) for k in ("champion", "streak", "severe", "reason", "pending",
                                                             "engaged", "error", "last")}

    def _change(self, family: str, fn):
        """Apply fn(families) (it mutates the dict, its result is returned) and persist the state."""
        with self._lock:
            out = fn(self._families)
            self._save()
            return out

    def _load(self) -> dict:
        if self.state_path is None or not self.state_path.exists():
            return {}
        try:
            return json.loads(self.state_path.read_text())["families"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RuntimeError(f"fallback state {self.state_path} is not a valid state file ({exc}); restore it or "
                               f"move it away to start with no fallbacks engaged") from exc

    def _save(self) -> None:
        if self.state_path is not None:
            write_json_atomic(self.state_path, {"format": 1, "families": self._families})
