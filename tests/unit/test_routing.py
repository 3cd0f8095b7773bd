"""core/routing.py, pure: reading a routes definition, the sticky bucket table (shares, weight
accuracy, ramps that never move a user back, any number of variants), its state round trip,
random splits without a key, and pins."""

from __future__ import annotations

import random

import numpy as np
import pytest

from batchgate.core.buckets import BUCKETS, BucketTable, bucket_of, shares
from batchgate.core.errors import ConfigError, ErrorCode, GatewayError
from batchgate.core.routing import (
    StickyKey,
    check_pin,
    check_signatures,
    parse_routes,
    pick_weighted,
    pinned,
    sticky_key,
)
from batchgate.core.signature import ModelSignature, TensorSpec
from batchgate.core.types import DATATYPES, InferRequest, Tensor
from route_support import EXAMPLE_ROUTE

ISSUE_EXAMPLE = [EXAMPLE_ROUTE]


def test_a_full_route_definition_is_read():
    (r,) = parse_routes(ISSUE_EXAMPLE)
    assert r.name == "fraud" and r.weights == {"stable": 90, "canary": 10}
    assert r.variant("stable").version == "3" and r.variant("canary").version == ""
    assert (r.sticky.kind, r.sticky.name) == ("header", "x-user-id")
    assert r.shadows[0].percent == 20 and r.shadows[0].max_inflight == 8
    assert r.compare.kind == "classification" and r.compare.atol == pytest.approx(1e-3)
    assert r.rollout.steps == (10, 25, 50, 100) and r.rollout.gates.max_p99_ratio == 1.25
    assert r.fingerprint() == parse_routes(ISSUE_EXAMPLE)[0].fingerprint()
    changed = [{**ISSUE_EXAMPLE[0], "sticky_key": "param:user"}]
    assert parse_routes(changed)[0].fingerprint() != r.fingerprint()


def _with(**changes):
    route = {**ISSUE_EXAMPLE[0], **changes}
    return [{k: v for k, v in route.items() if v is not None}]


@pytest.mark.parametrize(
    "routes, message",
    [
        ("fraud", "must be a list"),
        (ISSUE_EXAMPLE * 2, "route 'fraud' is defined twice"),
        (_with(name="../etc"), "is not a valid name"),
        (_with(colour="red"), "unknown field 'colour'"),
        (_with(variants=[]), "'variants' must be a non-empty list"),
        (_with(variants=[{"name": "a", "model": "m", "weight": 0}]), "add up to 0"),
        (_with(variants=[{"name": "a", "model": "m", "weight": 101}]), "from 0 to 100"),
        (_with(variants=[{"name": "a", "model": "m", "weight": 1.5}]), "whole number"),
        (_with(variants=[{"name": "a", "model": "/abs/m", "weight": 1}]), "is not a valid name"),
        (_with(variants=[{"name": "a", "model": "m", "version": "x1", "weight": 1}]), "version number"),
        (
            _with(variants=[{"name": "a", "model": "m", "version": "\u00b2", "weight": 1}]),
            "version number",
        ),  # (not int())
        (
            _with(variants=[{"name": "a", "model": "m", "weight": 1}, {"name": "a", "model": "n", "weight": 1}]),
            "'a' is used twice",
        ),
        (_with(sticky_key="cookie:x"), "'cookie' is not one of header, param, input"),
        (_with(sticky_key="header:bad header"), "is not a header name"),
        (_with(sticky_key="user"), "must be header:<name>"),
        (_with(sticky_key="header:user-id"), "must be an x-* header"),
        (_with(shadows=[{"name": "s", "model": "m", "percent": 120}]), "percent: must be a number from 0 to 100"),
        (_with(shadows=[{"name": "s", "model": "m", "max_inflight": 0}]), "'max_inflight'"),
        (_with(shadows=[{"name": "stable", "model": "m"}]), "'stable' is used twice"),
        (_with(compare={"output": "p", "kind": "ranking"}), "'kind' must be one of classification, regression"),
        (_with(rollout={"canary": "nope", "baseline": "stable", "steps": [50]}), "'canary' must name one of"),
        (_with(rollout={"canary": "canary", "baseline": "canary", "steps": [50]}), "must be different"),
        (_with(rollout={"canary": "canary", "baseline": "stable", "steps": [50, 25]}), "rising whole percentages"),
        (_with(rollout={"canary": "canary", "baseline": "stable", "steps": [50], "on_fail": "x"}), "'on_fail'"),
    ],
)
def test_a_bad_definition_is_refused_naming_what_is_wrong(routes, message):
    with pytest.raises(ConfigError) as ei:
        parse_routes(routes)
    assert message in str(ei.value)


