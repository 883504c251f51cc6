"""The `adapterops` CLI: every (sub)command's help renders, argparse errors exit 2, and bad input becomes one
readable paragraph with exit code 2 instead of a traceback.

In-process tests use only the parser. The few that run the installed `adapterops` script start their subprocesses
together (each costs seconds of torch/transformers imports) and share the results.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import cli
from pipelines.config import REPO_ROOT

ADAPTEROPS = Path(sys.executable).parent / "adapterops"
TOP_COMMANDS = ["demo", "base", "init-cache", "train", "merge", "registry", "serve", "monitor", "retrain", "rollout",
                "schedules", "build", "ingest"]
LEAVES = [("demo",), ("base", "build"), ("init-cache",), ("train",), ("merge",), ("build",), ("ingest",),
          ("registry", "list"),
          ("registry", "show"), ("registry", "promote"), ("registry", "rollback"), ("registry", "history"),
          ("registry", "recover"), ("registry", "verify"), ("registry", "ping"),
          ("serve",), ("monitor", "check"), ("retrain",), ("rollout", "status"), ("rollout", "start"),
          ("rollout", "abort"), ("schedules", "serve")]
GROUPS = [("base",), ("registry",), ("monitor",), ("rollout",), ("schedules",)]


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))


@pytest.fixture
def clean_env(monkeypatch):
    """main() sets HF_HUB_OFFLINE & co. with setdefault; keep that out of the rest of the test session."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "DO_NOT_TRACK"):
        monkeypatch.setenv(var, "1")
    monkeypatch.delenv("ADAPTEROPS_DEBUG", raising=False)


# -- the parser tree ----------------------------------------------------------------------------------------------

def test_parser_tree_is_what_the_tests_cover():
    paths = {path for path, _ in _walk(cli.build_parser()) if path}
    assert paths == set(LEAVES) | set(GROUPS)


@pytest.mark.parametrize("path", LEAVES + GROUPS, ids=" ".join)
def test_every_parser_formats_its_help(path):
    parsers = dict(_walk(cli.build_parser()))
    text = parsers[path].format_help()
    assert text.startswith("usage: adapterops " + " ".join(path))


@pytest.mark.parametrize("path", [p for p in LEAVES + GROUPS if p != ("base", "build")], ids=" ".join)
def test_help_flag_exits_0(path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args([*path, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: adapterops " + " ".join(path)) and "-h, --help" in out


def test_base_build_help_goes_to_base_build(capsys, clean_env):
    """`base build` has its own parser (pipelines.base_build.main); the CLI hands it the rest of argv."""
    with pytest.raises(SystemExit) as e:
        cli.main(["base", "build", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: adapterops base build") and "--out" in out and "--vocab-size" in out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in TOP_COMMANDS:
        assert re.search(rf"^\s+{re.escape(name)}\s", out, re.M), name


def test_leaf_help_texts_show_required_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["merge", "--help"])
    out = capsys.readouterr().out
    for opt in ("--adapter", "--out", "--val", "--quantize", "--report-json"):
        assert opt in out


# -- argparse errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--train", "a", "--val", "b", "--out", "c", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
        (["registry"], "the following arguments are required: ACTION"),
        (["merge", "--adapter", "a", "--out", "o"], "the following arguments are required: --val"),
        (["merge", "--adapter", "a", "--out", "o", "--val", "v", "--quantize", "fp3"], "invalid choice: 'fp3'"),
        (["init-cache", "warm", "--rank", "eight"], "argument --rank: invalid int value: 'eight'"),
        (["init-cache", "explode"], "invalid choice: 'explode'"),
        (["registry", "show", "fam"], "the following arguments are required: version"),
    ],
)
def test_argparse_errors_exit_2(argv, message, capsys, clean_env):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: adapterops" in err and message in err


def test_cli_error_is_one_line_exit_2(tmp_path, monkeypatch, capsys, clean_env):
    """A CliError raised by a command: `error: ...` on stderr, exit 2, no traceback."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["init-cache", "evict", "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert err == "error: init-cache evict needs --key; list the keys with `adapterops init-cache ls`\n"


def test_demo_summary_json_defaults_into_the_workdir(monkeypatch, clean_env):
    seen = []

    def record(args):
        seen.append(args)
        return 0

    parser = _with_func(cli.build_parser(), "demo", record)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main(["demo", "--workdir", "w/x"]) == 0
    assert seen[0].summary_json == str(Path("w/x") / "summary.json")


def _with_func(parser, command, func):
    dict(_walk(parser))[(command,)].set_defaults(func=func)
    return parser


def test_unknown_exception_type_is_not_swallowed(monkeypatch, clean_env):
    """Only the project's known error types become a paragraph; a programming error keeps its traceback."""
    parser = cli.build_parser()

    def boom(args):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser, "serve", boom))
    with pytest.raises(ZeroDivisionError):
        cli.main(["serve"])


def test_adapterops_debug_reraises_known_errors(monkeypatch, tmp_path, clean_env):
    monkeypatch.setenv("ADAPTEROPS_DEBUG", "1")
    with pytest.raises(cli.CliError):
        cli.main(["init-cache", "evict", "--store", str(tmp_path / "store")])


