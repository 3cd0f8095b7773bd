"""What ``bench/overload.py`` makes of its phases: the summary rows, what the server's CPU says
of each overload phase, the printed table and the plot."""

from __future__ import annotations

from pathlib import Path

from http_cost import goodput_bound

CDF_POINTS = [1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9]


def plot(report: dict, path: Path) -> None:
    """Latency percentiles by phase and outcome (OK, refused), log scale, with goodput in the
    legend, and nginx's refusal p50 and p99 under the same load where the reference ran: where
    the overload goes, at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [(k, v) for k, v in report["phases"].items() if v and "latency_ms" in v]
    fig, ax = plt.subplots(figsize=(12.5, 5.5))
    for i, (name, r) in enumerate(phases):
        colour = f"C{i}"
        cap = report["phases"]["capacity-grpc" if "grpc" in name else "capacity-http"]["ok_per_s"]
        for outcome, style in (("ok", "-"), ("refused", "--")):
            values = r["latency_ms"].get(outcome)
            if values:
                label = f"{name} {outcome}"
                if outcome == "ok" and not name.startswith("capacity"):
                    label += f" (goodput {r['ok_per_s'] / cap:.2f} of capacity)"
                ax.plot(values, CDF_POINTS, style, color=colour, marker="o", ms=3, label=label)
        ref = report.get("reference", {}).get(name)
        if ref and ref.get("refusal_p99_ms"):  # the same clients against nginx refusing all
            ax.plot([ref["refusal_p50_ms"], ref["refusal_p99_ms"]], [50, 99], ":", color=colour, marker="x",
                    label=f"{name}: nginx refusing all (p50, p99)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("latency seen by the client (ms, log scale)")
    ax.set_ylabel("percentile")
    ax.set_title(f"batchgate under overload ({report['settings']}; {report['pinning']})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # (beside the lines, not on them)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(cap_g, cap_h, over_g, over_h, conns_h, conns_g=None, reference=None) -> list[dict]:
    """One row per overload phase that ran; ``reference``: nginx's figures by phase
    (``overload_reference.py``), its refusal p99 beside batchgate's."""
    rows = []
    for name, key, cap, r in (
        ("gRPC 3x open", "overload-grpc", cap_g, over_g),
        ("HTTP 3x open", "overload-http", cap_h, over_h),
        ("HTTP 5000 conns", "connections-http", cap_h, conns_h),
        ("gRPC 5000 conns", "connections-grpc", cap_g, conns_g),
    ):
        if r is None:
            continue
        if "error" in r:
            rows.append({"phase": name, "capacity_per_s": round(cap["ok_per_s"]), "error": r["error"]})
            continue
        rows.append(
            {
                "phase": name,
                "capacity_per_s": round(cap["ok_per_s"]),
                "offered_per_s": round(r["offered_per_s"]),
                "goodput_fraction": round(r["ok_per_s"] / cap["ok_per_s"], 3) if cap["ok_per_s"] else None,
                "ok_p99_ms": r["ok_p99_ms"],
                "capacity_p99_ms": cap["ok_p99_ms"],
                "ok_p99_ratio": round(r["ok_p99_ms"] / cap["ok_p99_ms"], 2)
                if r["ok_p99_ms"] and cap["ok_p99_ms"]
                else None,
                "refusal_p99_ms": r["refusal_p99_ms"],
                # the same clients against nginx refusing every request on the same core
                "nginx_refusal_p99_ms": (reference or {}).get(key, {}).get("refusal_p99_ms"),
                # the event loop's thread: runnable but off the core (the model's threads had it)
                "loop_waiting_for_core": r.get("threads", {}).get("loop_waiting_for_core"),
                # the server's own event-loop lag p99 (a bucket's bound): a floor under the refusal p99
                "server_loop_lag_p99_ms": r.get("server_stalls", {}).get("loop_lag_p99_ms"),
                # after the onset (connections opening, the burst admitted for queue_interval_ms)
                "ok_p99_after_first_second_ms": r.get("timeline", {}).get("ok_p99_after_first_second_ms"),
                "refusal_p99_after_first_second_ms": r.get("timeline", {}).get("refusal_p99_after_first_second_ms"),
                # the server's view of its queue (time admitted answers waited in it), interpolated
                "server_queue_p99_ms": r.get("server_stalls", {}).get("server_queue_p99_ms"),
                "cancelled": r["cancelled"],
                "closed_or_reset": r["closed_or_reset"],
                "queue_depth_mean": r["queue_depth_mean"],
                "client_in_system": r["client_in_system"],
                **costs(cap, r),
            }
        )
    return rows


def costs(cap: dict, r: dict) -> dict:
    """What the server's CPU says of an overload phase: an answer's cost (the capacity phase's
    CPU over its answers), a refusal's (the rest of this phase's CPU over its refusals: the mix's
    own overheads land here too), their ratio, and, when no connection was held, the goodput at
    this load that ratio allows a server that reads every request (``http_cost.goodput_bound``)."""
    if not (cap.get("server_cpu_s") and cap["ok_per_s"] and r.get("server_cpu_s") and r.get("refused")):
        return {}
    answer = cap["server_cpu_s"] / (cap["ok_per_s"] * cap["seconds"])
    refusal = (r["server_cpu_s"] - answer * r["ok_per_s"] * r["seconds"]) / r["refused"]
    if refusal <= 0:
        return {}
    out = {
        "server_busy": round(r["server_busy"], 3),
        "answer_cpu_us": round(answer * 1e6, 1),
        "refusal_cpu_us": round(refusal * 1e6, 1),
        "refusal_over_answer": round(refusal / answer, 3),
    }
    # Connections held past the refusals' rate leave requests unread: the bound is for a server
    # that reads them all (and the CPU of the holds themselves lands on the refusals above).
    if not r["server"].get("holds"):
        out["goodput_bound"] = round(goodput_bound(answer, refusal, r["offered_per_s"] / cap["ok_per_s"]), 3)
    return out


def print_summary(rows) -> None:
    cols = [
        "phase",
        "capacity_per_s",
        "offered_per_s",
        "goodput_fraction",
        "ok_p99_ms",
        "capacity_p99_ms",
        "ok_p99_ratio",
        "refusal_p99_ms",
        "nginx_refusal_p99_ms",
        "server_loop_lag_p99_ms",
        "loop_waiting_for_core",
        "ok_p99_after_first_second_ms",
        "refusal_p99_after_first_second_ms",
        "server_queue_p99_ms",
        "cancelled",
        "closed_or_reset",
        "queue_depth_mean",
        "client_in_system",
        "server_busy",
        "refusal_over_answer",
        "goodput_bound",
    ]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(round(r[c], 2) if isinstance(r.get(c), float) else r.get(c, "n/a")) for c in cols))