def test_shares_follow_the_weights_and_fill_every_bucket():
    assert shares({"a": 90, "b": 10}) == {"a": 9000, "b": 1000}
    three = shares({"a": 1, "b": 1, "c": 1})
    assert sum(three.values()) == BUCKETS and sorted(three.values()) == [3333, 3333, 3334]
    assert shares({"a": 0, "b": 5}) == {"a": 0, "b": BUCKETS}


def test_the_same_key_lands_on_the_same_variant_everywhere():
    """A fresh table depends only on the route and the weights (every replica builds the same
    one); a key's bucket does not depend on the process (a keyed digest, not ``hash``)."""
    one, two = BucketTable.fresh("fraud", {"a": 50, "b": 50}), BucketTable.fresh("fraud", {"a": 50, "b": 50})
    assert one.owners == two.owners
    assert BucketTable.fresh("other", {"a": 50, "b": 50}).owners != one.owners
    assert bucket_of("fraud", b"user-42") == bucket_of("fraud", b"user-42")
    assert bucket_of("fraud", b"user-42") == 3438  # fixed: a change here would move every user
    assert bucket_of("other", b"user-42") != bucket_of("fraud", b"user-42")


def test_routes_whose_long_names_share_a_beginning_put_users_apart():
    """The route's name keyed the hash cut at 64 bytes (48 for the table's order): two routes whose
    names shared that much put every user in the same bucket of each, and laid their tables out
    alike, so a user in one route's canary was in the other's. Names of 64 bytes or fewer keep
    their buckets (a change would move every user)."""
    one, two = "fraud-scoring-" + "x" * 60 + "-eu", "fraud-scoring-" + "x" * 60 + "-us"
    same = sum(bucket_of(one, f"user-{i}".encode()) == bucket_of(two, f"user-{i}".encode()) for i in range(1000))
    assert same < 10, same
    assert BucketTable.fresh(one, {"a": 50, "b": 50}).owners != BucketTable.fresh(two, {"a": 50, "b": 50}).owners
    assert bucket_of("r" * 64, b"user-42") != bucket_of("r" * 65, b"user-42")


def test_a_route_name_of_49_to_64_bytes_keeps_the_table_it_always_had():
    """The table's order was keyed by 'batchgate-route:' and the name, cut at 64 bytes. Names of
    49 to 64 bytes were cut there but never shared their users (bucket_of keys by the whole name),
    so their order must not change: a new one would move users of such a route on upgrading, and
    replicas on either side of a rolling upgrade would place them apart. Pinned to the layout the
    server gave before 2026-12-06."""
    name = "fraud-scoring-" + "x" * 40 + "-eu"  # 57 bytes
    owners = BucketTable.fresh(name, {"a": 50, "b": 50}).owners[:40]
    assert "".join(owners) == "baaabbbabbbababbababbaabaabbaaaaababbbab"


@pytest.mark.parametrize("weights", [{"a": 90, "b": 10}, {"a": 33, "b": 33, "c": 34}, {"a": 70, "b": 20, "c": 10}])
def test_weight_accuracy_over_100000_keys(weights):
    table = BucketTable.fresh("route", weights)
    got: dict[str, int] = {}
    for i in range(100_000):
        v = table.variant_for(f"user-{i}".encode())
        got[v] = got.get(v, 0) + 1
    total = sum(weights.values())
    for name, w in weights.items():
        assert abs(got.get(name, 0) / 1000 - 100 * w / total) < 1.0, (name, got)


def test_a_ramp_moves_each_user_at_most_once_and_never_back():
    table = BucketTable.fresh("fraud", {"stable": 100, "canary": 0})
    keys = [f"user-{i}".encode() for i in range(20_000)]
    history = {k: [table.variant_for(k)] for k in keys}
    for step in (10, 25, 50, 100):
        table.reweigh({"stable": 100 - step, "canary": step})
        for k in keys:
            history[k].append(table.variant_for(k))
    for k, seen in history.items():
        flips = sum(1 for a, b in zip(seen, seen[1:]) if a != b)
        assert flips <= 1 and (flips == 0 or seen[0] == "stable"), (k, seen)
    assert table.counts() == {"canary": BUCKETS}


