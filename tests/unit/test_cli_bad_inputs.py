"""The CLI's bad-input matrix (issue 16): every case prints exactly one line `error: <what is wrong>; <what to do>`,
exits with the stated code, shows no traceback, and writes nothing (the tree it runs in is unchanged).

In process (cli.main) and before any model, SVD, MLflow database or Prefect server: the inputs are checked first.
The registry cases whose database must exist are in tests/integration/test_registry_bad_inputs.py.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from pipelines import cli
from pipelines.config import REPO_ROOT

BASE = REPO_ROOT / "models" / "tiny-llama"
GOOD_ROW = json.dumps({"prompt": "How do I reset my password?", "response": "Use the link on the login page."})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _safetensors(path: Path, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(2, 8, generator=g)}, str(path))
    return path


def _adapter(root: Path, name: str, config: bytes | None = None, weights: str = "ok", binding: dict | None = None):
    d = root / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_bytes(config if config is not None else json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}).encode())
    if weights == "ok":
        _safetensors(d / "adapter_model.safetensors")
    elif weights == "truncated":
        data = _safetensors(d / "adapter_model.safetensors").read_bytes()
        (d / "adapter_model.safetensors").write_bytes(data[: len(data) - 20])
    elif weights == "garbage":
        (d / "adapter_model.safetensors").write_bytes(b"\x00\x01not safetensors at all")
    if binding is not None:
        (d / "adapterops.json").write_text(json.dumps(binding))
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every bad (and good) input the cases name, built once; the cases run in a copy-free cwd and must not touch it."""
    from registry.hashing import model_weights_hash

    root = tmp_path_factory.mktemp("bad-inputs")
    f = {"root": root}

    def put(name: str, data: bytes | str) -> Path:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        f[name] = p
        return p

    put("good.jsonl", GOOD_ROW + "\n" + GOOD_ROW + "\n")
    put("latin1.jsonl", b"\xff\xfe" + GOOD_ROW.encode("utf-16-le"))
    put("cp1252.jsonl", json.dumps({"prompt": "caf\u00e9", "response": "x"}, ensure_ascii=False).encode("cp1252"))
    put("not-json.jsonl", "{oops, this is not json\n")
    put("no-fields.jsonl", json.dumps({"prompt": "only a prompt"}) + "\n")
    put("number-fields.jsonl", json.dumps({"prompt": 1, "response": 2}) + "\n")
    put("list-row.jsonl", "[1, 2, 3]\n")
    put("empty.jsonl", "")
    put("blank.jsonl", "\n\n   \n")
    put("a-file", "i am a file, not a directory\n")
    put("binary.yaml", bytes(range(256)) * 4)
    put("bad-syntax.yaml", "steps: [1, 2\nlr: {\n")
    put("list.yaml", "- 1\n- 2\n")
    put("unknown-key.yaml", "stpes: 10\n")
    put("bad-quantize.yaml", "quantize: fp3\n")
    put("demo-unknown.yaml", "family: support-assistant\ninit:\n  method: pissa\n  rnak: 4\n")
    put("corrupt.db", os.urandom(4096))
    (root / "a-dir").mkdir()
    (root / "a-dir.db").mkdir()
    f["a-dir"] = root / "a-dir"
    f["a-dir.db"] = root / "a-dir.db"
    (root / "no-manifest").mkdir()
    f["no-manifest"] = root / "no-manifest"
    ads = root / "adapters"
    base_sha = model_weights_hash(BASE)
    f["ad-corrupt-config"] = _adapter(ads, "corrupt-config", b'{"peft_type": "LO')
    f["ad-binary-config"] = _adapter(ads, "binary-config", b"\xff\xd8\xff\xe0 jpeg?")
    f["ad-list-config"] = _adapter(ads, "list-config", b"[1, 2]")
    f["ad-no-weights"] = _adapter(ads, "no-weights", weights="none")
    f["ad-truncated"] = _adapter(ads, "truncated", weights="truncated")
    f["ad-garbage"] = _adapter(ads, "garbage", weights="garbage")
    f["ad-native"] = _adapter(ads, "native", binding={"format": 1, "base_sha256": base_sha, "base": "pissa_residual",
                                                      "method": "pissa", "init_key": "init-cache/x"})
    f["ad-other-base"] = _adapter(ads, "other-base", binding={"format": 1, "base_sha256": "cd34" * 16,
                                                              "base": "plain", "method": "lora", "init_key": "k"})
    f["ad-bad-binding"] = _adapter(ads, "bad-binding")
    (f["ad-bad-binding"] / "adapterops.json").write_text("{truncated")
    run = ads / "old-run"
    f["ad-corrupt-manifest"] = _adapter(run, "adapter")
    (run / "manifest.json").write_text('{"kind": "adapter", "inp')
    wd = root / "serve-wd"
    wd.mkdir()
    (wd / "mlflow.db").write_bytes(b"")
    f["serve-wd"] = wd
    # an init-cache store with one entry whose index was cut short
    store = root / "store-truncated"
    entry = store / "init-cache" / "abc123"
    entry.mkdir(parents=True)
    (entry / "manifest.json").write_text("{}")
    (entry / "_index.json").write_text('{"key": "init-cache/abc123", "files": {"manifest.js')
    f["store-truncated"] = store
    tb = root / "truncated-base"
    tb.mkdir()
    for p in BASE.iterdir():
        if p.suffix in (".json", ".jinja"):
            (tb / p.name).write_bytes(p.read_bytes())
    (tb / "model.safetensors").write_bytes((BASE / "model.safetensors").read_bytes()[:100_000])
    f["truncated-base"] = tb
    f["store-empty"] = root / "store-empty"
    f["store-empty"].mkdir()
    return f


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, int(st.st_mtime_ns)) if p.is_file() else (-1, 0)
    return out


