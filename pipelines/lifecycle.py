"""The lifecycle's configuration: the settings of every stage a family's adapters go through (init, training,
retraining with replay, merge gates, drift monitors, canary rollout), loaded from one YAML file.

Read by the scheduled jobs (infra/prefect_deployments.py), `adapterops retrain`, `adapterops schedules serve` and the
demo (pipelines/demo.py, which also uses `train_v1`, `bad` and `traffic` to tell its story).

Run:  python -c "from pipelines.lifecycle import load_config; print(load_config(None).retrain)"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from monitoring.drift import DriftConfig
from pipelines.config import CONFIG_DIR, from_dict, load_yaml
from pipelines.init_cache import InitConfig
from pipelines.merge_quantize import MergeConfig
from pipelines.train import TrainConfig
from serving.rollout import RolloutConfig

DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"


@dataclass
class TrafficConfig:
    before_requests: int = 150
    """Requests per monitoring window; the KS tests need >= min_window of them."""
    after_requests: int = 150
    canary_max_requests: int = 400
    """Upper bound of requests sent while a canary runs (it normally ends sooner)."""
    clients: int = 4
    max_tokens: int = 16


@dataclass
class LifecycleConfig:
    family: str = "support-assistant"
    base: str = "models/tiny-llama"
    init: InitConfig = field(default_factory=InitConfig)
    train_v1: TrainConfig = field(default_factory=TrainConfig)
    retrain: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100))
    bad: TrainConfig = field(default_factory=lambda: TrainConfig(steps=60))
    merge: MergeConfig = field(default_factory=MergeConfig)
    replay_ratio: float = 0.2
    replay_strategy: str = "category_balanced"
    reference_prompts: int = 200
    drift: DriftConfig = field(default_factory=DriftConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    traffic: TrafficConfig = field(default_factory=TrafficConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        from pipelines.replay import STRATEGIES

        if not 0 <= self.replay_ratio < 1:
            raise ValueError(f"replay_ratio must be in [0, 1), got {self.replay_ratio}")
        if self.replay_strategy not in STRATEGIES:
            raise ValueError(f"replay_strategy {self.replay_strategy!r} is not one of {', '.join(STRATEGIES)}")


def load_config(path: Path | None) -> LifecycleConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    return from_dict(LifecycleConfig, load_yaml(path), where=str(path))
