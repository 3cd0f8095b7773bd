"""Routes: one V2 model name answered by weighted variants, with sticky cohorts and pins.

Pure: no I/O and no clock. This module reads a ``routes`` definition (the YAML section, already
parsed) into checked :class:`RouteSpec` objects, keeps the bucket table that makes cohorts
sticky, and says which variant answers a request. Serving a route, shadows, comparison and the
rollout controller build on it.

**Sticky cohorts** are kept by the bucket table of ``core/buckets.py``.

Requests without a key split at random by weight; a pin (``x-batchgate-variant`` header or
metadata, or the V2 parameter ``variant``) names the variant outright.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, invalid
from .signature import ModelSignature, TensorSpec
from .types import MODEL_NAME, MODEL_NAME_RULE, InferRequest, clip, is_version_text, printable

PIN_HEADER = "x-batchgate-variant"
PIN_PARAMETER = "variant"
STICKY_KINDS = ("header", "param", "input")
COMPARE_KINDS = ("classification", "regression")
ON_FAIL = ("rollback", "pause")
# A header name as HTTP allows it (lower case: headers are compared that way), bounded.
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,128}")


@dataclass(frozen=True)
class Variant:
    name: str
    model: str
    version: str  # "" = the model's latest
    weight: int


@dataclass(frozen=True)
class Shadow:
    name: str
    model: str
    version: str
    percent: float  # of the route's requests copied to it, 0-100
    max_inflight: int  # copies in flight at once; one more is dropped and counted


@dataclass(frozen=True)
class Compare:
    output: str
    kind: str  # classification | regression
    atol: float


@dataclass(frozen=True)
class Gates:
    max_error_rate: float = 0.01
    max_p99_ratio: float = 1.25
    max_disagreement: float = 0.05
    max_output_psi: float = 0.0  # 0 = off; else two-sample PSI of canary vs baseline outputs


@dataclass(frozen=True)
class Rollout:
    canary: str
    baseline: str
    steps: tuple[int, ...]
    interval_s: float
    min_requests: int
    gates: Gates
    on_fail: str


@dataclass(frozen=True)
class StickyKey:
    kind: str  # header | param | input
    name: str


@dataclass(frozen=True)
class RouteSpec:
    name: str
    variants: tuple[Variant, ...]
    sticky: StickyKey | None = None
    shadows: tuple[Shadow, ...] = ()
    compare: Compare | None = None
    rollout: Rollout | None = None
    definition: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    @property
    def weights(self) -> dict[str, int]:
        return {v.name: v.weight for v in self.variants}

    def fingerprint(self) -> str:
        """A digest of the route as parsed: runtime weights are kept until it changes. The same
        route written another way (``version: 3`` or ``"3"``, ``percent: 5`` or ``5.0``, keys in
        another order) is the same route (until 2026-12-07 the digest was of the file's text, and
        such an edit reset the route's weights and its rollout)."""
        return hashlib.sha256(repr(self).encode()).hexdigest()[:16]  # (the repr leaves the raw definition out)

    def legacy_fingerprint(self) -> str:
        """The digest that versions before 2026-12-07 kept state under (of the route's text): state
        they kept is still this route's after an upgrade."""
        return hashlib.sha256(repr(sorted(_flatten(self.definition))).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- parsing
def parse_routes(raw: Any, source: str = "routes") -> list[RouteSpec]:
    """The ``routes`` section (a list of route mappings), checked; a :class:`ConfigError` names
    the route, the field and what is wrong."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: must be a list of routes")
    routes: list[RouteSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        route = _parse_route(item, f"{source}[{i}]")
        if route.name in seen:
            raise ConfigError(f"{source}: route '{route.name}' is defined twice")
        seen.add(route.name)
        routes.append(route)
    return routes


def _parse_route(raw: Any, where: str) -> RouteSpec:
    m = _mapping(raw, where, {"name", "variants", "sticky_key", "shadows", "compare", "rollout"})
    name = _name(m.get("name"), f"{where}.name")
    where = f"route '{name}'"
    raw_variants = m.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise ConfigError(f"{where}: 'variants' must be a non-empty list")
    variants = tuple(_parse_variant(v, f"{where} variants[{j}]") for j, v in enumerate(raw_variants))
    _unique([v.name for v in variants], f"{where}: variant")
    if sum(v.weight for v in variants) <= 0:
        raise ConfigError(f"{where}: the variants' weights add up to 0; at least one must be positive")
    shadows_raw = m.get("shadows") or []
    if not isinstance(shadows_raw, list):
        raise ConfigError(f"{where}: 'shadows' must be a list")
    shadows = tuple(_parse_shadow(s, f"{where} shadows[{j}]") for j, s in enumerate(shadows_raw))
    _unique([v.name for v in variants] + [s.name for s in shadows], f"{where}: variant or shadow")
    sticky = _parse_sticky(m.get("sticky_key"), f"{where}.sticky_key")
    compare = _parse_compare(m.get("compare"), f"{where}.compare") if m.get("compare") is not None else None
    rollout = _parse_rollout(m.get("rollout"), f"{where}.rollout", variants) if m.get("rollout") is not None else None
    return RouteSpec(name, variants, sticky, shadows, compare, rollout, dict(m))


def _parse_variant(raw: Any, where: str) -> Variant:
    m = _mapping(raw, where, {"name", "model", "version", "weight"})
    name = _name(m.get("name"), f"{where}.name")
    weight = m.get("weight", 0)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
        raise ConfigError(f"{where}: 'weight' must be a whole number from 0 to 100, not {_shown(weight)}")
    return Variant(name, _name(m.get("model"), f"{where}.model"), _version(m.get("version"), where), weight)


def _parse_shadow(raw: Any, where: str) -> Shadow:
    m = _mapping(raw, where, {"name", "model", "version", "percent", "max_inflight"})
    percent = _number(m.get("percent", 100), f"{where}.percent", 0, 100)
    inflight = m.get("max_inflight", 8)
    if isinstance(inflight, bool) or not isinstance(inflight, int) or not 1 <= inflight <= 65536:
        raise ConfigError(f"{where}: 'max_inflight' must be a whole number from 1 to 65536, not {_shown(inflight)}")
    return Shadow(
        _name(m.get("name"), f"{where}.name"),
        _name(m.get("model"), f"{where}.model"),
        _version(m.get("version"), where),
        percent,
        inflight,
    )


def _parse_sticky(raw: Any, where: str) -> StickyKey | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or ":" not in raw:
        raise ConfigError(f"{where}: must be header:<name>, param:<name> or input:<name>, not {_shown(raw)}")
    kind, _, name = raw.partition(":")
    if kind not in STICKY_KINDS:
        raise ConfigError(f"{where}: '{printable(kind[:32])}' is not one of {', '.join(STICKY_KINDS)}")
    if kind == "header":
        name = name.lower()
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigError(f"{where}: '{printable(name[:128])}' is not a header name")
        if not name.startswith("x-"):  # requests keep only the caller's x-* headers
            raise ConfigError(f"{where}: the header must be an x-* header (like x-user-id), not '{name}'")
    elif not name or len(name) > 128:
        raise ConfigError(f"{where}: the {kind} name must be 1 to 128 characters")
    return StickyKey(kind, name)


def _parse_compare(raw: Any, where: str) -> Compare:
    m = _mapping(raw, where, {"output", "kind", "atol"})
    output = m.get("output")
    if not isinstance(output, str) or not output or len(output) > 128:
        raise ConfigError(f"{where}: 'output' must name an output tensor")
    kind = m.get("kind", "regression")
    if kind not in COMPARE_KINDS:
        raise ConfigError(f"{where}: 'kind' must be one of {', '.join(COMPARE_KINDS)}, not {_shown(kind)}")
    return Compare(output, kind, _number(m.get("atol", 1e-3), f"{where}.atol", 0, float("inf")))


def _parse_rollout(raw: Any, where: str, variants: Sequence[Variant]) -> Rollout:
    m = _mapping(raw, where, {"canary", "baseline", "steps", "interval_s", "min_requests", "gates", "on_fail"})
    names = {v.name for v in variants}
    canary, baseline = m.get("canary"), m.get("baseline")
    for role, value in (("canary", canary), ("baseline", baseline)):
        if not isinstance(value, str) or value not in names:
            raise ConfigError(f"{where}: '{role}' must name one of the route's variants ({', '.join(sorted(names))})")
    if canary == baseline:
        raise ConfigError(f"{where}: 'canary' and 'baseline' must be different variants")
    weight = {v.name: v.weight for v in variants}
    if weight[str(canary)] + weight[str(baseline)] == 0:
        raise ConfigError(
            f"{where}: the canary and the baseline both weigh 0; the steps split what the two weigh together, "
            "so give the baseline the weight the rollout is to move"
        )
    steps = m.get("steps")
    if (
        not isinstance(steps, list)
        or not steps
        or any(isinstance(s, bool) or not isinstance(s, int) or not 0 < s <= 100 for s in steps)
        or any(a >= b for a, b in zip(steps, steps[1:]))
    ):
        raise ConfigError(f"{where}: 'steps' must be rising whole percentages from 1 to 100, e.g. [10, 25, 50, 100]")
    interval = _number(m.get("interval_s", 300), f"{where}.interval_s", 1, 7 * 86400)
    min_requests = m.get("min_requests", 500)
    if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 1:
        raise ConfigError(f"{where}: 'min_requests' must be a whole number of at least 1")
    g = _mapping(
        m.get("gates") or {},
        f"{where}.gates",
        {"max_error_rate", "max_p99_ratio", "max_disagreement", "max_output_psi"},
    )
    gates = Gates(
        _number(g.get("max_error_rate", 0.01), f"{where}.gates.max_error_rate", 0, 1),
        _number(g.get("max_p99_ratio", 1.25), f"{where}.gates.max_p99_ratio", 1, 1000),
        _number(g.get("max_disagreement", 0.05), f"{where}.gates.max_disagreement", 0, 1),
        _number(g.get("max_output_psi", 0), f"{where}.gates.max_output_psi", 0, 100),
    )
    on_fail = m.get("on_fail", "rollback")
    if on_fail not in ON_FAIL:
        raise ConfigError(f"{where}: 'on_fail' must be one of {', '.join(ON_FAIL)}, not {_shown(on_fail)}")
    return Rollout(str(canary), str(baseline), tuple(steps), interval, min_requests, gates, on_fail)


def _mapping(raw: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a mapping")
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown field {printable(unknown[0][:64])!r}; expected {', '.join(sorted(allowed))}"
        )
    return raw


def _name(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or MODEL_NAME.fullmatch(raw) is None:
        raise ConfigError(f"{where}: {_shown(raw)} is not a valid name ({MODEL_NAME_RULE})")
    return raw


def _version(raw: Any, where: str) -> str:
    if raw is None or raw == "":
        return ""
    text = str(raw)
    if isinstance(raw, bool) or not is_version_text(text):
        raise ConfigError(f"{where}: 'version' must be a version number, not {_shown(raw)}")
    return str(int(text))


def _number(raw: Any, where: str, low: float, high: float) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not low <= raw <= high:
        raise ConfigError(f"{where}: must be a number from {low:g} to {high:g}, not {_shown(raw)}")
    return float(raw)


def _unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ConfigError(f"{what} name '{n}' is used twice")
        seen.add(n)


def _shown(value: Any) -> str:
    return printable(repr(value)[:64])


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, Mapping):
        return [kv for k in value for kv in _flatten(value[k], f"{prefix}.{k}")]
    if isinstance(value, list):
        return [kv for i, v in enumerate(value) for kv in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix, repr(value))]


# ------------------------------------------------------------------------------- choosing
def pick_weighted(weights: Mapping[str, int], rng: random.Random) -> str:
    """A variant at random in proportion to its weight (requests without a sticky key)."""
    total = sum(weights.values())
    x = rng.random() * total
    for name, w in weights.items():
        if x < w:
            return name
        x -= w
    return next(n for n, w in reversed(list(weights.items())) if w > 0)


def check_pin(route: RouteSpec, pin: str) -> str:
    """The pinned variant's name. A pin that names no variant of the route is the client's
    mistake: INVALID_ARGUMENT, naming the variants there are."""
    for v in route.variants:
        if v.name == pin:
            return pin
    have = ", ".join(v.name for v in route.variants)
    raise invalid(f"route '{route.name}' has no variant '{printable(clip(pin))}'; it has {have}")


def sticky_key(sticky: StickyKey, request: InferRequest) -> bytes | None:
    """The bytes a request's cohort is hashed from, or None when it carries no key (it then
    splits at random). For ``input:``, the first row of that input: BYTES elements joined by
    NUL, integers as little-endian 64-bit (so an INT32 and an INT64 input with the same values
    land alike); other data types have no key."""
    if sticky.kind == "header":
        value = request.headers.get(sticky.name)
        return None if value is None else value.encode()
    if sticky.kind == "param":
        p = request.parameters.get(sticky.name)
        if p is None:
            return None
        if isinstance(p, bool):
            return b"true" if p else b"false"
        return str(p).encode() if isinstance(p, (str, int)) else repr(p).encode()
    for t in request.inputs:
        if t.name == sticky.name:
            data = t.data
            if data.size == 0:
                return None
            if data.ndim == 0:  # a scalar input: its one value
                data = data.reshape(1)
            row = data[0] if data.ndim > 1 else data[:1]
            if data.dtype == object:
                return b"\x00".join(v if isinstance(v, bytes) else str(v).encode() for v in row.reshape(-1))
            if data.dtype.kind in "iub":
                return row.astype("<i8").tobytes()
            return None
    return None


def pinned(route: RouteSpec, header: str | None, parameter: Any) -> str | None:
    """The variant a request pins, checked against the route: by its ``x-batchgate-variant``
    header, or its V2 parameter ``variant``; None when it pins nothing. Both given must agree: a
    client that sends two different pins made a mistake (INVALID_ARGUMENT), not a choice for us."""
    if parameter is not None and not isinstance(parameter, str):
        raise invalid(f"parameter '{PIN_PARAMETER}' must be a variant's name")
    if header is not None and parameter is not None and header != parameter:
        raise invalid(
            f"the {PIN_HEADER} header pins '{printable(clip(header))}' but the parameter '{PIN_PARAMETER}' "
            f"pins '{printable(clip(parameter))}': send one of them, or the same variant in both"
        )
    pin = header if header is not None else parameter
    return None if pin is None else check_pin(route, pin)


_KEY_TYPES = frozenset({"BYTES", "BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})


def check_signatures(route: RouteSpec, signatures: Mapping[str, ModelSignature]) -> None:
    """Refuse a route whose variants could not answer the same requests alike: every variant
    (and shadow: it gets a copy of each request) takes the first variant's inputs exactly (name,
    data type, shape, batching); every variant gives the first variant's outputs; the compared
    output exists with the same data type in the variants and the shadows; an ``input:`` sticky
    key names an input whose values can key a cohort. ``signatures``: variant or shadow name ->
    its model version's signature. The message names the variant and the tensor."""
    if not route.variants:  # (none loaded: nothing to check yet)
        return
    first = route.variants[0]
    ref = signatures[first.name]
    where = f"route '{route.name}'"
    members: list[Variant | Shadow] = [*route.variants[1:], *route.shadows]
    for member in (first, *members):
        if signatures[member.name].open:
            role = "shadow" if isinstance(member, Shadow) else "variant"
            raise ConfigError(
                f"{where}: {role} '{member.name}' ({member.model}) declares no inputs or outputs (its upstream gives "
                "no signature), so the route cannot check that its variants answer alike; declare the model's "
                "inputs and outputs on the upstream"
            )
    for member in members:
        sig = signatures[member.name]
        role = "shadow" if isinstance(member, Shadow) else "variant"
        if sig.max_batch_size != ref.max_batch_size and 0 in (sig.max_batch_size, ref.max_batch_size):
            raise ConfigError(
                f"{where}: {role} '{member.name}' ({member.model}) "
                f"{'does not batch' if sig.max_batch_size == 0 else 'batches'} and variant '{first.name}' "
                f"({first.model}) {'does not' if ref.max_batch_size == 0 else 'does'}: their inputs differ in shape"
            )
        if role == "variant" and sig.max_batch_size != ref.max_batch_size:
            raise ConfigError(
                f"{where}: variant '{member.name}' ({member.model}) takes batches of at most {sig.max_batch_size} "
                f"and variant '{first.name}' ({first.model}) of {ref.max_batch_size}: a request one accepts the "
                "other would refuse (max_batch_size must be equal)"
            )
        if role == "shadow" and sig.max_batch_size < ref.max_batch_size:
            raise ConfigError(
                f"{where}: shadow '{member.name}' ({member.model}) takes batches of at most {sig.max_batch_size} "
                f"and variant '{first.name}' ({first.model}) of {ref.max_batch_size}: the copy of a larger request "
                f"would fail on it (give the shadow a max_batch_size of {ref.max_batch_size} or more)"
            )
        _same_tensors(where, "input", ref.inputs, sig.inputs, first, member, role)
        if role == "variant":
            _same_tensors(where, "output", ref.outputs, sig.outputs, first, member, role)
    if route.compare is not None:
        want = {t.name: t for t in ref.outputs}.get(route.compare.output)
        if want is None:
            raise ConfigError(f"{where}: compare output '{route.compare.output}' is not an output of '{first.model}'")
        for shadow in route.shadows:
            got = {t.name: t for t in signatures[shadow.name].outputs}.get(route.compare.output)
            if got is None or got.dtype != want.dtype:
                raise ConfigError(
                    f"{where}: shadow '{shadow.name}' ({shadow.model}) has no {want.dtype.v2} output "
                    f"'{route.compare.output}' to compare"
                )
            if len(got.dims) != len(want.dims) or any(0 <= a != b >= 0 for a, b in zip(got.dims, want.dims)):
                # (every answer would be a disagreement of an infinite |delta|)
                raise ConfigError(
                    f"{where}: shadow '{shadow.name}' ({shadow.model}) gives output '{route.compare.output}' "
                    f"as {list(got.dims)} and variant '{first.name}' ({first.model}) as {list(want.dims)}: "
                    "answers of other shapes cannot be compared"
                )
    if route.sticky is not None and route.sticky.kind == "input":
        tensor = {t.name: t for t in ref.inputs}.get(route.sticky.name)
        if tensor is None or tensor.dtype.v2 not in _KEY_TYPES:
            raise ConfigError(
                f"{where}: sticky_key input '{route.sticky.name}' must be a BYTES, BOOL or integer input "
                f"of '{first.model}'"
            )


