"""Interleaved rounds for the benchmarks: every variant measured once a round, in an order rotated each round."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def interleaved(names: list[str], rounds: int, measure: Callable[[str], T]) -> dict[str, list[T]]:
    """``measure(name)`` for each name in each of ``rounds`` rounds, with the garbage collector off meanwhile.

    The order is rotated each round, so that drift and cache effects fall on every variant alike.

    Args:
        names: the variants, in their first round's order.
        rounds: how many rounds.
        measure: measures one variant once (e.g. seconds, or a list of seconds per step).

    Returns:
        Each name's measurements, one a round.
    """
    out: dict[str, list[T]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                out[name].append(measure(name))
    finally:
        gc.enable()
    return out
