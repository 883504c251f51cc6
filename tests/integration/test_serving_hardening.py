"""Hardening of the serving control plane (issue 16, serving side): each hostile input gets one clear answer, the
server keeps serving, and nothing reaches traffic that the gates or the files do not vouch for.

Real server (uvicorn on 127.0.0.1), the built-in engine on the tiny base, real PEFT adapters, real MLflow on SQLite.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from monitoring.store import PredictionLog
from pipelines.serve import build_state, load_champions
from pipelines.workspace import Workspace
from registry.hashing import model_weights_hash
from serving.app import ServerState, create_app
from serving.builtin import BuiltinEngine
from serving.rollout import RolloutConfig
from serving.router import Router

from test_serving_fixtures import BASE, PROMPTS, make_adapter, register_version, running

pytestmark = pytest.mark.integration

KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = httpx.Timeout(60.0)


@pytest.fixture(scope="module")
def engine():
    eng = BuiltinEngine(BASE, max_loras=2)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard-adapters")
    return [make_adapter(root / f"a{i}", seed=40 + i) for i in range(3)]


def fresh_state(engine, tmp_path, **kw) -> ServerState:
    for key in engine.loaded():
        engine.unload(key)
    return ServerState(engine=engine, router=Router(seed=0), log=PredictionLog(tmp_path / "pred.db"), **kw)


def load(c, family, version, path, status=200):
    r = c.post("/admin/adapters/load", json={"family": family, "version": version, "path": str(path)}, headers=AUTH)
    assert r.status_code == status, r.text
    return r.json()


def complete(c, model, **kw):
    return c.post("/v1/completions", json={"model": model, "prompt": PROMPTS[0], "max_tokens": 2, **kw})


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_api_key_disables_admin_whatever_the_header(engine, tmp_path, key):
    state = fresh_state(engine, tmp_path, api_key=key)
    assert state.api_key is None
    with running(create_app(state)) as url:
        for header in ("Bearer ", "Bearer", f"Bearer {key}", "Bearer x", None):
            status, body = raw_get(url, "/admin/rollout/status", header)
            assert status == 403, (header, body)
            assert "disabled" in json.loads(body)["error"]["message"]
    state.log.close()


def raw_get(url: str, path: str, authorization: str | None) -> tuple[int, str]:
    """A GET written byte for byte (clients refuse a header value with trailing whitespace; curl sends it)."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    head = f"GET {path} HTTP/1.1\r\nHost: {u.hostname}\r\nConnection: close\r\n"
    if authorization is not None:
        head += f"Authorization: {authorization}\r\n"
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall((head + "\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.decode().partition("\r\n")
    return int(status_line.split()[1]), rest.split("\r\n\r\n", 1)[1]


def test_body_limit_by_length_and_when_chunked(engine, adapters, tmp_path):
    state = fresh_state(engine, tmp_path, api_key=KEY)
    with running(create_app(state, max_body_bytes=64 * 1024)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        load(c, "fam", "1", adapters[0])
        big = json.dumps({"model": "fam", "prompt": "x" * 200_000, "max_tokens": 2})
        r = c.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

        def chunks():
            yield b'{"model": "fam", "prompt": "'
            for _ in range(100):
                yield b"y" * 4096
            yield b'", "max_tokens": 2}'

        r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert complete(c, "fam").status_code == 200  # still serving
        assert 'adapterops_requests_rejected_total{reason="body_too_large"} 2.0' in c.get("/metrics").text
    state.log.close()


def broken_copies(src: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Adapter directories no engine should serve, with the words their error must hold."""
    out = {}
    nan = Path(shutil.copytree(src, root / "nan"))
    t = load_file(str(nan / "adapter_model.safetensors"))
    name = next(k for k in t if "lora_B" in k)
    t[name][0, 0] = float("nan")
    save_file(t, str(nan / "adapter_model.safetensors"))
    out["nan weights"] = (nan, "NaN or infinite")
    cfg = Path(shutil.copytree(src, root / "badcfg"))
    (cfg / "adapter_config.json").write_text("{not json")
    out["corrupt config"] = (cfg, "adapter_config.json cannot be read")
    trunc = Path(shutil.copytree(src, root / "trunc"))
    data = (trunc / "adapter_model.safetensors").read_bytes()
    (trunc / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated weights"] = (trunc, "truncated or corrupt")
    none = Path(shutil.copytree(src, root / "noweights"))
    (none / "adapter_model.safetensors").unlink()
    out["no weights"] = (none, "no adapter_model.safetensors")
    out["not a directory"] = (root / "missing", "not a directory")
    from registry.binding import write_binding

    other = Path(shutil.copytree(src, root / "otherbase"))
    write_binding(other, "0" * 64)
    out["bound to another base"] = (other, "it was trained on base sha256:000000000000")
    native = Path(shutil.copytree(src, root / "native"))
    write_binding(native, model_weights_hash(BASE), base="pissa_residual")
    out["PiSSA adapter as trained"] = (native, "residual base")
    return out


def test_bad_adapter_directories_are_refused_with_the_reason(engine, adapters, tmp_path):
    state = fresh_state(engine, tmp_path, api_key=KEY)
    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        load(c, "fam", "1", adapters[0])
        for case, (path, words) in broken_copies(adapters[1], tmp_path).items():
            body = load(c, "fam", "2", path, status=400)
            assert words in body["error"]["message"], (case, body)
            assert body["error"]["code"] == "adapter_load_failed", case
        assert "fam@2" not in engine.loaded()
        assert complete(c, "fam").json()["adapterops"]["version"] == "1"
    state.log.close()


def test_an_evicted_adapter_comes_back_only_if_its_bytes_are_the_same(engine, adapters, tmp_path):
    """max_loras=2: loading a third adapter evicts the least recently used one; the next request for it reloads it
    after checking its directory's hash, and refuses (503) when the files changed in between."""
    state = fresh_state(engine, tmp_path, api_key=KEY)
    dirs = [Path(shutil.copytree(a, tmp_path / f"v{i}")) for i, a in enumerate(adapters, start=1)]
    with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        for i, d in enumerate(dirs, start=1):
            load(c, "fam", str(i), d)
        assert "fam@1" not in engine.loaded()  # the champion was evicted
        r = c.get("/readyz")  # ready only with the routed champion back in the engine, verified
        assert r.status_code == 200, r.text
        assert "fam@1" in engine.loaded()
        assert complete(c, "fam@1").status_code == 200
        complete(c, "fam@2")  # fam@3 is now the least recently used
        assert complete(c, "fam@1").status_code == 200
        assert "fam@3" not in engine.loaded()
        t = load_file(str(dirs[2] / "adapter_model.safetensors"))  # someone rewrites v3's files in place
        name = next(k for k in t if "lora_B" in k)
        t[name] = t[name] * 2
        save_file(t, str(dirs[2] / "adapter_model.safetensors"))
        r = complete(c, "fam@3")
        assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_unavailable", r.text
        assert "has changed since it was loaded" in r.json()["error"]["message"]
        assert complete(c, "fam").status_code == 200  # the champion keeps serving
    state.log.close()


@pytest.fixture
def registry_ws(tmp_path):
    return Workspace.create(tmp_path / "ws", BASE, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")


def test_gates_hold_wherever_a_version_could_get_traffic(registry_ws, adapters):
    ws = registry_ws
    reg = ws.registry()
    fam = f"gates-{uuid.uuid4().hex[:6]}"
    v1 = register_version(reg, fam, adapters[0])
    reg.promote(fam, v1, actor="test")
    run_id = reg.create_run("serving-tests")
    failed = reg.register(fam, run_id, {"adapter": adapters[1]}, {"base_sha256": model_weights_hash(BASE)},
                          False).version
    state = build_state(ws, RolloutConfig(steps=(0.5, 1.0), requests_per_step=20, min_samples=4), KEY)
    load_champions(state, ws)
    try:
        with running(create_app(state)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            r = c.post("/admin/adapters/load", json={"family": fam, "version": failed}, headers=AUTH)
            assert r.status_code == 409 and r.json()["error"]["code"] == "gates_failed", r.text
            r = load(c, fam, failed, adapters[1], status=409)  # by path: the registry still has the last word
            assert r["error"]["code"] == "gates_failed"
            r = c.post("/admin/rollout/start", json={"family": fam, "challenger": failed}, headers=AUTH)
            assert r.status_code == 409 and r.json()["error"]["code"] == "gates_failed", r.text
            # a ref naming another version than the one it is loaded as
            r = c.post("/admin/adapters/load", json={"family": fam, "version": "9", "ref": f"{fam}@{v1}"},
                       headers=AUTH)
            assert r.status_code == 400 and r.json()["error"]["code"] == "ref_mismatch", r.text
            models = {m["id"] for m in c.get("/v1/models").json()["data"]}
            assert f"{fam}@9" not in models and f"{fam}@{failed}" not in models
            assert complete(c, fam).json()["adapterops"]["version"] == v1
        assert reg.alias(fam, "champion") == v1 and reg.alias(fam, "challenger") is None
    finally:
        state.engine.close()
        state.log.close()
