"""The admin API over gRPC (service ``batchgate.admin.v1.AdminService`` on ``admin_port``)."""

from __future__ import annotations

import logging
import time

import grpc

from ..core.errors import ErrorCode, GatewayError
from ..transport.grpc_status import abort, caller_of
from .api import AdminApi
from .http import MAX_BODY
from .v1 import admin_pb2_grpc

log = logging.getLogger("batchgate.admin")
# The largest message the admin gRPC port takes (as the HTTP mirror's bodies): its messages are a
# few variants' weights or a name; megabytes of a map were decoded on the event loop, holding it.
MAX_MESSAGE = MAX_BODY


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, api: AdminApi):
        self.api = api

    async def _answer(self, context, call):
        try:
            return await call
        except GatewayError as e:
            return await abort(context, e)  # (set, not raised: see grpc_status.abort)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("admin call failed")
            return await abort(context, GatewayError(ErrorCode.INTERNAL, "internal error; see the server log"))

    async def ListRoutes(self, request, context):
        return await self._answer(context, self.api.list_routes(caller_of(context)))

    async def GetRoute(self, request, context):
        return await self._answer(context, self.api.get_route(caller_of(context), request.name))

    async def SetWeights(self, request, context):
        return await self._answer(
            context, self.api.set_weights(caller_of(context), request.name, dict(request.weights))
        )

    async def Promote(self, request, context):
        return await self._answer(context, self.api.act(caller_of(context), request.name, "promote"))

    async def Rollback(self, request, context):
        return await self._answer(context, self.api.act(caller_of(context), request.name, "rollback"))

    async def Pause(self, request, context):
        return await self._answer(context, self.api.act(caller_of(context), request.name, "pause"))

    async def Resume(self, request, context):
        return await self._answer(context, self.api.act(caller_of(context), request.name, "resume"))

    async def ListDrift(self, request, context):
        return await self._answer(context, self.api.list_drift(caller_of(context)))

    async def GetDrift(self, request, context):
        return await self._answer(context, self.api.get_drift(caller_of(context), request.model))

    # A reset or rebaseline is dropped once the caller's deadline has passed: a caller told
    # DEADLINE_EXCEEDED must not see it carried out later (the CLI waits 10 s, the server 30).
    async def ResetDrift(self, request, context):
        call = self.api.reset_drift(caller_of(context), request.model, request.reference, _until(context))
        return await self._answer(context, call)

    async def Rebaseline(self, request, context):
        return await self._answer(
            context, self.api.rebaseline(caller_of(context), request.model, request.rows, _until(context))
        )


def _until(context) -> float | None:
    """The call's deadline on ``time.monotonic()``'s clock; None when the caller set none."""
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left
