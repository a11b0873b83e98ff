"""The instrumentations: the one list of what the agent can instrument.

Each instrumentation is a module of this package named after its library
(``agent/instrumentation/<name>.py``) that declares what it wraps (``PATCHES``,
a tuple of :class:`Patch`), the versions of its library it supports
(``SUPPORTED``, checked when it installs and shown by ``talisker-run --check``)
and, if it has any, the ``API_PATCHES`` that stay in when it is turned off.

:data:`agent.config.TARGETS` is the list of instrumentations and the modules
whose import puts each in. It is not read from the modules, so that watching for
the targets costs no import. It is kept in the configuration, which checks
``TALISKER_DISABLED_INSTRUMENTATIONS`` against it and is on the start-up path, so
that start-up does not load this package as well (a module costs about 0.5M
instructions and eight system calls). A test checks it against each module's
patches. Adding a target is adding its module here and one line there.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Wrapper = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]

__all__ = ["Patch", "describe_supported", "supports"]


class Patch:
    """One thing an instrumentation wraps: ``module``, a dotted ``path`` in it, the wrapper.

    The wrapper has wrapt's signature ``(wrapped, instance, args, kwargs)``.

    ``per_instance=True``, for a method of objects that live as long as the
    process (an application, never a per-call object): each instance is given
    its own bound wrapper on its first call, so that later calls skip wrapt's
    binding (about 5k instructions a call). See ``agent.registry``. With
    ``bound_call``, a function ``(method, *params)`` that takes the method bound
    to its instance and then the method's own parameters (named as the
    original's), the instance is given ``functools.partial(bound_call, method)``
    instead of a wrapt bound wrapper: no wrapt call, no ``args`` tuple or
    ``kwargs`` dict per call (about 1.2k instructions less a Flask request). A call that does not
    fit the parameters is refused as the original would refuse it, same message.

    ``direct``, a factory ``direct(original) -> function``, for a method on the
    path of every call (urllib3's ``urlopen``): the class is given the function it
    makes, a plain function that takes the original's parameters by name (and
    calls ``original`` itself), instead of a wrapt wrapper. Looking it up binds
    no wrapper and calling it packs no ``args`` tuple or ``kwargs`` dict: 5.1k
    instructions less a urllib3 request (docs/benchmarks.md). The registry names it as the
    original (same ``TypeError`` messages, ``__wrapped__``, ``inspect.signature``)
    and uses it only if its parameters, their kinds and defaults are the
    original's; otherwise (another version of the library, the method already
    wrapped by another tool) the patch goes in through wrapt with ``wrapper``.

    ``inherited=True``, for a method a class inherits from a base that cannot be
    patched (a C or Cython type): the wrapper is set on the class itself, around
    the method it inherits, and taken off again by ``uninstall()``.

    ``optional=True``, for a module the application may never import (uvloop
    beside asyncio): the instrumentation's debug line does not wait for it.
    """

    __slots__ = (
        "bound_call",
        "direct",
        "inherited",
        "module",
        "optional",
        "path",
        "per_instance",
        "wrapper",
    )

    def __init__(
        self,
        module: str,
        path: str,
        wrapper: Wrapper,
        *,
        per_instance: bool = False,
        bound_call: Callable[..., Any] | None = None,
        direct: Callable[[Any], Any] | None = None,
        inherited: bool = False,
        optional: bool = False,
    ) -> None:
        self.module = module
        self.path = path
        self.wrapper = wrapper
        self.per_instance = per_instance
        self.bound_call = bound_call
        self.direct = direct
        self.inherited = inherited
        self.optional = optional

    def __repr__(self) -> str:
        return f"Patch({self.module}:{self.path})"


def version_tuple(text: str) -> tuple[int, ...]:
    """The leading numbers of a version (``"2.9.13 (dt dec pq3)"`` -> ``(2, 9, 13)``)."""
    numbers = []
    for part in text.strip().split("."):
        digits = ""
        for c in part:
            if not c.isdigit():
                break
            digits += c
        if not digits:
            break
        numbers.append(int(digits))
        if len(digits) < len(part):
            break  # "0rc1": the rest is a pre-release tag
    return tuple(numbers)


def supports(supported: tuple[tuple[int, ...], tuple[int, ...]], version: str) -> bool:
    """Whether ``version`` is in ``supported``, ``(lowest, first not supported)``."""
    found = version_tuple(version)
    lowest, beyond = supported
    return bool(found) and lowest <= found < beyond


def describe_supported(supported: tuple[tuple[int, ...], tuple[int, ...]]) -> str:
    """``">=1.26,<3"``."""
    lowest, beyond = supported
    return f">={'.'.join(map(str, lowest))},<{'.'.join(map(str, beyond))}"
