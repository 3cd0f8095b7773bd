"""The Helm chart's security options, checked without a cluster: API keys from a Secret (an
existing one, or one the chart writes holding digests only), TLS from a kubernetes.io/tls Secret
(optionally issued by cert-manager) with mTLS, probes on the plaintext health port, the
NetworkPolicy and the admin port. Every variant is linted and rendered by the real helm binary
and validated as the chart's other tests do; the config the chart writes is loaded by batchgate
with the Secrets laid out on disk as the pod's projected volume lays them out."""

from __future__ import annotations

import datetime
import hashlib
import subprocess
import warnings
from pathlib import Path

import pytest
import yaml
from helm_support import CHART, by_kind, lint, render, template, validate

from batchgate.app import GRPC_SERVICE
from batchgate.config import Settings, load_settings
from batchgate.core.errors import ConfigError
from batchgate.security.auth import parse_keys

TOKEN = "bg-test-token-that-must-never-be-rendered"
DIGEST = hashlib.sha256(TOKEN.encode()).hexdigest()
KEY = {
    "id": "web",
    "sha256": DIGEST.upper(),
    "scopes": ["infer", "read"],
    "models": ["m"],
    "rate_per_s": 50,
    "burst": 100,
}
ISSUER = {"name": "internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
CLIENTS = [
    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "web"}}},
    {"ipBlock": {"cidr": "10.20.0.0/16"}},
]
MONITORING = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]

VARIANTS = {
    "keys-secret": {"auth": {"apiKeys": {"existingSecret": "team-keys", "secretKey": "api.yaml"}}},
    "keys-inline": {
        "auth": {"apiKeys": {"keys": [KEY]}, "auditLog": {"enabled": True}, "metricsRequiresKey": True},
        "monitoring": {"authorization": {"type": "Bearer", "credentials": {"name": "scrape", "key": "token"}}},
    },
    "tls-secret-mtls": {
        "tls": {"enabled": True, "existingSecret": "gw-tls", "clientAuth": True},
        "auth": {"apiKeys": {"existingSecret": "team-keys"}},
    },
    "tls-cert-manager": {
        "tls": {
            "enabled": True,
            "clientAuth": True,
            "clientCASecret": "clients-ca",
            "certManager": {"create": True, "issuerRef": ISSUER, "dnsNames": ["gw.example.com"]},
        },
        "auth": {"apiKeys": {"keys": [KEY]}, "auditLog": {"enabled": True, "existingClaim": "audit"}},
        "networkPolicy": {"enabled": True, "clients": CLIENTS, "metricsFrom": MONITORING},
        "admin": {"expose": True},
    },
    "health-requires-key": {"auth": {"apiKeys": {"keys": [KEY]}, "healthRequiresKey": True}},
    "network-policy": {"networkPolicy": {"enabled": True, "clients": CLIENTS}},
}


def values(tmp_path: Path, given: dict, name: str = "values") -> Path:
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(given))
    return f


def rendered(helm, tmp_path, variant: str):
    kinds = by_kind(render(helm, values(tmp_path, VARIANTS[variant], variant)))
    pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
    config = yaml.safe_load(kinds["ConfigMap"][0]["data"]["batchgate.yaml"])
    return kinds, pod, pod["containers"][0], config


def refused(helm, tmp_path, given: dict, **kw) -> str:
    out = template(helm, values(tmp_path, given, "refused"), **kw)
    assert out.returncode != 0, "rendered, but should have been refused"
    return out.stderr


def projected(pod: dict) -> list[dict]:
    """The sources of the /etc/batchgate volume, which must be mounted whole (no subPath)."""
    c = pod["containers"][0]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/batchgate")
    assert mount["readOnly"] is True and "subPath" not in mount and "subPathExpr" not in mount
    return next(v for v in pod["volumes"] if v["name"] == mount["name"])["projected"]["sources"]


