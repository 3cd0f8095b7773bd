"""What the server says about a step: its Prometheus endpoint scraped before and after, the
gauges lined up with the measurement windows, and the server-side view of latency and batching
(histogram quantiles, mean batch size) the report sets beside the client's."""

from __future__ import annotations

import base64
import http.client
import math
import time
import urllib.error
import urllib.request
from urllib.parse import unquote, urlsplit, urlunsplit

Samples = dict[str, list[tuple[dict, float]]]
MAX_SCRAPE_BYTES = 64 << 20  # a metrics page larger than 64 MiB is refused, not read into memory


class ScrapeError(RuntimeError):
    """The metrics endpoint did not answer with Prometheus text; the message says how."""


def _request(url: str) -> urllib.request.Request:
    """The scrape of ``url``: a ``user:password@`` in it is sent as HTTP basic authentication
    (urllib would take it for part of the host name, and say so with the password in its error)."""
    parts = urlsplit(url)
    if parts.username is None:
        return urllib.request.Request(url)
    plain = urllib.request.Request(urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])))
    user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    # (unredirected: a redirect to another host must not carry the credentials along)
    plain.add_unredirected_header("Authorization", "Basic " + base64.b64encode(user_pass.encode()).decode())
    return plain


def read(url: str) -> str:
    """The Prometheus endpoint's page at ``url`` (ScrapeError if it does not answer with one)."""
    try:
        with urllib.request.urlopen(_request(url), timeout=2) as resp:
            body = resp.read(MAX_SCRAPE_BYTES + 1)
        text = body.decode()
    except urllib.error.HTTPError as e:
        raise ScrapeError(f"it answered HTTP {e.code}") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # (URLError is an OSError)
        raise ScrapeError(f"no answer ({getattr(e, 'reason', None) or e})") from None
    if len(body) > MAX_SCRAPE_BYTES:
        raise ScrapeError(f"the answer is larger than {MAX_SCRAPE_BYTES >> 20} MiB")
    return text


def parse(text: str) -> Samples:
    """Every sample of a Prometheus page, by metric name (ScrapeError if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out.setdefault(s.name, []).append((s.labels, s.value))
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise ScrapeError(f"not Prometheus text ({e})") from None
    if not out:
        raise ScrapeError("no Prometheus samples in the answer")
    return out


def fetch(url: str) -> Samples:
    """Every sample of the Prometheus endpoint at ``url``, by metric name (ScrapeError if none)."""
    return parse(read(url))


def scrape(url: str | None) -> Samples | None:
    """Every sample of the Prometheus endpoint, by metric name (None when not configured or when
    it does not answer with Prometheus text)."""
    return scrape_timed(url)[0]


def scrape_timed(url: str | None) -> tuple[Samples | None, float]:
    """:func:`scrape`, and the seconds the endpoint took to answer (reading its page, not parsing
    it: the figures are those of the moment the server wrote the page)."""
    if not url:
        return None, 0.0
    t0 = time.monotonic()
    try:
        text = read(url)
    except ScrapeError:
        return None, time.monotonic() - t0
    took = time.monotonic() - t0
    try:
        return parse(text), took
    except ScrapeError:
        return None, took


def _sum(samples, name: str, model: str, **labels) -> float | None:
    vals = [
        v
        for lab, v in (samples or {}).get(name, [])
        if lab.get("model") == model and all(lab.get(k) == want for k, want in labels.items())
    ]
    return sum(vals) if vals else None


# batchgate's names, then Triton's, for the few gauges the report lines up with the windows
GAUGES = {
    "queue_depth": ("batchgate_queue_depth", "nv_inference_pending_request_count"),
    "inflight": ("batchgate_inflight_requests",),
}


def gauges(samples, model: str) -> dict[str, float]:
    out = {}
    for key, names in GAUGES.items():
        for name in names:
            v = _sum(samples, name, model)
            if v is not None:
                out[key] = v
                break
    return out


def _buckets(samples, name: str, model: str, protocol: str | None) -> dict[float, float]:
    out: dict[float, float] = {}
    for lab, v in (samples or {}).get(name, []):
        if lab.get("model") != model or (protocol and lab.get("protocol") not in (None, protocol)):
            continue
        le = float(lab["le"])
        out[le] = out.get(le, 0.0) + v
    return out


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """A quantile of the observations made between two scrapes of a Prometheus histogram,
    interpolated within its bucket (as PromQL's histogram_quantile does)."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for le, c in zip(les, counts):
        if c >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * ((rank - below) / (c - below) if c > below else 1.0)
        lower, below = le, c
    return lower


def server_view(before, after, model: str, protocol: str) -> dict:
    """What the server says about the step: its own request latency and queue figures."""
    if before is None or after is None:
        return {}
    out: dict = {}
    for key, name, proto in (
        ("request", "batchgate_request_duration_seconds_bucket", protocol),
        ("queue", "batchgate_queue_duration_seconds_bucket", None),
    ):
        b, a = _buckets(before, name, model, proto), _buckets(after, name, model, proto)
        if a:
            for q in (0.5, 0.9, 0.99):
                v = histogram_quantile(b, a, q)
                out[f"{key}_p{int(q * 100)}_ms"] = None if v is None else v * 1000
            out[f"{key}_count"] = a.get(math.inf, 0.0) - b.get(math.inf, 0.0)
    mean = batch_mean(before, after, model)
    if mean is not None:
        out["batch_size_mean"] = mean
    return out


def batch_mean(before, after, model: str) -> float | None:
    """Mean rows per execution between two scrapes (batchgate's batch-size histogram)."""
    rows0, rows1 = [_sum(x, "batchgate_batch_size_sum", model) for x in (before, after)]
    execs0, execs1 = [_sum(x, "batchgate_batch_size_count", model) for x in (before, after)]
    if rows0 is None or rows1 is None or execs0 is None or execs1 is None or execs1 <= execs0:
        return None
    return (rows1 - rows0) / (execs1 - execs0)