def test_reweighing_moves_buckets_only_from_losers_to_gainers_with_any_number_of_variants():
    rng = random.Random(7)
    for trial in range(30):
        names = [f"v{i}" for i in range(rng.randint(2, 6))]
        weights = {n: rng.randint(0, 10) for n in names}
        weights[names[0]] += 1  # never all zero
        table = BucketTable.fresh(f"r{trial}", weights)
        for _ in range(5):
            new = {n: rng.randint(0, 10) for n in names}
            new[rng.choice(names)] += 1
            before, old_share = list(table.owners), shares(table.weights)
            moved = table.reweigh(new)
            new_share = shares(new)
            assert table.counts() == {n: c for n, c in new_share.items() if c}
            changed = [(a, b) for a, b in zip(before, table.owners) if a != b]
            assert len(changed) == moved
            for a, b in changed:
                assert new_share[a] < old_share[a] and new_share[b] > old_share[b], (a, b, old_share, new_share)


def test_variants_can_be_added_and_removed():
    table = BucketTable.fresh("r", {"a": 50, "b": 50})
    b_buckets = {i for i, o in enumerate(table.owners) if o == "b"}
    table.reweigh({"a": 50, "c": 50})  # b leaves, c arrives: only b's buckets move, all to c
    assert {i for i, o in enumerate(table.owners) if o == "c"} == b_buckets
    assert table.counts() == {"a": 5000, "c": 5000}


def test_the_table_round_trips_through_its_state_and_a_bad_state_is_refused():
    table = BucketTable.fresh("fraud", {"stable": 75, "canary": 25})
    table.reweigh({"stable": 40, "canary": 60})
    again = BucketTable.from_state(table.to_state())
    assert again.owners == table.owners and again.weights == table.weights and again.route == "fraud"
    state = table.to_state()
    for broken in ({}, {**state, "runs": state["runs"][:-1]}, {**state, "variants": ["x"]}, {**state, "runs": "no"}):
        with pytest.raises(ValueError):
            BucketTable.from_state(broken)


def test_without_a_key_requests_split_at_random_by_weight():
    rng = random.Random(1)
    got = {"a": 0, "b": 0, "c": 0}
    for _ in range(100_000):
        got[pick_weighted({"a": 60, "b": 30, "c": 10}, rng)] += 1
    assert abs(got["a"] / 1000 - 60) < 1 and abs(got["b"] / 1000 - 30) < 1 and abs(got["c"] / 1000 - 10) < 1
    assert {pick_weighted({"a": 0, "b": 1}, rng) for _ in range(100)} == {"b"}


def test_a_pin_must_name_a_variant_of_the_route():
    (r,) = parse_routes(ISSUE_EXAMPLE)
    assert check_pin(r, "canary") == "canary"
    with pytest.raises(GatewayError) as ei:
        check_pin(r, "next\nforged")
    assert ei.value.code is ErrorCode.INVALID_ARGUMENT
    assert "has no variant 'next\\x0aforged'; it has stable, canary" in ei.value.message


def request(headers=None, parameters=None, inputs=()):
    return InferRequest("fraud", "", tuple(inputs), headers=headers or {}, parameters=parameters or {})


def test_sticky_keys_from_a_header_a_parameter_or_an_input():
    assert sticky_key(StickyKey("header", "x-user-id"), request(headers={"x-user-id": "u1"})) == b"u1"
    assert sticky_key(StickyKey("header", "x-user-id"), request()) is None
    param = StickyKey("param", "user")
    assert sticky_key(param, request(parameters={"user": "u1"})) == b"u1"
    assert sticky_key(param, request(parameters={"user": 7})) == sticky_key(param, request(parameters={"user": "7"}))
    assert sticky_key(param, request(parameters={"user": True})) == b"true"
    ids = StickyKey("input", "ids")
    i32 = Tensor("ids", "INT32", (2, 2), np.array([[5, 6], [7, 8]], np.int32))
    i64 = Tensor("ids", "INT64", (2, 2), np.array([[5, 6], [9, 9]], np.int64))
    assert sticky_key(ids, request(inputs=[i32])) == sticky_key(ids, request(inputs=[i64]))  # first row only
    words = Tensor("ids", "BYTES", (2,), np.array([b"alice", b"bob"], dtype=object))
    assert sticky_key(ids, request(inputs=[words])) == b"alice"
    floats = Tensor("ids", "FP32", (1, 2), np.ones((1, 2), np.float32))
    assert sticky_key(ids, request(inputs=[floats])) is None
    assert sticky_key(ids, request(inputs=[Tensor("ids", "INT32", (0,), np.zeros(0, np.int32))])) is None


