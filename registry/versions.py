"""Adapter versions in the MLflow Model Registry: lineage tags, hash-verified artifacts, aliases, promote / rollback.

One registered model per adapter family. Each version points at the training run's artifacts and carries tags:
`base_sha256` (the base model it was trained on), `sha256.<artifact>` (tree hash of every logged artifact) and
`gates_passed`. Aliases `champion`, `challenger` and `previous` say what serves. Alias moves run as a list of
idempotent steps behind an intent record (a registered-model tag), so a crash at any step is completed by the next
call; every move leaves an audit record (`audit.NNNNNN` registered-model tags, JSON).

Alias operations (promote, rollback, set/clear challenger, recover) of one family are serialised across processes and
hosts by a lease: `adapterops.lease.<token>` registered-model tags naming the holder (op, actor, host, pid, expiry).
A caller waits up to `lease_wait_seconds` for a live holder, then gets RegistryBusy naming it.
- Guaranteed, on every backend (SQLite file, PostgreSQL, an MLflow server in front of either): while holders finish
  within `lease_seconds`, at most one alias operation per family runs at a time; its state is read and its intent,
  alias moves and audit record (numbered without gaps) are written under the lease, so concurrent promotions and
  rollbacks end as some serial order of them; a refused call changes nothing. An abandoned lease (expired, or its
  holder's process on this host is gone) is removed by the next caller, which then completes the intent it left.
- Not guaranteed: (1) a holder stalled past `lease_seconds` (default 60 s; an operation takes well under a second)
  can be taken over; it re-checks its lease before every step and stops with RegistryBusy when it is gone, but a
  step already sent completes; (2) expiry compares the wall clocks of different hosts: clock skew eats into
  `lease_seconds`; (3) a dead holder is detected early only on its own host and pid namespace; elsewhere its lease
  blocks the family until it expires; (4) fairness: a waiter can lose to a newcomer; (5) writers that move aliases
  with MlflowClient directly (the MLflow UI included) bypass the lease.
Readers (`aliases`, `alias`, `list_versions`, `get`, `history`) that find an intent record show the state the move
leads to (the intent is its commit point) and never write; `recover` or the next alias operation completes it.
Outages: the start-up probe runs one real registry query (a server whose database is down fails it, unlike /health);
MLflow's HTTP client is bounded (MLFLOW_HTTP_BOUNDS, unless the operator set them) and direct PostgreSQL URIs get a
connect_timeout; a call whose backend or artifact store does not answer raises one RegistryError naming it.

    reg = AdapterRegistry("sqlite:///work/mlflow.db")
    run_id = reg.create_run("support-assistant")
    v = reg.register("support-assistant", run_id, {"adapter": Path("out/adapter")}, {"base_sha256": h}, True)
    reg.promote("support-assistant", v.version, actor="rollout", reason="canary won")
    reg.resolve("support-assistant@champion", Path("work/adapters"), expected_base_sha256=h).path
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import random
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from registry.binding import BindingMismatch, check_binding
from registry.hashing import manifest_hash, sha256_file, tree_hash
from registry.names import parse_ref, validate_name
from registry.store import CorruptArtifact

log = logging.getLogger(__name__)

ALIASES = ("champion", "challenger", "previous")
FAMILY_TAG_KEY, FAMILY_TAG_VALUE = "adapterops.kind", "adapter-family"
INTENT_TAG = "adapterops.intent"
LEASE_PREFIX = "adapterops.lease."
AUDIT_PREFIX = "audit."
RESERVED_TAGS = ("gates_passed",)
_MAX_REASON = 2000
_INTENT_KEYS = ("id", "op", "family", "from_version", "to_version", "actor", "reason", "ts", "audit_key", "moves")


class RegistryError(Exception):
    """A registry request that cannot be served as asked; the message says what to do."""


class CorruptVersionArtifact(RegistryError, CorruptArtifact):
    """A version's downloaded artifact does not match the tree hash recorded when it was registered."""


class BaseMismatch(RegistryError):
    """The adapter was trained on another base model than the one it would be loaded onto."""


class RegistryBusy(RegistryError):
    """Another process holds the family's alias lease (an operation in flight), or this process lost its lease."""


class SimulatedCrash(RuntimeError):
    """Test-only: raised by `_fail_after_step` to stop an alias operation half way, as a killed process would."""


@dataclass
class VersionInfo:
    family: str
    version: str
    run_id: str | None
    source: str
    tags: dict[str, str]
    aliases: list[str]
    created: float
    """Creation time, seconds since the epoch."""

    def gates_passed(self) -> bool:
        return self.tags.get("gates_passed") == "true"

    @property
    def base_sha256(self) -> str | None:
        return self.tags.get("base_sha256")


@dataclass
class AuditRecord:
    op: str
    """promote, rollback, set_challenger, clear_challenger; `noop` for a request that changed nothing (not stored)."""
    family: str
    from_version: str | None
    to_version: str | None
    actor: str
    reason: str
    ts: float


@dataclass
class ResolvedAdapter:
    family: str
    version: str
    path: Path
    """Local, hash-verified copy of the PEFT adapter directory."""
    base_sha256: str
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Lease:
    """A claim on a family's alias operations, stored as the registered-model tag `adapterops.lease.<token>`."""

    token: str
    family: str
    op: str
    actor: str
    host: str
    scope: str
    """Hostname, boot id and pid namespace of the holder: where `pid` can be checked for liveness."""
    pid: int
    acquired: float
    expires: float
    """Seconds since the epoch, by the holder's clock; past it, other processes treat the lease as abandoned."""

    @property
    def tag(self) -> str:
        return LEASE_PREFIX + self.token

    def stale_reason(self, now: float) -> str | None:
        """Why the lease no longer protects anything, or None while its holder may still be working."""
        if now > self.expires:
            return f"it expired {now - self.expires:.0f} s ago"
        if self.scope == _PROCESS_SCOPE and not _pid_alive(self.pid):
            return f"its process {self.pid} on this host is gone"
        return None

    def describe(self) -> str:
        when = time.strftime("%H:%M:%S UTC", time.gmtime(self.acquired))
        return f"{self.op} by {self.actor} (pid {self.pid} on {self.host}, since {when}, lease {self.token[:8]})"


