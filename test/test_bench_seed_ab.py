"""bench/seed_ab.py's seed ranges and summary (the figures a change over many seeds is judged by)."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'bench'))
from seed_ab import parse_seeds, summary  # noqa: E402


def test_seed_ranges():
    assert parse_seeds('1300-1302,850') == [1300, 1301, 1302, 850]
    assert parse_seeds('7') == [7]


def test_summary_counts_seeds_above_the_limit_and_signs_against_the_first_variant():
    ate = np.array([[2.0, 1.0], [3.5, 2.0], [2.5, 2.52], [4.0, 1.5], [1.0, 3.2]])
    base, other = summary(ate, ['base', 'x=1'], 3.0)
    assert 'above 3 mm 2 of 5' in base and 'mean 2.600' in base
    # 3 better, 1 worse by more than 0.05 mm, 1 unchanged (2.5 -> 2.52); one seed above 3 mm
    assert 'above 3 mm 1 of 5' in other and '3 better, 1 worse' in other and 'p = 0.62' in other