def test_config_files_named_in_help_exist():
    texts = "\n".join(p.format_help() for _, p in _walk(cli.build_parser()))
    named = set(re.findall(r"configs/[\w./-]+\.yaml", texts))
    assert named
    missing = sorted(n for n in named if not (REPO_ROOT / n).is_file())
    assert not missing, f"help names config files that do not exist: {missing}"


# -- the installed script, in subprocesses ------------------------------------------------------------------------

BAD_DEMO_YAML = "family: support-assistant\ninit:\n  method: pissa\n  rnak: 4\n"


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory):
    """Start every subprocess at once (they spend their time importing), then collect them."""
    cwd = tmp_path_factory.mktemp("cli")
    (cwd / "bad.yaml").write_text(BAD_DEMO_YAML)
    (cwd / "utf16.jsonl").write_bytes('{"prompt": "a", "response": "b"}\n'.encode("utf-16"))
    env = {k: v for k, v in os.environ.items() if k not in ("ADAPTEROPS_DEBUG", "PREFECT_HOME")}
    env["HF_HUB_OFFLINE"] = "1"
    argvs = {
        "help": ["--help"],
        "merge": ["merge", "--base", "/nonexistent", "--adapter", "/nonexistent", "--out", "X", "--val", "Y"],
        "demo": ["demo", "--config", str(cwd / "bad.yaml"), "--workdir", str(cwd / "demo-wd")],
        "train": ["train", "--base", "/nonexistent/dir", "--train", "a", "--val", "b", "--out", "c",
                  "--store", str(cwd / "store"), "--scratch", str(cwd / "scratch")],
        "train-utf16": ["train", "--train", str(cwd / "utf16.jsonl"), "--val", str(cwd / "utf16.jsonl"), "--out",
                        str(cwd / "out"), "--store", str(cwd / "store"), "--scratch", str(cwd / "scratch")],
        "registry-typo": ["registry", "--tracking-uri", f"sqlite:///{cwd}/typo/mlflow.db", "list"],
    }
    procs = {name: subprocess.Popen([str(ADAPTEROPS), *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, argv in argvs.items()}
    results = {}
    try:
        for name, p in procs.items():
            out, err = p.communicate(timeout=240)
            results[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    results["cwd"] = cwd
    return results


def _assert_one_paragraph_error(res) -> str:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    err = res.stderr.strip()
    assert err.startswith("error: "), err
    assert "\n\n" not in err and err.count("error: ") == 1
    return err


def test_script_help_lists_every_command(script_runs):
    res = script_runs["help"]
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: adapterops")
    for name in TOP_COMMANDS:
        assert re.search(rf"^\s+{re.escape(name)}\s", res.stdout, re.M), name


def test_script_merge_missing_adapter(script_runs):
    err = _assert_one_paragraph_error(script_runs["merge"])
    assert "/nonexistent" in err and "adapter" in err


def test_script_demo_unknown_key(script_runs):
    err = _assert_one_paragraph_error(script_runs["demo"])
    assert "rnak" in err and "init" in err and "bad.yaml" in err and "valid keys are" in err


def test_script_demo_bad_config_creates_nothing(script_runs):
    assert script_runs["demo"].returncode == 2
    assert not (script_runs["cwd"] / "demo-wd").exists()


def test_script_train_missing_base(script_runs):
    err = _assert_one_paragraph_error(script_runs["train"])
    assert "/nonexistent/dir" in err


def test_script_train_non_utf8_data_is_one_line_before_any_work(script_runs):
    err = _assert_one_paragraph_error(script_runs["train-utf16"])
    assert "utf16.jsonl is not UTF-8 text" in err
    assert not (script_runs["cwd"] / "store").exists() and not (script_runs["cwd"] / "out").exists()


def test_script_registry_typo_creates_no_database(script_runs):
    err = _assert_one_paragraph_error(script_runs["registry-typo"])
    assert "no registry at" in err and not (script_runs["cwd"] / "typo").exists()


def test_serve_binds_where_the_profile_says_unless_told(monkeypatch, tmp_path):
    """--host / --port default to the profile's serving_host / serving_port (they were read by nothing)."""
    from pipelines import serve as serve_mod

    (tmp_path / "mlflow.db").touch()
    seen = {}
    monkeypatch.setattr(serve_mod, "serve", lambda ws, host, port, *a, **kw: seen.update(host=host, port=port, **kw))
    assert cli.main(["serve", "--workdir", str(tmp_path)]) == 0
    assert (seen["host"], seen["port"], seen["auto_canary_without_feedback"]) == ("127.0.0.1", 8000, False)
    profile = tmp_path / "p.yaml"
    profile.write_text("serving_host: 127.0.0.2\nserving_port: 8123\n")
    assert cli.main(["serve", "--workdir", str(tmp_path), "--profile", str(profile), "--auto-canary", "5",
                     "--auto-canary-without-feedback"]) == 0
    assert (seen["host"], seen["port"], seen["auto_canary_without_feedback"]) == ("127.0.0.2", 8123, True)
    assert cli.main(["serve", "--workdir", str(tmp_path), "--profile", str(profile), "--port", "9001"]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.2", 9001)