def _process_scope() -> str:
    """Hostname + kernel boot id + pid-namespace inode: two processes with equal scopes see the same pid table."""
    parts = [socket.gethostname()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: str(os.stat("/proc/self/ns/pid").st_ino)):
        try:
            parts.append(read())
        except OSError:
            pass
    return "/".join(parts)


_PROCESS_SCOPE = _process_scope()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child that its parent has not reaped yet is a zombie: dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _version_number(family: str, version) -> str:
    version = str(version)
    if not version.isdigit():
        raise RegistryError(f"version {version!r} of {family!r} is not a version number; use e.g. '3'")
    return version


def _default_actor() -> str:
    try:
        return os.environ.get("ADAPTEROPS_ACTOR") or getpass.getuser()
    except Exception:  # no user database entry (some containers)
        return "unknown"


PROBE_TIMEOUT_S = 10.0
"""Seconds the start-up probe waits for one answer of the backend."""
MLFLOW_HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                      "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
"""MLflow's HTTP client defaults (120 s per request, 7 retries, backoff factor 2: about 4 minutes against a server that
is down or answers 5xx) bounded to seconds. Set in the environment (MLflow reads it on every request) unless the
operator set them: a request against a dead server now fails after about 3 x 20 s at worst, refused connections in
about 3 s."""


def bound_mlflow_http() -> None:
    for key, value in MLFLOW_HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)


def _first_line(e: BaseException | None) -> str:
    text = str(e).strip() if e is not None else ""
    return " ".join(text.splitlines()[0].split())[:300] if text else type(e).__name__


def _norm_sha(value: str | None) -> str:
    return (value or "").strip().lower().removeprefix("sha256:")


def _short(value: str | None) -> str:
    v = _norm_sha(value)
    return f"sha256:{v[:12]}…" if v else "<none>"


