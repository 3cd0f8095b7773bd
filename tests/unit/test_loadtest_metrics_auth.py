"""The load tester's scrape of a --metrics-url with credentials, against real HTTP listeners."""

from __future__ import annotations

import base64
import http.server
import threading

import pytest

from batchgate.loadtest.server_view import ScrapeError, fetch


class _Listener:
    """A local HTTP server whose handler ``answer(handler)`` decides; it records each request's
    Authorization header."""

    def __init__(self, answer):
        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append(self.headers.get("Authorization"))
                answer(self)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _metrics(handler):
    body = b"# TYPE up gauge\nup 1\n"
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def test_credentials_go_to_the_url_given_and_not_along_a_redirect_to_another_host():
    """Review finding: the Authorization header was an ordinary one, which urllib copies onto the
    request a redirect makes, whatever host the redirect names."""
    elsewhere = _Listener(_metrics)

    def moved(handler):
        handler.send_response(302)
        handler.send_header("Location", f"http://localhost:{elsewhere.port}/metrics")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    first = _Listener(moved)
    try:
        samples = fetch(f"http://bob:s3cr%2Ft@127.0.0.1:{first.port}/metrics")
        assert samples["up"] == [({}, 1.0)]
        assert first.seen == ["Basic " + base64.b64encode(b"bob:s3cr/t").decode()]  # the %2F decoded
        assert elsewhere.seen == [None]
    finally:
        first.close()
        elsewhere.close()


def test_a_refused_scrape_does_not_say_the_password():
    def refuse(handler):
        handler.send_response(401)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    guard = _Listener(refuse)
    try:
        with pytest.raises(ScrapeError) as e:
            fetch(f"http://bob:s3cret@127.0.0.1:{guard.port}/metrics")
        assert "HTTP 401" in str(e.value) and "s3cret" not in str(e.value)
    finally:
        guard.close()
