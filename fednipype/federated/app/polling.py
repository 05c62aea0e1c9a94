"""A server app's grid that waits for replies with short polls.

Flower 1.42's deployment grid (``flwr.superlink.grid.http_grid``) pulls replies every 3 s
(a fixed ``time.sleep(3)`` in ``send_and_receive``). A SecAgg+ round is four exchanges and a
run adds a check round, so a reply that arrives just after a pull waits up to 3 s at every
exchange. :class:`PollingGrid` wraps the grid the server app receives and does the same
push-then-pull loop with a shorter sleep; every other call goes to the wrapped grid. Flower
has no setting for that interval, hence this small class.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run

__all__ = ["POLL_S", "PollingGrid"]

#: Seconds between two pulls of the replies (Flower's own grid: 3).
POLL_S = 0.25


class PollingGrid(Grid):
    """``grid`` with :meth:`send_and_receive` polling every ``poll`` seconds.

    Parameters
    ----------
    grid : Grid
        The grid Flower passes to the server app.
    poll : float
        Seconds between two pulls (> 0).
    """

    def __init__(self, grid: Grid, poll: float = POLL_S) -> None:
        if not poll > 0:
            raise ValueError(f"poll: expected seconds > 0, got {poll!r}")
        self._grid = grid
        self._poll = poll

    def __repr__(self) -> str:
        return f"PollingGrid({self._grid!r}, poll={self._poll:g})"

    # -- delegated ------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Any:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    # -- the short polls ------------------------------------------------------------------

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then pull their replies until all came or ``timeout`` passed.

        The same contract as Flower's ``Grid.send_and_receive``: ``timeout=None`` waits for
        every reply; the replies that came in time are returned.
        """
        pending = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (end is not None and time.monotonic() >= end):
                break
            left = self._poll if end is None else max(end - time.monotonic(), 0.0)
            time.sleep(min(self._poll, left))
        return replies
