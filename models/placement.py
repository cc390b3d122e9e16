"""Layer patterns for the placement explorer (sola_vision.explore): where can k softmax layers go?

A pattern is the model's own `layer_pattern` string ("LL-LLLL-LLLSLLLS-LLLS": one letter per block,
"L" linear, "S" softmax, stages split by "-"), always checked by `parse_layer_pattern`. Stages and
blocks are 0-based inside this module; `describe` prints them 1-based, as the command line takes them.
"""
import itertools
import math
from typing import Iterable, List, Optional, Sequence, Tuple

from .sola_vision import VARIANTS, parse_layer_pattern

__all__ = ["model_depths", "default_pattern", "linear_pattern", "canonical", "softmax_blocks", "describe",
           "placement_key", "check_stages", "count_placements", "enumerate_placements"]


def model_depths(model: str) -> Tuple[int, ...]:
    """Blocks per stage of a registered variant; ValueError naming the choices for an unknown name."""
    if model not in VARIANTS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(sorted(VARIANTS))}")
    return tuple(VARIANTS[model]["depths"])


def linear_pattern(depths: Sequence[int]) -> str:
    return "-".join("L" * d for d in depths)


def default_pattern(model: str) -> str:
    """The pattern the variant is registered with (all linear for the *_linear variants)."""
    return canonical(VARIANTS[model]["layer_pattern"], model_depths(model))


def canonical(pattern: Optional[str], depths: Sequence[int]) -> str:
    """Upper-case, stripped form of a pattern; ValueError (from parse_layer_pattern) when it does not fit."""
    return "-".join(parse_layer_pattern(pattern, depths))


def softmax_blocks(pattern: str) -> List[Tuple[int, int]]:
    """[(stage, block)] of the "S" letters, 0-based, in model order."""
    return [(i, j) for i, stage in enumerate(pattern.split("-")) for j, letter in enumerate(stage) if letter == "S"]


def describe(pattern: str) -> str:
    """Where the softmax layers are, 1-based "stage.block": "3.4 3.8 4.4"; "-" when there are none."""
    return " ".join(f"{i + 1}.{j + 1}" for i, j in softmax_blocks(pattern)) or "-"


def placement_key(pattern: str) -> Tuple:
    """Sort key: more softmax layers first; for equal counts the deeper placement first (compared from the
    deepest softmax layer down), as the paper puts its few softmax layers late."""
    offsets = list(itertools.accumulate(len(s) for s in pattern.split("-")))
    depth = sorted(((offsets[i - 1] if i else 0) + j for i, j in softmax_blocks(pattern)), reverse=True)
    return (-len(depth), tuple(-d for d in depth))


def check_stages(stages: Iterable[int], depths: Sequence[int]) -> Tuple[int, ...]:
    """1-based stage numbers -> sorted unique 0-based indices; ValueError for a stage the model lacks."""
    stages = tuple(stages)
    bad = [s for s in stages if not 1 <= s <= len(depths)]
    if bad or not stages:
        raise ValueError(f"stages {list(stages)}: the model has stages 1-{len(depths)} "
                         f"(depths {', '.join(map(str, depths))})")
    return tuple(sorted({s - 1 for s in stages}))


def _positions(depths: Sequence[int], stages: Iterable[int]) -> List[Tuple[int, int]]:
    idx = check_stages(stages, depths)
    return [(i, j) for i in idx for j in range(depths[i])]


def _check_ks(ks: Iterable[int], n: int, stages: Iterable[int]) -> Tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("k: give at least one number of softmax layers")
    for k in ks:
        if not 0 <= k <= n:
            raise ValueError(f"k={k}: stage(s) {', '.join(map(str, stages))} have {n} block(s) in all, "
                             f"so k must be between 0 and {n}")
    return tuple(sorted(set(ks)))


def count_placements(depths: Sequence[int], ks: Iterable[int], stages: Iterable[int]) -> int:
    """sum over k of C(n, k), n = the number of blocks in the chosen (1-based) stages."""
    stages = tuple(stages)
    n = len(_positions(depths, stages))
    return sum(math.comb(n, k) for k in _check_ks(ks, n, stages))


def enumerate_placements(depths: Sequence[int], ks: Iterable[int], stages: Iterable[int]) -> List[str]:
    """Every pattern with exactly k softmax layers, for each k in `ks`, placed among the blocks of the
    chosen (1-based) `stages`; all other blocks linear. Ordered by k, then lexicographically by position."""
    stages = tuple(stages)
    positions = _positions(depths, stages)
    patterns = []
    for k in _check_ks(ks, len(positions), stages):
        for chosen in itertools.combinations(positions, k):
            letters = [["L"] * d for d in depths]
            for i, j in chosen:
                letters[i][j] = "S"
            patterns.append("-".join("".join(s) for s in letters))
    return patterns
