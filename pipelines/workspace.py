"""Where a deployment keeps things: work dir, base model, MLflow, init-cache store, monitoring store.

A Workspace is plain data (so Prefect can record it as a flow parameter); the heavy clients it hands out are made
on first use and shared within the process.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.manifest import staging

_SHARED: dict[tuple, object] = {}


@dataclass(frozen=True)
class Workspace:
    root: Path
    base_path: Path
    tracking_uri: str = ""
    """MLflow tracking URI; empty = MLFLOW_TRACKING_URI, else SQLite under root (the local profile)."""
    init_store_uri: str = ""
    """Init-cache store: a directory or s3://bucket/prefix; empty = <root>/init-cache."""
    s3_endpoint_url: str = ""
    state_db_url: str = ""
    """Database shared by serving replicas and workers (canary state, prediction log); empty =
    ADAPTEROPS_STATE_DB_URL, else files under root (one replica)."""
    artifact_root: str = ""
    """Artifact location of new MLflow experiments with a database tracking URI (the profile's artifact_root, e.g.
    s3://bucket/mlflow); empty: next to a SQLite database. A tracking server uses its own."""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def create(cls, root: Path, base_path: Path, tracking_uri: str = "", init_store_uri: str = "",
               s3_endpoint_url: str = "", state_db_url: str = "", artifact_root: str = "") -> "Workspace":
        root = Path(root).resolve()
        base_path = Path(base_path).resolve()
        if not (base_path / "config.json").is_file():
            raise FileNotFoundError(f"base model {base_path} not found (no config.json); pass --base with the "
                                    f"directory of a saved causal LM, e.g. models/tiny-llama")
        root.mkdir(parents=True, exist_ok=True)
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
        return cls(root, base_path, uri, init_store_uri or str(root / "init-cache"), s3_endpoint_url,
                   state_db_url or os.environ.get("ADAPTEROPS_STATE_DB_URL", ""), artifact_root)

    @classmethod
    def coerce(cls, value: "Workspace | dict") -> "Workspace":
        """A Workspace from itself or from the plain dict a Prefect deployment run passes as its parameter."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.create(Path(value["root"]), Path(value["base_path"]), value.get("tracking_uri", ""),
                              value.get("init_store_uri", ""), value.get("s3_endpoint_url", ""),
                              value.get("state_db_url", ""), value.get("artifact_root", ""))
        raise TypeError(f"expected a Workspace or its dict, got {type(value).__name__}")

    def _shared(self, kind: str, make):
        k = (kind, str(self.root), self.tracking_uri, self.artifact_root)
        if k not in _SHARED:
            _SHARED[k] = make()
        return _SHARED[k]

    @property
    def prediction_log_target(self) -> str:
        """What monitoring.sql_log.open_prediction_log opens: the shared database, else <root>/predictions.db."""
        return self.state_db_url or str(self.root / "predictions.db")

    @property
    def rollout_state_target(self) -> str:
        """What serving.rollout_shared.open_rollout_controller opens: the shared database, else the JSON file."""
        return self.state_db_url or str(self.root / "rollout-state.json")

    def registry(self):
        from registry.versions import AdapterRegistry

        return self._shared("registry", lambda: AdapterRegistry(self.tracking_uri, artifact_root=self.artifact_root))

    def init_store(self):
        from registry.store import open_store

        return self._shared("store", lambda: open_store(self.init_store_uri, self.s3_endpoint_url or None))

    def reference_pool(self):
        """An adapter pool for offline work (monitoring references): the same code path as serving."""
        from serving.pool import AdapterPool

        return self._shared("pool", lambda: AdapterPool(self.base_path))

    def fetch_version(self, family: str, version: str) -> Path:
        """A training-output-shaped directory for a registered version (verified downloads): a warm-start parent."""
        dest = self.root / "registry-cache" / family / version
        if (dest / "manifest.json").is_file():
            return dest
        reg = self.registry()
        with staging(dest) as tmp:
            for name in ("adapter", "adapter_native"):
                shutil.copytree(reg.download(family, version, name, self.root / "downloads"), tmp / name)
            got = reg.download(family, version, "train_manifest", self.root / "downloads")
            shutil.copy(got / "manifest.json" if got.is_dir() else got, tmp / "manifest.json")
            _bind_old_version(tmp)
        return dest


def _bind_old_version(out: Path) -> None:
    """A version registered before base bindings: write them from its training manifest into this local copy, so
    its adapter_native/ (the PiSSA adapter on the residual base) is marked like a new one's."""
    import json

    from registry.binding import BINDING_FILE, write_binding

    from pipelines.methods import METHODS

    m = json.loads((out / "manifest.json").read_text())
    base_sha, key, method = m["inputs"]["base_sha256"], m["inputs"].get("init_key", ""), m.get("method", "")
    residual = method in METHODS and METHODS[method].residual  # as pipelines.train binds a new version
    if not (out / "adapter" / BINDING_FILE).is_file():
        write_binding(out / "adapter", base_sha, "plain", method, key)
    if not (out / "adapter_native" / BINDING_FILE).is_file():
        write_binding(out / "adapter_native", base_sha, "pissa_residual" if residual else "plain", method, key)
