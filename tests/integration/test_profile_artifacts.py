"""artifact_root reaches MLflow: an experiment created with Profile.experiment_artifact_location keeps its runs'
artifacts under the profile's artifact_root (real MLflow on SQLite), not next to the database or in ./mlruns."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_runs_of_an_experiment_created_with_the_profiles_location_store_artifacts_there(tmp_path):
    from pipelines.profile import Profile
    from registry.versions import AdapterRegistry

    root = tmp_path / "artifact-root"
    profile = Profile(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=str(root))
    reg = AdapterRegistry(profile.tracking_uri)
    run_id = reg.create_run("adapterops-fam", artifact_location=profile.experiment_artifact_location("adapterops-fam"))
    (tmp_path / "note.txt").write_text("x")
    reg.client.log_artifact(run_id, str(tmp_path / "note.txt"), "reports")
    assert reg.client.get_run(run_id).info.artifact_uri.removeprefix("file://").startswith(str(root / "adapterops-fam"))
    assert list(root.glob("adapterops-fam/**/reports/note.txt"))
    assert not (tmp_path / "mlartifacts").exists()


def test_the_workspace_registry_puts_new_experiments_under_the_profiles_artifact_root(tmp_path, caplog):
    """The path a direct database URI takes in production: Workspace(artifact_root=...) -> AdapterRegistry ->
    create_run; an experiment that already exists keeps its location and says so."""
    from pipelines.workspace import Workspace

    root = tmp_path / "artifact-root"
    base = __import__("pathlib").Path(__file__).resolve().parents[2] / "models" / "tiny-llama"
    ws = Workspace.create(tmp_path / "ws", base, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                          artifact_root=str(root))
    reg = ws.registry()
    run_id = reg.create_run("adapterops-fam2")
    assert reg.client.get_run(run_id).info.artifact_uri.removeprefix("file://").startswith(str(root / "adapterops-fam2"))
    assert Workspace.coerce(__import__("dataclasses").asdict(ws)).artifact_root == str(root)
    other = Workspace.create(tmp_path / "ws", base, tracking_uri=ws.tracking_uri,
                             artifact_root=str(tmp_path / "elsewhere"))
    with caplog.at_level("WARNING"):
        other.registry().create_run("adapterops-fam2")
    assert "keeps the artifact location it was created with" in caplog.text
