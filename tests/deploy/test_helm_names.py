"""Object names with the longest release name helm accepts (53 characters): every name within
Kubernetes' limits, and objects of one kind never sharing a name."""

from __future__ import annotations

import re

from helm_support import render, validate, values_file

LONG_RELEASE = "r" * 53  # helm refuses longer release names
KEY = {"id": "web", "sha256": "5b7f2c0c6a3e4e7f0d1a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e", "scopes": ["infer"]}
# Kinds whose names are DNS-1035 labels (at most 63 characters): a longer one is refused by the API
# server (kubernetes-validate checks no name lengths).
LABEL_NAMED = {"Service"}
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def test_a_long_release_name_gives_valid_distinct_names(helm, tmp_path):
    values = values_file(
        tmp_path,
        {
            "auth": {"apiKeys": {"keys": [KEY]}},
            "tls": {"enabled": True, "certManager": {"create": True, "issuerRef": {"name": "ca"}}},
            "service": {"headless": True},
        },
    )
    docs = render(helm, values, release=LONG_RELEASE)
    validate(docs)
    seen: dict[tuple[str, str], int] = {}
    for d in docs:
        name = d["metadata"]["name"]
        assert len(name) <= 253, name
        if d["kind"] in LABEL_NAMED:
            assert DNS_LABEL.match(name), f"{d['kind']} {name!r} ({len(name)} characters) is no DNS-1035 label"
        seen[(d["kind"], name)] = seen.get((d["kind"], name), 0) + 1
    assert all(n == 1 for n in seen.values()), seen
    services = [d["metadata"]["name"] for d in docs if d["kind"] == "Service"]
    assert len(services) == 2
    # The Secret cert-manager writes is not the chart's keys Secret: cert-manager would otherwise
    # write its certificate into the Secret helm owns, and the pods would mount the wrong files.
    (cert,) = [d for d in docs if d["kind"] == "Certificate"]
    (keys,) = [d for d in docs if d["kind"] == "Secret"]
    assert cert["spec"]["secretName"] != keys["metadata"]["name"]
    assert cert["spec"]["secretName"].endswith("-tls") and keys["metadata"]["name"].endswith("-api-keys")
    # Both Services are among the certificate's names.
    for svc in services:
        assert svc in cert["spec"]["dnsNames"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    projected = deployment["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"]
    mounted = {s["secret"]["name"] for s in projected if "secret" in s}
    assert mounted == {cert["spec"]["secretName"], keys["metadata"]["name"]}
