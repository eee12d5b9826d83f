"""The end of a loop turn (turnend.py), on a real uvloop loop: writers deferred in one turn run
after the callbacks already queued, in order, once; one failing writer leaves the others run."""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop

from failproxy.telemetry import turnend


def test_writers_deferred_in_a_turn_run_after_its_callbacks_once_each() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        turn = turnend.of(loop)
        assert turnend.of(loop) is turn
        seen: list[str] = []
        loop.call_soon(seen.append, "queued before")
        turn.defer(lambda: seen.append("log"))
        turn.defer(lambda: seen.append("metrics"))
        seen.append("this turn")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        turn.defer(lambda: seen.append("next turn"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return seen

    assert uvloop.run(main()) == ["this turn", "queued before", "log", "metrics", "next turn"]


def test_another_loop_gets_its_own_turn_end() -> None:
    async def main() -> turnend.TurnEnd:
        return turnend.of(asyncio.get_running_loop())

    first, second = uvloop.run(main()), uvloop.run(main())
    assert first is not second and first.loop is not second.loop


def test_a_failing_writer_is_reported_and_the_others_still_run() -> None:
    async def main() -> tuple[list[str], list[dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        seen: list[str] = []

        def broken() -> None:
            raise RuntimeError("disk full")

        turn = turnend.of(loop)
        turn.defer(broken)
        turn.defer(lambda: seen.append("metrics"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        turn.defer(lambda: seen.append("again"))  # the turn end still serves
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return seen, reported

    seen, reported = uvloop.run(main())
    assert seen == ["metrics", "again"]
    assert len(reported) == 1 and isinstance(reported[0]["exception"], RuntimeError)


def test_a_held_turn_end_runs_what_its_batch_deferred_at_release_without_a_handle() -> None:
    """hold()/release() (rawtransport.Poller around its batch): writers deferred in the batch
    run at release, before callbacks queued during it; work deferred before the batch keeps
    its Handle, which then runs the batch's writers too, once."""

    async def main() -> tuple[list[str], list[str]]:
        loop = asyncio.get_running_loop()
        turn = turnend.of(loop)
        seen: list[str] = []
        turn.hold()
        turn.defer(lambda: seen.append("log"))
        loop.call_soon(seen.append, "queued in the batch")
        turn.release()
        seen.append("after release")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        before: list[str] = []
        turn.defer(lambda: before.append("metrics, before the batch"))
        turn.hold()
        turn.defer(lambda: before.append("log, in the batch"))
        turn.release()
        before.append("after release")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return seen, before

    seen, before = uvloop.run(main())
    assert seen == ["log", "after release", "queued in the batch"]
    assert before == ["after release", "metrics, before the batch", "log, in the batch"]


def test_a_writer_deferred_by_a_writer_runs_in_the_same_pass_and_turns_stay_apart() -> None:
    """The writers' list is kept from turn to turn with a count (turnend.put): one deferred
    while the others run is run in that pass, after them; the next turn's writers are only its
    own, however many the turn before had."""

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        turn = turnend.of(loop)
        seen: list[str] = []

        def first() -> None:
            seen.append("first")
            turn.defer(lambda: seen.append("deferred by first"))

        turn.defer(first)
        turn.defer(lambda: seen.append("second"))
        turn.defer(lambda: seen.append("third"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        seen.append("| next turn")
        turn.defer(lambda: seen.append("only"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return seen

    assert uvloop.run(main()) == ["first", "second", "third", "deferred by first",
                                  "| next turn", "only"]
