"""``batchgate routes list | show | set-weight | promote | rollback | pause | resume`` and
``batchgate drift status | reset | rebaseline``: the admin API's calls from a shell, over gRPC to
a gateway's ``admin_port``."""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_ADMIN = "127.0.0.1:8003"
ACTIONS = ("promote", "rollback", "pause", "resume")


def add_parser(sub) -> None:
    r = sub.add_parser(
        "routes",
        help="look at and steer routes and their rollouts (the admin API)",
        description="Calls the admin gRPC API (batchgate.admin.v1.AdminService) of a running gateway.",
    )
    common = _common()
    rs = r.add_subparsers(dest="routes_command", required=True)
    rs.add_parser("list", parents=[common], help="every route: weights, rollout, readiness")
    rs.add_parser("show", parents=[common], help="one route in full (JSON)").add_argument("name")
    w = rs.add_parser("set-weight", parents=[common], help="runtime weights (pauses a running rollout)")
    w.add_argument("name")
    w.add_argument("weights", nargs="+", metavar="VARIANT=WEIGHT")
    for action in ACTIONS:
        rs.add_parser(action, parents=[common], help=f"{action} the route's rollout").add_argument("name")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin", default=DEFAULT_ADMIN, metavar="HOST:PORT", help=f"admin_port (default {DEFAULT_ADMIN})"
    )
    common.add_argument(
        "--token-file", metavar="FILE", help="file holding an API key of scope admin (read for changes)"
    )
    common.add_argument("--ca-file", metavar="FILE", help="TLS: the CA that signed the gateway's certificate")
    common.add_argument("--cert-file", metavar="FILE", help="mTLS: this client's certificate")
    common.add_argument("--key-file", metavar="FILE", help="mTLS: this client's private key")
    common.add_argument("--timeout-s", type=_seconds, default=10.0, help="seconds to wait for the answer")
    return common


def add_drift_commands(ds) -> None:
    """``batchgate drift status | reset | rebaseline`` (``drift profile`` is drift_profile.py's)."""
    common = _common()
    st = ds.add_parser("status", parents=[common], help="every drift monitor, or one in full (JSON)")
    st.add_argument("model", nargs="?")
    r = ds.add_parser("reset", parents=[common], help="forget a monitor's windows and detections")
    r.add_argument("model")
    r.add_argument("--reference", action="store_true", help="also go back to the configured reference profile")
    b = ds.add_parser("rebaseline", parents=[common], help="a new reference profile from the last rows served")
    b.add_argument("model")
    b.add_argument("--rows", type=_rows, default=0, help="rows to use (0: all kept, up to drift_rebaseline_max_rows)")


def _connect(args: argparse.Namespace, command: str):
    """(stub, metadata, channel) for the admin API, or None after saying why not."""
    from .v1 import admin_pb2_grpc

    try:
        metadata = _metadata(args.token_file)
        channel = _channel(args)
    except (OSError, ValueError) as e:
        print(f"batchgate {command}: {e}", file=sys.stderr)
        return None
    return admin_pb2_grpc.AdminServiceStub(channel), metadata, channel


