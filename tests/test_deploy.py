"""The deployment files in deploy/ against the code. Images are not built and containers not run here: every
``fluxserve`` command line they hold must be accepted by the real CLI parser, every ``FLUXSERVE_*`` variable
must be one the code reads, every port must be the one the command listens on, every health path must answer
on a real server, and KEDA's query must count the queued and running jobs of a real jobs table (SQLite and
PostgreSQL)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path

import httpx
import pytest
import yaml
from fal_helpers import Server, free_port, settings_for
from probe_helpers import get, start_worker, stop, wait_for
from sqlalchemy import text

from fluxserve.cli import build_parser
from fluxserve.config import Settings
from fluxserve.jobs.store import normalize_db_url

pytest_plugins = ["db_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
HEALTH_URL = re.compile(r"http://127\.0\.0\.1:(\d+)(/[A-Za-z0-9_/]*)")


@dataclass
class Container:
    """One fluxserve process as a deployment file describes it."""

    where: str
    argv: list[str]
    env: set[str] = field(default_factory=set)
    ports: set[int] = field(default_factory=set)  # ports the file expects it to listen on
    probes: set[tuple[int, str]] = field(default_factory=set)  # (port, path) of its health checks
    env_values: dict[str, str] = field(default_factory=dict)

    @property
    def args(self):
        return build_parser().parse_args(self.argv[1:])

    @property
    def listens_on(self) -> set[int]:
        args = self.args
        if args.command == "serve":
            return {args.port}
        return set() if args.health_port is None else {args.health_port}


# ---- reading the files -----------------------------------------------------------------------------------
def dockerfile_stages() -> dict[str, Container]:
    """Each stage of deploy/Dockerfile: ENTRYPOINT + CMD, ENV names, EXPOSE ports, HEALTHCHECK URLs."""
    source = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in source.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    stages: dict[str, dict] = {}
    stage: dict = {}
    for line in lines:
        instruction, _, rest = line.strip().partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            name = rest.split(" AS ")[-1].strip() if " AS " in rest else rest.strip()
            stage = stages.setdefault(name, {"entrypoint": [], "cmd": [], "env": set(), "ports": set(),
                                             "probes": set()})
        elif instruction == "ENV":
            stage["env"] |= {word.split("=", 1)[0] for word in shlex.split(rest)}
        elif instruction == "EXPOSE":
            stage["ports"] |= {int(port.split("/")[0]) for port in rest.split()}
        elif instruction in ("ENTRYPOINT", "CMD"):
            stage[instruction.lower()] = json.loads(rest)
        elif instruction == "HEALTHCHECK":
            stage["probes"] |= {(int(port), path) for port, path in HEALTH_URL.findall(rest)}
    return {name: Container(f"deploy/Dockerfile --target {name}", s["entrypoint"] + s["cmd"], s["env"],
                            s["ports"], s["probes"])
            for name, s in stages.items() if s["entrypoint"]}


def compose_services() -> dict[str, Container]:
    """Each service of deploy/compose.yaml built from deploy/Dockerfile."""
    stages = dockerfile_stages()
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    found = {}
    for name, service in services.items():
        if "build" not in service:
            continue
        assert service["build"]["dockerfile"] == "deploy/Dockerfile" and service["build"]["context"] == ".."
        stage = stages[service["build"]["target"]]
        argv = stage.argv[:1] + service.get("command", stage.argv[1:])
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        ports = {int(str(port).split(":")[-1].split("/")[0]) for port in service.get("ports", [])}
        test = " ".join(service.get("healthcheck", {}).get("test", []))
        probes = {(int(port), path) for port, path in HEALTH_URL.findall(test)}
        found[name] = Container(f"deploy/compose.yaml: {name}", argv, set(environment), ports, probes,
                                {k: str(v) for k, v in environment.items()})
    return found


def kubernetes_documents() -> list[dict]:
    documents = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def kubernetes_containers() -> dict[str, Container]:
    """Each container of the Deployments in deploy/kubernetes/, with the variables of the ConfigMaps and Secrets
    it reads, its container ports, probe ports (names resolved) and the Service target ports that select it."""
    stages = dockerfile_stages()
    documents = kubernetes_documents()
    sources = {(doc["kind"], doc["metadata"]["name"]): {**doc.get("data", {}), **doc.get("stringData", {})}
               for doc in documents if doc["kind"] in ("ConfigMap", "Secret")}
    found = {}
    for doc in documents:
        if doc["kind"] != "Deployment":
            continue
        labels = doc["spec"]["template"]["metadata"]["labels"]
        services = [s for s in documents if s["kind"] == "Service" and s["spec"]["selector"].items() <= labels.items()]
        for spec in doc["spec"]["template"]["spec"]["containers"]:
            stage = stages[spec["image"].removeprefix("fluxserve-")]
            argv = spec.get("command", stage.argv[:1]) + spec.get("args", stage.argv[1:])
            values = {item["name"]: str(item.get("value", "")) for item in spec.get("env", [])}
            for source in spec.get("envFrom", []):
                for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if ref in source:
                        values |= {k: str(v) for k, v in sources[(kind, source[ref]["name"])].items()}
            named = {port["name"]: port["containerPort"] for port in spec.get("ports", []) if "name" in port}
            ports = {port["containerPort"] for port in spec.get("ports", [])}
            probes = set()
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                if kind in spec:
                    probe = spec[kind]["httpGet"]
                    probes.add((named.get(probe["port"], probe["port"]), probe["path"]))
            for service in services:
                ports |= {named.get(port["targetPort"], port["targetPort"]) for port in service["spec"]["ports"]}
            found[doc["metadata"]["name"]] = Container(
                f"deploy/kubernetes: {doc['metadata']['name']}", argv, set(values), ports, probes, values)
    return found


def all_containers() -> list[Container]:
    return [*dockerfile_stages().values(), *compose_services().values(), *kubernetes_containers().values()]


def known_variables() -> set[str]:
    """Every FLUXSERVE_* variable the code reads: one per setting, and those read directly where they are used."""
    names = {f"FLUXSERVE_{f.name.upper()}" for f in fields(Settings)}
    for path in (ROOT / "src" / "fluxserve").rglob("*.py"):
        names |= set(re.findall(r"[\"'](FLUXSERVE_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


# ---- the checks --------------------------------------------------------------------------------------------
def test_every_deployment_file_is_read():
    files = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert files == {"Dockerfile", "Dockerfile.dockerignore", "compose.yaml", "kubernetes/kustomization.yaml",
                     "kubernetes/config.yaml", "kubernetes/secret.yaml", "kubernetes/api.yaml",
                     "kubernetes/worker.yaml", "kubernetes/worker-scaler.yaml"}, "a new file here needs checks here"
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
    assert {image["name"] for image in kustomization["images"]} == {"fluxserve-api", "fluxserve-worker"}
    assert set(dockerfile_stages()) == {"api", "worker"}
    assert set(compose_services()) == {"api", "worker"}
    assert set(kubernetes_containers()) == {"fluxserve-api", "fluxserve-worker"}


def test_every_command_line_is_accepted_by_the_cli():
    for container in all_containers():
        assert container.argv[0] == "fluxserve", container.where
        try:
            args = container.args
        except SystemExit:
            pytest.fail(f"{container.where}: `{shlex.join(container.argv)}` is refused by the fluxserve CLI")
        assert args.command in ("serve", "worker"), container.where
        if args.command == "serve":  # API replicas: no workers, reachable from other containers
            assert args.no_workers and args.host == "0.0.0.0", container.where
        else:
            assert args.health_host == "0.0.0.0" and args.health_port is not None, container.where


def test_every_fluxserve_variable_is_read_by_the_code():
    known = known_variables()
    assert {"FLUXSERVE_DB", "FLUXSERVE_STORAGE", "FLUXSERVE_S3_ENDPOINT", "FLUXSERVE_DATA_DIR"} <= known
    used = set()
    for container in all_containers():
        unknown = {name for name in container.env if name.startswith("FLUXSERVE_")} - known
        assert not unknown, f"{container.where}: variables the code does not read: {sorted(unknown)}"
        used |= container.env
    assert {"FLUXSERVE_DB", "FLUXSERVE_STORAGE", "FLUXSERVE_S3_ENDPOINT"} <= used


def test_every_port_is_the_one_the_command_listens_on():
    for container in all_containers():
        listening = container.listens_on
        expected = container.ports | {port for port, _ in container.probes}
        assert expected, f"{container.where}: no port and no health check"
        assert expected <= listening, f"{container.where}: ports {sorted(expected)}, listens on {sorted(listening)}"
    default = build_parser().parse_args(["serve"]).port
    assert {c.args.port for c in all_containers() if c.args.command == "serve"} == {default}  # the usual port


def test_the_database_and_storage_settings_reach_the_store():
    for container in [*compose_services().values(), *kubernetes_containers().values()]:
        db = container.env_values["FLUXSERVE_DB"]
        assert normalize_db_url(db).startswith("postgresql+psycopg://"), container.where
        assert container.env_values["FLUXSERVE_STORAGE"].startswith("s3://"), container.where
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= container.env, container.where


def health_paths(command: str) -> set[str]:
    return {path for c in all_containers() if c.args.command == command for _, path in c.probes}


def test_the_api_health_paths_answer_on_a_real_server(demo_settings):
    paths = health_paths("serve")
    assert paths == {"/health/live", "/health/ready"}
    with Server(settings_for(demo_settings, "deploy-api"), start_workers=False, auth_required=True) as server:
        for path in paths:  # probes carry no key
            response = httpx.get(server.url + path)
            assert response.status_code == 200, f"{path}: {response.text}"


def test_the_worker_health_paths_answer_on_a_real_worker(tmp_path):
    paths = health_paths("worker")
    assert paths == {"/health/live", "/health/ready"}
    argv = kubernetes_containers()["fluxserve-worker"].argv
    port = free_port()  # the manifest's command line, on loopback and a free port for the test
    process = start_worker(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", port, *argv[2:],
                           "--health-host", "127.0.0.1", "--health-port", str(port))
    try:
        for path in sorted(paths):
            url = f"http://127.0.0.1:{port}{path}"
            response = wait_for(lambda url=url: process.poll() is None and get(url), 180, url)
            assert response.status_code == 200, f"{path}: {response.text}"
    finally:
        output = stop(process)
    assert process.returncode == 0, output


def test_images_are_well_known_and_pinned():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    bases = re.findall(r"^(?:FROM |ARG CUDA_IMAGE=)(\S+)", dockerfile, re.MULTILINE)
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    images = [image for image in bases if not image.startswith("$")]
    images += [service["image"] for service in services.values() if "build" not in service]
    names = {image.split(":")[0] for image in images}
    assert names == {"python", "nvidia/cuda", "postgres", "minio/minio", "minio/mc"}
    for image in images:
        tag = image.partition(":")[2]
        assert re.search(r"\d+\.\d+|RELEASE\.\d{4}", tag) and "latest" not in tag, f"{image}: pin a version"
    assert "https://download.pytorch.org/whl/cu" in dockerfile  # CUDA torch for workers from the PyTorch index
    assert "https://download.pytorch.org/whl/cpu" in dockerfile  # and the CPU build for API replicas


# ---- KEDA --------------------------------------------------------------------------------------------------
def scaled_object() -> dict:
    (found,) = [doc for doc in kubernetes_documents() if doc["kind"] == "ScaledObject"]
    return found


def test_keda_scales_the_workers_to_zero_on_the_job_store():
    scaler = scaled_object()
    assert scaler["apiVersion"] == "keda.sh/v1alpha1"
    assert scaler["spec"]["scaleTargetRef"]["name"] == "fluxserve-worker"
    assert scaler["spec"]["minReplicaCount"] == 0
    assert scaler["spec"]["maxReplicaCount"] >= 1
    (trigger,) = scaler["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    # the connection is read from the worker container's environment: the job store's URL
    worker = kubernetes_containers()["fluxserve-worker"]
    assert trigger["metadata"]["connectionFromEnv"] == "FLUXSERVE_DB" and "FLUXSERVE_DB" in worker.env
    assert float(trigger["metadata"]["targetQueryValue"]) == 1  # one worker per job (one job at a time each)
    assert float(trigger["metadata"]["activationTargetQueryValue"]) == 0
    deployment = next(d for d in kubernetes_documents() if d["kind"] == "Deployment"
                      and d["metadata"]["name"] == "fluxserve-worker")
    assert "replicas" not in deployment["spec"]  # KEDA's to set: a re-apply must not reset it


def test_workers_are_given_longer_to_stop_than_their_grace():
    """Scaled in or updated, a worker finishes its running job within --grace before it is killed."""
    pod = next(d for d in kubernetes_documents() if d["kind"] == "Deployment"
               and d["metadata"]["name"] == "fluxserve-worker")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > kubernetes_containers()["fluxserve-worker"].args.grace
    service = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["worker"]
    assert int(service["stop_grace_period"].removesuffix("s")) > compose_services()["worker"].args.grace


def test_the_keda_query_counts_queued_and_running_jobs(store):
    query = scaled_object()["spec"]["triggers"][0]["metadata"]["query"]

    def count() -> int:
        with store.engine.connect() as conn:
            return conn.execute(text(query)).scalar_one()

    assert count() == 0
    submitted = [store.submit(endpoint="fal-ai/flux-2", dialect="fal", request={"model": "dev", "prompt": "a fox"})
                 for _ in range(6)]
    assert count() == 6
    running = [store.claim("worker-a"), store.claim("worker-b"), store.claim("worker-c")]
    assert all(running)
    store.complete(running[0].id, "worker-a", {"images": []})
    store.fail(running[1].id, "out of memory", worker_id="worker-b")
    assert store.request_cancel(submitted[-1].id) == "CANCELLATION_REQUESTED"
    counts = store.counts()
    assert (counts["queued"], counts["running"], counts["completed"], counts["failed"], counts["cancelled"]) == (
        2, 1, 1, 1, 1)
    assert count() == counts["queued"] + counts["running"] == 3
