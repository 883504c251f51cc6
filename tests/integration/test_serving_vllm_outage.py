"""vLLM goes away in the middle of a canary: clients get a clear 503 naming the engine, the canary pauses (no sample is
counted against either arm, nothing is promoted or rolled back), the champion keeps its route, and when vLLM is back
the same canary goes on.

The outage is real: our server talks to the session's vLLM through a TCP proxy on loopback that the test cuts
(every open connection reset, new ones refused) and restores.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from monitoring.store import PredictionLog
from serving.app import ServerState, create_app
from serving.rollout import RolloutConfig, RolloutController
from serving.router import Router
from serving.vllm_engine import VLLMEngine

from test_serving_fixtures import BASE, PROMPTS, make_adapter, running

pytestmark = pytest.mark.integration

KEY = "outage-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class CuttableProxy:
    """127.0.0.1:port -> upstream, byte for byte, until cut()."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.listener: socket.socket | None = None
        self.port = 0
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.open()

    def open(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Refuse new connections and reset the open ones (shutdown first: it wakes threads blocked on them)."""
        for s in [self.listener, *self.conns]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with self.lock:
            self.conns.clear()


@pytest.mark.timeout(300)
def test_vllm_down_mid_canary_pauses_it_and_a_clear_503(vllm_server, tmp_path):
    from urllib.parse import urlsplit

    u = urlsplit(vllm_server.url)
    proxy = CuttableProxy((u.hostname, u.port))
    events: list[tuple] = []
    rollout = RolloutController(tmp_path / "rollout.json",
                                RolloutConfig(steps=(0.5, 1.0), requests_per_step=400, min_samples=4),
                                on_promote=lambda f, v: events.append(("promote", f, v)),
                                on_rollback=lambda f, v, r: events.append(("rollback", f, v, r)))
    engine = VLLMEngine([f"http://127.0.0.1:{proxy.port}"], BASE, max_lora_rank=vllm_server.max_lora_rank,
                        timeout_s=10)
    state = ServerState(engine=engine, router=Router(seed=0), rollout=rollout, log=PredictionLog(tmp_path / "p.db"),
                        api_key=KEY, max_tokens_limit=8)
    a1, a2 = make_adapter(tmp_path / "a1", seed=61), make_adapter(tmp_path / "a2", seed=62)
    try:
        with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=60) as c:
            for v, d in (("1", a1), ("2", a2)):
                r = c.post("/admin/adapters/load", json={"family": "out", "version": v, "path": str(d)}, headers=AUTH)
                assert r.status_code == 200, r.text
            r = c.post("/admin/rollout/start", json={"family": "out", "challenger": "2"}, headers=AUTH)
            assert r.status_code == 200, r.text

            def send(n: int) -> list[httpx.Response]:
                return [c.post("/v1/completions", json={"model": "out", "prompt": PROMPTS[i % 3], "max_tokens": 2,
                                                        "user": f"u{i}"}) for i in range(n)]

            assert all(r.status_code == 200 for r in send(12))
            before = rollout.status("out")
            proxy.cut()
            t0 = time.monotonic()
            down = send(6)
            assert time.monotonic() - t0 < 6 * 25, "requests to a dead vLLM must fail within the bounded timeout"
            for r in down:
                assert r.status_code == 503, r.text
                err = r.json()["error"]
                assert err["code"] == "engine_unavailable" and "vllm" in err["message"].lower()
            during = rollout.status("out")
            assert during["status"] == "running" and not events
            assert during["counts"] == before["counts"], "a request vLLM never answered was counted against an arm"
            assert c.get("/readyz").status_code == 503
            assert c.get("/health").status_code == 503

            proxy.open()  # vLLM is back on the same address
            deadline = time.monotonic() + 60
            while c.get("/health").status_code != 200:
                assert time.monotonic() < deadline, "the engine did not come back after the outage"
                time.sleep(0.5)
            assert all(r.status_code == 200 for r in send(6))
            after = rollout.status("out")
            assert after["status"] == "running" and after["step"] == before["step"] and not events
    finally:
        for key in engine.loaded():
            try:
                engine.unload(key)
            except Exception:
                pass
        engine.close()
        state.log.close()
        proxy.cut()
