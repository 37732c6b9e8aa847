"""The ``qera`` command line: one module per command group, shared helpers in :mod:`qera.cli.common`."""

from qera.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
