"""System shared memory in the Helm chart, checked without a cluster: sharedMemory.enabled gives the
pod a memory-backed /dev/shm (the volume dshm) mounted in the batchgate container and writes the
config section shared_memory from the values; a client sidecar in extraContainers mounts the same
volume; nothing of it renders by default. Every variant is linted and rendered by the real helm
binary and validated as the chart's other tests do, the config is loaded by batchgate's own
settings loader, and a real `batchgate serve` on the chart's config takes segments named with the
chart's prefix, within the chart's bounds."""

from __future__ import annotations

import copy
import dataclasses
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
import yaml
from helm_support import by_kind, lint, render, template, validate
from tritonclient.utils import InferenceServerException

from batchgate.config import load_settings
from batchgate.demo import _save, classifier_model
from batchgate.settings_sections import SharedMemorySettings
from processes import Proc

CLIENT = {
    "name": "client",
    "image": "registry.example.com/ml/shm-client:1.0",
    "env": [{"name": "BATCHGATE_GRPC", "value": "localhost:8001"}],
    "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
    "securityContext": {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    },
}
ENABLED = {"sharedMemory": {"enabled": True}, "extraContainers": [CLIENT]}
VARIANTS = {
    "default": {},
    "enabled": ENABLED,
    "enabled-tuned": {
        "sharedMemory": {
            "enabled": True,
            "sizeLimit": "2Gi",
            "keyPrefix": "/tenant_",
            "maxRegions": 8,
            "maxBytes": 2147483648,
        },
        "extraContainers": [CLIENT],
        "auth": {"apiKeys": {"existingSecret": "batchgate-keys"}},
        "tls": {"enabled": True, "existingSecret": "batchgate-tls"},
        "modelRepository": {"source": "initContainer"},
    },
    # a sidecar needs no shared memory (a log shipper, say)
    "sidecar-only": {"extraContainers": [{"name": "shipper", "image": "fluent/fluent-bit:3.2"}]},
}
OWNED = {"shm_key_prefix": "keyPrefix", "shm_max_regions": "maxRegions", "shm_max_bytes": "maxBytes"}


def values(tmp_path: Path, given: dict, name: str = "values") -> Path:
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(given))
    return f


def rendered(helm, tmp_path, given: dict, name: str = "values"):
    kinds = by_kind(render(helm, values(tmp_path, given, name)))
    pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
    main = next(m for m in kinds["ConfigMap"] if m["metadata"]["name"] == "rel-batchgate")
    return kinds, pod, yaml.safe_load(main["data"]["batchgate.yaml"])


def refused(helm, tmp_path, given: dict) -> str:
    out = template(helm, values(tmp_path, given, "refused"))
    assert out.returncode != 0, "rendered values that cannot work"
    return out.stderr


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lint_render_and_validate(helm, tmp_path, variant):
    f = values(tmp_path, VARIANTS[variant], variant)
    lint(helm, f)
    validate(render(helm, f))  # Kubernetes' schemas (strict): the volume, the mounts, the sidecar


def test_enabled_mounts_a_memory_backed_dev_shm_and_writes_the_settings(helm, tmp_path):
    kinds, pod, config = rendered(helm, tmp_path, ENABLED)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}
    server, client = pod["containers"]
    assert server["name"] == "batchgate"
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert mounts["/dev/shm"] == {"name": "dshm", "mountPath": "/dev/shm"}  # writable: the server writes outputs
    assert server["securityContext"]["readOnlyRootFilesystem"] is True  # a mount of its own, not the root fs
    assert config["shared_memory"] == {
        "shm_key_prefix": "/batchgate_",
        "shm_max_regions": 64,
        "shm_max_bytes": 1073741824,
    }
    # the values' defaults are batchgate's own
    defaults = SharedMemorySettings()
    assert (defaults.shm_key_prefix, defaults.shm_max_regions, defaults.shm_max_bytes) == (
        "/batchgate_",
        64,
        1073741824,
    )
    # the sidecar, as given, shares the volume and runs as the server's user (the pod's)
    assert client == CLIENT
    assert {"name": "dshm", "mountPath": "/dev/shm"} in client["volumeMounts"]
    assert "runAsUser" not in client["securityContext"] and pod["securityContext"]["runAsUser"] == 10001
    # the config the chart writes is one batchgate accepts
    config["repository"]["model_repository"] = str(tmp_path)
    cfg = tmp_path / "batchgate.yaml"
    cfg.write_text(yaml.safe_dump(config))
    s = load_settings(str(cfg), environ={}).shared_memory
    assert (s.shm_key_prefix, s.shm_max_regions, s.shm_max_bytes) == ("/batchgate_", 64, 1073741824)