class AdapterRegistry:
    """Adapter families and versions on an MLflow tracking/registry backend (SQLite, PostgreSQL or an MLflow server).

    retries: connection attempts of the start-up probe (a down backend fails in seconds, not MLflow's minutes).
    create: False for read-only callers: a SQLite URI whose file does not exist is refused ("no registry at PATH")
    instead of MLflow creating an empty database there.
    lease_seconds: how long an alias operation may hold its family's lease before others treat it as abandoned.
    lease_wait_seconds: how long promote/rollback/... wait for another process's operation on the same family
    before refusing with RegistryBusy (0: refuse at once).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        retries: int = 3,
        lease_seconds: float = 60.0,
        lease_wait_seconds: float = 15.0,
        create: bool = True,
        artifact_root: str = "",
    ):
        """artifact_root: where a new experiment's artifacts go (`<artifact_root>/<experiment>`) when the tracking
        URI is a database (SQLite, PostgreSQL); a tracking server (http) uses its own --artifacts-destination."""
        bound_mlflow_http()
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise RegistryError(
                "no MLflow tracking URI: pass tracking_uri or set MLFLOW_TRACKING_URI (e.g. sqlite:///work/mlflow.db)"
            )
        try:
            scheme = urlparse(uri).scheme
            urlparse(uri).port  # noqa: B018 - raises on a malformed host or port
        except ValueError as e:
            raise RegistryError(f"tracking URI {uri!r} is not a valid URI ({e}); use sqlite:///path/mlflow.db, "
                                "postgresql://... or an http(s):// tracking server") from None
        if scheme in ("", "file"):
            raise RegistryError(
                f"tracking URI {uri!r} is a file store, which MLflow 3.17 no longer supports; "
                "use sqlite:///path/mlflow.db, postgresql://... or an http(s):// tracking server"
            )
        self.tracking_uri = uri
        self.retries = max(1, retries)
        self.lease_seconds = float(lease_seconds)
        self.lease_wait_seconds = max(0.0, float(lease_wait_seconds))
        self.create = create
        self.artifact_root = artifact_root
        self._probe()
        from mlflow import MlflowClient

        bounded = _with_connect_timeout(uri)
        self.client = _GuardedClient(MlflowClient(tracking_uri=bounded, registry_uri=bounded), self._safe_uri())

    def __repr__(self) -> str:
        return f"AdapterRegistry({self._safe_uri()!r})"

    def _safe_uri(self) -> str:
        p = urlparse(self.tracking_uri)
        if p.password:
            return self.tracking_uri.replace(f":{p.password}@", ":***@")
        return self.tracking_uri

    def _probe(self) -> None:
        """Fail fast, after `retries` tries, when the backend is down: MLflow itself would retry for minutes."""
        scheme = urlparse(self.tracking_uri).scheme.split("+")[0]
        if scheme == "sqlite":
            self._check_sqlite_file()
            return
        last: Exception | None = None
        for attempt in range(self.retries):
            try:
                if scheme in ("http", "https"):
                    self._probe_server()
                else:
                    import sqlalchemy

                    connect_args = {"connect_timeout": 3} if scheme in ("postgresql", "mysql") else {}
                    engine = sqlalchemy.create_engine(self.tracking_uri, connect_args=connect_args)
                    try:
                        with engine.connect():
                            pass
                    finally:
                        engine.dispose()
                return
            except Exception as e:  # noqa: BLE001 - any failure to connect counts
                last = e
                if attempt + 1 < self.retries:
                    time.sleep(0.2 * 2**attempt)
        raise RegistryError(
            f"MLflow backend {self._safe_uri()} is unreachable after {self.retries} tries: {_first_line(last)}; "
            "start it or fix MLFLOW_TRACKING_URI"
        ) from last

    def _sqlite_path(self) -> Path | None:
        rest = self.tracking_uri.split(":", 1)[1].removeprefix("///")
        rest = rest.split("?", 1)[0]
        return None if rest in ("", ":memory:") else Path(rest)

    def _check_sqlite_file(self) -> None:
        """A read-only caller never creates a database; an existing file must be SQLite (not corrupt, not a dir)."""
        path = self._sqlite_path()
        if path is None:
            if not self.create:
                raise RegistryError(f"tracking URI {self.tracking_uri!r} names no database file (an in-memory "
                                    "registry holds nothing); use sqlite:///path/mlflow.db")
            return
        if path.is_dir():
            raise RegistryError(f"registry path {path} is a directory, not an SQLite file; point the tracking URI at "
                                "the mlflow.db file, e.g. sqlite:///work/demo/mlflow.db")
        if not path.exists():
            if not self.create:
                raise RegistryError(f"no registry at {path} (the file does not exist); check the path in "
                                    "--tracking-uri / MLFLOW_TRACKING_URI, e.g. sqlite:///work/demo/mlflow.db")
            return
        try:
            with open(path, "rb") as f:
                header = f.read(16)
        except OSError as e:
            raise RegistryError(f"registry file {path} cannot be read ({e.strerror}); fix its permissions") from None
        if header and header != b"SQLite format 3\x00":
            raise RegistryError(f"registry file {path} is not an SQLite database (corrupt, or another kind of file); "
                                "restore it from a backup or point the tracking URI at the right file")

    def _probe_server(self) -> None:
        """One real registry query (not /health, which answers while the server's database is down)."""
        import urllib.error
        import urllib.request

        url = self.tracking_uri.rstrip("/") + "/api/2.0/mlflow/registered-models/search?max_results=1"
        try:
            urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S).close()
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                return  # up, but needs credentials: MLflow's own client sends them (MLFLOW_TRACKING_TOKEN ...)
            detail = e.read().decode("utf-8", "replace")[:200]
            raise ConnectionError(f"HTTP {e.code} from the registry query ({' '.join(detail.split())})") from None

    def ping(self) -> dict:
        """Readiness: one real query of the backend's database (lists at most one registered model).

        Returns {"ok": True, "uri", "seconds"}; raises RegistryError naming the backend when it does not answer.
        """
        t0 = time.monotonic()
        try:
            self.client.search_registered_models(max_results=1)
        except RegistryError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure means not ready
            raise RegistryError(
                f"MLflow backend {self._safe_uri()} does not answer a registry query: {_first_line(e)}; "
                "check the tracking server and its database"
            ) from e
        return {"ok": True, "uri": self._safe_uri(), "seconds": round(time.monotonic() - t0, 3)}

    # -- runs (a convenience for callers that have no run yet) --------------------------------------------------

    def create_run(self, experiment: str, artifact_location: str | None = None, run_name: str | None = None) -> str:
        """Create a run in `experiment` (created if missing) and return its id.

        With a SQLite backend and no artifact_location, artifacts go next to the database (`<db dir>/mlartifacts`)
        rather than into the current directory. A tracking server uses its own artifact root; a direct PostgreSQL URI
        needs artifact_location (e.g. s3://bucket/mlflow), else MLflow writes to ./mlruns.
        """
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            scheme = urlparse(self.tracking_uri).scheme
            if artifact_location is None and self.artifact_root and not scheme.startswith("http"):
                artifact_location = f"{self.artifact_root.rstrip('/')}/{experiment}"
            if artifact_location is None and scheme == "sqlite":
                db = Path(self.tracking_uri.removeprefix("sqlite:///"))
                artifact_location = str(db.parent.resolve() / "mlartifacts" / experiment)
            elif artifact_location is None and not scheme.startswith("http"):
                log.warning("experiment %s falls back to MLflow's ./mlruns; pass artifact_location", experiment)
            exp_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
        else:
            exp_id = exp.experiment_id
            wanted = artifact_location or (f"{self.artifact_root.rstrip('/')}/{experiment}" if self.artifact_root
                                           and not urlparse(self.tracking_uri).scheme.startswith("http") else None)
            if wanted and exp.artifact_location.removeprefix("file://").rstrip("/") != wanted.rstrip("/"):
                log.warning("experiment %s keeps the artifact location it was created with (%s), not %s: MLflow "
                            "fixes it at creation", experiment, exp.artifact_location, wanted)
        return self.client.create_run(exp_id, run_name=run_name).info.run_id

    # -- reading ------------------------------------------------------------------------------------------------

    def _model(self, family: str):
        from mlflow.exceptions import MlflowException

        validate_name("family", family)
        try:
            return self.client.get_registered_model(family)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                known = ", ".join(self.families()) or "none"
                raise RegistryError(
                    f"no adapter family {family!r} in {self!r} (known: {known}); register a version first"
                ) from None
            raise

    @staticmethod
    def _info(mv, aliases: list[str] | None = None) -> VersionInfo:
        return VersionInfo(
            family=mv.name,
            version=str(mv.version),
            run_id=mv.run_id or None,
            source=mv.source,
            tags=dict(mv.tags or {}),
            aliases=sorted(aliases if aliases is not None else (mv.aliases or [])),
            created=(mv.creation_timestamp or 0) / 1000.0,
        )

    def families(self) -> list[str]:
        out, token = [], None
        while True:
            page = self.client.search_registered_models(max_results=1000, page_token=token)
            out += [m.name for m in page if (m.tags or {}).get(FAMILY_TAG_KEY) == FAMILY_TAG_VALUE]
            token = page.token
            if not token:
                return sorted(out)

    def get(self, family: str, version: str) -> VersionInfo:
        aliases = self.aliases(family)
        info = self._version(family, version)
        info.aliases = sorted(a for a, v in aliases.items() if v == info.version)
        return info

    def _version(self, family: str, version: str) -> VersionInfo:
        """`get` for a family known to exist."""
        from mlflow.exceptions import MlflowException

        version = _version_number(family, version)
        try:
            return self._info(self.client.get_model_version(family, version))
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                have = ", ".join(v.version for v in self.list_versions(family)) or "none"
                raise RegistryError(f"adapter family {family!r} has no version {version} (it has: {have})") from None
            raise

    def list_versions(self, family: str) -> list[VersionInfo]:
        by_version: dict[str, list[str]] = {}
        for alias, v in self.aliases(family).items():
            by_version.setdefault(str(v), []).append(alias)
        out, token = [], None
        while True:
            page = self.client.search_model_versions(f"name='{family}'", max_results=1000, page_token=token)
            out += [self._info(mv, by_version.get(str(mv.version), [])) for mv in page]
            token = page.token
            if not token:
                return sorted(out, key=lambda v: int(v.version))

    def aliases(self, family: str) -> dict[str, str]:
        """{alias: version} of the family's aliases that are set.

        When an alias move is unfinished (its intent record is there: in flight, or its process died), the answer is
        the state that move leads to, which the next alias operation (or `recover`) will complete: a reader never sees
        half of a move, e.g. `previous == champion`. The intent is the move's commit point, so this is what it means.
        """
        return self._view(family)[0]

    def alias(self, family: str, alias: str) -> str | None:
        self._check_alias(alias)
        return self.aliases(family).get(alias)

    def pending(self, family: str) -> dict | None:
        """The intent record of an unfinished alias move of the family (None when there is none)."""
        return self._view(family)[1]

    def _view(self, family: str) -> tuple[dict[str, str], dict | None, dict[str, str]]:
        """(aliases as readers see them, pending intent or None, family tags)."""
        rm = self._model(family)
        tags = dict(rm.tags or {})
        aliases = {k: str(v) for k, v in (rm.aliases or {}).items()}
        try:
            intent = self._intent(family, tags)
        except RegistryError as e:  # readers (servers following aliases) go on with the aliases as they are;
            log.info("%s", e)  # every alias operation refuses with this message, and the CLI prints it as a note
            intent = None
        if intent is not None:
            for action, alias, version in intent["moves"]:
                if action == "set":
                    aliases[alias] = str(version)
                else:
                    aliases.pop(alias, None)
            log.info(  # `pending()` tells callers; the CLI prints a note; a server would log this on every poll
                "%s: an alias move is unfinished (%s v%s -> v%s by %s, intent %s): showing the state it leads to; "
                "`adapterops registry recover %s` completes it", family, intent["op"], intent["from_version"] or "-",
                intent["to_version"] or "-", intent["actor"], intent["id"][:8], family,
            )
        return aliases, intent, tags

    @staticmethod
    def _intent(family: str, tags: dict[str, str]) -> dict | None:
        """The family's intent record, checked; RegistryError (how to clear it) when it is unreadable."""
        raw = tags.get(INTENT_TAG)
        if not raw:
            return None
        try:
            intent = json.loads(raw)
            if not isinstance(intent, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in _INTENT_KEYS if k not in intent]
            if missing:
                raise ValueError(f"fields {missing} are missing")
            for move in intent["moves"]:
                action, alias, version = move
                if action not in ("set", "delete") or alias not in ALIASES or (action == "set" and not version):
                    raise ValueError(f"move {move!r} is not [set|delete, alias, version]")
        except (ValueError, TypeError) as e:
            raise RegistryError(
                f"the intent record of {family} (registered-model tag {INTENT_TAG!r}) is unreadable ({e}), so no alias "
                f"operation can run; check the aliases with `adapterops registry history {family}`, then clear it with "
                f"`adapterops registry recover {family} --discard-intent`"
            ) from None
        return intent

    @staticmethod
    def _check_alias(alias: str) -> None:
        if alias not in ALIASES:
            raise RegistryError(f"unknown alias {alias!r}: adapterops uses {', '.join(ALIASES)}")

    def history(self, family: str) -> list[AuditRecord]:
        """The audit trail, oldest first; an unfinished move's record is included (it is written when it completes)."""
        _, intent, tags = self._view(family)
        out = []
        for key in sorted(k for k in tags if k.startswith(AUDIT_PREFIX)):
            try:
                out.append(AuditRecord(**json.loads(tags[key])))
            except (ValueError, TypeError) as e:
                raise RegistryError(
                    f"audit record {key!r} of {family} is unreadable ({' '.join(str(e).split())[:120]}): the audit "
                    f"trail was edited outside adapterops; restore that registered-model tag's JSON from a backup, or "
                    f"delete the tag (MLflow UI or MlflowClient.delete_registered_model_tag) to accept the loss"
                ) from None
        if intent is not None and intent["audit_key"] not in tags:
            out.append(AuditRecord(**{k: intent[k] for k in AuditRecord.__dataclass_fields__}))
        return out

    # -- registering --------------------------------------------------------------------------------------------

    def register(
        self, family: str, run_id: str, artifacts: dict[str, Path], tags: dict[str, str], gates_passed: bool
    ) -> VersionInfo:
        """Log `artifacts` into the run, record their tree hashes and lineage as version tags, create the version."""
        from mlflow.exceptions import MlflowException

        validate_name("family", family)
        if "adapter" not in artifacts:
            raise RegistryError(f"cannot register {family}: artifacts has no 'adapter' entry (the PEFT adapter dir)")
        adapter = Path(artifacts["adapter"])
        if not (adapter / "adapter_config.json").is_file():
            raise RegistryError(
                f"cannot register {family}: {adapter} is not a PEFT adapter directory (no adapter_config.json); "
                "pass the directory written by model.save_pretrained()"
            )
        if not _norm_sha(tags.get("base_sha256")):
            raise RegistryError(
                f"cannot register {family}: tag 'base_sha256' (the base model's weights hash, "
                "registry.hashing.model_weights_hash) is missing; every version must name its base"
            )
        try:
            check_binding(adapter, tags["base_sha256"], "register")
        except BindingMismatch as e:
            raise BaseMismatch(f"cannot register {family}: {e}") from None
        bad = [k for k in tags if k in RESERVED_TAGS or k.startswith("sha256.")]
        if bad:
            raise RegistryError(f"cannot register {family}: tags {bad} are set by the registry itself; drop them")
        for name, path in artifacts.items():
            validate_name("artifact", name)
            if not Path(path).exists():
                raise RegistryError(f"cannot register {family}: artifact {name!r} at {path} does not exist")
        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            raise RegistryError(
                f"cannot register {family}: run {run_id!r} not found in {self!r} ({e.message}); pass an existing run"
            ) from None

        version_tags = {k: str(v) for k, v in tags.items()}
        for name, path in artifacts.items():
            path = Path(path)
            try:
                if path.is_dir():
                    version_tags[f"sha256.{name}"] = tree_hash(path)
                    self.client.log_artifacts(run_id, str(path), name)
                else:
                    version_tags[f"sha256.{name}"] = manifest_hash({path.name: sha256_file(path)})
                    self.client.log_artifact(run_id, str(path), name)
            except Exception as e:  # noqa: BLE001 - boto3, requests and MLflow each raise their own
                if not _looks_unreachable(e) and not isinstance(e, MlflowException):
                    raise
                raise RegistryError(
                    f"cannot register {family}: uploading artifact {name!r} to {run.info.artifact_uri} failed "
                    f"({_first_line(e)}); the artifact store (S3 / the tracking server's artifact proxy) looks down: "
                    "start it or fix its endpoint, then register again (no version was created)"
                ) from e
        version_tags["gates_passed"] = "true" if gates_passed else "false"

        self._ensure_family(family)
        mv = self.client.create_model_version(family, run.info.artifact_uri, run_id=run_id, tags=version_tags)
        log.info("registered %s v%s from run %s (gates_passed=%s)", family, mv.version, run_id, gates_passed)
        return self._info(mv, [])

    def _ensure_family(self, family: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(family, tags={FAMILY_TAG_KEY: FAMILY_TAG_VALUE})
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            self.client.set_registered_model_tag(family, FAMILY_TAG_KEY, FAMILY_TAG_VALUE)

    # -- alias operations ---------------------------------------------------------------------------------------

    def _require_gates(self, info: VersionInfo, what: str) -> None:
        if not info.gates_passed():
            raise RegistryError(
                f"refusing to make {info.family} v{info.version} {what}: its gates failed "
                f"(gates_passed={info.tags.get('gates_passed')!r}); fix the adapter and register a new version"
            )

    def _require_same_base(self, info: VersionInfo, champion: str | None, what: str, allow: bool) -> None:
        """Servers load every version of a family onto the champion's base; a version from another base is refused."""
        if champion is None or allow:
            return
        serving = self._version(info.family, champion).tags.get("base_sha256")
        if _norm_sha(serving) != _norm_sha(info.base_sha256):
            raise BaseMismatch(
                f"refusing to make {info.family} v{info.version} {what}: it was trained on base "
                f"{_short(info.base_sha256)}, but champion v{champion} runs on base {_short(serving)}, which the "
                "servers have loaded; register a version trained on that base, or pass allow_base_change "
                "(--allow-base-change) when the servers move to the new base too"
            )

    def _snapshot(self, family: str, lease: Lease) -> tuple[dict[str, str], dict[str, str]]:
        """(aliases, tags) of the family once any unfinished operation is completed; stable while `lease` is held."""
        rm = self._model(family)
        if self._recover_held(family, lease, rm.tags or {}) is not None:
            rm = self._model(family)
        return {k: str(v) for k, v in (rm.aliases or {}).items()}, dict(rm.tags or {})

    def promote(
        self,
        family: str,
        version: str,
        actor: str | None = None,
        reason: str = "",
        allow_base_change: bool = False,
        _fail_after_step: int | None = None,
    ) -> AuditRecord:
        """Make `version` the champion; the old champion becomes `previous`; `challenger` is cleared if it was this."""
        _version_number(family, version)  # bad input is refused before any lease is taken
        with self._holding(family, "promote", actor) as lease:
            aliases, tags = self._snapshot(family, lease)
            info = self._version(family, version)
            self._require_gates(info, "champion")
            champion = aliases.get("champion")
            if champion == info.version:
                msg = f"{family} v{info.version} is already the champion; nothing changed"
                log.info(msg)
                return AuditRecord("noop", family, champion, info.version, lease.actor, msg, time.time())
            self._require_same_base(info, champion, "champion", allow_base_change)
            moves = [["set", "previous", champion]] if champion else []
            moves.append(["set", "champion", info.version])
            if aliases.get("challenger") == info.version:
                moves.append(["delete", "challenger", None])
            return self._start(lease, tags, champion, info.version, reason, moves, _fail_after_step)

    def rollback(
        self, family: str, actor: str | None = None, reason: str = "", _fail_after_step: int | None = None
    ) -> AuditRecord:
        """Champion goes back to `previous`; the rolled-back version loses champion and `previous` is cleared."""
        with self._holding(family, "rollback", actor) as lease:
            aliases, tags = self._snapshot(family, lease)
            champion, previous = aliases.get("champion"), aliases.get("previous")
            if champion is None:
                raise RegistryError(f"cannot roll back {family}: it has no champion; promote a version first")
            if previous is None or previous == champion:
                gone = self._deleted_targets(family, "previous")
                hint = f" (the version it last pointed at, v{gone[-1]}, was deleted)" if gone else ""
                raise RegistryError(
                    f"cannot roll back {family}: champion v{champion} has no previous version to return to{hint}; "
                    "promote a known-good version instead"
                )
            if not self._version_exists(family, previous):
                raise RegistryError(
                    f"cannot roll back {family}: alias 'previous' points at v{previous}, which no longer exists; "
                    "promote a known-good version instead"
                )
            moves = [["set", "champion", previous], ["delete", "previous", None]]
            if aliases.get("challenger") == previous:  # a version is never champion and challenger at once
                moves.append(["delete", "challenger", None])
            return self._start(lease, tags, champion, previous, reason, moves, _fail_after_step)

    def set_challenger(
        self,
        family: str,
        version: str,
        actor: str | None = None,
        reason: str = "",
        allow_base_change: bool = False,
        _fail_after_step: int | None = None,
    ) -> AuditRecord:
        """Point `challenger` (the canary) at `version`; refuses failed gates, another base and the champion."""
        _version_number(family, version)
        with self._holding(family, "set_challenger", actor) as lease:
            aliases, tags = self._snapshot(family, lease)
            info = self._version(family, version)
            self._require_gates(info, "challenger")
            if aliases.get("champion") == info.version:
                raise RegistryError(f"{family} v{info.version} is the champion; a challenger must be another version")
            current = aliases.get("challenger")
            if current == info.version:
                msg = f"{family} v{info.version} is already the challenger; nothing changed"
                return AuditRecord("noop", family, current, info.version, lease.actor, msg, time.time())
            self._require_same_base(info, aliases.get("champion"), "challenger", allow_base_change)
            moves = [["set", "challenger", info.version]]
            return self._start(lease, tags, current, info.version, reason, moves, _fail_after_step)

    def clear_challenger(self, family: str, actor: str | None = None, reason: str = "") -> AuditRecord:
        """Remove the `challenger` alias (a canary that was aborted); a no-op when there is none."""
        with self._holding(family, "clear_challenger", actor) as lease:
            aliases, tags = self._snapshot(family, lease)
            current = aliases.get("challenger")
            if current is None:
                msg = f"{family} has no challenger; nothing changed"
                return AuditRecord("noop", family, None, None, lease.actor, msg, time.time())
            moves = [["delete", "challenger", None]]
            return self._start(lease, tags, current, None, reason, moves, None)

    def recover(self, family: str, discard_unreadable_intent: bool = False) -> AuditRecord | None:
        """Complete an operation that stopped half way (its intent record is still there); None if there is none.

        Waits for, then refuses (RegistryBusy), a live lease of another process; an abandoned one (expired, or its
        holder's process on this host is gone) is taken over and removed. With discard_unreadable_intent, an intent
        record that cannot be read (edited by hand, truncated) is deleted instead of blocking every alias operation;
        a readable one is always completed, never discarded.
        """
        with self._holding(family, "recover", None) as lease:
            tags = self._model(family).tags or {}
            if discard_unreadable_intent:
                try:
                    self._intent(family, tags)
                except RegistryError:
                    log.warning("%s: deleting the unreadable intent record %r", family, tags.get(INTENT_TAG, "")[:200])
                    self.client.delete_registered_model_tag(family, INTENT_TAG)
                    return None
            return self._recover_held(family, lease, tags)

    def in_flight(self, family: str) -> tuple[dict | None, list[Lease]]:
        """The unfinished operation's intent record (or None) and the leases now written on the family."""
        tags = self._model(family).tags or {}
        intent = self._intent(family, tags)
        return intent, [lease for lease, _ in self._leases(family, tags)]

    # -- the lease: one alias operation per family at a time --------------------------------------------------------

    @staticmethod
    def _leases(family: str, tags: dict[str, str]) -> list[tuple[Lease, str | None]]:
        """(lease, stale reason or None) for every lease tag; an unreadable one counts as stale."""
        now, out = time.time(), []
        for key, raw in tags.items():
            if not key.startswith(LEASE_PREFIX):
                continue
            try:
                lease = Lease(**json.loads(raw))
            except (ValueError, TypeError):
                lease = Lease(key[len(LEASE_PREFIX) :], family, "?", "?", "?", "?", 0, 0.0, 0.0)
                out.append((lease, "its record is unreadable"))
                continue
            out.append((lease, lease.stale_reason(now)))
        return out

    def _acquire(self, family: str, op: str, actor: str | None) -> Lease:
        """Take the family's lease, waiting up to lease_wait_seconds for other holders, else raise RegistryBusy.

        MLflow has no compare-and-swap, so each contender writes its *own* tag (`adapterops.lease.<token>`) and then
        reads all lease tags: it holds the lease only if no other live lease is there, else it withdraws its tag
        and backs off. Tag writes are committed database rows (directly or through the tracking server) and a read
        sees every write that completed before it, so of two contenders at least the later reader sees the other:
        two processes never both hold the lease (both may withdraw; they retry after a random backoff). What this
        does and does not guarantee: the module docstring.
        """
        deadline = time.monotonic() + self.lease_wait_seconds
        delay = 0.05
        while True:
            others = [lease for lease, stale in self._leases(family, self._model(family).tags or {}) if stale is None]
            if not others:
                now = time.time()
                mine = Lease(uuid.uuid4().hex, family, op, actor or _default_actor(), socket.gethostname(),
                             _PROCESS_SCOPE, os.getpid(), now, now + self.lease_seconds)
                self.client.set_registered_model_tag(family, mine.tag, json.dumps(asdict(mine)))
                leases = self._leases(family, self._model(family).tags or {})
                others = [lease for lease, stale in leases if stale is None and lease.token != mine.token]
                if not others:
                    for lease, stale in leases:
                        if stale is not None and lease.token != mine.token:
                            log.warning("%s: removing abandoned lease of %s: %s", family, lease.describe(), stale)
                            self.client.delete_registered_model_tag(family, lease.tag)
                    return mine
                self.client.delete_registered_model_tag(family, mine.tag)  # contended: withdraw and back off
            if time.monotonic() >= deadline:
                raise RegistryBusy(self._busy_message(family, op, others))
            time.sleep(min(delay * random.uniform(0.5, 1.5), max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)

    def _busy_message(self, family: str, op: str, others: list[Lease]) -> str:
        holder = others[0]
        until = time.strftime("%H:%M:%S UTC", time.gmtime(holder.expires))
        return (
            f"cannot {op} {family}: another alias operation is in flight: {holder.describe()}"
            f"{f' (and {len(others) - 1} more)' if len(others) > 1 else ''}; waited {self.lease_wait_seconds:.0f} s. "
            f"Retry when it has finished; if its process died, its lease expires at {until} and the next "
            f"promote/rollback (or AdapterRegistry.recover) then completes its unfinished steps"
        )

    def _release(self, family: str, lease: Lease) -> None:
        self.client.delete_registered_model_tag(family, lease.tag)

    def _check_lease(self, family: str, lease: Lease) -> None:
        if lease.tag not in (self._model(family).tags or {}):
            raise RegistryBusy(
                f"{lease.op} of {family} lost its lease {lease.token[:8]} (held longer than {self.lease_seconds:.0f} s,"
                " so another process took over and completed the unfinished steps); check "
                f"`adapterops registry history {family}` and repeat the request if it is still wanted"
            )

    @contextmanager
    def _holding(self, family: str, op: str, actor: str | None):
        """Hold the family's lease for the block; a SimulatedCrash leaves it behind, as a killed process would."""
        lease = self._acquire(family, op, actor)
        try:
            yield lease
        except SimulatedCrash:
            raise
        except BaseException:
            self._release(family, lease)
            raise
        self._release(family, lease)

    # -- intent records and steps -----------------------------------------------------------------------------

    def _recover_held(self, family: str, lease: Lease, tags: dict[str, str]) -> AuditRecord | None:
        intent = self._intent(family, tags)
        if intent is None:
            return None
        log.warning(
            "completing an unfinished %s of %s (v%s -> v%s, by %s)",
            intent["op"], family, intent["from_version"], intent["to_version"], intent["actor"],
        )
        return self._run(intent, lease, skip=1, fail_after=None)

    def _start(self, lease, tags, from_version, to_version, reason, moves, fail_after) -> AuditRecord:
        numbers = [int(k[len(AUDIT_PREFIX) :]) for k in tags if k.startswith(AUDIT_PREFIX) and
                   k[len(AUDIT_PREFIX) :].isdigit()]
        intent = {
            "id": uuid.uuid4().hex,
            "op": lease.op,
            "family": lease.family,
            "from_version": from_version,
            "to_version": to_version,
            "actor": lease.actor,
            "reason": (reason or "")[:_MAX_REASON],
            "ts": time.time(),
            "audit_key": f"{AUDIT_PREFIX}{max(numbers, default=0) + 1:06d}",
            "moves": moves,
        }
        return self._run(intent, lease, skip=0, fail_after=fail_after)

    def _steps(self, intent: dict) -> list[tuple[str, Callable[[], None]]]:
        """The operation as idempotent steps: write intent, each alias move, write audit record, clear intent."""
        family = intent["family"]
        record = AuditRecord(**{k: intent[k] for k in AuditRecord.__dataclass_fields__})
        steps = [("write intent", lambda: self.client.set_registered_model_tag(family, INTENT_TAG, json.dumps(intent)))]
        for action, alias, version in intent["moves"]:
            steps.append((f"{action} {alias} {version or ''}".strip(), self._move_fn(intent, action, alias, version)))
        audit_json = json.dumps(asdict(record))
        audit_key = intent["audit_key"]
        steps.append(("write audit", lambda: self.client.set_registered_model_tag(family, audit_key, audit_json)))
        steps.append(("clear intent", lambda: self.client.delete_registered_model_tag(family, INTENT_TAG)))
        return steps

    def _move_fn(self, intent: dict, action: str, alias: str, version: str | None):
        from mlflow.exceptions import MlflowException

        family = intent["family"]

        def move():
            try:
                if action == "set":
                    self.client.set_registered_model_alias(family, alias, version)
                else:
                    self.client.delete_registered_model_alias(family, alias)
            except MlflowException as e:
                if action == "delete" and e.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return  # already gone: the step is done
                raise RegistryError(
                    f"{intent['op']} of {family} (intent {intent['id'][:8]}) cannot {action} alias {alias!r}"
                    f"{' -> v' + version if version else ''}: {e.message}; check the family's versions, then fix the "
                    f"aliases by hand and delete the registered-model tag {INTENT_TAG!r}"
                ) from e

        return move

    def _run(self, intent: dict, lease: Lease, skip: int, fail_after: int | None) -> AuditRecord:
        for number, (name, step) in enumerate(self._steps(intent), start=1):
            if number <= skip:
                continue
            self._check_lease(intent["family"], lease)
            step()
            if fail_after is not None and number == fail_after:
                raise SimulatedCrash(f"simulated crash after step {number} ({name}) of {intent['op']}")
        record = AuditRecord(**{k: intent[k] for k in AuditRecord.__dataclass_fields__})
        log.info(
            "%s %s: v%s -> v%s by %s", record.op, record.family, record.from_version, record.to_version, record.actor
        )
        return record

    # -- getting adapters out -----------------------------------------------------------------------------------

    def _select(self, family: str, selector: str | None) -> str:
        if selector is not None and selector.isdigit():
            return selector
        alias = selector or "champion"
        self._check_alias(alias)
        version = self.alias(family, alias)
        if version is None:
            gone = self._deleted_targets(family, alias)
            hint = f" (versions it pointed at were deleted: {', '.join(gone)})" if gone else ""
            raise RegistryError(f"{family} has no {alias!r} alias{hint}; promote or set a version first")
        if not self._version_exists(family, version):
            raise RegistryError(
                f"alias {alias!r} of {family} points at v{version}, which no longer exists; "
                "promote or roll back to fix it"
            )
        return version

    def _deleted_targets(self, family: str, alias: str) -> list[str]:
        """Versions the audit trail says `alias` pointed at that no longer exist, oldest first."""
        pointed: set[str] = set()
        for r in self.history(family):
            if alias == "champion" and r.op in ("promote", "rollback"):
                pointed.add(r.to_version)
            elif alias == "challenger" and r.op == "set_challenger":
                pointed.add(r.to_version)
            elif alias == "previous" and r.op == "promote" and r.from_version:
                pointed.add(r.from_version)
        return sorted((v for v in pointed if v and not self._version_exists(family, v)), key=int)

    def _version_exists(self, family: str, version: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_model_version(family, version)
            return True
        except MlflowException:
            return False

    def resolve(self, ref: str, dest_root: Path, expected_base_sha256: str | None = None) -> ResolvedAdapter:
        """A local, hash-verified copy of the adapter that `ref` ("family@champion", "family@3", "family") names.

        Refuses (BaseMismatch) before downloading when expected_base_sha256 is not the version's base.
        """
        family, selector = parse_ref(ref)
        version = self._select(family, selector)
        info = self.get(family, version)
        base = info.tags.get("base_sha256", "")
        if expected_base_sha256 is not None and _norm_sha(expected_base_sha256) != _norm_sha(base):
            raise BaseMismatch(
                f"adapter {family} v{version} was trained on base {_short(base)}, but the loaded base is "
                f"{_short(expected_base_sha256)}; retrain or load the matching base"
            )
        path = self.download(family, version, "adapter", dest_root)
        try:
            check_binding(path, base, "serve")
        except BindingMismatch as e:
            raise BaseMismatch(f"{family} v{version}: {e}") from None
        return ResolvedAdapter(family, version, path, base, info.tags)

    def attach_report(self, family: str, version: str, path: Path, folder: str = "monitoring_reports") -> None:
        """Attach a file (a drift report) to a version's MLflow run under `folder`/, beside its registered
        artifacts; it is not part of the version's hashed artifacts. A version without a run is an error."""
        info = self.get(family, version)
        if not info.run_id:
            raise RegistryError(f"{family} v{version} has no MLflow run to attach {Path(path).name} to; it was "
                                "registered without one: re-register it from its training output")
        self.client.log_artifact(info.run_id, str(path), folder)

    def download(self, family: str, version: str, name: str, dest_root: Path) -> Path:
        """Download artifact `name` of a version to dest_root/<family>/<version>/<name>/ and verify its tree hash.

        A verified copy already there is reused; one that fails verification is replaced. Nothing is left at the
        destination when the stored artifact itself does not match (CorruptVersionArtifact).
        """
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        info = self.get(family, version)
        expected = info.tags.get(f"sha256.{name}")
        if expected is None:
            have = ", ".join(sorted(k[len("sha256.") :] for k in info.tags if k.startswith("sha256."))) or "none"
            raise RegistryError(f"{family} v{info.version} has no artifact {name!r} (it has: {have})")
        dest = Path(dest_root) / family / info.version / name
        if dest.is_dir():
            if tree_hash(dest) == expected:
                return dest
            log.warning("local copy %s does not match its recorded hash; downloading it again", dest)
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{name}.{uuid.uuid4().hex[:8]}.partial"
        try:
            try:
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=f"{info.source.rstrip('/')}/{name}", dst_path=str(tmp),
                        tracking_uri=self.tracking_uri,
                    )
                )
            except Exception as e:  # noqa: BLE001 - MLflow, boto3 and requests each raise their own
                if not (_looks_unreachable(e) or isinstance(e, (MlflowException, OSError))):
                    raise
                detail = " ".join(str(e).split()).split("#####")[-1].strip()[:300]  # MLflow: "##### File x #####"
                if _looks_unreachable(e):
                    raise RegistryError(
                        f"artifact {name!r} of {family} v{info.version} cannot be downloaded: the artifact store behind "
                        f"{info.source} does not answer ({detail}); start it or fix its endpoint "
                        "(MLFLOW_S3_ENDPOINT_URL / the tracking server's artifact destination) and retry"
                    ) from e
                raise RegistryError(
                    f"artifact {name!r} of {family} v{info.version} cannot be downloaded from {info.source}: "
                    f"{detail}; if the store is up, the stored copy is gone: re-register the adapter from its "
                    "training output"
                ) from e
            actual = tree_hash(local)
            if actual != expected:
                raise CorruptVersionArtifact(
                    f"artifact {name!r} of {family} v{info.version} (from {info.source}) has tree sha256 "
                    f"{actual[:12]}…, but tag sha256.{name} records {expected[:12]}…; the stored copy was modified "
                    "or damaged, so nothing was loaded: re-register the adapter from its training output"
                )
            try:
                os.rename(local, dest)
            except OSError:
                if not (dest.is_dir() and tree_hash(dest) == expected):  # else a concurrent download won
                    raise
            return dest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def verify(self, family: str, version: str | None = None) -> list[dict]:
        """Download every recorded artifact of one version (or of all) afresh and re-hash it against its tag.

        Returns one row per artifact: {"version", "artifact", "status": ok | MISMATCH | missing, "detail"}. Nothing
        is kept: each copy goes to a temporary directory. A store that does not answer raises RegistryError (naming
        it), since then nothing can be said about the artifacts.
        """
        import tempfile

        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        versions = [self.get(family, version)] if version is not None else self.list_versions(family)
        rows = []
        for info in versions:
            names = sorted(k[len("sha256.") :] for k in info.tags if k.startswith("sha256."))
            if not names:
                rows.append({"version": info.version, "artifact": "-", "status": "missing",
                             "detail": "no sha256.* tags: nothing was recorded at registration"})
            for name in names:
                expected = info.tags[f"sha256.{name}"]
                with tempfile.TemporaryDirectory(prefix="adapterops-verify-") as tmp:
                    try:
                        local = Path(mlflow.artifacts.download_artifacts(
                            artifact_uri=f"{info.source.rstrip('/')}/{name}", dst_path=tmp,
                            tracking_uri=self.tracking_uri))
                    except Exception as e:  # noqa: BLE001 - MLflow, boto3 and requests each raise their own
                        if not (_looks_unreachable(e) or isinstance(e, (MlflowException, OSError))):
                            raise
                        detail = " ".join(str(e).split()).split("#####")[-1].strip()[:200]
                        if _looks_unreachable(e):
                            raise RegistryError(
                                f"artifact store of {family} v{info.version} ({info.source}) does not answer: "
                                f"{detail}; start it (or fix its endpoint) and verify again"
                            ) from e
                        rows.append({"version": info.version, "artifact": name, "status": "missing",
                                     "detail": detail})
                        continue
                    actual = tree_hash(local) if local.is_dir() else manifest_hash({local.name: sha256_file(local)})
                    if actual == expected:
                        rows.append({"version": info.version, "artifact": name, "status": "ok",
                                     "detail": f"sha256 {actual[:12]}…"})
                    else:
                        rows.append({"version": info.version, "artifact": name, "status": "MISMATCH",
                                     "detail": f"tree sha256 {actual[:12]}… != recorded {expected[:12]}…"})
        return rows


DB_CONNECT_TIMEOUT_S = 10
"""A direct PostgreSQL/MySQL URI without its own connect_timeout gets this one (the driver's default waits for the
OS's TCP timeout, minutes, on a host that does not answer)."""


def _with_connect_timeout(uri: str) -> str:
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme not in ("postgresql", "postgres", "mysql") or "connect_timeout=" in uri:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}connect_timeout={DB_CONNECT_TIMEOUT_S}"


