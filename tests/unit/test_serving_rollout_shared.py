"""Rollout state shared through a database (serving/rollout_shared.py), here two replicas' controllers on one SQLite
URL, polled by hand: one canary per family, samples and feedback from either replica count, one driver (the lease,
taken over when its holder dies), an abort anywhere ends it everywhere. PostgreSQL and real servers:
tests/integration/test_shared_state.py."""

import time

import pytest

from serving.rollout import ABORTED, PROMOTED, RUNNING, RolloutConfig, RolloutController, RolloutError
from serving.rollout_shared import SharedRolloutController, open_rollout_controller

CFG = RolloutConfig(steps=(0.25, 1.0), requests_per_step=20, min_samples=5, max_error_rate=None)


class Replica:
    def __init__(self, url, name, **kw):
        self.promoted, self.rolled_back, self.notified = [], [], []
        self.ctl = SharedRolloutController(url, CFG, lambda f, v: self.promoted.append((f, v)),
                                           lambda f, v, r: self.rolled_back.append((f, v, r)), replica_id=name,
                                           poll_interval_s=None, **kw)
        self.ctl.subscribe(self.notified.append)

    def serve(self, family, n, start=0, error=False):
        """n requests, one per arm in turn (the router's split does not matter here)."""
        ro = self.ctl.status(family)
        for i in range(start, start + n):
            version = ro["challenger"] if i % 2 else ro["champion"]
            self.ctl.record(family, version, f"{self.ctl.replica_id}-{i}", latency_ms=10.0, error=error,
                            response_nll=None)
        self.ctl.flush()


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def replicas(url):
    a, b = Replica(url, "a"), Replica(url, "b")
    yield a, b
    a.ctl.close()
    b.ctl.close()


def test_the_factory_keeps_the_json_file_for_paths(tmp_path, url):
    ctl = open_rollout_controller(tmp_path / "rollout-state.json", CFG, print, print)
    assert type(ctl) is RolloutController
    shared = open_rollout_controller(url, CFG, print, print, poll_interval_s=None)
    assert isinstance(shared, SharedRolloutController)
    shared.close()


def test_one_canary_per_family_across_replicas(replicas):
    a, b = replicas
    started = a.ctl.start("fam", "1", "2")
    joined = b.ctl.start("fam", "1", "2")
    assert joined["id"] == started["id"] and joined["status"] == RUNNING
    with pytest.raises(RolloutError, match="in progress"):
        b.ctl.start("fam", "1", "3")
    assert b.ctl.weight("fam") == ("1", "2", 0.25) and b.ctl.is_active("fam")
    a.ctl.poll()
    assert a.ctl.weight("fam") == ("1", "2", 0.25)
    assert len(b.ctl.status()["rollouts"]) == 1


def test_samples_from_both_replicas_drive_one_canary_and_every_replica_follows(replicas):
    a, b = replicas
    a.ctl.start("fam", "1", "2")
    a.ctl.poll()
    b.ctl.poll()
    assert a.ctl.is_driver and not b.ctl.is_driver
    a.serve("fam", 10)
    b.serve("fam", 10)
    b.ctl.poll()  # not the driver: reads, never decides
    assert b.ctl.status("fam")["step"] == 0 and b.ctl.status("fam")["counts"]["challenger"]["requests"] == 10
    a.ctl.poll()
    assert a.ctl.weight("fam") == ("1", "2", 1.0)
    b.notified.clear()
    b.ctl.poll()
    assert b.ctl.weight("fam") == ("1", "2", 1.0) and b.notified == ["fam"]
    # the champion gets no traffic at 100%: champion samples from before still count; 20 more requests end it
    a.serve("fam", 10, start=100)
    b.serve("fam", 10, start=100)
    a.ctl.poll()
    b.ctl.poll()
    assert a.ctl.status("fam")["status"] == PROMOTED and b.ctl.weight("fam") == ("2", None, 0.0)
    assert a.promoted == [("fam", "2")] and b.promoted == []  # the driver alone runs the callbacks
    assert [h["decision"] for h in a.ctl.status("fam")["history"]] == ["advance", "promote"]


def test_feedback_on_one_replica_for_a_request_served_by_the_other(replicas):
    a, b = replicas
    a.ctl.start("fam", "1", "2")
    b.ctl.poll()
    a.serve("fam", 4)
    assert b.ctl.record_feedback("a-1", 0.75) and b.ctl.record_feedback("a-0", 0.5)
    assert not b.ctl.record_feedback("never-served", 0.5)
    a.ctl.poll()
    counts = a.ctl.status("fam")["counts"]
    assert counts["challenger"]["feedback"] == 1 and counts["champion"]["feedback"] == 1


