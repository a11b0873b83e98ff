"""The patch registry: puts instrumentations in when their targets are imported.

An instrumentation module (``agent/instrumentation/<name>.py``) declares what
it wraps as a tuple of :class:`Patch` named ``PATCHES``; the registry owns the
rest: the post-import hooks, the lock, idempotence (our wrappers are instances
of one marker class), failure isolation and :func:`uninstall`, which puts the
exact original objects back.

Nothing here imports a target or wrapt: both happen when a target module
is imported by the application (or was already, when :func:`install` runs).
"""

# On the start-up path: annotations are strings, not `from __future__ import annotations`
# (importing __future__ costs 0.6M instructions).

import sys
from _thread import RLock

from agent import _fork, _log
from agent.config import API_TARGETS, NAMES, TARGETS

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.machinery import ModuleSpec
    from types import FunctionType, MethodType, ModuleType
    from typing import Any

    from agent.config import Config
    from agent.instrumentation import Patch

    Hook = Callable[[ModuleType], None]
else:  # types' own definitions: importing types costs 1.2M instructions at start-up.

    def _function() -> "None":
        pass

    FunctionType = type(_function)
    MethodType = type(_function.__get__(0))  # a function bound to an object

__all__ = ["API_TARGETS", "NAMES", "TARGETS", "install", "installed", "is_ours", "uninstall"]


class _Applied:
    __slots__ = ("attr", "bound_call", "inherited", "instances", "original", "owner", "wrapper")

    def __init__(self, owner: "Any", attr: "str", original: "Any", wrapper: "Any") -> "None":
        self.owner = owner
        self.attr = attr
        self.original = original
        self.wrapper = wrapper
        #: A per-instance patch's bound instances, ``id -> weak reference``, else ``None``.
        self.instances: Any = None
        #: The original is a base class's: uninstall() deletes the wrapper from ``owner``.
        self.inherited = False
        #: A per-instance patch's ``bound_call``, named as the original, else ``None``.
        self.bound_call: Any = None


_lock = RLock()
_finder: "PostImportFinder | None" = None
_config: "Config | None" = None
_enabled: "frozenset[str]" = frozenset()
_api_only: "frozenset[str]" = frozenset()  # off, but their API patches go in
_applied: "dict[tuple[str, str], _Applied]" = {}
_wrapper_class: "type | None" = None
_importing_wrapt = False
_pending: "list[ModuleType]" = []  # imported while wrapt was being imported


def _after_fork_in_child() -> "None":
    # A thread of the parent may have held the lock (or been importing wrapt) at the
    # fork: it does not exist in the child, which would wait for it at its next import.
    global _lock, _importing_wrapt
    _lock = RLock()
    _importing_wrapt = False


_fork.after_in_child(_fork.RESET, _after_fork_in_child)


def installed() -> "bool":
    """Whether the registry is installed (hooks in place, patches as targets load)."""
    return _finder is not None


def install(config: "Config") -> "None":
    """Watch the targets of every enabled instrumentation; patch those already imported.

    Instrumentations that are off get only their ``API_PATCHES`` (see :data:`API_TARGETS`).
    """
    global _finder, _config, _enabled, _api_only
    with _lock:
        if _finder is not None:
            if config == _config:
                return
            uninstall()
        _config = config
        _enabled = frozenset(n for n in TARGETS if config.instrumentation_enabled(n))
        _api_only = frozenset(n for n in API_TARGETS if n not in _enabled)
        watched = [m for n in _enabled for m in TARGETS[n]]
        watched += [m for n in _api_only for m in API_TARGETS[n] if m not in watched]
        # The instrumentations too: one imported by the application before its target
        # (`from agent.instrumentation.urllib3.errors import ...`) applies when it is in.
        watched += [_PREFIX + n for n in (*_enabled, *_api_only)]
        _finder = PostImportFinder(_on_import, watched)
        sys.meta_path.insert(0, _finder)
        for name in watched:
            module = sys.modules.get(name)
            if module is not None and not _initializing(module):
                _on_import(module)