def test_tuned_values_reach_the_volume_and_the_config(helm, tmp_path):
    kinds, pod, config = rendered(helm, tmp_path, VARIANTS["enabled-tuned"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    assert config["shared_memory"] == {
        "shm_key_prefix": "/tenant_",
        "shm_max_regions": 8,
        "shm_max_bytes": 2147483648,  # past 32 bits, written whole (not as a float)
    }
    assert "shm_max_bytes: 2147483648" in kinds["ConfigMap"][0]["data"]["batchgate.yaml"]
    # the other volumes and mounts are still there beside it (the projected config, the init container's)
    assert {"config", "models", "tmp", "dshm"} <= set(volumes)
    assert [c["name"] for c in pod["containers"]] == ["batchgate", "client"]
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-models"]
    # from --set too (integers, not floats)
    again = render(helm, values(tmp_path, ENABLED, "set"), "--set", "sharedMemory.maxBytes=4294967296")
    cm = by_kind(again)["ConfigMap"][0]["data"]["batchgate.yaml"]
    assert yaml.safe_load(cm)["shared_memory"]["shm_max_bytes"] == 4294967296


def test_nothing_renders_by_default(helm, tmp_path):
    kinds, pod, config = rendered(helm, tmp_path, {})
    assert "shared_memory" not in config
    assert "dshm" not in {v["name"] for v in pod["volumes"]}
    assert [c["name"] for c in pod["containers"]] == ["batchgate"]
    assert "/dev/shm" not in {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert "dshm" not in yaml.safe_dump(kinds["Deployment"][0])


def test_a_sidecar_renders_without_shared_memory(helm, tmp_path):
    kinds, pod, config = rendered(helm, tmp_path, VARIANTS["sidecar-only"])
    assert pod["containers"][1] == {"name": "shipper", "image": "fluent/fluent-bit:3.2"}
    assert "dshm" not in {v["name"] for v in pod["volumes"]} and "shared_memory" not in config


def test_the_sections_other_settings_pass_through(helm, tmp_path):
    others = [f.name for f in dataclasses.fields(SharedMemorySettings) if f.name not in OWNED]
    if not others:
        pytest.skip("section shared_memory has no setting but those the chart sets")
    given = copy.deepcopy(ENABLED)
    given["config"] = {"shared_memory": {others[0]: 3}}
    _, _, config = rendered(helm, tmp_path, given)
    assert config["shared_memory"][others[0]] == 3
    assert config["shared_memory"]["shm_key_prefix"] == "/batchgate_"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v["sharedMemory"].update(keyPrefix="batchgate_"), 'sharedMemory.keyPrefix "batchgate_"'),
        (lambda v: v["sharedMemory"].update(keyPrefix=""), "an empty one would turn registration off"),
        (lambda v: v["sharedMemory"].update(keyPrefix="/a/b_"), 'sharedMemory.keyPrefix "/a/b_"'),
        # batchgate refuses these at start (a '/' alone, more than 200 after it): the chart had let
        # them through, and the pods crash-looped.
        (lambda v: v["sharedMemory"].update(keyPrefix="/"), 'sharedMemory.keyPrefix "/"'),
        (lambda v: v["sharedMemory"].update(keyPrefix="/" + "k" * 201), "'/' then 1 to 200 of"),
        (lambda v: v["sharedMemory"].update(maxRegions=0), "sharedMemory.maxRegions: a whole number, at least 1"),
        (lambda v: v["sharedMemory"].update(maxBytes="1Gi"), "sharedMemory.maxBytes: a whole number, at least 1"),
        (lambda v: v["sharedMemory"].update(maxBytes=1.5), "sharedMemory.maxBytes: a whole number, at least 1"),
        (
            lambda v: v["sharedMemory"].update(enabled=False),
            "extraContainers[0] (client) mounts the volume dshm, which exists only with sharedMemory.enabled",
        ),
        (
            lambda v: v["extraContainers"][0].update(name="batchgate"),
            "extraContainers[0]: the name batchgate is the server's container",
        ),
        (lambda v: v["extraContainers"].append({"image": "x"}), "extraContainers[1]: a container is a mapping"),
        (
            lambda v: v.update(config={"shared_memory": {"shm_max_regions": 3}}),
            "config.shared_memory.shm_max_regions is set by the chart: use the value sharedMemory.maxRegions",
        ),
        (
            lambda v: v.update(sharedMemory={"enabled": False}, extraContainers=[], config={"shared_memory": {}}),
            "config.shared_memory: shared memory needs sharedMemory.enabled",
        ),
    ],
)
def test_values_that_cannot_work_are_refused_at_render(helm, tmp_path, change, message):
    given = copy.deepcopy(ENABLED)
    change(given)
    assert message in refused(helm, tmp_path, given)


