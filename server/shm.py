"""The system shared-memory extension: tensors read from and written to regions a client registered.

A client creates a POSIX shared-memory segment, writes its inputs there and registers the segment
(or a part of it) under a region name (``/v2/systemsharedmemory/region/<name>/register``, gRPC
``SystemSharedMemoryRegister``). A request then names the region instead of carrying the bytes:
an input's parameters ``shared_memory_region``, ``shared_memory_byte_size`` and optionally
``shared_memory_offset``; an output with the same parameters is written into the region and
answered without its data.

What a client controls is bounded here:

- the key must be a plain POSIX shared-memory name starting with ``shm_key_prefix`` (so no client
  maps another process's segment, and no key is a path: the segment is opened under /dev/shm with
  no symlink followed, and must be a regular file);
- a region lies inside its segment (offset and size checked against the segment's size when it is
  registered), and every read or write lies inside its region;
- regions at once (``shm_max_regions``) and their bytes together (``shm_max_bytes``) are bounded;
- region names are short printable text; they are answered back in the status, never used as a
  metric label or a path.

Everything here runs on the event loop: a read or write happens in one go, so a region cannot be
unregistered in the middle of one. Regions are read and written with pread/pwrite, never mapped: a
segment its client shrinks afterwards gives a short read (refused), not a SIGBUS.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .core.errors import ErrorCode, GatewayError, invalid
from .core.types import DATATYPES, InferResponse, clip, printable, to_raw

log = logging.getLogger("batchgate.shm")

SHM_DIR = "/dev/shm"
REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
_KEY = re.compile(r"/[A-Za-z0-9_.-]{1,250}")
# printable ASCII but '/' and '\\': HTTP addresses a region by name in its path, where an encoded
# separator is refused (http_scope.py), so such a name registered over gRPC could not be named
_NAME = re.compile(r"[\x20-\x2e\x30-\x5b\x5d-\x7e]{1,128}")  # (a space is printable: "input data")


@dataclass(frozen=True, slots=True)
class Place:
    """Where a tensor lies: ``byte_size`` bytes at ``offset`` of a region (the very region found
    when the request was read: one unregistered and registered again under the same name since
    is not written to)."""

    region: str
    offset: int
    byte_size: int
    found: Region | None = None


class Region:
    """A registered region: ``byte_size`` bytes at ``offset`` of a segment, read and written with
    pread/pwrite on the segment's descriptor. Not mapped: a client that shrinks its segment after
    registering it would make an access to the mapping past the new end kill the process (SIGBUS);
    a read past the end here is only short, and refused."""

    __slots__ = ("name", "key", "offset", "byte_size", "owner", "_fd")

    def __init__(self, name: str, key: str, offset: int, byte_size: int, fd: int, owner: str | None):
        self.name, self.key, self.offset, self.byte_size, self.owner = name, key, offset, byte_size, owner
        self._fd = fd

    def __del__(self) -> None:
        # Unregistered while requests still held it (their Place.found): the descriptor goes with
        # the last of them, so they finish as if it had waited for them (as Triton's does).
        self.close()

    def read(self, offset: int, size: int) -> bytes:
        try:
            data = os.pread(self._fd, size, self.offset + offset)
        except OSError as e:
            raise invalid(f"shared-memory region '{self.name}' cannot be read: {e.strerror}") from None
        if len(data) != size:
            raise invalid(
                f"shared-memory region '{self.name}': its segment '{self.key}' is shorter than when it was registered"
            )
        return data

    def check_room(self, offset: int, size: int) -> None:
        """INVALID_ARGUMENT when the segment (which the client may have shrunk since it registered
        it) ends before ``size`` bytes at ``offset``: a write past its end would grow it again."""
        try:
            short = os.fstat(self._fd).st_size < self.offset + offset + size
        except OSError as e:
            raise invalid(f"shared-memory region '{self.name}' cannot be written: {e.strerror}") from None
        if short:
            raise invalid(
                f"shared-memory region '{self.name}': its segment '{self.key}' is shorter than when it was registered"
            )

    def write(self, offset: int, data: bytes) -> None:
        self.check_room(offset, len(data))
        try:
            written = os.pwrite(self._fd, data, self.offset + offset)
        except OSError as e:
            raise invalid(f"shared-memory region '{self.name}' cannot be written: {e.strerror}") from None
        if written != len(data):
            raise invalid(f"shared-memory region '{self.name}': only {written} of {len(data)} bytes could be written")

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class SharedMemory:
    """The registered regions of this process.

    With API keys every region belongs to the key that registered it: its name is that key's
    (two keys may each have a region "input"), and only that key can use it in a request, see it
    in the status or unregister it; another key cannot read a tenant's inputs or overwrite its
    outputs by naming its region. On a server without keys there is one owner, None. A request
    works through :meth:`view` of its caller's key."""

    def __init__(
        self,
        key_prefix: str,
        max_regions: int,
        max_bytes: int,
        max_tensor_bytes: int = 64 << 20,
        max_regions_per_key: int | None = None,
        max_bytes_per_key: int | None = None,
        key_ids: Callable[[], Iterable[str]] = tuple,
    ):
        self.key_prefix = key_prefix
        self._key_ids = key_ids  # the API keys' ids: which of them a segment's name belongs to
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        # With API keys, one key's share (so no key can take every tenant's regions); None = the totals.
        self.max_regions_per_key = max_regions_per_key or max_regions
        self.max_bytes_per_key = max_bytes_per_key or max_bytes
        self.max_tensor_bytes = max_tensor_bytes  # one tensor read from a region (the request body's bound)
        self._regions: dict[tuple[str | None, str], Region] = {}
        self.bytes = 0
        self.counts: dict[tuple[str, str], int] = {}  # (action, outcome) -> calls, for the metrics
        self._views: dict[str | None, RegionView] = {}

    @property
    def regions(self) -> list[Region]:
        return list(self._regions.values())

    def view(self, owner: str | None) -> RegionView:
        """The regions ``owner`` (an API key's id, None without keys) may use in its requests."""
        v = self._views.get(owner)
        if v is None:
            if len(self._views) > 4096:  # one per key seen: bounded by the key list, kept small anyway
                self._views.clear()
            v = self._views[owner] = RegionView(self, owner)
        return v

    def count(self, action: str, outcome: str) -> None:
        key = (action, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1

    # ------------------------------------------------------------------ the extension's calls
    def register(
        self, name: str, key: str, offset: int, byte_size: int, owner: str | None = None, counted: bool = True
    ) -> None:
        """Register a region (``counted`` False: a worker process applying another's registration,
        which that one counts)."""
        try:
            self._register(name, key, offset, byte_size, owner)
        except GatewayError as e:
            if counted:
                self.count("register", e.code.value)
            raise
        if counted:
            self.count("register", "OK")

    def _register(self, name: str, key: str, offset: int, byte_size: int, owner: str | None) -> None:
        if not _NAME.fullmatch(name):
            raise invalid(
                f"shared-memory region name '{printable(clip(name))}' must be 1 to 128 printable ASCII characters, "
                "not '/' or '\\' (HTTP names a region in its path)"
            )
        if (owner, name) in self._regions:
            raise GatewayError(ErrorCode.ALREADY_EXISTS, f"shared-memory region '{name}' is already registered")
        if not self.key_prefix:
            raise GatewayError(
                ErrorCode.FAILED_PRECONDITION,
                "system shared memory is turned off on this server (shm_key_prefix is empty)",
            )
        if not _KEY.fullmatch(key) or key in ("/.", "/.."):
            raise invalid(
                f"shared-memory key '{printable(clip(key))}' must be a POSIX shared-memory name: '/' then 1 to 250 "
                "letters, digits, '_', '.' or '-'"
            )
        # With API keys a key maps only its own segments: their names carry its id after the prefix.
        prefix = self.key_prefix if owner is None else f"{self.key_prefix}{owner}_"
        if owner is not None and key.startswith(prefix):
            # ids may hold '_': '/batchgate_app_x_1' starts with key 'app''s prefix too, but is
            # key 'app_x''s: a segment belongs to the longest id whose prefix its name starts with
            longest = max(
                (i for i in self._key_ids() if len(i) > len(owner) and key.startswith(f"{self.key_prefix}{i}_")),
                key=len,
                default=None,
            )
            if longest is not None:
                raise GatewayError(
                    ErrorCode.PERMISSION_DENIED, f"shared-memory key {key!r} is named for another API key"
                )
        if not key.startswith(prefix):
            raise GatewayError(
                ErrorCode.PERMISSION_DENIED,
                f"shared-memory key {key!r} does not start with '{prefix}', the prefix this server maps "
                + (
                    "(shm_key_prefix)"
                    if owner is None
                    else "for this API key (shm_key_prefix, then the key's id and '_')"
                ),
            )
        if type(offset) is not int or type(byte_size) is not int or offset < 0 or byte_size < 1:
            raise invalid("a shared-memory region needs an offset >= 0 and a byte_size >= 1")
        if len(self._regions) >= self.max_regions:
            raise GatewayError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{self.max_regions} shared-memory regions are registered already, the most allowed (shm_max_regions)",
            )
        if byte_size > self.max_bytes:  # never to be registered, whatever is freed: the caller's error
            raise invalid(
                f"a region of {byte_size} bytes is larger than the {self.max_bytes} bytes of shared memory allowed "
                "in all (shm_max_bytes)"
            )
        if self.bytes + byte_size > self.max_bytes:
            raise GatewayError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"registering {byte_size} more bytes of shared memory would pass the {self.max_bytes} bytes allowed "
                f"({self.bytes} are registered) (shm_max_bytes)",
            )
        if owner is not None:
            mine = [r for (o, _), r in self._regions.items() if o == owner]
            if len(mine) >= self.max_regions_per_key:
                raise GatewayError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"API key '{owner}' has {len(mine)} shared-memory regions registered, the most one key may "
                    "(shm_max_regions_per_key)",
                )
            held = sum(r.byte_size for r in mine)
            if held + byte_size > self.max_bytes_per_key:
                raise GatewayError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"registering {byte_size} more bytes would pass the {self.max_bytes_per_key} bytes one API key "
                    f"may register ({held} are) (shm_max_bytes_per_key)",
                )
        try:
            fd = os.open(os.path.join(SHM_DIR, key[1:]), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            raise invalid(f"shared-memory key '{key}' cannot be opened: no such segment the server may map") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise invalid(f"shared-memory key '{key}' is not a shared-memory segment")
            if offset + byte_size > st.st_size:
                raise invalid(
                    f"shared-memory region '{name}': offset {offset} + byte_size {byte_size} runs past the end of "
                    f"segment '{key}' ({st.st_size} bytes)"
                )
        except BaseException:
            os.close(fd)
            raise
        region = Region(name, key, offset, byte_size, fd, owner)  # the region keeps the descriptor
        self._regions[owner, name] = region
        self.bytes += byte_size

    def unregister(self, name: str = "", owner: str | None = None, counted: bool = True) -> None:
        """Unregister ``owner``'s region ``name``, or every region of ``owner`` when it is ""."""
        if not name:
            for k in [k for k in self._regions if k[0] == owner]:
                self.bytes -= self._regions.pop(k).byte_size  # (closed once no request holds it: __del__)
        else:  # (a name not registered: nothing to do, and no error, as on Triton)
            found = self._regions.pop((owner, name), None)
            if found is not None:
                self.bytes -= found.byte_size  # (closed once no request holds it: __del__)
        if counted:
            self.count("unregister", "OK")

    def drop_owners(self, owners: list[str]) -> None:
        """Unregister every region of these API keys (removed from the keys file: no key could
        unregister them, and they held their share of ``shm_max_regions`` until a restart)."""
        for owner in owners:
            mine = [k for k in self._regions if k[0] == owner]
            if mine:
                self.unregister("", owner, counted=False)
                log.info("unregistered %d shared-memory regions of removed API key '%s'", len(mine), clip(owner))

    def status(self, name: str = "", owner: str | None = None) -> list[dict[str, Any]]:
        if name:
            region = self._regions.get((owner, name))
            if region is None:
                raise GatewayError(
                    ErrorCode.NOT_FOUND, f"shared-memory region '{printable(clip(name))}' is not registered"
                )
            regions = [region]
        else:
            regions = [r for (o, _), r in self._regions.items() if o == owner]
        return [{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size} for r in regions]

    def close(self) -> None:
        for region in self._regions.values():
            region.close()
        self._regions.clear()
        self.bytes = 0


class RegionView:
    """The regions one owner may use in its requests: where a tensor lies, reading and writing it."""

    __slots__ = ("_shm", "_owner")

    def __init__(self, shm: SharedMemory, owner: str | None):
        self._shm, self._owner = shm, owner

    def place(self, params: Mapping[str, Any], what: str) -> Place:
        """Where a tensor's parameters put it; the region must be registered and hold it."""
        name = params.get(REGION)
        size = params.get(BYTE_SIZE)
        offset = params.get(OFFSET, 0)
        if type(name) is not str:
            raise invalid(f"{what}: {REGION} must be a region name")
        if type(size) is not int or size < 0:
            raise invalid(f"{what}: {BYTE_SIZE} must be given, a whole number >= 0")
        if type(offset) is not int or offset < 0:
            raise invalid(f"{what}: {OFFSET} must be a whole number >= 0")
        region = self._shm._regions.get((self._owner, name))
        if region is None:
            raise invalid(f"{what}: shared-memory region '{printable(clip(name))}' is not registered")
        if offset + size > region.byte_size:
            raise invalid(
                f"{what}: offset {offset} + byte_size {size} runs past the end of shared-memory region "
                f"'{name}' ({region.byte_size} bytes)"
            )
        return Place(name, offset, size, region)

    def place_input(self, params: Mapping[str, Any], what: str, expected: int | None) -> Place:
        """An input's place, its size checked before anything is read: exactly ``expected`` bytes
        for a fixed-size datatype, at most ``max_tensor_bytes`` for any (BYTES: ``expected`` None)."""
        place = self.place(params, what)
        if expected is not None and place.byte_size != expected:
            raise invalid(
                f"{what}: its shape and datatype take {expected} bytes, not shared_memory_byte_size {place.byte_size}"
            )
        if place.byte_size > self._shm.max_tensor_bytes:
            raise invalid(
                f"{what}: {place.byte_size} bytes in shared memory is more than the {self._shm.max_tensor_bytes} "
                "one input may take (max_request_bytes)"
            )
        return place

    def read(self, place: Place, what: str) -> bytes:
        """A copy of the bytes at ``place`` (the client may change the region afterwards)."""
        return self._region(place, what).read(place.offset, place.byte_size)

    def check(self, place: Place, data: bytes, name: str) -> tuple[Region, bytes]:
        """The region output ``name``'s ``data`` goes to, once it is seen to fit its place."""
        what = f"output '{clip(name)}'"
        region = self._region(place, what)
        if len(data) > place.byte_size:
            raise invalid(
                f"{what} is {len(data)} bytes, more than the {place.byte_size} bytes given for it in shared-memory "
                f"region '{place.region}'"
            )
        region.check_room(place.offset, len(data))
        return region, data

    def _region(self, place: Place, what: str) -> Region:
        """The region the request was read with, even if it was unregistered since (it stays open
        while the request holds it)."""
        region = place.found if place.found is not None else self._shm._regions.get((self._owner, place.region))
        if region is None:
            raise invalid(f"{what}: shared-memory region '{printable(clip(place.region))}' is not registered")
        return region


class OutputWriter:
    """Writes an answer's outputs that have a place into their regions, as the last step of the
    request (``InferRequest.sink``, called by ``ModelVersion.submit``): a write that fails fails
    the request, in its statistics too. ``written``: output name -> (region, bytes written),
    for the codec that answers the request."""

    __slots__ = ("_places", "_view", "written")

    def __init__(self, places: Mapping[str, Place], view: RegionView):
        self._places, self._view = places, view
        self.written: dict[str, tuple[str, int]] = {}

    def __call__(self, resp: InferResponse) -> None:
        places, view = self._places, self._view
        # Every output checked before any is written (its place, the segment's size): a request
        # that fails leaves the regions as they were.
        todo = []
        for t in resp.outputs:
            place = places.get(t.name)
            if place is not None:
                todo.append((t.name, place, view.check(place, to_raw(t.data, DATATYPES[t.datatype]), t.name)))
        for name, place, (region, raw) in todo:
            region.write(place.offset, raw)
            self.written[name] = (place.region, len(raw))


def fixed_bytes(dt: Any, shape: tuple[int, ...]) -> int | None:
    """The bytes a tensor of datatype ``dt`` (core.types.DataType) and ``shape`` takes; None for
    BYTES, whose size its contents decide."""
    if dt.v2 == "BYTES":
        return None
    n = 1
    for d in shape:
        n *= d
    return n * dt.np_dtype.itemsize


def grpc_params(params: Any) -> dict[str, Any]:
    """The shared-memory parameters of a gRPC tensor (its ``parameters`` map) as plain values."""
    out: dict[str, Any] = {}
    for key in (REGION, BYTE_SIZE, OFFSET):
        if key in params:
            p = params[key]
            kind = p.WhichOneof("parameter_choice")
            out[key] = getattr(p, kind) if kind else None
    return out