def uninstall() -> "None":
    """Remove the hooks and put every original object back, by identity."""
    global _finder, _config, _enabled, _api_only
    with _lock:
        if _finder is not None:
            try:
                sys.meta_path.remove(_finder)
            except ValueError:
                pass
        _finder, _config, _enabled, _api_only = None, None, frozenset(), frozenset()
        for key, record in list(_applied.items()):
            if record.instances is not None:
                _unbind_instances(record)
            current = vars(record.owner).get(record.attr)
            if current is record.wrapper:
                if record.inherited:
                    delattr(record.owner, record.attr)  # the base's method shows through again
                else:
                    setattr(record.owner, record.attr, record.original)
            else:
                _log.log_once(
                    f"uninstall:{key}",
                    "agent: cannot restore %s:%s, it was replaced after the agent wrapped it",
                    *key,
                )
            del _applied[key]


def _initializing(module: "ModuleType") -> "bool":
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _on_import(module: "ModuleType") -> "None":
    """Post-import hook: apply the patches of every instrumentation watching ``module``.

    Nothing is imported while the registry's lock is held (but under
    :func:`install`, at start-up): an import waits for another thread's import of
    the same module, and that thread's own post-import hook may be waiting for the
    lock, a cycle that Python's detection of circular imports cannot see. So wrapt
    (:func:`_load_wrapt`) and the instrumentations (:func:`_load_outside_the_lock`)
    are imported first, and the patches applied under the lock.
    """
    if _wrapper_class is None and not _load_wrapt(module):
        return  # left to the thread importing wrapt
    imported = module.__name__
    if not imported.startswith(_PREFIX):
        _load_outside_the_lock(imported)
    with _lock:
        if imported.startswith(_PREFIX):  # an instrumentation, its body run
            name = imported[len(_PREFIX) :]
            if name in _enabled:
                _apply_instrumentation(name, "PATCHES", module)
            elif name in _api_only:
                _apply_instrumentation(name, "API_PATCHES", module)
            return
        for name in _enabled:
            if imported in TARGETS[name]:
                _apply_instrumentation(name)
        for name in _api_only:
            if imported in API_TARGETS[name]:
                _apply_instrumentation(name, "API_PATCHES")


def _load_wrapt(module: "ModuleType") -> "bool":
    """Import wrapt outside the lock and make the wrapper class; ``False`` if ``module``
    was left for the thread importing wrapt to patch (``_pending``).

    wrapt imports asyncio, a target: its hook runs while wrapt is half imported, in
    this thread, or in a thread importing asyncio itself while this one waits for
    it. Either way the module waits in ``_pending`` (no lock held while waiting for
    an import, and none taken for long), and this thread patches it once wrapt is in.
    """
    global _importing_wrapt
    with _lock:
        if _wrapper_class is not None:
            return True
        if _importing_wrapt:
            _pending.append(module)
            return False
        _importing_wrapt = True
    try:
        import wrapt  # noqa: F401
    except Exception:  # pragma: no cover - wrapper_class() tries again, and _apply logs it
        pass
    with _lock:
        _importing_wrapt = False
        pending = _pending[:]
        del _pending[:]
        try:
            wrapper_class()
        except Exception:  # each patch that needs it logs the failure (_apply)
            pass
    for waiting in pending:
        _on_import(waiting)
    return True


_PREFIX = "agent.instrumentation."


def _load_outside_the_lock(imported: "str") -> "None":
    """Import the instrumentations that ``imported`` puts in, before the lock is taken.

    An import waits for another thread's import of the same module, and that
    thread's own post-import hook (its instrumentation's body imports the target)
    waits for the lock: a thread importing ``agent.instrumentation.urllib3`` itself
    while another imports urllib3 would deadlock if the second held the lock while
    it imported. Python resolves a cycle of module locks alone, not one through a
    lock of ours. What fails here is left to :func:`_apply_instrumentation` (under
    the lock), which logs it.
    """
    for names, targets in ((_enabled, TARGETS), (_api_only, API_TARGETS)):
        for name in names:
            if imported in targets[name] and _PREFIX + name not in sys.modules:
                try:
                    __import__(_PREFIX + name)
                except Exception:  # pragma: no cover - logged under the lock, where it is retried
                    pass


