"""Exception types. ``QeraError`` marks a user error: the CLI prints it as one line, exit 2."""

from __future__ import annotations


class QeraError(ValueError):
    """Bad input from the user (value out of range, unreadable file, unknown name, ...)."""


def where(name: str | None) -> str:
    """Suffix naming a layer in an error message, or empty when no name is known."""
    return f" (layer {name})" if name else ""
