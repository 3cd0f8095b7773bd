"""Fuzz: ``load_settings(file, flags, environ)`` returns Settings or raises ConfigError, whatever
the YAML file, the flags and the environment hold; nothing else escapes it."""

from __future__ import annotations

import warnings

import pytest
import yaml
from fuzz_support import budget, known_finding, mutated, one_in, outcome, repeated, server_recursion_limit
from hypothesis import given
from hypothesis import strategies as st

from batchgate.config import ALIASES, ENV_PREFIX, RESERVED_SECTIONS, SECTIONS, SETTINGS, Settings, load_settings
from batchgate.core.errors import ConfigError
from batchgate.remote_models import REMOTE_FIELDS

KINDS = {name: spec.kind for name, spec in SETTINGS.items()}
SETTING_NAMES = sorted([*SETTINGS, *ALIASES])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_config")
    (root / "models").mkdir()
    return root


def check_load(file, flags, environ):
    """load_settings' result, or None when it refused the settings with a ConfigError."""
    try:
        with warnings.catch_warnings(), server_recursion_limit():
            warnings.simplefilter("ignore", DeprecationWarning)  # deprecated spellings: a warning, by design
            out = load_settings(file, flags, environ)
    except ConfigError:
        outcome("refused")
        return None
    except Exception as e:
        found = known_finding(e)
        if found is None:
            raise
        outcome(f"known finding: {found.key}")
        return None
    assert isinstance(out, Settings)
    outcome("accepted")
    return out


# ------------------------------------------------------------------ values

odd_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(10**300, 10**400),  # past float range
    st.floats(),
    st.text(max_size=12),
    st.dates(),
    st.binary(max_size=6),
    st.sampled_from(["1e400", "inf", "nan", "-1", "0x10", "yes", "off", "٣", "²", "1_000", " 7 "]),
)
odd_values = st.recursive(
    odd_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6,
)


def good_value(draw, name: str, repo: str, clean: bool):
    """A value ``name`` accepts; unless ``clean``, also the edges of what it allows."""
    spec = SETTINGS[name]
    if name == "model_repository":
        return repo
    if spec.choices:
        return draw(st.sampled_from(spec.choices))
    if spec.kind == "int":
        low = spec.minimum if spec.minimum is not None else 0
        high = spec.maximum if spec.maximum is not None else low + 1000
        if name.endswith("_port"):
            low, high = (-1 if name == "metrics_port" else 0), 65535
        if not clean:
            low, high = low - 1, high + 1
        return draw(st.integers(low, high))
    if spec.kind == "float":
        return draw(st.floats(0.001, 1e6) if clean else st.one_of(st.floats(0.001, 1e6), st.just(0.0), st.just(-1.0)))
    if spec.kind == "bool":
        return draw(st.one_of(st.booleans(), st.sampled_from(["true", "off", "1", "yes", "On"])))
    if spec.kind == "list":
        if name == "model_batching_policy":
            good = ["m=triton", "m=work_conserving"]
            return draw(st.lists(st.sampled_from(good if clean else [*good, "m=x", "=triton", "m"]), max_size=2))
        return [] if clean else draw(st.lists(st.sampled_from(["*", "simple", "m"]), max_size=2))
    if spec.kind == "remote_models":
        entries = draw(st.lists(remote_models(clean), max_size=2))
        if clean:  # names are unique
            entries = [e for i, e in enumerate(entries) if not i]
        return entries
    return draw(st.text(max_size=10))


good_host_ports = st.one_of(
    st.sampled_from(["h:1", "10.0.0.5:8001", "[::1]:8001"]),
    st.from_regex(r"[a-z]{1,8}:[1-9][0-9]{0,3}", fullmatch=True),
)
host_ports = st.one_of(
    good_host_ports,
    st.sampled_from(["h:0", "h:65536", "h:", ":1", "h", "h:\u00b2", "h:٣", "h:1:2", " h:1 "]),
    st.from_regex(r"[a-z0-9.]{1,8}:[0-9]{1,6}", fullmatch=True),
)


