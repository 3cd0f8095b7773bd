"""uvicorn's traceback for a request the app failed (a 500) is kept to 5 a second; the next one
written says how many were left out (a probe found a 500 whose ~40-line traceback it could
have written 300 times in 0.4 s: 11,800 lines)."""

from __future__ import annotations

import logging

from batchgate.transport import http_listener


def record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, msg, None, None)


def test_app_tracebacks_are_kept_to_five_a_second_and_the_rest_counted():
    f = http_listener._NoLineEach()
    kept = [r for r in (record(http_listener._APP_EXCEPTION) for _ in range(20)) if f.filter(r)]
    assert len(kept) == 5
    assert f._tracebacks.dropped == 15


def test_other_lines_pass_and_unparsable_requests_are_not_logged():
    f = http_listener._NoLineEach()
    assert all(f.filter(record("something else")) for _ in range(50))
    assert not f.filter(record(http_listener._PARSER_WARNING))
