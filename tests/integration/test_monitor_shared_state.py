"""The drift monitor's streak shared by workers (issue 15 item 1): two workspaces (two workers with their own work
dirs) on one state database continue one streak and one window, through the functions flows.monitor_check calls
(read_monitor_state -> advance_streak -> write_monitor_state). PostgreSQL on 127.0.0.1:5432 (skipped when it does not
answer) and a sqlite:/// state database; the JSON file stays the default without one."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from registry_fixtures import fresh_postgres_db

pytestmark = pytest.mark.integration

BASE = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"
DRIFT = {"drift": True, "status": "drift", "reason": "KS p < 0.01"}
OK = {"drift": False, "status": "ok", "reason": "no drift"}


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
def state_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    with fresh_postgres_db("adapterops_monitor_state") as url:
        yield url


def workers(tmp_path: Path, url: str):
    from pipelines.workspace import Workspace

    return [Workspace.create(tmp_path / name, BASE, tracking_uri=f"sqlite:///{tmp_path / name / 'mlflow.db'}",
                             state_db_url=url) for name in ("worker-a", "worker-b")]


def check(ws, family: str, version: str, last_id: int, result: dict, consecutive: int = 2) -> tuple[bool, int]:
    """One monitor round as flows.monitor_check runs it, minus the drift test itself (its verdict is `result`)."""
    from pipelines.monitor_jobs import advance_streak, read_monitor_state, write_monitor_state

    state = read_monitor_state(ws, family, version)
    assert last_id > state["last_id"]  # the window starts where the previous check (on any worker) stopped
    fire, streak = advance_streak(state["streak"], consecutive, result)
    write_monitor_state(ws, family, {"version": version, "last_id": last_id, "streak": streak})
    return fire, streak


def test_two_workers_continue_one_streak(state_url, tmp_path):
    from pipelines.monitor_jobs import read_monitor_state, write_monitor_state

    a, b = workers(tmp_path, state_url)
    assert check(a, "fam", "1", 100, DRIFT) == (False, 1)
    assert read_monitor_state(b, "fam", "1") == {"version": "1", "last_id": 100, "streak": 1}
    assert check(b, "fam", "1", 200, DRIFT) == (True, 2)  # the second drifted window in a row alerts, on B
    assert check(a, "fam", "1", 300, OK) == (False, 0)
    assert check(b, "fam", "1", 400, DRIFT) == (False, 1)
    # a worker that tested an older window does not move the shared one back
    assert write_monitor_state(a, "fam", {"version": "1", "last_id": 350, "streak": 0}) is False
    assert read_monitor_state(a, "fam", "1") == {"version": "1", "last_id": 400, "streak": 1}
    # a new champion starts fresh, on every worker; another family is its own row
    assert read_monitor_state(a, "fam", "2") == {"version": "2", "last_id": 0, "streak": 0}
    assert check(a, "fam", "2", 410, DRIFT) == (False, 1)
    assert read_monitor_state(b, "fam", "2")["streak"] == 1 and read_monitor_state(b, "fam", "1")["last_id"] == 0
    assert read_monitor_state(b, "other", "1") == {"version": "1", "last_id": 0, "streak": 0}
    for ws in (a, b):  # nothing went to the per-workdir file
        assert not list((ws.root / "monitoring").glob("*/drift_state.json"))


def test_concurrent_writers_leave_the_newest_window(state_url, tmp_path):
    from pipelines.monitor_jobs import read_monitor_state, write_monitor_state

    a, b = workers(tmp_path, state_url)
    errors: list[BaseException] = []

    def write(ws, ids):
        try:
            for i in ids:
                write_monitor_state(ws, "fam", {"version": "1", "last_id": i, "streak": i % 3})
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write, args=(a, range(1, 80, 2))),
               threading.Thread(target=write, args=(b, range(2, 81, 2)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert read_monitor_state(a, "fam", "1") == {"version": "1", "last_id": 80, "streak": 80 % 3}


def test_without_a_state_database_the_file_stays_the_default(tmp_path, monkeypatch):
    from pipelines.monitor_jobs import read_monitor_state, write_monitor_state
    from pipelines.workspace import Workspace

    monkeypatch.delenv("ADAPTEROPS_STATE_DB_URL", raising=False)
    ws = Workspace.create(tmp_path, BASE, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    write_monitor_state(ws, "fam", {"version": "1", "last_id": 5, "streak": 1})
    assert (tmp_path / "monitoring" / "fam" / "drift_state.json").is_file()
    assert read_monitor_state(ws, "fam", "1") == {"version": "1", "last_id": 5, "streak": 1}


def test_a_state_database_that_is_down_is_one_bounded_error_naming_it(tmp_path):
    from pipelines.monitor_jobs import MonitorStateUnavailable, read_monitor_state
    from pipelines.workspace import Workspace

    ws = Workspace.create(tmp_path, BASE, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                          state_db_url="postgresql://postgres:secret@127.0.0.1:9/adapterops")
    t0 = time.monotonic()
    with pytest.raises(MonitorStateUnavailable, match=r"monitor state database postgresql://postgres:\*\*\*@127.0.0.1:9"
                                                      r"/adapterops is unreachable") as e:
        read_monitor_state(ws, "fam", "1")
    assert "secret" not in str(e.value) and time.monotonic() - t0 < 15