@st.composite
def remote_models(draw, clean: bool = False):
    """A remote_models entry: a mapping or a 'key=value ...' line; unless ``clean``, with faults."""
    entry: dict = {"name": draw(st.sampled_from(["m", "r1", "a.b"]) if clean else st.text(max_size=6))}
    ups = draw(st.lists(good_host_ports if clean else host_ports, min_size=1, max_size=3))
    entry["upstreams"] = ",".join(ups) if draw(st.booleans()) else ups
    for key in draw(st.lists(st.sampled_from(sorted(REMOTE_FIELDS)), max_size=3)):
        kind = REMOTE_FIELDS[key].type
        if key in ("name", "upstreams"):
            continue
        if key == "batching":
            entry[key] = draw(st.sampled_from(["gateway", "passthrough"] if clean else ["gateway", "passthrough", "x"]))
        elif key == "eject_after_failures":
            entry[key] = draw(st.integers(1 if clean else 0, 10))
        elif key.startswith("tls_"):  # (a file or name needs tls: true, a certificate its key: not clean)
            entry[key] = "" if clean else draw(st.text(max_size=6))
        elif kind == "bool":
            entry[key] = draw(st.booleans() if clean else st.sampled_from([True, "false", "yes", 1, ""]))
        elif kind == "int":
            entry[key] = draw(st.integers(0, 100) if clean else st.sampled_from([-1, 3, "9" * 400, "1.5", "-0"]))
        elif kind == "float":
            entry[key] = draw(
                st.floats(0.01, 100) if clean else st.sampled_from([1, "0", "1e400", "nan", "-1", "9" * 400])
            )
        else:
            entry[key] = draw(st.from_regex(r"[a-z]{0,6}", fullmatch=True) if clean else st.text(max_size=6))
    if not clean and one_in(draw, 3):  # a fault: a field of another type, an unknown key, a missing key
        key = draw(st.sampled_from(["name", "upstreams", "upstreams", "retries", "timeout_s", "nope"]))
        if one_in(draw, 3):
            entry.pop(key, None)
        else:
            entry[key] = draw(odd_values)
    if draw(st.booleans()):
        return entry
    upstreams = entry.get("upstreams")
    if isinstance(upstreams, list):
        entry["upstreams"] = ",".join(str(u) for u in upstreams)
    return " ".join(f"{k.replace('_', draw(st.sampled_from(['_', '-'])))}={v}" for k, v in entry.items())


def setting_value(draw, name: str, repo: str, clean: bool):
    return good_value(draw, name, repo, clean) if clean or draw(st.integers(0, 3)) else draw(odd_values)


CLEAN_NAMES = sorted(n for n in SETTINGS if n != "load_model")  # load_model needs explicit mode


@st.composite
def documents(draw, repo: str, clean: bool):
    """A config file's mapping: sections of settings; unless ``clean``, wrong in places."""
    doc: dict = {}
    for name in draw(st.lists(st.sampled_from(CLEAN_NAMES if clean else sorted(SETTINGS)), max_size=6, unique=True)):
        value = setting_value(draw, name, repo, clean)
        section = SETTINGS[name].section
        if not section or (not clean and one_in(draw, 10)):  # top level: remote_models, or the deprecated flat form
            doc[name] = value
        else:
            if not clean and one_in(draw, 12):  # in another section
                section = draw(st.sampled_from(sorted(SECTIONS)))
            doc.setdefault(section, {})[name] = value
    if clean:
        return doc
    if one_in(draw, 10):
        doc[draw(st.one_of(st.sampled_from([*RESERVED_SECTIONS, "servers", "limit"]), st.text(max_size=6)))] = draw(
            odd_values
        )
    if one_in(draw, 10):
        doc[draw(st.sampled_from(sorted(SECTIONS)))] = draw(odd_values)
    if one_in(draw, 10) and isinstance(doc.setdefault("server", {}), dict):
        doc["server"][draw(st.sampled_from(["exit_timeout_secs", "nope", "Host"]))] = draw(odd_values)
    return doc


raw_yaml = st.one_of(
    st.sampled_from(
        [
            "",
            "~",
            "[]",
            "- 1",
            "server: [1, 2]",
            "server:\n\thost: a",
            "? [a, b]\n: 1",
            "server: !!python/object:os.system x",
            "a: &a [*a]",
            "server: &a {http_port: *a}",
            "limits:\n  max_queue_size: 1\n  max_queue_size: 2",
            "server: {host: !!binary aGVsbG8=}",
            "%YAML 1.1\n---\nserver: {}",
            "--- 1\n--- 2",
        ]
    ),
    st.text(max_size=60),
    st.builds(lambda d: "server: " + "[" * d + "]" * d, st.integers(1, 1200)),
    st.builds(lambda n: "server:\n  http_port: " + "9" * n, st.integers(1, 5000)),
)


