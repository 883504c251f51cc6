"""A thin client of a running server's admin API (rollouts, drift verdicts), and the rollout status table.

Run:  adapterops rollout status|start|abort --url http://127.0.0.1:8000   (key: --api-key or ADAPTEROPS_API_KEY)

    client = AdminClient("http://127.0.0.1:8000", api_key="...")
    client.start_rollout("support-assistant")          # challenger: the registry's challenger alias
    print(render_status(client.rollout_status()))
"""

from __future__ import annotations

import httpx

CHECKS = ("error_rate", "latency_p95", "feedback", "response_nll")


class AdminAPIError(Exception):
    """The server could not be reached or refused the call; the message says which and what to do."""


class AdminClient:
    def __init__(self, url: str, api_key: str | None, timeout: float = 120.0):
        if not api_key:
            raise AdminAPIError("no API key: pass --api-key or set ADAPTEROPS_API_KEY to the key the server was "
                                "started with")
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout,
                                  headers={"Authorization": f"Bearer {api_key}"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw) -> dict:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.ConnectError as e:
            raise AdminAPIError(f"cannot reach the adapterops server at {self.url} ({e}); start it with "
                                f"`adapterops serve` or pass --url") from None
        except httpx.TimeoutException:
            raise AdminAPIError(f"the server at {self.url} did not answer {method} {path} in time") from None
        except httpx.HTTPError as e:
            raise AdminAPIError(f"{method} {self.url}{path} failed: {type(e).__name__}: {e}") from None
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code == 200 and isinstance(body, dict):
            return body
        message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        message = message or r.text[:300] or r.reason_phrase
        if r.status_code == 401:
            raise AdminAPIError(f"the server at {self.url} refused the API key (401): pass the key it was started "
                                f"with (--api-key or ADAPTEROPS_API_KEY)")
        if r.status_code == 403:
            raise AdminAPIError(f"the server at {self.url} has its admin endpoints disabled (403): {message}")
        if r.status_code == 200 or not isinstance(body, dict):
            raise AdminAPIError(f"{self.url}{path} answered {r.status_code} with no JSON object; is it an "
                                f"adapterops server?")
        raise AdminAPIError(f"{method} {path}: {r.status_code} {message}")

    def rollout_status(self, family: str | None = None) -> dict:
        """One family's rollout (its public state), or {"rollouts": {family: ...}, "finished": [...]}."""
        return self._call("GET", "/admin/rollout/status", params={"family": family} if family else None)

    def start_rollout(self, family: str, challenger: str | None = None, steps: list[float] | None = None,
                      requests_per_step: int | None = None, gradual_rollback: bool | None = None) -> dict:
        """challenger None: the registry's challenger alias; None settings keep the server's RolloutConfig."""
        body = {"family": family, "challenger": challenger, "steps": steps, "requests_per_step": requests_per_step,
                "gradual_rollback": gradual_rollback}
        return self._call("POST", "/admin/rollout/start", json={k: v for k, v in body.items() if v is not None})

    def abort_rollout(self, family: str, reason: str) -> dict:
        return self._call("POST", "/admin/rollout/abort", json={"family": family, "reason": reason})

    def report_drift(self, family: str, result: dict, version: str | None = None, severe: bool = False) -> dict:
        """Send one window's monitoring.drift.DriftResult.as_dict() to the server's fallback policy."""
        drift = None if result.get("status") == "insufficient_data" else bool(result.get("drift"))
        return self._call("POST", "/admin/drift", json={"family": family, "drift": drift, "severe": severe,
                                                         "version": version, "details": result})


def last_verdicts(rollout: dict) -> dict[str, str]:
    """Each check's verdict at the last analysed step end ("-" before the first)."""
    for entry in reversed(rollout.get("history", [])):
        analysis = entry.get("analysis")  # step_down entries of a gradual rollback have none
        if analysis:
            return {name: analysis["checks"].get(name, {}).get("verdict", "-") for name in CHECKS}
    return {name: "-" for name in CHECKS}


def render_status(status: dict) -> str:
    """A table of rollouts (one row per family) from rollout_status(), with the reason of each ended one."""
    rollouts = status["rollouts"] if "rollouts" in status else {status["family"]: status}
    if not rollouts:
        return "no rollouts on this server"
    head = ["family", "champion", "challenger", "status", "step", "weight", *CHECKS]
    rows, notes = [], []
    for family, ro in sorted(rollouts.items()):
        n_steps = len(ro.get("config", {}).get("steps", [])) or "?"
        champion = ro["champion"] + (f" (fallback {ro['baseline']})" if ro.get("baseline") else "")
        rows.append([family, champion, ro["challenger"], ro["status"], f"{ro['step'] + 1}/{n_steps}",
                     f"{ro['weight']:.2f}", *last_verdicts(ro).values()])
        if ro.get("reason"):
            notes.append(f"{family}: {ro['reason']}")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    return "\n".join(lines + notes)
