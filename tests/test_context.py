"""Request context: ids, deadlines on the monotonic clock, per-call names."""

from __future__ import annotations

import asyncio
import contextvars
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest

import agent
from agent import context
from agent.context import Deadline, DeadlineExceeded


def test_deadline_exceeded_is_a_timeout_error():
    assert issubclass(DeadlineExceeded, TimeoutError)


def test_no_deadline_outside_any_scope():
    assert agent.deadline_timeout() is None
    assert context.current().deadline is None
    assert context.current().request_id is None


def test_deadline_timeout_counts_down_and_then_raises():
    with agent.deadline(0.2):
        left = agent.deadline_timeout()
        assert left is not None and left <= 0.2
        time.sleep(0.25)
        with pytest.raises(DeadlineExceeded):
            agent.deadline_timeout()
    assert agent.deadline_timeout() is None


def test_nested_deadlines_keep_the_earliest():
    with agent.deadline(30.0):
        with agent.deadline(100.0):
            assert agent.deadline_timeout() <= 30.0
        with agent.deadline(10.0):
            assert agent.deadline_timeout() <= 10.0
        assert 20.0 < agent.deadline_timeout() <= 30.0


def test_deadline_none_changes_nothing():
    with agent.deadline(None):
        assert agent.deadline_timeout() is None


def test_deadline_works_as_a_decorator_and_reenters():
    @agent.deadline(30)
    def left(depth: int) -> float:
        if depth:
            return left(depth - 1)
        value = agent.deadline_timeout()
        assert value is not None
        return value

    assert 20 < left(3) <= 30
    assert agent.deadline_timeout() is None


def test_deadline_header_is_iso_utc_with_milliseconds_and_never_later():
    d = Deadline.after(5.0)
    header = d.header()
    parsed = datetime.strptime(header, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert len(header) == len("2026-11-21T05:12:33.123Z")
    expected = time.time() + d.remaining()
    assert expected - 1.0 <= parsed.timestamp() <= expected + 0.05  # truncated, never later


def test_deadline_from_wall_time_round_trips():
    wall = time.time() + 30.0
    d = Deadline.at_wall_time(wall)
    assert d is not None and 20.0 < d.remaining() <= 30.0


def test_request_context_sets_a_new_or_given_id():
    with agent.request_context() as scope:
        assert scope.request_id and len(scope.request_id) == 32
        assert context.current().request_id == scope.request_id
    with agent.request_context(request_id="abc-123", deadline=30.0):
        assert context.current().request_id == "abc-123"
        assert 20.0 < agent.deadline_timeout() <= 30.0
    assert context.current().request_id is None


def test_request_context_keeps_an_earlier_enclosing_deadline():
    with agent.deadline(10), agent.request_context(deadline=30):
        assert agent.deadline_timeout() <= 10


def test_metric_names_nest_and_keep_enclosing_names():
    with agent.metric_names(view="outer", peer="users-api"):
        with agent.metric_names(view="inner"):
            scope = context.current()
            assert (scope.view, scope.peer) == ("inner", "users-api")
        assert context.current().view == "outer"
    assert context.current().view is None


def test_context_is_per_thread_unless_carried():
    with agent.request_context(request_id="carried", deadline=5), ThreadPoolExecutor(1) as pool:
        plain = pool.submit(lambda: context.current().request_id).result()
        ctx = contextvars.copy_context()
        carried = pool.submit(ctx.run, lambda: context.current().request_id).result()
    assert plain is None
    assert carried == "carried"


def test_context_follows_asyncio_tasks():
    async def child() -> str | None:
        await asyncio.sleep(0)
        return context.current().request_id

    async def main() -> str | None:
        with agent.request_context(request_id="task-id"):
            return await asyncio.create_task(child())

    assert asyncio.run(main()) == "task-id"


def test_request_ids_are_unique():
    ids = {context.new_request_id() for _ in range(10000)}
    assert len(ids) == 10000


@pytest.mark.parametrize(
    "manager",
    [
        lambda: agent.deadline(30),
        lambda: agent.request_context(request_id="r", deadline=30),
        lambda: agent.metric_names(view="v", peer="p"),
        lambda: agent.deadline(None),
    ],
)
def test_every_context_manager_is_reusable_and_reentrant(manager):
    cm = manager()
    before = context.current()
    with cm:
        inner_scope = context.current()
        with cm, cm:
            assert context.current() is not before
        assert context.current() is inner_scope
    assert context.current() is before
    with cm:  # and again, after it was left
        pass
    assert context.current() is before


def test_one_context_manager_shared_by_threads_restores_each_threads_scope():
    import threading

    shared = agent.deadline(30)
    barrier = threading.Barrier(4)
    problems = []

    def worker(i: int) -> None:
        try:
            with agent.request_context(request_id=f"t{i}"):
                for _ in range(200):
                    with shared:
                        barrier.wait(5) if _ == 0 else None
                        assert context.current().request_id == f"t{i}"
                assert context.current().deadline is None
        except Exception as exc:  # pragma: no cover - reported below
            problems.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert problems == []


def _scopes_made_by_the_agent() -> list[context.Scope]:
    from agent import config
    from agent.http import server

    cfg = config.load({})
    made = [context.EMPTY, server.scope_for(cfg, None, None, None)]
    made.append(server.scope_for(cfg, "incoming", None, "2.5", "high"))
    with agent.request_context(deadline=5), agent.deadline(1), agent.suppress():
        made.append(context.current())
    return made


def test_hot_path_objects_shadow_no_class_attribute():
    """On Python 3.12 and 3.13 an instance attribute that shadows a class attribute (or a
    non-data descriptor) is read and written by the generic lookup, never by a specialised
    instruction: 250-350 instructions more each time, and a request reads the
    configuration, its scope and its call a dozen times (docs/benchmarks.md, stop 27)."""
    from agent import config
    from agent.http import client

    call = client.Call("id", Deadline.after(5), "GET")
    call.attempts, call.timeout_sent, call.deadline_bound = 2, "4.999", True
    objects = [config.load({}), call, *_scopes_made_by_the_agent()]
    for obj in objects:
        shadowed = [
            name for name in vars(obj) if any(name in vars(cls) for cls in type(obj).__mro__)
        ]
        assert shadowed == [], f"{type(obj).__name__} shadows class attributes"
    assert {s.attr for s in config.SETTINGS} <= set(vars(config.load({})))
