"""pipeline.files: where params' paths resolve, and the object store's retry settings."""

from __future__ import annotations

import pyarrow.fs
import pytest

from pipeline import files


def test_a_relative_path_resolves_in_the_project_dvc_names(tmp_path, monkeypatch):
    """A queued DVC experiment runs in a temporary copy; DVC_ROOT names the project itself."""
    project, copy = tmp_path / "project", tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmp123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(project))
    assert files.project_path("mlflow.db") == str(project / "mlflow.db")
    assert files.project_path("data/ray") == str(project / "data" / "ray")
    assert files.project_path("/elsewhere/ray") == "/elsewhere/ray"
    assert files.project_path("s3://bucket/ray") == "s3://bucket/ray"
    monkeypatch.delenv("DVC_ROOT")
    assert files.project_path("mlflow.db") == str(copy / "mlflow.db")  # no DVC: the working directory


def test_s3_gets_the_standard_retry_mode_and_other_urls_nothing():
    options = files.storage_options("s3://bucket/shards/train/shard-000000.tar")
    assert options["config_kwargs"]["retries"] == {"max_attempts": files.S3_ATTEMPTS, "mode": "standard"}
    assert options["config_kwargs"]["read_timeout"] == files.S3_TIMEOUT_S
    assert files.storage_options("/data/shards") == {} and files.storage_options("gs://bucket/x") == {}


@pytest.mark.parametrize(("endpoint", "override", "scheme"), [
    ("http://127.0.0.1:9000", "127.0.0.1:9000", "http"),
    ("https://minio.example.com/", "minio.example.com", "https"),
])  # fmt: skip
def test_rays_checkpoints_on_s3_go_to_the_endpoint_with_the_retries(monkeypatch, endpoint, override, scheme):
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    path, filesystem = files.ray_storage("s3://bucket/ray")
    assert path == "bucket/ray" and isinstance(filesystem, pyarrow.fs.S3FileSystem)
    options = filesystem.__reduce__()[1][0]  # what the filesystem was made with
    assert (options["endpoint_override"], options["scheme"], options["region"]) == (override, scheme, "eu-west-1")
    assert options["request_timeout"] == files.S3_TIMEOUT_S
    assert files.ray_storage("/data/ray") == ("/data/ray", None)