def _apply_instrumentation(
    name: "str", declared: "str" = "PATCHES", instrumentation: "ModuleType | None" = None
) -> "None":
    """Apply an instrumentation's patches whose target modules are in.

    ``instrumentation`` is its module, when its own post-import hook calls. One whose
    body is still running (it imported its target) is left to that hook.
    """
    try:
        if instrumentation is None:
            loading = sys.modules.get(_PREFIX + name)
            if loading is not None and _initializing(loading):
                return  # its post-import hook applies it, once its body has run
            instrumentation = __import__(_PREFIX + name, fromlist=[declared])
        patches: tuple[Patch, ...] = getattr(instrumentation, declared)
    except Exception:
        _log.log_once(
            f"load:{name}", "agent: the %s instrumentation failed to load", name, exc_info=True
        )
        return
    if declared == "PATCHES" and not _supported(name, instrumentation):
        return
    applied_now = False
    for patch in patches:
        module = sys.modules.get(patch.module)
        if module is None or (patch.module, patch.path) in _applied:
            continue
        try:
            applied_now |= _apply(module, patch)
        except Exception:
            _log.log_once(
                f"patch:{patch.module}:{patch.path}",
                "agent: could not patch %s:%s; the rest of the agent still works",
                patch.module,
                patch.path,
                exc_info=True,
            )
    # One line per instrumentation, once the last of its target modules is in (and
    # one more when an optional module comes in later).
    if (
        applied_now
        and _log.debug_enabled()
        and all(p.module in sys.modules for p in patches if not p.optional)
    ):
        targets = [f"{p.module}:{p.path}" for p in patches if (p.module, p.path) in _applied]
        what = "instrumented" if declared == "PATCHES" else "kept the API keywords only of"
        try:
            version = instrumentation.installed_version()
        except Exception:
            version = target_version(name)
        _log.debug("agent: %s %s %s (%s)", what, name, version, ", ".join(targets))


def _supported(name: "str", instrumentation: "Any") -> "bool":
    """Whether the imported library is a version its instrumentation supports; else warn once.

    A version outside the range is left uninstrumented: the agent cannot know that
    what it wraps still behaves as it expects, and must never break the application.
    """
    from agent.instrumentation import describe_supported, supports

    try:
        version = instrumentation.installed_version()
        if supports(instrumentation.SUPPORTED, version):
            return True
        shown = describe_supported(instrumentation.SUPPORTED)
    except Exception:
        version, shown = "of unknown version", "?"
    _log.log_once(
        f"unsupported:{name}",
        "agent: %s %s is not a version the agent supports (%s); it is left uninstrumented",
        name,
        version,
        shown,
    )
    return False


def _apply(module: "ModuleType", patch: "Patch") -> "bool":
    """Wrap what ``patch`` names; ``False`` when it is already ours."""
    owner: Any = module
    *parents, attr = patch.path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    inherited = patch.inherited and attr not in vars(owner)
    original = _inherited(owner, attr) if inherited else vars(owner)[attr]
    marker = wrapper_class()
    if isinstance(original, marker) or _is_direct(original):
        return False  # already ours (e.g. state lost by a reload of this module)
    key = (patch.module, patch.path)
    direct = None
    if patch.direct is not None and not inherited and isinstance(original, FunctionType):
        try:
            direct = _direct_function(patch.direct, original)
        except Exception:  # the patch still goes in, through wrapt
            direct = None
        if direct is None:
            _log.debug(
                "agent: %s:%s does not take the parameters its direct patch does; "
                "it is wrapped through wrapt",
                *key,
            )
    if direct is not None:
        record = _Applied(owner, attr, original, direct)
    elif patch.per_instance and isinstance(original, FunctionType):
        record = _Applied(owner, attr, original, None)
        record.wrapper = marker(original, _binding_wrapper(key, record, patch.wrapper, marker))
        if patch.bound_call is not None:
            try:
                record.bound_call = _named_like(patch.bound_call, original)
            except Exception:  # the patch still goes in, bound through wrapt
                record.bound_call = None
            if record.bound_call is None:
                _log.debug(
                    "agent: %s:%s does not take the parameters its bound call does; "
                    "instances are bound through wrapt",
                    *key,
                )
    else:
        record = _Applied(owner, attr, original, marker(original, patch.wrapper))
    record.inherited = inherited
    setattr(owner, attr, record.wrapper)
    _applied[key] = record
    return True