@st.composite
def config_files(draw, repo: str, clean: bool) -> bytes | None:
    """A config file's bytes: a dumped document (maybe damaged), hand-written YAML, or junk."""
    kind = draw(st.sampled_from(range(3) if clean else range(9)))
    if kind == 0:
        return None
    if kind == 7:
        return draw(raw_yaml).encode()
    if kind == 8:
        return draw(st.binary(max_size=64))
    text = yaml.safe_dump(draw(documents(repo, clean)), allow_unicode=draw(st.booleans())).encode()
    if kind == 6:
        text = draw(mutated(text))
    return text


@st.composite
def flag_dicts(draw, repo: str, clean: bool) -> dict:
    flags: dict = {}
    for name in draw(st.lists(st.sampled_from(SETTING_NAMES), max_size=5, unique=True)):
        real = ALIASES[name].name if name in ALIASES else name
        if clean and real == "load_model":
            continue
        flags[name] = setting_value(draw, real, repo, clean)
    if one_in(draw, 8):
        flags[draw(st.sampled_from(SETTING_NAMES))] = draw(st.sampled_from([None, [], ()]))
    if not clean and one_in(draw, 8):
        flags[draw(st.text(max_size=8))] = draw(odd_values)
    return flags


def env_text(value, kind: str) -> str:
    """A value as the environment spells it."""
    if isinstance(value, bool):
        return str(value).lower()
    if kind == "remote_models":  # one line per model, separated by ';'
        lines = []
        for v in value:
            if isinstance(v, dict):
                v = " ".join(f"{k}={','.join(map(str, x)) if isinstance(x, list) else x}" for k, x in v.items())
            lines.append(v)
        return ";".join(lines)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


@st.composite
def environments(draw, repo: str, clean: bool) -> dict:
    env: dict = {}
    for name in draw(st.lists(st.sampled_from(SETTING_NAMES), max_size=5, unique=True)):
        real = ALIASES[name].name if name in ALIASES else name
        if clean and real == "load_model":
            continue
        if clean or draw(st.integers(0, 3)):
            value = env_text(good_value(draw, real, repo, clean), KINDS[real])
        else:
            value = draw(st.one_of(st.text(max_size=12), repeated(st.sampled_from(["9", "1 ", ";", ","]), 10, 5000)))
        env[ENV_PREFIX + name.upper()] = value
    if one_in(draw, 8):
        env[draw(st.text(max_size=8))] = draw(st.text(max_size=8))
    return env


@budget(0.25)
@given(data=st.data())
def test_load_settings(workdir, data):
    repo = str(workdir / "models")
    clean = one_in(data.draw, 3)  # every source right: most of these must load
    content = data.draw(config_files(repo, clean))
    file = write(workdir, content)
    if file is not None and not clean and one_in(data.draw, 20):
        file = str(workdir / "missing.yaml") if data.draw(st.booleans()) else str(workdir)  # unreadable
    flags = data.draw(st.one_of(st.none(), flag_dicts(repo, clean)))
    env = data.draw(environments(repo, clean))
    if clean:
        env[ENV_PREFIX + "MODEL_REPOSITORY"] = repo
    check_load(file, flags, env)


def write(workdir, content: bytes | None) -> str | None:
    if content is None:
        return None
    path = workdir / "config.yaml"
    path.write_bytes(content)
    return str(path)


# Edge cases kept whatever the generator draws (the findings are pinned in test_fuzz_findings.py):
# (file bytes or None, flags, environment; REPO stands for an existing model repository).
EDGES = [
    (None, None, {"BATCHGATE_MODEL_REPOSITORY": "REPO", "BATCHGATE_HTTP_PORT": "١٢"}),  # int() reads these digits
    (None, {"model_repository": "", "remote_models": ["name=m upstreams=h:1"]}, {}),
    (None, {"model_repository": "REPO\x00"}, {}),
    (b"server: &a [*a]\n", None, {}),
    (b"remote_models:\n  - name: m\n    upstreams: []\n", None, {}),
    (None, {"http_port": float("inf")}, {}),
]


@pytest.mark.parametrize(("content", "flags", "env"), EDGES)
def test_load_settings_edges(workdir, content, flags, env):
    repo = str(workdir / "models")
    flags = (
        None if flags is None else {k: v.replace("REPO", repo) if isinstance(v, str) else v for k, v in flags.items()}
    )
    check_load(write(workdir, content), flags, {k: v.replace("REPO", repo) for k, v in env.items()})
