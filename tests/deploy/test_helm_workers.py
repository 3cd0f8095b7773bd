"""The chart's ``workers`` and ``workersMode`` values: written to the config batchgate reads, the
CPU request checked against the worker count at render time, ``auto`` only with a CPU limit, routes
and drift refused beside several workers; the rendered config starts a real two-worker batchgate."""

from __future__ import annotations

import pytest
import yaml
from helm_support import by_kind, render, template, validate, values_file

from batchgate.config import load_settings
from batchgate.demo import _save, classifier_model
from processes import Proc


def _config(helm, tmp_path, given: dict) -> dict:
    kinds = by_kind(render(helm, values_file(tmp_path, given)))
    main = next(m for m in kinds["ConfigMap"] if m["metadata"]["name"] == "rel-batchgate")
    return yaml.safe_load(main["data"]["batchgate.yaml"])


def _refused(helm, tmp_path, given: dict) -> str:
    out = template(helm, values_file(tmp_path, given))
    assert out.returncode != 0, "rendered values that cannot work"
    return out.stderr


def test_the_default_is_one_worker(helm, tmp_path):
    server = _config(helm, tmp_path, {})["server"]
    assert (server["workers"], server["workers_mode"]) == ("1", "replicate")


def test_workers_reach_the_config_and_a_real_server_starts_from_it(helm, tmp_path):
    given = {"workers": 2, "workersMode": "front", "resources": {"requests": {"cpu": "2", "memory": "4Gi"}}}
    validate(render(helm, values_file(tmp_path, given)))
    config = _config(helm, tmp_path, given)
    assert (config["server"]["workers"], config["server"]["workers_mode"]) == ("2", "front")
    repo = tmp_path / "models"
    _save(classifier_model(), str(repo), "clf")
    config["repository"]["model_repository"] = str(repo)
    for port in ("http_port", "grpc_port", "metrics_port"):
        config["server"][port] = 0
    config["server"].update(host="127.0.0.1", admin_port=-1, admin_http_port=-1)
    f = tmp_path / "batchgate.yaml"
    f.write_text(yaml.safe_dump(config))
    assert load_settings(str(f), environ={}).server.workers == "2"
    p = Proc(["serve", "--config", str(f)])
    try:
        p.wait_ready()
        assert "2 workers serving" in p.output() and '"worker":"model owner"' in p.output()  # JSON logs
    finally:
        p.kill()


@pytest.mark.parametrize("cpu", ["3", "2500m", "3.5"])
def test_a_cpu_request_below_the_workers_is_refused(helm, tmp_path, cpu):
    err = _refused(helm, tmp_path, {"workers": 4, "resources": {"requests": {"cpu": cpu}}})
    assert f"workers 4 needs resources.requests.cpu of at least 4 (it is {cpu})" in err


def test_a_cpu_request_in_millicores_that_holds_them_renders(helm, tmp_path):
    given = {"workers": 4, "resources": {"requests": {"cpu": "4000m"}}}
    assert _config(helm, tmp_path, given)["server"]["workers"] == "4"


@pytest.mark.parametrize("cpu", ["250m", "500m", "0.5"])
def test_one_worker_renders_with_a_request_below_a_core(helm, tmp_path, cpu):
    """The check is about workers sharing too few cores: the default single worker with a small
    request (a quiet service, a test cluster; it may burst, there is no CPU limit) had been refused
    ("workers 1 needs resources.requests.cpu of at least 1"), which no chart before workers did.
    Two workers on one core are still refused."""
    given = {"resources": {"requests": {"cpu": cpu, "memory": "1Gi"}}}
    assert _config(helm, tmp_path, given)["server"]["workers"] == "1"
    err = _refused(helm, tmp_path, {**given, "workers": 2})
    assert f"workers 2 needs resources.requests.cpu of at least 2 (it is {cpu})" in err


def test_auto_needs_a_cpu_limit(helm, tmp_path):
    assert "set resources.limits.cpu" in _refused(helm, tmp_path, {"workers": "auto"})
    given = {"workers": "auto", "resources": {"requests": {"cpu": "4"}, "limits": {"cpu": "4", "memory": "8Gi"}}}
    assert _config(helm, tmp_path, given)["server"]["workers"] == "auto"


@pytest.mark.parametrize("bad", [0, -1, "many", "1.5", 300])
def test_a_bad_worker_count_is_refused(helm, tmp_path, bad):
    err = _refused(helm, tmp_path, {"workers": bad, "resources": {"requests": {"cpu": "400"}}})
    assert "workers" in err and ("from 1 to 256" in err or "at most 256" in err)


def test_a_bad_mode_is_refused_and_routes_render_beside_workers(helm, tmp_path):
    assert "replicate or front" in _refused(helm, tmp_path, {"workersMode": "both"})
    route = {"name": "r", "variants": [{"name": "a", "model": "clf", "weight": 100}]}
    given = {"workers": 2, "routes": {"list": [route]}}
    assert _config(helm, tmp_path, given)["server"]["workers"] == "2"


def test_the_config_may_not_set_what_the_values_own(helm, tmp_path):
    err = _refused(helm, tmp_path, {"config": {"server": {"workers": 4}}})
    assert "workers" in err
