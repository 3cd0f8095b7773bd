"""Drift monitoring in the Helm chart, checked without a cluster: the monitors (drift.monitors)
reach batchgate's config file, the reference profiles (drift.profiles) a ConfigMap mounted where
the monitors look for them, the detector's files (drift.detector) the state volume, and the drift
alerts a group of the chart's PrometheusRule. Every variant is linted and rendered by the real
helm binary and validated as the chart's other tests do; the config is loaded by batchgate's own
settings loader; and a real `batchgate serve` runs on the files laid out as the pod has them,
scores drift windows and exports every series the alerts ask for, with the labels they group by."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml
from helm_support import by_kind, exported_series, lint, render, template, validate
from prometheus_client.parser import text_string_to_metric_families

from batchgate.config import load_settings
from batchgate.core.drift import build_profile, build_tensor
from batchgate.core.drift_monitors import _MONITOR_FIELDS, Webhook, parse_monitors
from batchgate.core.errors import ConfigError
from batchgate.demo import _save, classifier_model
from batchgate.drift_profile import run_local
from batchgate.monitoring.drift import read_profile
from batchgate.monitoring.metrics import FAMILIES
from drift_support import wait_until
from processes import Proc

PROFILES_DIR = "/etc/batchgate-drift-profiles"
STATE = "/var/lib/batchgate"
MONITOR = {
    "model": "fraud",
    "inputs": ["features"],
    "reference": f"{PROFILES_DIR}/fraud.json",
    "sample_rate": 1.0,
    "window": {"samples": 50, "max_s": 60},
    "tests": ["psi", "ks", "adwin"],
    "alpha": 0.01,
    "correction": "bonferroni",
    "psi_threshold": 0.2,
    "min_drifted_features": 1,
    "debounce_windows": 2,
    "outputs": True,
    "webhook": {"url": "http://127.0.0.1:9/trigger", "format": "cloudevents", "timeout_s": 1, "retries": 0},
}
DRIFT_ALERTS = {
    "BatchgateDriftDetected",
    "BatchgateDriftFeatureDetections",
    "BatchgateDriftSamplesDropped",
    "BatchgateDriftDetectorDown",
    "BatchgateDriftEventsUndelivered",
    "BatchgateDriftDataQuality",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Model 'fraud' (features FP32 [-1, 4] -> probabilities [-1, 3]) in a repository, and its
    reference profile as `batchgate drift profile` makes it (inputs and the model's outputs)."""
    root = tmp_path_factory.mktemp("drift-chart")
    repo = root / "models"
    _save(classifier_model(), str(repo), "fraud", config="max_batch_size: 64\n")
    x = np.random.default_rng(0).standard_normal((2000, 4)).astype(np.float32)
    outputs = run_local(str(repo), "fraud", {"features": x})
    profile = build_profile(
        "fraud",
        {"features": build_tensor("features", x)},
        {"probabilities": build_tensor("probabilities", outputs["probabilities"])},
        {"rows": len(x)},
    )
    return {"repo": repo, "profile": profile.to_json()}


def drift_values(built: dict) -> dict:
    return {
        "drift": {
            "monitors": [MONITOR],
            "profiles": {"fraud.json": json.dumps(built["profile"])},
            "detector": {"drift_queue_samples": 2048, "drift_event_source": "/batchgate/chart-test"},
        },
        "alerts": {
            "labels": {"release": "prometheus"},
            "drift": {"detected": {"for": "20m"}, "samplesDropped": {"share": 0.1}},
        },
    }


def values(tmp_path: Path, given: dict, name: str = "values") -> Path:
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(given))
    return f


def rendered(helm, tmp_path, given: dict, name: str = "values"):
    kinds = by_kind(render(helm, values(tmp_path, given, name)))
    maps = {m["metadata"]["name"]: m for m in kinds["ConfigMap"]}
    pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
    config = yaml.safe_load(maps["rel-batchgate"]["data"]["batchgate.yaml"])
    return kinds, maps, pod, config


def refused(helm, tmp_path, given: dict) -> str:
    out = template(helm, values(tmp_path, given, "refused"))
    assert out.returncode != 0, "rendered, but should have been refused"
    return out.stderr


