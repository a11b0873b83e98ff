"""Tag rules: what a metric name and its tags become on the wire, and the cardinality cap.

Applied in the metrics thread (:mod:`agent.metrics.worker`), once per distinct raw
context of a flush, and by the sender to the constant tags.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from typing import Any

    from agent.config import Config

    Tags = tuple[tuple[str, Any], ...]

#: Tag values longer than this are cut (Datadog's own limit is 200).
MAX_TAG_LENGTH = 200
#: What a tag value becomes once its key has reached the cardinality cap.
OVERFLOW_VALUE = "other"
#: Raw (name, tags) -> sanitised context entries kept; cleared when full.
CONTEXT_CACHE_LIMIT = 20_000
#: Tag keys Datadog gives a meaning of its own: renamed ``tag_<key>``.
RESERVED_TAG_KEYS = frozenset({"host", "device", "source", "service"})


class TagRules:
    """Sanitising and the per-metric cardinality cap, applied in the background thread.

    - Names keep letters, digits, ``_`` and ``.``; anything else becomes ``_``.
    - Tag keys keep letters, digits, ``_ - . /``; values also keep ``:``. Anything
      else (``|``, ``,``, ``#``, newlines, ``@``, spaces, brackets...) becomes
      ``_``, so no value can break a datagram. Values are cut at 200 characters.
    - A reserved key (``host``, ``device``, ``source``, ``service``) is renamed
      ``tag_<key>``: Datadog gives those keys a meaning of their own.
    - Each tag key of each metric keeps at most ``max_values`` distinct values;
      later ones are sent as ``other``.
    """

    def __init__(self, max_values: int) -> None:
        self.max_values = max_values
        self._contexts: dict[tuple[str, Tags], tuple[str, tuple[str, ...]]] = {}
        self._seen: dict[tuple[str, str], set[str]] = {}

    def context(self, name: str, tags: Tags) -> tuple[str, tuple[str, ...]]:
        """The sanitised, capped ``(name, ("key:value", ...))`` of a raw metric."""
        key = (name, tags)
        ctx = self._contexts.get(key)
        if ctx is None:
            if len(self._contexts) >= CONTEXT_CACHE_LIMIT:
                self._contexts.clear()  # admitted values stay admitted: results do not change
            clean = sanitize_name(name)
            ctx = self._contexts[key] = (clean, tuple(self._tag(clean, k, v) for k, v in tags))
        return ctx

    def _tag(self, metric: str, key: str, value: Any) -> str:
        key = sanitize_tag_key(key)
        value = sanitize_tag_value(value)
        seen = self._seen.get((metric, key))
        if seen is None:
            seen = self._seen[(metric, key)] = set()
        if value not in seen:
            if len(seen) >= self.max_values:
                value = OVERFLOW_VALUE
            else:
                seen.add(value)
        return f"{key}:{value}"


_NAME_RE: Any = None
_KEY_RE: Any = None
_VALUE_RE: Any = None


def compile_patterns() -> None:
    global _NAME_RE, _KEY_RE, _VALUE_RE
    import re

    # The same character classes as the datadog client's tag normalisation, so it
    # changes nothing after us and the cap counts the values actually sent.
    _NAME_RE = re.compile(r"[^A-Za-z0-9_.]")
    _KEY_RE = re.compile(r"[^\w\-./]")
    _VALUE_RE = re.compile(r"[^\w\-./:]")


def sanitize_name(name: str) -> str:
    """A metric name DogStatsD accepts: starts with a letter; ``[A-Za-z0-9_.]``."""
    if _NAME_RE is None:
        compile_patterns()
    clean: str = _NAME_RE.sub("_", str(name))[:MAX_TAG_LENGTH].strip(".")
    if not clean or not clean[0].isalpha():
        clean = "m_" + clean
    return clean


def sanitize_tag_key(key: str) -> str:
    """A tag key: ``[\\w\\-./]``, starting with a letter, never a reserved key."""
    if _KEY_RE is None:
        compile_patterns()
    clean: str = _KEY_RE.sub("_", str(key))[:MAX_TAG_LENGTH]
    if not clean or not clean[0].isalpha():
        clean = "t_" + clean
    if clean in RESERVED_TAG_KEYS:
        clean = "tag_" + clean
    return clean


def sanitize_tag_value(value: object) -> str:
    """A tag value: ``[\\w\\-./:]``, at most 200 characters, never empty."""
    if _VALUE_RE is None:
        compile_patterns()
    clean: str = _VALUE_RE.sub("_", str(value).strip())[:MAX_TAG_LENGTH]
    return clean or "none"


def constant_tags(config: Config) -> list[str]:
    """``service``/``env``/``version`` from ``DD_SERVICE`` etc., then ``DD_TAGS`` and
    ``DATADOG_TAGS``, bare or not; each tag once."""
    tags: list[str] = []
    for key, value in (
        ("service", config.service),
        ("env", config.env),
        ("version", config.version),
    ):
        if value:
            tags.append(f"{key}:{sanitize_tag_value(value)}")
    for item in (*config.tags, *config.datadog_tags):
        key, sep, value = item.partition(":")
        # A bare tag (DD_TAGS="canary") stays bare, as the Datadog agent sends it.
        tag = (
            f"{sanitize_tag_key(key)}:{sanitize_tag_value(value)}" if sep else sanitize_tag_key(key)
        )
        if tag not in tags:
            tags.append(tag)
    return tags


def coerce_tags(tags: Any) -> Tags:
    """Any tags as hashable ``(key, value)`` pairs: a mapping, ``key:value`` strings, None.

    A value that cannot be hashed (a list) becomes its text, which is what
    sanitising makes of every value anyway.
    """
    if tags is None:
        return ()
    if hasattr(tags, "items"):
        tags = list(tags.items())
    elif isinstance(tags, str):
        tags = [tags]
    pairs = []
    for tag in tags:
        if isinstance(tag, (tuple, list)) and len(tag) == 2:
            key, value = tag
        else:
            key, _, value = str(tag).partition(":")
        try:
            hash(value)
        except TypeError:
            value = str(value)
        pairs.append((str(key), value))
    return tuple(pairs)
