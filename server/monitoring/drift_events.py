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
  order, and one model's receiver being down does not hold back the others'.
- Each receiver (webhook URL) is delivered to on a thread of its own (at most ``MAX_LANES``; more
  receivers share them), so a slow receiver and its retries delay only its own events.
- Events not yet sent when the detector stops, and those still in delivery then, go to the dead
  letter too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("batchgate.drift")

DETECTED = "io.batchgate.drift.detected"
RECOVERED = "io.batchgate.drift.recovered"
MAX_BACKOFF_S = 30.0
MAX_LANES = 8  # receivers delivered to at once (threads); more share them


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


# Name look-ups of the webhooks' hosts: on threads of their own, so that an attempt waits for one
# no longer than its deadline (getaddrinfo takes no timeout, and a resolver that does not answer
# held the lane's thread for as long as the system's resolver kept trying). A look-up past its
# attempt's deadline finishes on its (daemon) thread; attempts for a name already being looked up
# wait for that look-up rather than start another, so a name that hangs holds one thread whatever
# its retries, and at most MAX_LANES names are looked up at once. An IP address is not looked up.
_LOOKUPS: dict[tuple[str, int], concurrent.futures.Future] = {}
_LOOKUPS_LOCK = threading.Lock()


def _look_up(host: str, port: int) -> concurrent.futures.Future:
    key = (host, port)
    with _LOOKUPS_LOCK:
        running = _LOOKUPS.get(key)
        if running is not None:
            return running
        if len(_LOOKUPS) >= MAX_LANES:
            raise OSError(f"{len(_LOOKUPS)} webhook host names are being looked up already, none answered yet")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        _LOOKUPS[key] = fut

    def run() -> None:
        try:
            fut.set_result(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits
            fut.set_exception(e)
        finally:
            with _LOOKUPS_LOCK:
                _LOOKUPS.pop(key, None)

    threading.Thread(target=run, name="drift-dns", daemon=True).start()  # (daemon: exit never waits on it)
    return fut


class _Deadline:
    """Shuts down, once ``seconds`` have passed, every socket an attempt opened: a socket's own
    timeout bounds each read, so a receiver answering a byte at a time held its lane for ever.
    Its :meth:`connect` bounds the host's name look-up by the same deadline."""

    def __init__(self, seconds: float):
        self._ends = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._socks: list[Any] = []
        self._over = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock) -> None:
        with self._lock:
            self._socks.append(sock)
            if not self._over:
                return
        self._shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self._over = True
            socks = list(self._socks)
        for sock in socks:
            self._shut(sock)

    @staticmethod
    def _shut(sock) -> None:
        with contextlib.suppress(OSError):  # (closed already)
            sock.shutdown(socket.SHUT_RDWR)  # a read blocked in it returns at once

    def cancel(self) -> None:
        self._timer.cancel()

    def connect(self, address: tuple[str, int], timeout: Any = None, source_address: Any = None) -> socket.socket:
        """``socket.create_connection``, the name looked up within what is left of the deadline."""
        host, port = address
        try:
            ipaddress.ip_address(host)
        except ValueError:  # a name: looked up on a thread (see _look_up)
            try:
                infos = _look_up(host, port).result(timeout=max(0.0, self._ends - time.monotonic()))
            except concurrent.futures.TimeoutError:
                raise OSError(f"looking up the webhook's host {host[:253]!r} took longer than its timeout_s") from None
        else:  # an address: nothing to look up
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        failure: OSError = OSError(f"no address for the webhook's host {host[:253]!r}")
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                self.watch(sock)  # (a connect still pending at the deadline ends there)
                if timeout is not None and timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                failure = e
                sock.close()
        raise failure


def _bounded_handler(base: type, deadline: _Deadline):
    """``base`` (urllib's HTTP or HTTPS handler) whose connections ``deadline`` watches."""

    class Handler(base):
        def do_open(self, http_class, req, **kw):
            class Watched(http_class):
                def __init__(self, *args, **kwargs):
                    super().__init__(*args, **kwargs)
                    self._create_connection = deadline.connect  # (http.client's hook for making the socket)

                def connect(self):
                    super().connect()
                    deadline.watch(self.sock)

            return super().do_open(Watched, req, **kw)

    return Handler()


