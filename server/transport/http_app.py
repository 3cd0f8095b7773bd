"""The V2 HTTP/REST endpoints as a small ASGI app (served by uvicorn + httptools).

No web framework on the hot path: infer paths seen before are found in a dict, others
by two regexes (model and repository endpoints); orjson encodes. Errors are
``{"error": "..."}`` with the status from :data:`HTTP_STATUS`, the one table
that maps error codes to HTTP. Only ``/infer`` responses are ever compressed
(tritonclient.http.aio does not decompress anything else).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from typing import TYPE_CHECKING

import orjson

from ..admin import http as admin_http
from ..core.errors import ErrorCode, GatewayError, invalid, not_found
from ..core.routing import PIN_HEADER
from ..core.types import REQUEST_ID_HEADER, caller_headers, printable
from ..dataplane import DataPlane, Served
from ..monitoring.access_log import AccessLog, Note
from ..security.access import OPEN_CALLER, READ, Caller
from . import http_codec
from .byte_budget import ByteBudget
from .cors import CorsPolicy
from .grpc_wire import INFLATE_ON_LOOP_MAX_BYTES
from .http_body import BodyReader
from .http_codec import BodyRefused
from .http_defer import ADMITTED, Admitted
from .http_heads import content_length
from .http_limits import Verdict
from .http_scope import (
    WAITERS,
    MethodNotAllowed,
    caller_of,
    check_method,
    check_raw_path,
    header,
    index_ready,
    lifespan,
    repository_parameters,
    settings_object,
    shm_registration,
    trace_headers,
)

if TYPE_CHECKING:
    from ..admin.api import AdminApi

log = logging.getLogger("batchgate.http")

HTTP_STATUS = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.CANCELLED: 499,
    ErrorCode.UNIMPLEMENTED: 501,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.FAILED_PRECONDITION: 409,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
}

# Health endpoints (the Helm chart's probes and the image's HEALTHCHECK use these).
LIVE_PATH = "/v2/health/live"  # 200 while the process serves HTTP, draining included
READY_PATH = "/v2/health/ready"  # 200 while ready (see DataPlane.ready); 400 while starting, draining or not ready
# (with a trailing slash too, as every other V2 path here: /v2/, /v2/models/NAME/, .../index/)
HEALTH_PATHS = frozenset({LIVE_PATH, READY_PATH, LIVE_PATH + "/", READY_PATH + "/"})
ADMIN_PATHS = HEALTH_PATHS | {"/v2", "/v2/"}
# Any version segment matches: the data plane says what is wrong with one that is not a number,
# as it does for gRPC.
MODEL_RE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/(infer|ready|config|stats))?/?$")
REPO_RE = re.compile(r"^/v2/repository(?:/([^/]+))?/(index|models/([^/]+)/(load|unload))/?$")
SHM_MARK = b"shared_memory_region"  # in a request body that names a shared-memory region
SHM_RE = re.compile(r"^/v2/systemsharedmemory(?:/region/([^/]+))?/(status|register|unregister)/?$")
TRACE_RE = re.compile(r"^/v2(?:/models/([^/]+)(?:/versions/[^/]+)?)?/trace/setting/?$")

JSON_HEADERS = [(b"content-type", b"application/json")]
# While draining every answer closes its connection: a client's next request opens a new one
# (answered 503 until the listener closes, then refused), never racing the final close of a
# keep-alive connection.
CLOSE = (b"connection", b"close")
VARIANT_HEADER = PIN_HEADER.encode()
_monotonic = time.monotonic


class HttpApp:
    def __init__(
        self,
        dataplane: DataPlane,
        max_body_bytes: int,
        budget: ByteBudget,
        max_gzip_members: int = 64,
        admin_only: bool = False,
        admin: AdminApi | None = None,
        cors: CorsPolicy | None = None,
    ):
        """``budget``: the process's bytes of requests still arriving (max_buffered_request_bytes,
        shared with the gRPC engine). ``admin_only``: the admin listener, which serves the
        repository API, health (the server's and a model's readiness) and the server metadata,
        and nothing of inference. ``cors``: answers to browser apps of other origins (``cors.py``;
        None: off, as on the admin listener)."""
        self.dp = dataplane
        self.cors = cors
        self.admin_only = admin_only
        self.admin = admin  # the admin API's HTTP mirror (admin listener only)
        self._enforcing = dataplane.access.enforcing  # API keys: fixed for the server's life
        self.limit = max_body_bytes
        self.bodies = BodyReader(max_body_bytes, budget)
        self.max_gzip_members = max_gzip_members
        self._infer_paths: dict[str, tuple[str, str]] = {}
        # overload refusals' answers by their words (the same few, a request after another)
        self._refusal_answers: dict[tuple, tuple[int, list[tuple[bytes, bytes]], bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # (asking asyncio for it costs a getpid call)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await lifespan(receive, send)
            return
        path = scope["path"]
        method = scope["method"]
        try:
            if self.cors is not None:  # (a preflight is answered there, on any path)
                send = await self.cors.sending(method, scope["headers"], send, not self.dp.accepting)
                if send is None:
                    return
            check_raw_path(scope)
            await self._route(method, path, scope, receive, send)
        except GatewayError as e:
            await self._error(send, e)
        except Exception as e:  # never let one request take the server down
            log.exception("HTTP %s %s failed", method, path)
            await self._error(send, GatewayError(ErrorCode.INTERNAL, f"internal error: {e}"))

    def admit_early(self, method: str, path: str, scope) -> Verdict:
        """Admission of an infer request as soon as its head is parsed (called by the protocol,
        ``http_limits.py``, before any ASGI task exists): None sends the request on to the app
        (admitted, with its admission in the scope, when it is an infer); otherwise the refusal
        to write at once, and whether it is an overload refusal (the protocol then leaves the
        connection unread past the refusals' rates, until its turn: see ``http_limits.py``)."""
        if self.admin_only:
            return None
        hit = self._infer_paths.get(path)
        if hit is None:
            m = MODEL_RE.match(path)
            if m is None or m.group(3) != "infer":
                return None
            hit = (m.group(1), m.group(2) or "")
            self._remember(path, hit)
        model, version = hit
        try:
            served = self._admit(model, version, scope)
        except GatewayError as e:
            self.dp.count_error("http", e)
            status, headers, body = self.error_answer(e)
            if self.cors is not None:  # (the protocol writes this answer: no ASGI send to add them)
                headers.extend(self.cors.answer_headers(scope["headers"]))
            alog, tracing = self.dp.access_log, self.dp.tracing
            if alog is not None or tracing is not None:
                note = Note()
                note.error = e.code.value
                note.request_id = header(scope, REQUEST_ID_HEADER) or ""
                if tracing is not None:  # traced as gRPC's refusals are: a caller's trace shows the answer
                    note.span = tracing.begin(model, *trace_headers(scope), "http", note.start)
                    if note.span is not None:  # (its access line names the trace, as others do)
                        tracing.finish(note.span, note, status, note.error)
                if alog is not None:
                    self._access(alog, note, model, status, scope, path)
            return status, headers, body, e.code is ErrorCode.RESOURCE_EXHAUSTED
        scope[ADMITTED] = Admitted(served, model, version)
        return None

    def shedding(self) -> bool:
        """Whether :meth:`quick_refusal` is worth asking now (see ``Admission.shedding``)."""
        return not self.admin_only and self.dp.shedding()

    def quick_refusal(self, model: str, peer: str, admit: bool = False) -> Verdict | Admitted:
        """The overload refusal of an infer request for ``model`` (no version named), judged
        before its head is even parsed (``http_limits.py`` reads the name from the request line):
        the answer, as :meth:`admit_early` gives it, or None to take the usual way (see
        ``DataPlane.quick_refusal`` for what always does). With ``admit`` (on one core), a request
        it does not refuse is admitted, its parsing left for a turn of the loop (``http_defer.py``)."""
        if self.admin_only:
            return None
        e = self.dp.quick_refusal(model, "http", admit)
        if e is None:
            return None
        if not isinstance(e, GatewayError):
            return Admitted(e, model, "")
        self.dp.log_failure("http", model, "", e)
        key = (e.message, e.retry_after_s, self.dp.accepting)
        answer = self._refusal_answers.get(key)
        if answer is None:  # (the same tuple each time: the protocol keeps its bytes, see _quick)
            if len(self._refusal_answers) >= 64:  # (messages with figures in them vary)
                self._refusal_answers.clear()
            answer = self._refusal_answers[key] = self.error_answer(e)
        status, headers, body = answer
        alog = self.dp.access_log
        if alog is not None and alog.overload_wanted():
            alog.request(
                None,
                "http",
                model,
                status,
                e.code.value,
                lambda: (peer, None),
                "POST",
                f"/v2/models/{model}/infer",
                sampled=True,
            )
        return status, headers, body, True

    def _admit(self, model: str, version: str, scope) -> Served:
        """Admission from the path and the caller, logged when refused (counted by the caller)."""
        try:
            return self.dp.admit(
                model, version, caller_of(scope) if self._enforcing else OPEN_CALLER, lambda n: header(scope, n)
            )
        except GatewayError as e:
            self.dp.log_failure("http", model, (header(scope, REQUEST_ID_HEADER) or "")[:128], e)
            raise

    def _remember(self, path: str, hit: tuple[str, str]) -> None:
        """Remember an infer path (the next call skips the regex), only for a model that exists:
        a client inventing names must not fill the cache."""
        if len(self._infer_paths) < 4096 and self.dp.knows(*hit):
            self._infer_paths[path] = hit

    async def _route(self, method, path, scope, receive, send):
        admitted = scope.get(ADMITTED)
        if admitted is not None:  # admitted by the protocol as its head arrived
            served, model, version = admitted
            return await self._counted_infer(model, version, scope, receive, send, served)
        if self.admin_only and not _on_admin(path):
            if self.admin is not None and path.startswith(admin_http.PREFIX):
                status, obj = await admin_http.handle(
                    self.admin, method, path, caller_of(scope), lambda: self.bodies.read(receive, scope)
                )
                return await self._json(send, obj, status)
            raise not_found(f"the admin listener serves the admin API, the repository API and health, not {path[:256]}")
        hit = self._infer_paths.get(path)
        if hit is not None and method == "POST":
            return await self._counted_infer(hit[0], hit[1], scope, receive, send)
        m = MODEL_RE.match(path)
        if m:
            model, version, action = m.group(1), m.group(2) or "", m.group(3)
            if action == "infer":
                check_method(method, "POST")
                self._remember(path, (model, version))
                return await self._counted_infer(model, version, scope, receive, send)
            check_method(method, "GET")
            if action is None:
                if model == "stats":  # /v2/models/stats: statistics of every model
                    every = await self.dp.statistics_of_all("", "", self._caller(scope))
                    return await self._json(send, {"model_stats": every})
                return await self._json(send, self.dp.model_metadata(model, version, self._caller(scope)))
            if action == "ready":
                if self.dp.model_ready(model, version, self._caller(scope)):
                    return await self._empty(send, 200)
                raise GatewayError(
                    ErrorCode.INVALID_ARGUMENT, f"model '{model[:128]}' version '{version or 'latest'}' is not ready"
                )
            if action == "config":
                return await self._json(send, self.dp.model_config_json(model, version, self._caller(scope)))
            if action == "stats":
                rows = await self.dp.statistics_of_all(model, version, self._caller(scope))
                return await self._json(send, {"model_stats": rows})
        if path in HEALTH_PATHS:
            check_method(method, "GET")
            caller = self._caller(scope)
            live = path.startswith(LIVE_PATH)
            ok = self.dp.live(caller) if live else self.dp.ready(caller)
            # the V2 protocol's answer is {"live": bool} / {"ready": bool} (KServe's client reads it;
            # Triton's clients and Kubernetes probes look at the status alone)
            return await self._json(send, {"live" if live else "ready": ok}, 200 if ok else 400)
        if path in ("/v2", "/v2/"):
            check_method(method, "GET")
            return await self._json(send, self.dp.server_metadata(self._caller(scope)))
        m = REPO_RE.match(path)
        if m:
            check_method(method, "POST")
            body = await self.bodies.read(receive, scope)
            if m.group(2) == "index":
                caller = self._caller(scope)
                try:
                    ready = index_ready(body)
                except GatewayError:  # the caller is judged before its body: 401/403 first
                    self.dp.access.check(caller, READ)
                    raise
                return await self._json(send, self.dp.repository_index(ready, caller, m.group(1) or ""))
            model, action = m.group(3), m.group(4)
            params = await self._admin_body(scope, f"repository.{action}", model, model, repository_parameters, body)
            if action == "load":
                await self.dp.load_model(model, params, caller_of(scope), m.group(1) or "")
            else:
                await self.dp.unload_model(model, caller_of(scope), params, m.group(1) or "")
            return await self._empty(send, 200)
        m = SHM_RE.match(path)
        if m:
            return await self._shm(method, m.group(1) or "", m.group(2), scope, receive, send)
        if path.startswith("/v2/cudasharedmemory"):
            self.dp.cuda_shared_memory()
        if path in ("/v2/logging", "/v2/logging/"):
            if method in ("GET", "HEAD"):
                return await self._json(send, await self.dp.log_settings(None, self._caller(scope)))
            check_method(method, "POST")
            body = await self.bodies.read(receive, scope)
            obj = await self._admin_body(scope, "logging.update", "logging", None, settings_object, body, "log")
            return await self._json(send, await self.dp.log_settings(obj, caller_of(scope)))
        m = TRACE_RE.match(path)
        if m:
            model = m.group(1) or ""
            if method in ("GET", "HEAD"):
                return await self._json(send, await self.dp.trace_settings(model, None, self._caller(scope)))
            check_method(method, "POST")
            body = await self.bodies.read(receive, scope)
            target = f"model {printable(model[:128])}" if model else "server"
            obj = await self._admin_body(scope, "tracing.update", target, model or None, settings_object, body, "trace")
            return await self._json(send, await self.dp.trace_settings(model, obj, caller_of(scope)))
        raise not_found(f"no such endpoint: {method} {path[:256]}")

    async def _shm(self, method: str, name: str, action: str, scope, receive, send):
        """The system shared-memory extension: status (GET), register and unregister (POST)."""
        if action == "status":
            check_method(method, "GET")
            return await self._json(send, self.dp.shm_status(name, self._caller(scope)))
        check_method(method, "POST")
        if action == "unregister":
            await self.dp.shm_unregister(name, caller_of(scope))
            return await self._empty(send, 200)
        if not name:
            raise invalid("register a region at /v2/systemsharedmemory/region/<name>/register")
        body = await self.bodies.read(receive, scope)
        key, offset, size = await self._admin_body(scope, "shm.register", name[:128], None, shm_registration, body)
        await self.dp.shm_register(name, key, offset, size, caller_of(scope))
        return await self._empty(send, 200)

    async def _admin_body(self, scope, action: str, target: str, model: str | None, parse, *args):
        """What ``parse(*args)`` reads of an admin call's body; when the body is malformed, the
        caller is judged first (a stranger is 401, not the body's 400) and the attempt audited."""
        try:
            return parse(*args)
        except GatewayError as e:
            await self.dp.malformed_admin_body(caller_of(scope), action, target, model, e)

    def _caller(self, scope) -> Caller:
        return caller_of(scope) if self._enforcing else OPEN_CALLER

    async def _counted_infer(self, model, version, scope, receive, send, served=None):
        """An infer call whose refusal is counted once, whichever step refused it. ``served``:
        the protocol admitted it already (:meth:`admit_early`); otherwise (a request pipelined
        behind another) it is admitted here, from the path, before the body is read."""
        dp = self.dp
        alog, tracing = dp.access_log, dp.tracing
        note = None if alog is None and tracing is None else Note()
        status = 200
        if tracing is not None:
            assert note is not None
            note.model = model
            note.span = tracing.begin(model, *trace_headers(scope), "http", note.start)
            if note.span is not None:
                note.tracing = tracing
        try:
            if served is None:
                served = self._admit(model, version, scope)
            if note is not None and note.span is not None:  # (admitted as its head arrived, or just now)
                note.span.add_event("ADMITTED")
            try:
                return await self._infer(served, model, version, scope, receive, send, note)
            finally:
                dp.release(served)
        except GatewayError as e:
            dp.count_error("http", e)
            status = HTTP_STATUS[e.code]
            if note is not None:
                note.error = e.code.value
            raise
        except asyncio.CancelledError:  # the client went away (499: nginx's word for it)
            status = 499
            if note is not None:
                note.error = ErrorCode.CANCELLED.value
            raise
        except Exception as e:  # answered INTERNAL by __call__; counted here like gRPC counts it
            self.dp.count_error("http", GatewayError(ErrorCode.INTERNAL, str(e)))
            status = 500
            if note is not None:
                note.error = ErrorCode.INTERNAL.value
            raise
        finally:
            if note is not None and note.error and status == 200:  # answered by _infer itself
                status = 499 if note.error == ErrorCode.CANCELLED.value else HTTP_STATUS[ErrorCode(note.error)]
            if note is not None and note.span is not None:
                note.tracing.finish(note.span, note, status, note.error)
            if alog is not None:
                self._access(alog, note, model, status, scope, scope["path"])

    def _access(self, alog: AccessLog, note: Note | None, model: str, status: int, scope, path: str) -> None:
        """The access line of an infer call (``note`` None: refused before the call began)."""

        def who() -> tuple[str, str | None]:
            caller = caller_of(scope)
            return caller.peer, self.dp.key_id(caller)

        alog.request(note, "http", model, status, note.error if note is not None else "", who, "POST", path)

    async def _infer(self, served, model, version, scope, receive, send, note=None):
        arrival = _monotonic()
        header_len = content_encoding = accept = twice = None
        x_headers = []
        for k, v in scope["headers"]:
            if k == b"content-length":
                if len(v) > 6 and (n := content_length(v)) > self.limit:
                    raise BodyRefused(
                        f"request body of {n} bytes exceeds the limit of {self.limit} bytes (max_request_bytes)"
                    )
            elif k == b"inference-header-content-length":
                twice = "Inference-Header-Content-Length" if header_len is not None else twice
                header_len = v.decode("latin-1")
            elif k == b"content-encoding":
                twice = "Content-Encoding" if content_encoding is not None else twice
                content_encoding = v.decode("latin-1")
            elif k == b"accept-encoding":
                accept = v.decode("latin-1")
            elif k[:2] == b"x-" or k == b"traceparent" or k == b"tracestate":  # (see caller_headers)
                x_headers.append((k.decode("latin-1"), v.decode("latin-1")))
        headers = caller_headers(x_headers, self.dp.limits)
        msg = await receive()  # one message holds the whole body unless it is large
        if msg.get("more_body") or msg["type"] != "http.request":
            body = await self.bodies.more(msg, receive)
        else:
            body = msg.get("body", b"")
            if len(body) > self.limit:
                raise BodyRefused(f"request body exceeds the limit of {self.limit} bytes (max_request_bytes)")
        if twice is not None:  # which of two values frames the body is not for us to guess
            raise invalid(f"the {twice} header is given more than once")
        req = None
        try:
            if content_encoding:
                if len(body) > INFLATE_ON_LOOP_MAX_BYTES:  # a large body inflates on a thread
                    body = await asyncio.to_thread(
                        http_codec.decompress, body, content_encoding, self.limit, self.max_gzip_members
                    )
                else:
                    body = http_codec.decompress(body, content_encoding, self.limit, self.max_gzip_members)
            # The caller's own regions, looked up only for a body that may name one (the key may be
            # written with JSON escapes).
            shm = self.dp.shm_view(caller_of(scope)) if SHM_MARK in body or b"\\u" in body else None
            if note is not None:
                note.bytes_in = len(body)
                note.request_id = headers.get(REQUEST_ID_HEADER, "") if headers else ""
            decode = (body, header_len, model, version, arrival, self.dp.limits, headers, shm, note)
            if len(body) > http_codec.DECODE_ON_LOOP_MAX_BYTES:  # on a thread (past PRECHECK_BYTES checked first)
                req, options = await asyncio.to_thread(
                    http_codec.decode_request, *decode, self.dp.precheck(served, len(body))
                )
            else:  # (one naming a region is checked against the model before the region is read)
                req, options = http_codec.decode_request(*decode, self.dp.precheck(served, 0, shm is not None))
            if note is not None:
                note.request_id = req.id
            waiters = scope.get(WAITERS)
            if waiters is not None and waiters.lost:
                # Gone while its body was read or decoded (on a thread, for a large one): not
                # handed to the model at all (an idle instance would have run it at once).
                if note is not None:
                    note.error = ErrorCode.CANCELLED.value
                return
            pending = self.dp.infer(served, req)
            # Registered with its connection while it waits: a client that goes away cancels it
            # (its protocol loses the connection), so it leaves the queue.
            if waiters is not None:
                loop = self._loop
                if loop is None:
                    loop = self._loop = asyncio.get_running_loop()
                task = asyncio.current_task(loop)  # (given the loop: no system call to find it)
                waiters.tasks.add(task)
            try:
                resp = await pending
            except asyncio.CancelledError:
                if waiters is not None and waiters.lost:
                    if note is not None:
                        note.error = ErrorCode.CANCELLED.value
                    return  # nobody to answer
                raise
            finally:
                if waiters is not None:
                    waiters.tasks.discard(task)
        except GatewayError as e:
            self.dp.log_failure("http", model, req.id if req is not None else headers.get("x-request-id", ""), e)
            if e.code is ErrorCode.INVALID_ARGUMENT and content_encoding and "Content-Encoding" in e.message:
                self.dp.count_error("http", e)
                if note is not None:
                    note.error = e.code.value
                return await self._error(send, e, [(b"accept-encoding", b"gzip, deflate")])
            raise
        if http_codec.heavy_answer(resp, options):  # (the loop serves others meanwhile)
            out, json_len = await asyncio.to_thread(http_codec.encode_response, resp, options)
        else:
            out, json_len = http_codec.encode_response(resp, options)
        if note is not None:
            note.version = resp.model_version
            if resp.parameters:
                note.variant = str(resp.parameters.get("variant", ""))
        headers = [(b"content-type", b"application/octet-stream" if json_len is not None else b"application/json")]
        if resp.parameters:  # answered through a route: which variant answered
            headers.append((VARIANT_HEADER, str(resp.parameters.get("variant", "")).encode()))
        if json_len is not None:
            headers.append((b"inference-header-content-length", str(json_len).encode()))
        enc = http_codec.pick_encoding(accept)
        if enc:
            if len(out) > http_codec.COMPRESS_ON_LOOP_MAX_BYTES:
                out = await asyncio.to_thread(http_codec.compress, out, enc)
            else:
                out = http_codec.compress(out, enc)
            headers.append((b"content-encoding", enc.encode()))
        if not self.dp.accepting:
            headers.append(CLOSE)
        if note is not None:
            note.bytes_out = len(out)
        headers.append((b"content-length", str(len(out)).encode()))  # (not chunked: HTTP/1.0 clients read it too)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    async def _json(self, send, obj, status: int = 200):
        body = orjson.dumps(obj)
        headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        if not self.dp.accepting:
            headers.append(CLOSE)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _empty(self, send, status: int):
        headers = [(b"content-length", b"0")] if self.dp.accepting else [(b"content-length", b"0"), CLOSE]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    def error_answer(self, e: GatewayError, extra=()) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Status, headers (without content-length) and body of the answer to ``e``."""
        headers = [*JSON_HEADERS, *extra]
        if isinstance(e, MethodNotAllowed):
            status = 405
            allow = "GET, HEAD" if e.allow == "GET" else e.allow  # RFC 9110: a 405 names the methods that work
            headers.append((b"allow", allow.encode()))
        else:
            status = HTTP_STATUS[e.code]
            if status == 401:  # RFC 9110: a 401 says which scheme would do
                headers.append((b"www-authenticate", b'Bearer realm="batchgate"'))
        if e.retry_after_s is not None:
            headers.append((b"retry-after", str(max(1, math.ceil(e.retry_after_s))).encode()))
        if not self.dp.accepting:
            headers.append(CLOSE)
        return status, headers, http_codec.error_body(e.message)

    async def _error(self, send, e: GatewayError, extra=()):
        if isinstance(e, BodyRefused):  # (the rest of its body was not read: the connection cannot go on)
            extra = (*extra, CLOSE)
        status, headers, body = self.error_answer(e, extra)
        headers.append((b"content-length", str(len(body)).encode()))
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        except Exception:  # the client is gone; nothing left to tell it
            pass


def _on_admin(path: str) -> bool:
    """Whether the admin listener serves ``path`` itself: health (a model's readiness too) and
    the repository API."""
    return path in ADMIN_PATHS or path.endswith("/ready") or path.startswith("/v2/repository")
