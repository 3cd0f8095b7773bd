"""Load-test scenario files: keyed by exactly the flags' long names, checked key by key, with YAML
lists for sweeps; and the example scenarios shipped in loadtest/examples/, read by the real parser."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from batchgate.loadtest.cli import DEFAULT_OUT, add_parser, resolve, scenario_keys
from batchgate.loadtest.scenario import LoadTestError, concurrency_levels, rate_sweep

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "loadtest" / "examples").glob("*.yaml"))


def _args(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    add_parser(sub)
    return ap.parse_args(["loadtest", *argv])


def _file(tmp_path: Path, text: str) -> str:
    f = tmp_path / "s.yaml"
    f.write_text(text)
    return str(f)


def test_examples_ship():
    assert len(EXAMPLES) >= 2, EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_reads_through_the_real_parser_and_checks(path):
    sc, out, _ = resolve(_args("--scenario", str(path)))
    sc.check()  # shape, sweep and every value in range
    assert sc.target and sc.model
    assert sc.sweep_rate or sc.sweep_concurrency  # each example is a sweep
    assert out.startswith(DEFAULT_OUT)  # into the git-ignored folder
    assert path.read_text().lstrip().startswith("#")  # commented (resolve refused any key that is not a flag's)


def test_gitignore_covers_the_default_output_folder():
    root = Path(__file__).resolve().parents[2]
    lines = (root / ".gitignore").read_text().splitlines()
    assert f"{DEFAULT_OUT}/" in lines or DEFAULT_OUT in lines


def test_keys_are_the_flag_names_in_either_spelling(tmp_path):
    f = _file(
        tmp_path,
        "target: h:8001\nmodel: m\nmodel-version: 2\nduration: 3\nwarmup: 0.5\nwindow: 0.25\ncooldown: 0\n"
        "max_lag_p99_ms: 4\nprecise-timing: true\nslo-p99-ms: 20\nerror_budget: 0.01\nout: res/x\nquiet: true\n"
        "streams-per-channel: 3\nlate-ms: 2\nmin-achieved: 0.9\npayloads: 4\n",
    )
    sc, out, quiet = resolve(_args("--scenario", f))
    assert (sc.target, sc.model, sc.version) == ("h:8001", "m", "2")
    assert (sc.duration_s, sc.warmup_s, sc.window_s, sc.cooldown_s) == (3, 0.5, 0.25, 0)
    assert (sc.max_lag_p99_ms, sc.precise_timing, sc.slo_p99_ms, sc.error_budget) == (4, True, 20, 0.01)
    assert (sc.streams_per_channel, sc.late_ms, sc.min_achieved, sc.payloads) == (3, 2, 0.9, 4)
    assert (out, quiet) == ("res/x", True)
    assert resolve(_args("h:1", "--model", "m"))[1:] == (DEFAULT_OUT, False)


def _sample(key) -> tuple[object, list[str]]:
    """A value for a key, as YAML would give it and as flags would spell it."""
    if key.kind == "bool":
        return True, [f"--{key.name}"]
    value: object = {"int": 3, "float": 2.5}.get(key.kind, key.choices[-1] if key.choices else "x:1")
    return value, [f"--{key.name}", str(value)] if key.name != "target" else [str(value)]


# what a key needs beside it to be used at all (else it is refused as ignored)
_CONTEXT = {
    "connections": ("protocol", "http"),
    "http-encoding": ("protocol", "http"),
    "cooldown": ("sweep-rate", "1,2"),
}


@pytest.mark.parametrize("name", sorted(scenario_keys()))
def test_each_key_sets_what_its_flag_sets(tmp_path, name):
    key = scenario_keys()[name]
    value, argv = _sample(key)
    base = {"target": "h:1", "model": "m"}
    base.pop(name, None)
    context = _CONTEXT.get(name)
    head = "".join(f"{k}: {v}\n" for k, v in base.items()) + (f"{context[0]}: {context[1]}\n" if context else "")
    for spelling in {name, name.replace("-", "_")}:
        f = _file(tmp_path, head + f"{spelling}: {str(value).lower() if value is True else value}\n")
        from_file = resolve(_args("--scenario", f))
        from_flags = resolve(
            _args(
                *argv,
                *base.get("target", "").split(),
                *(["--model", "m"] if "model" in base else []),
                *([f"--{context[0]}", context[1]] if context else []),
            )
        )
        assert from_file == from_flags, (spelling, from_file, from_flags)


def test_an_unknown_key_is_named_with_a_hint_and_the_valid_keys_are_listed(tmp_path):
    f = _file(tmp_path, "target: h:1\nmodel: m\nduration_s: 3\nworkrs: 2\n")
    with pytest.raises(LoadTestError) as e:
        resolve(_args("--scenario", f))
    msg = str(e.value)
    assert "'duration_s' (the key is 'duration')" in msg and "'workrs' (did you mean 'workers'?)" in msg
    listed = msg.split("Valid keys")[1].split(": ", 1)[1].split(", ")
    assert listed == sorted(scenario_keys()) and "duration" in listed and "sweep-rate" in listed
    assert "scenario" not in listed and "help" not in listed
    f = _file(tmp_path, "target: h:1\nmodel: m\nmode: closed\n")
    with pytest.raises(LoadTestError, match="'mode' \\(closed loop: give concurrency and no rate\\)"):
        resolve(_args("--scenario", f))


@pytest.mark.parametrize(
    "line, words",
    [
        ("rate: fast", "'rate' must be a number, not 'fast'"),
        ("workers: 2.5", "'workers' must be a whole number, not 2.5"),
        ("workers: [2]", "'workers' must be a whole number"),
        ("precise-timing: 1", "'precise-timing' must be true or false, not 1"),
        ("protocol: udp", "'protocol' must be one of grpc, http, not 'udp'"),
        ("shape: {a: 1}", "'shape' must be text"),
        ("sweep-concurrency: [1, 2.5]", "'sweep-concurrency' as a list is a list of whole numbers"),
        ("sweep-rate: [100, fast]", "'sweep-rate' as a list is a list of numbers"),
        ("sweep-rate: []", "'sweep-rate' as a list is a list of numbers"),
        ("duration: .nan", "'duration' must be a number"),
    ],
)
def test_a_value_of_the_wrong_type_names_its_key(tmp_path, line, words):
    f = _file(tmp_path, f"target: h:1\nmodel: m\n{line}\n")
    with pytest.raises(LoadTestError, match=re.escape("s.yaml: " + words)):
        resolve(_args("--scenario", f))


@pytest.mark.parametrize(
    "text, words",
    [
        ("max-lag-p99-ms: 4\nmax_lag_p99_ms: 5\n", "'max-lag-p99-ms' is given twice"),
        ("rate: 4\nrate: 5\n", "key 'rate' is given twice"),
        ("- rate\n", "must be a mapping of keys to values"),
        ("rate: [1\n", "cannot read scenario"),
    ],
)
def test_a_malformed_file_is_refused(tmp_path, text, words):
    with pytest.raises(LoadTestError, match=words):
        resolve(_args("--scenario", _file(tmp_path, text)))
    with pytest.raises(LoadTestError, match="cannot read scenario"):
        resolve(_args("--scenario", str(tmp_path / "missing.yaml")))


@pytest.mark.parametrize(
    "text, words",
    [
        ("rate: [1\n", "(line 2, column 1)"),
        ("rate: 'x\n  y\tz: [\n", "found unexpected end of stream"),
        ('rate: "\\U80092014"\n', "(line 1, column"),  # PyYAML's scanner: OverflowError / ValueError
        ("[" * 5000 + "]" * 5000, "cannot read scenario"),  # nesting: RecursionError
        (b"rate: \xff\n", "can't decode byte 0xff"),
    ],
)
def test_a_file_yaml_cannot_read_is_one_line_saying_where(tmp_path, text, words):
    """Review finding: PyYAML's error text spans four lines (the line quoted, a caret under it),
    and a few odd inputs raised past the handler as a traceback: one line now, with the place."""
    f = tmp_path / "bad.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(LoadTestError) as e:
        resolve(_args("--scenario", str(f)))
    message = str(e.value)
    assert message.startswith(f"cannot read scenario {f}: ") and words in message, message
    assert "\n" not in message and len(message) < 400 + len(str(f))


def test_sweeps_take_yaml_lists_and_colon_forms_stay_text(tmp_path):
    f = _file(tmp_path, "target: h:1\nmodel: m\nsweep-concurrency: [1, 2, 4, 8]\n")
    sc = resolve(_args("--scenario", f))[0]
    assert sc.mode == "closed" and concurrency_levels(sc.sweep_concurrency) == [1, 2, 4, 8]
    f = _file(tmp_path, "target: h:1\nmodel: m\nsweep-rate: [100, 250.5, 123456]\n")
    sc = resolve(_args("--scenario", f))[0]
    assert rate_sweep(sc).rates == [100, 250.5, 123456] and rate_sweep(sc).method == "step"
    # YAML 1.1 would read 10:50 as 650 (base 60); here it stays the LOW:HIGH it says
    f = _file(tmp_path, "target: h:1\nmodel: m\nsweep-rate: 10:50\nsearch: binary\n")
    assert rate_sweep(resolve(_args("--scenario", f))[0]).rates == [10, 50]
    f = _file(tmp_path, "target: h:1\nmodel: m\nrate: 1e3\n")  # (and 1e3 is a number)
    assert resolve(_args("--scenario", f))[0].rate == 1000.0
    f = _file(tmp_path, "target: h:1\nmodel: m\nsweep-rate: 1:3:1\n")
    assert rate_sweep(resolve(_args("--scenario", f))[0]).rates == [1, 2, 3]


def test_flags_win_over_the_file_and_the_loop_follows_what_was_given(tmp_path):
    f = _file(tmp_path, "target: h:8001\nmodel: m\nconcurrency: 4\nduration: 9\nout: a\n")
    sc, out, _ = resolve(_args("--scenario", f))
    assert sc.mode == "closed" and sc.concurrency == 4 and sc.duration_s == 9 and out == "a"
    sc, out, _ = resolve(_args("--scenario", f, "--rate", "50", "--duration", "2", "--out", "b", "other:1"))
    assert sc.mode == "open" and sc.rate == 50 and sc.duration_s == 2 and out == "b" and sc.target == "other:1"
    f = _file(tmp_path, "target: h:8001\nmodel: m\nrate: 50\n")
    assert resolve(_args("--scenario", f, "--concurrency", "3"))[0].mode == "closed"
    f = _file(tmp_path, "target: h:8001\nmodel: m\nrate: 50\nconcurrency: 3\n")
    with pytest.raises(LoadTestError, match="rate cannot be combined with concurrency"):
        resolve(_args("--scenario", f))  # both at one level: one was ignored (the concurrency), so neither wins


def test_an_empty_value_leaves_the_default(tmp_path):
    f = _file(tmp_path, "target: h:1\nmodel: m\nslo-p99-ms:\nduration:\n")
    sc = resolve(_args("--scenario", f))[0]
    assert sc.slo_p99_ms is None and sc.duration_s == 10.0


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://bob:s3cret@host:8002/metrics", "http://bob:***@host:8002/metrics"),
        ("http://bob:s3/cr?et#x@host/metrics", "http://bob:***@host/metrics"),  # urllib finds no password here
        ("http://T0KEN-s3cret@host/metrics", "http://***@host/metrics"),  # a name alone is often a token
        ("http://u:s3cret@[::1]:8002/m", "http://u:***@[::1]:8002/m"),
        ("http://host:8002/metrics", "http://host:8002/metrics"),
    ],
)
def test_a_metrics_url_is_shown_without_what_identifies_its_caller(url, shown):
    from batchgate.loadtest.scenario import check_metrics_url, without_password

    assert without_password(url) == shown
    if "?" in url:  # a password with an unescaped / ? #: refused, and not quoted
        with pytest.raises(LoadTestError) as e:
            check_metrics_url(url)
        assert "percent-escaped" in str(e.value) and "s3" not in str(e.value)
    else:
        check_metrics_url(url)


def test_one_line_keeps_the_place_when_the_problem_is_all_escapes():
    """Review finding: the text was cut before its control characters were escaped (each to
    four characters), so the last cut took the line and column off."""
    import types

    from batchgate.core.unique_yaml import one_line

    text = one_line(ValueError("\x01" * 240), types.SimpleNamespace(line=4, column=6))
    assert text.endswith("(line 5, column 7)") and "\x01" not in text and len(text) < 300
