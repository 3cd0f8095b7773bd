"""The Helm chart, checked without a cluster: the real helm binary lints and renders it for each
variant, every rendered manifest is validated against Kubernetes' schemas (strict) and the
custom resources against schemas of the fields the chart sets, and what the chart says about
batchgate (ports, health endpoints, metric names, settings) is compared with the code.
Then the drain the chart relies on is exercised for real on a `batchgate serve` process."""

from __future__ import annotations

import copy
import re
import signal
import subprocess
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml
from helm_support import CHART, by_kind, exported_series, lint, render, template, validate

from batchgate.app import GRPC_SERVICE
from batchgate.config import Settings, load_settings
from batchgate.core.errors import ConfigError
from batchgate.core.routing import parse_routes
from batchgate.demo import _save, slow_model
from batchgate.monitoring.metrics import FAMILIES
from batchgate.routes import read_routes_file
from batchgate.transport.http_app import LIVE_PATH, READY_PATH
from processes import Proc
from route_support import EXAMPLE_ROUTE

VARIANTS = {
    "default": {},
    "gpu": {
        "gpu": {"enabled": True, "count": 2},
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "cpu-only": {"image": {"variant": "cpu"}, "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}},
    "hpa": {"autoscaling": {"mode": "hpa", "minReplicas": 2, "maxReplicas": 20, "targetQueueDepth": 16}},
    "keda": {"autoscaling": {"mode": "keda"}, "monitoring": {"kind": "PodMonitor"}},
    "fixed": {
        "autoscaling": {"enabled": False},
        "replicaCount": 3,
        "probes": {"readiness": {"type": "http"}},
        "modelRepository": {"source": "initContainer"},
        "service": {"headless": False},
    },
    "extras": {
        "extraVolumes": [{"name": "labels", "configMap": {"name": "fraud-labels"}}],
        "extraVolumeMounts": [{"name": "labels", "mountPath": "/etc/labels", "readOnly": True}],
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
        "priorityClassName": "inference-critical",
    },
    "routes": {
        "routes": {"list": [EXAMPLE_ROUTE]},
        "state": {"existingClaim": "batchgate-state"},
        "config": {"routing": {"shadow_threads": 2}},
    },
}


def values_file(tmp_path: Path, name: str) -> Path:
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(VARIANTS[name]))
    return f


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lint_render_and_validate_every_manifest(helm, tmp_path, variant):
    values = values_file(tmp_path, variant)
    lint(helm, values)
    docs = render(helm, values)
    kinds = by_kind(docs)
    validate(docs)  # Kubernetes' schemas (strict); custom resources against their CRDs' fields
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "PodDisruptionBudget"} <= set(kinds)
    autoscaled = VARIANTS[variant].get("autoscaling", {}).get("enabled", True)
    mode = VARIANTS[variant].get("autoscaling", {}).get("mode", "hpa")
    assert ("HorizontalPodAutoscaler" in kinds) == (autoscaled and mode == "hpa")
    assert ("ScaledObject" in kinds) == (autoscaled and mode == "keda")
    assert (
        "replicas" not in kinds["Deployment"][0]["spec"]
        if autoscaled
        else kinds["Deployment"][0]["spec"]["replicas"] == 3
    )


def deployment_and_config(helm, tmp_path, variant="default"):
    kinds = by_kind(render(helm, values_file(tmp_path, variant)))
    pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
    config = yaml.safe_load(kinds["ConfigMap"][0]["data"]["batchgate.yaml"])
    return kinds, pod, pod["containers"][0], config


