"""What travels between services: header names, the deadline's forms, request ids.

Shared by the server side (:mod:`agent.http.server`, reading a request's headers)
and the client side (:mod:`agent.http.client`, adding them to a call's). Every
parser here takes text from the network: garbage gives ``None`` (and a debug log
where the caller asks for one), never an exception.
"""

from __future__ import annotations

import math

from agent import _log
from agent.context import Deadline, earliest

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from typing import Any

    from agent.config import Config
    from agent.http.client import Call

__all__ = [
    "TIMEOUT_HEADER",
    "VIEW_HEADER",
    "attempt_headers",
    "incoming_deadline",
    "parse_deadline",
    "parse_seconds",
    "request_id_for",
    "sane_id",
    "view_header",
]

#: Response header naming the view that served a request (talisker's), the ``view``
#: tag of the caller's metric.
VIEW_HEADER = "X-View-Name"
#: Request header with the seconds left (aio-request's relative form).
TIMEOUT_HEADER = "X-Request-Timeout"
#: Longest incoming request id kept.
MAX_ID_LENGTH = 200


# -- request ids ------------------------------------------------------------------


def sane_id(value: str) -> bool:
    """Printable ASCII without spaces or control characters, at most 200 characters."""
    return 0 < len(value) <= MAX_ID_LENGTH and all("!" <= c <= "~" for c in value)


def request_id_for(incoming: str | None, new_id: str, compose: bool) -> str:
    """The id of a request that came with ``incoming``: it, ``<new>-<incoming>``, or new."""
    if incoming is None:
        return new_id
    if sane_id(incoming):
        return f"{new_id}-{incoming}" if compose else incoming
    _log.debug("agent: ignoring an unusable incoming request id")
    return new_id


# -- deadlines --------------------------------------------------------------------


def incoming_deadline(cfg: Config, absolute: str | None, relative: str | None) -> Deadline | None:
    """The deadline of an incoming request: the earliest of the configured timeout,
    the absolute header's time and the relative header's seconds; garbage is ignored."""
    deadline = None
    if cfg.request_timeout is not None:
        deadline = Deadline.after(cfg.request_timeout)
    if absolute is not None:
        wall = parse_deadline(absolute)
        if wall is None:
            _log.debug("agent: ignoring an unparsable %s header", cfg.deadline_header)
        else:
            found = Deadline.at_wall_time(wall)
            if found is None:
                _log.debug("agent: ignoring a %s beyond a day away", cfg.deadline_header)
            deadline = earliest(deadline, found)
    if relative is not None:
        seconds = parse_seconds(relative)
        if seconds is None:
            _log.debug("agent: ignoring an unparsable %s header", TIMEOUT_HEADER)
        else:
            found = Deadline.after(seconds)
            if found is None:
                _log.debug("agent: ignoring an %s beyond a day", TIMEOUT_HEADER)
            deadline = earliest(deadline, found)
    return deadline


def parse_seconds(value: str) -> float | None:
    """A positive, finite number of seconds (``4.99873``), else None."""
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 < seconds < math.inf else None


_DEADLINE_RE: Any = None


def parse_deadline(value: str) -> float | None:
    """An ISO 8601 time with a zone (``Z`` or ``±HH:MM``) in seconds since the epoch.

    Fractional seconds are optional. Anything else, including a time without a
    zone, gives ``None``.
    """
    global _DEADLINE_RE
    if _DEADLINE_RE is None:
        import re

        _DEADLINE_RE = re.compile(
            r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d{1,9})?"
            r"(?:([Zz])|([+-])(\d\d):?(\d\d))"
        )
    match = _DEADLINE_RE.fullmatch(value.strip())
    if match is None:
        return None
    import calendar

    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    try:
        epoch: float = calendar.timegm(
            (int(year), int(month), int(day), int(hour), int(minute), int(second), 0, 0, 0)
        )
        if not (1 <= int(month) <= 12 and 1 <= int(day) <= 31 and int(hour) < 24):
            return None
    except (ValueError, OverflowError):
        return None
    if fraction:
        epoch += float(fraction)
    if not zulu:
        offset = int(off_h) * 3600 + int(off_m) * 60
        epoch += -offset if sign == "+" else offset
    return float(epoch)


# -- outgoing headers ---------------------------------------------------------------


def attempt_headers(headers: Any, call: Call, cfg: Config, copy_mapping: Any = None) -> Any:
    """A copy of ``headers`` with the request id and deadline headers added.

    Headers the caller set are never overwritten (matched case-insensitively).
    The caller's mapping is never mutated. ``copy_mapping`` copies a non-dict
    mapping that must keep its type (urllib3's multi-valued ``HTTPHeaderDict``).
    """
    id_name = cfg.id_header
    deadline = call.deadline
    if not headers:
        new = {id_name: call.request_id}
        if deadline is not None:
            new[cfg.deadline_header] = deadline.header()
        return new
    if type(headers) is dict:
        new = headers.copy()
        present = {k.lower() for k in new}
        has_id = id_name.lower() in present
        has_deadline = cfg.deadline_header.lower() in present
    else:
        store = getattr(headers, "_store", None)
        if type(store) is dict:
            # requests' CaseInsensitiveDict keeps {lower-case name: (name, value)}:
            # reading it directly is several times cheaper than its Python methods.
            has_id = id_name.lower() in store
            has_deadline = cfg.deadline_header.lower() in store
            new = dict(store.values())
        else:
            # Other case-insensitive mappings (urllib3's HTTPHeaderDict).
            has_id = id_name in headers
            has_deadline = cfg.deadline_header in headers
            new = copy_mapping(headers) if copy_mapping is not None else dict(headers.items())
    if not has_id:
        new[id_name] = call.request_id
    if deadline is not None and not has_deadline:
        new[cfg.deadline_header] = deadline.header()
    return new


def view_header(headers: Any) -> str | None:
    """The response's ``X-View-Name``, read from the mapping's own lower-cased store.

    requests' CaseInsensitiveDict keeps ``{name: (Name, value)}`` in ``_store``,
    urllib3's HTTPHeaderDict ``{name: [Name, value, ...]}`` in ``_container``:
    several times cheaper than their Python-level ``get``, which is the fallback.
    """
    store = getattr(headers, "_store", None)
    if type(store) is not dict:
        store = getattr(headers, "_container", None)
    if type(store) is dict:
        item = store.get("x-view-name")
        return item[-1] if item else None
    value: str | None = headers.get(VIEW_HEADER)
    return value
