"""The admin API as HTTP/JSON under ``/admin/v1/`` on ``admin_http_port`` (grpcio cannot serve
HTTP/1.1 on the gRPC port). The bodies are the gRPC messages in protobuf's JSON mapping, with
field names as the proto spells them::

    GET  /admin/v1/routes                      ListRoutes
    GET  /admin/v1/routes/{name}               GetRoute
    POST /admin/v1/routes/{name}/weights       SetWeights   {"weights": {"canary": 25}}
    POST /admin/v1/routes/{name}/promote       Promote      (also rollback, pause, resume)
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from google.protobuf import json_format

from ..core.errors import invalid, not_found
from ..security.access import Caller
from .api import ACTIONS, AdminApi
from .v1 import admin_pb2 as apb

PREFIX = "/admin/v1/"
_ROUTE = re.compile(r"/admin/v1/routes(?:/([^/]+))?(?:/([a-z_]+))?")


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
        raise not_found(f"no such admin endpoint: {path[:256]}")
    name, action = m.group(1), m.group(2)
    if name is None:
        _method(method, "GET")
        return 200, to_json(await api.list_routes(caller))
    if action is None:
        _method(method, "GET")
        return 200, to_json(await api.get_route(caller, name))
    _method(method, "POST")
    if action == "weights":
        raw = await body()
        try:
            request = json_format.Parse(raw or b"{}", apb.SetWeightsRequest(), ignore_unknown_fields=False)
        except (json_format.ParseError, UnicodeDecodeError, RecursionError) as e:
            raise invalid(
                f'the body must be a SetWeightsRequest as JSON, e.g. {{"weights": {{"canary": 25}}}}: {str(e)[:256]}'
            ) from None
        return 200, to_json(await api.set_weights(caller, name, dict(request.weights)))
    if action in ACTIONS:
        return 200, to_json(await api.act(caller, name, action))
    raise not_found(f"no such admin endpoint: {path[:256]}")


def _method(method: str, want: str) -> None:
    if method != want:
        raise invalid(f"this admin endpoint takes {want}, not {method[:16]}")