def _inherited(owner: "Any", attr: "str") -> "Any":
    """What class ``owner`` inherits as ``attr``: the object in its base's ``__dict__``."""
    for base in owner.__mro__[1:]:
        found = vars(base).get(attr)
        if found is not None:
            return found
    raise AttributeError(f"{owner.__name__} has no {attr} to wrap")


def _binding_wrapper(
    key: "tuple[str, str]", record: "_Applied", wrapper: "Any", marker: "type"
) -> "Any":
    """The class's wrapper of a per-instance patch: binds, then calls ``wrapper``.

    wrapt makes a bound wrapper each time ``instance.method`` is looked up
    (about 5k instructions). An instance's first call stores one in its own
    ``__dict__``, as ``app.wsgi_app = Middleware(app.wsgi_app)`` does, and later
    calls find it there and go straight to ``wrapper``. Not for an instance whose
    class, or a subclass of the patched one, resolves the name to something else
    (a subclass's override calling ``super()``: its method must stay in the
    way), nor one that has the name set already (a middleware put in by hand),
    nor one without a ``__dict__`` or weak references: those go through here on
    every call. :func:`uninstall` takes the bound wrappers out again.
    """
    attr, original = record.attr, record.original
    resolves: dict[type, bool] = {}  # class -> whether its attr is this patch's wrapper

    def binding(wrapped: "Any", instance: "Any", args: "Any", kwargs: "Any") -> "Any":
        # A class known not to take one (an override) pays one lookup per call, no frame.
        if instance is not None and resolves.get(type(instance)) is not False:
            try:
                _bind(instance)
            except Exception:
                _log.log_once(f"bind:{attr}", "agent: binding %s failed", attr, exc_info=True)
        return wrapper(wrapped, instance, args, kwargs)

    def _bind(instance: "Any") -> "None":
        own = getattr(instance, "__dict__", None)
        if type(own) is not dict or attr in own:
            return
        cls = type(instance)
        ours = resolves.get(cls)
        if ours is None:
            found = next((vars(k)[attr] for k in cls.__mro__ if attr in vars(k)), None)
            ours = found is record.wrapper and cls.__weakrefoffset__ != 0
            if len(resolves) < 64:
                resolves[cls] = ours
        if not ours:
            return
        from weakref import ref

        method = MethodType(original, instance)
        call = record.bound_call
        bound = marker(method, wrapper) if call is None else _bound_call_type()(call, method)
        with _lock:
            if _applied.get(key) is not record:
                return  # uninstalled meanwhile
            if own.setdefault(attr, bound) is not bound:
                return  # set meanwhile
            instances = record.instances
            if instances is None:
                instances = record.instances = {}
            # By id, with weak references: the bound wrapper holds its instance, and
            # an instance need not be hashable. An entry goes when its instance does.
            instances[id(instance)] = ref(instance, _forget(instances, id(instance)))

    return binding


#: The class of an instance's own binding with a ``bound_call`` (:func:`_bound_call_type`).
_BoundCall: "Any" = None


