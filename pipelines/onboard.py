"""Onboarding, `build`: create, gate and register the FIRST version of an adapter family from the user's own data.

The same stages, in the same order and with the same arguments, as the `build-adapter-version` flow
(pipelines.flows.build_version): init cache -> train -> merge + quantize + gates -> monitoring reference -> register.
Here they run as plain function calls (no Prefect), so a build works on a laptop without a Prefect server; the flows
wrap `run` where run tracking is wanted. Everything a retrain needs later is left where the flows read it.

    from pipelines.onboard import BuildConfig, run
    summary = run(BuildConfig(family="support", train="data/train.jsonl", val="data/val.jsonl", method="lora"), ws)

CLI contract (pipelines/cli.py wires it from BuildConfig; every flag is a field of the same name):

    adapterops build --family F --train T.jsonl --val V.jsonl [--method lora|rslora|dora|pissa|qlora|qpissa]
                     [--init-config init.yaml] [--train-config train.yaml] [--merge-config merge.yaml]
                     [--name RUN] [--promote/--no-promote] [--reference-prompts N] [--max-tokens N]
                     [--data-dir DIR] [--workdir W] [--base B] [--profile local|production|PATH] [--json]

    exit 0: registered (and promoted, unless --no-promote); prints the summary (run's return value).
    exit 2 (a CLI error, one paragraph): BuildRefused (the family already has versions: use `adapterops retrain`),
    a dataset that is missing or malformed (pipelines.data.DataError, naming the file and line), or a config that
    does not fit its dataclass (ConfigError).
    exit 1: GateFailed, as for `merge` (nothing registered; the report's path is in the message).

Rules:
- A family that already has a version is refused, pointing to `adapterops retrain`: a later version must be
  trained from the champion with a replay buffer and pass the old-categories gate, which a first build skips.
- Both datasets are checked line by line before anything is computed: UTF-8, one JSON object per line with non-empty
  string `prompt` and `response` (optional `category`, `intent`), at least one example each.
- The init YAML is an InitConfig (configs/demo.yaml's `init:` section, as a file of its own); `method` overrides its
  method, and the two disagreeing is an error. Train and merge YAMLs are TrainConfig / MergeConfig (configs/train.yaml,
  configs/merge.yaml).
- A failing gate raises GateFailed before anything reaches MLflow: no version, no run (a registration that fails
  later marks its run FAILED: pipelines.register.run).
- promote (default True): the first version becomes champion once its gates passed. With no champion nothing is
  served and there is nothing to canary against, so gates are the only bar there can be; --no-promote registers it
  without an alias (promote it later with `adapterops registry promote F 1`).
- On promotion, the training data is copied to <data>/<family>/champion/{train,val}.jsonl, the champion data the
  retrain flow reads (its replay buffer and old-categories gate; infra/README.md, "Data"). <data> = data_dir, else
  $ADAPTEROPS_DATA_DIR, else <workdir>/data. Files already there are replaced (the family had no version, so no
  champion was trained on them); with --no-promote nothing is copied (the log line says where it must go).
- Re-running the same build after a failure reuses what finished (every stage is idempotent by its manifest).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from common.atomic import copy_file, write_json
from common.jsonl import JsonlError, iter_jsonl
from pipelines import init_cache, merge_quantize, methods, reference, register, train
from pipelines.config import ConfigError, from_dict, load_yaml
from pipelines.data import DataError, category_counts, read_jsonl, record_version_data
from pipelines.workspace import Workspace


class BuildRefused(RuntimeError):
    """A build that would not create a family's first version (the family already has versions)."""


