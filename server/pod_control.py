"""The supervisor's control plane (``supervisor.py``): what must reach every worker process, and a
load that is two-phase across them (every worker builds the new version while the old one serves;
all switch, or none does). Also the worker slots and the two-phase verdict."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
from typing import TYPE_CHECKING, Any

from . import logs
from .config import RemoteModel
from .control import ChannelClosed
from .core.errors import ErrorCode, GatewayError
from .core.types import clip
from .monitoring.families import FAMILIES
from .monitoring.metrics import RuntimeFamily, Snapshot
from .security.audit import hash_files

if TYPE_CHECKING:
    from .config import Settings
    from .control import Channel

log = logging.getLogger("batchgate")

BACKOFF_S = (0.5, 30.0)  # the first restart's delay, doubled per quick death up to the second
STEADY_S = 60.0  # a worker up this long has its backoff reset
STATS_FRESH_S = 0.5  # V2 statistics asked of any worker reuse the workers' figures read this recently
POLL_S = 2.0  # how often the workers' figures are read (what a killed worker leaves behind is this old at most)
SNAPSHOT_TIMEOUT_S = 5.0
STALE_WAIT_S = 0.25  # how long a snapshot waits for a worker that missed the last one
# Front mode: each worker batches what it receives before the hop to the owner (one call carries
# many requests, so the owner's per-call cost is shared), waiting at most this long for more; the
# owner batches again across the workers. Calls in flight from one worker to the owner, at most:
FRONT_QUEUE_DELAY_US = 500
FRONT_INFLIGHT = 4


class WorkerFailed(Exception):
    """A worker could not start the first time (the pod does not start)."""


@dataclasses.dataclass(eq=False)
class Slot:
    """One worker position: the process in it now, and what its earlier lives left behind."""

    index: int
    label: str = ""  # "0", "1", ... or "owner" (the model-owning process behind front workers)
    proc: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    member: bool = False  # joined the control plane: repository changes reach it
    ready: bool = False  # listening
    joining: bool = False  # catching up with the pod under the control lock, before it listens
    models_ready: bool = True  # what the worker's own readiness says (its models), as of its last read
    failure: str = ""  # why the process in it said it could not start
    restarts: int = 0
    last: Snapshot | None = None  # the running process's last figures
    asked_at: float = 0.0  # monotonic clock: when the read that gave ``last`` was begun
    process: list[RuntimeFamily] = dataclasses.field(default_factory=list)
    gone: Snapshot = dataclasses.field(default_factory=Snapshot)  # counters of its earlier lives
    first: asyncio.Future | None = None  # the first start's outcome
    answered_at: float = 0.0  # monotonic clock: the process's last answer to a snapshot (0: none yet)
    stale: bool = False  # it did not answer the last snapshot in time: not waited for again until it does
    owner_ready_told: bool | None = None  # front mode: the owner's readiness as last told to this worker


class _Txn:
    """A two-phase load across the member workers: each votes once its new versions are built;
    all yes: commit; one failure (or one worker gone) before that: every worker rolls back."""

    def __init__(self, members: set[int]):
        self.members = members
        self.yes: set[int] = set()
        self.failed: dict[int, BaseException] = {}
        self.decision: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def vote(self, slot: int) -> None:
        self.yes.add(slot)
        if self.yes >= self.members and not self.decision.done():
            self.decision.set_result(True)
        # Shielded: the voter's handler is cancelled when its worker dies; the verdict the
        # other voters wait for must not be cancelled with it.
        if not await asyncio.shield(self.decision):
            raise GatewayError(ErrorCode.UNAVAILABLE, "the load failed on another worker: rolled back")

    def ended(self, slot: int, fut: asyncio.Future) -> None:
        """A worker's load call ended: before the verdict, a failure (or an end without a vote:
        that worker built nothing, e.g. it was stopping) calls the load off everywhere."""
        error = asyncio.CancelledError() if fut.cancelled() else fut.exception()  # (read: never "unretrieved")
        if self.decision.done():
            return
        if error is None and slot not in self.yes:
            error = GatewayError(ErrorCode.UNAVAILABLE, "the worker ended the load without building the model")
        if error is not None:
            self.failed[slot] = error
            self.decision.set_result(False)


class PodControl:
    """The control plane, as part of :class:`~batchgate.supervisor.Supervisor`."""

    if TYPE_CHECKING:
        settings: Settings
        slots: list[Slot]
        owner: Slot | None
        stopping: bool
        _lock: asyncio.Lock
        _txns: dict[int, _Txn]
        _txn_ids: int
        _models: dict[str, tuple]
        _regions: dict[tuple[str | None, str], tuple]
        _log_changes: dict[str, Any]
        _trace_changes: dict[str, dict[str, Any]]
        _followed: list[str]
        _files: dict[str, asyncio.Future]
        _gathered_at: float
        _reads_void: int

        @property
        def owner_address(self) -> str: ...

    # ------------------------------------------------------------------ a joining worker's files
    def _remember_files(self, name: str, uploaded: dict[str, bytes] | None) -> None:
        """After a pod-wide load of ``name``: what its folder holds now, read on a thread while
        the pod serves on (a load call's uploaded files are kept in memory and replayed as they
        came: nothing on disk to compare)."""
        root = self.settings.repository.model_repository
        if root and not uploaded:
            self._files[name] = asyncio.ensure_future(asyncio.to_thread(model_files, root, name))
        else:
            self._files.pop(name, None)

    async def _same_files(self, slot: Slot) -> None:
        """A worker restarted after the pod loaded its models reads their files from disk again:
        if a model's folder changed since (a file replaced without a load call, in ``none`` or
        ``explicit`` mode), it would serve other weights than the workers beside it under the
        same name and version. While another worker serves the model as the pod loaded it, this
        one is refused before it listens (started again later, as a worker that fails its start)
        until the model is loaded through the API, which every worker then reads alike, or the
        pod restarts; with no other worker left, what it read becomes the pod's. Compared by
        content (SHA-256 of each file), so a folder rewritten with the same bytes (git-sync, a
        re-download) is no change. At the pod's start (the workers' first lives, reading the
        folders together) the files are only noted, once, on a thread: no worker waits for it.
        ``poll`` mode rescans such changes itself (only a model missing is refused: ``_same_models``)."""
        repo = self.settings.repository
        if not repo.model_repository or slot.channel is None:
            return
        served = set(await slot.channel.call("models"))
        if repo.model_control_mode == "poll":
            await self._same_models(slot, served)
            return
        if not slot.restarts:
            for name in served - set(self._files):
                self._remember_files(name, None)
            return
        alone = not [s for s in self._members() if s is not slot]
        if not alone:
            served -= await self._strays(slot, served)
        for name in sorted(served | set(self._files)):
            last = self._models.get(name)
            if last is not None and last[0] == "load" and last[3]:  # uploaded by the load call
                continue
            now = await asyncio.to_thread(model_files, repo.model_repository, name)
            if now is None:  # not a folder of the repository (a remote model)
                continue
            known = self._files.get(name)
            then = (await known) if known is not None else None
            if then is None or alone:  # unknown to the pod so far, or the only worker left
                self._files[name] = _done(now)
                continue
            if name not in served:
                why = "it could not load the model, which the workers beside it serve"
            elif now != then:
                changed = sorted({f[0] for f in set(now) ^ set(then)})
                why = (
                    "its files changed on disk since the pod loaded them ("
                    + ", ".join(c[:128] for c in changed[:3])
                    + (", ..." if len(changed) > 3 else "")
                    + "): this worker would serve other files than the workers beside it"
                )
            else:
                continue
            remedy = (
                f"load '{name[:128]}' through the repository API (every worker reads it again) or restart the pod"
                if repo.model_control_mode == "explicit"
                else "restart the pod (model_control_mode none: the pod reads model files once)"
            )
            raise GatewayError(ErrorCode.UNAVAILABLE, f"model '{name[:128]}': {why}, so it does not join: {remedy}")

    async def _theirs(self, slot: Slot) -> tuple[set[str], bool]:
        """The models the workers beside ``slot`` serve, and whether every one of them said."""
        theirs: set[str] = set()
        every = True
        for s in self._members():
            if s is not slot and s.channel is not None:
                try:
                    theirs |= set(await s.channel.call("models", timeout=10))
                except (GatewayError, TimeoutError):
                    every = False
        return theirs, every

    async def _strays(self, slot: Slot, served: set[str]) -> set[str]:
        """Repository models a restarted worker loaded that no worker beside it serves (a folder
        added since the pod read the repository, in ``none`` mode or with ``load_model: '*'``):
        not served there either, as one process would not serve them (until 2026-12-06 that
        worker alone did, so a call's answer depended on its connection)."""
        theirs, every = await self._theirs(slot)
        root, remote = self.settings.repository.model_repository, {m.name for m in self.settings.remote_models}
        strays = set()
        for name in sorted(served - theirs) if every else ():
            if name not in remote and await asyncio.to_thread(os.path.isdir, os.path.join(root, name)):
                assert slot.channel is not None
                # (a model the others could not load, mended since: not ready there, so not here)
                await slot.channel.call("not_loaded", name=name, reason=await self._wanted_reason(slot, name))
                log.warning("%s: model '%s' is not served: the workers beside it do not serve it", _named(slot), name)
                strays.add(name)
        return strays

    async def _wanted_reason(self, slot: Slot, name: str) -> str | None:
        """Why the workers beside ``slot`` serve ``name`` not, though they should (None: no such reason)."""
        for s in self._members():
            if s is not slot and s.channel is not None:
                with contextlib.suppress(GatewayError, TimeoutError):
                    return await s.channel.call("wanted_reason", name=name, timeout=10)
        return None

    async def _same_models(self, slot: Slot, served: set[str]) -> None:
        """``poll`` mode: a restarted worker that could not load a repository model the workers
        beside it serve (its files broken since: the rescan kept the old version everywhere) is
        refused like in the other modes; the rescan after the files are mended loads them."""
        if not slot.restarts:
            return
        theirs, _ = await self._theirs(slot)
        root = self.settings.repository.model_repository
        for name in sorted(theirs - served):
            if await asyncio.to_thread(os.path.isdir, os.path.join(root, name)):  # (not a remote model)
                raise GatewayError(
                    ErrorCode.UNAVAILABLE,
                    f"model '{name[:128]}': it could not load the model, which the workers beside it serve, "
                    "so it does not join: mend its files (the next rescan loads them on every worker)",
                )

    def _members(self, fronts: bool = False) -> list[Slot]:
        """The processes that hold the models (the owner in front mode), or with ``fronts`` those
        that serve clients (the workers)."""
        slots = [self.owner] if self.owner is not None and not fronts else self.slots
        return [s for s in slots if s.member and s.channel is not None]

    async def _owner_models(self) -> list[RemoteModel]:
        """The owner's models, as the remote models the front workers serve (its name, raw
        forwarding over the Unix socket, its own batching)."""
        assert self.owner is not None and self.owner.channel is not None
        names = await self.owner.channel.call("models")
        return [
            RemoteModel(
                name=n,
                upstreams=(self.owner_address,),
                batching="gateway",
                max_queue_delay_us=FRONT_QUEUE_DELAY_US,
                max_inflight=FRONT_INFLIGHT,
                retries=0,
                # the pod's own process: its probe alone says whether it serves (a model failing on
                # a client's input answers INTERNAL, which must not take the owner out of rotation)
                eject_after_failures=1 << 30,
                tells_requests=True,
            )
            for n in names
        ]

    async def _follow(self, reload: list[str]) -> None:
        """Front mode: every worker serves what the owner serves now."""
        if self.owner is None or self.owner.channel is None:
            return  # (an owner starting again: the workers follow its models once it is back, _follow_owner)
        try:
            specs = await self._owner_models()
        except ChannelClosed:  # it went away meanwhile: the same
            return
        self._followed = sorted(s.name for s in specs)
        members = self._members(True)
        results = await asyncio.gather(
            *(self._ask(s, "follow", specs=specs, reload=reload) for s in members), return_exceptions=True
        )
        for s, r in zip(members, results):
            if isinstance(r, BaseException):
                log.error("%s could not follow the model owner's models: %s", _named(s), r)

    # ------------------------------------------------------------------ the control plane
    async def load(self, name: str, config: str | None, files: dict[str, bytes] | None) -> None:
        """Load ``name`` on every worker, or on none: each builds and warms up the new versions
        while the old ones serve, then waits; once all have, all switch. A failure on one (or a
        worker gone meanwhile) makes the others close what they built; the answer says so."""
        async with self._lock:
            try:
                await self._two_phase("load", name=name, config=config, files=files)
            except GatewayError:
                await self._still_wanted(name)
                raise
            self._forget_statistics(name)
            self._models.pop(name, None)
            self._models[name] = ("load", name, config, files)
            self._remember_files(name, files)
            await self._follow([name])

    async def _still_wanted(self, name: str) -> None:
        """A load that failed leaves the model wanted (strict readiness: not ready until it loads
        or is unloaded) on the workers that asked for it; a worker started later is told so too,
        or it alone would say ready. (Old versions that serve on are replayed as loaded.)"""
        if self._models.get(name, ("",))[0] == "load":
            return
        for s in self._members():
            with contextlib.suppress(GatewayError, TimeoutError):
                reason = await s.channel.call("wanted_reason", name=name, timeout=10) if s.channel else None
                if reason is not None:
                    self._models.pop(name, None)
                    self._models[name] = ("want", name, reason)
                return

    async def _two_phase(self, op: str, **args: Any) -> None:
        """``op`` (a load) on every member worker, each voting once built; all switch or none
        (the caller holds the lock)."""
        members = self._members()
        if not members:
            raise GatewayError(ErrorCode.UNAVAILABLE, "no worker is running: try again")
        self._txn_ids += 1
        tid = self._txn_ids
        txn = self._txns[tid] = _Txn({s.index for s in members})
        calls = []
        for s in members:
            call = asyncio.ensure_future(self._ask(s, op, txn=tid, **args))
            call.add_done_callback(functools.partial(txn.ended, s.index))
            calls.append(call)
        try:
            await asyncio.gather(*calls, return_exceptions=True)
        finally:
            self._txns.pop(tid, None)
        if txn.decision.done() and txn.decision.result():
            return
        index, error = next(iter(txn.failed.items()))
        slot = _named(next(s for s in members if s.index == index))
        others = len(members) - 1
        called_off = f"; the load was called off on the other {others} worker(s)" if others else ""
        what = error.message if isinstance(error, GatewayError) else f"{slot} went away during the load"
        code = error.code if isinstance(error, GatewayError) else ErrorCode.UNAVAILABLE
        raise GatewayError(code, f"{what} ({slot}{called_off}: no worker switched versions)")

    async def _rescans(self) -> None:
        """Poll mode with several workers: the rescan is the supervisor's, so that a changed
        model is loaded two-phase like an explicit load (every worker or none) and a removed one
        unloaded everywhere. One worker says what changed; a failed build keeps the old versions
        on every worker (and is not retried until the files change again)."""
        interval = self.settings.repository.repository_poll_s
        while not self.stopping:
            await asyncio.sleep(interval)
            if self.stopping:
                return
            try:
                await self._rescan()
            except Exception:  # the rescans must outlive any one failed pass (as in one process)
                log.exception("repository rescan failed")

    async def _rescan(self) -> None:
        # Every member says what it sees changed (a worker started meanwhile may have built the
        # new files already; the others still need them): the union is loaded.
        members = [s for s in self._members() if s.ready and s.channel is not None]
        plans = await asyncio.gather(
            *(s.channel.call("rescan_plan", timeout=60) for s in members if s.channel), return_exceptions=True
        )
        load = sorted({n for p in plans if isinstance(p, dict) for n in p["load"]})
        unload = sorted({n for p in plans if isinstance(p, dict) for n in p["unload"]})
        for name in load:  # the lock per model: joins and other changes go on between them
            if self.stopping:
                return
            async with self._lock:
                try:
                    await self._two_phase("poll_load", name=name)
                    self._forget_statistics(name)
                except GatewayError as e:
                    log.error("repository rescan: model '%s' not reloaded on any worker: %s", name, e.message)
        for name in unload:
            async with self._lock:
                with contextlib.suppress(GatewayError, TimeoutError):
                    await self._everywhere("poll_unload", self._members(), name=name)
                    self._forget_statistics(name, unloaded=True)
        if load or unload:
            async with self._lock:
                await self._follow(load)

    def _forget_statistics(self, name: str, unloaded: bool = False) -> None:
        """``name`` loaded again or unloaded on every worker: the V2 statistics (and Triton's
        failure reasons) of its old versions that exited workers left behind go too; the new
        versions count from zero, as in one process (the batchgate_* counters stay, but for a
        remote model's upstreams once it is ``unloaded``: one process drops their series then,
        which until 2026-12-06 stayed for good once a worker had restarted). The last read of the
        workers' figures, which holds the old versions' counts, is not reused for a statistics
        call (until 2026-12-06 one asked within half a second of the load showed them)."""
        self._gathered_at, self._reads_void = -1e9, self._reads_void + 1
        for s in self.slots + ([self.owner] if self.owner is not None else []):
            s.gone.stats = {k: v for k, v in s.gone.stats.items() if k[0] != name}
            s.gone.failures = {k: v for k, v in s.gone.failures.items() if k[0] != name}
            for family, series in s.gone.values.items() if unloaded else ():
                if FAMILIES[family].labels[:2] == ("model", "upstream"):
                    for k in [k for k in series if k[0] == name]:
                        del series[k]

    async def unload(self, name: str) -> None:
        async with self._lock:
            served: list = []  # each worker's versions served last (its answer)
            with contextlib.suppress(ChannelClosed):  # a worker gone meanwhile unloads it as it starts again
                await self._everywhere("unload", self._members(), answers=served, name=name)
            self._forget_statistics(name, unloaded=True)
            self._models.pop(name, None)
            # With those versions a worker joining later lists the model as the others do
            # (index rows "unloaded" with their versions), not as one it never served.
            self._models[name] = ("unload", name, max(served, key=len, default=[]))
            self._files.pop(name, None)
            await self._follow([])

    async def shm_register(self, name: str, key: str, offset: int, byte_size: int, owner: str | None) -> None:
        async with self._lock:
            done = await self._everywhere(
                "shm_register",
                self._members(True),
                name=name,
                key=key,
                offset=offset,
                byte_size=byte_size,
                owner=owner,
                undo=True,
            )
            if done is not None:  # registered nowhere now; the first error is the answer
                raise done
            self._regions[(owner, name)] = ("shm_register", name, key, offset, byte_size, owner)

    async def drop_regions(self, regions: list[tuple[str | None, str]]) -> None:
        """Regions a joining worker could not register (their segments were shrunk or removed
        since): unregistered from every worker and no longer replayed, so that the workers agree
        (before, some answered with the region and the restarted one without it). The caller
        holds the lock."""
        for owner, name in regions:
            self._regions.pop((owner, name), None)
            log.warning("shared-memory region '%s' is dropped: a worker starting again could not map it", clip(name))
            with contextlib.suppress(GatewayError):
                await self._everywhere("shm_unregister", self._members(True), name=name, owner=owner)

    def forget_owners(self, owners: list[str]) -> None:
        """Keys removed from the keys file: their regions are not replayed to a worker that
        starts again (each worker drops them itself when it reads the file)."""
        for k in [k for k in self._regions if k[0] in owners]:
            self._regions.pop(k)

    async def shm_unregister(self, name: str, owner: str | None) -> None:
        async with self._lock:
            try:
                await self._everywhere("shm_unregister", self._members(True), name=name, owner=owner)
            finally:  # gone from the replay even where a worker did not hold it
                for k in [k for k in self._regions if k[0] == owner and (not name or k[1] == name)]:
                    self._regions.pop(k)

    def _members_and_owner(self) -> list[Slot]:
        """Every worker that has joined, and the model-owning process of front mode."""
        return self._members(True) + ([self.owner] if self.owner is not None and self.owner.member else [])

    async def log_settings(self, changes: dict[str, Any]) -> None:
        """The logging extension's changes (checked by the worker that took them): every worker's
        logs and the supervisor's own."""
        async with self._lock:
            logs.change_log_settings(changes)
            self._log_changes.update(changes)
            every = self._members_and_owner()
            await self._everywhere("log_settings", every, changes=changes)

    async def trace_settings(self, model: str, changes: dict[str, Any]) -> None:
        """The trace extension's changes (checked by the worker that took them), for the server
        ("") or one model: every worker's tracing. Kept, merged per model, for a worker that
        starts later."""
        async with self._lock:
            kept = self._trace_changes.setdefault(model, {})
            kept.update(changes)
            every = self._members_and_owner()
            await self._everywhere("trace_settings", every, model=model, changes=changes)

    async def _ask(self, slot: Slot, op: str, **args: Any) -> Any:
        """``op`` on one worker, waited for as long as it answers the supervisor: one that stops
        answering (hung, stopped) is killed after ``worker_hang_s`` (``_kill_hung``, which never
        waits for a change) and the call then fails naming it and why; so no pod-wide change
        waits on a hung worker for longer (with ``worker_hang_s`` 0 it does: nothing is killed).
        Not a timeout on the call itself: a worker that answers may take its time (a large load)."""
        channel, pid = slot.channel, slot.proc.pid if slot.proc is not None else -1
        if channel is None:
            raise ChannelClosed(f"{_named(slot)} is not running: it catches up as it starts again")
        try:
            return await channel.call(op, **args)
        except ChannelClosed:
            why = slot.failure or f"(pid {pid}) went away during the call"
            raise ChannelClosed(f"{_named(slot)} {why}") from None

    async def _everywhere(
        self, op: str, members: list[Slot], undo: bool = False, answers: list | None = None, **args: Any
    ) -> GatewayError | None:
        """``op`` on each of ``members``; the first error raised (with ``undo``: the successful
        registrations unregistered again and the error returned). ``answers`` gets the answers
        of those that succeeded, also when another failed."""
        if not members:
            raise GatewayError(ErrorCode.UNAVAILABLE, "no worker is running: try again")
        results = await asyncio.gather(*(self._ask(s, op, **args) for s in members), return_exceptions=True)
        if answers is not None:
            answers.extend(r for r in results if not isinstance(r, BaseException))
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            return None
        first = errors[0] if isinstance(errors[0], GatewayError) else GatewayError(ErrorCode.INTERNAL, str(errors[0]))
        if not undo:
            raise first
        for s, r in zip(members, results):
            if not isinstance(r, BaseException) and s.channel is not None:
                with contextlib.suppress(GatewayError):
                    await s.channel.call("shm_unregister", name=args["name"], owner=args["owner"])
        return first


def _detached(op):
    """A pod-wide operation a worker asked for, run to its end even if that worker dies meanwhile
    (its handler is then cancelled; the other workers must not be left half-changed)."""

    async def run(**args: Any) -> Any:
        task = asyncio.ensure_future(op(**args))
        # (its error is the asking worker's answer; with that worker gone, nobody else's)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)

    return run


def _named(slot: Slot) -> str:
    return "model owner" if slot.label == "owner" else f"worker {slot.label}"


def model_files(root: str, name: str) -> tuple | None:
    """What the repository folder of model ``name`` holds: each regular file's path and SHA-256
    (``hash_files``, as the audit log hashes a load's files; hidden entries left out, linked
    folders followed, as a ConfigMap's ``1 -> ..data/1``). None when there is no such folder, or
    it cannot be hashed within hash_files' bounds (then it is not compared)."""
    top = os.path.join(root, name)
    if not name or "/" in name or name.startswith(".") or not os.path.isdir(top):
        return None
    try:
        hashed, more = hash_files(top, linked_folders=True, hidden=False)
    except (OSError, ValueError):
        return None
    return tuple(sorted(hashed.items())) + ((f"({more} more files, not hashed)", ""),) * bool(more)


def _done(value: Any) -> asyncio.Future:
    f = asyncio.get_running_loop().create_future()
    f.set_result(value)
    return f
