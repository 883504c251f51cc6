"""Fixtures for the registry integration tests: a moto S3 server on loopback, tiny fake adapters, Postgres databases."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

PG_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)


@pytest.fixture(scope="module")
def moto_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1, with fake credentials in the environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_adapter(root: Path, seed: int = 0) -> Path:
    """A tiny stand-in for a PEFT adapter dir: adapter_config.json + a small weights file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "seed": seed}))
    (root / "adapter_model.safetensors").write_bytes(bytes([seed % 256]) * 512)
    return root


@pytest.fixture(scope="module")
def postgres_uri():
    """A fresh PostgreSQL database for MLflow, dropped afterwards; skips when no server answers on 127.0.0.1:5432."""
    try:
        import psycopg2

        admin = psycopg2.connect(**PG_ADMIN)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 (user postgres) is unreachable: {e}")
    admin.autocommit = True
    db = f"adapterops_registry_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{db}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{db}"
    finally:
        import sqlalchemy.pool  # noqa: F401  (engines MLflow left open are closed by FORCE below)

        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()
