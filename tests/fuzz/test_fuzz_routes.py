"""Fuzz: a ``routes`` definition (the config file's list, a routes file) is parsed into checked
routes or refused with a ConfigError, whatever it holds; a refused file changes nothing."""

from __future__ import annotations

import copy

import yaml
from fuzz_support import budget, one_in, outcome
from hypothesis import given
from hypothesis import strategies as st

from batchgate.core.buckets import BUCKETS, BucketTable
from batchgate.core.errors import ConfigError
from batchgate.core.routing import parse_routes
from batchgate.routes import read_routes_file
from route_support import EXAMPLE_ROUTE

GOOD = EXAMPLE_ROUTE

odd = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.text(max_size=10),
        st.sampled_from(["", "a/b", "../x", "x" * 200, "header:", "input:x", "param:", "header:X-A", "nan"]),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


@st.composite
def route_lists(draw):
    """The issue's example route, with a few of its fields (at any depth) replaced or dropped."""
    routes = [copy.deepcopy(GOOD) for _ in range(draw(st.integers(1, 3)))]
    for i, r in enumerate(routes):
        r["name"] = f"r{i}"
    for _ in range(draw(st.integers(0, 4))):
        node = draw(st.sampled_from(routes))
        while isinstance(node, (dict, list)) and node and one_in(draw, 2):
            key = draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
            if not isinstance(node[key], (dict, list)):
                break
            node = node[key]
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(list(node)))
            if one_in(draw, 3):
                del node[key]
            else:
                node[key] = draw(odd)
        elif isinstance(node, list) and node:
            node[draw(st.integers(0, len(node) - 1))] = draw(odd)
    return routes if not one_in(draw, 10) else draw(odd)


@budget(0.25)
@given(raw=route_lists())
def test_parse_routes_checks_or_refuses(raw):
    try:
        routes = parse_routes(raw)
    except ConfigError as e:
        assert "\n" not in str(e) and len(str(e)) < 2000
        outcome("refused")
        return
    outcome("accepted")
    for r in routes:
        table = BucketTable.fresh(r.name, r.weights)
        assert sum(table.counts().values()) == BUCKETS
        assert BucketTable.from_state(table.to_state()).owners == table.owners


@budget(0.1)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_a_routes_file_of_anything_is_read_or_refused(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("routes_file") / "routes.yaml"
    path.write_text(text if not text.startswith("routes") else text, encoding="utf-8", errors="surrogatepass")
    try:
        read_routes_file(str(path))
        outcome("read")
    except ConfigError:
        outcome("refused")


def test_the_example_route_parses():
    (route,) = parse_routes(yaml.safe_load(yaml.safe_dump([GOOD])))
    assert route.rollout is not None and route.rollout.steps == (10, 25, 50, 100)
