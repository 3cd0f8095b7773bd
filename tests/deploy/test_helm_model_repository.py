"""Where the pods' model repository (/models) comes from. By default the chart made a claim of its
own, <release>-models: 10Gi ReadOnlyMany, of the default storage class, kept on uninstall. A claim
provisioned that way starts empty and the pods mount it read-only, so nothing could ever fill it
(and most provisioners cannot make ReadOnlyMany volumes at all: the claim, and the pods, stayed
Pending). Now there is no claim unless one is asked for (an existing one, or pvc.create with a
size), an asked-for one is a valid PersistentVolumeClaim, and the values schema refuses a
half-given one (a size without create, create without a size, create beside an existing claim)."""

from __future__ import annotations

import subprocess

import pytest
from helm_support import CHART, by_kind, lint, render, template, validate, values_file


def _models_volume(kinds: dict) -> dict:
    pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/models"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume


def _claims_the_pod_uses(kinds: dict) -> set[str]:
    pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
    return {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}


def test_by_default_no_claim_is_made_and_the_pod_uses_none(helm, tmp_path):
    kinds = by_kind(render(helm, values_file(tmp_path, {})))
    assert "PersistentVolumeClaim" not in kinds
    assert _claims_the_pod_uses(kinds) == set()  # (none it would wait for, Pending, for ever)
    assert "emptyDir" in _models_volume(kinds)  # an empty repository: remote models only


def test_an_existing_claim_is_mounted_and_none_is_made(helm, tmp_path):
    kinds = by_kind(render(helm, values_file(tmp_path, {"modelRepository": {"pvc": {"existingClaim": "models"}}})))
    assert "PersistentVolumeClaim" not in kinds
    assert _models_volume(kinds)["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_an_asked_for_claim_is_a_valid_one_the_pod_mounts(helm, tmp_path):
    pvc = {
        "create": True,
        "size": "20Gi",
        "storageClassName": "filestore",
        "accessModes": ["ReadWriteMany"],
        "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "models-v3"},
    }
    values = values_file(tmp_path, {"modelRepository": {"pvc": pvc}})
    lint(helm, values)
    docs = render(helm, values)
    validate(docs)  # Kubernetes' own schema, strict
    (claim,) = by_kind(docs)["PersistentVolumeClaim"]
    spec = claim["spec"]
    assert spec["resources"]["requests"]["storage"] == "20Gi" and spec["accessModes"] == ["ReadWriteMany"]
    assert spec["storageClassName"] == "filestore" and spec["dataSource"] == pvc["dataSource"]
    assert _models_volume(by_kind(docs))["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # the defaults beside create and a size: ReadOnlyMany, the cluster's default class, no source
    values = values_file(tmp_path, {"modelRepository": {"pvc": {"create": True, "size": "5Gi"}}})
    docs = render(helm, values)
    validate(docs)
    (claim,) = by_kind(docs)["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"] and "storageClassName" not in claim["spec"]
    assert "dataSource" not in claim["spec"]


def test_an_init_container_fills_an_empty_dir_and_no_claim_is_made(helm, tmp_path):
    kinds = by_kind(render(helm, values_file(tmp_path, {"modelRepository": {"source": "initContainer"}})))
    assert "PersistentVolumeClaim" not in kinds and _claims_the_pod_uses(kinds) == set()
    assert _models_volume(kinds)["emptyDir"] == {"sizeLimit": "20Gi"}


def test_the_init_container_has_a_home_it_can_write_unless_env_names_one(helm, tmp_path):
    """The pod runs as a user the fetching image may not know, on a read-only root: its home
    was "/" (the AWS CLI's credential cache and gsutil's state could not be written). HOME is the
    /tmp emptyDir unless the values' env names a HOME of their own."""

    def init_env(given_env: list) -> list:
        mr = {"source": "initContainer", "initContainer": {"env": given_env}}
        docs = render(helm, values_file(tmp_path, {"modelRepository": mr}))
        validate(docs)
        (init,) = by_kind(docs)["Deployment"][0]["spec"]["template"]["spec"]["initContainers"]
        assert {"name": "tmp", "mountPath": "/tmp"} in init["volumeMounts"]
        return init["env"]

    assert init_env([]) == [{"name": "HOME", "value": "/tmp"}]
    region = {"name": "AWS_REGION", "value": "eu-west-1"}
    assert init_env([region]) == [{"name": "HOME", "value": "/tmp"}, region]
    assert init_env([{"name": "HOME", "value": "/work"}, region]) == [{"name": "HOME", "value": "/work"}, region]


@pytest.mark.parametrize(
    "pvc, where",
    [
        ({"create": True}, "size"),  # a claim of no size
        ({"create": True, "size": ""}, "size"),
        ({"create": True, "size": "lots"}, "size"),
        ({"create": True, "size": "10Gi", "existingClaim": "models"}, "existingClaim"),  # which one?
        ({"size": "10Gi"}, "create"),  # a size, but no claim made: the pods would get an empty folder
        ({"storageClassName": "fast"}, "create"),
        ({"dataSource": {"kind": "VolumeSnapshot", "name": "s"}}, "create"),
        ({"create": True, "size": "1Gi", "accessModes": []}, "accessModes"),
        ({"create": True, "size": "1Gi", "accessModes": ["ReadOnly"]}, "accessModes"),
        ({"create": True, "size": "1Gi", "dataSource": {"kind": "VolumeSnapshot"}}, "name"),
        ({"create": "yes", "size": "1Gi"}, "create"),
        ({"storageClass": "fast"}, "storageClass"),  # misspelt: it had been ignored
    ],
)
def test_a_half_given_claim_is_refused_by_the_schema_naming_what(helm, tmp_path, pvc, where):
    out = template(helm, values_file(tmp_path, {"modelRepository": {"pvc": pvc}}))
    assert out.returncode != 0, f"rendered {pvc}"
    assert "modelRepository" in out.stderr and where in out.stderr, out.stderr


def test_a_claim_beside_an_init_container_is_refused(helm, tmp_path):
    for pvc in ({"existingClaim": "models"}, {"create": True, "size": "1Gi"}):
        given = {"modelRepository": {"source": "initContainer", "pvc": pvc}}
        out = template(helm, values_file(tmp_path, given))
        assert out.returncode != 0 and "modelRepository" in out.stderr, (pvc, out.stderr)


def test_the_install_notes_say_when_no_repository_is_mounted(helm, tmp_path):
    def notes(given: dict) -> str:
        values = values_file(tmp_path, given)
        cmd = [helm, "install", "rel", str(CHART), "-f", str(values), "--dry-run=client"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.split("NOTES:", 1)[1]

    assert "No model repository: /models is an empty folder" in notes({})
    assert "No model repository" not in notes({"modelRepository": {"pvc": {"existingClaim": "models"}}})
    assert "No model repository" not in notes({"modelRepository": {"source": "initContainer"}})