def load(config: dict, tmp_path: Path, repo: Path | None = None):
    """batchgate's settings loader on the config the chart wrote (a real folder as the model
    repository): no error and no deprecation warning."""
    cfg = dict(config, repository={**config["repository"], "model_repository": str(repo or tmp_path)})
    f = tmp_path / "batchgate.yaml"
    f.write_text(yaml.safe_dump(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_settings(str(f), environ={})


def drift_rules(kinds: dict) -> dict[str, dict]:
    (rule,) = kinds["PrometheusRule"]
    groups = [g for g in rule["spec"]["groups"] if g["name"].endswith("-drift")]
    return {r["alert"]: r for g in groups for r in g["rules"]}


@pytest.mark.parametrize(
    "variant",
    ["chart-profiles", "existing-profiles-and-claim", "state-off"],
)
def test_lint_render_and_validate_with_drift(helm, tmp_path, built, variant):
    given = drift_values(built)
    if variant == "existing-profiles-and-claim":
        given["drift"]["profiles"] = {}
        given["drift"]["existingProfilesConfigMap"] = "fraud-profiles"
        given["state"] = {"existingClaim": "batchgate-state"}
    elif variant == "state-off":
        given["state"] = {"enabled": False}
    f = values(tmp_path, given, variant)
    lint(helm, f)
    docs = render(helm, f)
    validate(docs)  # Kubernetes' schemas (strict); the PrometheusRule against its CRD's fields
    kinds = by_kind(docs)
    assert set(drift_rules(kinds)) == DRIFT_ALERTS
    assert load(rendered(helm, tmp_path, given, variant)[3], tmp_path).drift[0].model == "fraud"


def test_the_config_carries_the_monitors_and_the_detector_settings(helm, tmp_path, built):
    _, _, _, config = rendered(helm, tmp_path, drift_values(built))
    assert config["drift"] == [MONITOR]  # as given, at the top level
    assert config["drift_detector"] == {
        "drift_queue_samples": 2048,
        "drift_event_source": "/batchgate/chart-test",
        "drift_profiles_dir": f"{STATE}/drift-profiles",  # on the state volume: kept across restarts
        "drift_dead_letter_file": f"{STATE}/drift-dead-letter.jsonl",
    }
    assert "routing" not in config  # drift alone sets no route settings
    s = load(config, tmp_path)  # parses the monitors; the profile files are read only at serve
    (m,) = s.drift
    assert (m.model, m.inputs, m.reference) == ("fraud", ("features",), f"{PROFILES_DIR}/fraud.json")
    assert (m.sample_rate, m.window_samples, m.window_max_s, m.tests) == (1.0, 50, 60, ("psi", "ks", "adwin"))
    assert (m.alpha, m.correction, m.psi_threshold, m.debounce_windows, m.outputs) == (
        0.01,
        "bonferroni",
        0.2,
        2,
        True,
    )
    assert m.webhook is not None and m.webhook.format == "cloudevents" and m.webhook.retries == 0
    d = s.drift_detector
    assert d.drift_queue_samples == 2048 and d.drift_event_source == "/batchgate/chart-test"
    assert d.drift_profiles_dir == f"{STATE}/drift-profiles"
    assert d.drift_dead_letter_file == f"{STATE}/drift-dead-letter.jsonl"


def test_the_detector_files_follow_the_state_volume_and_the_values(helm, tmp_path, built):
    given = drift_values(built)
    given["state"] = {"existingClaim": "batchgate-state"}
    _, _, pod, config = rendered(helm, tmp_path, given, "claim")
    c = pod["containers"][0]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["state"]["mountPath"] == STATE and mounts["state"]["subPathExpr"] == "$(POD_NAME)"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in c["env"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "batchgate-state"
    assert config["drift_detector"]["drift_profiles_dir"].startswith(STATE + "/")

    # without the state volume: no state mount, and the detector keeps them in memory
    given["state"] = {"enabled": False}
    _, _, pod, config = rendered(helm, tmp_path, given, "no-state")
    assert "state" not in {v["name"] for v in pod["volumes"]}
    assert "drift_profiles_dir" not in config["drift_detector"]
    assert "drift_dead_letter_file" not in config["drift_detector"]

    # drift.detector wins over the chart's defaults ("" = in memory)
    given = drift_values(built)
    given["drift"]["detector"] = {"drift_dead_letter_file": "", "drift_profiles_dir": "/var/lib/batchgate/p"}
    _, _, _, config = rendered(helm, tmp_path, given, "over")
    s = load(config, tmp_path)
    assert (s.drift_detector.drift_dead_letter_file, s.drift_detector.drift_profiles_dir) == (
        "",
        "/var/lib/batchgate/p",
    )


def test_the_profiles_configmap_is_mounted_where_the_monitors_look(helm, tmp_path, built):
    kinds, maps, pod, config = rendered(helm, tmp_path, drift_values(built))
    profiles = maps["rel-batchgate-drift-profiles"]
    assert set(profiles["data"]) == {"fraud.json"}
    assert json.loads(profiles["data"]["fraud.json"]) == built["profile"]
    c = pod["containers"][0]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "drift-profiles"]
    assert mount == {"name": "drift-profiles", "mountPath": PROFILES_DIR, "readOnly": True}  # whole, no subPath
    (volume,) = [v for v in pod["volumes"] if v["name"] == "drift-profiles"]
    assert volume["configMap"]["name"] == profiles["metadata"]["name"]
    for monitor in config["drift"]:
        folder, name = monitor["reference"].rsplit("/", 1)
        assert folder == mount["mountPath"] and name in profiles["data"]
    # as the kubelet writes it, the file is a profile batchgate reads
    (tmp_path / "fraud.json").write_text(profiles["data"]["fraud.json"])
    profile = read_profile(str(tmp_path / "fraud.json"))
    assert profile.model == "fraud" and set(profile.inputs) == {"features"}

    # a profile given as a map is written as its JSON
    given = drift_values(built)
    given["drift"]["profiles"] = {"fraud.json": built["profile"]}
    _, maps_as_map, _, _ = rendered(helm, tmp_path, given, "as-map")
    assert json.loads(maps_as_map["rel-batchgate-drift-profiles"]["data"]["fraud.json"]) == built["profile"]

    # the server reads profiles at start: a changed profile rolls the pods (the config does not change)
    def checksums(k):
        a = k["Deployment"][0]["spec"]["template"]["metadata"]["annotations"]
        return a["checksum/config"], a["checksum/drift-profiles"]

    changed = drift_values(built)
    changed["drift"]["profiles"]["fraud.json"] = json.dumps(dict(built["profile"], source={"rows": 1}))
    again = by_kind(render(helm, values(tmp_path, changed, "changed")))
    assert checksums(again)[0] == checksums(kinds)[0] and checksums(again)[1] != checksums(kinds)[1]

    # an existing ConfigMap is mounted the same way, and the chart makes none
    given = drift_values(built)
    given["drift"]["profiles"] = {}
    given["drift"]["existingProfilesConfigMap"] = "fraud-profiles"
    kinds, maps, pod, _ = rendered(helm, tmp_path, given, "existing")
    assert set(maps) == {"rel-batchgate"}
    (volume,) = [v for v in pod["volumes"] if v["name"] == "drift-profiles"]
    assert volume["configMap"] == {"name": "fraud-profiles"}
    assert "checksum/drift-profiles" not in kinds["Deployment"][0]["spec"]["template"]["metadata"]["annotations"]


_MATCHER = re.compile(r'\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=|!=|=~|!~)\s*"[^"\\]*"\s*')
_DURATION = re.compile(r"([0-9]+(ms|s|m|h|d|w|y))+")


def promql_problems(expr: str) -> list[str]:
    """What makes ``expr`` not look like PromQL: unbalanced brackets, a selector that is not a
    list of label matchers, a range that is not a duration, a grouping that is not label names,
    no comparison with a number at the end."""
    problems = []
    pairs, stack = {")": "(", "}": "{", "]": "["}, []
    for ch in expr:
        if ch in "({[":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            problems.append(f"unbalanced {ch}")
    if stack:
        problems.append(f"unclosed {''.join(stack)}")
    for selector in re.findall(r"\{([^}]*)\}", expr):
        if not all(_MATCHER.fullmatch(m) for m in selector.split(",")):
            problems.append(f"selector {{{selector}}}")
    for rng in re.findall(r"\[([^\]]*)\]", expr):
        if not _DURATION.fullmatch(rng):
            problems.append(f"range [{rng}]")
    for labels in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        if not all(re.fullmatch(r"\s*[a-zA-Z_][a-zA-Z0-9_]*\s*", x) for x in labels.split(",")):
            problems.append(f"by ({labels})")
    if not re.search(r"(==|!=|>=|<=|>|<)\s*[0-9.]+$", expr):
        problems.append("no comparison with a number at the end")
    return problems


def test_the_prometheus_rule_has_the_drift_alerts(helm, tmp_path, built):
    kinds, _, _, _ = rendered(helm, tmp_path, drift_values(built))
    (rule,) = kinds["PrometheusRule"]  # the chart's one rule, extended with a group
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert [g["name"] for g in rule["spec"]["groups"]] == ["rel-batchgate", "rel-batchgate-slo", "rel-batchgate-drift"]
    rules = drift_rules(kinds)
    assert set(rules) == DRIFT_ALERTS
    exported = exported_series()
    selector = 'namespace="serving",service="rel-batchgate"'
    for name, r in rules.items():
        expr = r["expr"]
        assert not promql_problems(expr), (name, expr, promql_problems(expr))
        used = set(re.findall(r"batchgate_[a-z_]+", expr))
        assert used and used <= exported, (name, used - exported)
        assert selector in expr  # this release's series only
        assert r["labels"]["severity"] in {"warning", "info"}
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        # a grouping keeps labels the series have
        for labels in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for series in used:
                family = FAMILIES[series.removesuffix("_total")]
                assert {x.strip() for x in labels.split(",")} <= set(family.labels), (name, labels)

    detected = rules["BatchgateDriftDetected"]
    assert detected["expr"] == f"max by (model) (batchgate_drift_active{{{selector}}}) == 1"
    assert detected["for"] == "20m" and detected["labels"]["severity"] == "warning"  # values
    assert "{{ $labels.model }}" in detected["annotations"]["summary"]
    assert "batchgate_drift_detected" in detected["annotations"]["description"]  # per feature
    detections = rules["BatchgateDriftFeatureDetections"]
    assert "increase(batchgate_drift_detections_total{" in detections["expr"] and "[1h]" in detections["expr"]
    assert detections["expr"].endswith("> 0") and detections["labels"]["severity"] == "info"
    assert "for" not in detections
    dropped = rules["BatchgateDriftSamplesDropped"]["expr"]
    assert 'outcome="dropped"}[10m]' in dropped and dropped.endswith(" > 0.1") and " / " in dropped
    assert rules["BatchgateDriftDetectorDown"]["expr"].endswith("== 0")
    assert rules["BatchgateDriftDetectorDown"]["for"] == "5m"
    assert rules["BatchgateDriftEventsUndelivered"]["expr"].startswith("batchgate_drift_dead_letter_events{")
    assert rules["BatchgateDriftEventsUndelivered"]["for"] == "15m"
    quality = rules["BatchgateDriftDataQuality"]
    assert quality["expr"].startswith("max by (model, feature, kind) (batchgate_drift_quality_alarm{")
    assert quality["for"] == "15m"

    # alerts.drift.enabled false: the chart's other alerts only
    given = drift_values(built)
    given["alerts"]["drift"]["enabled"] = False
    kinds, _, _, _ = rendered(helm, tmp_path, given, "no-drift-alerts")
    assert [g["name"] for g in kinds["PrometheusRule"][0]["spec"]["groups"]] == ["rel-batchgate", "rel-batchgate-slo"]


def test_nothing_drift_renders_by_default(helm, tmp_path, built):
    for name, given in {
        "default": {},
        # alerts and a state volume (routes) on, still no drift without monitors
        "routes": {"routes": {"existingConfigMap": "routes"}, "alerts": {"enabled": True}},
    }.items():
        docs = render(helm, values(tmp_path, given, name))
        assert "drift" not in yaml.safe_dump_all(docs).lower(), name
        kinds = by_kind(docs)
        assert [m["metadata"]["name"] for m in kinds["ConfigMap"]] == ["rel-batchgate"]
        assert [g["name"] for g in kinds["PrometheusRule"][0]["spec"]["groups"]] == [
            "rel-batchgate",
            "rel-batchgate-slo",
        ]
        pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
        assert ("state" in {v["name"] for v in pod["volumes"]}) == (name == "routes")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda v: v["drift"].update(existingProfilesConfigMap="p"),
            "drift: give profiles or existingProfilesConfigMap, not both",
        ),
        (
            lambda v: v["drift"]["monitors"][0].update(reference=f"{PROFILES_DIR}/other.json"),
            'drift.profiles has no "other.json"',
        ),
        (lambda v: v["drift"].update(profiles={}), "no profiles are mounted there"),
        (lambda v: v["drift"].update(profiles={"a/b.json": "{}"}), "cannot name a file of a ConfigMap"),
        (lambda v: v["drift"].update(profiles={"fraud.json": "x" * (1024 * 1024 + 1)}), "more than a ConfigMap holds"),
        (
            lambda v: v.update(config={"drift": [MONITOR]}),
            "config.drift: give drift monitors in the value drift.monitors",
        ),
        (
            lambda v: v.update(config={"drift_detector": {"drift_queue_samples": 1}}),
            "config.drift_detector: give these settings in the value drift.detector",
        ),
    ],
)
def test_drift_values_that_cannot_work_are_refused_at_render(helm, tmp_path, built, change, message):
    given = copy.deepcopy(drift_values(built))
    change(given)
    assert message in refused(helm, tmp_path, given)