def test_pins_from_the_header_or_the_parameter():
    (r,) = parse_routes(ISSUE_EXAMPLE)
    assert pinned(r, None, None) is None
    assert pinned(r, "canary", None) == "canary"
    assert pinned(r, None, "stable") == "stable"
    assert pinned(r, "stable", "stable") == "stable"  # both, agreeing
    with pytest.raises(GatewayError):
        pinned(r, None, 3)
    with pytest.raises(GatewayError):
        pinned(r, "next", None)  # a shadow is not a variant
    # Review finding: a header and a parameter that disagreed were served by the header, silently
    with pytest.raises(GatewayError) as e:
        pinned(r, "canary", "s\n" + "t" * 500)
    assert e.value.code is ErrorCode.INVALID_ARGUMENT
    assert "header pins 'canary'" in e.value.message and "\n" not in e.value.message and len(e.value.message) < 400


def sig(model, inputs=(("x", "FP32", (4,)),), outputs=(("probabilities", "FP32", (3,)),), batch=8, optional=()):
    def specs(rows):
        return tuple(TensorSpec(n, DATATYPES[t], d, n in optional) for n, t, d in rows)

    return ModelSignature(model, "onnxruntime_onnx", batch, specs(inputs), specs(outputs))


def signatures(**changes):
    base = {"stable": sig("fraud_v1"), "canary": sig("fraud_v2"), "next": sig("fraud_v3")}
    return {**base, **changes}


def test_variants_and_shadows_must_take_the_same_inputs_and_give_the_same_outputs():
    (r,) = parse_routes([{**ISSUE_EXAMPLE[0], "sticky_key": "header:x-user-id"}])
    check_signatures(r, signatures())
    # A variant may give more outputs, and a shadow other outputs, as long as the compared one is there.
    check_signatures(
        r, signatures(canary=sig("fraud_v2", outputs=(("probabilities", "FP32", (3,)), ("z", "FP32", (1,)))))
    )
    cases = [
        (
            signatures(canary=sig("fraud_v2", inputs=(("x", "FP64", (4,)),))),
            "input 'x' is FP64 [4] in variant 'canary'",
        ),
        (
            signatures(canary=sig("fraud_v2", inputs=(("x", "FP32", (5,)),))),
            "input 'x' is FP32 [5] in variant 'canary'",
        ),
        (
            signatures(canary=sig("fraud_v2", inputs=(("y", "FP32", (4,)),))),
            "variant 'canary' (fraud_v2) has no input 'x'",
        ),
        (
            signatures(canary=sig("fraud_v2", inputs=(("x", "FP32", (4,)), ("mask", "BOOL", (4,))))),
            "needs input 'mask', which variant 'stable' (fraud_v1) does not take",
        ),
        (signatures(canary=sig("fraud_v2", outputs=(("scores", "FP32", (3,)),))), "has no output 'probabilities'"),
        (signatures(canary=sig("fraud_v2", batch=0)), "does not batch and variant 'stable' (fraud_v1) does"),
        (signatures(next=sig("fraud_v3", inputs=(("x", "INT32", (4,)),))), "in shadow 'next' (fraud_v3)"),
        # a shadow that takes smaller batches: each copy of a larger request failed on it, counted
        # as the shadow's error (shadow_only) while the primary answered
        (
            signatures(next=sig("fraud_v3", batch=4)),
            "shadow 'next' (fraud_v3) takes batches of at most 4 and variant 'stable' (fraud_v1) of 8",
        ),
        (signatures(next=sig("fraud_v3", outputs=(("p", "FP32", (3,)),))), "shadow 'next' (fraud_v3) has no FP32"),
        # the compared output of another shape: every answer was an infinite disagreement
        (
            signatures(next=sig("fraud_v3", outputs=(("probabilities", "FP32", (4,)),))),
            "shadow 'next' (fraud_v3) gives output 'probabilities' as [4] and variant 'stable' (fraud_v1) as [3]",
        ),
        (
            signatures(next=sig("fraud_v3", outputs=(("probabilities", "FP32", (3, 1)),))),
            "gives output 'probabilities' as [3, 1]",
        ),
        # an upstream that declares no signature (MLServer's default) cannot be checked
        (
            signatures(canary=ModelSignature("fraud_v2", "remote", 8, (), (), open=True)),
            "variant 'canary' (fraud_v2) declares no inputs or outputs",
        ),
        (
            signatures(next=ModelSignature("fraud_v3", "remote", 8, (), (), open=True)),
            "shadow 'next' (fraud_v3) declares no inputs or outputs",
        ),
    ]
    for sigs, message in cases:
        with pytest.raises(ConfigError) as ei:
            check_signatures(r, sigs)
        assert message in str(ei.value), (message, str(ei.value))
    # A shadow that takes larger batches takes every copy.
    check_signatures(r, signatures(next=sig("fraud_v3", batch=16)))
    # A compared output of a variable size where the variants' is fixed may be compared.
    check_signatures(r, signatures(next=sig("fraud_v3", outputs=(("probabilities", "FP32", (-1,)),))))
    # An optional extra input is fine: requests for the first variant still suit it.
    check_signatures(
        r, signatures(canary=sig("fraud_v2", inputs=(("x", "FP32", (4,)), ("m", "BOOL", (4,))), optional=("m",)))
    )