def secret_items(pod: dict) -> dict[str, tuple[str, str]]:
    """Path under /etc/batchgate -> (Secret, key) of every Secret item the pod mounts there."""
    return {
        i["path"]: (s["secret"]["name"], i["key"])
        for s in projected(pod)
        if "secret" in s
        for i in s["secret"]["items"]
    }


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lint_render_and_validate_each_security_option(helm, tmp_path, variant):
    f = values(tmp_path, VARIANTS[variant], variant)
    lint(helm, f)
    docs = render(helm, f)
    validate(docs)
    kinds = by_kind(docs)
    assert ("Certificate" in kinds) == (variant == "tls-cert-manager")
    assert ("NetworkPolicy" in kinds) == ("networkPolicy" in VARIANTS[variant])
    assert len(kinds.get("Secret", [])) == (1 if "keys" in VARIANTS[variant].get("auth", {}).get("apiKeys", {}) else 0)


def test_keys_from_an_existing_secret_are_mounted_as_a_folder(helm, tmp_path):
    kinds, pod, c, config = rendered(helm, tmp_path, "keys-secret")
    assert "Secret" not in kinds  # the chart makes none: the keys are the user's
    assert secret_items(pod) == {"keys/keys.yaml": ("team-keys", "api.yaml")}
    assert config["auth"]["api_keys_file"] == "/etc/batchgate/keys/keys.yaml"
    # a Secret edit must reach the pod and be reloaded there: nothing rolls the pods on it
    assert set(kinds["Deployment"][0]["spec"]["template"]["metadata"]["annotations"]) == {"checksum/config"}
    # no key file, no auth: the server runs open and the config says nothing of keys
    _, pod, _, config = rendered(helm, tmp_path, "network-policy")
    assert secret_items(pod) == {} and "api_keys_file" not in config["auth"]
    assert config["auth"]["allow_open_admin"] is False


def test_inline_keys_become_a_secret_of_digests_only(helm, tmp_path):
    out = template(helm, values(tmp_path, VARIANTS["keys-inline"]))
    assert out.returncode == 0 and TOKEN not in out.stdout
    kinds, pod, c, config = rendered(helm, tmp_path, "keys-inline")
    (secret,) = kinds["Secret"]
    assert secret["metadata"]["name"] == "rel-batchgate-api-keys" and secret["type"] == "Opaque"
    assert list(secret["stringData"]) == ["keys.yaml"]
    keys = yaml.safe_load(secret["stringData"]["keys.yaml"])
    assert keys == {"keys": [dict(KEY, sha256=DIGEST)]}  # the digest, lower-case hex; nothing else
    assert secret_items(pod) == {"keys/keys.yaml": ("rel-batchgate-api-keys", "keys.yaml")}
    assert config["auth"] == {
        "api_keys_file": "/etc/batchgate/keys/keys.yaml",
        "audit_log_file": "/var/log/batchgate/audit.log",
        "allow_open_admin": False,
        "health_requires_key": False,
        "metrics_requires_key": True,
    }
    audit = next(m for m in c["volumeMounts"] if m["name"] == "audit")
    assert audit["mountPath"] == "/var/log/batchgate" and "readOnly" not in audit
    assert next(v for v in pod["volumes"] if v["name"] == "audit")["emptyDir"] == {"sizeLimit": "1Gi"}
    # metrics need a key: the ServiceMonitor sends one
    endpoint = kinds["ServiceMonitor"][0]["spec"]["endpoints"][0]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "scrape", "key": "token"}}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"id": "a", "sha256": DIGEST, "token": TOKEN}, 'unknown field "token"'),
        ({"id": "a", "sha256": TOKEN}, "sha256 must be the SHA-256 hex digest of the token"),
        ({"id": "a", "sha256": DIGEST[:-1]}, "sha256 must be the SHA-256 hex digest"),
        ({"sha256": DIGEST}, "needs an id"),
        # an empty field would reach the file as null: refused, never read as "every model"
        ({"id": "a", "sha256": DIGEST, "models": None}, 'field "models" is empty'),
        ({"id": "a", "sha256": DIGEST, "rate_per_s": None}, 'field "rate_per_s" is empty'),
    ],
)
def test_a_key_that_is_not_a_digest_is_refused_at_render(helm, tmp_path, entry, message):
    err = refused(helm, tmp_path, {"auth": {"apiKeys": {"keys": [entry]}}})
    assert message in err and TOKEN not in err


