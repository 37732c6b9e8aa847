"""Command-line interface: ``qera quantize | eval | calibrate | compare | finetune | output-error |
export | info | analyze``.

Every subcommand is a thin wrapper over the Python API; each command group lives in its own module
(:mod:`qera.cli.quantize`, :mod:`qera.cli.evaluate`, :mod:`qera.cli.finetune`, :mod:`qera.cli.analyze`)
and shares the helpers of :mod:`qera.cli.common`. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from qera._version import __version__
from qera.cli import analyze, evaluate, finetune, quantize
from qera.cli.common import check_numbers
from qera.util.errors import QeraError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qera", description="Low-bit weights + low-rank error reconstruction for LLMs.")
    ap.add_argument("--version", action="version", version=f"qera {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    for group in (quantize, evaluate, finetune, analyze):
        group.add_parsers(sub)
    return ap


class _PlanOrWarning(logging.Filter):
    """Always show the run's plan (``qera.plan``: pipeline, activation cache); otherwise the chosen level."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "qera.plan" or record.levelno >= self.level


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The CLI owns the "qera" logger for the length of the command (and puts it back after).
    logger = logging.getLogger("qera")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_PlanOrWarning(logging.INFO if args.verbose else logging.WARNING))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    made_group = False
    try:
        check_numbers(args)
        if args.command == "quantize":
            from qera.quantize.distributed import init_from_env

            made_group = init_from_env()  # under torchrun: one process group for the run
            if made_group and int(os.environ.get("RANK", "0")) != 0:  # one voice: rank 0 prints
                handler.filters.clear()
                handler.setLevel(logging.WARNING)
                args.no_progress = True
        return args.func(args)
    except QeraError as exc:
        print(f"qera {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # registry lookups and config validation
        print(f"qera {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment said no: disk full, permissions, a file that vanished
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"qera {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qera {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if made_group:
            import torch.distributed as dist

            dist.destroy_process_group()
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
