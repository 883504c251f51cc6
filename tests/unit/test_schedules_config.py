"""pipelines/schedules.py without a Prefect server: the per-family cron jitter (deterministic, spread, bounded), the
ScheduleConfig read from the environment, the server URL reaching the monitor deployments' parameters, and a dead
Prefect server reported quickly, by name."""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import time

import pytest

from pipelines import schedules
from pipelines.schedules import ScheduleConfig, jitter_minutes, jittered_cron

FLEET = [f"family-{i:03d}" for i in range(100)]


def test_jitter_is_deterministic_across_processes():
    """sha256 of the name, not Python's per-process salted hash(): another interpreter agrees."""
    here = [jitter_minutes(f, 60) for f in FLEET[:10]]
    code = ("import sys; from pipelines.schedules import jitter_minutes; "
            "print([jitter_minutes(f, 60) for f in sys.argv[1:]])")
    out = subprocess.run([sys.executable, "-c", code, *FLEET[:10]], env={**os.environ, "PYTHONHASHSEED": "123"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(here)
    assert jitter_minutes("support-assistant", 60) == jitter_minutes("support-assistant", 60)


@pytest.mark.parametrize("window", [1, 7, 60, 90, 1440])
def test_jitter_is_bounded_by_the_window(window):
    offsets = [jitter_minutes(f, window) for f in FLEET]
    assert all(0 <= o < window for o in offsets)
    assert jitter_minutes("x", 0) == 0


def test_a_hundred_families_do_not_start_together():
    offsets = [jitter_minutes(f, 60) for f in FLEET]
    per_minute = collections.Counter(offsets)
    # uniform over 60 minutes: ~49 distinct minutes expected, ~4-5 families in the fullest one
    assert len(per_minute) >= 40 and max(per_minute.values()) <= 6, per_minute
    crons = {jittered_cron("0 2 * * *", f, 60)[0] for f in FLEET}
    assert len(crons) == len(per_minute)  # one cron per distinct offset: the offsets are what the schedules get


def test_jittered_cron_shifts_the_time_within_the_day():
    fam = next(f for f in FLEET if jitter_minutes(f, 60) >= 30)
    off = jitter_minutes(fam, 60)
    assert jittered_cron("0 2 * * *", fam, 60) == (f"{off} 2 * * *", off)
    assert jittered_cron("45 2 * * 0", fam, 60) == (f"{(45 + off) % 60} 3 * * 0", off)  # into the next hour
    late = jittered_cron("50 23 * * 0", fam, 60)[0]  # past midnight: wraps to the start of the same day
    assert late == f"{(50 + off) % 60} 0 * * 0"
    big = jitter_minutes(fam, 600)
    cron, _ = jittered_cron("0 2 * * *", fam, 600)
    assert cron == f"{big % 60} {2 + big // 60} * * *"
    # an hour pattern: only the minute moves, within the hour
    cron, o = jittered_cron("15 */6 * * *", fam, 600)
    assert cron == f"{(15 + o) % 60} */6 * * *" and 0 <= o < 60
    assert jittered_cron("0 2 * * *", fam, 0) == ("0 2 * * *", 0)
    with pytest.raises(ValueError, match=r"'\*/5 \* \* \* \*'.*minute.*ADAPTEROPS_RETRAIN_JITTER, --retrain-jitter"):
        jittered_cron("*/5 * * * *", fam, 60)


def test_schedule_config_from_the_environment():
    cfg = ScheduleConfig.from_env({"ADAPTEROPS_FAMILY": "a, b,a", "ADAPTEROPS_RETRAIN_JITTER": "15",
                                   "ADAPTEROPS_POOL_CONCURRENCY": "4", "ADAPTEROPS_SERVER_URL": "http://s:8000",
                                   "ADAPTEROPS_MONITOR_INTERVAL": "60"})
    assert (cfg.families, cfg.retrain_jitter, cfg.pool_concurrency, cfg.server_url, cfg.monitor_interval) == \
        (["a", "b"], 15, 4, "http://s:8000", 60)
    assert ScheduleConfig.from_env({}) == ScheduleConfig() and ScheduleConfig().retrain_jitter == 60
    for env, message in (({"ADAPTEROPS_RETRAIN_JITTER": "soon"}, "ADAPTEROPS_RETRAIN_JITTER='soon' is not a whole"),
                         ({"ADAPTEROPS_RETRAIN_JITTER": "2000"}, r"retrain_jitter .* \[0, 1440\], got 2000"),
                         ({"ADAPTEROPS_POOL_CONCURRENCY": "0"}, "pool_concurrency must be at least 1"),
                         ({"ADAPTEROPS_PPL_INTERVAL": "0"}, "ADAPTEROPS_PPL_INTERVAL=0"),
                         ({"ADAPTEROPS_FAMILY": "bad/name"}, "invalid family name 'bad/name'")):
        with pytest.raises(ValueError, match=message):
            ScheduleConfig.from_env(env)


def test_monitor_deployments_carry_the_server_url(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("family: fam-x\n")
    env = {"ADAPTEROPS_RETRAIN_CONFIG": str(config), "ADAPTEROPS_PROFILE": "local",
           "ADAPTEROPS_SERVER_URL": "http://serving:8000"}
    assert schedules.monitor_parameters(env, "fam-x")["server_url"] == "http://serving:8000"
    # not configured here: None, so the run reads $ADAPTEROPS_SERVER_URL where it runs (not "" = nowhere)
    assert schedules.monitor_parameters({**env, "ADAPTEROPS_SERVER_URL": ""}, "fam-x")["server_url"] is None


def test_a_dead_prefect_server_is_named_quickly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    start = time.monotonic()
    with pytest.raises(schedules.PrefectUnavailable, match=rf"the Prefect server at {url} is not answering .*"
                                                            "PREFECT_API_URL"):
        schedules.check_server(url, timeout=5)
    assert time.monotonic() - start < 10