OTHER = hashlib.sha256(b"another token").hexdigest()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"id": "a", "sha256": DIGEST}, "scopes is required"),
        ({"id": "a", "sha256": DIGEST, "scopes": []}, "scopes is required"),
        ({"id": "a", "sha256": DIGEST, "scopes": "infer"}, "scopes is required"),
        ({"id": "a", "sha256": DIGEST, "scopes": ["infer", "write"]}, "scopes has write"),
        ({"id": "web frontend", "sha256": DIGEST, "scopes": ["infer"]}, "id must be a string"),
        ({"id": 7, "sha256": DIGEST, "scopes": ["infer"]}, "id must be a string"),
        ({"id": "a", "sha256": DIGEST, "scopes": ["infer"], "models": []}, "models must be a list"),
        ({"id": "a", "sha256": DIGEST, "scopes": ["infer"], "models": ["fraud/*"]}, "models has fraud/*"),
        ({"id": "a", "sha256": DIGEST, "scopes": ["infer"], "rate_per_s": 0}, "rate_per_s must be a number"),
        ({"id": "a", "sha256": DIGEST, "scopes": ["infer"], "rate_per_s": "fast"}, "rate_per_s must be a number"),
        ({"id": "a", "sha256": DIGEST, "scopes": ["infer"], "burst": 10}, "burst needs rate_per_s"),
        ({"id": "a", "sha256": DIGEST, "scopes": ["infer"], "rate_per_s": 5, "burst": 1.5}, "burst must be a whole"),
        ({"id": "a", "sha256": DIGEST, "scopes": ["infer"], "cert_subjects": ["client"]}, "cert_subjects has client"),
        ({"id": "a", "sha256": DIGEST, "scopes": ["infer"], "cert_subjects": "CN=c"}, "cert_subjects must be a list"),
    ],
)
def test_a_key_batchgate_would_refuse_is_refused_at_render(helm, tmp_path, entry, message):
    """An entry of auth.apiKeys.keys that batchgate's keys file refuses stops every pod at start
    (a crash loop, or a Secret edit that never takes): the render refuses it first, naming the
    field. Until 2026-12-06 only the field names, the id and the digest were checked, so a key
    without scopes rendered."""
    with pytest.raises(ConfigError):  # batchgate itself refuses it: the chart must not pass it
        parse_keys({"keys": [entry]}, "keys file")
    err = refused(helm, tmp_path, {"auth": {"apiKeys": {"keys": [entry]}}})
    assert "auth.apiKeys.keys[0]" in err and message in err, err


def test_two_keys_with_one_digest_or_one_subject_are_refused_at_render(helm, tmp_path):
    keys = [dict(KEY), dict(KEY, id="other", sha256=DIGEST.lower())]  # one token, upper and lower case
    with pytest.raises(ConfigError):
        parse_keys({"keys": keys}, "keys file")
    assert "sha256 is the same as another entry's" in refused(helm, tmp_path, {"auth": {"apiKeys": {"keys": keys}}})
    subject = ["CN=client,O=Acme"]
    for keys in (
        [dict(KEY, cert_subjects=subject), dict(KEY, id="other", sha256=OTHER, cert_subjects=subject)],
        [dict(KEY, cert_subjects=subject * 2)],
    ):
        with pytest.raises(ConfigError):
            parse_keys({"keys": keys}, "keys file")
        err = refused(helm, tmp_path, {"auth": {"apiKeys": {"keys": keys}}})
        assert "cert_subjects has CN=client,O=Acme, which is given twice" in err, err


def test_every_kind_of_entry_batchgate_takes_renders_and_reads_back(helm, tmp_path):
    """The other side of the checks above: what batchgate takes renders, and the Secret's file
    reads back as the same keys."""
    keys = [
        dict(KEY, cert_subjects=["CN=fraud-client,O=Acme"]),
        {"id": "ops_1.x", "sha256": OTHER, "scopes": ["admin"], "models": ["fraud-*", "m?[0-9]", "[!x]*"]},
        {"id": "batch", "sha256": "1" * 64, "scopes": ["infer", "read", "admin"], "rate_per_s": 0.5},
    ]
    out = template(helm, values(tmp_path, {"auth": {"apiKeys": {"keys": keys}}}))
    assert out.returncode == 0, out.stderr
    secret = next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Secret")
    read = parse_keys(yaml.safe_load(secret["stringData"]["keys.yaml"]), "keys file")
    assert read == parse_keys({"keys": keys}, "keys file")


