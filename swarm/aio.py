"""A background event loop for synchronous callers.

Models run synchronously (`model.generate(...)` calls the stubs from the caller's thread), while
hivemind's P2P is asyncio. The client keeps one loop (uvloop where available) in a daemon thread
and submits coroutines to it; the caller blocks on the result with a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Awaitable, TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """`await awaitable`, raising TimeoutError after `seconds`: `asyncio.wait_for` without its task.

    Why: before Python 3.12, `wait_for` wraps the awaitable in a new task, which costs a task and two
    turns of the event loop even when the result is already there (a step's bytes already buffered, a
    drain with nothing to wait for). A peer paid that three times per step, on the path every token
    takes. `asyncio.timeout` only arms a timer around the same await.
    """
    async with asyncio.timeout(seconds):
        return await awaitable


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # uvloop does not exist on Windows
        return asyncio.new_event_loop()


class BackgroundLoop:
    """An event loop running in a daemon thread; `run` executes a coroutine there and waits for it."""

    def __init__(self, name: str = "swarm-loop"):
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """Run `coro` on the loop; raise `TimeoutError` after `timeout` seconds (the coroutine is cancelled)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("BackgroundLoop.run called from its own loop thread; await the coroutine instead")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer within {timeout} s") from None

    def submit(self, coro: Awaitable) -> None:
        """Schedule `coro` on the loop without waiting (safe from any thread, the loop's own included)."""
        if self.loop.is_closed() or not self.loop.is_running():
            coro.close()
            return
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieve, so nothing is logged

    def close(self) -> None:
        """Cancel what still runs on the loop, then stop it."""
        if not self.loop.is_running():
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(5)
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
