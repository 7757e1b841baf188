"""``_core/loops.py``: the holder a checkout notes is the calling thread outside a loop and the
running task inside one, whatever loop ran in the thread before, in every thread, and in a
forked child; the loop it keeps on Python 3.11 is never believed once it has stopped."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

import telemetry
from telemetry._core import loops

pytestmark = pytest.mark.matrix("python")  # 3.11 keeps the loop; 3.12 and later ask asyncio


def test_outside_a_loop_the_holder_is_the_thread():
    assert loops.holder() == (threading.get_ident(), None)
    assert loops.running_loop() is None


def test_inside_a_task_the_holder_is_that_task_on_each_new_loop_of_the_thread():
    async def me() -> tuple[object, object]:
        return loops.holder(), asyncio.current_task()

    for _ in range(3):  # asyncio.run makes a new loop each time: the one kept before has stopped
        (thread, task), current = asyncio.run(me())
        assert thread is None and task is current is not None
        assert loops.holder() == (threading.get_ident(), None)  # and after it, the thread again


def test_a_stopped_loop_kept_from_before_is_not_believed():
    async def inside() -> object:
        return loops.running_loop()

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(inside()) is loop
        assert loops.running_loop() is None  # the kept loop has stopped: asyncio is asked again
        assert loops.holder() == (threading.get_ident(), None)
    finally:
        loop.close()


def test_two_threads_each_running_a_loop_get_their_own_tasks():
    seen: dict[str, list[bool]] = {"a": [], "b": []}
    both = threading.Barrier(2)

    async def work(name: str) -> None:
        both.wait(timeout=30)  # both loops run at once
        for _ in range(200):
            thread, task = loops.holder()
            seen[name].append(thread is None and task is asyncio.current_task())
            await asyncio.sleep(0)

    threads = [threading.Thread(target=asyncio.run, args=(work(n),)) for n in seen]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(len(v) == 200 and all(v) for v in seen.values()), seen


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_child_forked_inside_a_running_loop_does_not_believe_the_parents_loop():
    telemetry.instrument(service="api", tracing=False)  # the runtime's at-fork hook forgets the loop

    async def fork_here() -> int:
        loops.holder()  # the parent's loop is now the one kept
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: not in the parent's running loop, whatever was kept
            try:
                os.write(write, b"1" if loops.holder() == (threading.get_ident(), None) else b"0")
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as fh:
            answer = fh.read()
        os.waitpid(pid, 0)
        return int(answer or b"0")

    assert asyncio.run(fork_here()) == 1