def test_inline_keys_may_map_client_certificate_subjects(helm, tmp_path):
    key = dict(KEY, cert_subjects=["CN=fraud-client,O=Acme"])
    out = template(helm, values(tmp_path, {"auth": {"apiKeys": {"keys": [key]}}}))
    assert out.returncode == 0, out.stderr
    secret = next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Secret")
    (entry,) = yaml.safe_load(secret["stringData"]["keys.yaml"])["keys"]
    assert entry["cert_subjects"] == ["CN=fraud-client,O=Acme"]


def test_keys_are_given_one_way_and_once(helm, tmp_path):
    both = {"auth": {"apiKeys": {"existingSecret": "s", "keys": [KEY]}}}
    assert "give existingSecret or keys, not both" in refused(helm, tmp_path, both)
    twice = {"auth": {"apiKeys": {"keys": [KEY, dict(KEY, sha256="0" * 64)]}}}
    assert 'id "web" is given more than once' in refused(helm, tmp_path, twice)


def probes_on(c: dict) -> dict[str, dict]:
    return {p: c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe")}


def test_tls_from_a_secret_with_mtls_moves_the_probes_to_the_health_port(helm, tmp_path):
    kinds, pod, c, config = rendered(helm, tmp_path, "tls-secret-mtls")
    assert config["tls"] == {
        "tls_cert_file": "/etc/batchgate/tls/tls.crt",
        "tls_key_file": "/etc/batchgate/tls/tls.key",
        "tls_client_ca_file": "/etc/batchgate/tls/client-ca.crt",
    }
    # the cert-manager layout of one kubernetes.io/tls Secret, the CA of the same Secret for mTLS
    assert secret_items(pod) == {
        "keys/keys.yaml": ("team-keys", "keys.yaml"),
        "tls/tls.crt": ("gw-tls", "tls.crt"),
        "tls/tls.key": ("gw-tls", "tls.key"),
        "tls/client-ca.crt": ("gw-tls", "ca.crt"),
    }
    health = config["server"]["health_port"]
    assert health == 8004 and {"name": "health", "containerPort": 8004, "protocol": "TCP"} in c["ports"]
    probes = probes_on(c)
    assert {k: p["grpc"] for k, p in probes.items()} == {
        "startupProbe": {"port": health, "service": GRPC_SERVICE},
        "readinessProbe": {"port": health, "service": GRPC_SERVICE},
        "livenessProbe": {"port": health, "service": "liveness"},  # alive, whatever readiness says
    }
    assert not any("httpGet" in p for p in probes.values())
    # the Services say TLS; metrics stay plaintext, and the monitor still scrapes port `metrics`
    for svc in kinds["Service"]:
        ports = {p["name"]: (p["port"], p.get("appProtocol")) for p in svc["spec"]["ports"]}
        assert ports["https"] == (8000, "https") and ports["grpcs"] == (8001, "https")
        assert "http" not in ports and "grpc" not in ports and 8004 not in [p for p, _ in ports.values()]
    assert kinds["Service"][0]["spec"]["ports"][2] == {
        "name": "metrics",
        "port": 8002,
        "targetPort": "metrics",
        "appProtocol": "http",
    }
    assert kinds["ServiceMonitor"][0]["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s"}
    ]
    # TLS without mTLS: no client CA anywhere
    plain = {"tls": {"enabled": True, "existingSecret": "gw-tls"}}
    kinds = by_kind(render(helm, values(tmp_path, plain, "plain-tls")))
    pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
    assert set(secret_items(pod)) == {"tls/tls.crt", "tls/tls.key"}
    assert "tls_client_ca_file" not in yaml.safe_load(kinds["ConfigMap"][0]["data"]["batchgate.yaml"])["tls"]


