"""The other spellings batchgate accepts for a setting (Triton's aliases, dashes for underscores),
given in the value config: the chart renders a config the server takes, with the user's value."""

from __future__ import annotations

import pytest
import yaml
from helm_support import by_kind, render, template, values_file

from batchgate.config import ALIASES, load_settings

SECTION = {"exit_timeout_s": "server", "grpc_max_connection_age_s": "server", "repository_poll_s": "repository"}


def _served(helm, tmp_path, config: dict):
    """The settings batchgate loads from the ConfigMap the chart renders, and the Deployment."""
    kinds = by_kind(render(helm, values_file(tmp_path, {"config": config})))
    text = kinds["ConfigMap"][0]["data"]["batchgate.yaml"]
    (tmp_path / "models").mkdir()  # the pod's /models, which the server checks is a folder
    f = tmp_path / "batchgate.yaml"
    f.write_text(text.replace('"/models"', f'"{tmp_path / "models"}"'))
    return load_settings(str(f), environ={}), kinds["Deployment"][0], yaml.safe_load(text)


@pytest.mark.parametrize("spelling", [*ALIASES, "exit-timeout-s", "grpc-max-connection-age-secs"])
def test_an_alias_or_a_dashed_name_replaces_the_charts_default(helm, tmp_path, spelling):
    """values.yaml gives exit_timeout_s and grpc_max_connection_age_s: a user's exit_timeout_secs
    beside them was two settings for one in the rendered file, which the server refuses at start."""
    name = spelling.replace("-", "_")
    name = ALIASES[name].name if name in ALIASES else name
    section = SECTION[name]
    settings, deployment, written = _served(helm, tmp_path, {section: {spelling: 77}})
    assert getattr(getattr(settings, section), name) == 77
    assert spelling not in written[section] and written[section][name] == 77
    if name == "exit_timeout_s":  # the pod's grace period follows the value given
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 10 + 77 + 10


def test_a_dashed_spelling_of_a_setting_the_chart_owns_is_refused(helm, tmp_path):
    out = template(helm, values_file(tmp_path, {"config": {"server": {"http-port": 9000}}}))
    assert out.returncode != 0
    assert "config.server.http_port is set by the chart: use the value ports.http" in out.stderr
