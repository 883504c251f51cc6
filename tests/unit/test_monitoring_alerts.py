"""Alert sinks against a real HTTP server on loopback; dispatch isolates failing sinks."""

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from monitoring.alerts import Alert, JsonFileSink, LogSink, WebhookSink, dispatch


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        srv = self.server
        with srv.lock:
            srv.hits[self.path] = srv.hits.get(self.path, 0) + 1
            n = srv.hits[self.path]
            srv.bodies.append((self.path, body))
        if self.path == "/ok" or (self.path == "/flaky" and n > 2):
            code = 200
        elif self.path == "/bad":
            code = 400
        else:
            code = 500
        self.send_response(code)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.hits, srv.bodies, srv.lock = {}, [], threading.Lock()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _alert(**kw):
    return Alert(family="support", monitor="drift", severity="warning", message="prompt_nll drifted",
                 details={"p_value": np.float64(0.001), "n": np.int64(200), "tests": [1, 2]}, **kw)


def test_alert_defaults_and_validation():
    before = time.time()
    a = _alert()
    assert before <= a.ts <= time.time()
    assert a.as_dict()["family"] == "support"
    with pytest.raises(ValueError, match="severity 'loud'"):
        Alert("f", "drift", "loud", "m", {})


def test_json_file_sink_appends_lines(tmp_path):
    path = tmp_path / "alerts" / "alerts.jsonl"
    sink = JsonFileSink(path)
    sink.send(_alert(ts=1.0))
    sink.send(_alert(ts=2.0))
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["ts"] == 1.0 and first["message"] == "prompt_nll drifted"
    assert first["details"] == {"p_value": 0.001, "n": 200, "tests": [1, 2]}
    assert json.loads(lines[1])["ts"] == 2.0


def test_log_sink(caplog):
    with caplog.at_level(logging.WARNING, logger="monitoring.alerts"):
        LogSink().send(_alert())
    assert "prompt_nll drifted" in caplog.text and "support/drift" in caplog.text


def test_webhook_posts_alert_json(server):
    srv, base = server
    WebhookSink(f"{base}/ok").send(_alert(ts=5.0))
    assert srv.hits == {"/ok": 1}
    body = json.loads(srv.bodies[0][1])
    assert body["family"] == "support" and body["ts"] == 5.0 and body["details"]["n"] == 200


def test_webhook_retries_5xx_a_bounded_number_of_times(server):
    srv, base = server
    sink = WebhookSink(f"{base}/fail", retries=2, backoff=0.01)
    with pytest.raises(RuntimeError, match=r"failed after 3 attempts \(last: HTTP 500"):
        sink.send(_alert())
    assert srv.hits["/fail"] == 3


def test_webhook_recovers_after_transient_errors(server):
    srv, base = server
    WebhookSink(f"{base}/flaky", retries=3, backoff=0.01).send(_alert())
    assert srv.hits["/flaky"] == 3  # two 500s, then 200; no further attempts


def test_webhook_does_not_retry_client_errors(server):
    srv, base = server
    with pytest.raises(RuntimeError, match="rejected the alert"):
        WebhookSink(f"{base}/bad", retries=3, backoff=0.01).send(_alert())
    assert srv.hits["/bad"] == 1


def test_dispatch_never_raises_and_reports_errors(server, tmp_path):
    srv, base = server
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    path = tmp_path / "a.jsonl"
    sinks = [WebhookSink(f"{base}/fail", retries=1, backoff=0.01),
             WebhookSink(f"http://127.0.0.1:{dead}/x", retries=1, backoff=0.01, timeout=0.5),
             JsonFileSink(path), WebhookSink(f"{base}/ok")]
    errors = dispatch(_alert(), sinks)
    assert len(errors) == 2
    assert errors[0].startswith("WebhookSink:") and "HTTP 500" in errors[0]
    assert "ConnectError" in errors[1]
    # Sinks after the failing ones still got the alert.
    assert len(path.read_text().splitlines()) == 1 and srv.hits["/ok"] == 1
    assert dispatch(_alert(), [JsonFileSink(path)]) == []


def test_webhook_url_validation():
    with pytest.raises(ValueError, match="http:// or https://"):
        WebhookSink("127.0.0.1:8080/hook")
