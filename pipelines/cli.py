"""The `adapterops` command line. Heavy libraries are imported inside each command, so `--help` is instant.

Run:  adapterops --help;  adapterops <command> --help
"""

from __future__ import annotations

import argparse
import json
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
    from pipelines.profile import load_profile

    load_profile(args.profile)
    _prefect_env(args.workdir)
    ws = _workspace(args, base=cfg.base)
    from pipelines.flows import demo

    summary = demo(cfg, ws, Path(args.summary_json))
    return 0 if summary["champion"] else 1


# -- base --------------------------------------------------------------------------------------------------------

def cmd_base_build(args, rest) -> int:
    from pipelines import base_build

    return base_build.main(rest)


# -- init cache --------------------------------------------------------------------------------------------------

def _init_cfg(args):
    from pipelines.init_cache import DEFAULT_TARGETS, InitConfig

    return InitConfig(method=args.method, rank=args.rank, alpha=args.alpha,
                      target_modules=tuple(args.targets.split(",")) if args.targets else DEFAULT_TARGETS,
                      svd_niter=args.svd_niter, device=args.device)


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
    if args.steps:
        cfg.steps = args.steps
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
        out = mq.run(cfg, Path(args.base), Path(args.adapter), Path(args.val), Path(args.out))
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
    from registry.versions import AdapterRegistry

    reg = AdapterRegistry(args.tracking_uri or None)
    if args.action == "list":
        families = [args.family] if args.family else reg.families()
        print(f"{'family':24} {'version':8} {'aliases':28} {'gates':6} method")
        for fam in families:
            for v in reg.list_versions(fam):
                print(f"{fam:24} {v.version:8} {','.join(v.aliases) or '-':28} "
                      f"{'pass' if v.gates_passed() else 'FAIL':6} {v.tags.get('method', '?')}")
    elif args.action == "show":
        v = reg.get(args.family, args.version)
        print(f"{v.family} v{v.version}  aliases: {', '.join(v.aliases) or '-'}  run: {v.run_id}")
        print(f"source: {v.source}")
        for k in sorted(v.tags):
            print(f"  {k:28} {v.tags[k]}")
    elif args.action in ("promote", "rollback"):
        actor = args.actor or os.environ.get("USER", "cli")
        if args.action == "promote":
            rec = reg.promote(args.family, args.version, actor=actor, reason=args.reason)
        else:
            rec = reg.rollback(args.family, actor=actor, reason=args.reason)
        print(f"{rec.op}: {rec.family} champion {rec.from_version or '-'} -> {rec.to_version}")
    elif args.action == "history":
        import datetime as dt

        print(f"{'when (UTC)':20} {'op':14} {'from':5} {'to':5} {'actor':16} reason")
        for r in reg.history(args.family):
            when = dt.datetime.fromtimestamp(r.ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            print(f"{when:20} {r.op:14} {r.from_version or '-':5} {r.to_version or '-':5} {r.actor:16} {r.reason}")
    return 0


# -- serve / monitor / retrain -----------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    from pipelines.serve import serve

    if not os.environ.get("MLFLOW_TRACKING_URI") and not (Path(args.workdir) / "mlflow.db").is_file():
        raise CliError(f"{args.workdir} holds no mlflow.db; run `adapterops demo --workdir {args.workdir}` first, "
                       f"or point MLFLOW_TRACKING_URI (or --profile) at a registry")
    serve(_workspace(args), args.host, args.port, os.environ.get("ADAPTEROPS_API_KEY"))
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
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("base", help="the project's own base model")
    bsub = b.add_subparsers(dest="action", required=True, metavar="ACTION")
    bsub.add_parser("build", help="pretrain the tiny Llama base + tokenizer (see --help)", add_help=False)

    def init_args(q, with_store=True):
        q.add_argument("--base", default=str(DEFAULT_BASE), help="base model directory")
        q.add_argument("--method", default="pissa", choices=["lora", "rslora", "dora", "pissa"])
        q.add_argument("--rank", type=int, default=8)
        q.add_argument("--alpha", type=float, default=16.0)
        q.add_argument("--targets", default="", help="comma-separated module names (default: all Llama linears)")
        q.add_argument("--svd-niter", type=int, default=None, help="PiSSA fast SVD iterations (default exact SVD)")
        q.add_argument("--device", default="cpu", help="device for the initialisation (cpu, cuda)")
        q.add_argument("--store", default="work/init-cache", help="directory or s3://bucket/prefix "
                       "(endpoint from AWS_ENDPOINT_URL)")
        q.add_argument("--scratch", default="work/init-local", help="local directory for fetched entries")

    ic = sub.add_parser("init-cache", help="PiSSA/LoRA initialisations cached by base content")
    ic.add_argument("action", choices=["warm", "ls", "verify", "evict"])
    ic.add_argument("--key", default=None, help="entry key (verify/evict)")
    init_args(ic)
    ic.set_defaults(func=cmd_init_cache)

    t = sub.add_parser("train", help="train an adapter (warms the init cache first)")
    init_args(t)
    t.add_argument("--train", required=True, help="training JSONL (prompt, response)")
    t.add_argument("--val", required=True, help="validation JSONL")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--config", default=None, help="TrainConfig YAML (see configs/train.yaml)")
    t.add_argument("--steps", type=int, default=None)
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
    rh = rsub.add_parser("history", help="audit trail of promotions and rollbacks")
    rh.add_argument("family")
    r.set_defaults(func=cmd_registry)

    s = sub.add_parser("serve", help="serve a demo work dir's champion over an OpenAI-compatible API")
    s.add_argument("--workdir", default="work/demo")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--base", default=str(DEFAULT_BASE))
    s.add_argument("--profile", default="local", help="local (default) | production | path to a profile YAML")
    s.set_defaults(func=cmd_serve)

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
    return p


def main(argv: list[str] | None = None) -> int:
    # Nothing downloads weights or data at run time; progress bars would flood logs of headless runs.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "DO_NOT_TRACK"):
        os.environ.setdefault(var, "1")
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
        known = {"ConfigError", "DataError", "CliError", "RegistryError", "BaseMismatch", "GateFailed",
                 "HealthCheckFailed", "FileNotFoundError", "ValueError", "CorruptArtifact", "StoreUnreachable",
                 "ArtifactNotFound", "CorruptVersionArtifact", "RolloutError"}
        name = type(e).__name__
        if name not in known:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1 if name in ("GateFailed", "HealthCheckFailed") else 2


if __name__ == "__main__":
    sys.exit(main())
