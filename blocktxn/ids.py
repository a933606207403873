"""Identifier and path rules shared by every component.

Identifiers end up in QMP names, file names and etcd keys, so they are
restricted to a safe alphabet; paths are confined to configured directories.
"""

from __future__ import annotations

import re
from pathlib import Path

from blocktxn.errors import InvalidInput

MAX_ID = 64
_SAFE_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_ID - 1}}}")


class IdentifierError(InvalidInput, ValueError):
    """A name or id that is not a safe identifier, or a path outside its root
    (an InvalidInput for the services, a ValueError for configuration parsing)."""


def check_id(value: str, what: str) -> str:
    """Return *value* if it is a safe identifier, else raise IdentifierError."""
    if not _SAFE_ID.fullmatch(value) or ".." in value:
        raise IdentifierError(
            f"{what} {value!r} is not a safe identifier "
            "(letters, digits, '_', '.', '-', at most 64, starting with a letter or digit)"
        )
    return value


def confine(path: str, roots: list[Path], what: str) -> Path:
    """Resolve *path* and check it lies inside one of *roots*.

    Raises:
        IdentifierError: the resolved path escapes every root.
    """
    if not path:
        raise IdentifierError(f"{what} is empty")
    resolved = Path(path).resolve()
    for root in roots:
        root = root.resolve()
        if resolved != root and resolved.is_relative_to(root):
            return resolved
    allowed = ", ".join(str(r) for r in roots) or "(none configured)"
    raise IdentifierError(f"{what} {str(resolved)!r} is outside the allowed directories: {allowed}")