def _bound_call_type() -> "Any":
    """The class of an instance's own binding of a per-instance patch with a ``bound_call``.

    Made on first use: ``_functools`` and the class cost 0.9M instructions, and
    ``import agent`` does not bind anything (``functools`` itself imports
    ``collections``: 10.9M).
    """
    global _BoundCall
    if _BoundCall is not None:
        return _BoundCall
    if TYPE_CHECKING:
        from functools import partial
    else:  # functools' own partial: functools imports collections
        from _functools import partial

    class BoundCall(partial):  # type: ignore[type-arg]
        # ``bound_call(method, *args)``, called by partial's C code. It shows the bound
        # method it stands for: its attributes (``__self__``, ``__func__``, ``__name__``),
        # its ``__wrapped__`` (so inspect.signature gives the method's) and its repr.
        __slots__ = ()

        def __getattr__(self, name: "str") -> "Any":
            return getattr(self.args[0], name)

        @property
        def __wrapped__(self) -> "Any":
            return self.args[0]

        @property
        def __doc__(self) -> "str | None":  # type: ignore[override]
            return self.args[0].__doc__  # type: ignore[no-any-return]

        def __repr__(self) -> "str":
            return repr(self.args[0])

    BoundCall.__name__ = BoundCall.__qualname__ = "_BoundCall"
    _BoundCall = BoundCall
    return BoundCall


#: Code flags that change how a call's arguments are taken: ``*args``, ``**kwargs``.
_CO_VARARGS, _CO_VARKEYWORDS = 0x04, 0x08


def _named_like(call: "Any", original: "Any") -> "Any":
    """A copy of ``call`` named as ``original``, if after the first parameter both take
    the same ones (so that a call that does not fit is refused with the original's
    message); else ``None``."""
    code, theirs = getattr(call, "__code__", None), original.__code__
    if code is None:
        return None
    named = code.co_argcount + code.co_kwonlyargcount
    if not (
        code.co_argcount == theirs.co_argcount
        and code.co_posonlyargcount == theirs.co_posonlyargcount
        and code.co_kwonlyargcount == theirs.co_kwonlyargcount
        # the positional names, then the keyword-only ones (the counts are equal)
        and code.co_varnames[1:named] == theirs.co_varnames[1:named]
        and not (code.co_flags ^ theirs.co_flags) & (_CO_VARARGS | _CO_VARKEYWORDS)
        and call.__defaults__ == original.__defaults__
        and call.__kwdefaults__ == original.__kwdefaults__
    ):
        return None
    globals_, closure = call.__globals__, call.__closure__
    copy = FunctionType(code, globals_, original.__name__, call.__defaults__, closure)
    copy.__qualname__ = original.__qualname__
    copy.__kwdefaults__ = call.__kwdefaults__
    return copy


#: The attribute that marks a direct patch's function (``Patch.direct``) as the agent's.
_DIRECT_MARK = "__talisker_agent_direct__"


def _direct_function(factory: "Any", original: "Any") -> "Any":
    """The function ``factory`` makes for ``original``, named as it, or ``None`` if
    it does not take the same parameters with the same defaults."""
    made = factory(original)
    if made is None:
        return None
    direct = _named_like(made, original)
    if direct is None:
        return None
    direct.__module__ = original.__module__
    direct.__doc__ = original.__doc__
    direct.__annotations__ = dict(getattr(original, "__annotations__", None) or {})
    direct.__wrapped__ = original
    setattr(direct, _DIRECT_MARK, True)
    return direct


def _is_direct(obj: "Any") -> "bool":
    return type(obj) is FunctionType and _DIRECT_MARK in obj.__dict__


def is_ours(obj: "Any") -> "bool":
    """Whether ``obj`` (a class's or module's attribute) is a patch of the agent's."""
    return _is_direct(obj) or (_wrapper_class is not None and isinstance(obj, _wrapper_class))


def _forget(instances: "dict[int, Any]", ident: "int") -> "Any":
    def forget(dead: "Any") -> "None":
        if instances.get(ident) is dead:
            del instances[ident]

    return forget