def drift_main(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from .v1 import admin_pb2 as apb

    connected = _connect(args, "drift")
    if connected is None:
        return 2
    stub, metadata, channel = connected
    cmd, t = args.drift_command, args.timeout_s
    try:
        if cmd == "status" and not args.model:
            monitors = stub.ListDrift(apb.ListDriftRequest(), metadata=metadata, timeout=t).monitors
            print(f"{'MODEL':<24} {'STATE':<9} {'WINDOWS':>8} {'DETECTIONS':>10}  DRIFTED FEATURES")
            for m in monitors:
                state = "drifted" if m.active else "ok"
                print(f"{m.model:<24} {state:<9} {m.windows:>8} {m.detections:>10}  {', '.join(m.detected) or '-'}")
            return 0
        if cmd == "status":
            status = stub.GetDrift(apb.GetDriftRequest(model=args.model), metadata=metadata, timeout=t)
        elif cmd == "reset":
            req = apb.ResetDriftRequest(model=args.model, reference=args.reference)
            status = stub.ResetDrift(req, metadata=metadata, timeout=t)
        else:
            req2 = apb.RebaselineRequest(model=args.model, rows=args.rows)
            status = stub.Rebaseline(req2, metadata=metadata, timeout=t)
        print(json.dumps(json_format.MessageToDict(status, preserving_proto_field_name=True), indent=2))
        return 0
    except grpc.RpcError as e:
        print(f"batchgate drift: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()


def main(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from .v1 import admin_pb2 as apb

    connected = _connect(args, "routes")
    if connected is None:
        return 2
    stub, metadata, channel = connected
    cmd = args.routes_command
    try:
        if cmd == "list":
            resp = stub.ListRoutes(apb.ListRoutesRequest(), metadata=metadata, timeout=args.timeout_s)
            _print_table(resp.routes)
            return 0
        if cmd == "show":
            route = stub.GetRoute(apb.GetRouteRequest(name=args.name), metadata=metadata, timeout=args.timeout_s)
            print(json.dumps(json_format.MessageToDict(route, preserving_proto_field_name=True), indent=2))
            return 0
        if cmd == "set-weight":
            weights = _weights(args.weights)
            route = stub.SetWeights(
                apb.SetWeightsRequest(name=args.name, weights=weights), metadata=metadata, timeout=args.timeout_s
            )
        else:
            call = getattr(stub, cmd.capitalize())
            route = call(apb.RouteActionRequest(name=args.name), metadata=metadata, timeout=args.timeout_s)
        _print_table([route])
        return 0
    except ValueError as e:
        print(f"batchgate routes: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"batchgate routes: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()


def _metadata(token_file: str | None) -> tuple[tuple[str, str], ...]:
    if not token_file:
        return ()
    with open(token_file, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"{token_file} is empty")
    return (("authorization", f"Bearer {token}"),)


def _channel(args: argparse.Namespace):
    import grpc

    from ..core.types import is_host_port

    if not is_host_port(args.admin):
        raise ValueError(f"--admin must be HOST:PORT with a port from 1 to 65535, not {args.admin[:128]!r}")
    if bool(args.cert_file) != bool(args.key_file):  # (gRPC core aborts the process on a certificate without its key)
        raise ValueError("--cert-file and --key-file go together: the client certificate and its private key")
    if not (args.ca_file or args.cert_file):
        return grpc.insecure_channel(args.admin)

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(read(args.ca_file), read(args.key_file), read(args.cert_file))
    return grpc.secure_channel(args.admin, creds)


def _rows(text: str) -> int:
    """A count the request's int64 field holds (past it, protobuf raised out of the command)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be a whole number of rows, 0 or more, not {text[:64]!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds greater than 0, not {text!r}")
    return value


def _weights(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not (value.strip().isascii() and value.strip().isdigit()):
            raise ValueError(f"weights are VARIANT=WEIGHT with a whole number from 0 to 100, not {item!r}")
        if name in out:
            raise ValueError(f"variant {name!r} is given twice")
        out[name] = int(value)
    return out


def _print_table(routes) -> None:
    print(f"{'ROUTE':<24} {'READY':<6} {'ROLLOUT':<22} WEIGHTS")
    for r in routes:
        rollout = "-"
        if r.HasField("rollout"):
            pct = f" {r.rollout.canary_percent:g}%" if r.rollout.HasField("canary_percent") else ""
            rollout = f"{r.rollout.state}{pct}"
        weights = " ".join(f"{v.name}={r.weights.get(v.name, 0)}" for v in r.variants)
        print(f"{r.name:<24} {'yes' if r.ready else 'no':<6} {rollout:<22} {weights}")
        if r.reason:
            print(f"{'':<24} {r.reason}")
