"""Hedged attempts, an explicit API for idempotent calls (aio-request's parallel strategy).

``await agent.hedged(lambda: client.get(url), attempts=3, delay=0.05)`` makes the
call, and if no acceptable answer has come ``delay`` seconds later makes it again
beside the first, up to ``attempts`` in flight: the first acceptable answer wins
and the others are cancelled (an in-flight coroutine is cancelled, which closes
its connection; an answer that arrives anyway is closed, not read). Every
attempt runs under the one deadline with the same request id.
``agent.hedged_sync(lambda: session.get(url), ...)`` does the same with threads
for synchronous code; a thread cannot be interrupted, so a losing attempt's
answer is closed when it arrives.

An answer is acceptable when the call did not raise and its status (``status``
or ``status_code``) is below 500 and not 429; ``acceptable=`` replaces the rule.
When no attempt is acceptable, the last one's answer is returned or its error
raised. Each attempt sent is a request of its own in ``requests.count`` (the
peer served each); ``requests.hedges`` counts the extra attempts, so the
application's calls are ``requests.count`` minus ``requests.hedges``.
"""

from __future__ import annotations

from agent import context, metrics

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import Any

__all__ = ["hedged", "hedged_sync"]


def _acceptable(result: Any) -> bool:
    status = getattr(result, "status_code", None)
    if status is None:
        status = getattr(result, "status", None)
    return not (isinstance(status, int) and (status >= 500 or status == 429))


def _check(attempts: int, delay: float) -> None:
    if attempts < 1:
        raise ValueError("attempts must be 1 or more")
    if not delay >= 0:
        raise ValueError("delay must be 0 or more seconds")


def _scope() -> context.Scope:
    """The scope every attempt runs in: the caller's, with its request id fixed."""
    scope = context.current()
    if scope.request_id is None:
        scope = scope.replace(request_id=context.new_request_id())
    return scope


def _count_hedges(n: int) -> None:
    if n > 0:
        metrics.count("requests.hedges", n)


async def _close_async(result: Any) -> None:
    try:
        close = getattr(result, "aclose", None)
        if close is not None:
            await close()
            return
        close = getattr(result, "close", None) or getattr(result, "release", None)
        if close is not None:
            outcome = close()
            if hasattr(outcome, "__await__"):
                await outcome
    except Exception:
        pass


def _close(result: Any) -> None:
    try:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    except Exception:
        pass


async def hedged(
    make: Callable[[], Awaitable[Any]],
    attempts: int = 2,
    delay: float = 0.05,
    acceptable: Callable[[Any], bool] | None = None,
) -> Any:
    """The first acceptable answer of up to ``attempts`` calls of ``make()``, ``delay`` apart."""
    import asyncio

    _check(attempts, delay)
    accept = acceptable or _acceptable
    scope = _scope()

    async def attempt() -> Any:
        token = context._scope.set(scope)
        try:
            return await make()
        finally:
            context._scope.reset(token)

    pending: set[asyncio.Task[Any]] = set()
    started = 0
    last: asyncio.Task[Any] | None = None
    try:
        while True:
            if started < attempts:
                pending.add(asyncio.ensure_future(attempt()))
                started += 1
            timeout = delay if started < attempts else None
            done, pending = await asyncio.wait(
                pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                last = task
                if task.exception() is None and accept(task.result()):
                    return task.result()
                if task.exception() is None:
                    await _close_async(task.result())
            if not pending and started >= attempts:
                assert last is not None
                return last.result()  # raises the last attempt's error
    finally:
        _count_hedges(started - 1)
        for task in pending:
            task.cancel()
        for task in pending:
            try:
                result = await task
            except BaseException:
                continue
            await _close_async(result)


def hedged_sync(
    make: Callable[[], Any],
    attempts: int = 2,
    delay: float = 0.05,
    acceptable: Callable[[Any], bool] | None = None,
) -> Any:
    """:func:`hedged` for synchronous calls, each attempt in a thread of its own."""
    import threading
    from concurrent.futures import FIRST_COMPLETED, Future, wait

    _check(attempts, delay)
    accept = acceptable or _acceptable
    scope = _scope()
    lock = threading.Lock()
    decided = False

    def run(future: Future[Any]) -> None:
        token = context._scope.set(scope)
        try:
            result = make()
        except BaseException as exc:
            future.set_exception(exc)
            return
        finally:
            context._scope.reset(token)
        with lock:
            if not decided:
                future.set_result(result)
                return
        _close(result)  # a losing attempt that ended after the winner: its answer is not read
        future.set_result(None)

    pending: set[Future[Any]] = set()
    started = 0
    last: Future[Any] | None = None
    try:
        while True:
            if started < attempts:
                future: Future[Any] = Future()
                future.set_running_or_notify_cancel()
                threading.Thread(target=run, args=(future,), daemon=True).start()
                pending.add(future)
                started += 1
            timeout = delay if started < attempts else None
            done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            for finished in done:
                last = finished
                if finished.exception() is None and accept(finished.result()):
                    return finished.result()
                if finished.exception() is None:
                    _close(finished.result())
            if not pending and started >= attempts:
                assert last is not None
                return last.result()
    finally:
        with lock:
            decided = True
            finished_meanwhile = [f for f in pending if f.done() and f.exception() is None]
        _count_hedges(started - 1)
        for future in finished_meanwhile:  # those that end later are closed in run()
            _close(future.result())
