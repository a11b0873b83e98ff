"""Post-import hooks: run a callback right after a watched module is imported.

This does what ``wrapt.register_post_import_hook`` does, in a few lines and
with no imports: ``import wrapt`` costs ~60 ms here (it pulls in ``asyncio``,
``inspect`` and ``importlib.metadata``), four times the agent's whole start-up
budget, so wrapt is only imported once a target module actually loads.

A finder at the front of ``sys.meta_path`` answers only for watched names: it
asks the finders behind it for the real spec and wraps the spec's loader so
that the hooks run after the module body. The real loader is put back on the
module before its body runs, so the module never sees the wrapper.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

    Hook = Callable[[ModuleType], None]


class PostImportFinder:
    """A meta path finder that calls ``hook(module)`` after a watched module loads."""

    def __init__(self, hook: Hook, names: Sequence[str]) -> None:
        self.hook = hook
        self.names = frozenset(names)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
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

    def __init__(self, loader: Any, hook: Hook) -> None:
        self._loader = loader
        self._hook = hook

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        try:
            self._hook(module)
        except Exception:  # an import must never fail because of the agent
            from agent._log import log_once

            log_once(f"hook:{module.__name__}", "agent: post-import hook failed", exc_info=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
