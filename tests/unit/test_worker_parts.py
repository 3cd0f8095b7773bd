"""The pure parts of worker processes: the core count and CPU quota, the ``workers`` setting,
the control channel's calls and errors, a two-phase load's verdict, a worker's settings."""

from __future__ import annotations

import asyncio
import socket

import pytest

from batchgate import cores
from batchgate.config import ConfigError, load_settings
from batchgate.control import Channel, ChannelClosed
from batchgate.core.errors import ErrorCode, GatewayError
from batchgate.supervisor import Supervisor, _Txn


def test_the_cgroup_v2_quota_is_read_and_rounded_up(tmp_path):
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cores.quota(str(tmp_path)) == 2.5
    assert cores.available(str(tmp_path)) == min(3, cores.affinity())
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cores.quota(str(tmp_path)) is None
    assert cores.available(str(tmp_path)) == cores.affinity()


def test_the_cgroup_v1_quota_is_read_and_a_small_one_still_gives_one_core(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cores.quota(str(tmp_path)) == 0.5
    assert cores.available(str(tmp_path)) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cores.quota(str(tmp_path)) is None
    assert cores.quota(str(tmp_path / "nothing")) is None


@pytest.mark.parametrize("text, n", [("1", 1), ("4", 4), (" 8 ", 8), ("AUTO", None), ("auto", None)])
def test_workers_is_a_count_or_auto(text, n):
    assert cores.parse_workers(text) == n


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "many", "", "257", "9" * 30, "\u00b2", "\u0663", "+2"])
def test_workers_out_of_range_is_refused_naming_the_setting(text):
    with pytest.raises(ConfigError, match="workers.*'auto' or a whole number from 1 to 256"):
        load_settings(flags={"workers": text, "model_repository": "."})


def test_auto_workers_follow_the_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    assert cores.resolve_workers("auto", str(tmp_path)) == min(2, cores.affinity())
    assert cores.resolve_workers("3", str(tmp_path)) == 3