def post(url: str, event: dict[str, Any], fmt: str, timeout_s: float) -> None:
    """One delivery attempt, over within about ``timeout_s`` whatever the receiver does (its
    connection included); raises OSError (or urllib's errors) when it fails."""
    if fmt == "cloudevents":
        body = json.dumps(event, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/cloudevents+json; charset=utf-8"}
    else:
        body = json.dumps(event["data"], separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        headers.update({f"ce-{k}": str(v) for k, v in event.items() if k not in ("data", "datacontenttype")})
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    deadline = _Deadline(timeout_s)
    opener = urllib.request.build_opener(
        _NoRedirect,
        _bounded_handler(urllib.request.HTTPHandler, deadline),
        _bounded_handler(urllib.request.HTTPSHandler, deadline),
    )
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            if not 200 <= resp.status < 300:
                raise OSError(f"the webhook answered HTTP {resp.status}")
    finally:
        deadline.cancel()


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
        try:  # (a byte that is not UTF-8 spoils its line only: that line is left out below)
            with open(self.path, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return []
        except OSError as e:  # the detector must start whatever the file is: what it held is lost
            log.error("drift: the dead letter %s cannot be read (%s); starting with it empty", self.path, e)
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
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for entry in self.events:
                    f.write(json.dumps(entry, separators=(",", ":")) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:  # (a full disk): the events stay in memory and are retried from there
            log.error("drift: the dead letter %s cannot be written (%s); its events are kept in memory", self.path, e)

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

    def retarget(self, hooks: dict[str, dict[str, Any]]) -> None:
        """Each kept event of a model in ``hooks`` goes to that model's webhook now: one kept for
        a URL no longer configured was retried there for ever, and the model's new events, kept
        in order behind it, were never delivered (until 2026-12-06)."""
        changed = False
        for entry in self.events:
            hook = hooks.get(str(entry["event"].get("subject")))
            if hook is not None and entry["webhook"] != hook:
                entry["webhook"] = dict(hook)
                changed = True
        if changed:
            self._write()

    def remove(self, entry: dict[str, Any]) -> None:
        self.events.remove(entry)
        self._write()

    def holds(self, subject: Any) -> bool:
        """Whether an event of this model (subject) waits here."""
        return any(e["event"].get("subject") == subject for e in self.events)

    def __len__(self) -> int:
        return len(self.events)


class _Lane:
    """One receiver's deliveries: its queue, its thread, the event it is delivering now."""

    def __init__(self, key: str):
        self.key = key
        self.queue: deque[tuple[dict[str, Any], dict[str, Any]]] = deque(maxlen=10_000)
        self.wake = threading.Event()
        self.current: tuple[dict[str, Any], dict[str, Any]] | None = None  # taken from the queue, not yet settled
        self.thread: threading.Thread | None = None


class EventSender:
    """Delivers events, each receiver (webhook URL) on a thread of its own, at most
    :data:`MAX_LANES` of them (more receivers share them): a slow or unreachable receiver, and its
    retries, hold back only its own events. What fails goes to the dead letter; so does, at
    :meth:`close`, what was waiting or still in delivery."""

    def __init__(
        self,
        dead_letter: DeadLetter,
        retry_s: float,
        count: Callable[[str], None],
        poster: Callable[[str, dict[str, Any], str, float], None] = post,
    ):
        self.dead = dead_letter
        self.retry_s = retry_s
        self._count = count  # outcome -> counted: delivered, retried, dead_lettered, failed
        self.poster = poster
        self.lanes: dict[str, _Lane] = {}
        self._lane_of: dict[str, _Lane] = {}  # webhook URL -> its lane
        self._lock = threading.Lock()  # the lanes, the dead letter, the counts and each lane's current event
        self._stopped = threading.Event()
        for entry in list(self.dead.events):  # a dead letter kept from before: retried by its receivers' lanes
            self._lane(str(entry["webhook"]["url"]))

    @property
    def _stop(self) -> bool:
        return self._stopped.is_set()

    def count(self, outcome: str) -> None:
        with self._lock:
            self._count(outcome)

    def _lane(self, url: str) -> _Lane:
        with self._lock:
            lane = self._lane_of.get(url)
            if lane is None:
                if len(self.lanes) < MAX_LANES:
                    lane = self.lanes[url] = _Lane(url)
                    lane.thread = threading.Thread(
                        target=self._run, args=(lane,), name="batchgate-drift-events", daemon=True
                    )
                    lane.thread.start()
                else:  # a receiver past the bound shares a lane (its events stay in order there)
                    keys = sorted(self.lanes)
                    lane = self.lanes[keys[zlib.crc32(url.encode()) % len(keys)]]
                self._lane_of[url] = lane
            return lane

    def send(self, event: dict[str, Any], webhook: dict[str, Any]) -> None:
        lane = self._lane(str(webhook["url"]))
        lane.queue.append((event, webhook))
        lane.wake.set()

    def unsettled(self) -> list[str]:
        """The ids of events not settled yet: queued, in delivery, or in a dead letter kept in
        memory only (all lost if this process dies; the gateway hands them to the next one)."""
        with self._lock:
            held = [e for lane in self.lanes.values() for e, _ in ([lane.current] if lane.current else [])]
            held += [e for lane in self.lanes.values() for e, _ in lane.queue]
            held += [entry["event"] for entry in self.dead.events] if not self.dead.path else []
        return [str(e.get("id")) for e in held]

    def close(self, wait_s: float = 2.0) -> None:
        """Stop; events not yet delivered, those in delivery included, go to the dead letter (the
        file keeps them for the next start). A delivery that still ends well after this is a
        duplicate the receiver de-duplicates on the id (delivery is at least once)."""
        self._stopped.set()
        for lane in list(self.lanes.values()):
            lane.wake.set()
        deadline = time.monotonic() + wait_s
        for lane in list(self.lanes.values()):
            if lane.thread is not None:
                lane.thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for lane in self.lanes.values():
                waiting = [lane.current] if lane.current is not None else []
                lane.current = None  # (taken: its thread, if it ever gets back, leaves it alone)
                waiting += list(lane.queue)
                lane.queue.clear()
                for event, webhook in waiting:
                    self.dead.add(event, webhook)
                    self._count("dead_lettered")

    def _deliver(self, event: dict[str, Any], webhook: dict[str, Any], attempts: int) -> bool:
        delay = 0.5
        for attempt in range(attempts):
            if attempt:
                self.count("retried")
                if self._stopped.wait(min(MAX_BACKOFF_S, delay) * (0.5 + random.random())):
                    return False
                delay *= 2
            try:
                self.poster(webhook["url"], event, webhook["format"], webhook["timeout_s"])
                self.count("delivered")
                return True
            except Exception as e:  # any answer or failure of the receiver's is a failed attempt
                log.debug("drift event %s to %s failed: %s", event.get("id"), str(webhook.get("url"))[:256], e)
        return False

    def _run(self, lane: _Lane) -> None:
        while not self._stop:
            try:
                self._loop(lane)
            except Exception:  # the lane must outlive anything one event does to it
                log.exception("drift events: the sender failed; going on")
                self._stopped.wait(1.0)

    def _loop(self, lane: _Lane) -> None:
        next_retry = time.monotonic() + self.retry_s
        while not self._stop:
            lane.wake.wait(min(1.0, max(0.01, next_retry - time.monotonic())))
            lane.wake.clear()
            while not self._stop:
                with self._lock:
                    if not lane.queue:
                        break
                    item = lane.queue.popleft()
                    event, webhook = item
                    if self.dead.holds(event.get("subject")):  # behind its model's earlier failures: in order
                        self.dead.add(event, webhook)
                        self._count("dead_lettered")
                        next_retry = time.monotonic()
                        continue
                    lane.current = item
                ok = self._deliver(event, webhook, 1 + int(webhook.get("retries", 0)))
                with self._lock:
                    if lane.current is not item:  # close took it (dead-lettered there)
                        return
                    lane.current = None
                    if not ok:
                        self.dead.add(event, webhook)
                        self._count("dead_lettered")
                if not ok:
                    log.warning("drift event %s could not be delivered: kept in the dead letter", event["id"])
            if not self._stop and len(self.dead) and time.monotonic() >= next_retry:
                self._retry(lane)
                next_retry = time.monotonic() + self.retry_s

    def _retry(self, lane: _Lane) -> None:
        """This lane's dead-lettered events, oldest first, each only when it is the oldest left of
        its model (a model's events arrive in order, whichever lane holds them); a model whose
        event fails keeps the rest for the next round, the other models' go on."""
        blocked: set[Any] = set()
        for entry in list(self.dead.events):
            if self._stop:
                return
            subject = entry["event"].get("subject")
            if subject in blocked or self._lane_of.get(str(entry["webhook"].get("url"))) is not lane:
                continue
            with self._lock:
                first = next((e for e in self.dead.events if e["event"].get("subject") == subject), None)
            if first is not entry:
                blocked.add(subject)  # an older one of its model waits (in another lane, or was just added)
                continue
            if self._deliver(entry["event"], entry["webhook"], 1):
                with self._lock:
                    if entry in self.dead.events:
                        self.dead.remove(entry)
            else:
                self.count("failed")
                blocked.add(subject)
