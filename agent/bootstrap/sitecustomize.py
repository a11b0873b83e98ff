"""Loaded at start-up by every Python process run under ``talisker-run``.

``talisker-run`` puts this directory first on ``PYTHONPATH``, so Python imports
this module as ``sitecustomize`` in the command it runs and in every Python
child process. It activates the agent, then runs the ``sitecustomize`` the user
had (the next one on ``sys.path``), as ddtrace does, so ours does not shadow it.
"""

import os
import sys


def _activate() -> None:
    try:
        import agent  # noqa: F401 - activates as the environment says
    except Exception as exc:
        sys.stderr.write(
            f"talisker-run: the agent could not be loaded in {sys.executable}: {exc}\n"
        )


def _run_users_sitecustomize() -> None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
        # importlib.machinery's PathFinder, loaded already: importing importlib.machinery
        # costs 0.8M instructions in every process.
        try:
            from _frozen_importlib_external import PathFinder
        except ImportError:  # pragma: no cover - an interpreter without it
            from importlib.machinery import PathFinder

        spec = PathFinder.find_spec("sitecustomize", path)
    except Exception as exc:
        sys.stderr.write(f"talisker-run: looking for your sitecustomize failed: {exc}\n")
        return
    if spec is None or spec.loader is None:
        return
    from importlib.util import module_from_spec

    module = module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)  # its errors are reported by site, as without us


_activate()
_run_users_sitecustomize()
