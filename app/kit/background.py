"""A step a worker repeats in the background, from its start to its stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class Periodic:
    """Runs `step` every `interval` seconds in an asyncio task named `name`. A step that
    raises does not end the loop: `on_error` hears of it (to log, or to count an outage)
    and the next step runs at the next interval."""

    def __init__(
        self,
        name: str,
        interval: float,
        step: Callable[[], Awaitable[object]],
        on_error: Callable[[Exception], None],
    ) -> None:
        self.name = name
        self.interval = interval
        self._step = step
        self._on_error = on_error
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Cancel the loop and wait for it (a step under way is cancelled too)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._step()
            except Exception as error:
                self._on_error(error)