@dataclass
class BuildConfig:
    """What `adapterops build` builds. Paths may be given as strings (YAML, the CLI)."""

    family: str
    """The adapter family (a registered model in MLflow); must not have versions yet."""
    train: Path
    """Training data: JSONL, one {"prompt", "response"[, "category", "intent"]} object per line."""
    val: Path
    """Validation data, same format: early stopping, the merge gates' prompts and the monitoring reference."""
    method: str | None = None
    """A pipelines.methods name (lora, rslora, dora, pissa; qlora / qpissa on an nf4 base); None = the init
    config's method (InitConfig's default, pissa, without one)."""
    init_config: Path | None = None
    """InitConfig YAML (rank, alpha, target modules, ...); None = InitConfig's defaults."""
    train_config: Path | None = None
    """TrainConfig YAML (configs/train.yaml); None = TrainConfig's defaults."""
    merge_config: Path | None = None
    """MergeConfig YAML (configs/merge.yaml; quantizer and gate bounds); None = MergeConfig's defaults."""
    name: str = ""
    """Run name: the run directory <workdir>/runs/<name>; "" = build-<family>."""
    promote: bool = True
    """Make the version champion once its gates passed (see the module docstring)."""
    reference_prompts: int = 200
    """Validation prompts run through the serving code path to capture the monitoring reference."""
    max_tokens: int = 16
    """Tokens generated per reference prompt."""
    data_dir: Path | None = None
    """Where the retrain flows read data (<data>/<family>/champion/...); None = $ADAPTEROPS_DATA_DIR or
    <workdir>/data."""

    def __post_init__(self) -> None:
        """Validates everything and loads the three YAMLs into `init` (InitConfig), `train_cfg` (TrainConfig) and
        `merge_cfg` (MergeConfig): attributes, not fields, so from_dict / asdict see only the user's inputs."""
        from registry.names import validate_name

        validate_name("family", self.family)
        self.train, self.val = Path(self.train), Path(self.val)
        for name in ("init_config", "train_config", "merge_config", "data_dir"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        self.name = self.name or f"build-{self.family}"
        if "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"name {self.name!r} must be a plain directory name (it becomes <workdir>/runs/<name>)")
        if self.reference_prompts < 1 or self.max_tokens < 1:
            raise ValueError(f"reference_prompts ({self.reference_prompts}) and max_tokens ({self.max_tokens}) must "
                             "be >= 1")
        init_data = _yaml(self.init_config, "init_config")
        if self.method is not None:
            if self.method not in methods.CHOICES:
                raise ValueError(f"method {self.method!r} is not one of {', '.join(methods.CHOICES)}")
            given = init_data.get("method")
            if given is not None and given != self.method:
                raise ValueError(f"method {self.method!r} disagrees with method {given!r} in {self.init_config}; "
                                 "drop one of them")
            init_data["method"] = self.method
        self.init = from_dict(init_cache.InitConfig, init_data, str(self.init_config or "init"))
        self.train_cfg = from_dict(train.TrainConfig, _yaml(self.train_config, "train_config"),
                                   str(self.train_config or "train"))
        self.merge_cfg = from_dict(merge_quantize.MergeConfig, _yaml(self.merge_config, "merge_config"),
                                   str(self.merge_config or "merge"))


def _yaml(path: Path | None, what: str) -> dict:
    if path is None:
        return {}
    try:
        return load_yaml(path)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None


def check_dataset(path: Path, what: str) -> int:
    """Every line of a prompt/response JSONL file, checked before any stage runs; returns the example count.
    Problems name the file and the line: DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} data {path} does not exist (or is not a file); pass a JSONL file of "
                        '{"prompt": ..., "response": ...} lines')
    def check(row):
        if not isinstance(row, dict):
            raise ValueError(f"is a JSON {type(row).__name__}, not an object with 'prompt' and 'response'")
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"needs a non-empty string {key!r} (got {row.get(key)!r})")
        for key in ("category", "intent"):
            if key in row and not isinstance(row[key], str):
                raise ValueError(f"{key!r} must be a string, got {row[key]!r}")
        return row

    try:
        n = sum(1 for _ in iter_jsonl(path, check))
    except JsonlError as e:
        if e.json_error is not None:
            raise DataError(f"{path}:{e.lineno} is not valid JSON ({e.json_error}); each line must be one JSON "
                            "object") from None
        raise DataError(f"{path}:{e.lineno} {e.detail}") from None
    if n == 0:
        raise DataError(f"{what} data {path} holds no examples; give it at least one "
                        '{"prompt": ..., "response": ...} line')
    return n


def data_root(ws: Workspace, data_dir: Path | None = None) -> Path:
    """<data>: the directory the retrain flows read (`<data>/<family>/{new,champion}/{train,val}.jsonl`)."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ["ADAPTEROPS_DATA_DIR"]) if os.environ.get("ADAPTEROPS_DATA_DIR") else ws.root / "data"


def refuse_existing(reg, family: str) -> None:
    """BuildRefused when `family` already has versions."""
    if family not in reg.families():
        return
    versions = reg.list_versions(family)
    if versions:
        champion = reg.alias(family, "champion")
        raise BuildRefused(
            f"{family} already has {len(versions)} version(s) (v{', v'.join(v.version for v in versions)}; champion "
            f"{'v' + champion if champion else 'none'}) in {reg!r}: `build` only creates a family's first version. "
            f"Train the next one from the champion with `adapterops retrain --family {family} ...` (replay buffer, "
            "old-categories gate), or build under a new family name")


def run(cfg: BuildConfig, ws: Workspace, log=print) -> dict:
    """Build, gate and register `cfg.family`'s first version; promote it if `cfg.promote`. Returns a summary
    (build_version's keys plus "promoted", "champion_data", "configs")."""
    n_train, n_val = check_dataset(cfg.train, "train"), check_dataset(cfg.val, "val")
    reg = ws.registry()
    refuse_existing(reg, cfg.family)
    log(f"build {cfg.family}: {n_train} train / {n_val} val examples, method {cfg.init.method}"
        f"{' (nf4 base)' if cfg.init.base_quant != 'none' else ''}, run {cfg.name}")

    init = init_cache.run(cfg.init, ws.base_path, ws.init_store(), ws.root / "init-local", log=log)
    run_dir = ws.root / "runs" / cfg.name
    train_dir = train.run(cfg.train_cfg, ws.base_path, init.path, cfg.train, cfg.val, run_dir / "train", log=log)
    merged = merge_quantize.run(cfg.merge_cfg, ws.base_path, train_dir / "adapter", cfg.val, run_dir / "merged",
                                log=log)  # GateFailed here: nothing registered, no run created
    ref = reference.run(ws.reference_pool(), f"{cfg.family}@{cfg.name}", train_dir / "adapter", cfg.train, cfg.val,
                        run_dir / "monitoring", n_prompts=cfg.reference_prompts, max_tokens=cfg.max_tokens, log=log)
    # another build may have registered the family meanwhile: check again right before registering
    refuse_existing(reg, cfg.family)
    info = register.run(reg, cfg.family, train_dir, merged, ref, None, log=log)
    version_data = record_version_data(data_root(ws, cfg.data_dir) / cfg.family, info.version, cfg.train, cfg.val)
    summary = {"family": info.family, "version": info.version, "run_id": info.run_id, "init_key": init.key,
               "init_hit": init.hit, "run_dir": str(run_dir), "adapter_path": str(train_dir / "adapter"),
               "train_dir": str(train_dir), "gates_report": str(merged / "gates.md"), "gates_passed": True,
               "method": cfg.init.method, "promoted": False, "champion_data": None, "version_data": str(version_data),
               "data": {"train": n_train, "val": n_val, "categories": category_counts(read_jsonl(cfg.train))},
               "configs": {"init": asdict(cfg.init), "train": asdict(cfg.train_cfg), "merge": asdict(cfg.merge_cfg)}}
    write_json(run_dir / "build.json", summary, default=str)
    if not cfg.promote:
        log(f"build {cfg.family}: v{info.version} registered, not promoted (--no-promote); nothing serves it until "
            f"`adapterops registry promote {cfg.family} {info.version}`; its data is kept in {version_data}, "
            "which a retrain replays once it is champion")
        return summary

    others = [v.version for v in reg.list_versions(cfg.family) if v.version != info.version]
    if others:
        raise BuildRefused(f"{cfg.family} v{info.version} is registered (gates passed), but v{', v'.join(others)} "
                           f"appeared meanwhile (another build of the same family): not promoting either; choose one "
                           f"with `adapterops registry promote {cfg.family} VERSION`")
    reg.promote(cfg.family, info.version, actor="onboard",
                reason=f"first version of {cfg.family}: gates passed, no champion to canary against")
    champion_data = data_root(ws, cfg.data_dir) / cfg.family / "champion"
    if (champion_data / "train.jsonl").exists() or (champion_data / "val.jsonl").exists():
        # the family had no version, so no champion was trained on what is there (a deleted family's leftovers)
        log(f"build {cfg.family}: replacing the champion data in {champion_data}, which no version of the family "
            "was trained on")
    copy_file(cfg.train, champion_data / "train.jsonl")
    copy_file(cfg.val, champion_data / "val.jsonl")
    summary.update(promoted=True, champion_data=str(champion_data))
    write_json(run_dir / "build.json", summary, default=str)
    log(f"build {cfg.family}: v{info.version} is champion; its data is in {champion_data} for retraining")
    return summary
