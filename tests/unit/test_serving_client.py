"""The admin client's errors and the `adapterops rollout status` table, on real controller states; no server (the
CLI against a running server is tests/integration/test_serving_ops.py)."""

import socket

import pytest

from pipelines import cli
from serving.client import CHECKS, AdminAPIError, AdminClient, last_verdicts, render_status
from serving.rollout import RolloutConfig, RolloutController


def controller(tmp_path):
    return RolloutController(tmp_path / "s.json", RolloutConfig(steps=(0.5, 1.0), requests_per_step=20,
                                                                min_samples=5),
                             on_promote=lambda *a: None, on_rollback=lambda *a: None)


def test_table_shows_step_weight_and_last_verdicts(tmp_path):
    ctl = controller(tmp_path)
    ctl.start("fam", "1", "2")
    table = render_status(ctl.status())
    head, row = table.splitlines()
    assert head.split() == ["family", "champion", "challenger", "status", "step", "weight", *CHECKS]
    assert row.split() == ["fam", "1", "2", "running", "1/2", "0.50", "-", "-", "-", "-"]  # nothing analysed yet
    for i in range(20):  # end step 1: both arms get 10 requests, the challenger's are all errors
        ctl.record("fam", "2" if i % 2 else "1", f"r{i}", 10.0, bool(i % 2), None)
    st = ctl.status("fam")
    verdicts = last_verdicts(st)
    assert verdicts == {name: c["verdict"] for name, c in st["history"][-1]["analysis"]["checks"].items()}
    assert verdicts["error_rate"] == "fail" and verdicts["response_nll"] == "skipped"
    one = render_status(st)  # a single family's status renders the same way
    assert one.splitlines()[1].split()[:6] == ["fam", "1", "2", st["status"], f"{st['step'] + 1}/2",
                                               f"{st['weight']:.2f}"]
    assert "fail" in one.splitlines()[1]


def test_ended_rollout_shows_its_reason_and_empty_server_says_so(tmp_path):
    ctl = controller(tmp_path)
    ctl.start("fam", "1", "2", baseline="base")
    ctl.abort("fam", "operator changed their mind")
    lines = render_status(ctl.status()).splitlines()
    assert "aborted" in lines[1] and "1 (fallback base)" in lines[1]
    assert lines[-1] == "fam: operator changed their mind"
    assert render_status({"rollouts": {}, "finished": []}) == "no rollouts on this server"


def test_client_needs_a_key_and_names_an_unreachable_server():
    with pytest.raises(AdminAPIError, match="ADAPTEROPS_API_KEY"):
        AdminClient("http://127.0.0.1:1", None)
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with AdminClient(f"http://127.0.0.1:{port}", "k", timeout=5) as c:
        with pytest.raises(AdminAPIError, match=rf"cannot reach the adapterops server at http://127.0.0.1:{port}"):
            c.rollout_status()


def test_cli_rollout_arguments():
    p = cli.build_parser()
    a = p.parse_args(["rollout", "start", "fam", "--steps", "0.1,1", "--requests-per-step", "30", "--gradual",
                      "--url", "http://h:1", "--api-key", "k"])
    assert (a.family, a.challenger, a.steps, a.requests_per_step, a.gradual, a.url) == ("fam", None, "0.1,1", 30,
                                                                                        True, "http://h:1")
    assert p.parse_args(["rollout", "start", "fam", "--no-gradual"]).gradual is False
    assert p.parse_args(["rollout", "start", "fam"]).gradual is None  # None: the server's default
    a = p.parse_args(["rollout", "status", "--json"])
    assert a.family is None and a.json and a.func is cli.cmd_rollout


def test_cli_rollout_errors_are_one_line(capsys, monkeypatch):
    monkeypatch.delenv("ADAPTEROPS_API_KEY", raising=False)
    assert cli.main(["rollout", "status"]) == 2
    assert capsys.readouterr().err.startswith("error: no API key")
    assert cli.main(["rollout", "start", "fam", "--steps", "a,b", "--api-key", "k"]) == 2
    assert "not a comma-separated list" in capsys.readouterr().err
