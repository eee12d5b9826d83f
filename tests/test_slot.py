"""The slot writer's two twins (telemetry/slot.py): the Cython one (C stores, at once) and the
pure one (lists, written at the end of a loop turn) leave the same counts in the same cells for
the same changes, and the build that runs uses the one it says.

The compiled run checks both against each other; the pure-Python run (`make test` runs this
file on both builds) checks the pure twin against counts worked out here.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import failproxy
from failproxy.reasons import REASONS
from failproxy.telemetry import slot
from failproxy.telemetry.metrics import DURATION_BUCKETS, Totals, WorkerMetrics

try:
    from failproxy.telemetry._slot import SlotWriter as SlotWriterC  # type: ignore[import-not-found]
except ImportError:
    SlotWriterC = None

PURE = failproxy.BUILD.startswith("pure")
needs_c = pytest.mark.skipif(SlotWriterC is None or PURE,
                             reason="the Cython twin is not built, or this run is pure Python")
SERVERS = 3

# One change through WorkerMetrics' hot-path methods: (method, arguments).
CHANGE = st.one_of(
    st.tuples(st.just("request"),
              st.tuples(st.integers(-5, 1200),
                        st.floats(0, 20, allow_nan=False) | st.sampled_from(DURATION_BUCKETS))),
    st.tuples(st.just("upstream_request"), st.tuples(st.integers(0, SERVERS - 1))),
    st.tuples(st.just("failover"), st.tuples(st.integers(0, SERVERS - 1),
                                             st.integers(0, SERVERS - 1),
                                             st.integers(0, len(REASONS) - 1))),
    st.tuples(st.just("connect_duration"), st.tuples(st.integers(0, SERVERS - 1),
                                                     st.floats(0, 2, allow_nan=False))),
    st.tuples(st.sampled_from(["connection_opened", "connection_closed", "exhausted"]),
              st.just(())),
    st.tuples(st.sampled_from(["temp_file_bytes", "body_buffering", "held_requests"]),
              st.tuples(st.integers(-(1 << 40), 1 << 40))),
)


def apply(m: WorkerMetrics, changes: list[tuple[str, tuple[Any, ...]]]) -> None:
    for name, args in changes:
        getattr(m, name)(*args)


def test_the_build_uses_the_twin_it_says() -> None:
    if PURE:
        assert slot.BUILT == "pure" and slot.SlotWriter is slot.SlotWriterPy
    else:
        assert slot.BUILT == "cython" and slot.SlotWriter is SlotWriterC


TWINS = [pytest.param(slot.SlotWriterPy, id="pure"),
         pytest.param(SlotWriterC, id="cython", marks=needs_c)]


@pytest.mark.parametrize("writer", TWINS)
def test_each_twin_counts_what_spec_7_names(writer: Any) -> None:
    m = WorkerMetrics(SERVERS, writer)
    apply(m, [("request", (200, 0.003)), ("request", (200, 0.003)), ("request", (999, 7.0)),
              ("request", (503, float("nan"))), ("upstream_request", (2,)),
              ("failover", (0, 2, 1)), ("connect_duration", (1, 0.0003)),
              ("connection_opened", ()), ("connection_opened", ()), ("connection_closed", ())])
    totals = Totals()
    totals.add(m, ["a", "b", "c"], gauges=True)
    assert totals.status[200] == 2 and totals.status[0] == 1 and totals.status[503] == 1
    assert math.isnan(totals.duration_sum), "a NaN duration is summed as it came"
    # 0.003 in (0.0025, 0.005]: bucket 2; 7.0 in (5, 10]: 12; NaN past every bound: 13
    assert totals.duration[2] == 2 and totals.duration[12] == 1 and totals.duration[13] == 1
    assert totals.server_requests["c"] == 1
    assert totals.active == 1
    m.close()


@needs_c
@settings(max_examples=300, deadline=None)
@given(st.lists(CHANGE, max_size=60))
def test_both_twins_leave_the_same_slot(changes: list[tuple[str, tuple[Any, ...]]]) -> None:
    pure = WorkerMetrics(SERVERS, slot.SlotWriterPy)
    compiled = WorkerMetrics(SERVERS, SlotWriterC)
    apply(pure, changes)
    apply(compiled, changes)
    assert pure.snapshot() == compiled.snapshot()
    pure.close()
    compiled.close()


@needs_c
def test_both_twins_agree_once_the_turn_has_ended() -> None:
    """Attached to a loop, the pure twin writes at the end of the turn, the Cython one at once:
    the same counts once the turn is over (the float sum may differ in its last bits: the pure
    twin adds a turn's durations up before adding them to the total)."""

    async def main() -> tuple[tuple[list[int], list[float]], ...]:
        loop = asyncio.get_running_loop()
        out = []
        for writer in (slot.SlotWriterPy, SlotWriterC):
            m = WorkerMetrics(SERVERS, writer)
            m.attach(loop)
            for i in range(50):
                m.request(200 + i % 3, 0.001 * i)
                m.connect_duration(i % SERVERS, 0.0001 * i)
            m.connection_opened()
            written_at_once = m.snapshot()[0][200] == 17
            assert written_at_once == (writer is SlotWriterC)
            await asyncio.sleep(0)
            out.append(m.snapshot())
            m.close()
        return tuple(out)

    (pure_q, pure_d), (c_q, c_d) = asyncio.run(main())
    assert pure_q == c_q
    assert pure_d == pytest.approx(c_d, rel=1e-12)


@needs_c
def test_the_cython_twin_refuses_a_cell_outside_the_slot_and_a_closed_slot() -> None:
    m = WorkerMetrics(SERVERS, SlotWriterC)
    with pytest.raises(IndexError):
        m.upstream_request(10**6)
    m.close()
    with pytest.raises(IndexError):
        m.request(200, 0.001)
