"""Unit tests for ensemble_service.metrics against hand-computed values."""

import math

import pytest
import torch

from ensemble_service import metrics as M

# 4 items x 3 classes; argmax (0, 1, 2, 0); targets (0, 2, 2, 1) -> correct T, F, T, F
PROBS = [
    [0.7, 0.2, 0.1],
    [0.1, 0.6, 0.3],
    [0.3, 0.3, 0.4],
    [0.5, 0.4, 0.1],
]
TARGETS = [0, 2, 2, 1]

# 3 members x 2 items x 3 classes (same as in test_aggregation)
P = [
    [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]],  # m0 argmax 0, 1
    [[0.5, 0.4, 0.1], [0.1, 0.3, 0.6]],  # m1 argmax 0, 2
    [[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],  # m2 argmax 1, 2
]


def approx(x):
    return pytest.approx(x, abs=1e-6)


def test_accuracy():
    assert M.accuracy(PROBS, TARGETS) == approx(0.5)
    assert M.accuracy(torch.tensor(PROBS), torch.tensor(TARGETS)) == approx(0.5)
    assert isinstance(M.accuracy(PROBS, TARGETS), float)


def test_nll():
    # true-class probs .7, .3, .4, .4
    # -(ln .7 + ln .3 + ln .4 + ln .4)/4 = (0.356675 + 1.203973 + 0.916291 + 0.916291)/4 = 0.848307
    expected = -(math.log(0.7) + math.log(0.3) + 2 * math.log(0.4)) / 4
    assert M.nll(PROBS, TARGETS) == approx(expected)
    assert M.nll(PROBS, TARGETS) == approx(0.848307)


def test_nll_clamps_zero_probability():
    # p_true = 0 -> -ln(1e-12) = 27.631021
    assert M.nll([[1.0, 0.0]], [1]) == approx(-math.log(1e-12))


def test_brier():
    # item 0, target 0: (.7-1)^2 + .2^2 + .1^2 = .09 + .04 + .01 = .14
    # item 1, target 2: .1^2 + .6^2 + (.3-1)^2 = .01 + .36 + .49 = .86
    # item 2, target 2: .3^2 + .3^2 + (.4-1)^2 = .09 + .09 + .36 = .54
    # item 3, target 1: .5^2 + (.4-1)^2 + .1^2 = .25 + .36 + .01 = .62
    # mean = 2.16 / 4 = .54
    assert M.brier(PROBS, TARGETS) == approx(0.54)


def test_brier_bounds():
    assert M.brier([[1.0, 0.0]], [0]) == approx(0.0)
    assert M.brier([[1.0, 0.0]], [1]) == approx(2.0)


# ECE, 15 bins of width 1/15 = 0.0667; bin k = (k/15, (k+1)/15]
#   conf .95 (bin 14: (.9333, 1]),  correct
#   conf .94 (bin 14),              wrong (target 1)
#   conf .55 (bin 8: (.5333, .6]),  correct
#   conf .35 (bin 5: (.3333, .4]),  wrong (target 1)
# bin 14: n=2, acc .5, conf (.95+.94)/2 = .945 -> 2/4 * |.5 - .945| = .2225
# bin  8: n=1, acc 1,  conf .55               -> 1/4 * |1 - .55|   = .1125
# bin  5: n=1, acc 0,  conf .35               -> 1/4 * |0 - .35|   = .0875
# ECE = .2225 + .1125 + .0875 = .4225
ECE_PROBS = [
    [0.95, 0.03, 0.02],
    [0.94, 0.04, 0.02],
    [0.55, 0.45, 0.00],
    [0.35, 0.33, 0.32],
]
ECE_TARGETS = [0, 1, 0, 1]


def test_ece_15_bins():
    assert M.ece(ECE_PROBS, ECE_TARGETS) == approx(0.4225)
    assert M.ece(ECE_PROBS, ECE_TARGETS, n_bins=15) == approx(0.4225)


def test_reliability_bins():
    rb = M.reliability_bins(ECE_PROBS, ECE_TARGETS)
    assert set(rb) == {"bin_lower", "bin_upper", "confidence", "accuracy", "count"}
    assert all(len(v) == 15 for v in rb.values())
    assert rb["bin_lower"][0] == 0.0 and rb["bin_upper"][-1] == 1.0
    assert rb["bin_lower"][5] == approx(5 / 15) and rb["bin_upper"][5] == approx(6 / 15)
    expected_counts = [0] * 15
    expected_counts[5], expected_counts[8], expected_counts[14] = 1, 1, 2
    assert rb["count"] == expected_counts
    assert rb["confidence"][14] == approx(0.945)
    assert rb["accuracy"][14] == approx(0.5)
    assert rb["confidence"][8] == approx(0.55) and rb["accuracy"][8] == approx(1.0)
    assert rb["confidence"][5] == approx(0.35) and rb["accuracy"][5] == approx(0.0)
    assert rb["confidence"][0] == 0.0 and rb["accuracy"][0] == 0.0  # empty bin