def test_routes_reach_the_server_as_a_watched_file(helm, tmp_path):
    kinds, pod, c, config = deployment_and_config(helm, tmp_path, "routes")
    main, routes_map = kinds["ConfigMap"]
    assert routes_map["metadata"]["name"].endswith("-routes")
    routes_file = tmp_path / "routes.yaml"
    routes_file.write_text(routes_map["data"]["routes.yaml"])
    (route,) = read_routes_file(str(routes_file))  # batchgate's own parser takes what the chart wrote
    assert route.name == "fraud" and route.weights == {"stable": 90, "canary": 10}
    assert config["routing"] == {
        "routes_file": "/etc/batchgate-routes/routes.yaml",
        "state_dir": "/var/lib/batchgate",
        "shadow_threads": 2,
    }
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["routes"]["mountPath"] == "/etc/batchgate-routes" and "subPath" not in mounts["routes"]
    assert mounts["state"]["subPathExpr"] == "$(POD_NAME)"  # one state directory per pod on a shared claim
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "batchgate-state"
    # the routes are not in the config checksum: editing them does not roll the pods
    edited = copy.deepcopy(VARIANTS["routes"])
    edited["routes"]["list"][0]["variants"][1]["weight"] = 20
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(edited))
    again = by_kind(render(helm, tmp_path / "edited.yaml"))
    assert again["ConfigMap"][1]["data"] != routes_map["data"]

    def checksum(k):
        return k["Deployment"][0]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum(again) == checksum(kinds)
    bare = deployment_and_config(helm, tmp_path, "default")
    assert "routes" not in {v["name"] for v in bare[1]["volumes"]} and "routing" not in bare[3]


def _route(change: dict, part: str | None = None) -> dict:
    """EXAMPLE_ROUTE with ``change`` merged into it, or into its ``part`` (a variant's list item 0,
    a shadow's, compare, rollout); a value None drops the field."""
    route = copy.deepcopy(EXAMPLE_ROUTE)
    node = route if part is None else route[part][0] if part in ("variants", "shadows") else route[part]
    for key, value in change.items():
        node.pop(key, None) if value is None else node.__setitem__(key, value)
    return route


@pytest.mark.parametrize(
    "route",
    [
        _route({"variants": None}),
        _route({"name": "fraud route"}),
        _route({"weights": {"stable": 90}}),
        _route({"weight": 150}, "variants"),
        _route({"weight": "10"}, "variants"),
        _route({"model": None}, "variants"),
        _route({"mdoel": "fraud_v1"}, "variants"),
        _route({"version": "v3"}, "variants"),
        _route({"sticky_key": "cookie:user"}),
        _route({"percent": 120}, "shadows"),
        _route({"max_inflight": 0}, "shadows"),
        _route({"kind": "ranking"}, "compare"),
        _route({"on_fail": "retry"}, "rollout"),
        _route({"steps": [10, 150]}, "rollout"),
        _route({"gates": {"max_error_rate": 2}}, "rollout"),
        _route({"gates": {"max_latency": 2}}, "rollout"),
        _route({"interval_s": 0}, "rollout"),
    ],
)
def test_a_route_batchgate_would_refuse_is_refused_at_render(helm, tmp_path, route):
    """A route batchgate refuses stops every pod at start (the routes file is read then):
    until 2026-12-06 the chart rendered any route. The schema reads one as batchgate does, but
    for what the fields say together (weights adding up to 0, the canary among the variants)."""
    with pytest.raises(ConfigError):
        parse_routes([route])
    values = tmp_path / "route.yaml"
    values.write_text(yaml.safe_dump({"routes": {"list": [route]}}))
    out = template(helm, values)
    assert out.returncode != 0 and "/routes/list/0" in out.stderr, out.stderr


def test_a_route_name_given_twice_is_refused_at_render(helm, tmp_path):
    routes = [EXAMPLE_ROUTE, {"name": "fraud", "variants": [{"name": "a", "model": "m", "weight": 100}]}]
    with pytest.raises(ConfigError):
        parse_routes(routes)  # batchgate refuses it at start
    values = tmp_path / "twice.yaml"
    values.write_text(yaml.safe_dump({"routes": {"list": routes}}))
    out = template(helm, values)
    assert out.returncode != 0 and 'routes.list[1]: route "fraud" is defined twice' in out.stderr, out.stderr