@pytest.mark.parametrize("prefix", ["/k", "/" + "k" * 200])
def test_the_longest_and_shortest_prefixes_render_and_batchgate_takes_them(helm, tmp_path, prefix):
    given = copy.deepcopy(ENABLED)
    given["sharedMemory"].update(keyPrefix=prefix)
    _, _, config = rendered(helm, tmp_path, given)
    (tmp_path / "models").mkdir()
    config["repository"]["model_repository"] = str(tmp_path / "models")
    cfg_file = tmp_path / "batchgate.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    assert load_settings(str(cfg_file), environ={}).shared_memory.shm_key_prefix == prefix


def test_batchgate_serves_shared_memory_with_the_charts_settings(helm, tmp_path):
    """`batchgate serve` on the chart's config (ports on loopback, a real model repository): a
    segment named with the chart's prefix is registered and read and written by an inference; one
    named with batchgate's default prefix is refused, and so is a region past the chart's bounds."""
    prefix = f"/bgchart{uuid.uuid4().hex[:8]}_"
    given = copy.deepcopy(ENABLED)
    given["sharedMemory"].update(keyPrefix=prefix, maxRegions=2, maxBytes=4096)
    _, _, config = rendered(helm, tmp_path, given)
    repo = tmp_path / "models"
    _save(classifier_model(), str(repo), "classifier", config="max_batch_size: 64\n")
    cfg = dict(
        config,
        server={
            **config["server"],
            **{"host": "127.0.0.1", "http_port": 0, "grpc_port": 0, "metrics_port": 0},
            **{"admin_port": -1, "admin_http_port": -1},
        },
        repository={**config["repository"], "model_repository": str(repo)},
    )
    cfg_file = tmp_path / "batchgate.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    made = []

    def segment(key: str, size: int):
        h = shm.create_shared_memory_region(key[1:], key, size)
        made.append(h)
        return h

    p = Proc(["serve", "--config", str(cfg_file)]).wait_ready()
    try:
        c = grpcclient.InferenceServerClient(p.grpc)
        x = np.random.default_rng(1).random((4, 4), dtype=np.float32)
        in_h = segment(f"{prefix}in", x.nbytes)
        out_h = segment(f"{prefix}out", 48)
        shm.set_shared_memory_region(in_h, [x])
        c.register_system_shared_memory("in", f"{prefix}in", x.nbytes)
        c.register_system_shared_memory("out", f"{prefix}out", 48)
        inp = grpcclient.InferInput("features", [4, 4], "FP32")
        inp.set_shared_memory("in", x.nbytes)
        out = grpcclient.InferRequestedOutput("probabilities")
        out.set_shared_memory("out", 48)
        c.infer("classifier", [inp], outputs=[out])
        plain = grpcclient.InferInput("features", [4, 4], "FP32")
        plain.set_data_from_numpy(x)
        want = c.infer("classifier", [plain]).as_numpy("probabilities")
        np.testing.assert_allclose(shm.get_contents_as_numpy(out_h, np.float32, [4, 3]), want, rtol=1e-6)

        other = f"/batchgate_{uuid.uuid4().hex[:8]}"  # batchgate's default prefix: not this server's
        segment(other, 16)
        with pytest.raises(InferenceServerException) as e:
            c.register_system_shared_memory("other", other, 16)
        assert prefix in e.value.message() and "PERMISSION_DENIED" in str(e.value.status())
        segment(f"{prefix}third", 16)
        with pytest.raises(InferenceServerException) as e:
            c.register_system_shared_memory("third", f"{prefix}third", 16)
        assert "(shm_max_regions)" in e.value.message()  # maxRegions: 2
        c.unregister_system_shared_memory()
        segment(f"{prefix}big", 8192)
        with pytest.raises(InferenceServerException) as e:
            c.register_system_shared_memory("big", f"{prefix}big", 8192)
        assert "(shm_max_bytes)" in e.value.message()  # maxBytes: 4096
    finally:
        p.kill()
        for h in made:
            shm.destroy_shared_memory_region(h)