def test_ece_bin_edges_are_upper_inclusive():
    # 2 bins: [0, .5] and (.5, 1]
    # conf .5 exactly (argmax 0, target 0, correct) -> bin 0: |1 - .5| = .5, weight 1/2
    # conf .8 (target 1, wrong)                     -> bin 1: |0 - .8| = .8, weight 1/2
    # ECE = .25 + .4 = .65
    probs = [[0.5, 0.5], [0.8, 0.2]]
    assert M.ece(probs, [0, 1], n_bins=2) == approx(0.65)
    assert M.reliability_bins(probs, [0, 1], n_bins=2)["count"] == [1, 1]
    # conf exactly 0.4 = 6/15 falls in bin 5 = (5/15, 6/15], not bin 6
    rb = M.reliability_bins([[0.4, 0.3, 0.3]], [0])
    assert rb["count"][5] == 1 and rb["count"][6] == 0


def test_ece_perfectly_calibrated_is_zero():
    # conf .5 in both items, one correct, one wrong: |.5 - .5| = 0
    assert M.ece([[0.5, 0.5], [0.5, 0.5]], [0, 1]) == approx(0.0)


def test_member_metrics():
    d = M.member_metrics(PROBS, TARGETS)
    assert set(d) == {"acc", "nll", "brier", "ece"}
    assert d["acc"] == approx(0.5)
    assert d["brier"] == approx(0.54)
    assert d["nll"] == approx(0.848307)
    # confidences .7 (bin 10), .6 (= 9/15 -> bin 8), .4 (= 6/15 -> bin 5), .5 (bin 7)
    # each alone in its bin: (|1-.7| + |0-.6| + |1-.4| + |0-.5|)/4 = (.3+.6+.6+.5)/4 = .5
    assert d["ece"] == approx(0.5)


# -------------------------------------------------------------------- member sets

# 3 members x 4 items; labels per item:
#   item 0: (0, 0, 0) -> 0 of 3 pairs disagree
#   item 1: (0, 1, 1) -> 2 of 3
#   item 2: (0, 1, 2) -> 3 of 3
#   item 3: (2, 2, 1) -> 2 of 3
# pairwise: (m0,m1) differ on items 1,2 -> 2/4; (m0,m2) on 1,2,3 -> 3/4; (m1,m2) on 2,3 -> 2/4
# disagreement = (2/4 + 3/4 + 2/4) / 3 = 7/12 = 0.583333
MEMBER_LABELS = [[0, 0, 0, 2], [0, 1, 1, 2], [0, 1, 2, 1]]


def probs_from_labels(labels, num_classes=3):
    # 0.8 on the label, 0.1 elsewhere
    t = torch.full((len(labels), len(labels[0]), num_classes), 0.1, dtype=torch.float64)
    t.scatter_(2, torch.tensor(labels)[..., None], 0.8)
    return t


def test_disagreement_three_members():
    assert M.disagreement(probs_from_labels(MEMBER_LABELS)) == approx(7 / 12)


def test_disagreement_extremes():
    assert M.disagreement(probs_from_labels([[0, 1, 2, 0]])) == 0.0  # single member
    assert M.disagreement(probs_from_labels([[0, 1], [0, 1]])) == approx(0.0)
    assert M.disagreement(probs_from_labels([[0, 1], [1, 0]])) == approx(1.0)


def test_oracle_accuracy():
    # targets (0, 1, 2, 0): item 0 all say 0 -> hit; item 1 m1 says 1 -> hit;
    # item 2 m2 says 2 -> hit; item 3 labels (2, 2, 1) -> miss. -> 3/4
    assert M.oracle_accuracy(probs_from_labels(MEMBER_LABELS), [0, 1, 2, 0]) == approx(0.75)


def test_single_member_set():
    member = torch.tensor([PROBS], dtype=torch.float64)
    assert M.disagreement(member) == 0.0
    assert M.oracle_accuracy(member, TARGETS) == approx(0.5)  # = its accuracy
    d = M.ensemble_metrics(member, TARGETS)
    for key in ("mean_acc", "vote_acc", "weighted_acc", "logit_mean_acc", "best_member_acc",
                "mean_member_acc", "oracle_acc"):
        assert d[key] == approx(0.5), key
    assert d["mean_nll"] == approx(0.848307)
    assert d["mean_brier"] == approx(0.54)
    assert d["disagreement"] == 0.0


