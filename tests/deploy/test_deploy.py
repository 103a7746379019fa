"""The deployment files, checked without Docker or a cluster (neither runs on
these machines): docker-compose.yml against the Compose specification's JSON
schema, the Kubernetes manifests against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict), the Prometheus config with promtool, the
gateway configs they carry with ``infergate check-config``, and the Grafana
files for what they must show. That every metric the dashboard queries
exists in a live scrape is checked by tests/tests/observability.rs.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.31"
INFERGATE = os.environ.get("INFERGATE_BIN", str(ROOT / "target/debug/infergate"))


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_errors(doc: dict) -> list[str]:
    schema = json.loads((ROOT / "tests/schemas/compose-spec.json").read_text())
    # The schema names draft 2019-09 by a URL jsonschema does not know.
    validator = jsonschema.Draft201909Validator(schema)
    errors = validator.iter_errors(doc)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def k8s_docs() -> list[tuple[Path, dict]]:
    return [
        (path, doc)
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
    ]


def check_config(text: str, tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    out = subprocess.run(
        [INFERGATE, "check-config", "--config", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_compose_file_follows_the_compose_specification():
    assert compose_errors(compose()) == []


def test_the_schema_check_can_fail():
    broken = compose()
    broken["services"]["gateway"]["ports"] = 8080  # must be a list
    broken["services"]["worker"]["restart_policy"] = "always"  # no such key
    errors = compose_errors(broken)
    assert any("ports" in e for e in errors), errors
    assert any("restart_policy" in e for e in errors), errors


def test_compose_stack_has_its_services_and_workers_scale():
    services = compose()["services"]
    assert set(services) == {"redis", "gateway", "worker", "prometheus", "grafana"}
    worker = services["worker"]
    # `--scale worker=3` needs no fixed name and no host port.
    assert "container_name" not in worker and "ports" not in worker
    assert "health" in worker["healthcheck"]["test"]
    for name in ("gateway", "worker"):
        build = services[name]["build"]
        dockerfile = ROOT / build["context"] / build["dockerfile"]
        stages = re.findall(r"^FROM ", dockerfile.read_text(), flags=re.M)
        assert len(stages) >= 2, f"{dockerfile} is not multi-stage"
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), f"{source} is not in the repository"


def test_compose_gateway_config_is_valid_and_finds_workers_by_service_name(tmp_path: Path):
    text = (DEPLOY / "compose/gateway.toml").read_text()
    assert 'dns = "worker:50051"' in text
    check_config(text, tmp_path)


def test_compose_runs_with_auth_on_a_redis_password_and_secrets_from_the_operator():
    doc = compose()
    services = doc["services"]
    gateway_toml = tomllib.loads((DEPLOY / "compose/gateway.toml").read_text())
    assert gateway_toml["auth"]["enabled"] is True
    # The keys file is a Compose secret from a file the operator names.
    mounted = {s["target"]: s["source"] for s in services["gateway"]["secrets"]}
    assert mounted[gateway_toml["auth"]["keys_file"]] == "infergate_keys"
    assert doc["secrets"]["infergate_keys"]["file"].startswith("${INFERGATE_KEYS_FILE:?")
    # Redis asks for a password that comes from the environment, and the
    # gateway's URL carries the same variable; no password is written here.
    assert "--requirepass" in " ".join(services["redis"]["command"])
    assert services["redis"]["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert "-a" in services["redis"]["healthcheck"]["test"][1]
    url = services["gateway"]["environment"]["INFERGATE__REDIS__URL"]
    assert url.startswith("redis://:${REDIS_PASSWORD:?") and url.endswith("@redis:6379/0")
    assert "url" not in gateway_toml.get("redis", {})
    # Workers and Redis share an internal network with the gateway only.
    assert doc["networks"]["backend"]["internal"] is True
    for name, service in services.items():
        on_backend = "backend" in service.get("networks", [])
        assert on_backend == (name in {"gateway", "worker", "redis"}), name
        if name in {"worker", "redis"}:
            assert service["networks"] == ["backend"] and "ports" not in service, name


def test_prometheus_scrapes_the_gateway():
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian's prometheus package) is installed by `make test`"
    config = DEPLOY / "prometheus/prometheus.yml"
    out = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = yaml.safe_load(config.read_text())["scrape_configs"]
    assert jobs[0]["metrics_path"] == "/metrics"
    assert jobs[0]["static_configs"][0]["targets"] == ["gateway:8080"]


def test_grafana_provisioning_points_at_the_committed_dashboard():
    provisioning = DEPLOY / "grafana/provisioning"
    sources = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    uid = sources["datasources"][0]["uid"]
    providers = yaml.safe_load((provisioning / "dashboards/infergate.yml").read_text())
    mounted = {
        v.split(":")[1]: v.split(":")[0] for v in compose()["services"]["grafana"]["volumes"]
    }
    path = providers["providers"][0]["options"]["path"]
    assert (ROOT / mounted[path] / "infergate.json").exists()
    dashboard = json.loads((DEPLOY / "grafana/dashboards/infergate.json").read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid
        assert panel["targets"], panel["title"]


def test_dashboard_shows_what_operators_need():
    dashboard = json.loads((DEPLOY / "grafana/dashboards/infergate.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for topic, metric in {
        "traffic": "infergate_requests_total",
        "latency percentiles": "histogram_quantile(0.99, sum by (le) (rate(infergate_request_dur",
        "gateway overhead": "infergate_gateway_overhead_seconds_bucket",
        "errors": 'status=~"4xx|5xx"',
        "429s": "infergate_limit_rejections_total",
        "queue": "infergate_queue_depth",
        "batch size": "infergate_batch_size",
        "cache hit ratio": 'infergate_cache_requests_total{result="hit"}',
        "tokens": "infergate_tokens_total",
        "adaptive admission": "infergate_pool_admitted_share",
        "config reloads": "infergate_config_reloads_total",
        "canary rollbacks": "infergate_canary_rollbacks_total",
        "queued work": "infergate_queued_requests",
        "oldest queued entry": "infergate_queued_oldest_age_seconds",
        "queued outcomes": "infergate_queue_entries_total",
        "queue reclaims": "infergate_queue_reclaims_total",
    }.items():
        assert metric in exprs, f"the dashboard does not show {topic}"


def test_kubernetes_manifests_follow_the_kubernetes_schemas():
    docs = k8s_docs()
    for _, doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in docs}
    for want in [
        ("Deployment", "infergate-gateway"),
        ("Service", "infergate-gateway"),
        ("HorizontalPodAutoscaler", "infergate-gateway"),
        ("PodDisruptionBudget", "infergate-gateway"),
        ("Deployment", "infergate-worker"),
        ("Service", "infergate-worker"),
        ("ConfigMap", "infergate-gateway"),
        ("Deployment", "infergate-redis"),
        ("Service", "infergate-redis"),
        ("NetworkPolicy", "infergate-worker"),
        ("NetworkPolicy", "infergate-redis"),
        ("NetworkPolicy", "infergate-gateway"),
    ]:
        assert want in kinds, f"missing {want}"
    listed = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted({p.name for p, _ in docs})


def test_the_kubernetes_check_can_fail():
    (_, deployment) = next((p, d) for p, d in k8s_docs() if d["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["replica"] = 2  # a typo strict validation must catch
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def by_kind_name(kind: str, name: str) -> dict:
    return next(d for _, d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name)


def test_workers_are_probed_over_grpc_and_found_through_a_headless_service(tmp_path: Path):
    worker = by_kind_name("Deployment", "infergate-worker")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == 50051, probe
    service = by_kind_name("Service", "infergate-worker")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == worker["spec"]["selector"]["matchLabels"]
    config = by_kind_name("ConfigMap", "infergate-gateway")["data"]["gateway.toml"]
    assert f'dns = "{service["metadata"]["name"]}:50051"' in config
    check_config(config, tmp_path)


def test_gateway_rollouts_keep_serving():
    gateway = by_kind_name("Deployment", "infergate-gateway")
    pod = gateway["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    mount = container["volumeMounts"][0]["mountPath"]
    assert container["args"] == ["serve", "--config", f"{mount}/gateway.toml"]
    hpa = by_kind_name("HorizontalPodAutoscaler", "infergate-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "infergate-gateway"
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = by_kind_name("PodDisruptionBudget", "infergate-gateway")
    assert pdb["spec"]["selector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]


def test_kubernetes_runs_with_auth_on_a_redis_password_and_only_the_gateway_reaching_workers(
    tmp_path: Path,
):
    # Secrets are the operator's: no Secret is committed, every value is a reference.
    assert not [d for _, d in k8s_docs() if d["kind"] == "Secret"]
    config = by_kind_name("ConfigMap", "infergate-gateway")["data"]["gateway.toml"]
    parsed = tomllib.loads(config)
    assert parsed["auth"]["enabled"] is True and "url" not in parsed["redis"]
    check_config(config, tmp_path)
    gateway = by_kind_name("Deployment", "infergate-gateway")["spec"]["template"]["spec"]
    container = gateway["containers"][0]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["INFERGATE__REDIS__URL"] == {"name": "infergate-secrets", "key": "redis-url"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secret_volume = next(v for v in gateway["volumes"] if v["name"] == "secrets")
    assert secret_volume["secret"]["secretName"] == "infergate-secrets"
    assert f"{mounts['secrets']}/keys.toml" == parsed["auth"]["keys_file"]
    redis_pod = by_kind_name("Deployment", "infergate-redis")["spec"]["template"]["spec"]
    redis = redis_pod["containers"][0]
    assert redis["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert redis["env"][0]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    # Workers and Redis admit the gateway's pods only, on their own port.
    labels = lambda kind, name: by_kind_name(kind, name)["spec"]["selector"]["matchLabels"]  # noqa: E731
    gateway_labels = labels("Deployment", "infergate-gateway")
    for component, port in [("worker", 50051), ("redis", 6379)]:
        policy = by_kind_name("NetworkPolicy", f"infergate-{component}")["spec"]
        target = labels("Deployment", f"infergate-{component}")
        assert policy["podSelector"]["matchLabels"] == target
        assert policy["policyTypes"] == ["Ingress"]
        [rule] = policy["ingress"]
        assert rule["from"] == [{"podSelector": {"matchLabels": gateway_labels}}]
        assert rule["ports"] == [{"protocol": "TCP", "port": port}]
