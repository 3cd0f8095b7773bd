"""The value config (and drift.detector) is checked at render against a schema made from batchgate's
own table of settings (tools/chart_config_schema.py): a value `batchgate serve` refuses at start
(max_header_fields 8, log_level verbose, a misspelt setting) is refused by helm naming it, where the
chart had rendered it and the pods crash-looped; every value batchgate takes still renders."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
from helm_support import CHART, ROOT, by_kind, render, template, values_file

from batchgate.config import SETTINGS, load_settings
from batchgate.core.errors import ConfigError
from batchgate.remote_models import REMOTE_FIELDS, parse_remote_model


def _config_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((CHART / "values.schema.json").read_text())
    return jsonschema.Draft7Validator({**schema["definitions"]["config"], "definitions": schema["definitions"]})


def test_the_schema_is_the_one_the_settings_make():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "chart_config_schema.py"), "--check"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_each_settings_default_and_text_form_pass_the_schema():
    """The schema refuses nothing batchgate takes: each setting's default, and the value as text
    (batchgate converts a string to the setting's type), in each spelling."""
    validator = _config_validator()
    for name, spec in SETTINGS.items():
        if not spec.section:
            continue
        default = list(spec.default) if isinstance(spec.default, tuple) else spec.default
        for value in (default, str(spec.default) if spec.kind not in ("list", "str") else default):
            for spelling in (name, name.replace("_", "-"), *spec.aliases):
                errors = list(validator.iter_errors({spec.section: {spelling: value}}))
                assert not errors, (spelling, value, errors[0].message)


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"limits": {"max_header_fields": 8}}, "/config/limits/max_header_fields"),
        ({"limits": {"max-header-fields": 8}}, "/config/limits/max-header-fields"),
        ({"limits": {"max_queue_size": 0}}, "/config/limits/max_queue_size"),
        ({"limits": {"max_queue_size": 2.5}}, "/config/limits/max_queue_size"),
        ({"limits": {"max_queue_size": True}}, "/config/limits/max_queue_size"),
        ({"limits": {"max_tensor_dims": 65}}, "/config/limits/max_tensor_dims"),
        ({"server": {"log_level": "verbose"}}, "/config/server/log_level"),
        ({"server": {"strict_readiness": 1}}, "/config/server/strict_readiness"),
        ({"limits": {"max_queue_sise": 8}}, "max_queue_sise"),
        ({"batching": {"batching_policy": "fifo"}}, "/config/batching/batching_policy"),
    ],
)
def test_a_setting_batchgate_refuses_is_refused_at_render(helm, tmp_path, config, where):
    out = template(helm, values_file(tmp_path, {"config": config}))
    assert out.returncode != 0, f"rendered {config}"
    assert where in out.stderr, out.stderr


def test_a_drift_detector_setting_is_checked_too(helm, tmp_path):
    out = template(helm, values_file(tmp_path, {"drift": {"detector": {"drift_queue_samples": 0}}}))
    assert out.returncode != 0 and "/drift/detector/drift_queue_samples" in out.stderr, out.stderr


def test_values_at_the_bounds_render_and_batchgate_takes_them(helm, tmp_path):
    config = {
        "limits": {"max_header_fields": 16, "max_tensor_dims": "64", "max_queue_size": 1},
        "server": {"log_level": "debug", "strict_readiness": "yes"},
        "observability": {"tracing": False},  # YAML 1.1's off
    }
    kinds = by_kind(render(helm, values_file(tmp_path, {"config": config})))
    text = kinds["ConfigMap"][0]["data"]["batchgate.yaml"]
    (tmp_path / "models").mkdir()
    f = tmp_path / "batchgate.yaml"
    f.write_text(text.replace('"/models"', f'"{tmp_path / "models"}"'))
    s = load_settings(str(f), environ={})
    assert (s.limits.max_header_fields, s.limits.max_tensor_dims, s.server.strict_readiness) == (16, 64, True)
    assert s.observability.tracing == "off"


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "m", "upstream": "h:8001"},  # misspelt
        {"name": "m"},
        {"name": "m x", "upstreams": "h:8001"},
        {"name": "m", "upstreams": "h:8001", "batching": "gatway"},
        {"name": "m", "upstreams": "h:8001", "client": "curl"},
        {"name": "m", "upstreams": "h:8001", "retries": -1},
        {"name": "m", "upstreams": "h:8001", "timeout_s": 0},
        {"name": "m", "upstreams": "h:8001", "tls": 1},
    ],
)
def test_a_remote_model_batchgate_refuses_is_refused_at_render(helm, tmp_path, entry):
    """config.remote_models had no schema: an entry batchgate refuses at start (a misspelt field,
    an unknown batching mode) rendered, and the pods crash-looped."""
    with pytest.raises(ConfigError):
        parse_remote_model(entry, "remote_models")
    out = template(helm, values_file(tmp_path, {"config": {"remote_models": [entry]}}))
    assert out.returncode != 0 and "/config/remote_models/0" in out.stderr, out.stderr


def test_every_kind_of_remote_model_batchgate_takes_passes_the_schema(helm, tmp_path):
    """Each field in each spelling, with its default and its value as text, and the key=value form."""
    validator = _config_validator()
    for name, f in REMOTE_FIELDS.items():
        default = f.default
        for value in {repr(default): default, "text": str(default).lower()}.values():
            entry = {"name": "m", "upstreams": "h:8001", name: value} if name not in ("name", "upstreams") else {}
            if not entry or (name.startswith("tls_") and value) or (name == "token_file" and value):
                continue  # (those need tls, or a file: batchgate's own checks)
            parse_remote_model(entry, "remote_models")  # batchgate takes it
            for spelling in (name, name.replace("_", "-")):
                given = {"name": "m", "upstreams": "h:8001", spelling: value}
                errors = list(validator.iter_errors({"remote_models": [given]}))
                assert not errors, (spelling, value, errors[0].message)
    entries = [
        "name=a upstreams=h:8001,h2:8001 batching=passthrough",
        {"name": "b", "upstreams": ["h:8001", "h2:8001"], "max-inflight": 4, "tls": True, "timeout_s": "2.5"},
        {"name": 7, "upstreams": "h:8001"},
    ]
    for e in entries:
        parse_remote_model(e, "remote_models")
    kinds = by_kind(render(helm, values_file(tmp_path, {"config": {"remote_models": entries}})))
    assert "remote_models" in kinds["ConfigMap"][0]["data"]["batchgate.yaml"]
