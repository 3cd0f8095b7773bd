"""IPv6-only and dual-stack clusters: the chart's ``bindAddress`` ("::") reaches batchgate's
``server.host`` (and the admin listeners' host when exposed), and a real ``batchgate serve`` started
from the rendered config answers every listener, and every probe the Deployment declares, over
``::1`` with tritonclient, on both gRPC engines and with one or two workers. Before the value
existed the chart always wrote 0.0.0.0, which an IPv6-only pod's address never reaches."""

from __future__ import annotations

import pytest
import yaml
from helm_support import by_kind, lint, pod_environment, render, template, validate, values_file

from batchgate.config import settings_in_effect
from batchgate.demo import _save, classifier_model
from listener_support import answers, ipv6_loopback, probe
from processes import Proc, free_port


def _rendered(helm, tmp_path, given: dict):
    docs = render(helm, values_file(tmp_path, given))
    kinds = by_kind(docs)
    config = yaml.safe_load(kinds["ConfigMap"][0]["data"]["batchgate.yaml"])
    return docs, kinds, config


def test_by_default_the_listeners_bind_ipv4_as_before(helm, tmp_path):
    _, kinds, config = _rendered(helm, tmp_path, {})
    assert (config["server"]["host"], config["server"]["admin_host"]) == ("0.0.0.0", "127.0.0.1")
    assert all("ipFamilyPolicy" not in s["spec"] for s in kinds["Service"])


def test_bind_address_reaches_the_config_and_dual_stack_services_render(helm, tmp_path):
    given = {"bindAddress": "::", "service": {"ipFamilyPolicy": "PreferDualStack"}}
    lint(helm, values_file(tmp_path, given))
    docs, kinds, config = _rendered(helm, tmp_path, given)
    validate(docs)
    assert config["server"]["host"] == "::"
    assert config["server"]["admin_host"] == "127.0.0.1"  # loopback unless exposed: every pod has 127.0.0.1
    assert [s["spec"]["ipFamilyPolicy"] for s in kinds["Service"]] == ["PreferDualStack", "PreferDualStack"]
    _, _, exposed = _rendered(helm, tmp_path, {"bindAddress": "::", "admin": {"expose": True}})
    assert exposed["server"]["admin_host"] == "::"


@pytest.mark.parametrize(
    "given, where",
    [
        ({"bindAddress": "10.0.0.7"}, "bindAddress"),  # a pod's address is not known when rendering
        ({"bindAddress": "[::]"}, "bindAddress"),
        ({"service": {"ipFamilyPolicy": "DualStack"}}, "ipFamilyPolicy"),
    ],
)
def test_a_bind_address_other_than_the_two_wildcards_is_refused(helm, tmp_path, given, where):
    out = template(helm, values_file(tmp_path, given))
    assert out.returncode != 0 and where in out.stderr, out.stderr


@pytest.mark.parametrize("image_variant", ["gpu", "cpu"])
def test_the_images_environment_does_not_outrank_bind_address(helm, tmp_path, image_variant):
    """The image sets BATCHGATE_HOST=0.0.0.0 (what `docker run` needs), and batchgate ranks its
    environment above the config file: the chart wrote host "::" in the config, but in a real pod
    the image's variable won and the listeners bound 0.0.0.0, which an IPv6-only pod is not reached
    on. The settings batchgate runs with in the pod (the image's ENV, the container's env, the
    rendered config) must be the config's."""
    given = {"bindAddress": "::", "image": {"variant": image_variant}}
    _, kinds, config = _rendered(helm, tmp_path, given)
    container = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    environment = pod_environment(container, image_variant)
    assert "BATCHGATE_HOST" in environment  # the image's ENV was read (the test can fail)
    f = tmp_path / "batchgate.yaml"
    f.write_text(yaml.safe_dump(config))
    in_pod, _ = settings_in_effect(str(f), environment)
    assert in_pod.server.host == "::"
    assert in_pod == settings_in_effect(str(f), {})[0]  # no other setting of the image's wins either


def test_config_may_not_set_the_host_beside_bind_address(helm, tmp_path):
    out = template(helm, values_file(tmp_path, {"config": {"server": {"host": "::"}}}))
    assert out.returncode != 0 and "config.server.host is set by the chart: use the value bindAddress" in out.stderr


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
@pytest.mark.parametrize("engine, workers", [("h2", 1), ("grpcio", 1), ("h2", 2), ("grpcio", 2)])
def test_a_server_from_the_charts_config_answers_every_listener_and_probe_over_ipv6(helm, tmp_path, engine, workers):
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    admin = {"port": free_port(), "httpPort": free_port(), "expose": True}
    given = {
        "bindAddress": "::",
        "ports": ports,
        "admin": admin,
        "workers": workers,
        "config": {"server": {"grpc_engine": engine}},
        "auth": {"allowOpenAdmin": True},
    }
    docs, kinds, config = _rendered(helm, tmp_path, given)
    validate(docs)
    repo = tmp_path / "models"
    _save(classifier_model(), str(repo), "clf")
    config["repository"]["model_repository"] = str(repo)  # the pod's /models
    health = free_port()
    config["server"]["health_port"] = health  # (the chart sets one with TLS or keys only: its host is the same)
    f = tmp_path / "batchgate.yaml"
    f.write_text(yaml.safe_dump(config))
    p = Proc(["serve", "--config", str(f)]).wait_ready(90)
    try:
        listening = {**ports, "health": health, "admin": admin["port"], "admin_http": admin["httpPort"]}
        for address in ("::1", "127.0.0.1"):  # "::" takes IPv4 too: a dual-stack pod answers both
            assert answers(address, listening) == dict.fromkeys(listening, "ok"), address
        # the kubelet's probes, as the Deployment declares them, sent to the pod's IPv6 address
        container = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
        named = {q["name"]: q["containerPort"] for q in container["ports"]}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container[kind]
            port = (spec.get("grpc") or spec.get("httpGet"))["port"]
            assert probe("::1", named.get(port, port), spec) == "ok", (kind, spec)
    finally:
        p.kill()
