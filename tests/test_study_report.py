"""The study report's order of variants (kept apart from tests/test_study.py, which trains runs)."""

from __future__ import annotations

import random

from phd.study.report import variant_order

# The report's order: vanilla, PHD, PHD-SWA, PHD-CSWA, repeat; in each family by K, then W, then C, as numbers.
ORDERED = [
    "vanilla",
    "PHD-2", "PHD-3", "PHD-10",
    "PHD-SWA-2-2-inf", "PHD-SWA-2-3-inf", "PHD-SWA-2-16-inf", "PHD-SWA-3-2-inf", "PHD-SWA-12-2-inf",
    "PHD-CSWA-2-4-8", "PHD-CSWA-2-16-8", "PHD-CSWA-2-16-32", "PHD-CSWA-3-2-4", "PHD-CSWA-3-16-32",
    "repeat-2", "repeat-3", "repeat-10",
]


def test_variants_sort_by_family_then_numbers_not_strings():
    """As strings "16" < "2" and "PHD-10" < "PHD-2": the report would list PHD-SWA-2-16-inf before PHD-SWA-2-2-inf.
    Every shuffle of the names sorts back to the numeric order."""
    assert sorted(ORDERED) != ORDERED  # the list is one string order gets wrong
    rng = random.Random(0)
    for _ in range(20):
        names = ORDERED[:]
        rng.shuffle(names)
        assert sorted(names, key=variant_order) == ORDERED
    assert variant_order("PHD-SWA-2-2-inf") < variant_order("PHD-SWA-2-16-inf")
    assert variant_order("PHD-CSWA-3-2-4") < variant_order("PHD-CSWA-3-16-32") < variant_order("repeat-2")