def test_every_kind_of_route_batchgate_takes_renders(helm, tmp_path):
    routes = [
        EXAMPLE_ROUTE,
        {"name": "plain", "variants": [{"name": "only", "model": "m", "version": 2, "weight": 100}]},
        {
            "name": "bare",
            "variants": [{"name": "a", "model": "m", "weight": 1}, {"name": "b", "model": "m2", "version": ""}],
            "sticky_key": "param:user",
            "shadows": None,
            "compare": {"output": "out"},
            "rollout": {"canary": "b", "baseline": "a", "steps": [100], "gates": None},
        },
    ]
    parse_routes(routes)
    values = tmp_path / "routes.yaml"
    values.write_text(yaml.safe_dump({"routes": {"list": routes}}))
    routes_map = by_kind(render(helm, values))["ConfigMap"][1]
    (tmp_path / "routes-file.yaml").write_text(routes_map["data"]["routes.yaml"])
    assert [r.name for r in read_routes_file(str(tmp_path / "routes-file.yaml"))] == ["fraud", "plain", "bare"]


def test_the_chart_agrees_with_the_code(helm, tmp_path):
    kinds, pod, c, config = deployment_and_config(helm, tmp_path)
    defaults = Settings().server
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": defaults.http_port, "grpc": defaults.grpc_port, "metrics": defaults.metrics_port}
    assert (config["server"]["http_port"], config["server"]["grpc_port"], config["server"]["metrics_port"]) == (
        defaults.http_port,
        defaults.grpc_port,
        defaults.metrics_port,
    )
    assert c["readinessProbe"]["grpc"] == {"port": defaults.grpc_port, "service": GRPC_SERVICE}
    assert c["livenessProbe"]["httpGet"]["path"] == LIVE_PATH
    assert c["startupProbe"]["httpGet"]["path"] == READY_PATH
    http = by_kind(render(helm, values_file(tmp_path, "fixed")))["Deployment"][0]
    assert http["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == READY_PATH
    # metric names: every batchgate_* series the chart queries is exported by the code
    exported = exported_series()
    exprs = [r["expr"] for g in kinds["PrometheusRule"][0]["spec"]["groups"] for r in g["rules"]]
    used = set(re.findall(r"batchgate_[a-z_]+", " ".join(exprs)))
    assert used and used <= exported, used - exported
    assert kinds["HorizontalPodAutoscaler"][0]["spec"]["metrics"][0]["pods"]["metric"]["name"] in FAMILIES
    # the config the chart writes is one batchgate accepts, in its current (nested) form: no
    # deprecation warning (model_repository aside: a real folder here)
    config["repository"]["model_repository"] = str(tmp_path)
    cfg_file = tmp_path / "batchgate.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        settings = load_settings(str(cfg_file), environ={})
    assert settings.server.grpc_max_connection_age_s > 0  # new replicas get gRPC clients too
    assert settings.server.log_format == "json" and settings.limits.max_queue_size >= 1


def test_security_probes_drain_and_spread(helm, tmp_path):
    _, pod, c, config = deployment_and_config(helm, tmp_path)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/models", "/tmp", "/etc/batchgate"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # room for model loading
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config["server"]["exit_timeout_s"]
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert c["args"] == ["--config", "/etc/batchgate/batchgate.yaml"]
    assert config["repository"]["model_repository"] == "/models"


def test_extra_volumes_strategy_and_priority_class_reach_the_pod(helm, tmp_path):
    kinds, pod, c, _ = deployment_and_config(helm, tmp_path, "extras")
    assert {"name": "labels", "configMap": {"name": "fraud-labels"}} in pod["volumes"]
    assert {"name": "labels", "mountPath": "/etc/labels", "readOnly": True} in c["volumeMounts"]
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/models", "/tmp", "/etc/batchgate"}  # still there
    assert kinds["Deployment"][0]["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert pod["priorityClassName"] == "inference-critical"
    _, pod, _, _ = deployment_and_config(helm, tmp_path)  # the defaults: surge first, no class
    assert "priorityClassName" not in pod
    # a volume named as one of the chart's own would make a pod Kubernetes refuses
    assert "/extraVolumes/0/name" in _refused(helm, tmp_path, {"extraVolumes": [{"name": "models", "emptyDir": {}}]})
    assert "/strategy/type" in _refused(helm, tmp_path, {"strategy": {"type": "Rolling"}})


def test_gpu_cpu_and_autoscaling_variants(helm, tmp_path):
    _, pod, c, _ = deployment_and_config(helm, tmp_path, "gpu")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2 and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    _, _, c, _ = deployment_and_config(helm, tmp_path, "default")
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    _, _, c, _ = deployment_and_config(helm, tmp_path, "cpu-only")
    assert c["image"].endswith("-cpu")

    hpa = by_kind(render(helm, values_file(tmp_path, "hpa")))["HorizontalPodAutoscaler"][0]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 20)
    assert hpa["metrics"][0]["pods"]["target"] == {"type": "AverageValue", "averageValue": "16"}
    up, down = hpa["behavior"]["scaleUp"], hpa["behavior"]["scaleDown"]
    assert up["stabilizationWindowSeconds"] < down["stabilizationWindowSeconds"]  # fast up, slow down

    kinds = by_kind(render(helm, values_file(tmp_path, "keda")))
    so = kinds["ScaledObject"][0]["spec"]
    trigger = so["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert "batchgate_queue_depth" in trigger["metadata"]["query"] and trigger["metadata"]["threshold"] == "8"
    assert so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert "PodMonitor" in kinds and "ServiceMonitor" not in kinds

    # without the KEDA API, mode keda is refused with a message, not rendered half
    out = subprocess.run(
        [helm, "template", "rel", str(CHART), "-f", str(values_file(tmp_path, "keda"))], capture_output=True, text=True
    )
    assert out.returncode != 0 and "no keda.sh/v1alpha1 API" in out.stderr


@pytest.mark.parametrize(
    "target, factor, per_pod",
    [(8, 3, 8.0), (0.5, 3, 0.5), ("500m", 3, 0.5), ("7500m", 2, 7.5), (2.5, 1.5, 2.5), ("0.1", 3, 0.1)],
)
def test_a_fractional_queue_target_reaches_keda_and_the_alert_whole(helm, tmp_path, target, factor, per_pod):
    """targetQueueDepth may be a fraction (0.5) or a Kubernetes quantity ("500m"), as the schema
    and the simulator allow: the alert's threshold had been cut to a whole number (0.5 x 3 gave
    "> 0": an alert whenever anything queued) and KEDA was given "500m", which its prometheus
    trigger cannot read as a number."""
    values = tmp_path / "target.yaml"
    values.write_text(
        yaml.safe_dump(
            {"autoscaling": {"mode": "keda", "targetQueueDepth": target}, "alerts": {"queueDepthFactor": factor}}
        )
    )
    kinds = by_kind(render(helm, values))
    threshold = kinds["ScaledObject"][0]["spec"]["triggers"][0]["metadata"]["threshold"]
    assert float(threshold) == per_pod  # KEDA parses it as a float: no quantity suffix
    (rule,) = [
        r
        for g in kinds["PrometheusRule"][0]["spec"]["groups"]
        for r in g.get("rules", [])
        if r.get("alert") == "BatchgateQueueDepthHigh"
    ]
    assert float(rule["expr"].rsplit(">", 1)[1]) == pytest.approx(per_pod * factor, rel=1e-9)
    values.write_text(yaml.safe_dump({"autoscaling": {"mode": "hpa", "targetQueueDepth": target}}))
    hpa = by_kind(render(helm, values))["HorizontalPodAutoscaler"][0]["spec"]
    assert hpa["metrics"][0]["pods"]["target"]["averageValue"] == str(target)  # a quantity: kept as given


def _refused(helm, tmp_path: Path, given: dict) -> str:
    values = tmp_path / "refused.yaml"
    values.write_text(yaml.safe_dump(given))
    out = template(helm, values)
    assert out.returncode != 0, f"rendered {given}"
    return out.stderr


def test_gpu_with_the_cpu_image_is_refused_at_render(helm, tmp_path):
    """gpu.enabled with the CPU-only image rendered a pod that holds a GPU its onnxruntime cannot
    use. The CPU build is variant cpu (the chart adds -cpu to the tag) or a tag ending in -cpu
    (the README's own build, 0.1.0-cpu; a digest after it too), or the Dockerfile's tag cpu."""
    for image in ({"variant": "cpu"}, {"tag": "0.2.0-cpu"}, {"tag": "0.2.0-cpu@sha256:" + "0" * 64}, {"tag": "cpu"}):
        stderr = _refused(helm, tmp_path, {"gpu": {"enabled": True}, "image": image})
        assert "gpu.enabled: the image" in stderr and "is the CPU-only build" in stderr, (image, stderr)
    for image in ({}, {"tag": "0.2.0"}, {"tag": "gpu-cuda12"}):  # the GPU build
        values = tmp_path / "gpu.yaml"
        values.write_text(yaml.safe_dump({"gpu": {"enabled": True}, "image": image}))
        c = by_kind(render(helm, values))["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and not c["image"].endswith("-cpu")
    values = tmp_path / "cpu.yaml"  # the CPU image without a GPU renders as before
    values.write_text(yaml.safe_dump({"image": {"variant": "cpu"}}))
    assert by_kind(render(helm, values))["Deployment"]


DIGEST = "@sha256:" + "0" * 64


@pytest.mark.parametrize(
    "tag, image",
    [
        ("", "0.1.0-cpu"),  # the chart's appVersion
        ("0.2.0", "0.2.0-cpu"),
        ("0.2.0-cpu", "0.2.0-cpu"),  # had been 0.2.0-cpu-cpu
        ("cpu", "cpu"),  # the Dockerfile's own tag; had been cpu-cpu
        ("0.2.0" + DIGEST, "0.2.0-cpu" + DIGEST),  # the suffix had gone after the digest
        ("0.2.0-cpu" + DIGEST, "0.2.0-cpu" + DIGEST),
    ],
)
def test_the_cpu_variant_names_one_cpu_tag(helm, tmp_path, tag, image):
    """image.variant cpu adds -cpu to the tag once, and before a digest: a tag that already names
    the CPU build had become 0.2.0-cpu-cpu, and a pinned one repo:0.2.0@sha256:...-cpu, neither
    of them an image reference a kubelet can pull."""
    values = tmp_path / "cpu.yaml"
    values.write_text(yaml.safe_dump({"image": {"variant": "cpu", "tag": tag}}))
    c = by_kind(render(helm, values))["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "ghcr.io/batchgate/batchgate:" + image


def test_a_tag_yaml_reads_as_a_number_names_the_image_it_says_or_is_refused(helm, tmp_path):
    """An unquoted tag in a values file is a YAML number, which helm hands the template as a
    float64: until 2026-12-06 `tag: 20261206` named repo:2.0261206e+07 (no kubelet can pull it) and
    `tag: 1.10` named repo:1.1, another image. A whole number is written in digits; a fraction,
    whose digits are lost, is refused by the schema (quote it)."""
    values = tmp_path / "tag.yaml"
    for written, image in (("20261206", "20261206"), ("7", "7"), ('"1.10"', "1.10"), ("'0.2.0'", "0.2.0")):
        values.write_text(f"image:\n  tag: {written}\n")  # as a user writes it: YAML types it
        c = by_kind(render(helm, values))["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
        assert c["image"] == "ghcr.io/batchgate/batchgate:" + image, written
    values.write_text("image:\n  tag: 1.10\n")
    out = template(helm, values)
    assert out.returncode != 0 and "/image/tag" in out.stderr, out.stderr
    values.write_text("{}")
    out = template(helm, values, "--set", "image.tag=123", "--set", "image.variant=cpu")  # --set: an int64
    assert out.returncode == 0 and "ghcr.io/batchgate/batchgate:123-cpu" in out.stdout, out.stderr


@pytest.mark.parametrize("mode", ["hpa", "keda"])
def test_min_replicas_above_max_replicas_is_refused_at_render(helm, tmp_path, mode):
    """autoscaling.minReplicas above maxReplicas rendered an HPA (or a ScaledObject whose HPA)
    that Kubernetes refuses; the render says so. Equal bounds, or autoscaling off, render."""
    bounds = {"enabled": True, "mode": mode, "minReplicas": 5, "maxReplicas": 3}
    stderr = _refused(helm, tmp_path, {"autoscaling": bounds})
    assert "autoscaling.minReplicas 5 is above autoscaling.maxReplicas 3" in stderr, stderr
    values = tmp_path / "ok.yaml"
    for ok in ({**bounds, "maxReplicas": 5}, {**bounds, "enabled": False}):
        values.write_text(yaml.safe_dump({"autoscaling": ok}))
        kinds = by_kind(render(helm, values))
        assert ("HorizontalPodAutoscaler" in kinds or "ScaledObject" in kinds) == ok["enabled"]


@pytest.mark.parametrize("mode", ["hpa", "keda"])
def test_scaling_from_zero_replicas_is_refused_at_render_in_either_mode(helm, tmp_path, mode):
    """Both modes scale on batchgate_queue_depth, which only running pods report: at zero pods there
    is no series, and requests are refused before they can queue, so nothing scales back up. Mode
    hpa rendered an HPA the API server refuses; until 2026-12-06 mode keda rendered a ScaledObject
    with minReplicaCount 0, which scaled an idle release to zero pods for good."""
    stderr = _refused(helm, tmp_path, {"autoscaling": {"mode": mode, "minReplicas": 0}})
    assert f"autoscaling.minReplicas 0 in mode {mode}" in stderr and "give at least 1" in stderr, stderr
    values = tmp_path / "one.yaml"
    values.write_text(yaml.safe_dump({"autoscaling": {"mode": mode, "minReplicas": 1}}))
    kinds = by_kind(render(helm, values))
    if mode == "keda":
        assert kinds["ScaledObject"][0]["spec"]["minReplicaCount"] == 1
    else:
        assert kinds["HorizontalPodAutoscaler"][0]["spec"]["minReplicas"] == 1
    values.write_text(yaml.safe_dump({"autoscaling": {"enabled": False, "mode": mode, "minReplicas": 0}}))
    assert "replicas" in by_kind(render(helm, values))["Deployment"][0]["spec"]  # off: not its concern


def test_chart_config_is_nested_and_flat_keys_are_refused_at_render(helm, tmp_path):
    values = tmp_path / "custom.yaml"
    values.write_text(
        yaml.safe_dump({"config": {"server": {"exit_timeout_s": 45}, "remote_models": ["name=r upstreams=h:8001"]}})
    )
    kinds = by_kind(render(helm, values))
    config = yaml.safe_load(kinds["ConfigMap"][0]["data"]["batchgate.yaml"])
    assert config["server"]["exit_timeout_s"] == 45 and config["remote_models"] == ["name=r upstreams=h:8001"]
    pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 10 + 45 + 10  # preStop + exit_timeout_s + margin
    values.write_text(yaml.safe_dump({"config": {"exit_timeout_secs": 60}}))  # the old flat values
    out = subprocess.run([helm, "template", "rel", str(CHART), "-f", str(values)], capture_output=True, text=True)
    assert out.returncode != 0 and "config.exit_timeout_secs: batchgate's settings go in sections" in out.stderr


PORT_KEYS = ("http_port", "grpc_port", "metrics_port", "admin_port", "admin_http_port", "health_port")


def test_graceful_drain_under_load_with_the_charts_settings(helm, tmp_path):
    """SIGTERM under load: readiness (the gRPC health service the readiness probe asks) turns
    NOT_SERVING first, every accepted request is answered, and the process exits 0 within the
    grace period the chart gives it after preStop."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, pod, c, config = deployment_and_config(helm, tmp_path)
    grace = pod["terminationGracePeriodSeconds"] - int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    repo = tmp_path / "models"
    _save(slow_model(width=1024, layers=64), str(repo), "slow", config="max_batch_size: 64\n")
    cfg = dict(
        config,
        # every port free, the admin and health ones too: their fixed defaults (8003, 8005, 8004) met another test's
        # server in a parallel run (EADDRINUSE)
        server={**config["server"], "host": "127.0.0.1", **dict.fromkeys(PORT_KEYS, 0)},
        repository={**config["repository"], "model_repository": str(repo)},
    )
    cfg_file = tmp_path / "batchgate.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    p = Proc(["serve", "--config", str(cfg_file)]).wait_ready()
    try:
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(p.grpc))

        def health() -> int:
            return stub.Check(
                health_pb2.HealthCheckRequest(service=c["readinessProbe"]["grpc"]["service"]), timeout=5
            ).status

        assert health() == health_pb2.HealthCheckResponse.SERVING
        x = np.ones((64, 1024), np.float32)

        def call(_):
            client = httpclient.InferenceServerClient(p.http, network_timeout=120)
            inp = httpclient.InferInput("input", [64, 1024], "FP32")
            inp.set_data_from_numpy(x)
            return client.infer("slow", [inp]).as_numpy("output").shape

        stats = httpclient.InferenceServerClient(p.http)
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(call, i) for i in range(16)]
            end = time.monotonic() + 30
            while time.monotonic() < end:  # every request accepted before SIGTERM
                s = stats.get_inference_statistics("slow")["model_stats"][0]
                if _in_flight(p) >= 16 or s["inference_stats"]["success"]["count"] + _in_flight(p) >= 16:
                    break
                time.sleep(0.01)
            t0 = time.monotonic()
            p.p.send_signal(signal.SIGTERM)
            flipped = None
            while time.monotonic() - t0 < 10:
                if health() != health_pb2.HealthCheckResponse.SERVING:
                    flipped = time.monotonic() - t0
                    break
                time.sleep(0.005)
            assert flipped is not None, "readiness never turned NOT_SERVING"
            still_running = sum(not f.done() for f in futures)
            results = [f.result(grace) for f in futures]
        assert still_running > 0, "no accepted work was left to drain when readiness flipped"
        assert results == [(64, 1024)] * 16  # every accepted request answered
        assert p.p.wait(grace) == 0 and time.monotonic() - t0 < grace
    finally:
        p.kill()


def _in_flight(p) -> int:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{p.ports[2]}/metrics", timeout=5).read().decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("batchgate_inflight_requests{")
        )
    )


def test_the_server_closes_old_grpc_connections_when_told(tmp_path, serve):
    """grpc_max_connection_age_secs (the chart sets 300): an old connection is closed and the
    client connects again, which is how long-lived gRPC clients reach new replicas."""
    import grpc
    import tritonclient.grpc as grpcclient

    from batchgate.demo import build_demo_repository

    running = serve(build_demo_repository(str(tmp_path / "m")), grpc_max_connection_age_secs=1)
    states = []
    channel = grpc.insecure_channel(running.grpc_url)
    channel.subscribe(lambda s: states.append(s), try_to_connect=True)
    grpc.channel_ready_future(channel).result(timeout=10)
    client = grpcclient.InferenceServerClient(running.grpc_url)
    assert client.is_server_ready()
    end = time.monotonic() + 15
    while time.monotonic() < end and grpc.ChannelConnectivity.IDLE not in states[1:]:
        time.sleep(0.1)
    assert grpc.ChannelConnectivity.IDLE in states[1:], states  # the server ended the connection
    assert client.is_server_ready()  # and the next call connects again
    channel.close()
