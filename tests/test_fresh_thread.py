"""run_in_fresh_thread: results and exceptions come back, and the work really runs on a thread that has ended."""

import threading

import pytest

from assistant.engine.fresh_thread import run_in_fresh_thread, run_in_fresh_thread_sync


def _whoami(x):
    return x * 2, threading.current_thread()


def _boom():
    raise ValueError("no weights")


def test_sync_returns_and_the_thread_is_gone():
    value, thread = run_in_fresh_thread_sync(_whoami, 21)
    assert value == 42 and thread is not threading.current_thread() and not thread.is_alive()
    with pytest.raises(ValueError, match="no weights"):
        run_in_fresh_thread_sync(_boom)


async def test_async_returns_and_raises():
    value, thread = await run_in_fresh_thread(_whoami, 4)
    assert value == 8 and thread is not threading.current_thread()
    thread.join(timeout=60)
    assert not thread.is_alive()
    with pytest.raises(ValueError, match="no weights"):
        await run_in_fresh_thread(_boom)
