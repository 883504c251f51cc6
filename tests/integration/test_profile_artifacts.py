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
