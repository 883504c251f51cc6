"""Deployment profiles: where MLflow, the init cache, Prefect and the server live (configs/profiles/<name>.yaml).

    profile = load_profile("production")     # a name under configs/profiles/, or a path to a YAML file
    ws = Workspace.create(workdir, base, profile.tracking_uri, profile.init_store_uri, profile.s3_endpoint_url)

String values may be ${VAR} or ${VAR:-default}, expanded from the environment when the profile is loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pipelines.config import CONFIG_DIR, ConfigError, from_dict, load_yaml

PROFILES_DIR = CONFIG_DIR / "profiles"
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class Profile:
    tracking_uri: str = ""
    """MLflow tracking URI (sqlite:///..., http(s)://mlflow:5000, postgresql://...); "" = SQLite under the work dir."""
    init_store_uri: str = ""
    """Init-cache store: a directory or s3://bucket/prefix; "" = <workdir>/init-cache."""
    s3_endpoint_url: str = ""
    """S3 endpoint for s3:// stores (MinIO, moto); "" = AWS's own (or AWS_ENDPOINT_URL)."""
    prefect_api_url: str = ""
    """Prefect API URL, ending in /api; "" = Prefect's temporary local server."""
    serving_host: str = "127.0.0.1"
    """Address `adapterops serve` binds; 127.0.0.1 keeps it off the network."""
    serving_port: int = 8000
    artifact_root: str = ""
    """Where MLflow keeps run artifacts; "" = next to the SQLite database (<workdir>/mlartifacts)."""
    state_db_url: str = ""
    """Database every serving replica and worker shares (postgresql://...): canary state and the prediction log;
    "" = files under the work dir (rollout-state.json, predictions.db: one replica)."""

    def __post_init__(self) -> None:
        if not 0 < self.serving_port < 65536:
            raise ValueError(f"serving_port must be in 1..65535, got {self.serving_port}")
        scheme = urlparse(self.tracking_uri).scheme.split("+")[0]
        if self.tracking_uri and scheme not in ("sqlite", "http", "https", "postgresql"):
            raise ValueError(f"tracking_uri {self.tracking_uri!r}: expected sqlite:///, http(s):// or postgresql:// "
                             f"(MLflow's file store is not supported)")
        state_scheme = urlparse(self.state_db_url).scheme.split("+")[0]
        if self.state_db_url and state_scheme not in ("postgresql", "sqlite"):
            raise ValueError(f"state_db_url {self.state_db_url!r}: expected postgresql://user@host:5432/db (or "
                             f"sqlite:///path for one host)")
        if self.prefect_api_url and not (self.prefect_api_url.startswith(("http://", "https://"))
                                         and self.prefect_api_url.rstrip("/").endswith("/api")):
            raise ValueError(f"prefect_api_url {self.prefect_api_url!r} must be an http(s) URL ending in /api, "
                             f"e.g. http://prefect-server:4200/api")
        if self.s3_endpoint_url and not self.s3_endpoint_url.startswith(("http://", "https://")):
            raise ValueError(f"s3_endpoint_url {self.s3_endpoint_url!r} must be an http(s) URL")


def expand_env(value, env: Mapping[str, str]):
    """${VAR} / ${VAR:-default} from env (non-strings pass through); an unset ${VAR} without default is an error."""
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if env.get(name):
            return env[name]
        if default is None:
            raise ConfigError(f"{value!r} needs ${name}: export {name}, or write ${{{name}:-default}}")
        return default

    return _PLACEHOLDER.sub(sub, value)


def load_profile(name_or_path: str | Path = "local", env: Mapping[str, str] | None = None) -> Profile:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise ConfigError(f"no profile {str(name_or_path)!r} ({path}); known profiles: {known}")
    env = os.environ if env is None else env
    try:
        data = {k: expand_env(v, env) for k, v in (load_yaml(path) or {}).items()}
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return from_dict(Profile, data, where=str(path))