def _same_tensors(
    where: str,
    kind: str,
    ref: tuple[TensorSpec, ...],
    got: tuple[TensorSpec, ...],
    first: Variant,
    member: Variant | Shadow,
    role: str,
) -> None:
    mine = {t.name: t for t in got}
    for t in ref:
        other = mine.pop(t.name, None)
        if other is None:
            raise ConfigError(f"{where}: {role} '{member.name}' ({member.model}) has no {kind} '{t.name}'")
        if (other.dtype, other.dims) != (t.dtype, t.dims):
            raise ConfigError(
                f"{where}: {kind} '{t.name}' is {other.dtype.v2} {list(other.dims)} in {role} '{member.name}' "
                f"({member.model}) but {t.dtype.v2} {list(t.dims)} in variant '{first.name}' ({first.model})"
            )
    if kind == "input":
        extra = [n for n, t in mine.items() if not t.optional]
        if extra:
            raise ConfigError(
                f"{where}: {role} '{member.name}' ({member.model}) needs input '{extra[0]}', "
                f"which variant '{first.name}' ({first.model}) does not take"
            )


def loaded_only(route: RouteSpec, loaded: Mapping[str, Any]) -> RouteSpec:
    """The route with only its variants and shadows in ``loaded`` (name -> signature): those are
    checked while others are not loaded, so that one member not loaded (a shadow's model
    unloaded) does not let the others stop fitting unseen (a variant's model then replaced)."""
    return dataclasses.replace(
        route,
        variants=tuple(v for v in route.variants if v.name in loaded),
        shadows=tuple(s for s in route.shadows if s.name in loaded),
    )


def idle_misfits(
    route: RouteSpec, signatures: Mapping[str, ModelSignature], weights: Mapping[str, int]
) -> dict[str, str] | None:
    """When the variants (shadows aside) cannot answer alike only because of variants that have
    no weight now (``weights``, else their configured one): those variants and why each does
    not fit, to be left out (pinned requests to one are refused as not loaded) rather than
    taking the route down, since a route is ready when every variant with weight is. None when
    variants with weight do not fit either."""
    idle = [v for v in route.variants if weights.get(v.name, v.weight) == 0]
    kept = dataclasses.replace(route, variants=tuple(v for v in route.variants if v not in idle), shadows=())
    if not kept.variants:
        return None
    # (the first variant with weight is the one the others must fit: the first listed may be
    # the old stable left with no weight after a promotion, whose model was then replaced)
    first = kept.variants[0]
    try:
        check_signatures(kept, signatures)
    except ConfigError:
        return None
    out: dict[str, str] = {}
    for v in idle:
        try:
            check_signatures(dataclasses.replace(kept, variants=(first, v)), signatures)
        except ConfigError as e:
            out[v.name] = str(e)
    return out
