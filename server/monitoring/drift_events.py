"""Drift events: CloudEvents 1.0 built for a state change, delivered to a webhook at least once.

Runs in the detector process (``drift_detector.py``). Each event gets its id when it is made and
keeps it through every retry and the dead-letter file, so a receiver de-duplicates on ``id``.

- ``format: cloudevents`` posts the event in structured mode (``application/cloudevents+json``,
  the whole event as the body); ``format: json`` posts it in binary mode (``data`` as the JSON
  body, the attributes as ``ce-*`` headers).
- A delivery is retried with exponential backoff (0.5 s doubling to 30 s, with jitter) up to the
  webhook's ``retries``; a 2xx answer is delivered, a redirect or any other status is a failure.
- An event that cannot be delivered goes to the dead letter: a JSONL file (``drift_dead_letter_file``;
  in memory when none is set), bounded by ``drift_dead_letter_max_events``. When it is full it is
  coalesced to the latest event per model (the newest state is what a receiver needs). The dead
  letter is retried every ``drift_dead_letter_retry_s``, oldest first; while it holds a model's
  events, that model's new events queue behind them, so a receiver sees each model's changes in
  order, and one model's receiver being down does not hold back the others'. Events not yet
  sent when the detector stops go to the dead letter too.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("batchgate.drift")

DETECTED = "io.batchgate.drift.detected"
RECOVERED = "io.batchgate.drift.recovered"
MAX_BACKOFF_S = 30.0


def make_event(kind: str, source: str, model: str, data: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """A CloudEvents 1.0 event (structured form, as a JSON object)."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": source,
        "type": kind,
        "subject": model,
        "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # a redirect is a failed delivery, never followed


_OPENER = urllib.request.build_opener(_NoRedirect)


def post(url: str, event: dict[str, Any], fmt: str, timeout_s: float) -> None:
    """One delivery attempt; raises OSError (or urllib's errors) when it fails."""
    if fmt == "cloudevents":
        body = json.dumps(event, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/cloudevents+json; charset=utf-8"}
    else:
        body = json.dumps(event["data"], separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        headers.update({f"ce-{k}": str(v) for k, v in event.items() if k not in ("data", "datacontenttype")})
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with _OPENER.open(req, timeout=timeout_s) as resp:
        if not 200 <= resp.status < 300:
            raise OSError(f"the webhook answered HTTP {resp.status}")


class DeadLetter:
    """Events not delivered: a bounded JSONL file (or a list in memory), oldest first."""

    def __init__(self, path: str, max_events: int):
        self.path = path
        self.max_events = max_events
        self.events: list[dict[str, Any]] = []
        self.coalesced = 0
        if path:
            self.events = self._read()

    def _read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines[-self.max_events * 2 :]:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            hook = entry.get("webhook") if isinstance(entry, dict) else None
            if (
                isinstance(hook, dict)
                and isinstance(entry.get("event"), dict)
                and isinstance(hook.get("url"), str)
                and hook["url"].startswith(("http://", "https://"))
                and hook.get("format") in ("cloudevents", "json")
                and isinstance(hook.get("timeout_s"), (int, float))
            ):
                out.append(entry)  # (an entry that is not what this file holds is left out)
        return out[-self.max_events :]

    def _write(self) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for entry in self.events:
                f.write(json.dumps(entry, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def add(self, event: dict[str, Any], webhook: dict[str, Any]) -> None:
        self.events.append({"event": event, "webhook": webhook})
        if len(self.events) > self.max_events:
            # full: keep the newest event of each model (the state a receiver must end up with)
            latest: dict[str, dict[str, Any]] = {}
            for entry in self.events:
                latest[str(entry["event"].get("subject"))] = entry
            kept = sorted(latest.values(), key=lambda e: self.events.index(e))[-self.max_events :]
            self.coalesced += len(self.events) - len(kept)
            self.events = kept
        self._write()

    def remove(self, entry: dict[str, Any]) -> None:
        self.events.remove(entry)
        self._write()

    def holds(self, subject: Any) -> bool:
        """Whether an event of this model (subject) waits here."""
        return any(e["event"].get("subject") == subject for e in self.events)

    def __len__(self) -> int:
        return len(self.events)


class EventSender:
    """Delivers events on a thread of its own; what fails goes to the dead letter."""

    def __init__(
        self,
        dead_letter: DeadLetter,
        retry_s: float,
        count: Callable[[str], None],
        poster: Callable[[str, dict[str, Any], str, float], None] = post,
    ):
        self.dead = dead_letter
        self.retry_s = retry_s
        self.count = count  # outcome -> counted: delivered, retried, dead_lettered, failed
        self.poster = poster
        self.queue: deque[tuple[dict[str, Any], dict[str, Any]]] = deque(maxlen=10_000)
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="batchgate-drift-events", daemon=True)
        self._thread.start()

    def send(self, event: dict[str, Any], webhook: dict[str, Any]) -> None:
        self.queue.append((event, webhook))
        self._wake.set()

    def close(self, wait_s: float = 2.0) -> None:
        """Stop; events not yet delivered go to the dead letter (the file keeps them for the
        next start)."""
        self._stop = True
        self._wake.set()
        self._thread.join(wait_s)
        while self.queue:
            event, webhook = self.queue.popleft()
            self.dead.add(event, webhook)
            self.count("dead_lettered")

    def _deliver(self, event: dict[str, Any], webhook: dict[str, Any], attempts: int) -> bool:
        delay = 0.5
        for attempt in range(attempts):
            if attempt:
                self.count("retried")
                time.sleep(min(MAX_BACKOFF_S, delay) * (0.5 + random.random()))
                delay *= 2
                if self._stop:
                    return False
            try:
                self.poster(webhook["url"], event, webhook["format"], webhook["timeout_s"])
                self.count("delivered")
                return True
            except Exception as e:  # any answer or failure of the receiver's is a failed attempt
                log.debug("drift event %s to %s failed: %s", event.get("id"), str(webhook.get("url"))[:256], e)
        return False

    def _run(self) -> None:
        while not self._stop:
            try:
                self._loop()
            except Exception:  # the sender must outlive anything one event does to it
                log.exception("drift events: the sender failed; going on")
                time.sleep(1.0)

    def _loop(self) -> None:
        next_retry = time.monotonic() + self.retry_s
        while not self._stop:
            self._wake.wait(min(1.0, max(0.01, next_retry - time.monotonic())))
            self._wake.clear()
            if self._stop:
                return
            while self.queue:
                event, webhook = self.queue.popleft()
                if self.dead.holds(event.get("subject")):  # behind its model's earlier failures: in order
                    self.dead.add(event, webhook)
                    self.count("dead_lettered")
                    next_retry = time.monotonic()
                elif not self._deliver(event, webhook, 1 + int(webhook.get("retries", 0))):
                    self.dead.add(event, webhook)
                    self.count("dead_lettered")
                    log.warning("drift event %s could not be delivered: kept in the dead letter", event["id"])
            if len(self.dead) and time.monotonic() >= next_retry:
                # oldest first; a model whose event fails keeps the rest of its events for the next
                # round, the other models' go on (one receiver down does not hold the others back)
                blocked: set[Any] = set()
                for entry in list(self.dead.events):
                    if self._stop:
                        break
                    subject = entry["event"].get("subject")
                    if subject in blocked:
                        continue
                    if self._deliver(entry["event"], entry["webhook"], 1):
                        self.dead.remove(entry)
                    else:
                        self.count("failed")
                        blocked.add(subject)
                next_retry = time.monotonic() + self.retry_s