def test_the_schemas_monitor_has_the_fields_batchgate_reads():
    """values.schema.json's drift monitor names the fields batchgate reads, no more and no fewer."""
    import helm_support

    schema = json.loads((helm_support.CHART / "values.schema.json").read_text())["definitions"]["driftMonitor"]
    assert set(schema["properties"]) == _MONITOR_FIELDS
    assert set(schema["properties"]["window"]["properties"]) == {"samples", "max_s", "min_samples"}
    assert set(schema["properties"]["webhook"]["properties"]) == {f.name for f in dataclasses.fields(Webhook)}


@pytest.mark.parametrize(
    "change",
    [
        {"inputs": None},
        {"inputs": []},
        {"model": "fraud detector"},
        {"sampleRate": 0.5},
        {"sample_rate": 2},
        {"tests": ["psi", "kl"]},
        {"window": {"samples": 5}},
        {"window": {"size": 100}},
        {"correction": "holm"},
        {"outputs": "yes"},
        {"alpha": 0},
        {"debounce_windows": 0},
        {"max_rows_per_sample": 1.5},
        {"webhook": {"url": "ftp://retrain.example/trigger"}},
        {"webhook": {"url": "http://retrain.example/trigger", "format": "xml"}},
        {"webhook": {"url": "http://retrain.example/trigger", "retries": 1000}},
    ],
)
def test_a_monitor_batchgate_would_refuse_is_refused_at_render(helm, tmp_path, built, change):
    """A monitor batchgate refuses stops every pod at start: until 2026-12-06 the chart rendered
    any monitor (a misspelt field, an unknown test, a rate of 2), and the pods crash-looped. The
    schema now reads a monitor as batchgate does, naming the monitor that is wrong."""
    monitor = {k: v for k, v in {**MONITOR, **change}.items() if v is not None}
    with pytest.raises(ConfigError):
        parse_monitors([monitor])
    given = copy.deepcopy(drift_values(built))
    given["drift"]["monitors"] = [monitor]
    err = refused(helm, tmp_path, given)
    assert "/drift/monitors/0" in err, err


