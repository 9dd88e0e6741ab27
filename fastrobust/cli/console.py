"""What every subcommand shares: one-line argparse errors, the flag of a config field,
and progress bars on a terminal only."""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``fastrobust train oat: error: --eps must be ...``,
    exit status 2, no usage block and no traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def flag(parser, field: str) -> str:
    """The option that sets config field ``field`` (``--batch-size`` for batch_size)."""
    for action in parser._actions:
        if action.dest == field and action.option_strings:
            return action.option_strings[0]
    return field


def bars() -> bool:
    """Progress bars on a terminal only: a log file or pipe gets the epoch lines, not every
    redraw of a bar."""
    return sys.stderr is not None and sys.stderr.isatty()


def close_bars() -> None:
    """Closes the progress bars a Ctrl-C left open, so its line starts a clean line."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse
