"""Values a user mistypes are refused at render with a message naming the value (the chart's
values.schema.json), instead of rendering something else: `autoscaling.mode: HPA` had rendered no
HPA and no ScaledObject and a Deployment without replicas (one pod, never scaled);
`modelRepository.source: PVC` an empty emptyDir as the model repository; `image.variant: CPU` the
GPU image; a misspelt top-level key was ignored. The defaults and the documented choices render."""

from __future__ import annotations

import pytest
import yaml
from helm_support import by_kind, render, template, validate, values_file

from batchgate.config import load_settings


@pytest.mark.parametrize(
    "given, where",
    [
        ({"autoscaling": {"mode": "HPA"}}, "/autoscaling/mode"),
        ({"autoscaling": {"mode": "prometheus"}}, "/autoscaling/mode"),
        ({"autoscaling": {"targetQueueDepth": 0}}, "/autoscaling/targetQueueDepth"),
        ({"modelRepository": {"source": "PVC"}}, "/modelRepository/source"),
        ({"modelRepository": {"source": "s3"}}, "/modelRepository/source"),
        ({"image": {"variant": "CPU"}}, "/image/variant"),
        ({"probes": {"readiness": {"type": "tcp"}}}, "/probes/readiness/type"),
        ({"monitoring": {"kind": "podMonitor"}}, "/monitoring/kind"),
        ({"service": {"type": "Loadbalancer"}}, "/service/type"),
        ({"ports": {"metrics": -1}}, "/ports/metrics"),
        ({"ports": {"http": 70000}}, "/ports/http"),
        ({"ports": {"htp": 9000}}, "htp"),
        ({"admin": {"port": 0}}, "/admin/port"),
        ({"autoscalling": {"enabled": False}}, "autoscalling"),
        ({"lifecycle": {"preStopSleepSeconds": -5}}, "/lifecycle/preStopSleepSeconds"),  # `sleep -5` fails
        ({"podDisruptionBudget": {"maxUnavailable": "one"}}, "/podDisruptionBudget/maxUnavailable"),
        ({"modelRepository": {"initContainer": {"command": "aws s3 sync"}}}, "/modelRepository/initContainer/command"),
    ],
)
def test_a_mistyped_value_is_refused_at_render_naming_it(helm, tmp_path, given, where):
    out = template(helm, values_file(tmp_path, given))
    assert out.returncode != 0, f"rendered {given}"
    assert where in out.stderr, out.stderr


@pytest.mark.parametrize(
    "given, where",
    [
        # a misspelt key of the security sections was dropped without a word: no keys (the server
        # ran open), no TLS, no NetworkPolicy, and the install succeeded
        ({"auth": {"apiKeys": {"existingSecert": "team-keys"}}}, "existingSecert"),
        ({"auth": {"apikeys": {"existingSecret": "team-keys"}}}, "apikeys"),
        ({"auth": {"healthRequireKey": True}}, "healthRequireKey"),
        ({"auth": {"auditLog": {"enable": True}}}, "enable"),
        ({"tls": {"enable": True, "existingSecret": "gw-tls"}}, "enable"),
        ({"tls": {"certManager": {"issuer": {"name": "ca"}}}}, "issuer"),
        ({"networkPolicy": {"enable": True}}, "enable"),
        ({"networkPolicy": {"enabled": True, "client": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}}, "client"),
        # and a switch given as a string ("true" from --set-string) failed deep in a template
        ({"tls": {"enabled": "true", "existingSecret": "gw-tls"}}, "/tls/enabled"),
        ({"auth": {"metricsRequiresKey": "yes"}}, "/auth/metricsRequiresKey"),
        ({"networkPolicy": {"enabled": True, "clients": "web"}}, "/networkPolicy/clients"),
        # a Secret key kubernetes refuses (the chart's own Secret) or cannot mount (another's)
        ({"auth": {"apiKeys": {"existingSecret": "k", "secretKey": "keys/keys.yaml"}}}, "/auth/apiKeys/secretKey"),
        ({"tls": {"enabled": True, "existingSecret": "s", "clientAuth": True, "clientCAKey": ""}}, "/tls/clientCAKey"),
    ],
)
def test_a_misspelt_security_value_is_refused_at_render_naming_it(helm, tmp_path, given, where):
    out = template(helm, values_file(tmp_path, given))
    assert out.returncode != 0, f"rendered {given}"
    assert "values don't meet the specifications of the schema" in out.stderr and where in out.stderr, out.stderr


# Values that are Kubernetes objects or the user's own maps (labels, selectors, a Secret's
# reference), whose keys the chart passes on as given; config has a schema of its own.
FREE_FORM = {
    "resources", "nodeSelector", "tolerations", "affinity", "podSecurityContext", "securityContext",
    "podAnnotations", "podLabels", "service.annotations", "autoscaling.behavior", "monitoring.labels",
    "monitoring.authorization", "dashboards.labels", "dashboards.annotations", "alerts.labels",
    "serviceAccount.annotations", "config", "drift.profiles", "drift.detector",
    "modelRepository.initContainer.resources", "global", "strategy",
}  # fmt: skip


def _sections(node: object, path: str = ""):
    """The dotted path of every mapping in values.yaml that is the chart's own (not FREE_FORM)."""
    if isinstance(node, dict):
        if path and not any(path == f or path.startswith(f + ".") for f in FREE_FORM):
            yield path
        for key, value in node.items():
            yield from _sections(value, f"{path}.{key}" if path else str(key))


def test_a_misspelt_key_of_any_of_the_charts_sections_is_refused(helm, tmp_path):
    """values.yaml documents every key, and a key the templates never read was dropped without a
    word: until 2026-12-06 routes.lists, drift.monitor, modelRepository.initcontainer,
    alerts.drift.detected.four or lifecycle.preStopSleepSecond rendered as if not given (no
    routes, no drift monitoring, the default bucket). Each section now names the stray key."""
    import helm_support

    values = yaml.safe_load((helm_support.CHART / "values.yaml").read_text())
    sections = list(_sections(values))
    assert {"routes", "drift", "alerts.drift.detected", "modelRepository.initContainer"} <= set(sections)
    loose = []
    for section in sections:
        given: dict = {}
        node = given
        for part in section.split("."):
            node = node.setdefault(part, {})
        node["strayKey"] = True
        out = template(helm, values_file(tmp_path, given))
        if out.returncode == 0 or "strayKey" not in out.stderr:
            loose.append(section)
    assert loose == []


def test_the_documented_choices_render(helm, tmp_path):
    for given in (
        {},
        {"autoscaling": {"mode": "keda", "targetQueueDepth": 0.5}},
        {"autoscaling": {"enabled": False}, "replicaCount": 3},
        {"modelRepository": {"source": "initContainer"}, "image": {"variant": "cpu"}},
        {"probes": {"readiness": {"type": "http"}}, "monitoring": {"kind": "PodMonitor"}},
        {"workersMode": "front", "service": {"type": "LoadBalancer"}, "admin": {"port": -1, "expose": True}},
        {"gpu": {"enabled": True, "count": 2}, "ports": {"http": 9000, "grpc": 9001, "metrics": 9002}},
    ):
        kinds = by_kind(render(helm, values_file(tmp_path, given)))
        validate([d for docs in kinds.values() for d in docs])
    keda = by_kind(render(helm, values_file(tmp_path, {"autoscaling": {"mode": "keda"}})))
    assert "ScaledObject" in keda and "HorizontalPodAutoscaler" not in keda


@pytest.mark.parametrize(
    "section, key, value, owner",
    [
        ("server", "http_port", 9000, "ports.http"),
        ("server", "grpc_port", 9001, "ports.grpc"),
        ("server", "metrics_port", 9002, "ports.metrics"),
        ("server", "host", "127.0.0.1", "bindAddress"),
        ("repository", "model_repository", "/data", "modelRepository"),
    ],
)
def test_a_listener_or_the_repository_in_config_is_refused_not_dropped(helm, tmp_path, section, key, value, owner):
    """The chart writes these itself; given in `config` they had been dropped without a word (the
    pod kept port 8000 while the user's values said 9000). Refused like the chart's other settings."""
    out = template(helm, values_file(tmp_path, {"config": {section: {key: value}}}))
    assert out.returncode != 0, f"config.{section}.{key} was rendered and dropped"
    assert f"config.{section}.{key} is set by the chart: use the value {owner}" in out.stderr


@pytest.mark.parametrize("value, renders", [(0.5, False), (1, False), (0, True), (2, True), (60, True)])
def test_a_setting_that_is_off_at_0_or_at_least_a_bound_is_judged_at_render(helm, tmp_path, value, renders):
    """drift_detector_hang_s is 0 (never) or at least 2: the chart took 0.5 (its schema said only
    "at least 0") and the pod then failed at start, again and again."""
    out = template(helm, values_file(tmp_path, {"drift": {"detector": {"drift_detector_hang_s": value}}}))
    assert (out.returncode == 0) == renders, out.stderr
    if not renders:
        assert "drift_detector_hang_s" in out.stderr, out.stderr


def test_the_other_settings_of_those_sections_still_pass_through(helm, tmp_path):
    given = {"config": {"server": {"exit_timeout_s": 40}, "repository": {"model_control_mode": "explicit"}}}
    config = yaml.safe_load(
        by_kind(render(helm, values_file(tmp_path, given)))["ConfigMap"][0]["data"]["batchgate.yaml"]
    )
    assert config["server"]["exit_timeout_s"] == 40 and config["server"]["http_port"] == 8000
    assert config["repository"] == {"model_repository": "/models", "model_control_mode": "explicit"}


def test_a_metrics_key_without_the_scrape_authorization_is_refused(helm, tmp_path):
    """auth.metricsRequiresKey with keys makes /metrics answer 401 without one: a ServiceMonitor
    without monitoring.authorization had rendered, Prometheus scraped 401s, and the HPA (or KEDA)
    and every alert went blind on batchgate_queue_depth."""
    key = {"id": "web", "sha256": "ab" * 32, "scopes": ["infer", "read"]}
    given = {"auth": {"apiKeys": {"keys": [key]}, "metricsRequiresKey": True}}
    out = template(helm, values_file(tmp_path, given))
    assert out.returncode != 0 and "set monitoring.authorization" in out.stderr, out.stderr
    bearer = {"type": "Bearer", "credentials": {"name": "scrape", "key": "token"}}
    monitor = by_kind(render(helm, values_file(tmp_path, {**given, "monitoring": {"authorization": bearer}})))
    assert monitor["ServiceMonitor"][0]["spec"]["endpoints"][0]["authorization"] == bearer
    by_kind(render(helm, values_file(tmp_path, {**given, "monitoring": {"enabled": False}})))
    by_kind(render(helm, values_file(tmp_path, given), api_versions=[]))  # no Prometheus Operator: no monitor


@pytest.mark.parametrize(
    "given, message",
    [
        ({"ports": {"metrics": 8001}}, "ports.grpc and ports.metrics are both port 8001"),
        ({"ports": {"http": 8005}}, "admin.httpPort and ports.http are both port 8005"),
        (
            {"tls": {"enabled": True, "existingSecret": "gw-tls"}, "ports": {"health": 8003}},
            "admin.port and ports.health are both port 8003",
        ),
    ],
)
def test_two_listeners_on_one_port_are_refused(helm, tmp_path, given, message):
    """Two listeners on one port had rendered; the server then stopped at start, address in use
    (a crash loop), after a probe had named the port of the other listener."""
    out = template(helm, values_file(tmp_path, given))
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_a_port_shared_with_a_listener_that_is_off_renders(helm, tmp_path):
    by_kind(render(helm, values_file(tmp_path, {"ports": {"health": 8003}})))  # no TLS: no health port
    by_kind(render(helm, values_file(tmp_path, {"admin": {"port": -1, "httpPort": -1}, "ports": {"metrics": 8003}})))


