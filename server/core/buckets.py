"""The bucket table that keeps a route's cohorts sticky. Pure: no I/O and no clock.

**Sticky cohorts.** A request's key (a header, a V2 parameter or the first row of an input) is
hashed with the route's name into one of :data:`BUCKETS` buckets, and each bucket belongs to one
variant; a variant owns as many buckets as its share of the weights (largest remainders). When
the weights change, only buckets of variants that lost weight move, and only to variants that
gained: a user never flips back and forth during a ramp, whatever the number of variants.

That cannot be a function of the weights alone (three variants going A+B, then A+C, then B+C,
then A+B again would have to end where they started while no bucket of an unchanged variant
moves), so the table is kept: :meth:`BucketTable.to_state` and :meth:`BucketTable.from_state`
round-trip it for ``state_dir``. A table built afresh for the same route and weights is the same
on every replica (the layout is seeded by the route's name), so replicas that start from the
config agree, and a restart that reloads the table keeps every cohort where it was.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Mapping
from typing import Any

BUCKETS = 10_000


def bucket_of(route: str, key: bytes) -> int:
    """The bucket of a sticky key: the same on every replica, in every process, after restarts
    (a keyed BLAKE2b digest, not Python's per-process ``hash``)."""
    digest = hashlib.blake2b(key, digest_size=8, key=_hash_key(route.encode())).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def _hash_key(name: bytes) -> bytes:
    """A BLAKE2b key (64 bytes at most) for a route: its name, or a digest of a longer one. Until
    2026-12-06 a longer name was cut at 64 bytes, so routes whose names shared their first 64 bytes
    put every user in the same buckets of both (and their tables in the same order)."""
    return name if len(name) <= 64 else hashlib.blake2b(name, digest_size=64).digest()


def shares(weights: Mapping[str, int], whole: int = BUCKETS) -> dict[str, int]:
    """Buckets per variant (or, with ``whole`` 100, percentages): proportional to the weights,
    rounded by largest remainder (ties go to the earlier variant), adding up to ``whole``."""
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("the weights add up to 0")
    exact = {n: whole * w / total for n, w in weights.items()}
    out = {n: int(x) for n, x in exact.items()}
    order = sorted(weights, key=lambda n: (-(exact[n] - out[n]), list(weights).index(n)))
    for n in order[: whole - sum(out.values())]:
        out[n] += 1
    return out


class BucketTable:
    """Which variant owns each bucket of one route (see the module text)."""

    __slots__ = ("route", "owners", "weights")

    def __init__(self, route: str, owners: list[str], weights: dict[str, int]):
        self.route = route
        self.owners = owners  # bucket -> variant name
        self.weights = weights

    @classmethod
    def fresh(cls, route: str, weights: Mapping[str, int]) -> BucketTable:
        """The table for ``weights`` built from nothing: each variant's share laid over the
        buckets in an order seeded by the route's name (every replica builds the same one)."""
        order = _seeded(route)[0]
        owners = [""] * BUCKETS
        at = 0
        for name, count in shares(weights).items():
            for b in order[at : at + count]:
                owners[b] = name
            at += count
        return cls(route, owners, dict(weights))

    def variant_for(self, key: bytes) -> str:
        return self.owners[bucket_of(self.route, key)]

    def reweigh(self, weights: Mapping[str, int]) -> int:
        """Move to ``weights`` (the same variants, or new ones, or fewer): buckets leave only
        variants whose share shrank and go only to variants whose share grew. Returns how many
        buckets moved."""
        want = shares(weights)
        have: dict[str, list[int]] = {n: [] for n in want}
        freed: list[int] = []
        for b, owner in enumerate(self.owners):
            if owner in have:
                have[owner].append(b)
            else:  # a variant no longer in the route: all its buckets are free
                freed.append(b)
        # Which of a shrinking variant's buckets it gives up: the ones latest in the route's
        # seeded order, so the choice is the same on every replica.
        rank = _seeded(self.route)[1]
        for name, buckets in have.items():
            extra = len(buckets) - want[name]
            if extra > 0:
                buckets.sort(key=rank.__getitem__)
                freed.extend(buckets[-extra:])
                del buckets[-extra:]
        freed.sort(key=rank.__getitem__)
        at = 0
        for name, buckets in have.items():
            short = want[name] - len(buckets)
            for b in freed[at : at + short]:
                self.owners[b] = name
            at += max(0, short)
        self.weights = dict(weights)
        return len(freed)

    def moved_to(self, weights: Mapping[str, int]) -> BucketTable:
        """A copy moved to ``weights`` the way :meth:`reweigh` moves buckets: a route whose
        definition changed (or a ramp done by editing the file) starts from the table it was
        served with, so only the keys of variants that lost weight move."""
        table = BucketTable(self.route, list(self.owners), dict(self.weights))
        table.reweigh(weights)
        return table

    @classmethod
    def kept(cls, doc: Mapping[str, Any] | None) -> BucketTable | None:
        """The table of a state document (whatever definition it was kept for); None when there
        is none or it is unusable."""
        try:
            return cls.from_state(doc["table"]) if doc is not None else None
        except (KeyError, TypeError, ValueError):
            return None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for owner in self.owners:
            out[owner] = out.get(owner, 0) + 1
        return out

    def to_state(self) -> dict[str, Any]:
        """A JSON-able form: the weights, and the owners as runs of (variant index, length)."""
        names = list(self.weights)
        runs: list[list[int]] = []
        for owner in self.owners:
            i = names.index(owner)
            if runs and runs[-1][0] == i:
                runs[-1][1] += 1
            else:
                runs.append([i, 1])
        return {"route": self.route, "weights": dict(self.weights), "variants": names, "runs": runs}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> BucketTable:
        """The table :meth:`to_state` wrote; ValueError if it is not one."""
        try:
            names = [str(n) for n in state["variants"]]
            owners: list[str] = []
            for i, n in state["runs"]:
                i, n = int(i), int(n)
                if not 0 <= i < len(names) or not 0 < n <= BUCKETS - len(owners):
                    raise ValueError(f"a run ({i}, {n}) outside the table")
                owners.extend([names[i]] * n)
            weights = {str(k): int(v) for k, v in state["weights"].items()}
            route = str(state["route"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
            raise ValueError(f"not a bucket table: {e}") from None
        if len(owners) != BUCKETS or set(owners) - set(weights):
            raise ValueError("not a bucket table: wrong size or unknown variants")
        if any(w < 0 or w > 100 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError("not a bucket table: weights must be 0 to 100 and not all 0")
        table = cls(route, owners, weights)
        if table.counts() != {n: c for n, c in shares(weights).items() if c}:
            raise ValueError("not a bucket table: its buckets are not shared as its weights say")
        return table


_SEEDED: dict[str, tuple[array[int], array[int]]] = {}  # (uint16 arrays: 40 KB a route)


def _seeded_order(route: str) -> list[int]:
    """The buckets in an order fixed by the route's name: by a digest of each, so it depends on
    nothing that could change between Python versions (as ``random.shuffle`` might)."""
    name = route.encode()
    # A name of 64 bytes or fewer keeps the key it always had (the prefixed name cut at 64): a new
    # key would move every user of a route whose name is 49 to 64 bytes long. Such names sharing
    # their first 48 bytes share an order, but not their users: bucket_of keys by the whole name.
    prefixed = b"batchgate-route:" + name
    key = prefixed[:64] if len(name) <= 64 else _hash_key(prefixed)
    return sorted(range(BUCKETS), key=lambda b: hashlib.blake2b(b.to_bytes(2, "big"), digest_size=8, key=key).digest())


def _seeded(route: str) -> tuple[array[int], array[int]]:
    """The route's buckets in its seeded order, and each bucket's position in that order
    (cached for up to 1,024 routes: about 20 ms of hashing each)."""
    got = _SEEDED.get(route)
    if got is None:
        order = array("H", _seeded_order(route))
        rank = array("H", bytes(2 * BUCKETS))
        for pos, b in enumerate(order):
            rank[b] = pos
        got = (order, rank)
        if len(_SEEDED) < 1024:
            _SEEDED[route] = got
    return got


def warm(routes: Iterable[str]) -> None:
    """Work the seeded orders of ``routes`` out ahead, on the caller's thread: a routes file that
    brings many new routes costs the event loop ~20 ms each otherwise (150 held it 3 s)."""
    for route in routes:
        _seeded(route)
