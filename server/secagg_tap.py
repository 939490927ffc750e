"""The grid tap: how the hardened SecAgg+ stages add fields to Flower's messages and vet the replies."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp.grid import Grid


class _GridTap:
    """A Grid whose `send_and_receive` lets a stage edit what goes out and vet what comes back.

    Flower's stages build and read their messages inside one method each; tapping the grid adds our fields to
    those messages without copying Flower's stage code.
    """

    def __init__(
        self,
        grid: Grid,
        *,
        outgoing: Callable[[Message], None] | None = None,
        incoming: Callable[[Message], bool] | None = None,
    ) -> None:
        self._grid = grid
        self._outgoing = outgoing
        self._incoming = incoming

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if self._outgoing is not None:
            for message in messages:
                self._outgoing(message)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if self._incoming is None:
            return replies
        return [reply for reply in replies if self._incoming(reply)]

