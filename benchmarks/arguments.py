"""Command-line argument types shared by the benchmarks."""

import argparse


def at_least(minimum: int):
    """An argparse type: an integer >= minimum, or argparse's one-line error naming the argument."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: it must be an integer >= {minimum}")
        return value

    return parse
