"""AdapterRegistry.attach_report: a monitoring report lands in the version's MLflow run (real MLflow on SQLite),
outside the version's hashed artifacts."""

from __future__ import annotations

import json
import uuid

import pytest

from registry.versions import AdapterRegistry, RegistryError
from registry_fixtures import make_adapter

pytestmark = pytest.mark.integration


def test_a_report_is_attached_to_the_version_run_and_verify_still_passes(tmp_path):
    reg = AdapterRegistry(f"sqlite:///{tmp_path}/mlflow.db")
    family = f"fam-{uuid.uuid4().hex[:8]}"
    run_id = reg.create_run("adapters")
    gates = tmp_path / "gates.json"
    gates.write_text(json.dumps({"passed": True}))
    info = reg.register(family, run_id, {"adapter": make_adapter(tmp_path / "adapter"), "gate_report": gates},
                        {"base_sha256": "sha256:" + "ab12" * 16, "data_sha256": "d" * 64}, True)
    report = tmp_path / "reports" / "drift-after.html"
    report.parent.mkdir()
    report.write_text("<html>drift</html>")
    reg.attach_report(family, info.version, report)
    listed = [a.path for a in reg.client.list_artifacts(run_id, "monitoring_reports")]
    assert listed == ["monitoring_reports/drift-after.html"]
    rows = reg.verify(family, info.version)
    assert {r["artifact"] for r in rows} == {"adapter", "gate_report"} and {r["status"] for r in rows} == {"ok"}
    with pytest.raises(RegistryError):
        reg.attach_report(family, "99", report)
