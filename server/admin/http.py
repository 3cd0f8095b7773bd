"""The admin API as HTTP/JSON under ``/admin/v1/`` on ``admin_http_port`` (grpcio cannot serve
HTTP/1.1 on the gRPC port). The bodies are the gRPC messages in protobuf's JSON mapping, with
field names as the proto spells them::

    GET  /admin/v1/routes                      ListRoutes
    GET  /admin/v1/routes/{name}               GetRoute
    POST /admin/v1/routes/{name}/weights       SetWeights   {"weights": {"canary": 25}}
    POST /admin/v1/routes/{name}/promote       Promote      (also rollback, pause, resume)
    GET  /admin/v1/drift                       ListDrift
    GET  /admin/v1/drift/{model}               GetDrift
    POST /admin/v1/drift/{model}/reset         ResetDrift   {"reference": true} (optional)
    POST /admin/v1/drift/{model}/rebaseline    Rebaseline   {"rows": 5000} (optional)
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from google.protobuf import json_format

from ..core.errors import invalid, not_found
from ..security.access import Caller
from ..transport.http_scope import check_method
from .api import ACTIONS, AdminApi
from .v1 import admin_pb2 as apb

PREFIX = "/admin/v1/"
MAX_BODY = 64 << 10  # an admin request's JSON body: a few variants' weights, a flag or a count
_ROUTE = re.compile(r"/admin/v1/routes(?:/([^/]+))?(?:/([a-z_]+))?")
_DRIFT = re.compile(r"/admin/v1/drift(?:/([^/]+))?(?:/([a-z_]+))?")


def to_json(message) -> dict:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


async def handle(
    api: AdminApi, method: str, path: str, caller: Caller, body: Callable[[], Awaitable[bytes]]
) -> tuple[int, dict]:
    """(status, JSON object) of one admin call; GatewayError for the caller's mistakes."""
    m = _ROUTE.fullmatch(path)
    if m is None:
        d = _DRIFT.fullmatch(path)
        if d is None:
            raise not_found(f"no such admin endpoint: {path[:256]}")
        return await _drift(api, method, path, caller, body, d.group(1), d.group(2))
    name, action = m.group(1), m.group(2)
    if name is None:
        check_method(method, "GET")
        return 200, to_json(await api.list_routes(caller))
    if action is None:
        check_method(method, "GET")
        return 200, to_json(await api.get_route(caller, name))
    check_method(method, "POST")
    if action == "weights":
        raw = await body()  # read now, parsed once the caller is checked

        def weights() -> dict:
            return dict(_parse(raw, apb.SetWeightsRequest(), '{"weights": {"canary": 25}}').weights)

        return 200, to_json(await api.set_weights(caller, name, weights))
    if action in ACTIONS:
        return 200, to_json(await api.act(caller, name, action))
    raise not_found(f"no such admin endpoint: {path[:256]}")


async def _drift(
    api: AdminApi,
    method: str,
    path: str,
    caller: Caller,
    body: Callable[[], Awaitable[bytes]],
    model: str | None,
    action: str | None,
) -> tuple[int, dict]:
    if model is None:
        check_method(method, "GET")
        return 200, to_json(await api.list_drift(caller))
    if action is None:
        check_method(method, "GET")
        return 200, to_json(await api.get_drift(caller, model))
    check_method(method, "POST")
    if action == "reset":
        raw = await body()
        return 200, to_json(
            await api.reset_drift(
                caller, model, lambda: _parse(raw, apb.ResetDriftRequest(), '{"reference": true}').reference
            )
        )
    if action == "rebaseline":
        raw = await body()
        return 200, to_json(
            await api.rebaseline(caller, model, lambda: _parse(raw, apb.RebaselineRequest(), '{"rows": 5000}').rows)
        )
    raise not_found(f"no such admin endpoint: {path[:256]}")


def _parse(raw: bytes, message, example: str):
    if len(raw) > MAX_BODY:  # (parsed on the event loop: megabytes of JSON held every request for seconds)
        raise invalid(f"the body is {len(raw)} bytes; an admin request's is at most {MAX_BODY} bytes")
    if raw.strip(b" \t\r\n")[:1] not in (b"", b"{"):  # protobuf reads `[]` as {}: a rebaseline of every row
        raise invalid(f"the body must be a JSON object, a {type(message).__name__}, e.g. {example}")
    try:
        return json_format.Parse(raw or b"{}", message, ignore_unknown_fields=False)
    except (json_format.ParseError, UnicodeDecodeError, RecursionError) as e:
        raise invalid(f"the body must be a {type(message).__name__} as JSON, e.g. {example}: {str(e)[:256]}") from None