class _GuardedClient:
    """An MlflowClient whose calls fail with one RegistryError naming the backend when it does not answer (a server,
    its database or its artifact store down), after MLflow's bounded retries (MLFLOW_HTTP_BOUNDS), instead of a raw
    MlflowException / requests / sqlalchemy error."""

    def __init__(self, client, uri: str):
        self._client, self._uri = client, uri

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except RegistryError:
                raise
            except Exception as e:
                if not _looks_unreachable(e):
                    raise
                raise RegistryError(
                    f"MLflow backend {self._uri} does not answer ({name}: {_first_line(e)[:200]}); start it (and its "
                    "database and artifact store) or fix MLFLOW_TRACKING_URI, then retry"
                ) from e

        return call


def _looks_unreachable(e: BaseException) -> bool:
    """A connection failure (store down) rather than an answer that the object is not there."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        text = str(e)
        if any(c.__name__ == "OperationalError" for c in type(e).__mro__) and (
            "connection" in text.lower() or "server" in text.lower()
        ):  # sqlalchemy / psycopg2: the database server is gone (not SQLite's "database is locked")
            return True
        if any(s in text for s in ("Max retries exceeded", "Connection refused", "Could not connect",
                                   "timed out", "ConnectTimeout", "EndpointConnectionError", "too many 500 error",
                                   "too many 503 error", "Connection reset", "could not connect to server",
                                   "Connection aborted", "RemoteDisconnected")):
            return True
        e = e.__cause__ or e.__context__
    return False
