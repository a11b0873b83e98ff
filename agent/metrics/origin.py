"""Origin detection fields of a DogStatsD line, as the ``datadog`` client sends them.

``|c:`` and the container id (from ``/proc/self/cgroup``, unless
``DD_ORIGIN_DETECTION_ENABLED`` is false), ``|e:`` and ``DD_EXTERNAL_ENV``.
Read once per process by :class:`agent.metrics.sender.Sender`.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Mapping

_FALSE = frozenset({"no", "false", "0", "n", "off"})


def origin_fields(environ: Mapping[str, str]) -> str:
    """What follows the tags of every line: ``|c:<container id>`` and ``|e:<external env>``."""
    origin = ""
    if environ.get("DD_ORIGIN_DETECTION_ENABLED", "").lower() not in _FALSE:
        container = container_id()
        if container:
            origin += "|c:" + container
    if environ.get("DD_EXTERNAL_ENV"):
        origin += "|e:" + environ["DD_EXTERNAL_ENV"]
    return origin


def container_id() -> str | None:
    """The container id the datadog client sends in ``|c:``, from cgroups (None outside one).

    The same lookup as ``datadog.dogstatsd.container.Cgroup``: in the host cgroup
    namespace, the id in ``/proc/self/cgroup``'s paths (``ci-<id>``); otherwise
    the inode of the process's cgroup directory (``in-<inode>``).
    """
    try:
        namespace = "/proc/self/ns/cgroup"
        if os.path.exists(namespace) and os.stat(namespace).st_ino == 0xEFFFFFFB:
            return _container_from_paths()
        return _container_from_inode()
    except Exception:
        return None


def _container_from_paths() -> str | None:
    import re  # imported before the metrics thread starts: see Pipeline.start

    uuid = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
    pattern = re.compile(rf"(?:.+)?({uuid}|[0-9a-f]{{64}}|[0-9a-f]{{32}}-\d+)(?:\.scope)?$")
    line_pattern = re.compile(r"^(\d+):([^:]*):(.+)$")
    with open("/proc/self/cgroup") as lines:
        for line in lines:
            match = line_pattern.match(line.strip())
            if match:
                found = pattern.match(match.group(3).split("/")[-1])
                if found:
                    return "ci-" + found.group(1)
    return None


def _container_from_inode() -> str | None:
    paths = {}
    with open("/proc/self/cgroup") as lines:
        for line in lines:
            tokens = line.strip().split(":")
            if len(tokens) == 3 and tokens[1] in ("memory", ""):
                paths[tokens[1]] = tokens[2]
    for controller in ("memory", ""):
        if controller in paths:
            node = paths[controller] if paths[controller] != "/" else ""
            # os.path.join as the datadog client calls it (an absolute node replaces the base).
            inode = os.stat(os.path.join("/sys/fs/cgroup", controller, node)).st_ino
            if inode > 2:
                return f"in-{inode}"
    return None
