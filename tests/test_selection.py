"""Greedy ensemble selection with replacement (Caruana et al. 2004), checked against a hand-worked pool."""
from __future__ import annotations

import math

import pytest
import torch

from ensemble_service.selection import SelectionError, greedy_select

# two items (labels 0 and 1), two classes: A is sure and right on item 0 and wrong on item 1, B the opposite
A = [[0.9, 0.1], [0.8, 0.2]]
B = [[0.3, 0.7], [0.1, 0.9]]
C = [[0.5, 0.5], [0.5, 0.5]]
POOL = torch.tensor([A, B, C], dtype=torch.float64)
Y = torch.tensor([0, 1])


def nll(p0: float, p1: float) -> float:  # the mean NLL of true-class probabilities p0 (item 0), p1 (item 1)
    return -(math.log(p0) + math.log(p1)) / 2


def test_greedy_nll_path_by_hand():
    sel = greedy_select(POOL, Y, size=4, metric="val_nll")
    # step 1: B alone is the best member (0.3, 0.9); step 2: B+A (0.6, 0.55); step 3: A+2B (1.5/3, 2/3);
    # step 4: A+2B+A (0.6, 0.55), worse than step 3, so the selection stops at 3 picks
    assert sel.path_nll == pytest.approx([nll(0.3, 0.9), nll(0.6, 0.55), nll(0.5, 2 / 3), nll(0.6, 0.55)], abs=1e-12)
    assert sel.path_acc == [0.5, 1.0, 1.0, 1.0]
    assert sel.picks == [1, 0, 1] and sel.best_step == 3
    assert sel.counts == {1: 2, 0: 1} and sel.weights == pytest.approx({1: 2 / 3, 0: 1 / 3})
    assert sel.path_nll[2] < min(nll(0.9, 0.2), nll(0.3, 0.9), nll(0.5, 0.5))   # below the best member


def test_greedy_acc_breaks_ties_by_nll_then_pool_order():
    sel = greedy_select(POOL, Y, size=4, metric="val_acc")
    # every member has accuracy 0.5: the lowest NLL (B) goes first; at step 3 A+2B and A+B+C both
    # reach 1.0, A+2B has the lower NLL; steps 2..4 all have accuracy 1.0: step 3 has the lowest NLL
    assert sel.picks == [1, 0, 1] and sel.path_acc == [0.5, 1.0, 1.0, 1.0]
    assert sel.path_nll[3] == pytest.approx(nll(0.6, 0.55), abs=1e-12)


def test_equal_candidates_go_to_the_earlier_member_and_the_shorter_prefix():
    sel = greedy_select(torch.tensor([B, B], dtype=torch.float64), Y, size=3)
    assert sel.picks == [0] and sel.path_nll == pytest.approx([nll(0.3, 0.9)] * 3)


@pytest.mark.parametrize("args,message", [
    ((POOL, Y, 0), "at least 1"), ((POOL, Y, 2, "brier"), "unknown metric"),
    ((POOL, torch.tensor([0, 1, 1]), 2), "targets"), ((POOL[0], Y, 2), "members, batch, classes"),
    ((POOL, torch.tensor([0, 2]), 2), "class indices"),
])
def test_bad_input_is_one_line(args, message):
    with pytest.raises(SelectionError, match=message):
        greedy_select(*args)