def test_without_tls_the_probes_are_as_before_and_no_health_port(helm, tmp_path):
    _, _, c, config = rendered(helm, tmp_path, "keys-inline")
    assert config["server"]["health_port"] == -1 and "tls" not in config
    assert "health" not in {p["name"] for p in c["ports"]}
    assert c["readinessProbe"]["grpc"] == {"port": 8001, "service": GRPC_SERVICE}
    assert c["livenessProbe"]["httpGet"]["port"] == "http" and c["startupProbe"]["httpGet"]["port"] == "http"
    # health endpoints that need a key: the kubelet has none, so the probes go to the health port
    _, _, c, config = rendered(helm, tmp_path, "health-requires-key")
    assert config["server"]["health_port"] == 8004 and config["auth"]["health_requires_key"] is True
    assert {p["grpc"]["port"] for p in probes_on(c).values()} == {8004}


@pytest.mark.parametrize("variant", ["keys-inline", "tls-secret-mtls"])  # main ports; the health port
def test_probe_timeouts_reach_every_probe_and_a_misspelt_probe_key_is_refused(helm, tmp_path, variant):
    """probes.*.timeoutSeconds was taken by the values and dropped without a word: the kubelet's
    1 s stayed, however long a loaded pod takes to answer. Each probe gets its own; a key the chart
    does not read is refused, naming it."""
    timing = {"timeoutSeconds": 4, "periodSeconds": 7, "failureThreshold": 5}
    probes = {"readiness": dict(timing), "liveness": dict(timing, timeoutSeconds=6), "startup": dict(timing)}
    kinds = by_kind(render(helm, values(tmp_path, {**VARIANTS[variant], "probes": probes}, "timed")))
    c = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    got = {k: (p.get("timeoutSeconds"), p["periodSeconds"], p["failureThreshold"]) for k, p in probes_on(c).items()}
    assert got == {"startupProbe": (4, 7, 5), "readinessProbe": (4, 7, 5), "livenessProbe": (6, 7, 5)}
    validate(kinds["Deployment"])
    plain = by_kind(render(helm, values(tmp_path, VARIANTS[variant], "plain")))["Deployment"][0]
    assert all(
        "timeoutSeconds" not in p for p in probes_on(plain["spec"]["template"]["spec"]["containers"][0]).values()
    )
    assert "timeoutSecond" in refused(helm, tmp_path, {"probes": {"liveness": {"timeoutSecond": 5}}})


def test_cert_manager_issues_the_secret_the_pods_mount(helm, tmp_path):
    kinds, pod, c, config = rendered(helm, tmp_path, "tls-cert-manager")
    (cert,) = kinds["Certificate"]
    spec = cert["spec"]
    assert cert["apiVersion"] == "cert-manager.io/v1"
    assert spec["secretName"] == "rel-batchgate-tls" and spec["issuerRef"] == ISSUER
    assert {"rel-batchgate", "rel-batchgate.serving.svc", "rel-batchgate.serving.svc.cluster.local"} <= set(
        spec["dnsNames"]
    )
    assert {"rel-batchgate-headless.serving.svc", "gw.example.com"} <= set(spec["dnsNames"])
    assert "server auth" in spec["usages"]
    # mTLS with a CA of its own Secret
    assert secret_items(pod) == {
        "keys/keys.yaml": ("rel-batchgate-api-keys", "keys.yaml"),
        "tls/tls.crt": ("rel-batchgate-tls", "tls.crt"),
        "tls/tls.key": ("rel-batchgate-tls", "tls.key"),
        "tls/client-ca.crt": ("clients-ca", "ca.crt"),
    }
    # the audit log on a claim: one folder per pod
    audit = next(m for m in c["volumeMounts"] if m["name"] == "audit")
    assert audit["subPathExpr"] == "$(POD_NAME)"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in c["env"]
    # an existing Secret name is the Certificate's Secret too
    given = {"tls": {"enabled": True, "existingSecret": "mine", "certManager": {"create": True, "issuerRef": ISSUER}}}
    (cert,) = by_kind(render(helm, values(tmp_path, given, "named")))["Certificate"]
    assert cert["spec"]["secretName"] == "mine"


