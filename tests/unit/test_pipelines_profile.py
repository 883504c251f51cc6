"""pipelines.profile: the serving address and artifact location the profile fields give, and the values refused."""

from __future__ import annotations

import pytest

from pipelines.config import ConfigError
from pipelines.profile import Profile, load_profile


def test_serving_address_defaults_to_the_profile_and_flags_win():
    production = load_profile("production", {})
    assert production.serving_address() == ("0.0.0.0", 8000)
    assert production.serving_address("127.0.0.1", None) == ("127.0.0.1", 8000)
    assert production.serving_address(None, 9001) == ("0.0.0.0", 9001)
    assert load_profile("local", {}).serving_address() == ("127.0.0.1", 8000)
    with pytest.raises(ValueError, match="port must be in 1..65535, got 70000"):
        production.serving_address(None, 70000)


def test_experiment_artifact_location_follows_the_tracking_uri():
    pg = Profile(tracking_uri="postgresql://mlflow@db:5432/mlflow", artifact_root="s3://adapterops/mlflow/")
    assert pg.experiment_artifact_location("adapterops-support") == "s3://adapterops/mlflow/adapterops-support"
    server = Profile(tracking_uri="http://mlflow:5000", artifact_root="s3://adapterops/mlflow")
    assert server.experiment_artifact_location("adapterops-support") is None  # the server's --artifacts-destination
    assert Profile(tracking_uri="sqlite:///w/mlflow.db").experiment_artifact_location("e") is None
    assert Profile(artifact_root="/srv/artifacts").experiment_artifact_location("e") == "/srv/artifacts/e"


@pytest.mark.parametrize("fields, message", [
    ({"tracking_uri": "postgresql://mlflow@db:5432/mlflow"}, "set artifact_root .* ./mlruns"),
    ({"artifact_root": "relative/dir"}, "artifact_root 'relative/dir': expected an object-store URI"),
    ({"artifact_root": "ftp://host/x"}, "artifact_root 'ftp://host/x'"),
    ({"serving_host": ""}, "serving_host '' must be an address to bind"),
    ({"serving_host": "0.0.0.0 8000"}, "serving_host '0.0.0.0 8000'"),
    ({"serving_port": 0}, "serving_port must be in 1..65535"),
])
def test_bad_profile_values_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        Profile(**fields)


def test_a_profile_file_with_a_database_uri_and_no_artifact_root_names_the_file(tmp_path):
    path = tmp_path / "pg.yaml"
    path.write_text("tracking_uri: postgresql://mlflow@db:5432/mlflow\n")
    with pytest.raises(ConfigError, match=f"{path}: tracking_uri .* set artifact_root"):
        load_profile(path, {})
    path.write_text("tracking_uri: postgresql://mlflow@db:5432/mlflow\nartifact_root: s3://b/mlflow\n")
    assert load_profile(path, {}).artifact_root == "s3://b/mlflow"
