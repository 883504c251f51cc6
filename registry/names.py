"""Names used across the registry: adapter families, aliases, tag keys, store keys, and `family@selector` refs.

    validate_name("family", "support-assistant")   # returns it, or raises ValueError saying which rule failed
    parse_ref("support-assistant@champion")        # ("support-assistant", "champion")
    parse_ref("support-assistant@3")               # ("support-assistant", "3")
"""

from __future__ import annotations

import re

NAME_RULE = "1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, without '..'"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

KEY_RULE = "'/'-separated segments of a-z 0-9 . _ -, each starting with a letter or digit, without '..', <= 512 chars"
_KEY_SEGMENT_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def validate_name(kind: str, value: str) -> str:
    """Return value if it is a valid family/alias/key name, else raise ValueError naming it and the rule."""
    if not isinstance(value, str) or not _NAME_RE.match(value) or ".." in value:
        raise ValueError(f"invalid {kind} name {value!r}: use {NAME_RULE}")
    return value


def validate_key(key: str) -> str:
    """Return key if it is a valid artifact-store key (no path traversal), else raise ValueError."""
    if (
        not isinstance(key, str)
        or not key
        or len(key) > 512
        or ".." in key
        or not all(_KEY_SEGMENT_RE.match(seg) for seg in key.split("/"))
    ):
        raise ValueError(f"invalid artifact key {key!r}: use {KEY_RULE}, e.g. 'init-cache/3f1c0a'")
    return key


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split "family@alias" / "family@3" / "family" into (family, selector or None)."""
    if not isinstance(ref, str) or ref.count("@") > 1:
        raise ValueError(f"invalid adapter ref {ref!r}: use 'family', 'family@alias' or 'family@<version number>'")
    family, sep, selector = ref.partition("@")
    validate_name("family", family)
    if not sep:
        return family, None
    if selector.isdigit():
        if int(selector) < 1:
            raise ValueError(f"invalid adapter ref {ref!r}: version numbers start at 1")
        return family, str(int(selector))
    validate_name("alias", selector)
    return family, selector
