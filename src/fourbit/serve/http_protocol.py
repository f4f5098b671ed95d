"""uvicorn's h11 protocol with one bound more: a deadline for each request's head.

uvicorn closes a connection that stays idle between two requests (``timeout_keep_alive``), but
not one that connects and then sends nothing, or sends its headers a byte at a time: such a
client holds its connection, and a place under ``limit_concurrency``, for as long as it likes.
Here the request line and headers must be complete within ``timeout_keep_alive`` seconds of the
connection opening or of the previous response; otherwise the connection is closed as an idle
one is. Given to uvicorn through its ``http`` setting, which takes a protocol class.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadDeadlineProtocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._cycle_when_armed and self._head_timer is not None:  # a new request's head
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
        self._cycle_when_armed = self.cycle
        self._head_timer = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