def test_a_grace_period_shorter_than_the_drain_is_refused(helm, tmp_path):
    """values.yaml: terminationGracePeriodSeconds "must be longer than both together" (preStop and
    exit_timeout_s); a shorter one had rendered, and the kubelet killed pods mid-drain."""
    for grace in (5, 40):  # preStop 10 + exit_timeout_s 30
        out = template(helm, values_file(tmp_path, {"terminationGracePeriodSeconds": grace}))
        assert out.returncode != 0 and f"terminationGracePeriodSeconds {grace}: must be longer" in out.stderr
    given = {"terminationGracePeriodSeconds": 41}
    pod = by_kind(render(helm, values_file(tmp_path, given)))["Deployment"][0]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 41
    given = {"terminationGracePeriodSeconds": 60, "config": {"server": {"exit_timeout_s": 55}}}
    assert "(65)" in template(helm, values_file(tmp_path, given)).stderr


def test_extra_environment_variables_reach_the_container_and_the_charts_own_are_refused(helm, tmp_path):
    """There was no way to give the container an environment variable (OMP_NUM_THREADS, a
    credential from a Secret): the schema refuses unknown keys. extraEnv takes EnvVar entries;
    the variables the chart sets itself are refused, naming the values to set instead."""
    extra = [
        {"name": "OMP_NUM_THREADS", "value": "2"},
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "id"}}},
    ]
    docs = render(helm, values_file(tmp_path, {"extraEnv": extra}))
    validate(docs)
    (deployment,) = by_kind(docs)["Deployment"]
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env[-2:] == extra and env[0]["name"] == "BATCHGATE_HOST"
    for given, words in (
        ([{"name": "BATCHGATE_HOST", "value": "::"}], "extraEnv: BATCHGATE_HOST is set by the chart"),
        ([{"name": "X", "value": 2}], "/extraEnv/0/value"),
        ([{"value": "a"}], "name"),
    ):
        out = template(helm, values_file(tmp_path, {"extraEnv": given}))
        assert out.returncode != 0 and words in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BATCHGATE_HTTP_PORT", "ports.http"),
        ("BATCHGATE_HEALTH_PORT", "ports.health"),
        ("BATCHGATE_TLS_CERT_FILE", "tls.existingSecret"),
        ("BATCHGATE_API_KEYS_FILE", "auth.apiKeys"),
        ("BATCHGATE_WORKERS", "workers"),
    ],
)
def test_an_extra_variable_for_a_setting_the_chart_owns_is_refused(helm, tmp_path, variable, value):
    """batchgate ranks its environment above its config: BATCHGATE_HTTP_PORT in extraEnv moved the
    listener off the port the probes and the Service use (the pod never became ready)."""
    out = template(helm, values_file(tmp_path, {"extraEnv": [{"name": variable, "value": "9000"}]}))
    assert out.returncode != 0
    assert f"extraEnv: {variable} sets" in out.stderr and f"from the value {value}" in out.stderr, out.stderr


@pytest.mark.parametrize("variable", ["BATCHGATE_EXIT_TIMEOUT_S", "BATCHGATE_EXIT_TIMEOUT_SECS"])
def test_an_extra_variable_for_the_drain_time_is_refused(helm, tmp_path, variable):
    """terminationGracePeriodSeconds is computed from config.server.exit_timeout_s, and batchgate
    ranks its environment above its config: until 2026-12-06 BATCHGATE_EXIT_TIMEOUT_S=120 in
    extraEnv rendered a grace period of 50 s, so the kubelet killed every drain after 50 s."""
    extra = [{"name": variable, "value": "120"}]
    environ = {variable: "120", "BATCHGATE_MODEL_REPOSITORY": str(tmp_path)}
    assert load_settings(None, environ=environ).server.exit_timeout_s == 120  # it does take over
    out = template(helm, values_file(tmp_path, {"extraEnv": extra}))
    assert out.returncode != 0
    assert f"extraEnv: {variable} sets server.exit_timeout_s" in out.stderr, out.stderr
    assert "config.server.exit_timeout_s" in out.stderr
    given = {"config": {"server": {"exit_timeout_s": 120}}}  # the way that works: the grace follows it
    pod = by_kind(render(helm, values_file(tmp_path, given)))["Deployment"][0]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 10 + 120 + 10


def test_an_extra_variable_for_another_setting_passes(helm, tmp_path):
    given = [{"name": "BATCHGATE_MAX_QUEUE_SIZE", "value": "9"}]
    (deployment,) = by_kind(render(helm, values_file(tmp_path, {"extraEnv": given})))["Deployment"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["env"][-1] == given[0]
