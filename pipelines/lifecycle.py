"""The lifecycle's configuration: the settings of every stage a family's adapters go through (init, retraining with
replay, merge gates, drift monitors, canary rollout), loaded from one YAML file (configs/lifecycle.yaml).

Read by the scheduled jobs (infra/prefect_deployments.py), `adapterops retrain` and `adapterops schedules serve`.
The demo's configuration (`DemoConfig`, configs/demo.yaml) extends it with the story's own sections (`train_v1`,
`bad`, `traffic`); `load_config` returns a DemoConfig for a file that has them, so the demo's YAML still serves
the commands that default to it, and the production config (a plain LifecycleConfig) carries no demo field.

DemoConfig lives here rather than in pipelines/demo.py because `load_config` must return it for callers that load
the demo's file through this module (pipelines/cli.py's demo command), and pipelines/demo.py imports this module;
pipelines.demo re-exports it.

Run:  python -c "from pipelines.lifecycle import load_config; print(load_config(None).retrain)"
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from monitoring.drift import DriftConfig
from pipelines.config import CONFIG_DIR, from_dict, load_yaml
from pipelines.init_cache import InitConfig
from pipelines.merge_quantize import MergeConfig
from pipelines.train import TrainConfig
from serving.rollout import RolloutConfig

DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"
"""What `load_config(None)` reads (the CLI's and the deployments' default is still the demo's file)."""
LIFECYCLE_CONFIG = CONFIG_DIR / "lifecycle.yaml"
"""The production lifecycle config: a plain LifecycleConfig."""


@dataclass
class LifecycleConfig:
    """What production retraining, monitoring and rollout of one family need."""

    family: str = "support-assistant"
    base: str = "models/tiny-llama"
    init: InitConfig = field(default_factory=InitConfig)
    retrain: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100))
    """Incremental retraining, warm-started from the champion."""
    merge: MergeConfig = field(default_factory=MergeConfig)
    replay_ratio: float = 0.2
    replay_strategy: str = "category_balanced"
    reference_prompts: int = 200
    drift: DriftConfig = field(default_factory=DriftConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        from pipelines.replay import STRATEGIES

        if not 0 <= self.replay_ratio < 1:
            raise ValueError(f"replay_ratio must be in [0, 1), got {self.replay_ratio}")
        if self.replay_strategy not in STRATEGIES:
            raise ValueError(f"replay_strategy {self.replay_strategy!r} is not one of {', '.join(STRATEGIES)}")


@dataclass
class TrafficConfig:
    """The demo's simulated users."""

    before_requests: int = 150
    """Requests per monitoring window; the KS tests need >= min_window of them."""
    after_requests: int = 150
    canary_max_requests: int = 400
    """Upper bound of requests sent while a canary runs (it normally ends sooner)."""
    clients: int = 4
    max_tokens: int = 16


@dataclass
class DemoConfig(LifecycleConfig):
    """The demo (pipelines/demo.py): the lifecycle's config plus its story's first version, bad version and
    simulated traffic."""

    train_v1: TrainConfig = field(default_factory=TrainConfig)
    """The first version's training."""
    bad: TrainConfig = field(default_factory=lambda: TrainConfig(steps=60))
    """The deliberately bad v3's training (on the wrong dataset)."""
    traffic: TrafficConfig = field(default_factory=TrafficConfig)


DEMO_SECTIONS = tuple(f.name for f in dataclasses.fields(DemoConfig)
                      if f.name not in {g.name for g in dataclasses.fields(LifecycleConfig)})


def load_config(path: Path | None, cls: type[LifecycleConfig] | None = None) -> LifecycleConfig:
    """The config in `path` (None: DEFAULT_CONFIG). cls None: a DemoConfig if the file has one of the demo's
    sections (DEMO_SECTIONS), else a LifecycleConfig; unknown keys are an error either way."""
    path = Path(path) if path else DEFAULT_CONFIG
    data = load_yaml(path)
    if cls is None:
        cls = DemoConfig if any(k in (data or {}) for k in DEMO_SECTIONS) else LifecycleConfig
    return from_dict(cls, data, where=str(path))
