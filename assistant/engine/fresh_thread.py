"""Run model work that must happen outside the engine's worker (loading weights, benchmark baselines) on a new
thread that ends when the work is done.

Why: PyTorch's CPU kernels use OpenMP, which keeps a thread team per OS thread that ever ran a parallel region,
for as long as that thread lives. A live team on another thread (the main thread, or an `asyncio.to_thread` pool
thread, which stays alive) slowed the engine worker's batched decode by about 40% on this 2-core machine (Qwen2.5
0.5B, batch 8: 130-150 ms per step against 90-97 ms when every torch call ran on one thread, or on threads that had
ended). A thread that exits takes its team with it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_fresh_thread_sync(fn: Callable[..., T], *args: object) -> T:
    """Blocking: run `fn(*args)` on a new thread, wait for it to end, return its result or raise its exception."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # handed to the caller, re-raised there
            box["error"] = e

    t = threading.Thread(target=target, name=f"fresh-{getattr(fn, '__name__', 'work')}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


async def run_in_fresh_thread(fn: Callable[..., T], *args: object) -> T:
    """Awaitable: run `fn(*args)` on a new daemon thread that ends afterwards (the event loop stays free)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result: object, error: BaseException | None) -> None:
        if fut.done():  # the awaiting task was cancelled (e.g. shutdown while loading)
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop closed while we worked
            pass

    threading.Thread(target=target, name=f"fresh-{getattr(fn, '__name__', 'work')}", daemon=True).start()
    return await fut
