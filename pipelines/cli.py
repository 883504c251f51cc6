"""The `adapterops` command line. Heavy libraries are imported inside each command, so `--help` is instant.

Run:  adapterops --help;  adapterops <command> --help
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipelines.config import CONFIG_DIR, REPO_ROOT

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
                            s3_endpoint_url=profile.s3_endpoint_url)


# -- demo --------------------------------------------------------------------------------------------------------

def _prefect_env(workdir: str) -> None:
    """Prefect's temporary local server (local profile) keeps its database in the work dir; on a busy 2-core
    machine it needs more than its default 20 s to start."""
    os.environ.setdefault("PREFECT_HOME", str(Path(workdir).resolve() / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry attempts


def cmd_demo(args) -> int:
    from pipelines.demo import load_config

    cfg = load_config(args.config)  # validate before creating anything or the slow imports
    engine = _engine_spec(args)
    from pipelines.profile import load_profile

    load_profile(args.profile)
    _prefect_env(args.workdir)
    ws = _workspace(args, base=cfg.base)
    from pipelines.flows import demo

    summary = demo(cfg, ws, Path(args.summary_json), engine=engine)
    return 0 if summary["champion"] else 1


def _add_engine_args(p) -> None:
    p.add_argument("--engine", choices=("builtin", "vllm", "pool"), default="builtin",
                   help="what runs the model: builtin (in process, batched, default), vllm (vLLM OpenAI servers: "
                        "--vllm-url or --vllm-launch), pool (one request at a time, greedy only)")
    p.add_argument("--vllm-url", action="append", default=[], metavar="URL",
                   help="a running vLLM server (started with --enable-lora); repeat for replicas")
    p.add_argument("--vllm-launch", action="store_true",
                   help="start and supervise a local vLLM server (from .venv-vllm: `make vllm-venv`)")
    p.add_argument("--vllm-python", default=None, help="python of the vLLM virtualenv for --vllm-launch")
    p.add_argument("--device", default="cpu", help="builtin engine's device: cpu (default) or cuda[:N]")
    p.add_argument("--max-loras", type=int, default=8, help="adapters held by the engine at once (default 8)")
    p.add_argument("--max-lora-rank", type=int, default=64, help="highest adapter rank the engine takes (default 64)")


def _engine_spec(args):
    from pipelines.serve import EngineSpec

    try:
        return EngineSpec(kind=args.engine, device=args.device, max_loras=args.max_loras,
                          max_lora_rank=args.max_lora_rank, vllm_urls=list(args.vllm_url),
                          vllm_launch=args.vllm_launch, vllm_python=args.vllm_python)
    except ValueError as e:
        raise CliError(str(e)) from None


# -- base --------------------------------------------------------------------------------------------------------

def cmd_base_build(args, rest) -> int:
    from pipelines import base_build

    return base_build.main(rest)


# -- init cache --------------------------------------------------------------------------------------------------

def _init_cfg(args):
    from pipelines.init_cache import DEFAULT_TARGETS, InitConfig, require_bitsandbytes

    cfg = InitConfig(method=args.method, rank=args.rank, alpha=args.alpha,
                     target_modules=tuple(args.targets.split(",")) if args.targets else DEFAULT_TARGETS,
                     svd_niter=args.svd_niter, device=args.init_device, base_quant=args.base_quant)
    if cfg.base_quant != "none":
        try:
            require_bitsandbytes(cfg.base_quant)
        except RuntimeError as e:
            raise CliError(str(e)) from None
    return cfg


def cmd_init_cache(args) -> int:
    from registry.store import open_store

    store = open_store(args.store, os.environ.get("AWS_ENDPOINT_URL"))
    if args.action == "warm":
        from pipelines import init_cache

        res = init_cache.run(_init_cfg(args), Path(args.base), store, Path(args.scratch))
        print(json.dumps({"key": res.key, "hit": res.hit, "path": str(res.path), "seconds": round(res.seconds, 2)}))
    elif args.action == "ls":
        for entry in store.list():
            meta = entry.get("meta", {})
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
        if not args.key:
            raise CliError("init-cache evict needs --key (see `adapterops init-cache ls`)")
        store.delete(args.key)
        print(f"evicted {args.key}")
    return 0


# -- train / merge -----------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from pipelines import init_cache, train
    from pipelines.config import load
    from registry.store import open_store

    cfg = load(train.TrainConfig, args.config) if args.config else train.TrainConfig()
    for flag in ("steps", "device", "precision", "checkpoint_every"):
        if getattr(args, flag) is not None:  # a flag wins over the YAML
            setattr(cfg, flag, getattr(args, flag))
    if args.packing:
        cfg.packing = True
    cfg.__post_init__()
    store = open_store(args.store, os.environ.get("AWS_ENDPOINT_URL"))
    init = init_cache.run(_init_cfg(args), Path(args.base), store, Path(args.scratch))
    out = train.run(cfg, Path(args.base), init.path, Path(args.train), Path(args.val), Path(args.out),
                    parent=Path(args.parent) if args.parent else None)
    print(out)
    return 0


def cmd_merge(args) -> int:
    from pipelines import merge_quantize as mq
    from pipelines.config import load

    cfg = load(mq.MergeConfig, args.config) if args.config else mq.MergeConfig()
    if args.quantize is not None:  # the flag wins over the YAML; without it the YAML (or the default) holds
        cfg.quantize = args.quantize
        cfg.__post_init__()
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
    from registry.versions import AdapterRegistry

    reg = AdapterRegistry(args.tracking_uri or None, lease_wait_seconds=getattr(args, "wait", 15.0))

    def emit(data, text: str) -> None:
        print(json.dumps(data, indent=2, default=str) if args.json else text)

    if args.action == "list":
        families = [args.family] if args.family else reg.families()
        versions = [v for fam in families for v in reg.list_versions(fam)]
        emit([display.version_dict(v) for v in versions], display.render_list(versions))
    elif args.action == "show":
        v, history = reg.get(args.family, args.version), reg.history(args.family)
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
        intent, leases = reg.in_flight(args.family)
        emit(display.history_dict(args.family, aliases, history, intent, leases),
             display.render_history(args.family, aliases, history, intent, leases))
    return 0


# -- serve / monitor / retrain -----------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    from pipelines.serve import serve

    if not os.environ.get("MLFLOW_TRACKING_URI") and not (Path(args.workdir) / "mlflow.db").is_file():
        raise CliError(f"{args.workdir} holds no mlflow.db; run `adapterops demo --workdir {args.workdir}` first, "
                       f"or point MLFLOW_TRACKING_URI (or --profile) at a registry")
    fallback_cfg = None
    if args.fallback_config:
        from pipelines.config import load
        from serving.fallback import FallbackConfig

        fallback_cfg = load(FallbackConfig, args.fallback_config)
    if args.auto_canary is not None and args.auto_canary <= 0:
        raise CliError(f"--auto-canary is a polling interval in seconds and must be > 0, got {args.auto_canary}")
    if not 1 <= args.port <= 65535:
        raise CliError(f"--port must be in [1, 65535], got {args.port}")
    serve(_workspace(args), args.host, args.port, os.environ.get("ADAPTEROPS_API_KEY"), fallback_cfg=fallback_cfg,
          auto_canary_poll_s=args.auto_canary, engine=_engine_spec(args))
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

    from pipelines.demo import load_config

    cfg = load_config(args.config)
    _prefect_env(args.workdir)
    from pipelines.flows import retrain

    ws = _workspace(args)
    out = retrain(ws, args.family, args.name, asdict(cfg.init), asdict(cfg.retrain), asdict(cfg.merge),
                  Path(args.new_train), Path(args.new_val), Path(args.old_train), Path(args.old_val),
                  replay_ratio=args.replay_ratio if args.replay_ratio is not None else cfg.replay_ratio)
    print(json.dumps(out, indent=2, default=str))
    return 0


# -- schedules ---------------------------------------------------------------------------------------------------

def cmd_schedules(args) -> int:
    """Serve the Prefect deployments of infra/prefect_deployments.py (monitor checks, reference perplexity,
    retraining on cron and on drift alerts) until interrupted."""
    for flag, value in (("--monitor-interval", args.monitor_interval), ("--ppl-interval", args.ppl_interval)):
        if value < 1:
            raise CliError(f"{flag} must be at least 1 second, got {value}")
    from pipelines.demo import load_config

    cfg = load_config(args.config)  # validate before starting anything
    _prefect_env(args.workdir)
    ws = _workspace(args)  # checks the base model, creates the work dir
    import contextlib

    from infra import prefect_deployments as deployments

    env = {**os.environ, "ADAPTEROPS_WORKDIR": str(ws.root), "ADAPTEROPS_BASE_DIR": str(ws.base_path),
           "ADAPTEROPS_PROFILE": args.profile, "ADAPTEROPS_RETRAIN_CONFIG": str(Path(args.config).resolve()),
           "ADAPTEROPS_FAMILY": ",".join(args.family or [cfg.family]),
           "ADAPTEROPS_MONITOR_INTERVAL": str(args.monitor_interval),
           "ADAPTEROPS_PPL_INTERVAL": str(args.ppl_interval), "ADAPTEROPS_RETRAIN_CRON": args.retrain_cron}
    if args.data_dir:
        env["ADAPTEROPS_DATA_DIR"] = str(Path(args.data_dir).resolve())
    with contextlib.ExitStack() as stack:
        if not os.environ.get("PREFECT_API_URL"):  # set by the profile, the environment, or here
            try:
                url = stack.enter_context(deployments.local_server(os.environ["PREFECT_HOME"]))
            except RuntimeError as e:
                raise CliError(str(e)) from None
            os.environ["PREFECT_API_URL"] = url
            stack.callback(os.environ.pop, "PREFECT_API_URL", None)
        print(f"Prefect API: {os.environ['PREFECT_API_URL']}", flush=True)
        built = deployments.build_deployments(env)
        print(deployments.describe(built), flush=True)
        deployments.serve(built)
    return 0


# -- parser ------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapterops", description="The lifecycle of LLM adapters: init cache, training, "
                                "gated merge-and-quantize, MLflow versions, canary serving, drift-driven retraining.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run the whole lifecycle on the tiny base (offline, CPU)")
    d.add_argument("--workdir", default="work/demo", help="where everything is written (default work/demo)")
    d.add_argument("--summary-json", default=None, help="write the summary here (default WORKDIR/summary.json)")
    d.add_argument("--config", default=str(CONFIG_DIR / "demo.yaml"), help="demo YAML (default configs/demo.yaml)")
    d.add_argument("--profile", default="local", help="local (default) | production | path to a profile YAML")
    _add_engine_args(d)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("base", help="the project's own base model")
    bsub = b.add_subparsers(dest="action", required=True, metavar="ACTION")
    bsub.add_parser("build", help="pretrain the tiny Llama base + tokenizer (see --help)", add_help=False)

    def init_args(q, with_store=True, device_flags=("--device", "--init-device")):
        q.add_argument("--base", default=str(DEFAULT_BASE), help="base model directory")
        q.add_argument("--method", default="pissa", choices=["lora", "rslora", "dora", "pissa", "qlora", "qpissa"],
                       help="qlora / qpissa = lora / pissa with --base-quant nf4")
        q.add_argument("--rank", type=int, default=8)
        q.add_argument("--alpha", type=float, default=16.0)
        q.add_argument("--targets", default="", help="comma-separated module names (default: all Llama linears)")
        q.add_argument("--svd-niter", type=int, default=None, help="PiSSA fast SVD iterations (default exact SVD)")
        q.add_argument(*device_flags, dest="init_device", default="cpu",
                       help="device for the initialisation, one layer at a time (cpu, cuda)")
        q.add_argument("--base-quant", default="none", choices=["none", "nf4"],
                       help="train on a bitsandbytes nf4 base (QLoRA; QPiSSA with pissa); needs bitsandbytes")
        q.add_argument("--store", default="work/init-cache", help="directory or s3://bucket/prefix "
                       "(endpoint from AWS_ENDPOINT_URL)")
        q.add_argument("--scratch", default="work/init-local", help="local directory for fetched entries")

    ic = sub.add_parser("init-cache", help="PiSSA/LoRA initialisations cached by base content")
    ic.add_argument("action", choices=["warm", "ls", "verify", "evict"])
    ic.add_argument("--key", default=None, help="entry key (verify/evict)")
    init_args(ic)
    ic.set_defaults(func=cmd_init_cache)

    t = sub.add_parser("train", help="train an adapter (warms the init cache first)")
    init_args(t, device_flags=("--init-device",))  # --device is where training runs
    t.add_argument("--train", required=True, help="training JSONL (prompt, response)")
    t.add_argument("--val", required=True, help="validation JSONL")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--config", default=None, help="TrainConfig YAML (see configs/train.yaml)")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--device", default=None, help="auto (default) | cpu | cuda | cuda:N")
    t.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="auto (default): bf16 on a CUDA device, fp32 on a CPU")
    t.add_argument("--packing", action="store_true", help="pack several examples per row (no padding)")
    t.add_argument("--checkpoint-every", type=int, default=None,
                   help="write a resumable checkpoint every N steps; re-running the same command resumes")
    t.add_argument("--parent", default=None, help="a previous training output to warm-start from")
    t.set_defaults(func=cmd_train)

    m = sub.add_parser("merge", help="merge + quantize an adapter behind logit regression gates")
    m.add_argument("--base", default=str(DEFAULT_BASE))
    m.add_argument("--adapter", required=True, help="PEFT adapter directory")
    m.add_argument("--quantize", default=None, choices=["nf4", "int8", "none"],
                   help="quantization scheme (default: the config's, nf4)")
    m.add_argument("--out", required=True)
    m.add_argument("--val", required=True, help="validation JSONL the gates compare logits on")
    m.add_argument("--report-json", default=None, help="also write the gate report JSON here")
    m.add_argument("--config", default=None, help="MergeConfig YAML (see configs/merge.yaml)")
    m.add_argument("--expect-golden", default=None, metavar="FILE",
                   help="a rebuild: the version's stored golden logits (golden/parity_golden.safetensors); the "
                        "merged model must reproduce them (golden_* gates)")
    m.set_defaults(func=cmd_merge)

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
    for q in (rl, rs, rp, rb, rh):
        q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.set_defaults(func=cmd_registry)

    s = sub.add_parser("serve", help="serve a demo work dir's champion over an OpenAI-compatible API")
    s.add_argument("--workdir", default="work/demo")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--base", default=str(DEFAULT_BASE))
    s.add_argument("--profile", default="local", help="local (default) | production | path to a profile YAML")
    s.add_argument("--fallback-config", default=None, help="FallbackConfig YAML (see configs/fallback.yaml): route "
                   "a family with severe drift (POST /admin/drift) to its fallback; default: off")
    s.add_argument("--auto-canary", type=float, default=None, metavar="SECONDS",
                   help="poll the registry every SECONDS and start the canary of each new challenger (what a "
                        "scheduled retrain registers); default: off (rollouts start by `adapterops rollout start`)")
    _add_engine_args(s)
    s.set_defaults(func=cmd_serve)

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

    mo = sub.add_parser("monitor", help="drift monitors")
    mosub = mo.add_subparsers(dest="action", required=True, metavar="ACTION")
    mc = mosub.add_parser("check", help="KS + embedding-similarity drift check of JSONL windows")
    from monitoring.check import add_arguments

    add_arguments(mc)
    mc.set_defaults(func=cmd_monitor_check)

    rt = sub.add_parser("retrain", help="incremental retraining (replay buffer, warm start from the champion)")
    rt.add_argument("--workdir", default="work/demo")
    rt.add_argument("--base", default=str(DEFAULT_BASE))
    rt.add_argument("--family", default="support-assistant")
    rt.add_argument("--name", required=True, help="run name, e.g. v4")
    rt.add_argument("--new-train", required=True)
    rt.add_argument("--new-val", required=True)
    rt.add_argument("--old-train", required=True, help="past training data (the replay buffer's source)")
    rt.add_argument("--old-val", required=True, help="old categories' validation data (forgetting gate)")
    rt.add_argument("--replay-ratio", type=float, default=None)
    rt.add_argument("--config", default=str(CONFIG_DIR / "demo.yaml"))
    rt.add_argument("--store", default="")
    rt.add_argument("--profile", default="local", help="local (default) | production | path to a profile YAML")
    rt.set_defaults(func=cmd_retrain)

    sc = sub.add_parser("schedules", help="scheduled monitor checks and retraining as Prefect deployments")
    scsub = sc.add_subparsers(dest="action", required=True, metavar="ACTION")
    ss = scsub.add_parser("serve", help="serve the deployments of infra/prefect_deployments.py until interrupted")
    ss.add_argument("--workdir", default="work/demo", help="work dir holding the registry and predictions.db")
    ss.add_argument("--base", default=str(DEFAULT_BASE))
    ss.add_argument("--profile", default="local", help="local (default: starts a local Prefect server) | production "
                    "| path to a profile YAML")
    ss.add_argument("--family", action="append", default=None,
                    help="family to monitor and retrain (repeat for several; default: the config's family)")
    ss.add_argument("--monitor-interval", type=int, default=900, help="seconds between drift checks (default 900)")
    ss.add_argument("--ppl-interval", type=int, default=3600,
                    help="seconds between reference-perplexity checks (default 3600)")
    ss.add_argument("--retrain-cron", default="0 2 * * *",
                    help="retraining schedule, cron in UTC (default '0 2 * * *' nightly; '0 2 * * 0' weekly)")
    ss.add_argument("--config", default=str(CONFIG_DIR / "demo.yaml"),
                    help="YAML with the retrain, merge and drift settings (default configs/demo.yaml)")
    ss.add_argument("--data-dir", default="", help="retraining data, <dir>/<family>/{new,champion}/{train,val}.jsonl "
                    "(default WORKDIR/data)")
    ss.set_defaults(func=cmd_schedules)
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
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - every error reaches the user as one readable paragraph
        if os.environ.get("ADAPTEROPS_DEBUG"):
            raise
        known = {"ConfigError", "DataError", "CliError", "RegistryError", "RegistryBusy", "BaseMismatch", "GateFailed",
                 "HealthCheckFailed", "FileNotFoundError", "ValueError", "CorruptArtifact", "StoreUnreachable",
                 "ArtifactNotFound", "CorruptVersionArtifact", "RolloutError", "SchemeUnavailable"}
        name = type(e).__name__
        if name not in known:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1 if name in ("GateFailed", "HealthCheckFailed") else 2


if __name__ == "__main__":
    sys.exit(main())
