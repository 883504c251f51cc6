"""The `adapterops` command line. Heavy libraries are imported inside each command, so `--help` is instant.

The options of each stage's config are generated from its dataclass (command_options(), pipelines/options.py): a
field added to InitConfig, TrainConfig, MergeConfig, EngineSpec or pipelines.schedules.ScheduleConfig is a flag of
the commands that use it, with its type, default and docstring; choices come from the registries
(pipelines/methods.py, pipelines.lm.QUANTIZERS). This module imports neither infra/ nor Prefect (the schedules'
deployments are built by pipelines/schedules.py, in the flow layer).

Run:  adapterops --help;  adapterops <command> --help
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path

from pipelines.config import CONFIG_DIR, REPO_ROOT
from pipelines.options import Options

DEFAULT_BASE = REPO_ROOT / "models" / "tiny-llama"


class CliError(Exception):
    """A user-facing error: printed as one paragraph, exit code 2."""


def _workspace(args, base=None):
    """The work dir under the chosen profile (local: everything under the work dir; production: servers)."""
    from pipelines.profile import load_profile
    from pipelines.workspace import Workspace

    profile = load_profile(getattr(args, "profile", "local"))
    if profile.prefect_api_url:
        os.environ.setdefault("PREFECT_API_URL", profile.prefect_api_url)
    return Workspace.create(Path(args.workdir), Path(base or getattr(args, "base", DEFAULT_BASE)),
                            tracking_uri=profile.tracking_uri,
                            init_store_uri=getattr(args, "store", "") or profile.init_store_uri,
                            s3_endpoint_url=profile.s3_endpoint_url, state_db_url=profile.state_db_url,
                            artifact_root=profile.artifact_root)


# -- demo --------------------------------------------------------------------------------------------------------

def _prefect_env(workdir: str) -> None:
    """Prefect's temporary local server (local profile) keeps its database in the work dir; on a busy 2-core
    machine it needs more than its default 20 s to start."""
    os.environ.setdefault("PREFECT_HOME", str(Path(workdir).resolve() / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry attempts


def cmd_demo(args) -> int:
    from pipelines.lifecycle import load_config

    _check_text_file(args.config, "--config", "a UTF-8 YAML file (see configs/demo.yaml)")
    cfg = load_config(args.config)  # validate before creating anything or the slow imports
    _check_out_dir(args.workdir, "--workdir")
    engine = _engine_spec(args)
    from pipelines.profile import load_profile

    load_profile(args.profile)
    _prefect_env(args.workdir)
    ws = _workspace(args, base=cfg.base)
    from pipelines.flows import demo

    summary = demo(cfg, ws, Path(args.summary_json), engine=engine)
    return 0 if summary["champion"] else 1


def _engine_spec(args):
    opts = command_options()[(args.command,)]["engine"]
    for flag, value in (("--max-loras", args.engine_max_loras), ("--max-lora-rank", args.engine_max_lora_rank)):
        if value < 1:
            raise CliError(f"{flag} must be at least 1, got {value}")
    try:
        return opts.build(args)
    except ValueError as e:
        raise CliError(str(e)) from None


# -- base --------------------------------------------------------------------------------------------------------

def cmd_base_build(args, rest) -> int:
    from pipelines import base_build

    return base_build.main(rest)


# -- init cache --------------------------------------------------------------------------------------------------

def _init_cfg(args):
    import math

    from pipelines.lm import require_bitsandbytes

    if not (math.isfinite(args.init_alpha) and args.init_alpha > 0):
        raise CliError(f"--alpha is the LoRA scaling numerator and must be a positive number, got {args.init_alpha}")
    targets = args.init_target_modules
    if targets == "":  # as before the options were generated: an empty --targets means every Llama linear
        from pipelines.init_cache import DEFAULT_TARGETS

        args.init_target_modules = targets = DEFAULT_TARGETS
    if isinstance(targets, str) and not all(t.strip() for t in targets.split(",")):
        raise CliError(f"--targets {targets!r} holds an empty module name; pass comma-separated names such as "
                       "q_proj,v_proj (or leave it out for every Llama linear)")
    cfg = command_options()[(args.command,)]["init"].build(args)
    if cfg.base_quant != "none":
        try:
            require_bitsandbytes(cfg.base_quant)
        except RuntimeError as e:
            raise CliError(str(e)) from None
    return cfg


def cmd_init_cache(args) -> int:
    from registry.store import open_store

    if args.action == "evict" and not args.key:
        raise CliError("init-cache evict needs --key; list the keys with `adapterops init-cache ls`")
    if args.action != "warm" and "://" not in args.store and not Path(args.store).exists():
        raise CliError(f"no init cache at {args.store} (the directory does not exist); check --store (default "
                       "work/init-cache), or warm an entry first")
    store = open_store(args.store, os.environ.get("AWS_ENDPOINT_URL"))
    if args.action == "warm":
        from pipelines import init_cache

        res = init_cache.run(_init_cfg(args), Path(args.base), store, Path(args.scratch))
        print(json.dumps({"key": res.key, "hit": res.hit, "path": str(res.path), "seconds": round(res.seconds, 2)}))
    elif args.action == "ls":
        for entry in store.list():
            meta = entry.get("meta", {})
            if entry.get("corrupt"):
                print(f"{entry['key']}  CORRUPT: {entry['corrupt']}")
                continue
            print(f"{entry['key']}  files={len(entry['files'])}  base={meta.get('base_sha256', '?')[:12]}")
    elif args.action == "verify":
        keys = [args.key] if args.key else [e["key"] for e in store.list()]
        bad = 0
        for k in keys:
            problems = store.verify(k)
            bad += bool(problems)
            print(f"{k}: {'ok' if not problems else '; '.join(problems)}")
        return 1 if bad else 0
    elif args.action == "evict":
        store.delete(args.key)
        print(f"evicted {args.key}")
    return 0


# -- train / merge -----------------------------------------------------------------------------------------------

def _check_text_file(path: str, flag: str, what: str) -> Path:
    """A file that must exist, be readable and be UTF-8 text; CliError naming the flag otherwise."""
    p = Path(path)
    if p.is_dir():
        raise CliError(f"{flag} {p} is a directory; pass {what}")
    if not p.exists():
        raise CliError(f"{flag} {p} does not exist; pass {what}")
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CliError(f"{flag} {p} cannot be read ({e.strerror}); fix its permissions or pass {what}") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"{flag} {p} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                       f"pass {what}") from None
    return p


def _check_jsonl(path: str, flag: str) -> None:
    """A prompt/response dataset, read in full before any expensive work (init-cache SVD, a Prefect server)."""
    from pipelines.data import DataError, read_jsonl

    p = _check_text_file(path, flag, "a UTF-8 prompt/response JSONL file")
    try:
        read_jsonl(p)
    except DataError as e:
        hint = "" if "; " in str(e) else "; fix the file: one JSON object per line with string 'prompt' and 'response'"
        raise CliError(f"{flag}: {e}{hint}") from None


def _check_out_dir(path: str, flag: str = "--out") -> None:
    p = Path(path)
    blocker = next((q for q in [p, *p.parents] if q.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise CliError(f"{flag} {p} cannot be created: {blocker} is a file; pass a directory path")


def _check_base(path: str, flag: str = "--base") -> None:
    if not (Path(path) / "config.json").is_file():
        raise CliError(f"{flag} {path} is not a model directory (no config.json); pass the directory of a saved "
                       f"causal LM, e.g. models/tiny-llama")


def _load_yaml_config(cls, path: str, flag: str = "--config"):
    from pipelines.config import load

    _check_text_file(path, flag, "a UTF-8 YAML file (see configs/)")
    return load(cls, path)


def cmd_train(args) -> int:
    from pipelines import init_cache, train
    from registry.store import open_store

    # every input is checked before the init cache is touched (its SVD takes minutes on a real base)
    _check_base(args.base)
    _check_jsonl(args.train, "--train")
    _check_jsonl(args.val, "--val")
    _check_out_dir(args.out)
    if args.parent and not (Path(args.parent) / "manifest.json").is_file():
        raise CliError(f"--parent {args.parent} is not a training output (no manifest.json); pass the --out of an "
                       "earlier `adapterops train`")
    cfg = _load_yaml_config(train.TrainConfig, args.config) if args.config else train.TrainConfig()
    cfg = command_options()[("train",)]["train"].build(args, base=cfg)  # a flag wins over the YAML
    init_cfg = _init_cfg(args)
    store = open_store(args.store, os.environ.get("AWS_ENDPOINT_URL"))
    init = init_cache.run(init_cfg, Path(args.base), store, Path(args.scratch))
    out = train.run(cfg, Path(args.base), init.path, Path(args.train), Path(args.val), Path(args.out),
                    parent=Path(args.parent) if args.parent else None)
    print(out)
    return 0


def cmd_merge(args) -> int:
    from pipelines import merge_quantize as mq

    _check_out_dir(args.out)
    if args.report_json:
        _check_out_dir(str(Path(args.report_json).parent), "--report-json")
        if Path(args.report_json).is_dir():
            raise CliError(f"--report-json {args.report_json} is a directory; pass a file path")
    cfg = _load_yaml_config(mq.MergeConfig, args.config) if args.config else mq.MergeConfig()
    cfg = command_options()[("merge",)]["merge"].build(args, base=cfg)  # a flag wins over the YAML
    try:
        out = mq.run(cfg, Path(args.base), Path(args.adapter), Path(args.val), Path(args.out),
                     expect_golden=Path(args.expect_golden) if args.expect_golden else None)
        report = json.loads((out / "gates.json").read_text())
        code = 0
    except mq.GateFailed as e:
        report, code = e.report, 1
        print(f"error: {e}", file=sys.stderr)
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(report, indent=2) + "\n")
    return code


# -- registry ----------------------------------------------------------------------------------------------------

def cmd_registry(args) -> int:
    from dataclasses import asdict

    from registry import display
    from registry.versions import AdapterRegistry, RegistryError

    if getattr(args, "wait", 0.0) < 0:
        raise CliError(f"--wait is in seconds and must be >= 0, got {args.wait}")
    # no registry command creates a database: a mistyped SQLite path is refused, not made into an empty registry
    reg = AdapterRegistry(args.tracking_uri or None, lease_wait_seconds=getattr(args, "wait", 15.0), create=False)

    def emit(data, text: str) -> None:
        print(json.dumps(data, indent=2, default=str) if args.json else text)

    def note_pending(family: str) -> None:
        try:
            intent = reg.in_flight(family)[0]
        except RegistryError as e:  # an unreadable intent record: readers go on, writers refuse
            print(f"note: {e}", file=sys.stderr)
            return
        if intent is not None and not args.json:
            print(f"note: an alias move of {family} is unfinished ({intent['op']} v{intent['from_version'] or '-'} "
                  f"-> v{intent['to_version'] or '-'} by {intent['actor']}): shown as it ends; "
                  f"`adapterops registry recover {family}` completes it", file=sys.stderr)

    if args.action == "list":
        families = [args.family] if args.family else reg.families()
        versions = [v for fam in families for v in reg.list_versions(fam)]
        for fam in families:
            note_pending(fam)
        emit([display.version_dict(v) for v in versions], display.render_list(versions))
    elif args.action == "show":
        v, history = reg.get(args.family, args.version), reg.history(args.family)
        note_pending(args.family)
        mine = [asdict(r) for r in history if v.version in (r.from_version, r.to_version)]
        emit({**display.version_dict(v), "history": mine}, display.render_show(v, history))
    elif args.action in ("promote", "rollback"):
        actor = args.actor or os.environ.get("USER", "cli")
        if args.action == "promote":
            rec = reg.promote(args.family, args.version, actor=actor, reason=args.reason,
                              allow_base_change=args.allow_base_change)
        else:
            rec = reg.rollback(args.family, actor=actor, reason=args.reason)
        text = (rec.reason if rec.op == "noop" else
                f"{rec.op}: {rec.family} champion v{rec.from_version or '-'} -> v{rec.to_version} by {rec.actor}")
        emit(asdict(rec), text)
    elif args.action == "history":
        aliases, history = reg.aliases(args.family), reg.history(args.family)
        try:
            intent, leases = reg.in_flight(args.family)
        except RegistryError as e:
            print(f"note: {e}", file=sys.stderr)
            intent, leases = None, []
        emit(display.history_dict(args.family, aliases, history, intent, leases),
             display.render_history(args.family, aliases, history, intent, leases))
    elif args.action == "recover":
        rec = reg.recover(args.family, discard_unreadable_intent=args.discard_intent)
        if rec is None:
            emit(None, f"{args.family}: no unfinished alias move; nothing to do")
        else:
            emit(asdict(rec), f"recovered: {rec.op} of {rec.family} v{rec.from_version or '-'} -> "
                              f"v{rec.to_version or '-'} by {rec.actor} completed")
    elif args.action == "verify":
        rows = reg.verify(args.family, args.version)
        bad = [r for r in rows if r["status"] != "ok"]
        emit({"family": args.family, "ok": not bad, "artifacts": rows},
             "\n".join(display.table(["version", "artifact", "status", "detail"],
                                      [[r["version"], r["artifact"], r["status"], r["detail"]] for r in rows])
                        + [f"{len(rows) - len(bad)} ok, {len(bad)} with problems"]))
        return 1 if bad else 0
    elif args.action == "ping":
        res = reg.ping()
        emit(res, f"ok: {res['uri']} answered a registry query in {res['seconds']:.3f} s")
    return 0


# -- serve / monitor / retrain -----------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    from pipelines.serve import serve

    if not os.environ.get("MLFLOW_TRACKING_URI") and not (Path(args.workdir) / "mlflow.db").is_file():
        raise CliError(f"{args.workdir} holds no mlflow.db; run `adapterops demo --workdir {args.workdir}` first, "
                       f"or point MLFLOW_TRACKING_URI (or --profile) at a registry")
    fallback_cfg = None
    if args.fallback_config:
        from serving.fallback import FallbackConfig

        fallback_cfg = _load_yaml_config(FallbackConfig, args.fallback_config, "--fallback-config")
    if args.auto_canary is not None and args.auto_canary <= 0:
        raise CliError(f"--auto-canary is a polling interval in seconds and must be > 0, got {args.auto_canary}")
    if args.auto_canary_without_feedback and args.auto_canary is None:
        raise CliError("--auto-canary-without-feedback only applies with --auto-canary SECONDS")
    if args.port is not None and not 1 <= args.port <= 65535:
        raise CliError(f"--port must be in [1, 65535], got {args.port}")
    from pipelines.profile import load_profile

    host, port = load_profile(args.profile).serving_address(args.host, args.port)
    engine = _engine_spec(args)
    serve(_workspace(args), host, port, os.environ.get("ADAPTEROPS_API_KEY"), fallback_cfg=fallback_cfg,
          auto_canary_poll_s=args.auto_canary, engine=engine,
          auto_canary_without_feedback=args.auto_canary_without_feedback)
    return 0


def cmd_rollout(args) -> int:
    from serving.client import AdminAPIError, AdminClient, render_status

    steps = None
    if getattr(args, "steps", None):
        try:
            steps = [float(x) for x in args.steps.split(",")]
        except ValueError:
            raise CliError(f"--steps {args.steps!r} is not a comma-separated list of traffic shares, e.g. "
                           f"0.05,0.25,0.5,1") from None
        if not all(0 < x <= 1 for x in steps):
            raise CliError(f"--steps {args.steps!r}: every traffic share must be in (0, 1], e.g. 0.05,0.25,0.5,1")
    if getattr(args, "requests_per_step", None) is not None and args.requests_per_step < 1:
        raise CliError(f"--requests-per-step must be at least 1, got {args.requests_per_step}")
    try:
        with AdminClient(args.url, args.api_key or os.environ.get("ADAPTEROPS_API_KEY")) as client:
            if args.action == "status":
                out = client.rollout_status(args.family)
            elif args.action == "start":
                out = client.start_rollout(args.family, args.challenger, steps, args.requests_per_step,
                                           args.gradual)
            else:
                out = client.abort_rollout(args.family, args.reason)
    except AdminAPIError as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if args.action == "start":
        ro, parity = out["rollout"], out["parity"]
        print(f"started: {ro['family']}@{ro['challenger']} against champion {ro['champion']}, steps "
              f"{ro['config']['steps']}, {ro['config']['requests_per_step']} requests per step, gradual rollback "
              f"{'on' if ro['config']['gradual_rollback'] else 'off'}; parity: "
              f"{'passed' if parity['passed'] else parity.get('reason', 'not checked')}")
    print(render_status(out.get("rollout", out)))
    return 0


def cmd_monitor_check(args) -> int:
    from monitoring.check import run_from_args

    return run_from_args(args)


def cmd_retrain(args) -> int:
    from dataclasses import asdict

    from pipelines.lifecycle import load_config

    _check_text_file(args.config, "--config", "a UTF-8 YAML file (see configs/demo.yaml)")
    cfg = load_config(args.config)
    # the files are checked before a Prefect server starts or anything is written
    _check_base(args.base)
    for flag, path in (("--new-train", args.new_train), ("--new-val", args.new_val), ("--old-train", args.old_train),
                       ("--old-val", args.old_val)):
        _check_jsonl(path, flag)
    if args.replay_ratio is not None and not 0 <= args.replay_ratio < 1:
        raise CliError(f"--replay-ratio is the share of old examples in the mix and must be in [0, 1), got "
                       f"{args.replay_ratio}")
    _check_out_dir(args.workdir, "--workdir")
    _prefect_env(args.workdir)
    from pipelines.flows import retrain

    ws = _workspace(args)
    out = retrain(ws, args.family, args.name, asdict(cfg.init), asdict(cfg.retrain), asdict(cfg.merge),
                  Path(args.new_train), Path(args.new_val), Path(args.old_train), Path(args.old_val),
                  replay_ratio=args.replay_ratio if args.replay_ratio is not None else cfg.replay_ratio)
    print(json.dumps(out, indent=2, default=str))
    return 0


# -- build / ingest ----------------------------------------------------------------------------------------------

def _progress(args):
    """Where a command's progress lines go: stderr under --json (stdout holds only the JSON), else stdout."""
    return (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print


def cmd_build(args) -> int:
    """pipelines.onboard.run: a family's first version from the user's data; exit 1 when a gate fails (as merge)."""
    from pipelines import onboard

    _check_base(args.base)
    _check_out_dir(args.workdir, "--workdir")
    for flag, path in (("--train", args.build_train), ("--val", args.build_val)):
        _check_jsonl(str(path), flag)
    for flag in ("init_config", "train_config", "merge_config"):
        if getattr(args, f"build_{flag}") is not None:
            _check_text_file(str(getattr(args, f"build_{flag}")), f"--{flag.replace('_', '-')}",
                             "a UTF-8 YAML file (see configs/)")
    cfg = command_options()[("build",)]["build"].build(args)  # loads and checks the three YAMLs
    summary = onboard.run(cfg, _workspace(args), log=_progress(args))
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_ingest(args) -> int:
    """pipelines.ingest.run: the newest labelled window <data>/<family>/new/ from the log; prints its manifest."""
    from pipelines import ingest
    from pipelines.profile import load_profile

    cfg = command_options()[("ingest",)]["ingest"].build(args)
    if cfg.extra is not None:
        _check_jsonl(str(cfg.extra), "--extra")
    if not (load_profile(args.profile).state_db_url or os.environ.get("ADAPTEROPS_STATE_DB_URL")) and \
            not (Path(args.workdir) / "predictions.db").is_file():
        raise CliError(f"{args.workdir} holds no predictions.db (the prediction log serving writes); pass the "
                       "--workdir of `adapterops serve`, or a --profile whose state_db_url names the shared log")
    out = ingest.run(cfg, _workspace(args), log=_progress(args))
    print((out / "manifest.json").read_text().rstrip())
    return 0


# -- schedules ---------------------------------------------------------------------------------------------------

def cmd_schedules(args) -> int:
    """Serve the Prefect deployments of pipelines/schedules.py (monitor checks, reference perplexity, retraining on
    a jittered cron and on drift alerts) until interrupted."""
    for flag, value in (("--monitor-interval", args.schedule_monitor_interval),
                        ("--ppl-interval", args.schedule_ppl_interval)):
        if value < 1:
            raise CliError(f"{flag} must be at least 1 second, got {value}")
    from pipelines.lifecycle import load_config

    _check_text_file(args.schedule_retrain_config, "--config", "a UTF-8 YAML file (see configs/demo.yaml)")
    cfg = load_config(args.schedule_retrain_config)  # validate before starting anything
    schedule = command_options()[("schedules", "serve")]["schedule"].build(args)
    schedule.families = schedule.families or [cfg.family]
    schedule.retrain_config = str(Path(schedule.retrain_config).resolve())
    if schedule.data_dir:
        schedule.data_dir = str(Path(schedule.data_dir).resolve())
    _prefect_env(args.workdir)
    ws = _workspace(args)  # checks the base model, creates the work dir
    import contextlib

    from pipelines import schedules

    env = {**os.environ, "ADAPTEROPS_WORKDIR": str(ws.root), "ADAPTEROPS_BASE_DIR": str(ws.base_path),
           "ADAPTEROPS_PROFILE": args.profile}
    with contextlib.ExitStack() as stack:
        if not os.environ.get("PREFECT_API_URL"):  # set by the profile, the environment, or here
            url = stack.enter_context(schedules.local_server(os.environ["PREFECT_HOME"]))
            os.environ["PREFECT_API_URL"] = url
            stack.callback(os.environ.pop, "PREFECT_API_URL", None)
            if not os.environ.get("PREFECT_UI_URL"):  # Prefect's "view your deployments" link, else port 4200's
                os.environ["PREFECT_UI_URL"] = url.removesuffix("/api")
                stack.callback(os.environ.pop, "PREFECT_UI_URL", None)
        else:  # before the slow imports of Prefect and the flows: a dead server is one line within seconds
            schedules.check_server(os.environ["PREFECT_API_URL"])
        print(f"Prefect API: {os.environ['PREFECT_API_URL']}", flush=True)
        built = schedules.build_deployments(env, schedule)
        print(schedules.describe(built, schedule), flush=True)
        schedules.serve(built)
    return 0


# -- errors ------------------------------------------------------------------------------------------------------
# One mapping from exception *types* (isinstance, so subclasses count) to one line `what is wrong; what to do` and an
# exit code. Types of modules that were never imported cannot have been raised, so they are looked up lazily.

def _loaded(module: str, name: str):
    cls = getattr(sys.modules.get(module), name, None)
    return cls if isinstance(cls, type) else None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _file_in_traceback(e: BaseException) -> str | None:
    """The file a decoder was reading when it failed: the innermost frame's `path` or open file's name."""
    import io

    tb, found = e.__traceback__, None
    while tb is not None:
        local = tb.tb_frame.f_locals
        for key in ("path", "filename", "file", "checkpoint_file", "resolved_archive_file", "f", "fp"):
            value = local.get(key)
            if isinstance(value, io.IOBase):  # an open file: its name
                value = getattr(value, "name", None)
            elif key in ("f", "fp"):
                continue  # not a file object (a loop variable, a dataclass field, ...)
            elif isinstance(value, str) and os.sep not in value:
                continue  # a bare word, not a path
            if isinstance(value, (str, Path)) and str(value) and not str(value).isdigit():
                found = str(value)
                break
        tb = tb.tb_next
    return found


def _os_error(e: OSError) -> str:
    where = e.filename if e.filename is not None else ""
    if e.strerror is None or not where:  # raised by our code with its own message
        return _one_line(str(e))
    hint = {
        FileNotFoundError: "check the path",
        NotADirectoryError: "a path that must be a directory (or lie inside one) is a file; pass a directory",
        IsADirectoryError: "a path that must be a file is a directory; pass the file",
        FileExistsError: "a file is in the way; remove it or pass another path",
        PermissionError: "fix its permissions or pass a path you can write",
    }.get(type(e), "check the path and the disk")
    return f"{e.strerror}: {where}; {hint}"


def _hinted(e: BaseException | str, hint: str) -> str:
    """The message on one line, ending in what to do: `hint` is added when the message names no remedy."""
    text = _one_line(str(e))
    return text if "; " in text else f"{text.rstrip('.')}; {hint}"


def describe_error(e: BaseException, command: str | None = None) -> tuple[str, int] | None:
    """(one-line message, exit code) for an error the user can act on; None for a bug (its traceback is kept)."""
    exit_1 = tuple(c for c in (_loaded("pipelines.merge_quantize", "GateFailed"),
                               _loaded("pipelines.train", "HealthCheckFailed")) if c)
    if exit_1 and isinstance(e, exit_1):
        return _one_line(str(e)), 1
    ours = tuple(c for c in (
        CliError, _loaded("pipelines.config", "ConfigError"), _loaded("pipelines.data", "DataError"),
        _loaded("registry.versions", "RegistryError"), _loaded("registry.store", "CorruptArtifact"),
        _loaded("registry.store", "ArtifactNotFound"), _loaded("registry.store", "StoreUnreachable"),
        _loaded("pipelines.lm", "SchemeUnavailable"), _loaded("serving.rollout", "RolloutError"),
        _loaded("serving.client", "AdminAPIError"), _loaded("serving.engine", "AdapterLoadError"),
        _loaded("serving.engine", "EngineError"), _loaded("pipelines.schedules", "PrefectUnavailable"),
        _loaded("pipelines.onboard", "BuildRefused"), _loaded("pipelines.ingest", "NotEnoughData"),
        _loaded("monitoring.sql_log", "PredictionLogUnavailable"),
    ) if c)
    if ours and isinstance(e, ours):
        config_error, data_error = _loaded("pipelines.config", "ConfigError"), _loaded("pipelines.data", "DataError")
        if config_error and isinstance(e, config_error):
            return _hinted(e, "fix the config file (configs/ has every file with comments)"), 2
        if data_error and isinstance(e, data_error):
            return _hinted(e, "fix the data file: one JSON object per line with string 'prompt' and 'response'"), 2
        return _hinted(e, f"see `adapterops {command or '<command>'} --help`"), 2
    if isinstance(e, UnicodeDecodeError):
        where = _file_in_traceback(e)
        return (f"{where or 'an input file'} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                "pass a UTF-8 text file (JSONL, YAML, JSON), not a binary or another encoding", 2)
    yaml_error = _loaded("yaml", "YAMLError")
    if yaml_error and isinstance(e, yaml_error):
        return f"a YAML file is invalid: {_one_line(e)[:300]}; fix the file (see configs/ for examples)", 2
    safetensor_error = _loaded("safetensors", "SafetensorError")
    if safetensor_error and isinstance(e, safetensor_error):
        where = _file_in_traceback(e)
        return (f"{where or 'a safetensors file'} is not readable safetensors ({_one_line(e)[:200]}): truncated or "
                "not a weights file; re-create it (re-run the stage that wrote it) or restore it", 2)
    if isinstance(e, json.JSONDecodeError):
        where = _file_in_traceback(e)
        return (f"{where or 'a JSON file'} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                "restore the file or re-run the stage that wrote it", 2)
    import sqlite3

    db_errors = tuple(c for c in (sqlite3.DatabaseError, _loaded("sqlalchemy.exc", "DatabaseError")) if c)
    if isinstance(e, db_errors):
        if "locked" in str(e) or "busy" in str(e):
            return (f"a database is busy ({_one_line(e).split(' [SQL:')[0][:200]}): another process holds it; "
                    "retry when it has finished", 2)
        return (f"a database is unreadable ({_one_line(e).split(' [SQL:')[0][:200]}); if it is a file (mlflow.db, "
                "predictions.db) it is corrupt or not SQLite: restore it from a backup or point the command at the "
                "right file", 2)
    mlflow_error = _loaded("mlflow.exceptions", "MlflowException")
    if mlflow_error and isinstance(e, mlflow_error):
        text = _one_line(getattr(e, "message", str(e)))[:300]
        db = _loaded("sqlalchemy.exc", "DatabaseError")
        if db and isinstance(e.__cause__ or e.__context__, db):
            text = "its database is unreadable (corrupt, or not an MLflow database)"
        return (f"MLflow refused the request: {text}; check MLFLOW_TRACKING_URI / --tracking-uri and that the "
                "tracking server and its database are up", 2)
    if isinstance(e, OSError):
        return _hinted(_os_error(e), "check the path"), 2
    if isinstance(e, ValueError):  # our modules raise ValueError for bad arguments with a message that says why
        return _hinted(e, f"fix that value (see `adapterops {command or '<command>'} --help` and configs/)"), 2
    return None


# -- parser ------------------------------------------------------------------------------------------------------
# The options of every stage's config come from its dataclass (pipelines/options.py: one flag per field, its type,
# default and help from the dataclass, choices from the registries); the rest are a command's inputs and outputs.
# tests/unit/test_cli_options.py checks both ways that every field a command uses has a flag and every flag is a
# field or a declared input.

WORKDIR_HELP = "where everything is written (default work/demo)"
PROFILE_HELP = "local (default) | production | path to a profile YAML"


@functools.cache
def command_options() -> dict[tuple[str, ...], dict[str, Options]]:
    """Per command (its path of subcommand names), the config dataclasses whose fields are its options."""
    from pipelines import lm, methods, serve
    from pipelines.distributed import STRATEGIES
    from pipelines.ingest import IngestConfig
    from pipelines.init_cache import BASE_QUANTS, DTYPES, InitConfig
    from pipelines.merge_quantize import MergeConfig
    from pipelines.onboard import BuildConfig
    from pipelines.schedules import ScheduleConfig
    from pipelines.train import PRECISIONS, TrainConfig

    aliases = (f"{' / '.join(methods.QUANT_ALIASES)} = {' / '.join(methods.QUANT_ALIASES.values())} with "
               "--base-quant nf4")

    def init(flags: dict) -> Options:
        return Options(InitConfig, dest_prefix="init_", title="initialisation (InitConfig; part of the cache key)",
                       flags={"target_modules": ("--targets",), **flags},
                       choices={"method": methods.CHOICES, "base_quant": BASE_QUANTS, "dtype": DTYPES},
                       helps={"method": f"training method ({', '.join(methods.METHODS)}); {aliases}",
                              "target_modules": "module names to adapt (default: all Llama linears)",
                              "device": "device for the initialisation, one layer at a time (cpu, cuda)",
                              "base_quant": "train on a bitsandbytes nf4 base (QLoRA; QPiSSA with pissa); needs "
                                            "bitsandbytes"})

    nested = "a nested section: set it in the --config YAML"
    engine = Options(serve.EngineSpec, dest_prefix="engine_", title="engine (EngineSpec)",
                     flags={"kind": ("--engine",), "vllm_urls": ("--vllm-url",), "vllm_timeout_s": ("--vllm-timeout",)},
                     choices={"kind": serve.ENGINES},
                     helps={"kind": "what runs the model: builtin (in process, batched, default), vllm (vLLM OpenAI "
                                    "servers: --vllm-url or --vllm-launch), pool (one request at a time, greedy only)",
                            "device": "builtin engine's device: cpu (default) or cuda[:N]",
                            "max_loras": "adapters held by the engine at once (default 8)",
                            "max_lora_rank": "highest adapter rank the engine takes (default 64)",
                            "vllm_urls": "a running vLLM server (started with --enable-lora); repeat for replicas",
                            "vllm_launch": "start and supervise a local vLLM server (from .venv-vllm: "
                                           "`make vllm-venv`)",
                            "vllm_python": "python of the vLLM virtualenv for --vllm-launch",
                            "vllm_timeout_s": "seconds to wait for a vLLM server's answer (default 60)"})
    return {
        ("init-cache",): {"init": init({"device": ("--device", "--init-device")})},
        # --device is where training runs; the init's own seed and dtype get the init- prefix
        ("train",): {"init": init({"device": ("--init-device",), "seed": ("--init-seed",), "dtype": ("--init-dtype",)}),
                     "train": Options(TrainConfig, override=True, dest_prefix="train_", skip={"health": nested},
                                      choices={"precision": PRECISIONS, "strategy": STRATEGIES},
                                      title="training (TrainConfig; a flag wins over the --config YAML)")},
        ("merge",): {"merge": Options(MergeConfig, override=True, dest_prefix="merge_", skip={"gates": nested},
                                      choices={"quantize": lm.SCHEMES, "dtype": ("float32", "bfloat16")},
                                      helps={"quantize": "quantization scheme (default: the config's, nf4)"},
                                      title="merge and gates (MergeConfig; a flag wins over the --config YAML)")},
        ("build",): {"build": Options(BuildConfig, dest_prefix="build_", choices={"method": methods.CHOICES},
                                      title="first version (pipelines.onboard.BuildConfig)")},
        ("ingest",): {"ingest": Options(IngestConfig, dest_prefix="ingest_",
                                        title="retrain data (pipelines.ingest.IngestConfig)")},
        ("demo",): {"engine": engine},
        ("serve",): {"engine": engine},
        ("schedules", "serve"): {"schedule": Options(
            ScheduleConfig, dest_prefix="schedule_", title="schedules (ScheduleConfig)",
            flags={"families": ("--family",), "retrain_config": ("--config",)},
            skip={"pool_concurrency": "a work pool's setting; `schedules serve` runs the flows in its own "
                                      "process (`python -m infra.prefect_deployments apply --pool-concurrency N`)"})},
    }


def _leaf(sub, name: str, help: str, path: tuple[str, ...] | None = None, func=None) -> argparse.ArgumentParser:
    """A command's parser with the options of its configs (command_options()) and its handler."""
    q = sub.add_parser(name, help=help)
    for opts in command_options().get(path or (name,), {}).values():
        opts.add_to(q)
    if func is not None:
        q.set_defaults(func=func)
    return q


def _add_lifecycle_commands(sub) -> None:
    d = _leaf(sub, "demo", "run the whole lifecycle on the tiny base (offline, CPU)", func=cmd_demo)
    d.add_argument("--workdir", default="work/demo", help=WORKDIR_HELP)
    d.add_argument("--summary-json", default=None, help="write the summary here (default WORKDIR/summary.json)")
    d.add_argument("--config", default=str(CONFIG_DIR / "demo.yaml"), help="demo YAML (default configs/demo.yaml)")
    d.add_argument("--profile", default="local", help=PROFILE_HELP)

    b = sub.add_parser("base", help="the project's own base model")
    bsub = b.add_subparsers(dest="action", required=True, metavar="ACTION")
    bsub.add_parser("build", help="pretrain the tiny Llama base + tokenizer (see --help)", add_help=False)

    def store_args(q) -> None:
        q.add_argument("--base", default=str(DEFAULT_BASE), help="base model directory")
        q.add_argument("--store", default="work/init-cache", help="directory or s3://bucket/prefix "
                       "(endpoint from AWS_ENDPOINT_URL)")
        q.add_argument("--scratch", default="work/init-local", help="local directory for fetched entries")

    ic = _leaf(sub, "init-cache", "PiSSA/LoRA initialisations cached by base content", func=cmd_init_cache)
    ic.add_argument("action", choices=["warm", "ls", "verify", "evict"])
    ic.add_argument("--key", default=None, help="entry key (verify/evict)")
    store_args(ic)

    t = _leaf(sub, "train", "train an adapter (warms the init cache first)", func=cmd_train)
    store_args(t)
    t.add_argument("--train", required=True, help="training JSONL (prompt, response)")
    t.add_argument("--val", required=True, help="validation JSONL")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--config", default=None, help="TrainConfig YAML (see configs/train.yaml)")
    t.add_argument("--parent", default=None, help="a previous training output to warm-start from")

    m = _leaf(sub, "merge", "merge + quantize an adapter behind logit regression gates", func=cmd_merge)
    m.add_argument("--base", default=str(DEFAULT_BASE))
    m.add_argument("--adapter", required=True, help="PEFT adapter directory")
    m.add_argument("--out", required=True)
    m.add_argument("--val", required=True, help="validation JSONL the gates compare logits on")
    m.add_argument("--report-json", default=None, help="also write the gate report JSON here")
    m.add_argument("--config", default=None, help="MergeConfig YAML (see configs/merge.yaml)")
    m.add_argument("--expect-golden", default=None, metavar="FILE",
                   help="a rebuild: the version's stored golden logits (golden/parity_golden.safetensors); the "
                        "merged model must reproduce them (golden_* gates)")

    bd = _leaf(sub, "build", "create, gate and register a family's first version from your data", func=cmd_build)
    ig = _leaf(sub, "ingest", "turn logged requests with feedback (+ a labelled file) into the next retrain data",
               func=cmd_ingest)
    for q in (bd, ig):
        q.add_argument("--workdir", default="work/demo", help="work dir holding the registry and predictions.db "
                       "(default work/demo)")
        q.add_argument("--profile", default="local", help=PROFILE_HELP)
        q.add_argument("--json", action="store_true", help="print only the JSON result on stdout (progress on stderr)")
    bd.add_argument("--base", default=str(DEFAULT_BASE), help="base model directory")

    rt = sub.add_parser("retrain", help="incremental retraining (replay buffer, warm start from the champion)")
    rt.add_argument("--workdir", default="work/demo")
    rt.add_argument("--base", default=str(DEFAULT_BASE))
    rt.add_argument("--family", default="support-assistant")
    rt.add_argument("--name", required=True, help="run name, e.g. v4")
    rt.add_argument("--new-train", required=True)
    rt.add_argument("--new-val", required=True)
    rt.add_argument("--old-train", required=True, help="past training data (the replay buffer's source)")
    rt.add_argument("--old-val", required=True, help="old categories' validation data (forgetting gate)")
    rt.add_argument("--replay-ratio", type=float, default=None, help="LifecycleConfig.replay_ratio: share of old "
                    "examples in the mix, in [0, 1) (default: the config's)")
    rt.add_argument("--config", default=str(CONFIG_DIR / "demo.yaml"))
    rt.add_argument("--store", default="")
    rt.add_argument("--profile", default="local", help=PROFILE_HELP)
    rt.set_defaults(func=cmd_retrain)


def _add_registry_commands(sub) -> None:
    r = sub.add_parser("registry", help="adapter versions in MLflow (uses MLFLOW_TRACKING_URI)")
    r.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI")
    rsub = r.add_subparsers(dest="action", required=True, metavar="ACTION")
    rl = rsub.add_parser("list", help="versions and aliases")
    rl.add_argument("family", nargs="?")
    rs = rsub.add_parser("show", help="one version with its lineage")
    rs.add_argument("family")
    rs.add_argument("version")
    rp = rsub.add_parser("promote", help="make a version champion (previous champion -> previous)")
    rp.add_argument("family")
    rp.add_argument("version")
    rb = rsub.add_parser("rollback", help="champion back to previous")
    rb.add_argument("family")
    for q in (rp, rb):
        q.add_argument("--reason", default="", help="why (kept in the audit trail)")
        q.add_argument("--actor", default="", help="who (default $USER)")
        q.add_argument("--wait", type=float, default=15.0, help="seconds to wait while another promotion or "
                       "rollback of the family is in flight, then refuse (default 15; 0: refuse at once)")
    rp.add_argument("--allow-base-change", action="store_true",
                    help="promote a version trained on another base than the champion's (servers move base too)")
    rh = rsub.add_parser("history", help="audit trail of promotions and rollbacks")
    rh.add_argument("family")
    rr = rsub.add_parser("recover", help="complete an alias move that stopped half way (its process died)")
    rr.add_argument("family")
    rr.add_argument("--discard-intent", action="store_true",
                    help="delete an UNREADABLE intent record (edited or truncated) instead of refusing; a readable "
                         "one is always completed")
    rr.add_argument("--wait", type=float, default=15.0, help="seconds to wait for a live operation (default 15)")
    rv = rsub.add_parser("verify", help="download every stored artifact again and check its recorded sha256")
    rv.add_argument("family")
    rv.add_argument("version", nargs="?", default=None, help="one version (default: all)")
    rping = rsub.add_parser("ping", help="readiness: one real registry query against the backend's database")
    for q in (rl, rs, rp, rb, rh, rr, rv, rping):
        q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.set_defaults(func=cmd_registry)


def _add_serving_commands(sub) -> None:
    s = _leaf(sub, "serve", "serve a demo work dir's champion over an OpenAI-compatible API", func=cmd_serve)
    s.add_argument("--workdir", default="work/demo")
    s.add_argument("--host", default=None, help="address to bind; default: the profile's serving_host (local: "
                   "127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="default: the profile's serving_port (8000)")
    s.add_argument("--base", default=str(DEFAULT_BASE))
    s.add_argument("--profile", default="local", help=PROFILE_HELP)
    s.add_argument("--fallback-config", default=None, help="FallbackConfig YAML (see configs/fallback.yaml): route "
                   "a family with severe drift (POST /admin/drift) to its fallback; default: off")
    s.add_argument("--auto-canary", type=float, default=None, metavar="SECONDS",
                   help="poll the registry every SECONDS and start the canary of each new challenger (what a "
                        "scheduled retrain registers); default: off (rollouts start by `adapterops rollout start`)")
    s.add_argument("--auto-canary-without-feedback", action="store_true",
                   help="let an automatic canary promote on error rate and latency alone when users send no "
                        "feedback (its promotion then says feedback was NOT checked); default: it waits for "
                        "feedback on both arms")

    # rollout start's --steps/--requests-per-step/--gradual are serving.rollout.RolloutConfig fields sent to the
    # server, which holds the defaults; written here so that --help does not import scipy with serving.rollout
    ro = sub.add_parser("rollout", help="canary rollouts of a running server (admin API)")
    rosub = ro.add_subparsers(dest="action", required=True, metavar="ACTION")
    ro_status = rosub.add_parser("status", help="rollouts: step, weight, each check's last verdict")
    ro_status.add_argument("family", nargs="?", default=None, help="one family (default: all)")
    ro_start = rosub.add_parser("start", help="start a canary of a challenger against the family's champion")
    ro_start.add_argument("family")
    ro_start.add_argument("--challenger", default=None, help="version (default: the registry's challenger alias)")
    ro_start.add_argument("--steps", default=None, help="traffic shares, e.g. 0.05,0.25,0.5,1 (default: the "
                          "server's)")
    ro_start.add_argument("--requests-per-step", type=int, default=None, help="requests that end a step")
    ro_start.add_argument("--gradual", action=argparse.BooleanOptionalAction, default=None,
                          help="on failure step traffic down through the steps instead of cutting it to 0")
    ro_abort = rosub.add_parser("abort", help="stop a rollout; the champion takes all traffic again")
    ro_abort.add_argument("family")
    ro_abort.add_argument("--reason", default="aborted by operator", help="kept in the rollout's state")
    for q in (ro_status, ro_start, ro_abort):
        q.add_argument("--url", default=os.environ.get("ADAPTEROPS_URL", "http://127.0.0.1:8000"),
                       help="server URL (default $ADAPTEROPS_URL or http://127.0.0.1:8000)")
        q.add_argument("--api-key", default=None, help="admin key (default $ADAPTEROPS_API_KEY)")
        q.add_argument("--json", action="store_true", help="print the server's JSON answer")
    ro.set_defaults(func=cmd_rollout)


def _add_monitoring_commands(sub) -> None:
    from monitoring.check import add_arguments

    mo = sub.add_parser("monitor", help="drift monitors")
    mosub = mo.add_subparsers(dest="action", required=True, metavar="ACTION")
    mc = mosub.add_parser("check", help="KS + embedding-similarity drift check of JSONL windows")
    add_arguments(mc)
    mc.set_defaults(func=cmd_monitor_check)

    sc = sub.add_parser("schedules", help="scheduled monitor checks and retraining as Prefect deployments")
    scsub = sc.add_subparsers(dest="action", required=True, metavar="ACTION")
    ss = _leaf(scsub, "serve", "serve the deployments of pipelines/schedules.py until interrupted",
               path=("schedules", "serve"), func=cmd_schedules)
    ss.add_argument("--workdir", default="work/demo", help="work dir holding the registry and predictions.db")
    ss.add_argument("--base", default=str(DEFAULT_BASE))
    ss.add_argument("--profile", default="local", help="local (default: starts a local Prefect server) | production "
                    "| path to a profile YAML")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapterops", description="The lifecycle of LLM adapters: init cache, training, "
                                "gated merge-and-quantize, MLflow versions, canary serving, drift-driven retraining.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also ADAPTEROPS_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_lifecycle_commands(sub)
    _add_registry_commands(sub)
    _add_serving_commands(sub)
    _add_monitoring_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # Nothing downloads weights or data at run time; progress bars would flood logs of headless runs.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "DO_NOT_TRACK"):
        os.environ.setdefault(var, "1")
    # bitsandbytes' CPU backend warns on import that it could not fetch an optional kernel from the Hub and suggests
    # installing `kernels`, which would download it at run time: not advice for an offline tool, so not shown.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["base", "build"]:
        return cmd_base_build(None, argv[2:])
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "demo" and args.summary_json is None:
        args.summary_json = str(Path(args.workdir) / "summary.json")
    debug = bool(os.environ.get("ADAPTEROPS_DEBUG")) or getattr(args, "debug", False)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - every error the user can fix reaches them as one line
        if debug:
            raise
        mapped = describe_error(e, " ".join(a for a in (getattr(args, "command", None),
                                                       getattr(args, "action", None)) if isinstance(a, str)))
        if mapped is None:  # a programming error: its traceback is what a bug report needs
            raise
        message, code = mapped
        print(f"error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
