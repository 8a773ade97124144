"""argparse types that every subcommand's parser shares (cli.py and the modules that add their
own)."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def number(kind: type, low: float, what: str, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite `kind` >= low (> low when strict), else one line saying what to
    pass (the subcommands' modules use it too)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a{'n integer' if kind is int else ' number'}; pass {what}"
            ) from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text} is out of range; pass {what}")
        return value

    return parse


SEED = number(int, 0, "a seed >= 0 (e.g. --seed 0)")  # the type of every subcommand's --seed
