"""JSON schemas of the custom resources the chart renders, for the fields it sets.

kubernetes-validate knows only Kubernetes' own kinds. These schemas follow the CRDs of
Prometheus Operator (monitoring.coreos.com/v1), KEDA (keda.sh/v1alpha1) and cert-manager
(cert-manager.io/v1) for every field the chart uses, and refuse any other
(``additionalProperties: false``), so a misspelt or misplaced field fails the test as it would
fail `kubectl apply` against the real CRD.
"""

from __future__ import annotations


def _obj(props: dict, required=(), extra=False) -> dict:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": extra}


_STR = {"type": "string"}
_INT = {"type": "integer"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_META = _obj({"name": _STR, "namespace": _STR, "labels": _LABELS, "annotations": _LABELS}, ["name"])
_SELECTOR = _obj({"matchLabels": _LABELS})
_DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(\.[0-9]+)?(ms|s|m|h))+)$"}


def _resource(api: str, kind: str, spec: dict) -> dict:
    return _obj(
        {"apiVersion": {"const": api}, "kind": {"const": kind}, "metadata": _META, "spec": spec},
        ["apiVersion", "kind", "metadata", "spec"],
    )


_ENDPOINT = _obj(
    {
        "port": _STR,
        "path": _STR,
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "scheme": {"enum": ["http", "https"]},
        "authorization": _obj(
            {"type": _STR, "credentials": _obj({"name": _STR, "key": _STR, "optional": {"type": "boolean"}}, ["key"])}
        ),
    },
    ["port"],
)

_HPA_POLICY = _obj(
    {"type": {"enum": ["Pods", "Percent"]}, "value": _INT, "periodSeconds": _INT}, ["type", "value", "periodSeconds"]
)
_HPA_RULES = _obj(
    {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {"type": "array", "items": _HPA_POLICY},
    }
)

# cert-manager.io/v1 Certificate: the fields of its CRD the chart sets (and a few neighbours).
_DURATION_GO = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"}
_DNS_NAME = {"type": "string", "pattern": r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
]  # fmt: skip

CRD_SCHEMAS = {
    "ServiceMonitor": _resource(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        _obj(
            {
                "selector": _SELECTOR,
                "endpoints": {"type": "array", "items": _ENDPOINT, "minItems": 1},
                "namespaceSelector": _obj({"matchNames": {"type": "array", "items": _STR}, "any": {"type": "boolean"}}),
            },
            ["selector", "endpoints"],
        ),
    ),
    "PodMonitor": _resource(
        "monitoring.coreos.com/v1",
        "PodMonitor",
        _obj(
            {"selector": _SELECTOR, "podMetricsEndpoints": {"type": "array", "items": _ENDPOINT, "minItems": 1}},
            ["selector", "podMetricsEndpoints"],
        ),
    ),
    "PrometheusRule": _resource(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        _obj(
            {
                "groups": {
                    "type": "array",
                    "items": _obj(
                        {
                            "name": _STR,
                            "interval": _DURATION,
                            "rules": {
                                "type": "array",
                                "items": _obj(
                                    {
                                        "alert": _STR,
                                        "record": _STR,
                                        "expr": _STR,
                                        "for": _DURATION,
                                        "labels": _LABELS,
                                        "annotations": _LABELS,
                                    },
                                    ["expr"],
                                ),
                            },
                        },
                        ["name", "rules"],
                    ),
                }
            },
            ["groups"],
        ),
    ),
    "ScaledObject": _resource(
        "keda.sh/v1alpha1",
        "ScaledObject",
        _obj(
            {
                "scaleTargetRef": _obj({"name": _STR, "kind": _STR, "apiVersion": _STR}, ["name"]),
                "minReplicaCount": _INT,
                "maxReplicaCount": _INT,
                "pollingInterval": _INT,
                "cooldownPeriod": _INT,
                "idleReplicaCount": _INT,
                "initialCooldownPeriod": _INT,
                "advanced": _obj(
                    {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": _obj(
                            {"name": _STR, "behavior": _obj({"scaleUp": _HPA_RULES, "scaleDown": _HPA_RULES})}
                        ),
                    }
                ),
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _obj(
                        {
                            "type": _STR,
                            "name": _STR,
                            "useCachedMetrics": {"type": "boolean"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "authenticationRef": _obj({"name": _STR, "kind": _STR}, ["name"]),
                        },
                        ["type", "metadata"],
                    ),
                },
            },
            ["scaleTargetRef", "triggers"],
        ),
    ),
    "Certificate": _resource(
        "cert-manager.io/v1",
        "Certificate",
        _obj(
            {
                "secretName": _STR,
                "secretTemplate": _obj({"labels": _LABELS, "annotations": _LABELS}),
                "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": {"type": "array", "items": _DNS_NAME, "minItems": 1},
                "ipAddresses": {"type": "array", "items": _STR},
                "duration": _DURATION_GO,
                "renewBefore": _DURATION_GO,
                "usages": {"type": "array", "items": {"enum": _USAGES}},
                "isCA": {"type": "boolean"},
                "privateKey": _obj(
                    {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": _INT,
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    }
                ),
                "issuerRef": _obj({"name": _STR, "kind": _STR, "group": _STR}, ["name"]),
            },
            ["secretName", "issuerRef"],
        ),
    ),
}
