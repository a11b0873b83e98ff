"""What travels between services: header names, the deadline's forms, request ids.

Shared by the server side (:mod:`agent.http.server`, reading a request's headers)
and the client side (:mod:`agent.http.client`, adding them to a call's). Every
parser here takes text from the network: garbage gives ``None`` (and a debug log
where the caller asks for one), never an exception.
"""

from __future__ import annotations

import math
import time

from agent import _log
from agent.context import Deadline, earliest

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from typing import Any

    from agent.config import Config
    from agent.http.client import Call

__all__ = [
    "PRIORITY_HEADER",
    "TIMEOUT_HEADER",
    "VIEW_HEADER",
    "attempt_headers",
    "incoming_deadline",
    "parse_deadline",
    "parse_seconds",
    "request_id_for",
    "sane_id",
    "seconds_left",
    "view_header",
]

#: Response header naming the view that served a request (talisker's), the ``view``
#: tag of the caller's metric.
VIEW_HEADER = "X-View-Name"
#: Request header with the seconds left (aio-request's relative form).
TIMEOUT_HEADER = "X-Request-Timeout"
#: Request header with the request's priority: ``high``, ``normal`` or ``low``.
PRIORITY_HEADER = "X-Request-Priority"
_TIMEOUT_LOWER = TIMEOUT_HEADER.lower()
_PRIORITY_LOWER = PRIORITY_HEADER.lower()
#: Longest incoming request id kept.
MAX_ID_LENGTH = 200
_monotonic = time.monotonic


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


def attempt_headers(
    headers: Any, call: Call, cfg: Config, copy_mapping: Any = None, left: float | None = None
) -> Any:
    """A copy of ``headers`` with the request id, deadline and priority headers added.

    The deadline goes as ``cfg.deadline_header`` (absolute) and ``X-Request-Timeout``
    (the seconds left now, for this attempt), or one of them, as
    ``TALISKER_DEADLINE_HEADERS`` says. Headers the caller set are never
    overwritten (matched case-insensitively). The caller's mapping is never
    mutated. ``copy_mapping`` copies a non-dict mapping that must keep its type
    (urllib3's multi-valued ``HTTPHeaderDict``). ``left`` is the time left, when the
    caller has just read it (one clock read fewer).
    """
    id_name = cfg.id_header
    deadline = call.deadline
    priority = call.priority
    if not headers:
        new = {id_name: call.request_id}
        if deadline is not None:
            mode = cfg.deadline_headers
            if mode != "relative":
                new[cfg.deadline_header] = deadline._header or deadline.header()
            if mode != "absolute":
                new[TIMEOUT_HEADER] = call.timeout_sent = seconds_left(deadline, left)
        if priority is not None:
            new[PRIORITY_HEADER] = priority
        return new
    present: Any
    if type(headers) is dict:
        new = headers.copy()
        present = {k.lower() for k in new}
    else:
        store = getattr(headers, "_store", None)
        if type(store) is dict:
            # requests' CaseInsensitiveDict keeps {lower-case name: (name, value)}:
            # reading it directly is several times cheaper than its Python methods.
            present = store
            new = dict(store.values())
        else:
            # Other case-insensitive mappings (urllib3's HTTPHeaderDict): `in` ignores case.
            present = headers
            new = copy_mapping(headers) if copy_mapping is not None else dict(headers.items())
    if id_name.lower() not in present:
        new[id_name] = call.request_id
    if deadline is not None:
        mode = cfg.deadline_headers
        if mode != "relative" and cfg.deadline_header.lower() not in present:
            new[cfg.deadline_header] = deadline._header or deadline.header()
        if mode != "absolute":
            if _TIMEOUT_LOWER not in present:
                new[TIMEOUT_HEADER] = call.timeout_sent = seconds_left(deadline, left)
            elif call.timeout_sent is not None and new.get(TIMEOUT_HEADER) == call.timeout_sent:
                # Ours, from the attempt before (urllib3 retries with the headers it was
                # given): the time left is this attempt's.
                new[TIMEOUT_HEADER] = call.timeout_sent = seconds_left(deadline, left)
    if priority is not None and _PRIORITY_LOWER not in present:
        new[PRIORITY_HEADER] = priority
    return new


def seconds_left(deadline: Deadline, left: float | None = None) -> str:
    """``X-Request-Timeout``'s value: the seconds left, to the millisecond, rounded down
    (the peer's deadline is never later than ours); ``0.000`` once it has passed.

    ``left`` is the time left if the caller has just read it. The text of the
    whole seconds is kept on the deadline (it changes once a second) and the
    milliseconds come from a table: formatting a number costs a few thousand
    instructions, a fifth of what the agent does per request.
    """
    if left is None:
        left = deadline.expires - _monotonic()
    ms = int(left * 1000.0)
    if ms <= 0:
        return "0.000"
    whole = ms // 1000
    cached = deadline._whole
    if cached[0] != whole:
        cached = deadline._whole = (whole, str(whole))
    return cached[1] + MILLIS[ms - whole * 1000]


#: ".000" to ".999": the fraction of X-Request-Timeout, by milliseconds.
MILLIS = tuple(["." + a + b + c for a in "0123456789" for b in "0123456789" for c in "0123456789"])


def view_header(headers: Any) -> str | None:
    """The response's ``X-View-Name``, read from the mapping's own lower-cased store.

    requests' CaseInsensitiveDict keeps ``{name: (Name, value)}`` in ``_store``,
    urllib3's HTTPHeaderDict ``{name: [Name, value, ...]}`` in ``_container``:
    several times cheaper than their Python-level ``get``, which is the fallback.
    Which attribute a type has is found once per type (a failed ``getattr``
    costs more than the read).
    """
    kind = type(headers)
    attr = _STORES.get(kind)
    if attr is None:
        attr = "_store" if type(getattr(headers, "_store", None)) is dict else "_container"
        if len(_STORES) < 64:
            _STORES[kind] = attr
    store = getattr(headers, attr, None)
    if type(store) is dict:
        item = store.get("x-view-name")
        return item[-1] if item else None
    value: str | None = headers.get(VIEW_HEADER)
    return value


#: The attribute holding the lower-cased store of each headers type seen.
_STORES: dict[type, str] = {}
