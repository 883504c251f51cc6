"""The scheduled reference-perplexity check on a real registered champion: tiny base + a trained adapter, real merge
gates, MLflow on SQLite. A quiet check, then the served base's weights change and the check alerts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "models" / "tiny-llama"
WINDOWS = 4  # reference-text windows: the gates and the check must use the same number


@pytest.fixture(scope="module")
def setup(tmp_path_factory, trained, tiny_data):
    from pipelines import merge_quantize, register
    from pipelines.workspace import Workspace

    root = tmp_path_factory.mktemp("ppl")
    base = shutil.copytree(BASE, root / "base")  # this test changes the base's weights later
    ws = Workspace.create(root / "ws", base, tracking_uri=f"sqlite:///{root / 'ws' / 'mlflow.db'}")
    train_dir = trained("lora")
    # the tiny adapter's forgetting is not what this test is about: loose forgetting bound
    cfg = merge_quantize.MergeConfig(quantize="none", eval_examples=4, golden_prompts=2, reference_windows=WINDOWS,
                                     gates=merge_quantize.GateConfig(forgetting_max_rise=10.0))
    merged = merge_quantize.run(cfg, base, train_dir / "adapter", tiny_data.val, root / "merged", log=lambda *a: None)
    reg = ws.registry()
    versions = {fam: register.run(reg, fam, train_dir, merged, log=lambda *a: None).version
                for fam in ("support", "fresh")}
    reg.promote("support", versions["support"], actor="test", reason="first version")
    gates = json.loads((merged / "gates.json").read_text())["measured"]
    return ws, versions, gates


def test_no_champion_is_an_explicit_verdict_and_other_settings_are_refused(setup):
    from pipelines.monitor_jobs import promotion_baseline, reference_ppl_check

    ws, versions, _ = setup
    out = reference_ppl_check(ws, "fresh", windows=WINDOWS)
    assert out["status"] == "insufficient_data" and out["alert"] is False and "no champion" in out["reason"]
    # measured on other windows than the gates were: refused, nothing recorded
    with pytest.raises(ValueError, match="cannot be compared"):
        promotion_baseline(ws, "fresh", versions["fresh"], windows=WINDOWS + 2)
    assert not (ws.root / "monitoring" / "fresh" / "reference_ppl_baseline.json").exists()
    baseline = promotion_baseline(ws, "fresh", versions["fresh"], windows=WINDOWS)
    assert baseline.version == versions["fresh"]
    assert baseline.perplexity == pytest.approx(setup[2]["merged_reference_ppl"])


def test_champion_check_is_quiet_then_alerts_when_the_served_weights_change(setup):
    from safetensors.torch import load_file, save_file

    from pipelines.monitor_jobs import reference_ppl_check

    ws, versions, gates = setup
    first = reference_ppl_check(ws, "support", windows=WINDOWS)
    assert first["status"] == "ok" and first["alert"] is False and first["version"] == versions["support"]
    # the recorded value is the gate report's; the check measures the unmerged adapter: equal to rounding
    assert first["baseline"] == pytest.approx(gates["merged_reference_ppl"], rel=1e-9)
    assert first["perplexity"] == pytest.approx(gates["merged_reference_ppl"], rel=1e-4)
    assert abs(first["rise"]) < 1e-4 and first["alert_errors"] == []
    history = Path(first["history"])
    assert len(history.read_text().splitlines()) == 1
    assert not (ws.root / "alerts.jsonl").exists()

    # The base being served changes under the champion (a corrupted or swapped file): its perplexity rises.
    weights = ws.base_path / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("layers.0.mlp.down_proj.weight"))
    tensors[name] = tensors[name] * 4.0
    save_file(tensors, str(weights), metadata={"format": "pt"})

    second = reference_ppl_check(ws, "support", windows=WINDOWS)
    assert second["status"] == "alert" and second["alert"] is True
    assert second["perplexity"] > first["perplexity"] * 1.05 and second["rise"] > 0.05
    # median of the two results in the window: still above the bound
    assert second["results"] == [pytest.approx(first["perplexity"]), pytest.approx(second["perplexity"])]
    alerts = [json.loads(line) for line in (ws.root / "alerts.jsonl").read_text().splitlines()]
    assert len(alerts) == 1 and alerts[0]["monitor"] == "reference_ppl" and alerts[0]["family"] == "support"
    assert alerts[0]["details"]["rise"] == pytest.approx(second["rise"])
    assert len(history.read_text().splitlines()) == 2
