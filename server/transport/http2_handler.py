"""What an HTTP/2 connection (``http2.Http2``) tells its owner, frame by frame: the
:class:`Handler` protocol, and :data:`GONE`, the handler of a connection that is gone."""

from __future__ import annotations

from typing import Protocol


class Handler(Protocol):
    """What the connection is told, in the order the frames came."""

    def on_request(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None: ...
    def on_data(self, sid: int, data: bytes, flow: int, end_stream: bool) -> None: ...
    def on_reset(self, sid: int) -> None: ...
    def on_window(self, sid: int) -> None: ...  # 0: the connection's window; -1: every stream's
    def on_goaway(self) -> None: ...
    def on_oversized(self, sid: int) -> None: ...  # a new stream whose headers are over max_header_bytes
    def on_refused(self, sid: int) -> None: ...  # a new stream past max_concurrent_streams (reset REFUSED_STREAM)


class _Gone:
    """The handler once its connection is lost: frames told to it go nowhere."""

    def on_request(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        pass

    def on_data(self, sid: int, data: bytes, flow: int, end_stream: bool) -> None:
        pass

    def on_reset(self, sid: int) -> None:
        pass

    def on_window(self, sid: int) -> None:
        pass

    def on_goaway(self) -> None:
        pass

    def on_oversized(self, sid: int) -> None:
        pass

    def on_refused(self, sid: int) -> None:
        pass


GONE = _Gone()
