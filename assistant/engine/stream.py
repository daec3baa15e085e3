"""The bounded hand-off of one response's events from the worker thread to the event loop (`ResponseStream`).

The worker never blocks on a slow consumer: it appends under a lock and wakes the loop with
`loop.call_soon_threadsafe`. Overflow policy: at most `max_items` events are buffered; when full, a new
`TextDelta` is merged into the newest buffered delta (text is concatenated, nothing is lost, the number of buffered
events stays bounded). `ResponseDone` is always appended and is the last event; iteration then stops.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable

from assistant.engine.api import ResponseDone, TextDelta, ToolCallStarted

Event = TextDelta | ToolCallStarted | ResponseDone


class ResponseStream:
    """Async iterator of `TextDelta` ... then exactly one `ResponseDone` for one response."""

    def __init__(
        self,
        response_id: str,
        session_id: str,
        loop: asyncio.AbstractEventLoop,
        max_items: int,
        cancel_fn: Callable[[str, str], bool],
    ):
        self.response_id = response_id
        self.session_id = session_id
        self._loop = loop
        self._max_items = max(1, max_items)
        self._cancel_fn = cancel_fn
        self._lock = threading.Lock()
        self._items: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        self._finished = False  # ResponseDone was pushed (worker side)
        self._delivered_done = False  # ResponseDone was handed to the consumer
        self.done: ResponseDone | None = None

    # ---- worker thread side -------------------------------------------------------------------------------------
    def push(self, event: Event) -> None:
        with self._lock:
            if self._finished:
                return
            if isinstance(event, ResponseDone):
                self._finished = True
                self.done = event
                self._items.append(event)
            elif (
                isinstance(event, TextDelta)
                and len(self._items) >= self._max_items
                and isinstance(self._items[-1], TextDelta)
            ):
                self._items[-1] = TextDelta(self._items[-1].text + event.text)
            else:
                self._items.append(event)
        try:
            self._loop.call_soon_threadsafe(self._wakeup.set)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    @property
    def finished(self) -> bool:
        return self._finished

    # ---- event loop side ----------------------------------------------------------------------------------------
    def cancel(self, reason: str = "client_cancelled") -> bool:
        """Ask the engine to stop this response; it ends with `ResponseDone(status="cancelled")`."""
        return self._cancel_fn(self.response_id, reason)

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> Event:
        while True:
            with self._lock:
                if self._items:
                    event = self._items.popleft()
                    if isinstance(event, ResponseDone):
                        self._delivered_done = True
                    return event
                if self._delivered_done:
                    raise StopAsyncIteration
            self._wakeup.clear()
            with self._lock:
                if self._items or self._delivered_done:
                    continue
            await self._wakeup.wait()

    async def wait_done(self) -> ResponseDone:
        """Drain the stream and return its `ResponseDone` (for callers that want only the result)."""
        async for _ in self:
            pass
        assert self.done is not None
        return self.done