def test_tls_settings_that_cannot_work_are_refused_at_render(helm, tmp_path):
    cm = {"tls": {"enabled": True, "certManager": {"create": True, "issuerRef": ISSUER}}}
    assert "no cert-manager.io/v1 API" in refused(helm, tmp_path, cm, api_versions=["monitoring.coreos.com/v1"])
    no_issuer = {"tls": {"enabled": True, "certManager": {"create": True}}}
    assert "needs tls.certManager.issuerRef.name" in refused(helm, tmp_path, no_issuer)
    assert "tls.enabled needs tls.existingSecret" in refused(helm, tmp_path, {"tls": {"enabled": True}})
    owned = {"config": {"tls": {"tls_cert_file": "/x.pem"}}}
    assert "config.tls.tls_cert_file is set by the chart: use the value tls.existingSecret" in refused(
        helm, tmp_path, owned
    )
    owned = {"config": {"auth": {"api_keys_file": "/k.yaml"}}}
    assert "config.auth.api_keys_file is set by the chart: use the value auth.apiKeys" in refused(helm, tmp_path, owned)


@pytest.mark.parametrize(
    "tls",
    [
        {"existingSecret": "gw-tls"},
        {"existingSecret": "gw-tls", "clientAuth": True},
        {"clientCASecret": "clients-ca"},
        {"certManager": {"create": True, "issuerRef": ISSUER}},
    ],
)
def test_tls_settings_without_tls_enabled_are_refused(helm, tmp_path, tls):
    """Until 2026-12-06 a certificate (or mTLS) given without tls.enabled rendered a release whose
    ports served plaintext, the Secret never mounted, with nothing said."""
    err = refused(helm, tmp_path, {"tls": tls})
    assert "but tls.enabled is false, so the HTTP and gRPC ports would serve plaintext" in err, err
    kinds, pod, c, config = rendered(helm, tmp_path, "tls-secret-mtls")  # with enabled: as before
    assert config["tls"]["tls_cert_file"] == "/etc/batchgate/tls/tls.crt"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"networkPolicy": {"clients": CLIENTS}}, "but networkPolicy.enabled is false"),
        ({"networkPolicy": {"metricsFrom": MONITORING}}, "but networkPolicy.enabled is false"),
        ({"networkPolicy": {"adminFrom": CLIENTS}, "admin": {"expose": True}}, "but networkPolicy.enabled is false"),
        ({"auth": {"healthRequiresKey": True}}, "auth.healthRequiresKey or auth.metricsRequiresKey needs API keys"),
        ({"auth": {"metricsRequiresKey": True}}, "auth.healthRequiresKey or auth.metricsRequiresKey needs API keys"),
    ],
)
def test_a_restriction_that_would_restrict_nothing_is_refused(helm, tmp_path, given, message):
    """Until 2026-12-06 these rendered a release open to anyone without a word: peers of a
    NetworkPolicy that was not made, and a key asked of health or /metrics by a server without
    keys (batchgate reads those settings only with a keys file)."""
    assert message in refused(helm, tmp_path, given)
    for variant in ("network-policy", "health-requires-key", "keys-inline"):  # with what they need: as before
        rendered(helm, tmp_path, variant)


def test_network_policy_lets_in_clients_scrapers_and_probes(helm, tmp_path):
    assert "NetworkPolicy" not in by_kind(render(helm, values(tmp_path, {}, "none")))  # off by default
    kinds, *_ = rendered(helm, tmp_path, "network-policy")
    (policy,) = kinds["NetworkPolicy"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]  # egress (remote models, DNS) left open
    assert spec["podSelector"]["matchLabels"] == kinds["Deployment"][0]["spec"]["selector"]["matchLabels"]
    rules = {tuple(p["port"] for p in r["ports"]): r.get("from") for r in spec["ingress"]}
    assert rules == {(8000, 8001): CLIENTS, (8002,): None}  # metrics: from anyone (metricsFrom empty)
    # TLS: the health port is open (to the kubelet); the exposed admin port to the clients
    kinds, *_ = rendered(helm, tmp_path, "tls-cert-manager")
    rules = {tuple(p["port"] for p in r["ports"]): r.get("from") for r in kinds["NetworkPolicy"][0]["spec"]["ingress"]}
    assert rules == {(8000, 8001): CLIENTS, (8002,): MONITORING, (8004,): None, (8003, 8005): CLIENTS}
    admins = [{"podSelector": {"matchLabels": {"app": "ops"}}}]
    given = {"networkPolicy": {"enabled": True, "adminFrom": admins}, "admin": {"expose": True}}
    (policy,) = by_kind(render(helm, values(tmp_path, given, "admins")))["NetworkPolicy"]
    rules = {tuple(p["port"] for p in r["ports"]): r.get("from") for r in policy["spec"]["ingress"]}
    assert rules == {(8000, 8001): None, (8002,): None, (8003, 8005): admins}