def test_a_worker_gets_a_share_of_the_cores():
    try:
        cores.set_workers(1)
        alone = cores.share()
        cores.set_workers(alone * 4)
        assert cores.share() == 1
        cores.set_workers(2)
        assert cores.share() == max(1, alone // 2)
    finally:
        cores.set_workers(1)


async def _pair(handlers_a: dict, handlers_b: dict) -> tuple[Channel, Channel, list[asyncio.Task]]:
    a_sock, b_sock = socket.socketpair()
    a, b = await Channel.over(a_sock, handlers_a), await Channel.over(b_sock, handlers_b)
    return a, b, [asyncio.ensure_future(a.serve()), asyncio.ensure_future(b.serve())]


async def _closed(a: Channel, b: Channel, tasks: list[asyncio.Task]) -> None:
    a.close()
    b.close()
    await asyncio.wait(tasks, timeout=5)


async def test_calls_go_both_ways_and_errors_keep_their_code():
    async def add(x: int, y: int) -> int:
        return x + y

    async def refuse() -> None:
        raise GatewayError(ErrorCode.NOT_FOUND, "no such model")

    async def crash() -> None:
        raise RuntimeError("a bug")

    async def ask_back(n: int) -> int:  # a handler may call the other end while it answers
        return await a.call("add", x=n, y=n)

    a, b, tasks = await _pair({"add": add}, {"refuse": refuse, "crash": crash, "ask_back": ask_back, "add": add})
    assert await a.call("add", x=2, y=3) == 5
    assert await b.call("add", x=1, y=1) == 2
    assert await a.call("ask_back", n=21) == 42
    big = b"x" * (3 * 2**20)  # bigger than the stream's buffer: an upload's files travel here
    assert await a.call("add", x=big, y=b"") == big
    with pytest.raises(GatewayError) as e:
        await a.call("refuse")
    assert e.value.code is ErrorCode.NOT_FOUND and e.value.message == "no such model"
    with pytest.raises(GatewayError) as e:
        await a.call("crash")
    assert e.value.code is ErrorCode.INTERNAL and "a bug" in e.value.message
    with pytest.raises(GatewayError, match="not known here"):
        await a.call("nothing")
    await _closed(a, b, tasks)
    with pytest.raises(ChannelClosed):
        await a.call("add", x=1, y=1)


async def test_a_call_waiting_when_the_other_end_goes_fails_at_once():
    async def forever() -> None:
        await asyncio.sleep(3600)

    a, b, tasks = await _pair({}, {"forever": forever})
    waiting = asyncio.ensure_future(a.call("forever"))
    await asyncio.sleep(0.05)
    b.close()
    with pytest.raises(ChannelClosed, match="went away"):
        await asyncio.wait_for(waiting, 5)
    await _closed(a, b, tasks)


async def test_a_call_behind_a_message_the_other_end_does_not_read_keeps_its_timeout():
    """The other end stopped reading (a process stopped or hung) while a large message waited to be
    sent: a call with a timeout waited for room in the socket for ever (only the answer was timed),
    so the supervisor's reading of the figures, and with it the killing of hung workers, stopped.
    Once that end is gone, the call waiting to send fails as a closed channel."""
    a_sock, b_sock = socket.socketpair()
    a = await Channel.over(a_sock, {})
    reading = asyncio.ensure_future(a.serve())
    upload = asyncio.ensure_future(a.call("load", files=b"x" * (16 * 2**20)))  # never read
    await asyncio.sleep(0.05)  # (the upload is in the socket's way now)
    snapshot = asyncio.ensure_future(a.call("snapshot", timeout=0.5))
    done, _ = await asyncio.wait([snapshot], timeout=30)
    assert snapshot in done, "the call waited past its timeout for room to send"
    assert isinstance(snapshot.exception(), TimeoutError)
    b_sock.close()
    with pytest.raises(ChannelClosed, match="went away"):
        await asyncio.wait_for(upload, 5)
    a.close()
    await asyncio.wait([reading], timeout=5)


async def test_a_two_phase_load_commits_only_when_every_worker_voted():
    txn = _Txn({0, 1})
    first = asyncio.ensure_future(txn.vote(0))
    await asyncio.sleep(0)
    assert not first.done()  # waits for the other worker
    await txn.vote(1)
    await first
    assert txn.decision.result() is True


async def test_one_failure_calls_the_load_off_everywhere():
    txn = _Txn({0, 1, 2})
    voted = asyncio.ensure_future(txn.vote(0))
    await asyncio.sleep(0)
    failed: asyncio.Future = asyncio.get_running_loop().create_future()
    failed.set_exception(GatewayError(ErrorCode.INVALID_ARGUMENT, "bad config"))
    txn.ended(1, failed)
    with pytest.raises(GatewayError, match="rolled back"):
        await voted
    with pytest.raises(GatewayError, match="rolled back"):
        await txn.vote(2)  # a late voter rolls back too
    assert list(txn.failed) == [1] and txn.failed[1].message == "bad config"
    later: asyncio.Future = asyncio.get_running_loop().create_future()
    later.set_exception(GatewayError(ErrorCode.UNAVAILABLE, "rolled back"))
    txn.ended(0, later)  # a rollback is not the cause
    assert list(txn.failed) == [1]


async def test_a_worker_gone_mid_load_calls_it_off():
    txn = _Txn({0, 1})
    gone: asyncio.Future = asyncio.get_running_loop().create_future()
    gone.cancel()
    txn.ended(1, gone)
    assert txn.decision.result() is False


def test_a_worker_listens_on_the_reserved_ports_and_only_worker_0_on_the_admin_ones(tmp_path):
    s = load_settings(flags={"workers": "3", "model_repository": str(tmp_path), "metrics_port": 9100})
    sup = Supervisor(s)
    sup.ports = {"http_port": 1234, "grpc_port": 1235, "admin_port": 1236, "admin_http_port": 1237}
    w0, w2 = (sup.worker_settings(sup.slots[i]).server for i in (0, 2))
    assert (w0.http_port, w0.grpc_port, w0.admin_port, w0.admin_http_port) == (1234, 1235, 1236, 1237)
    assert (w2.http_port, w2.grpc_port, w2.admin_port, w2.admin_http_port) == (1234, 1235, -1, -1)
    assert w0.metrics_port == w2.metrics_port == w0.health_port == -1  # the supervisor's
    assert w0.workers == "1" and sup.n == 3


async def test_a_voter_cancelled_with_its_worker_leaves_the_verdict_to_the_others():
    txn = _Txn({0, 1, 2})
    dying = asyncio.ensure_future(txn.vote(0))
    waiting = asyncio.ensure_future(txn.vote(1))
    await asyncio.sleep(0)
    dying.cancel()  # worker 0 died: the channel cancels its handler
    await asyncio.sleep(0)
    assert not txn.decision.done()  # the shared verdict is not cancelled with it
    gone: asyncio.Future = asyncio.get_running_loop().create_future()
    gone.cancel()
    txn.ended(0, gone)
    with pytest.raises(GatewayError, match="rolled back"):
        await asyncio.wait_for(waiting, 5)


async def test_a_load_that_ends_without_a_vote_calls_it_off():
    txn = _Txn({0, 1})
    waiting = asyncio.ensure_future(txn.vote(0))
    await asyncio.sleep(0)
    quiet: asyncio.Future = asyncio.get_running_loop().create_future()
    quiet.set_result(None)  # e.g. a worker that was stopping: it built nothing
    txn.ended(1, quiet)
    with pytest.raises(GatewayError, match="rolled back"):
        await asyncio.wait_for(waiting, 5)
    assert "without building" in txn.failed[1].message


async def test_a_message_past_the_bound_is_refused_not_sent(monkeypatch):
    import batchgate.control as control

    async def echo(data: bytes) -> bytes:
        return data

    a, b, tasks = await _pair({}, {"echo": echo})
    monkeypatch.setattr(control, "MAX_MESSAGE_BYTES", 1000)
    with pytest.raises(GatewayError, match="too large") as e:
        await a.call("echo", data=b"x" * 2000)
    assert e.value.code is ErrorCode.INVALID_ARGUMENT
    assert await a.call("echo", data=b"small") == b"small"  # the channel goes on
    await _closed(a, b, tasks)


async def test_a_slow_read_of_the_workers_figures_never_puts_older_ones_back(tmp_path):
    """The supervisor reads every worker's figures for each scrape, each statistics call and
    every 2 s; a read that waits for a slow worker ends after later reads did. Its figures of the
    quick worker are older than theirs then: kept, they took the V2 statistics (a reading reused
    for 0.5 s) and what a worker killed then leaves in the totals backwards (seen: a statistics
    count of 1167, then 583, with one worker stopped)."""
    from batchgate.monitoring.metrics import Snapshot

    sup = Supervisor(load_settings(flags={"workers": "2", "model_repository": str(tmp_path)}))
    answered = {"0": 0}
    release = asyncio.Event()

    def figures(n: int) -> dict:
        snap = Snapshot()
        snap.add("batchgate_requests", ("clf", "1", "http", "OK"), n)
        return {"snapshot": snap, "process": [], "ready": True, "in_flight": 0}

    async def quick() -> dict:
        return figures(answered["0"])

    async def slow() -> dict:
        await release.wait()
        return figures(10)

    pairs = [await _pair({}, {"snapshot": quick}), await _pair({}, {"snapshot": slow})]
    for slot, (mine, _, _) in zip(sup.slots, pairs):
        slot.channel, slot.ready = mine, True
    try:
        answered["0"] = 1
        patient = asyncio.ensure_future(sup.gather(patient=True))  # worker 0 answers 1 at once
        await asyncio.sleep(0.1)
        answered["0"] = 5
        sup.slots[1].stale = True  # (missed a read: the next one waits for it a moment only)
        assert _requests(await sup.gather()) == 5  # worker 1 left out: it answered nothing yet
        release.set()
        await asyncio.wait_for(patient, 5)  # ends last, with worker 0's older figure
        assert _requests(await sup.gather(fresh_s=60)) == 5 + 10  # the reading reused: the newest
    finally:
        for a, b, tasks in pairs:
            await _closed(a, b, tasks)


def _requests(snap) -> float:
    return sum(snap.values.get("batchgate_requests", {}).values())
