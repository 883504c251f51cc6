"""registry.versions.Lease: when another process may treat a family's alias lease as abandoned."""

import os
import subprocess
import sys
import time
from pathlib import Path

from registry.versions import _PROCESS_SCOPE, Lease


def _lease(pid: int, scope: str = _PROCESS_SCOPE, expires_in: float = 60.0) -> Lease:
    now = time.time()
    return Lease("t0k3n", "fam", "promote", "ci", "host", scope, pid, now, now + expires_in)


def _exited_child(reap: bool) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    if reap:
        child.wait()
        return child
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "child did not exit"
        time.sleep(0.02)
    return child


def test_live_holder_keeps_its_lease_until_it_expires():
    assert _lease(os.getpid()).stale_reason(time.time()) is None
    reason = _lease(os.getpid(), expires_in=-5).stale_reason(time.time())
    assert reason is not None and reason.startswith("it expired 5 s ago")


def test_dead_holder_on_this_host_is_stale_at_once_reaped_or_zombie():
    for reap in (True, False):
        child = _exited_child(reap)
        try:
            assert _lease(child.pid).stale_reason(time.time()) == f"its process {child.pid} on this host is gone"
        finally:
            child.wait()


def test_a_pid_from_another_host_or_namespace_is_not_judged():
    child = _exited_child(reap=True)
    assert _lease(child.pid, scope="other-host/boot/123").stale_reason(time.time()) is None


def test_describe_names_the_holder():
    lease = Lease("0123456789ab", "fam", "rollback", "oncall", "web-1", "s", 77, 0.0, 60.0)
    assert lease.describe() == "rollback by oncall (pid 77 on web-1, since 00:00:00 UTC, lease 01234567)"
    assert lease.tag == "adapterops.lease.0123456789ab"