@pytest.mark.parametrize(
    ("admin", "lines"),
    [
        ({}, ["admin (gRPC):     loopback only: kubectl port-forward -n serving pod/<pod> 8003",
              "admin (HTTP):     loopback only: kubectl port-forward -n serving pod/<pod> 8005"]),
        ({"expose": True}, ["admin (gRPC):     rel-batchgate:8003", "admin (HTTP):     rel-batchgate:8005"]),
        ({"expose": True, "port": -1}, ["admin (HTTP):     rel-batchgate:8005"]),  # had been rel-batchgate:-1
        ({"port": -1}, ["admin (HTTP):     loopback only: kubectl port-forward -n serving pod/<pod> 8005"]),
        ({"port": -1, "httpPort": -1}, []),
    ],
)  # fmt: skip
def test_the_install_notes_name_the_admin_listeners_that_are_on(helm, tmp_path, admin, lines):
    """The notes named admin.port alone: with it off and the HTTP admin exposed they said
    `admin: rel-batchgate:-1`, and the HTTP admin listener was never mentioned."""
    f = values(tmp_path, {"admin": admin})
    cmd = [helm, "install", "rel", str(CHART), "-f", str(f), "-n", "serving", "--dry-run=client"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert [line.strip() for line in notes.splitlines() if line.strip().startswith("admin")] == lines


def test_the_admin_port_is_loopback_only_unless_exposed(helm, tmp_path):
    kinds, pod, c, config = rendered(helm, tmp_path, "keys-secret")
    code = Settings().server
    assert (config["server"]["admin_host"], config["server"]["admin_port"]) == (code.admin_host, code.admin_port)
    assert (code.admin_host, code.admin_port) == ("127.0.0.1", 8003)
    assert 8003 not in [p["containerPort"] for p in c["ports"]]
    assert all(8003 not in [p["port"] for p in s["spec"]["ports"]] for s in kinds["Service"])
    kinds, pod, c, config = rendered(helm, tmp_path, "tls-cert-manager")
    assert (config["server"]["admin_host"], config["server"]["admin_port"]) == ("0.0.0.0", 8003)
    assert {"name": "admin", "containerPort": 8003, "protocol": "TCP"} in c["ports"]
    assert {"name": "admin-http", "containerPort": 8005, "protocol": "TCP"} in c["ports"]
    assert config["server"]["admin_http_port"] == code.admin_http_port == 8005
    main, headless = kinds["Service"]
    assert {"name": "admin", "port": 8003, "targetPort": "admin", "appProtocol": "grpc"} in main["spec"]["ports"]
    assert {"name": "admin-http", "port": 8005, "targetPort": "admin-http", "appProtocol": "http"} in main["spec"][
        "ports"
    ]
    assert 8003 not in [p["port"] for p in headless["spec"]["ports"]]
    off = by_kind(render(helm, values(tmp_path, {"admin": {"port": -1}}, "off")))
    assert yaml.safe_load(off["ConfigMap"][0]["data"]["batchgate.yaml"])["server"]["admin_port"] == -1
    off_both = {"admin": {"port": -1, "httpPort": -1, "expose": True}}
    assert "admin.expose needs an admin port" in refused(helm, tmp_path, off_both)


def _pem_pair(tmp: Path) -> dict[str, str]:
    """A CA and a server certificate it signed, as cert-manager's kubernetes.io/tls Secret holds them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject, issuer, key, signer, ca: bool):
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("rel-batchgate.serving.svc")]), False)
        return b.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return {
        "tls.crt": cert("rel-batchgate", "test-ca", key, ca_key, False),
        "tls.key": pem_key,
        "ca.crt": cert("test-ca", "test-ca", ca_key, ca_key, True),
    }


def _lay_out_the_pod(tmp: Path, kinds: dict, pod: dict, secrets: dict[str, dict[str, str]]) -> Path:
    """The pod's files under ``tmp``: the projected /etc/batchgate volume as the kubelet writes it
    (the ConfigMap, then each Secret item at its path), /models and the audit log's folder."""
    root = tmp / "pod"
    etc = root / "etc" / "batchgate"
    made = {s["metadata"]["name"]: s["stringData"] for s in kinds.get("Secret", [])}
    for source in projected(pod):
        if "configMap" in source:
            for name, text in kinds["ConfigMap"][0]["data"].items():
                (etc / name).parent.mkdir(parents=True, exist_ok=True)
                (etc / name).write_text(text)
        else:
            data = {**secrets, **made}[source["secret"]["name"]]
            for item in source["secret"]["items"]:
                (etc / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                (etc / item["path"]).write_text(data[item["key"]])
    (root / "models").mkdir()
    (root / "var" / "log" / "batchgate").mkdir(parents=True)
    return root


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batchgate_accepts_the_config_and_finds_its_files(helm, tmp_path, variant):
    """The config the chart writes, read by batchgate with every path moved under a folder that
    holds the pod's mounts: no error, no deprecation, and every file it names is there."""
    kinds, pod, _, config = rendered(helm, tmp_path, variant)
    pem = _pem_pair(tmp_path)
    keys = yaml.safe_dump({"keys": [dict(KEY, sha256=DIGEST)]})
    secrets = {
        "team-keys": {"api.yaml": keys, "keys.yaml": keys},
        "gw-tls": pem,
        "rel-batchgate-tls": pem,
        "clients-ca": {"ca.crt": pem["ca.crt"]},
    }
    root = _lay_out_the_pod(tmp_path, kinds, pod, secrets)
    mounts = ("/etc/batchgate/", "/models", "/var/log/batchgate/")
    moved = {
        section: {k: str(root) + v if isinstance(v, str) and v.startswith(mounts) else v for k, v in settings.items()}
        if isinstance(settings, dict)
        else settings
        for section, settings in config.items()
    }
    cfg_file = tmp_path / "batchgate.yaml"
    cfg_file.write_text(yaml.safe_dump(moved))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = load_settings(str(cfg_file), environ={})
    given = VARIANTS[variant]
    assert bool(s.auth.api_keys_file) == ("apiKeys" in given.get("auth", {}))
    if s.auth.api_keys_file:
        entries = yaml.safe_load(Path(s.auth.api_keys_file).read_text())["keys"]
        assert [e["sha256"] for e in entries] == [DIGEST]
    assert bool(s.tls.tls_cert_file) == given.get("tls", {}).get("enabled", False)
    for f in (s.tls.tls_cert_file, s.tls.tls_key_file, s.tls.tls_client_ca_file):
        assert not f or Path(f).is_file(), f
    if s.tls.tls_cert_file:
        assert Path(s.tls.tls_cert_file).read_text() == pem["tls.crt"]
    if s.auth.audit_log_file:
        assert Path(s.auth.audit_log_file).parent.is_dir()
    assert (s.server.health_port == 8004) == ("tls" in given or variant == "health-requires-key")
    assert s.server.admin_host == ("0.0.0.0" if given.get("admin", {}).get("expose") else "127.0.0.1")
    defaults = Settings().limits  # the chart's documented limits are the code's defaults
    assert (s.limits.max_inflight_requests, s.limits.max_queue_wait_ms) == (
        defaults.max_inflight_requests,
        defaults.max_queue_wait_ms,
    )


def test_the_charts_limits_are_the_codes_defaults():
    """Every limit values.yaml sets is the server's own default (the chart documents them): the
    chart kept queue_interval_ms 100 when the code's default became 50."""
    import helm_support

    values = yaml.safe_load((helm_support.CHART / "values.yaml").read_text())
    defaults = Settings().limits
    chart = values["config"]["limits"]
    assert chart and {k: v for k, v in chart.items() if getattr(defaults, k) != v} == {}
