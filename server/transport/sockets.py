"""The listening sockets of the HTTP server and of batchgate's own gRPC engine."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import resource
import socket
import threading
from typing import Any

# An answer waiting for its client to read it may wait http_body_timeout_s, and one second more
# for each 16 KiB the client takes meanwhile (HTTP and the h2 gRPC engine): a client that reads a
# byte now and then cannot hold an answer, and its memory, for ever; one on a slow link can.
MIN_SEND_BYTES_PER_S = 16 * 1024

log = logging.getLogger("batchgate")


def host_port(host: str, port: object) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ListenError(OSError):
    """An address that cannot be bound (``filename``: the address, ``strerror``: why)."""


def tcp_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A bound TCP socket (not listening yet); ListenError when the address cannot be bound.

    IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the listener
    says it is TCP; without it keep-alive answers wait ~40 ms on delayed ACKs. With
    ``reuse_port`` the kernel spreads new connections over the worker processes' sockets."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        dual_stack(sock, host)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ListenError(e.errno, e.strerror, host_port(host, port)) from None  # (which address: said)
    return sock


def check_bindable(addresses: list[tuple[str, int]]) -> None:
    """ListenError for the first ``(host, port)`` that cannot be bound now: a fixed port another
    process holds, an address this machine does not have, a name that does not resolve. Start-up
    asks before the models load, which may take minutes, so a typo is said at once; the
    listeners' own binds later still report what changed in between."""
    for host, port in addresses:
        tcp_socket(host, port, reuse_port=False).close()


def bind_problem(address: str) -> str:
    """Why ``host:port`` cannot be bound, as ": <reason>" ("" when it can, or for another kind of
    address): gRPC's own listeners say only that they could not listen."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return ""
    try:
        tcp_socket(host.strip("[]"), int(port), reuse_port=False).close()
    except OSError as e:
        return f": {e.strerror}"
    return ""


def dual_stack(sock: socket.socket, host: str) -> None:
    """On a socket about to bind ``::``, take IPv4 connections too (as IPv4-mapped addresses):
    ``::`` then means every address of both families, as it does for gRPC core's listeners,
    whatever the host's ``net.ipv6.bindv6only`` says (1 made it IPv6 only, and a pod on a
    dual-stack cluster unreachable over IPv4). Any other address binds as given."""
    if sock.family == socket.AF_INET6 and host.split("%", 1)[0] == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)


def grpc_peer(transport) -> str:
    """The peer as gRPC names it: ``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, ``unix:path``."""
    addr: Any = transport.get_extra_info("peername")
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
    return f"unix:{addr or ''}"


def peer_of(address: Any) -> str:
    """Whose connection this is, for ``max_per_peer``: the IPv4 address (also when it comes
    IPv4-mapped over IPv6), or the IPv6 /64 (one host may hold a whole /64 of addresses)."""
    host = address[0] if isinstance(address, tuple) and address else str(address)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return f"{ipaddress.ip_network((ip, 64), strict=False).network_address}/64"
    return str(ip)


class PeerShare:
    """Connections open by peer (:func:`peer_of`), at most ``limit`` each (0 = any number), for
    an operations listener where one client must not keep the others out. Thread-safe: the
    metrics port counts on its accept thread and releases on its handler threads."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, peer: str) -> bool:
        """Count one more of ``peer``'s connections; False (nothing counted) past its share."""
        if not self.limit:
            return True
        with self._lock:
            held = self._open.get(peer, 0)
            if held >= self.limit:
                return False
            self._open[peer] = held + 1
            return True

    def leave(self, peer: str) -> None:
        """One of ``peer``'s connections counted by :meth:`enter` has ended."""
        if not self.limit:
            return
        with self._lock:
            held = self._open.pop(peer, 1) - 1
            if held > 0:
                self._open[peer] = held


def fit_connections_to_fds(max_connections: int, ops_max_connections: int = 64) -> int:
    """``max_connections`` HTTP and as many gRPC connections need a file descriptor each: raise
    the process's soft limit towards the hard one if it is short, and if even that cannot hold
    them, bound connections by what it can (with a warning) rather than fail accepts at random
    (an accept past the limit fails with EMFILE and every listener suffers)."""
    # models, logs, the audit log, certificates, upstream connections; and the four operations
    # listeners (metrics, health, admin gRPC and HTTP), ops_max_connections each
    reserve = 256 + 4 * ops_max_connections
    need = 2 * max_connections + reserve
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        want = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < need:
        fitted = max(1, (soft - reserve) // 2)
        log.warning(
            "max_connections %d needs %d file descriptors but this process may open %d: "
            "connections are bounded at %d per protocol (raise the limit with ulimit -n)",
            max_connections,
            need,
            soft,
            fitted,
        )
        return fitted
    return max_connections