# (id, argv builder, exit code, substrings of the one line)
CASES = [
    # -- train: every input is checked before the init cache (SVD) --------------------------------------------------
    ("train-train-missing", lambda f: ["train", "--train", str(f["root"] / "nope.jsonl"), "--val", str(f["good.jsonl"]),
                                       "--out", str(f["root"] / "out")], 2, ["--train", "nope.jsonl does not exist"]),
    ("train-train-is-dir", lambda f: ["train", "--train", str(f["a-dir"]), "--val", str(f["good.jsonl"]), "--out",
                                      str(f["root"] / "out")], 2, ["a-dir is a directory"]),
    ("train-train-utf16", lambda f: ["train", "--train", str(f["latin1.jsonl"]), "--val", str(f["good.jsonl"]),
                                     "--out", str(f["root"] / "out")], 2, ["is not UTF-8 text (byte 0xff at offset 0)"]),
    ("train-train-cp1252", lambda f: ["train", "--train", str(f["cp1252.jsonl"]), "--val", str(f["good.jsonl"]),
                                      "--out", str(f["root"] / "out")], 2, ["cp1252.jsonl is not UTF-8 text"]),
    ("train-train-not-json", lambda f: ["train", "--train", str(f["not-json.jsonl"]), "--val", str(f["good.jsonl"]),
                                        "--out", str(f["root"] / "out")], 2, ["not-json.jsonl:1 is not valid JSON"]),
    ("train-train-no-fields", lambda f: ["train", "--train", str(f["no-fields.jsonl"]), "--val", str(f["good.jsonl"]),
                                         "--out", str(f["root"] / "out")], 2,
     ["no-fields.jsonl:1 needs string fields 'prompt' and 'response'"]),
    ("train-train-number-fields", lambda f: ["train", "--train", str(f["number-fields.jsonl"]), "--val",
                                             str(f["good.jsonl"]), "--out", str(f["root"] / "out")], 2,
     ["needs string fields"]),
    ("train-train-list-row", lambda f: ["train", "--train", str(f["list-row.jsonl"]), "--val", str(f["good.jsonl"]),
                                        "--out", str(f["root"] / "out")], 2, ["list-row.jsonl:1 needs string fields"]),
    ("train-train-empty", lambda f: ["train", "--train", str(f["empty.jsonl"]), "--val", str(f["good.jsonl"]),
                                     "--out", str(f["root"] / "out")], 2, ["empty.jsonl is empty"]),
    ("train-train-blank", lambda f: ["train", "--train", str(f["blank.jsonl"]), "--val", str(f["good.jsonl"]),
                                     "--out", str(f["root"] / "out")], 2, ["blank.jsonl is empty"]),
    ("train-val-missing", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["root"] / "nope.jsonl"),
                                     "--out", str(f["root"] / "out")], 2, ["--val", "does not exist"]),
    ("train-val-utf16", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["latin1.jsonl"]),
                                   "--out", str(f["root"] / "out")], 2, ["--val", "is not UTF-8 text"]),
    ("train-val-not-json", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["not-json.jsonl"]),
                                      "--out", str(f["root"] / "out")], 2, ["--val", "is not valid JSON"]),
    ("train-out-is-file", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                     "--out", str(f["a-file"])], 2, ["--out", "a-file is a file"]),
    ("train-out-under-file", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                        "--out", str(f["a-file"] / "x")], 2, ["cannot be created", "is a file"]),
    ("train-parent-not-output", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                           "--out", str(f["root"] / "out"), "--parent", str(f["no-manifest"])], 2,
     ["--parent", "is not a training output"]),
    ("train-missing-base", lambda f: ["train", "--base", str(f["root"] / "no-base"), "--train", str(f["good.jsonl"]),
                                      "--val", str(f["good.jsonl"]), "--out", str(f["root"] / "out")], 2,
     ["--base", "no-base is not a model directory"]),
    ("train-base-is-file", lambda f: ["train", "--base", str(f["a-file"]), "--train", str(f["good.jsonl"]),
                                      "--val", str(f["good.jsonl"]), "--out", str(f["root"] / "out")], 2,
     ["is not a model directory"]),
    ("train-config-binary", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                       "--out", str(f["root"] / "out"), "--config", str(f["binary.yaml"])], 2,
     ["--config", "binary.yaml is not UTF-8 text"]),
    ("train-config-bad-yaml", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                         "--out", str(f["root"] / "out"), "--config", str(f["bad-syntax.yaml"])], 2,
     ["bad-syntax.yaml is not valid YAML"]),
    ("train-config-list", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                     "--out", str(f["root"] / "out"), "--config", str(f["list.yaml"])], 2,
     ["list.yaml: the top level must be a mapping"]),
    ("train-config-unknown-key", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                            "--out", str(f["root"] / "out"), "--config", str(f["unknown-key.yaml"])],
     2, ["unknown key(s) stpes", "valid keys are"]),
    ("train-config-missing", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                        "--out", str(f["root"] / "out"), "--config", str(f["root"] / "no.yaml")], 2,
     ["--config", "no.yaml does not exist"]),
    ("train-steps-0", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]), "--out",
                                 str(f["root"] / "out"), "--steps", "0"], 2, ["steps must be >= 1, got 0"]),
    ("train-steps-negative", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                        "--out", str(f["root"] / "out"), "--steps", "-5"], 2, ["steps must be >= 1"]),
    ("train-checkpoint-every-negative", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val",
                                                   str(f["good.jsonl"]), "--out", str(f["root"] / "out"),
                                                   "--checkpoint-every", "-1"], 2, ["checkpoint_every must be >= 0"]),
    ("train-bad-device", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                    "--out", str(f["root"] / "out"), "--device", "tpu"], 2,
     ["device must be auto, cpu, cuda or cuda:N"]),
    ("train-rank-0", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]), "--out",
                                str(f["root"] / "out"), "--rank", "0"], 2, ["rank must be >= 1, got 0"]),
    ("train-alpha-negative", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                        "--out", str(f["root"] / "out"), "--alpha", "-1"], 2,
     ["--alpha", "must be a positive number"]),
    ("train-alpha-nan", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                   "--out", str(f["root"] / "out"), "--alpha", "nan"], 2, ["--alpha", "got nan"]),
    ("train-svd-niter-lora", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                        "--out", str(f["root"] / "out"), "--method", "lora", "--svd-niter", "2"], 2,
     ["svd_niter applies to method pissa only"]),
    ("train-dora-nf4", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                  "--out", str(f["root"] / "out"), "--method", "dora", "--base-quant", "nf4"], 2,
     ["base_quant nf4 does not support dora"]),
    ("train-store-is-file", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                       "--out", str(f["root"] / "out"), "--store", str(f["a-file"])], 2,
     ["a-file is a file, not a directory", "--store"]),
    ("train-store-bad-scheme", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                          "--out", str(f["root"] / "out"), "--store", "ftp://host/x"], 2,
     ["unsupported store URI 'ftp://host/x'"]),
    ("train-store-s3-no-bucket", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                            "--out", str(f["root"] / "out"), "--store", "s3:///prefix"], 2,
     ["names no bucket"]),
    # -- init-cache -------------------------------------------------------------------------------------------------
    ("ic-ls-missing-store", lambda f: ["init-cache", "ls", "--store", str(f["root"] / "no-store")], 2,
     ["no init cache at", "no-store"]),
    ("ic-verify-missing-store", lambda f: ["init-cache", "verify", "--store", str(f["root"] / "no-store")], 2,
     ["no init cache at"]),
    ("ic-evict-missing-store", lambda f: ["init-cache", "evict", "--key", "init-cache/x", "--store",
                                          str(f["root"] / "no-store")], 2, ["no init cache at"]),
    ("ic-evict-no-key", lambda f: ["init-cache", "evict", "--store", str(f["store-empty"])], 2,
     ["init-cache evict needs --key"]),
    ("ic-evict-unknown-key", lambda f: ["init-cache", "evict", "--key", "init-cache/nope", "--store",
                                        str(f["store-empty"])], 2, ["no artifact 'init-cache/nope'", "nothing to delete"]),
    ("ic-evict-traversal-key", lambda f: ["init-cache", "evict", "--key", "../etc", "--store", str(f["store-empty"])],
     2, ["invalid artifact key '../etc'"]),
    ("ic-verify-traversal-key", lambda f: ["init-cache", "verify", "--key", "a/../../b", "--store",
                                           str(f["store-empty"])], 2, ["invalid artifact key"]),
    ("ic-ls-store-is-file", lambda f: ["init-cache", "ls", "--store", str(f["a-file"])], 2,
     ["a-file is a file, not a directory"]),
    ("ic-warm-store-is-file", lambda f: ["init-cache", "warm", "--store", str(f["a-file"])], 2,
     ["a-file is a file, not a directory"]),
    ("ic-warm-store-under-file", lambda f: ["init-cache", "warm", "--store", str(f["a-file"] / "sub")], 2,
     ["is a file, not a directory"]),
    ("ic-warm-rank-0", lambda f: ["init-cache", "warm", "--rank", "0", "--store", str(f["store-empty"])], 2,
     ["rank must be >= 1"]),
    ("ic-warm-empty-target", lambda f: ["init-cache", "warm", "--targets", "q_proj,,v_proj", "--store",
                                        str(f["store-empty"])], 2, ["holds an empty module name"]),
    ("train-targets-comma-only", lambda f: ["train", "--train", str(f["good.jsonl"]), "--val", str(f["good.jsonl"]),
                                            "--out", str(f["root"] / "out"), "--targets", ","], 2,
     ["--targets ','", "empty module name"]),
    ("ic-warm-missing-base", lambda f: ["init-cache", "warm", "--base", str(f["root"] / "no-base"), "--store",
                                        str(f["store-empty"])], 2, ["no-base does not exist or has no config.json"]),
    ("ic-verify-truncated-index", lambda f: ["init-cache", "verify", "--store", str(f["store-truncated"])], 1,
     None),
    # -- merge ------------------------------------------------------------------------------------------------------
    ("merge-adapter-missing", lambda f: ["merge", "--adapter", str(f["root"] / "no-adapter"), "--val",
                                         str(f["good.jsonl"]), "--out", str(f["root"] / "m"), "--quantize", "none"], 2,
     ["no-adapter is not a PEFT adapter directory"]),
    ("merge-adapter-is-file", lambda f: ["merge", "--adapter", str(f["a-file"]), "--val", str(f["good.jsonl"]),
                                         "--out", str(f["root"] / "m"), "--quantize", "none"], 2,
     ["is not a PEFT adapter directory"]),
    ("merge-adapter-config-corrupt", lambda f: ["merge", "--adapter", str(f["ad-corrupt-config"]), "--val",
                                                str(f["good.jsonl"]), "--out", str(f["root"] / "m"), "--quantize",
                                                "none"], 2, ["adapter_config.json is not a valid adapter config"]),
    ("merge-adapter-config-binary", lambda f: ["merge", "--adapter", str(f["ad-binary-config"]), "--val",
                                               str(f["good.jsonl"]), "--out", str(f["root"] / "m"), "--quantize",
                                               "none"], 2, ["binary-config/adapter_config.json is not a valid"]),
    ("merge-adapter-config-list", lambda f: ["merge", "--adapter", str(f["ad-list-config"]), "--val",
                                             str(f["good.jsonl"]), "--out", str(f["root"] / "m"), "--quantize",
                                             "none"], 2, ["not a JSON object"]),
    ("merge-adapter-no-weights", lambda f: ["merge", "--adapter", str(f["ad-no-weights"]), "--val",
                                            str(f["good.jsonl"]), "--out", str(f["root"] / "m"), "--quantize",
                                            "none"], 2, ["holds no *.safetensors weights"]),
    ("merge-adapter-truncated-weights", lambda f: ["merge", "--adapter", str(f["ad-truncated"]), "--val",
                                                   str(f["good.jsonl"]), "--out", str(f["root"] / "m"), "--quantize",
                                                   "none"], 2, ["adapter_model.safetensors is not readable safetensors",
                                                                "truncated"]),
    ("merge-adapter-garbage-weights", lambda f: ["merge", "--adapter", str(f["ad-garbage"]), "--val",
                                                 str(f["good.jsonl"]), "--out", str(f["root"] / "m"), "--quantize",
                                                 "none"], 2, ["is not readable safetensors"]),
    ("merge-adapter-native", lambda f: ["merge", "--adapter", str(f["ad-native"]), "--val", str(f["good.jsonl"]),
                                        "--out", str(f["root"] / "m"), "--quantize", "none"], 2,
     ["on a plain base: it is the PiSSA adapter as trained", "use the sibling adapter/"]),
    ("merge-adapter-other-base", lambda f: ["merge", "--adapter", str(f["ad-other-base"]), "--val",
                                            str(f["good.jsonl"]), "--out", str(f["root"] / "m"), "--quantize",
                                            "none"], 2, ["was trained on base sha256:cd34cd34cd34", "this base is"]),
    ("merge-adapter-bad-binding", lambda f: ["merge", "--adapter", str(f["ad-bad-binding"]), "--val",
                                             str(f["good.jsonl"]), "--out", str(f["root"] / "m"), "--quantize",
                                             "none"], 2, ["adapterops.json is unreadable"]),
    ("merge-train-manifest-corrupt", lambda f: ["merge", "--adapter", str(f["ad-corrupt-manifest"]), "--val",
                                                str(f["good.jsonl"]), "--out", str(f["root"] / "m"), "--quantize",
                                                "none"], 2, ["manifest.json (the training manifest", "not valid JSON"]),
    ("merge-val-missing", lambda f: ["merge", "--adapter", str(f["ad-other-base"]), "--val",
                                     str(f["root"] / "nope.jsonl"), "--out", str(f["root"] / "m"), "--quantize",
                                     "none"], 2, ["the gates' prompt set is unusable", "does not exist"]),
    ("merge-val-utf16", lambda f: ["merge", "--adapter", str(f["ad-other-base"]), "--val", str(f["latin1.jsonl"]),
                                   "--out", str(f["root"] / "m"), "--quantize", "none"], 2, ["is not UTF-8 text"]),
    ("merge-val-empty", lambda f: ["merge", "--adapter", str(f["ad-other-base"]), "--val", str(f["empty.jsonl"]),
                                   "--out", str(f["root"] / "m"), "--quantize", "none"], 2, ["is empty"]),
    ("merge-val-not-json", lambda f: ["merge", "--adapter", str(f["ad-other-base"]), "--val",
                                      str(f["not-json.jsonl"]), "--out", str(f["root"] / "m"), "--quantize", "none"],
     2, ["is not valid JSON"]),
    ("merge-out-is-file", lambda f: ["merge", "--adapter", str(f["ad-other-base"]), "--val", str(f["good.jsonl"]),
                                     "--out", str(f["a-file"]), "--quantize", "none"], 2, ["--out", "is a file"]),
    ("merge-report-json-is-dir", lambda f: ["merge", "--adapter", str(f["ad-other-base"]), "--val",
                                            str(f["good.jsonl"]), "--out", str(f["root"] / "m"), "--report-json",
                                            str(f["a-dir"])], 2, ["--report-json", "is a directory"]),
    ("merge-config-binary", lambda f: ["merge", "--adapter", str(f["ad-other-base"]), "--val", str(f["good.jsonl"]),
                                       "--out", str(f["root"] / "m"), "--config", str(f["binary.yaml"])], 2,
     ["binary.yaml is not UTF-8 text"]),
    ("merge-config-bad-yaml", lambda f: ["merge", "--adapter", str(f["ad-other-base"]), "--val", str(f["good.jsonl"]),
                                         "--out", str(f["root"] / "m"), "--config", str(f["bad-syntax.yaml"])], 2,
     ["is not valid YAML"]),
    ("merge-config-bad-quantize", lambda f: ["merge", "--adapter", str(f["ad-other-base"]), "--val",
                                             str(f["good.jsonl"]), "--out", str(f["root"] / "m"), "--config",
                                             str(f["bad-quantize.yaml"])], 2, ["quantize 'fp3' is not one of"]),
    ("merge-expect-golden-missing", lambda f: ["merge", "--adapter", str(f["ad-other-base"]), "--val",
                                               str(f["good.jsonl"]), "--out", str(f["root"] / "m"), "--quantize",
                                               "none", "--expect-golden", str(f["root"] / "g.safetensors")], 2,
     ["golden logits", "do not exist"]),
    ("merge-missing-base", lambda f: ["merge", "--base", str(f["root"] / "no-base"), "--adapter",
                                      str(f["ad-other-base"]), "--val", str(f["good.jsonl"]), "--out",
                                      str(f["root"] / "m"), "--quantize", "none"], 2, ["no-base"]),
    # -- demo / retrain / schedules ---------------------------------------------------------------------------------
    ("demo-config-missing", lambda f: ["demo", "--config", str(f["root"] / "no.yaml"), "--workdir",
                                       str(f["root"] / "wd")], 2, ["--config", "does not exist"]),
    ("demo-config-binary", lambda f: ["demo", "--config", str(f["binary.yaml"]), "--workdir", str(f["root"] / "wd")],
     2, ["binary.yaml is not UTF-8 text"]),
    ("demo-config-bad-yaml", lambda f: ["demo", "--config", str(f["bad-syntax.yaml"]), "--workdir",
                                        str(f["root"] / "wd")], 2, ["is not valid YAML"]),
    ("demo-config-unknown-key", lambda f: ["demo", "--config", str(f["demo-unknown.yaml"]), "--workdir",
                                           str(f["root"] / "wd")], 2, ["rnak", "valid keys are"]),
    ("demo-workdir-is-file", lambda f: ["demo", "--workdir", str(f["a-file"])], 2, ["--workdir", "is a file"]),
    ("demo-profile-binary", lambda f: ["demo", "--workdir", str(f["root"] / "wd"), "--profile", str(f["binary.yaml"])],
     2, ["binary.yaml is not UTF-8 text"]),
    ("demo-profile-unknown", lambda f: ["demo", "--workdir", str(f["root"] / "wd"), "--profile", "nope"], 2,
     ["no profile 'nope'"]),
    ("demo-max-loras-0", lambda f: ["demo", "--workdir", str(f["root"] / "wd"), "--max-loras", "0"], 2,
     ["--max-loras must be at least 1"]),
    ("retrain-new-train-missing", lambda f: ["retrain", "--workdir", str(f["root"] / "wd"), "--name", "v9",
                                             "--new-train", str(f["root"] / "nope.jsonl"), "--new-val",
                                             str(f["good.jsonl"]), "--old-train", str(f["good.jsonl"]), "--old-val",
                                             str(f["good.jsonl"])], 2, ["--new-train", "does not exist"]),
    ("retrain-old-val-utf16", lambda f: ["retrain", "--workdir", str(f["root"] / "wd"), "--name", "v9", "--new-train",
                                         str(f["good.jsonl"]), "--new-val", str(f["good.jsonl"]), "--old-train",
                                         str(f["good.jsonl"]), "--old-val", str(f["latin1.jsonl"])], 2,
     ["--old-val", "is not UTF-8 text"]),
    ("retrain-old-train-no-fields", lambda f: ["retrain", "--workdir", str(f["root"] / "wd"), "--name", "v9",
                                               "--new-train", str(f["good.jsonl"]), "--new-val", str(f["good.jsonl"]),
                                               "--old-train", str(f["no-fields.jsonl"]), "--old-val",
                                               str(f["good.jsonl"])], 2, ["--old-train", "needs string fields"]),
    ("retrain-new-val-dir", lambda f: ["retrain", "--workdir", str(f["root"] / "wd"), "--name", "v9", "--new-train",
                                       str(f["good.jsonl"]), "--new-val", str(f["a-dir"]), "--old-train",
                                       str(f["good.jsonl"]), "--old-val", str(f["good.jsonl"])], 2,
     ["--new-val", "is a directory"]),
    ("retrain-replay-ratio", lambda f: ["retrain", "--workdir", str(f["root"] / "wd"), "--name", "v9", "--new-train",
                                        str(f["good.jsonl"]), "--new-val", str(f["good.jsonl"]), "--old-train",
                                        str(f["good.jsonl"]), "--old-val", str(f["good.jsonl"]), "--replay-ratio",
                                        "1.5"], 2, ["--replay-ratio", "[0, 1)"]),
    ("retrain-config-binary", lambda f: ["retrain", "--workdir", str(f["root"] / "wd"), "--name", "v9",
                                         "--new-train", str(f["good.jsonl"]), "--new-val", str(f["good.jsonl"]),
                                         "--old-train", str(f["good.jsonl"]), "--old-val", str(f["good.jsonl"]),
                                         "--config", str(f["binary.yaml"])], 2, ["is not UTF-8 text"]),
    ("retrain-missing-base", lambda f: ["retrain", "--workdir", str(f["root"] / "wd"), "--name", "v9", "--base",
                                        str(f["root"] / "no-base"), "--new-train", str(f["good.jsonl"]), "--new-val",
                                        str(f["good.jsonl"]), "--old-train", str(f["good.jsonl"]), "--old-val",
                                        str(f["good.jsonl"])], 2, ["--base", "is not a model directory"]),
    ("retrain-workdir-is-file", lambda f: ["retrain", "--workdir", str(f["a-file"]), "--name", "v9", "--new-train",
                                           str(f["good.jsonl"]), "--new-val", str(f["good.jsonl"]), "--old-train",
                                           str(f["good.jsonl"]), "--old-val", str(f["good.jsonl"])], 2,
     ["--workdir", "is a file"]),
    ("schedules-monitor-interval-0", lambda f: ["schedules", "serve", "--workdir", str(f["root"] / "wd"),
                                                "--monitor-interval", "0"], 2, ["--monitor-interval must be at least"]),
    ("schedules-ppl-interval-negative", lambda f: ["schedules", "serve", "--workdir", str(f["root"] / "wd"),
                                                   "--ppl-interval", "-3"], 2, ["--ppl-interval must be at least"]),
    ("schedules-config-binary", lambda f: ["schedules", "serve", "--workdir", str(f["root"] / "wd"), "--config",
                                           str(f["binary.yaml"])], 2, ["is not UTF-8 text"]),
    # -- serve / rollout --------------------------------------------------------------------------------------------
    ("serve-no-registry", lambda f: ["serve", "--workdir", str(f["root"] / "wd")], 2, ["holds no mlflow.db"]),
    ("serve-port-99999", lambda f: ["serve", "--workdir", str(f["serve-wd"]), "--port", "99999"], 2,
     ["--port must be in [1, 65535], got 99999"]),
    ("serve-port-0", lambda f: ["serve", "--workdir", str(f["serve-wd"]), "--port", "0"], 2, ["got 0"]),
    ("serve-port-negative", lambda f: ["serve", "--workdir", str(f["serve-wd"]), "--port", "-1"], 2, ["got -1"]),
    ("serve-auto-canary-0", lambda f: ["serve", "--workdir", str(f["serve-wd"]), "--auto-canary", "0"], 2,
     ["--auto-canary is a polling interval"]),
    ("serve-without-feedback-alone", lambda f: ["serve", "--workdir", str(f["serve-wd"]),
                                                "--auto-canary-without-feedback"], 2,
     ["--auto-canary-without-feedback only applies with --auto-canary"]),
    ("serve-fallback-config-missing", lambda f: ["serve", "--workdir", str(f["serve-wd"]), "--fallback-config",
                                                 str(f["root"] / "no.yaml")], 2, ["--fallback-config", "does not exist"]),
    ("serve-fallback-config-binary", lambda f: ["serve", "--workdir", str(f["serve-wd"]), "--fallback-config",
                                                str(f["binary.yaml"])], 2, ["is not UTF-8 text"]),
    ("serve-fallback-config-unknown-key", lambda f: ["serve", "--workdir", str(f["serve-wd"]), "--fallback-config",
                                                     str(f["unknown-key.yaml"])], 2, ["unknown key(s) stpes"]),
    ("rollout-steps-not-numbers", lambda f: ["rollout", "start", "fam", "--steps", "a,b"], 2,
     ["--steps 'a,b' is not a comma-separated list"]),
    ("rollout-steps-above-1", lambda f: ["rollout", "start", "fam", "--steps", "0.5,2"], 2,
     ["every traffic share must be in (0, 1]"]),
    ("rollout-steps-zero", lambda f: ["rollout", "start", "fam", "--steps", "0,1"], 2, ["must be in (0, 1]"]),
    ("rollout-steps-nan", lambda f: ["rollout", "start", "fam", "--steps", "nan,1"], 2, ["must be in (0, 1]"]),
    ("rollout-requests-per-step-0", lambda f: ["rollout", "start", "fam", "--requests-per-step", "0"], 2,
     ["--requests-per-step must be at least 1"]),
    ("registry-promote-negative-wait", lambda f: ["registry", "--tracking-uri", f"sqlite:///{f['root']}/x.db",
                                                  "promote", "fam", "1", "--wait", "-1"], 2,
     ["--wait is in seconds and must be >= 0"]),
    ("ic-warm-truncated-base-weights", lambda f: ["init-cache", "warm", "--method", "lora", "--rank", "2", "--base",
                                                  str(f["truncated-base"]), "--store", str(f["store-empty"]),
                                                  "--scratch", str(f["a-dir"])], 2,
     ["truncated-base/model.safetensors is not readable safetensors", "restore it"]),
    ("serve-max-lora-rank-0", lambda f: ["serve", "--workdir", str(f["serve-wd"]), "--max-lora-rank", "0"], 2,
     ["--max-lora-rank must be at least 1"]),
    # -- registry: refused before any database is opened or created ---------------------------------------------------
    *[(f"registry-{action}-missing-sqlite", (lambda a: lambda f: ["registry", "--tracking-uri",
                                                                  f"sqlite:///{f['root']}/typo/mlflow.db", *a])(argv),
       2, ["no registry at", "typo/mlflow.db", "check the path"])
      for action, argv in [("list", ["list"]), ("list-family", ["list", "fam"]), ("show", ["show", "fam", "1"]),
                           ("history", ["history", "fam"]), ("promote", ["promote", "fam", "1"]),
                           ("rollback", ["rollback", "fam"]), ("verify", ["verify", "fam"]),
                           ("ping", ["ping"]), ("recover", ["recover", "fam"])]],
    ("registry-list-missing-sqlite-file", lambda f: ["registry", "--tracking-uri",
                                                     f"sqlite:///{f['root']}/mlfow.db", "list"], 2, ["no registry at"]),
    ("registry-list-corrupt-sqlite", lambda f: ["registry", "--tracking-uri", f"sqlite:///{f['corrupt.db']}", "list"],
     2, ["corrupt.db is not an SQLite database", "restore it from a backup"]),
    ("registry-history-corrupt-sqlite", lambda f: ["registry", "--tracking-uri", f"sqlite:///{f['corrupt.db']}",
                                                   "history", "fam"], 2, ["is not an SQLite database"]),
    ("registry-promote-corrupt-sqlite", lambda f: ["registry", "--tracking-uri", f"sqlite:///{f['corrupt.db']}",
                                                   "promote", "fam", "2"], 2, ["is not an SQLite database"]),
    ("registry-list-sqlite-is-dir", lambda f: ["registry", "--tracking-uri", f"sqlite:///{f['a-dir.db']}", "list"], 2,
     ["is a directory, not an SQLite file"]),
    ("registry-list-sqlite-is-text", lambda f: ["registry", "--tracking-uri", f"sqlite:///{f['good.jsonl']}", "list"],
     2, ["is not an SQLite database"]),
    ("registry-empty-sqlite-path", lambda f: ["registry", "--tracking-uri", "sqlite:///", "list"], 2,
     ["names no database file"]),
    ("registry-memory-sqlite", lambda f: ["registry", "--tracking-uri", "sqlite:///:memory:", "list"], 2,
     ["names no database file"]),
    ("registry-malformed-uri", lambda f: ["registry", "--tracking-uri", "http://[::1", "list"], 2,
     ["is not a valid URI"]),
    ("registry-bad-port-uri", lambda f: ["registry", "--tracking-uri", "http://127.0.0.1:99999", "list"], 2,
     ["is not a valid URI"]),
    ("registry-file-uri", lambda f: ["registry", "--tracking-uri", f"file://{f['root']}/mlruns", "list"], 2,
     ["is a file store"]),
    ("registry-bare-path-uri", lambda f: ["registry", "--tracking-uri", str(f["root"] / "mlruns"), "list"], 2,
     ["is a file store"]),
    ("registry-closed-port", lambda f: ["registry", "--tracking-uri", f"http://127.0.0.1:{_closed_port()}", "ping"], 2,
     ["is unreachable after 3 tries", "start it or fix MLFLOW_TRACKING_URI"]),
    ("registry-closed-port-postgres", lambda f: ["registry", "--tracking-uri",
                                                 f"postgresql://u@127.0.0.1:{_closed_port()}/db", "list"], 2,
     ["is unreachable after 3 tries"]),
]


