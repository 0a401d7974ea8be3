"""Approximate prefix index: TTL expiry on an injected clock, LRU bound, overlap."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvrelay.kv.approx_index import ApproxPrefixIndex


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_insert_then_overlap_then_expire() -> None:
    clock = FakeClock()
    idx = ApproxPrefixIndex(clock, ttl_s=10.0)
    idx.insert("a", [1, 2, 3])
    idx.insert("b", [1, 2])
    assert idx.overlap([1, 2, 3, 4]) == {"a": 3, "b": 2}
    clock.now = 5.0
    idx.insert("b", [1, 2])  # refreshed: b's blocks now live until 15
    clock.now = 10.0
    assert idx.overlap([1, 2, 3]) == {"b": 2}
    clock.now = 15.0
    assert idx.overlap([1, 2, 3]) == {}
    assert len(idx) == 0
    idx.check_integrity()


def test_size_bound_drops_least_recent() -> None:
    idx = ApproxPrefixIndex(FakeClock(), ttl_s=100.0, max_entries=4)
    idx.insert("a", [1, 2, 3])
    idx.insert("b", [1, 2])  # 5 entries: (1, a) goes
    assert idx.overlap([1, 2, 3]) == {"b": 2}
    assert len(idx) == 4
    idx.check_integrity()


def test_remove_worker() -> None:
    idx = ApproxPrefixIndex(FakeClock())
    idx.insert("a", [1, 2])
    idx.insert("b", [1])
    idx.remove_worker("a")
    assert idx.overlap([1, 2]) == {"b": 1}
    assert idx.workers == ["b"]
    idx.check_integrity()


def reference_overlap(
    entries: dict[tuple[int, str], float], now: float, query: list[int]
) -> dict[str, int]:
    held: dict[str, set[int]] = {}
    for (h, w), deadline in entries.items():
        if deadline > now:
            held.setdefault(w, set()).add(h)
    out: dict[str, int] = {}
    for w, blocks in held.items():
        n = 0
        while n < len(query) and query[n] in blocks:
            n += 1
        if n:
            out[w] = n
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["insert", "insert", "tick", "remove"]),
            st.sampled_from(["a", "b", "c"]),
            st.lists(st.integers(1, 8), max_size=5),
        ),
        max_size=40,
    ),
    st.lists(st.integers(1, 8), max_size=6),
)
def test_random_operations_match_a_reference(
    ops: list[tuple[str, str, list[int]]], query: list[int]
) -> None:
    clock = FakeClock()
    idx = ApproxPrefixIndex(clock, ttl_s=3.0, max_entries=10)
    ref: dict[tuple[int, str], float] = {}  # insertion-ordered: pair -> deadline
    for kind, worker, hashes in ops:
        if kind == "insert":
            idx.insert(worker, hashes)
            ref = {k: d for k, d in ref.items() if d > clock.now}
            for h in hashes:
                ref.pop((h, worker), None)
                ref[(h, worker)] = clock.now + 3.0
            ref = dict(list(ref.items())[-10:])
        elif kind == "tick":
            clock.now += 1.0
        else:
            idx.remove_worker(worker)
            ref = {k: d for k, d in ref.items() if k[1] != worker}
        idx.check_integrity()
        assert idx.overlap(query) == reference_overlap(ref, clock.now, query)
