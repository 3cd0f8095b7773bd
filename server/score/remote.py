"""Batch scoring through a running V2 server (``batchgate score --target``): batchgate, Triton,
KServe, MLServer, over gRPC or HTTP.

The requests are built and read with the V2 messages tritonclient ships (gRPC) and its request
body / response helpers (HTTP), but sent on our own ``grpc.aio`` channel and aiohttp session:
tritonclient's exceptions keep neither the gRPC trailers nor the HTTP headers, and the server's
``retry-after`` is in them.

What the scorer does with an answer:

- **Overload** (RESOURCE_EXHAUSTED / 429, UNAVAILABLE / 503, DEADLINE_EXCEEDED / 504: a queue
  timeout, or the scorer's own): wait the server's Retry-After
  (at most ``MAX_WAIT_S``, plus up to a quarter more so that many scorers do not come back
  together), or without one 50 ms doubling to 2 s, and send again; at most ``retries`` times.
- **The rows' fault** (INVALID_ARGUMENT / 400, the model failing: INTERNAL / 500):
  a :class:`~batchgate.core.errors.GatewayError`, so the request is split down to the rows that
  fail and those go to the rejects.
- **The server's fault** (unreachable past the retries, a key refused, the model gone): a
  :class:`TargetError` that stops the run; the parts already written are kept and a rerun
  resumes.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import ssl as ssl_mod
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..core.errors import ErrorCode, GatewayError
from ..core.signature import ModelSignature
from ..core.types import DATATYPES, OFFLINE_HEADER, from_raw
from .tables import ScoreError

OFFLINE = {OFFLINE_HEADER: "1"}
MAX_MESSAGE_BYTES = 1 << 30
MAX_WAIT_S = 60.0  # the longest Retry-After honoured (a server's answer is bounded like any input)
CONFIG_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 300.0  # one request's answer (--timeout): a server that never answers is not waited on forever


class TargetError(ScoreError):
    """The server cannot score anything now (unreachable, refusing the key, no such model): the
    run stops, keeping the parts written, instead of marking every row failed."""


class _Overloaded(Exception):
    def __init__(self, status: str, message: str, retry_after: float | None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass(frozen=True)
class Tls:
    """TLS to the server: ``ca`` the CA file to trust (empty: the system's); ``cert`` and
    ``key`` a client certificate for a server that asks for one (mTLS)."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    def check(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ScoreError("--tls-cert and --tls-key go together (a client certificate and its key)")
        for path in (self.ca, self.cert, self.key):
            if path:
                try:
                    with open(path, "rb"):
                        pass
                except OSError as e:
                    raise ScoreError(f"cannot read {path}: {e.strerror}") from None


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After value (delta-seconds; an HTTP date or junk: None), bounded."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not seconds >= 0:  # NaN too
        return None
    return min(seconds, MAX_WAIT_S)


class Window:
    """How many requests the scorer keeps out at the server at once. It grows by one per window
    of answers while answers come back about as fast as the fastest seen, and shrinks by a
    fifth when they come back much slower (the server's queue is growing) and by half at an
    overloaded answer, at most once per round trip. So a backfill settles at what the server
    serves with a short queue, under its admission limits (a batchgate refuses work past
    ``queue_target_ms`` of queue; online requests, ahead of the backfill's low priority, would
    wait behind what it already queued), instead of flooding it and waiting out Retry-Afters."""

    def __init__(self, start: int = 4, most: int = 256):
        self.size = float(start)
        self.most = most
        self.out = 0
        self.fastest = math.inf  # the quickest answer lately (seconds), the no-queue round trip
        self._cut = 0.0  # when the window was last cut
        self._free = asyncio.Event()
        self._free.set()

    async def take(self) -> float:
        while self.out >= int(self.size):
            self._free.clear()
            await self._free.wait()
        self.out += 1
        return time.monotonic()

    def give(self) -> None:
        self.out -= 1
        self._free.set()

    def answered(self, sent: float) -> None:
        now = time.monotonic()
        took = now - sent
        self.fastest = min(self.fastest * 1.001, took)  # (slowly forgotten: the server may get slower)
        if took > 2 * self.fastest + 0.002:
            self._cut_by(0.8, now)
        else:
            self.size = min(self.most, self.size + 1.0 / self.size)

    def refused(self) -> None:
        self._cut_by(0.5, time.monotonic())

    def _cut_by(self, factor: float, now: float) -> None:
        # once per round trip (answers to one window come together); before any answer, at most once in 10 ms
        if now - self._cut >= max(min(self.fastest, 1.0), 0.01):
            self._cut = now
            self.size = max(1.0, self.size * factor)


class RemoteTarget:
    """A model served by a V2 server, scored over gRPC or HTTP. Requests carry
    ``x-batchgate-offline: 1`` (a batchgate keeps them out of drift and rollout figures and counts
    them apart) and a low V2 priority."""

    def __init__(self, wire: _Wire, name: str, signature: ModelSignature, retries: int):
        self.wire, self.name, self.signature = wire, name, signature
        self.retries = retries
        self.window = Window()
        self.retried = 0  # requests sent again after an overloaded answer
        self.waited_s = 0.0  # time spent waiting for those
        self.honoured = 0  # of those waits, how many were the server's Retry-After
        self.version = ""

    @classmethod
    async def open(
        cls,
        target: str,
        protocol: str,
        name: str,
        token: str = "",
        tls: Tls | None = None,
        retries: int = 8,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> RemoteTarget:
        from ..repository.config import signature_of

        if tls is not None:
            tls.check()
        headers = dict(OFFLINE)
        if token:
            headers["authorization"] = f"Bearer {token}"
        wire: _Wire = (
            _Grpc(target, headers, tls, timeout_s) if protocol == "grpc" else _Http(target, headers, tls, timeout_s)
        )
        try:
            cfg = await _told_when(lambda: wire.config(name), retries)
            signature = signature_of(cfg)
            # The model's lowest priority level, so its online traffic goes first (a level past
            # the model's would be its default, on Triton and here). None: it has no levels.
            wire.priority = cfg.dynamic_batching.priority_levels if cfg.HasField("dynamic_batching") else 0
            versions = await _told_when(lambda: wire.versions(name), retries)
        except (TargetError, GatewayError, _Overloaded, ValueError) as e:
            await wire.close()
            text = f"{e.status}: {e.message}" if isinstance(e, _Overloaded) else getattr(e, "message", str(e))
            raise TargetError(f"--target {target}: cannot read model '{name}': {text}") from None
        target_ = cls(wire, name, signature, retries)
        # the version an unversioned request runs (the latest served), for the run's key
        target_.version = str(max(versions, key=lambda v: (len(v), v))) if versions else ""
        return target_

    async def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sig = self.signature
        types = {t.name: t.dtype.v2 for t in sig.inputs if t.name in feeds}
        names = tuple(t.name for t in sig.outputs)
        delay = 0.05
        window = self.window
        for attempt in range(self.retries + 1):
            sent = await window.take()
            try:
                got = await self.wire.infer(self.name, feeds, types, names)
            except _Overloaded as e:
                window.refused()
                error = e
            else:
                window.answered(sent)
                return got
            finally:
                window.give()
            if attempt == self.retries:
                raise TargetError(
                    f"the server stayed overloaded past {self.retries} retries ({error.status}: {error.message})"
                ) from None
            if error.retry_after is not None:
                wait = error.retry_after * (1 + random.random() / 4)
                self.honoured += 1
            else:
                wait, delay = delay, min(delay * 2, 2.0)
            self.retried += 1
            self.waited_s += wait
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        await self.wire.close()


async def _told_when(read: Any, retries: int) -> Any:
    """A read of the model's config or metadata, sent again when the server refuses it as
    overloaded with a Retry-After (a rate-limited key's burst spent on the read before, say);
    without one (unreachable), the first refusal stands."""
    for attempt in range(retries + 1):
        try:
            return await read()
        except _Overloaded as e:
            if e.retry_after is None or attempt == retries:
                raise
            await asyncio.sleep(e.retry_after * (1 + random.random() / 4))
    raise AssertionError("unreachable")  # pragma: no cover


class _Wire(Protocol):
    """How requests reach the server: gRPC or HTTP; ``priority``: the V2 priority its requests
    ask for (0: none)."""

    priority: int

    async def config(self, name: str) -> Any: ...

    async def versions(self, name: str) -> list[str]: ...

    async def infer(
        self, name: str, feeds: dict[str, np.ndarray], types: dict[str, str], names: tuple[str, ...]
    ) -> dict[str, np.ndarray]: ...

    async def close(self) -> None: ...


# gRPC codes as the scorer treats them (see the module's docstring)
_ROW_FAULTS = {"INVALID_ARGUMENT", "INTERNAL", "UNKNOWN", "OUT_OF_RANGE", "FAILED_PRECONDITION"}
# DEADLINE_EXCEEDED is the scorer's own timeout (it sends no V2 timeout): a stuck server, sent again
_OVERLOAD = {"RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"}


class _Grpc:
    def __init__(self, target: str, headers: dict[str, str], tls: Tls | None, timeout_s: float = REQUEST_TIMEOUT_S):
        self.priority = 0  # set once the model's config is read
        import grpc
        from tritonclient.grpc import service_pb2 as pb
        from tritonclient.grpc import service_pb2_grpc as pb_grpc

        self.grpc, self.pb, self.target = grpc, pb, target
        self.timeout_s = timeout_s
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 60_000),  # a connection gone dead (a failover) is found, not waited on
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
        if tls is None:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        else:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(tls.ca), private_key=_read(tls.key), certificate_chain=_read(tls.cert)
            )
            self.channel = grpc.aio.secure_channel(target, creds, options=options)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata = tuple(headers.items())

    async def config(self, name: str) -> Any:
        try:
            reply = await self.stub.ModelConfig(
                self.pb.ModelConfigRequest(name=name), metadata=self.metadata, timeout=CONFIG_TIMEOUT_S
            )
        except self.grpc.aio.AioRpcError as e:
            raise self._read_error(e) from None
        return reply.config

    async def versions(self, name: str) -> list[str]:
        try:
            reply = await self.stub.ModelMetadata(
                self.pb.ModelMetadataRequest(name=name), metadata=self.metadata, timeout=CONFIG_TIMEOUT_S
            )
        except self.grpc.aio.AioRpcError as e:
            raise self._read_error(e) from None
        return list(reply.versions)

    def _read_error(self, e: Any) -> Exception:
        error = self._error(e)
        return error if isinstance(error, _Overloaded) else TargetError(f"{e.code().name}: {e.details()}")

    async def infer(
        self, name: str, feeds: dict[str, np.ndarray], types: dict[str, str], names: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        from ..backends.v2_messages import fill_request

        msg = self.pb.ModelInferRequest(model_name=name)
        if self.priority:
            msg.parameters["priority"].uint64_param = self.priority
        fill_request(msg, feeds, types, names)
        try:
            reply = await self.stub.ModelInfer(msg, metadata=self.metadata, timeout=self.timeout_s)
        except self.grpc.aio.AioRpcError as e:
            raise self._error(e) from None
        raw = reply.raw_output_contents
        if len(raw) != len(reply.outputs):
            raise TargetError(f"{self.target} answered without raw output contents")
        got = {}
        for i, t in enumerate(reply.outputs):
            got[t.name] = _tensor(raw[i], t.datatype, tuple(t.shape), t.name)
        return got

    def _error(self, e: Any) -> Exception:
        code, details = e.code().name, e.details() or ""
        if code in _OVERLOAD and "larger than max" not in details:  # (gRPC's own size refusal: halving helps)
            trailers = e.trailing_metadata() or ()
            seconds = next((retry_after(v) for k, v in trailers if k == "retry-after"), None)
            return _Overloaded(code, details, seconds)
        if code in _ROW_FAULTS or code == "RESOURCE_EXHAUSTED":
            return GatewayError(ErrorCode.INVALID_ARGUMENT, f"{code}: {details}")
        return TargetError(f"{self.target}: {code}: {details}")

    async def close(self) -> None:
        await self.channel.close()


class _Http:
    def __init__(self, target: str, headers: dict[str, str], tls: Tls | None, timeout_s: float = REQUEST_TIMEOUT_S):
        self.priority = 0  # set once the model's config is read
        self.target = target
        self.timeout_s = timeout_s
        self.base = f"{'https' if tls is not None else 'http'}://{target}/v2/models/"
        self.headers = headers
        self.ssl: ssl_mod.SSLContext | bool = True
        if tls is not None:
            ctx = ssl_mod.create_default_context(cafile=tls.ca or None)
            if tls.cert:
                ctx.load_cert_chain(tls.cert, tls.key)
            self.ssl = ctx
        self.session: Any = None

    def _session(self) -> Any:
        if self.session is None:
            import aiohttp

            self.session = aiohttp.ClientSession(
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=CONFIG_TIMEOUT_S),
            )
        return self.session

    async def _send(self, method: str, url: str, **kw: Any) -> tuple[int, Any, bytes]:
        import aiohttp

        try:
            async with self._session().request(method, url, ssl=self.ssl, **kw) as r:
                return r.status, r.headers, await r.read()
        except aiohttp.ClientConnectorError as e:  # never delivered: the server may be restarting
            raise _Overloaded("UNREACHABLE", str(e), None) from None
        except TimeoutError:  # no answer within the scorer's timeout: a stuck server, sent again
            raise _Overloaded("TIMEOUT", f"no answer within {self.timeout_s:g} s", None) from None
        except aiohttp.ClientError as e:
            raise TargetError(f"{self.target}: {e}") from None

    async def config(self, name: str) -> Any:
        from ..repository.config import config_from_json

        status, headers, body = await self._send("GET", self.base + urllib.parse.quote(name, safe="") + "/config")
        _read_status(status, headers, body)
        cfg = json.loads(body)
        return config_from_json(json.dumps(cfg.get("config", cfg)), name)

    async def versions(self, name: str) -> list[str]:
        status, headers, body = await self._send("GET", self.base + urllib.parse.quote(name, safe=""))
        _read_status(status, headers, body)
        doc = json.loads(body)
        return [str(v) for v in (doc.get("versions") if isinstance(doc, dict) else None) or []]

    async def infer(
        self, name: str, feeds: dict[str, np.ndarray], types: dict[str, str], names: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        import tritonclient.http as httpclient

        inputs = []
        for k, arr in feeds.items():
            x = httpclient.InferInput(k, list(arr.shape), types[k])
            x.set_data_from_numpy(arr, binary_data=True)
            inputs.append(x)
        outputs = [httpclient.InferRequestedOutput(k, binary_data=True) for k in names]
        body, json_size = httpclient.InferenceServerClient.generate_request_body(
            inputs, outputs=outputs, priority=self.priority
        )
        headers = {"content-type": "application/octet-stream"}
        if json_size is not None:
            headers["inference-header-content-length"] = str(json_size)
        url = self.base + urllib.parse.quote(name, safe="") + "/infer"
        status, got_headers, reply = await self._send("POST", url, data=body, headers=headers)
        if status == 200:
            length = got_headers.get("inference-header-content-length")
            result = httpclient.InferResult.from_response_body(reply, header_length=int(length) if length else None)
            return {k: result.as_numpy(k) for k in names}
        text = _message(reply)
        # (504: DEADLINE_EXCEEDED over HTTP, a request dropped at its queue timeout or a proxy's own:
        # sent again, as over gRPC; it stopped the run, exit 3, as a server gone)
        if status in (429, 503, 504):
            raise _Overloaded(str(status), text, retry_after(got_headers.get("retry-after")))
        if status in (400, 408, 413, 500):
            raise GatewayError(ErrorCode.INVALID_ARGUMENT, f"HTTP {status}: {text}")
        raise TargetError(f"{self.target}: HTTP {status}: {text}")

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _read_status(status: int, headers: Any, body: bytes) -> None:
    if status in (429, 503):
        raise _Overloaded(f"HTTP {status}", _message(body), retry_after(headers.get("retry-after")))
    if status != 200:
        raise TargetError(f"HTTP {status}: {_message(body)}")


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def _message(body: bytes) -> str:
    """A V2 error body's message ({"error": ...}), else its first 512 bytes as text."""
    try:
        return str(json.loads(body)["error"])[:512]
    except (ValueError, KeyError, TypeError):
        return body[:512].decode("utf-8", "replace")


def _tensor(raw: bytes, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    dt = DATATYPES.get(datatype)
    if dt is None:
        raise TargetError(f"the server answered output '{name}' with unknown datatype {datatype[:32]}")
    try:
        return from_raw(raw, dt, shape, f"output '{name}'")
    except GatewayError as e:
        raise TargetError(f"the server's answer is malformed: {e.message}") from None