def test_two_monitors_of_one_model_are_refused_at_render(helm, tmp_path, built):
    monitors = [MONITOR, {"model": "fraud", "inputs": ["other"], "reference": "/models/fraud/p.json"}]
    with pytest.raises(ConfigError):
        parse_monitors(monitors)  # batchgate refuses it at start
    given = copy.deepcopy(drift_values(built))
    given["drift"]["monitors"] = monitors
    assert 'drift.monitors[1]: model "fraud" has a monitor already' in refused(helm, tmp_path, given)


def test_every_kind_of_monitor_batchgate_takes_renders(helm, tmp_path, built):
    monitors = [
        MONITOR,
        {"model": "m2", "inputs": "features", "reference": "/models/m2/profile.json", "window": None},
        {"model": "m3", "inputs": ["a", "b"], "reference": "/models/m3.json", "tests": ["chi2"], "webhook": None,
         "min_drifted_share": 0.5, "adwin_delta": 0.001, "unseen_max": 1, "max_rows_per_sample": 65536},
    ]  # fmt: skip
    parse_monitors(monitors)
    given = copy.deepcopy(drift_values(built))
    given["drift"]["monitors"] = monitors
    config = yaml.safe_load(by_kind(render(helm, values(tmp_path, given)))["ConfigMap"][0]["data"]["batchgate.yaml"])
    assert [m.model for m in parse_monitors(config["drift"])] == ["fraud", "m2", "m3"]


