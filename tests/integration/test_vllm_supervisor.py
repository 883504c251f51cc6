"""The launcher's supervisor (`--vllm-launch`): a vLLM process that dies is started again on the same port, at most
max_restarts times in its window, and stop() ends the supervision. A stand-in interpreter plays vLLM (a real process
serving /health on the port it is given), so the test costs seconds, not a vLLM boot per crash."""

from __future__ import annotations

import sys
import time

import httpx
import pytest

from serving.vllm_launch import VLLMServer

from test_serving_fixtures import BASE

pytestmark = pytest.mark.integration

STAND_IN = """#!{python}
import http.server, os, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
runs = {runs!r}
n = int(open(runs).read()) + 1 if os.path.exists(runs) else 1
open(runs, "w").write(str(n))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(("127.0.0.1", port), H)
srv.timeout = 0.1
deadline = time.time() + {life}
while {crash} and time.time() < deadline or not {crash}:
    srv.handle_request()
sys.exit(3)
"""


def stand_in(tmp_path, crash_first: int, always: bool = False):
    runs = tmp_path / "runs"
    script = tmp_path / "python"
    crash = "True" if always else f"(n <= {crash_first})"
    script.write_text(STAND_IN.format(python=sys.executable, runs=str(runs), life=1.0, crash=crash))
    script.chmod(0o755)
    return script, runs


def wait(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def healthy(server) -> bool:
    try:
        return httpx.get(f"{server.url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_crashed_server_is_started_again_on_its_port(tmp_path):
    script, runs = stand_in(tmp_path, crash_first=1)  # the first run dies after 1 s, the second stays up
    server = VLLMServer(BASE, python=script, log_path=tmp_path / "v.log", boot_timeout_s=20)
    try:
        url = server.start()
        server.supervise(interval_s=0.2)
        wait(lambda: runs.read_text() == "2" and healthy(server))
        assert server.url == url and server.running()
    finally:
        server.stop()
    assert not server.running()


def test_a_server_that_keeps_crashing_is_left_down_after_the_budget(tmp_path):
    script, runs = stand_in(tmp_path, crash_first=0, always=True)
    server = VLLMServer(BASE, python=script, log_path=tmp_path / "v.log", boot_timeout_s=20)
    try:
        server.start()
        server.supervise(interval_s=0.2, max_restarts=2, window_s=600)
        wait(lambda: runs.read_text() == "3" and not server.running(), timeout=60)
        time.sleep(2.0)  # several more rounds: no fourth start
        assert runs.read_text() == "3"
    finally:
        server.stop()