def test_ensemble_metrics():
    # targets (1, 2)
    # mean ensemble (.4, .5, .1), (.2, 11/30, 13/30) -> labels (1, 2): mean_acc 1
    # vote labels (0, 2) -> vote_acc .5
    # logit_mean: geometric means item 0 (.03^(1/3), .096^(1/3), .001^(1/3)) = (.311, .458, .1) -> 1
    #             item 1 (.006^(1/3), .045^(1/3), .072^(1/3)) = (.182, .356, .416) -> 2; acc 1
    # members: m0 (0, 1) -> 0; m1 (0, 2) -> .5; m2 (1, 2) -> 1: best 1, mean .5
    # disagreement: both items have votes split 2-1 -> 2/3
    # oracle: item 0 m2 right, item 1 m1/m2 right -> 1
    # mean_nll = -(ln .5 + ln 13/30)/2 = (0.693147 + 0.836248)/2 = 0.764698
    # mean_brier: item 0 .1^2... = .16 + .25 + .01 = .42; item 1 .04 + (11/30)^2 + (17/30)^2 = 446/900
    #             mean = (378 + 446)/1800 = 0.457778
    # mean_ece: conf .5 in bin 7 (correct, |1-.5|), conf 13/30 in bin 6 (correct, |1-13/30|)
    #           = (.5 + 17/30)/2 = 0.533333
    d = M.ensemble_metrics(P, [1, 2])
    assert d["mean_acc"] == approx(1.0)
    assert d["vote_acc"] == approx(0.5)
    assert d["weighted_acc"] == approx(1.0)  # uniform weights = mean
    assert d["logit_mean_acc"] == approx(1.0)
    assert d["best_member_acc"] == approx(1.0)
    assert d["mean_member_acc"] == approx(0.5)
    assert d["disagreement"] == approx(2 / 3)
    assert d["oracle_acc"] == approx(1.0)
    assert d["mean_nll"] == approx(0.764698)
    assert d["mean_brier"] == approx(824 / 1800)
    assert d["mean_ece"] == approx((0.5 + 17 / 30) / 2)
    assert all(isinstance(v, float) for v in d.values())


def test_ensemble_metrics_weighted_by_val_accuracy():
    # val accuracies (1, 0, 0) -> weights (1, 0, 0): the ensemble is member 0, labels (0, 1)
    d = M.ensemble_metrics(P, [1, 2], val_accuracies=[1.0, 0.0, 0.0])
    assert d["weighted_acc"] == approx(0.0)
    # (0, 0, 1) -> member 2, labels (1, 2)
    d = M.ensemble_metrics(P, [1, 2], val_accuracies=torch.tensor([0.0, 0.0, 0.9]))
    assert d["weighted_acc"] == approx(1.0)


# -------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [M.accuracy, M.nll, M.brier, M.ece, M.reliability_bins, M.member_metrics])
@pytest.mark.parametrize(
    "probs, targets, match",
    [
        ([0.5, 0.5], [0], r"must be 2-D \(batch x classes\), got shape \(2,\)"),
        ([[[0.5, 0.5]]], [0], r"must be 2-D"),
        ([[0.5, 0.5], [0.5, 0.5]], [0], r"targets has 1 entries but probabilities have 2 items"),
        ([[float("nan"), 0.5]], [0], r"NaN or infinite"),
        ([[0.9, 0.5]], [0], r"sum to 1"),
        ([[0.5, 0.5]], [2], r"targets out of range 0\.\.1"),
        ([[0.5, 0.5]], [[0]], r"targets must be 1-D"),
        (torch.zeros(0, 2), [], r"empty batch"),
    ],
)
def test_metric_errors(fn, probs, targets, match):
    with pytest.raises(ValueError, match=match):
        fn(probs, targets)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: M.disagreement([[0.5, 0.5]]), r"must be 3-D"),
        (lambda: M.oracle_accuracy([[[0.5, 0.5]]], [0, 1]), r"targets has 2 entries"),
        (lambda: M.oracle_accuracy([[[float("inf"), 0.0]]], [0]), r"NaN or infinite"),
        (lambda: M.ensemble_metrics(P, [1, 2], val_accuracies=[1.0, 1.0]), r"weights has 2 entries but there are 3 members"),
        (lambda: M.ece(PROBS, TARGETS, n_bins=0), r"n_bins must be a positive integer"),
        (lambda: M.nll(PROBS, TARGETS, eps=0), r"eps must be a positive"),
    ],
)
def test_member_set_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
