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
    """Address `adapterops serve` binds by default (--host overrides); 127.0.0.1 keeps it off the network."""
    serving_port: int = 8000
    """Port `adapterops serve` listens on by default (--port overrides)."""
    artifact_root: str = ""
    """Where run artifacts (adapters, merged models, reports) go: a new experiment's artifact location is
    <artifact_root>/<experiment> (experiment_artifact_location). Used with a direct database tracking URI
    (sqlite:///, postgresql://), where the client writes artifacts itself; an http(s) tracking server keeps its own
    (--artifacts-destination, which the compose file sets to this value). "" = next to the SQLite database
    (<workdir>/mlartifacts); a postgresql:// tracking URI needs it (else MLflow writes to ./mlruns)."""
    state_db_url: str = ""
    """Database every serving replica and worker shares (postgresql://...): canary state and the prediction log;
    "" = files under the work dir (rollout-state.json, predictions.db: one replica)."""

    def __post_init__(self) -> None:
        if isinstance(self.serving_port, bool) or not 0 < self.serving_port < 65536:
            raise ValueError(f"serving_port must be in 1..65535, got {self.serving_port}")
        if not self.serving_host.strip() or any(c.isspace() for c in self.serving_host):
            raise ValueError(f"serving_host {self.serving_host!r} must be an address to bind, e.g. 127.0.0.1 (this "
                             "host only) or 0.0.0.0 (every interface)")
        scheme = urlparse(self.tracking_uri).scheme.split("+")[0]
        if self.tracking_uri and scheme not in ("sqlite", "http", "https", "postgresql"):
            raise ValueError(f"tracking_uri {self.tracking_uri!r}: expected sqlite:///, http(s):// or postgresql:// "
                             f"(MLflow's file store is not supported)")
        root_scheme = urlparse(self.artifact_root).scheme
        if self.artifact_root and root_scheme not in ARTIFACT_SCHEMES and not (
                root_scheme == "" and Path(self.artifact_root).is_absolute()):
            raise ValueError(f"artifact_root {self.artifact_root!r}: expected an object-store URI "
                             f"({', '.join(s + '://' for s in ARTIFACT_SCHEMES if s != 'file')}bucket/prefix), "
                             "file:///abs/path or an absolute directory")
        if scheme == "postgresql" and not self.artifact_root:
            raise ValueError(f"tracking_uri {self.tracking_uri!r} is a direct database URI, so clients write run "
                             "artifacts themselves: set artifact_root (e.g. s3://adapterops/mlflow), else MLflow "
                             "puts them in ./mlruns of whichever directory each process runs in")
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


    def experiment_artifact_location(self, experiment: str) -> str | None:
        """The artifact location to create `experiment` with: <artifact_root>/<experiment> for a direct database
        tracking URI; None (the backend decides) for an http(s) tracking server, which stores artifacts under its
        own --artifacts-destination, or when artifact_root is "" (SQLite: <db dir>/mlartifacts)."""
        if not self.artifact_root or urlparse(self.tracking_uri).scheme.startswith("http"):
            return None
        return f"{self.artifact_root.rstrip('/')}/{experiment}"

    def serving_address(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        """(host, port) for `adapterops serve`: the command's --host / --port where given, else this profile's."""
        host = self.serving_host if host is None else host
        port = self.serving_port if port is None else port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port!r}")
        return host, port


ARTIFACT_SCHEMES = ("s3", "gs", "wasbs", "hdfs", "file")
"""Artifact stores MLflow writes to by URI (besides an absolute directory)."""


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