def _unbind_instances(record: "_Applied") -> "None":
    """Take a per-instance patch's bound wrappers out of the instances that still hold them."""
    marker = wrapper_class()
    for alive in list(record.instances.values()):
        instance = alive()
        own = getattr(instance, "__dict__", None)
        if type(own) is not dict:
            continue
        bound = own.get(record.attr)
        ours = isinstance(bound, marker) or (_BoundCall is not None and type(bound) is _BoundCall)
        if ours and getattr(bound, "__self__", None) is instance:
            del own[record.attr]
    record.instances = None


def target_version(name: "str") -> "str":
    """The installed version of an instrumentation's target library, from its metadata."""
    from importlib import metadata

    # psycopg2 is often installed as psycopg2-binary; Python 3.10 may match names by case.
    for dist in (name, f"{name}-binary", name.capitalize()):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        except Exception:  # a broken installation must not break the import it hooks
            break
    return "version unknown"


def wrapper_class() -> "type":
    """The marker subclass of ``wrapt.FunctionWrapper`` that all agent patches use."""
    global _wrapper_class, _importing_wrapt
    if _wrapper_class is None:
        _importing_wrapt = True
        try:
            import wrapt
        finally:
            _importing_wrapt = False

        base: Any = wrapt.FunctionWrapper  # generic in wrapt 2's stubs, not in 1.x

        class AgentWrapper(base):  # type: ignore[misc]
            """A wrapt function wrapper put in by talisker-agent."""

        # wrapt binds a subclass's method with the class this names, and looks it up
        # on every attribute access (``pool.urlopen``); without it the lookup fails
        # and formats an AttributeError each time, about 4k instructions.
        bound = getattr(wrapt, "BoundFunctionWrapper", None)
        if bound is not None:
            AgentWrapper.__bound_function_wrapper__ = bound

        _wrapper_class = AgentWrapper
        pending = _pending[:]
        del _pending[:]
        for module in pending:
            _on_import(module)
    return _wrapper_class


# -- the post-import hook ------------------------------------------------------------------
#
# Post-import hooks: run a callback right after a watched module is imported.
#
# This does what ``wrapt.register_post_import_hook`` does, in a few lines and
# with no imports: ``import wrapt`` costs ~60 ms here (it pulls in ``asyncio``,
# ``inspect`` and ``importlib.metadata``), four times the agent's whole start-up
# budget, so wrapt is only imported once a target module actually loads.
#
# A finder at the front of ``sys.meta_path`` answers only for watched names: it
# asks the finders behind it for the real spec and wraps the spec's loader so
# that the hooks run after the module body. The real loader is put back on the
# module before its body runs, so the module never sees the wrapper.
#
# (Its own module until stop 23: one module fewer to find and read at start-up.)


class PostImportFinder:
    """A meta path finder that calls ``hook(module)`` after a watched module loads."""

    def __init__(self, hook: "Hook", names: "Sequence[str]") -> "None":
        self.hook = hook
        self.names = frozenset(names)

    def find_spec(
        self,
        fullname: "str",
        path: "Sequence[str] | None" = None,
        target: "ModuleType | None" = None,
    ) -> "ModuleSpec | None":
        if fullname not in self.names:
            return None  # every import in the process passes here: keep it to one lookup
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, PostImportFinder):
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec: ModuleSpec | None = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            spec.loader = _HookingLoader(loader, self.hook)  # type: ignore[assignment]
        return spec


class _HookingLoader:
    """Delegates to the real loader; runs the hook after ``exec_module``."""

    def __init__(self, loader: "Any", hook: "Hook") -> "None":
        self._loader = loader
        self._hook = hook

    def create_module(self, spec: "ModuleSpec") -> "ModuleType | None":
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: "ModuleType") -> "None":
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        try:
            self._hook(module)
        except Exception:  # an import must never fail because of the agent
            from agent._log import log_once

            log_once(f"hook:{module.__name__}", "agent: post-import hook failed", exc_info=True)

    def __getattr__(self, name: "str") -> "Any":
        return getattr(self._loader, name)
