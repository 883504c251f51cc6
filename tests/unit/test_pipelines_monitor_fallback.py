"""The scheduled monitor feeds the serving fallback: every tested verdict goes to POST /admin/drift (issue 12 item 4);
a server that is down or refuses never fails the monitor."""

import httpx
import pytest

import serving.client
from pipelines.flows import report_verdict_to_server

RESULT = {"drift": True, "status": "drift", "reason": "drift in embedding_novelty", "tests": []}


def _client_with(handler, monkeypatch):
    real = httpx.Client

    def client(*args, **kw):
        return real(*args, transport=httpx.MockTransport(handler), **kw)

    monkeypatch.setattr(serving.client.httpx, "Client", client)


def test_verdict_is_posted_to_the_fallback_policy(monkeypatch):
    seen = []

    def handler(request):
        seen.append((request.url.path, request.headers["authorization"], request.read()))
        return httpx.Response(200, json={"decision": {"engage": True, "reason": "severe"}, "error": None})

    _client_with(handler, monkeypatch)
    out = report_verdict_to_server("http://127.0.0.1:9", "support", "3", RESULT, api_key="k")
    assert out == {"sent": True, "decision": {"engage": True, "reason": "severe"}, "error": None}
    path, auth, body = seen[0]
    assert path == "/admin/drift" and auth == "Bearer k"
    assert b'"family":"support"' in body.replace(b" ", b"") and b'"version":"3"' in body.replace(b" ", b"")


@pytest.mark.parametrize("handler, key, message", [
    (lambda r: httpx.Response(401, json={"error": {"message": "bad key"}}), "k", "401"),
    (lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused")), "k", "cannot reach"),
    (lambda r: httpx.Response(200, json={}), None, "no API key"),
])
def test_a_server_that_is_down_or_refuses_never_fails_the_monitor(monkeypatch, handler, key, message):
    _client_with(handler, monkeypatch)
    monkeypatch.delenv("ADAPTEROPS_API_KEY", raising=False)
    out = report_verdict_to_server("http://127.0.0.1:9", "support", "3", RESULT, api_key=key)
    assert out["sent"] is False and message in out["error"]