def test_the_compared_output_and_an_input_sticky_key_must_exist():
    (r,) = parse_routes([{**ISSUE_EXAMPLE[0], "compare": {"output": "nope"}}])
    with pytest.raises(ConfigError, match="compare output 'nope' is not an output of 'fraud_v1'"):
        check_signatures(r, signatures())
    (r,) = parse_routes([{**ISSUE_EXAMPLE[0], "sticky_key": "input:x"}])
    with pytest.raises(ConfigError, match="sticky_key input 'x' must be a BYTES, BOOL or integer input"):
        check_signatures(r, signatures())
    ids = (("x", "FP32", (4,)), ("user", "INT64", (1,)))
    (r,) = parse_routes([{**ISSUE_EXAMPLE[0], "sticky_key": "input:user"}])
    check_signatures(r, {n: sig(m, inputs=ids) for n, m in (("stable", "a"), ("canary", "b"), ("next", "c"))})


def test_fuzz_finding_a_rollout_role_that_is_not_a_string_is_a_config_error():
    """Found by tests/fuzz/test_fuzz_routes.py: 'canary: []' raised TypeError (unhashable)."""
    raw = [
        {
            "name": "r",
            "variants": [{"name": "a", "model": "m", "weight": 1}, {"name": "b", "model": "n"}],
            "rollout": {"canary": [], "baseline": "a", "steps": [10]},
        }
    ]
    with pytest.raises(ConfigError, match="'canary' must name one of the route's variants"):
        parse_routes(raw)


def test_review_findings_scalar_sticky_input_and_zero_weight_tables():
    """A scalar input keys a cohort by its value (it raised IndexError: a 500); a kept table whose
    weights are all 0 is refused on reading (every pick would fail)."""
    from batchgate.core.routing import StickyKey

    req = InferRequest("r", "", (Tensor("id", "INT64", (), np.array(7, np.int64)),))
    assert sticky_key(StickyKey("input", "id"), req) == np.array([7], "<i8").tobytes()
    state = BucketTable.fresh("r", {"a": 1, "b": 1}).to_state()
    state["weights"] = {"a": 0, "b": 0}
    with pytest.raises(ValueError, match="not all 0"):
        BucketTable.from_state(state)


def test_a_routes_file_change_is_applied_only_once_it_stood_still_for_a_poll():
    """Regression: a poll that caught the file truncated mid-write read it as "no routes", and
    every route was gone until the next poll (a CI run's route lookup failed with KeyError)."""
    from batchgate.routes import Settled

    full, empty, edited = (1, 300, 10), (1, 0, 11), (1, 310, 12)
    settled = Settled(full)
    polls = [full, empty, edited, edited, edited, None, None, full, full]
    applied = [stamp for stamp in polls if settled.changed(stamp)]
    assert applied == [edited, None, full]  # the truncated moment is never read; a removal is, once settled
