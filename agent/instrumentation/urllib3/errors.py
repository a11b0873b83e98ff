"""urllib3's flavours of the agent's errors: also the exceptions urllib3's callers catch."""

from __future__ import annotations

from urllib3.exceptions import MaxRetryError
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError

from agent import context
from agent.http import breaker

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from typing import Any

__all__ = ["CircuitOpen", "DeadlineExceeded"]


class DeadlineExceeded(context.DeadlineExceeded, Urllib3TimeoutError):
    """The deadline has passed; the request was not sent.

    An ``agent.DeadlineExceeded`` (hence a built-in ``TimeoutError``) that is
    also a ``urllib3.exceptions.TimeoutError``, so code that handles urllib3's
    timeouts handles it too.
    """


class CircuitOpen(breaker.CircuitOpen, MaxRetryError):
    """The circuit to the peer is open; the request was not sent.

    An ``agent.CircuitOpen`` (a ``ConnectionError``) that is also urllib3's
    ``MaxRetryError``, which a refused connection raises with urllib3's default
    retries.
    """

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.pool = None  # type: ignore[assignment]
        self.url = ""
        self.reason = None

    def __reduce__(self) -> Any:
        return (type(self), (str(self),))