@pytest.mark.parametrize(("argv", "code", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(argv, code, needles, files, tmp_path, monkeypatch, capsys):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "DO_NOT_TRACK"):
        monkeypatch.setenv(var, "1")
    for var in ("ADAPTEROPS_DEBUG", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home-must-not-appear"))
    monkeypatch.chdir(tmp_path)  # default paths (work/init-cache, ...) land here: nothing may appear
    args = argv(files)
    if args[0] == "train" and "--store" not in args:
        args += ["--store", str(tmp_path / "store"), "--scratch", str(tmp_path / "scratch")]
    before, before_cwd = _tree(files["root"]), _tree(tmp_path)
    rc = cli.main(args)
    out, err = capsys.readouterr()
    assert rc == code, (rc, err)
    if needles is None:  # a command that reports per item (init-cache verify): the problem on stdout
        assert "unreadable" in out and "init-cache evict" in out
        return
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""
    line = err[len("error: "):]
    assert "; " in line, f"no 'what to do' part: {line}"
    for needle in needles:
        assert needle in line, (needle, line)
    assert _tree(files["root"]) == before, "a bad input changed the inputs' tree"
    assert _tree(tmp_path) == before_cwd, f"a bad input wrote {sorted(set(_tree(tmp_path)) - set(before_cwd))}"


def test_the_matrix_has_many_named_cases():
    assert len(CASES) >= 100 - 25  # with tests/integration/test_registry_bad_inputs.py: over 100
    assert len({c[0] for c in CASES}) == len(CASES)


def test_init_cache_ls_flags_a_truncated_index_and_goes_on(files, monkeypatch, capsys):
    monkeypatch.delenv("ADAPTEROPS_DEBUG", raising=False)
    assert cli.main(["init-cache", "ls", "--store", str(files["store-truncated"])]) == 0
    out = capsys.readouterr().out
    assert out.startswith("init-cache/abc123  CORRUPT: ") and "_index.json is unreadable" in out


# -- the mapping itself: keyed on types (subclasses included), one line, tracebacks kept for bugs ------------------

class _MyDataError(ValueError):
    pass


@pytest.mark.parametrize(("make", "needle", "code"), [
    (lambda: "\xff".encode("latin-1").decode("utf-8"), "is not UTF-8 text (byte 0xff at offset 0)", 2),
    (lambda: __import__("json").loads('{"a": '), "is not valid JSON (Expecting value", 2),
    (lambda: __import__("yaml").safe_load("a: [1"), "a YAML file is invalid", 2),
    (lambda: __import__("safetensors.torch", fromlist=["load"]).load(b"\x00" * 20), "is not readable safetensors",
     2),
    (lambda: __import__("sqlite3").connect(":memory:").execute("SELEC 1"), "a database is unreadable", 2),
    (lambda: (_ for _ in ()).throw(__import__("sqlite3").OperationalError("database is locked")),
     "a database is busy (database is locked): another process holds it; retry", 2),
    (lambda: open("/nonexistent/file.txt"), "No such file or directory: /nonexistent/file.txt; check the path", 2),
    (lambda: Path("/proc/version/x").mkdir(), "; a path that must be a directory", 2),
    (lambda: (_ for _ in ()).throw(_MyDataError("bad thing; do this")), "bad thing; do this", 2),
    (lambda: (_ for _ in ()).throw(cli.CliError("multi\nline\n  message; fix")), "multi line message; fix", 2),
])
def test_error_mapping_by_type(make, needle, code):
    with pytest.raises(Exception) as info:
        make()
    mapped = cli.describe_error(info.value)
    assert mapped is not None, type(info.value)
    message, rc = mapped
    assert needle in message and "\n" not in message and rc == code, message


def test_gate_and_health_failures_exit_1():
    from pipelines.merge_quantize import GateFailed
    from pipelines.train import HealthCheckFailed

    report = {"gates": [{"name": "kl", "passed": False, "value": 1.0, "op": "<=", "threshold": 0.1}]}
    assert cli.describe_error(GateFailed(report))[1] == 1
    assert cli.describe_error(HealthCheckFailed({"checks": [], "passed": False}))[1] == 1


@pytest.mark.parametrize("exc", [ZeroDivisionError("bug"), TypeError("f() got 2 arguments"), KeyError("k"),
                                 AttributeError("x"), RuntimeError("internal")])
def test_programming_errors_are_not_mapped(exc):
    assert cli.describe_error(exc) is None


def test_debug_flag_shows_the_traceback(files, monkeypatch):
    monkeypatch.delenv("ADAPTEROPS_DEBUG", raising=False)
    with pytest.raises(cli.CliError):
        cli.main(["--debug", "init-cache", "ls", "--store", str(files["root"] / "no-store")])
