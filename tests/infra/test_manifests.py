"""Every manifest in infra/ parses and names only what the project has: modules, params, env
vars, files in the image, GPU resources. They cannot run here (no Kubernetes, no Docker
engine), so this is what keeps them from rotting."""

from __future__ import annotations

import importlib.util
import re
import shlex

import pytest
import yaml

from pipeline import params as params_module
from tests.conftest import REPO

INFRA = REPO / "infra"
IMAGE = "ghcr.io/example/resnet-pipeline:latest"
# Read by the libraries the stages use (MLflow's client, boto3/s3fs, Ray's CLI and client).
LIBRARY_ENV = {
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "RAY_AUTH_MODE",
}


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d]


def env_read_by_code() -> set[str]:
    names = set()
    for source in (REPO / "pipeline").glob("*.py"):
        names |= set(re.findall(r"os\.environ(?:\.get\(|\[)\"([A-Z_]+)\"", source.read_text()))
    names |= set(re.findall(r"\$\{([A-Z_]+)", (INFRA / "mlflow" / "start-server.sh").read_text()))
    return names | LIBRARY_ENV


def copied_into_image() -> list[str]:
    lines = re.findall(r"^COPY (.+)$", (INFRA / "Dockerfile").read_text(), flags=re.MULTILINE)
    return [source for line in lines for source in line.split()[:-1]]


def check_stage_command(command: list[str]) -> None:
    """`python -m pipeline.<stage> [--set k=v ...]`: the module exists and the params are valid."""
    assert command[:2] == ["python", "-m"], command
    module = command[2]
    assert module.startswith("pipeline.") and importlib.util.find_spec(module), f"no module {module}"
    overrides = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
    loaded = params_module.load(REPO / "params.yaml", overrides)  # raises on an unknown key or bad value
    if module == "pipeline.tune":
        params_module.check_sweep(loaded)


def check_container(container: dict) -> None:
    assert container["image"] == IMAGE
    names = {e["name"] for e in container.get("env", [])}
    unknown = names - env_read_by_code()
    assert not unknown, f"{container['name']} sets env vars nothing reads: {unknown}"
    command = container.get("command") or []
    for arg in command:
        if arg.startswith("infra/"):
            assert (REPO / arg).is_file() and any(arg.startswith(c.rstrip("/")) for c in copied_into_image()), arg


@pytest.mark.parametrize("path", sorted(p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*.yaml")))
def test_every_manifest_parses(path):
    assert documents(path)


def test_raycluster_gpu_workers_and_token_auth():
    (cluster,) = documents("kuberay/raycluster.yaml")
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["rayVersion"] == "2.60.0"
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    check_container(head)
    for group in cluster["spec"]["workerGroupSpecs"]:
        (worker,) = group["template"]["spec"]["containers"]
        check_container(worker)
        gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus >= 1 and int(worker["resources"]["requests"]["nvidia.com/gpu"]) == gpus


def test_rayjob_runs_a_real_stage_with_valid_params():
    (job,) = documents("kuberay/rayjob-sweep.yaml")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == documents("kuberay/raycluster.yaml")[0]["metadata"]["name"]
    check_stage_command(shlex.split(job["spec"]["entrypoint"]))


def test_a_bad_param_in_a_manifest_would_fail():
    with pytest.raises(params_module.ParamsError, match="train.epoch: unknown key"):
        check_stage_command(["python", "-m", "pipeline.tune", "--set", "train.epoch=3"])
    with pytest.raises(AssertionError, match="no module pipeline.sweep"):
        check_stage_command(["python", "-m", "pipeline.sweep"])


def test_cluster_launcher_uses_the_image_and_keeps_the_dashboard_local():
    (config,) = documents("ray-cluster.yaml")
    assert config["docker"]["image"] == IMAGE
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start


def test_mlflow_server_has_auth_postgres_s3_and_no_committed_secret():
    script = (INFRA / "mlflow" / "start-server.sh").read_text()
    assert "--app-name basic-auth" in script and "MLFLOW_ADMIN_PASSWORD" in script
    assert "${MLFLOW_HOST:-127.0.0.1}" in script  # loopback unless told otherwise
    (compose,) = documents("mlflow/compose.yaml")
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
        for key, value in service.get("environment", {}).items():
            if re.search(r"PASSWORD|SECRET", key):
                assert str(value).startswith("${"), f"{key} has a literal value"
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    deployment, service = documents("mlflow/k8s.yaml")
    check_container(deployment["spec"]["template"]["spec"]["containers"][0])
    assert service["spec"]["type"] == "ClusterIP"