def test_an_abort_on_one_replica_ends_the_canary_everywhere(replicas):
    a, b = replicas
    a.ctl.start("fam", "1", "2")
    a.ctl.poll()
    b.ctl.poll()
    a.serve("fam", 6)
    b.ctl.abort("fam", "operator")
    a.notified.clear()
    a.ctl.poll()
    assert a.ctl.status("fam")["status"] == ABORTED and a.ctl.weight("fam") == ("1", None, 0.0)
    assert a.notified == ["fam"]
    a.serve("fam", 30)  # ignored: nothing active
    a.ctl.poll()
    assert a.ctl.status("fam")["status"] == ABORTED and a.promoted == []
    with pytest.raises(RolloutError):
        a.ctl.abort("fam", "twice")
    first = a.ctl.status("fam")["id"]
    again = a.ctl.start("fam", "1", "2")  # a new canary after the old one ended
    assert again["status"] == RUNNING and [f["status"] for f in b.ctl.status()["finished"]] == [ABORTED]
    with a.ctl._db.connect() as conn:  # the archived rollout keeps its summary, not its samples
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM rollout_samples WHERE rollout_id = ?",
                                    (first,)).scalar_one() == 0


def test_the_lease_moves_to_a_live_replica_when_the_driver_dies(url):
    a, b = Replica(url, "a", lease_ttl_s=1.0), Replica(url, "b", lease_ttl_s=1.0)
    try:
        a.ctl.start("fam", "1", "2")
        a.ctl.poll()
        b.ctl.poll()
        assert a.ctl.is_driver and not b.ctl.is_driver
        a.serve("fam", 8)
        a.ctl.close(release_lease=False)  # a crash: the lease is left to expire
        b.serve("fam", 12)
        b.ctl.poll()
        assert not b.ctl.is_driver and b.ctl.status("fam")["step"] == 0
        time.sleep(1.1)
        b.ctl.poll()
        assert b.ctl.is_driver and b.ctl.weight("fam") == ("1", "2", 1.0)
        b.serve("fam", 20, start=100)
        b.ctl.poll()
        assert b.ctl.status("fam")["status"] == PROMOTED and b.promoted == [("fam", "2")]
    finally:
        a.ctl.close()
        b.ctl.close()
    c = Replica(url, "c")  # a clean close gives the lease up at once
    try:
        c.ctl.poll()
        assert c.ctl.is_driver and c.ctl.status("fam")["status"] == PROMOTED
    finally:
        c.ctl.close()


def test_the_background_poller_follows_another_replica(url):
    a = Replica(url, "a")
    b = SharedRolloutController(url, CFG, print, print, replica_id="b", poll_interval_s=0.1)
    seen = []
    b.subscribe(seen.append)
    try:
        a.ctl.start("fam", "1", "2")
        deadline = time.monotonic() + 5
        while not b.is_active("fam") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b.weight("fam") == ("1", "2", 0.25) and "fam" in seen
    finally:
        a.ctl.close()
        b.close()


def test_the_profile_and_workspace_name_the_shared_database(tmp_path):
    from pipelines.config import ConfigError
    from pipelines.profile import load_profile
    from pipelines.workspace import Workspace

    assert load_profile("local", {}).state_db_url == "" and load_profile("production", {}).state_db_url == ""
    db = "postgresql://adapterops@postgres:5432/adapterops"
    assert load_profile("production", {"ADAPTEROPS_STATE_DB_URL": db}).state_db_url == db
    bad = tmp_path / "bad.yaml"
    bad.write_text("state_db_url: mysql://x/y\n")
    with pytest.raises((ConfigError, ValueError), match="state_db_url"):
        load_profile(bad, {})
    base = __import__("pathlib").Path(__file__).resolve().parents[2] / "models" / "tiny-llama"
    local = Workspace.create(tmp_path / "ws", base, tracking_uri="sqlite:///x.db")
    assert local.rollout_state_target == str(local.root / "rollout-state.json")
    assert local.prediction_log_target == str(local.root / "predictions.db")
    shared = Workspace.coerce({"root": str(tmp_path / "ws"), "base_path": str(base), "tracking_uri": "sqlite:///x.db",
                               "state_db_url": db})
    assert shared.rollout_state_target == shared.prediction_log_target == db