def test_batchgate_serves_drift_from_the_files_the_pod_has(helm, tmp_path, built):
    """`batchgate serve` with the chart's config, every path moved under a folder laid out as the
    pod's mounts (the profiles ConfigMap, an empty state volume): the monitor starts on the
    mounted profile, the detector keeps its files on the state volume, and a scored window
    exports every series the drift alerts ask for, with the labels they group by."""
    kinds, maps, pod, config = rendered(helm, tmp_path, drift_values(built))
    root = tmp_path / "pod"
    for m in pod["containers"][0]["volumeMounts"]:
        (root / m["mountPath"].lstrip("/")).mkdir(parents=True, exist_ok=True)
    for name, text in maps["rel-batchgate-drift-profiles"]["data"].items():
        (root / PROFILES_DIR.lstrip("/") / name).write_text(text)

    def moved(path: str) -> str:
        return str(root) + path if path.startswith((PROFILES_DIR + "/", STATE + "/")) else path

    cfg = dict(
        config,
        server={
            **config["server"],
            **{"host": "127.0.0.1", "http_port": 0, "grpc_port": 0, "metrics_port": 0},
            **{"admin_port": -1, "admin_http_port": -1},
        },
        repository={**config["repository"], "model_repository": str(built["repo"])},
        drift_detector={k: moved(v) if isinstance(v, str) else v for k, v in config["drift_detector"].items()},
        drift=[dict(m, reference=moved(m["reference"])) for m in config["drift"]],
    )
    cfg_file = tmp_path / "batchgate.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    p = Proc(["serve", "--config", str(cfg_file)]).wait_ready()
    try:
        assert (root / "var/lib/batchgate/drift-profiles").is_dir()  # made on the state volume

        def scrape() -> dict[str, list[dict]]:
            """Series name -> the labels of each of its samples."""
            text = urllib.request.urlopen(f"http://127.0.0.1:{p.ports[2]}/metrics", timeout=5).read().decode()
            out: dict[str, list[dict]] = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    out.setdefault(sample.name, []).append(sample.labels)
            return out

        client = httpclient.InferenceServerClient(p.http)
        rng = np.random.default_rng(1)
        for _ in range(6):  # 150 rows: windows of 50
            x = rng.standard_normal((25, 4)).astype(np.float32)
            inp = httpclient.InferInput("features", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.infer("fraud", [inp])
        assert wait_until(lambda: "batchgate_drift_quality_alarm" in scrape(), timeout=60), p.output()
        series = scrape()
        assert series["batchgate_drift_detector_up"]
        (active,) = series["batchgate_drift_active"]
        assert active["model"] == "fraud"
        kinds_of_alarm = {s["kind"] for s in series["batchgate_drift_quality_alarm"]}
        assert kinds_of_alarm and {s["feature"] for s in series["batchgate_drift_detected"]} >= {
            f"features[{i}]" for i in range(4)
        }
        for r in drift_rules(kinds).values():
            for name in set(re.findall(r"batchgate_[a-z_]+", r["expr"])):
                assert series.get(name), (r["alert"], name, sorted(series))
                for labels in re.findall(r"\bby\s*\(([^)]*)\)", r["expr"]):
                    wanted = {x.strip() for x in labels.split(",")}
                    assert all(wanted <= set(s) for s in series[name]), (r["alert"], name, series[name])
        outcomes = {s["outcome"] for s in series["batchgate_drift_samples_total"]}
        assert "dropped" in outcomes  # the series the dropped share divides is there from the start
    finally:
        p.kill()
