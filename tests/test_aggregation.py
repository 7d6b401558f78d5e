"""Unit tests for ensemble_service.aggregation against hand-computed values."""

import math

import pytest
import torch

from ensemble_service import aggregation as A
from ensemble_service.aggregation import AggregateResult, AggregationError

# 3 members x 2 items x 3 classes.
#            item 0            item 1            member argmax
P = [
    [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]],  # m0: 0, 1
    [[0.5, 0.4, 0.1], [0.1, 0.3, 0.6]],  # m1: 0, 2
    [[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],  # m2: 1, 2
]


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


# ----------------------------------------------------------------------------- mean


def test_mean_uniform():
    # item 0: ((.6+.5+.1)/3, (.3+.4+.8)/3, (.1+.1+.1)/3) = (.4, .5, .1)
    # item 1: ((.2+.1+.3)/3, (.5+.3+.3)/3, (.3+.6+.4)/3) = (.2, 11/30, 13/30)
    close(A.mean(t64(P)), [[0.4, 0.5, 0.1], [0.2, 11 / 30, 13 / 30]])


def test_mean_weighted():
    # weights (1, 2, 1) -> (.25, .5, .25)
    # item 0: (.25*.6+.5*.5+.25*.1, .25*.3+.5*.4+.25*.8, .25*.1+.5*.1+.25*.1) = (.425, .475, .1)
    # item 1: (.25*.2+.5*.1+.25*.3, .25*.5+.5*.3+.25*.3, .25*.3+.5*.6+.25*.4) = (.175, .35, .475)
    expected = [[0.425, 0.475, 0.1], [0.175, 0.35, 0.475]]
    close(A.mean(t64(P), weights=[1.0, 2.0, 1.0]), expected)
    res = A.aggregate(t64(P), method="weighted", weights=[1, 2, 1])
    close(res.probabilities, expected)
    assert res.labels.tolist() == [1, 2]
    # member argmaxes (0, 0, 1) and (1, 2, 2): agreement with labels (1, 2) = (1/3, 2/3)
    close(res.agreement, [1 / 3, 2 / 3])


def test_aggregate_mean_result():
    res = A.aggregate(P)  # python lists -> float32
    assert isinstance(res, AggregateResult)
    assert res.probabilities.dtype == torch.float32
    assert res.labels.dtype == torch.int64
    close(res.probabilities, [[0.4, 0.5, 0.1], [0.2, 11 / 30, 13 / 30]])
    assert res.labels.tolist() == [1, 2]  # argmax of (.4,.5,.1) and (.2,.367,.433)
    close(res.agreement, [1 / 3, 2 / 3])


def test_float64_stays_float64():
    res = A.aggregate(t64(P), method="vote")
    assert res.probabilities.dtype == torch.float64
    assert res.agreement.dtype == torch.float64


# ----------------------------------------------------------------------- logit_mean


def test_logit_mean():
    # 2 members, 1 item, 2 classes: logits (0, 2) and (0, 0) -> mean (0, 1)
    # softmax(0, 1) = (1/(1+e), e/(1+e)) = (0.268941, 0.731059)
    z = t64([[[0.0, 2.0]], [[0.0, 0.0]]])
    e = math.e
    close(A.logit_mean(z), [[1 / (1 + e), e / (1 + e)]])
    # weights (3, 1) -> (.75, .25): mean (0, 1.5); softmax = (1/(1+e^1.5), e^1.5/(1+e^1.5))
    #                                                      = (0.182426, 0.817574)
    e15 = math.exp(1.5)
    close(A.logit_mean(z, weights=[3, 1]), [[1 / (1 + e15), e15 / (1 + e15)]])
    res = A.aggregate(z, method="logit_mean", kind="logits")
    close(res.probabilities, [[0.268941, 0.731059]])
    assert res.labels.tolist() == [1]
    # member argmaxes: m0 -> 1, m1 -> (0, 0) tie -> lowest index 0; agreement 1/2
    close(res.agreement, [0.5])


def test_logit_mean_on_probs_is_normalized_geometric_mean():
    # members (.8, .2) and (.5, .5): sqrt(.8*.5) : sqrt(.2*.5) = sqrt(.4) : sqrt(.1) = 2 : 1
    res = A.aggregate(t64([[[0.8, 0.2]], [[0.5, 0.5]]]), method="logit_mean")
    close(res.probabilities, [[2 / 3, 1 / 3]])


def test_logits_softmaxed_for_mean():
    # logits (0, ln 3) -> probs (.25, .75); logits (0, 0) -> (.5, .5); mean (.375, .625)
    z = t64([[[0.0, math.log(3.0)]], [[0.0, 0.0]]])
    res = A.aggregate(z, method="mean", kind="logits")
    close(res.probabilities, [[0.375, 0.625]])
    assert res.labels.tolist() == [1]


# ----------------------------------------------------------------------------- vote


def test_vote_majority():
    # item 0: votes (0, 0, 1) -> label 0, shares (2/3, 1/3, 0)
    # item 1: votes (1, 2, 2) -> label 2, shares (0, 1/3, 2/3)
    labels, shares = A.vote(t64(P))
    assert labels.tolist() == [0, 2]
    close(shares, [[2 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 2 / 3]])
    res = A.aggregate(t64(P), method="vote")
    assert res.labels.tolist() == [0, 2]
    close(res.probabilities, shares)  # vote returns shares as probabilities
    close(res.agreement, [2 / 3, 2 / 3])


def test_vote_tie_broken_by_mean_probability():
    # m0 (.5, .4, .1) votes 0, m1 (.1, .6, .3) votes 1: 1-1 tie between classes 0 and 1.
    # mean probs: class 0 = .3, class 1 = .5 -> class 1 wins (not the lower index 0).
    labels, shares = A.vote(t64([[[0.5, 0.4, 0.1]], [[0.1, 0.6, 0.3]]]))
    assert labels.tolist() == [1]
    close(shares, [[0.5, 0.5, 0.0]])


def test_vote_three_way_tie_broken_by_mean_probability():
    # votes 0, 1, 2; mean probs (.9/3, 1.0/3, 1.1/3) = (.3, .333, .367) -> class 2
    probs = [[[0.4, 0.3, 0.3]], [[0.3, 0.4, 0.3]], [[0.2, 0.3, 0.5]]]
    labels, shares = A.vote(t64(probs))
    assert labels.tolist() == [2]
    close(shares, [[1 / 3, 1 / 3, 1 / 3]])


@pytest.mark.parametrize(
    "probs",
    [
        [[[0.6, 0.4, 0.0]], [[0.4, 0.6, 0.0]]],  # votes 0, 1; mean (.5, .5, 0)
        [[[0.4, 0.6, 0.0]], [[0.6, 0.4, 0.0]]],  # same, members swapped
    ],
)
def test_vote_full_tie_goes_to_lowest_index(probs):
    labels, shares = A.vote(torch.tensor(probs))
    assert labels.tolist() == [0]
    close(shares, [[0.5, 0.5, 0.0]])


def test_vote_member_with_tied_argmax_votes_lowest_index():
    # single member (.4, .4, .2): its own vote is class 0
    labels, shares = A.vote(t64([[[0.4, 0.4, 0.2]]]))
    assert labels.tolist() == [0]
    close(shares, [[1.0, 0.0, 0.0]])


def test_weighted_vote_on_probs():
    # votes (0, 0, 1) on item 0; weights (1, 1, 3) -> (.2, .2, .6): shares (.4, .6, 0) -> 1
    res = A.aggregate(t64(P), method="vote", weights=[1, 1, 3])
    assert res.labels.tolist()[0] == 1
    close(res.probabilities[0], [0.4, 0.6, 0.0])


# ---------------------------------------------------------------------- vote_labels


def test_vote_labels_majority_and_tie():
    # item 0: votes (2, 1) -> tie 1-1 -> lowest index 1; shares (0, .5, .5)
    # item 1: votes (0, 0) -> 0; shares (1, 0, 0)
    labels, shares = A.vote_labels([[2, 0], [1, 0]], num_classes=3)
    assert labels.tolist() == [1, 0]
    assert shares.dtype == torch.float32
    close(shares, [[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])


def test_vote_labels_weighted():
    # votes (0, 1, 1), weights (3, 1, 1) -> (.6, .2, .2): class 0 = .6, class 1 = .4 -> 0
    labels, shares = A.vote_labels([[0], [1], [1]], num_classes=2, weights=[3, 1, 1])
    assert labels.tolist() == [0]
    close(shares, [[0.6, 0.4]])
    # votes (1, 0, 0), weights (2, 1, 1) -> .5 vs .5 tie -> lowest index 0
    labels, shares = A.vote_labels([[1], [0], [0]], num_classes=2, weights=[2, 1, 1])
    assert labels.tolist() == [0]
    close(shares, [[0.5, 0.5]])


def test_aggregate_labels():
    member_labels = [[0, 1, 2], [0, 2, 2], [1, 1, 0]]
    # item 0: (0, 0, 1) -> 0; item 1: (1, 2, 1) -> 1; item 2: (2, 2, 0) -> 2
    res = A.aggregate(member_labels, method="vote", kind="labels", num_classes=3)
    assert res.labels.tolist() == [0, 1, 2]
    close(res.agreement, [2 / 3, 2 / 3, 2 / 3])
    # weighted: weights (0, 0, 1) -> only member 2 counts
    res = A.aggregate(member_labels, method="weighted", kind="labels", weights=[0, 0, 1], num_classes=3)
    assert res.labels.tolist() == [1, 1, 0]
    close(res.agreement, [1 / 3, 2 / 3, 1 / 3])


# --------------------------------------------------------------------- single member


@pytest.mark.parametrize("method", ["mean", "vote", "logit_mean"])
def test_single_member_is_that_member(method):
    member = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]
    res = A.aggregate(t64([member]), method=method)
    assert res.labels.tolist() == [0, 2]
    close(res.agreement, [1.0, 1.0])
    if method == "vote":
        close(res.probabilities, [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    else:
        close(res.probabilities, member)


def test_single_member_weighted():
    res = A.aggregate(t64([[[0.7, 0.3]]]), method="weighted", weights=[5.0])
    close(res.probabilities, [[0.7, 0.3]])


# --------------------------------------------------------------------------- helpers


def test_agreement():
    # item 0: (0, 0, 1) vs 0 -> 2/3; item 1: (1, 2, 1) vs 1 -> 2/3; item 2: (2, 2, 2) vs 2 -> 1
    ag = A.agreement([[0, 1, 2], [0, 2, 2], [1, 1, 2]], [0, 1, 2])
    close(ag, [2 / 3, 2 / 3, 1.0])
    # item 0 vs 1 -> 1/3; item 1 vs 0 -> 0
    close(A.agreement([[0, 1], [0, 2], [1, 1]], [1, 0]), [1 / 3, 0.0])


@pytest.mark.parametrize(
    "acc, expected",
    [
        ([0.5, 0.25, 0.25], [0.5, 0.25, 0.25]),
        ([0.9, 0.6], [0.6, 0.4]),  # .9/1.5, .6/1.5
        ([0.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]),  # all zero -> uniform
        ([0.0, 0.8], [0.0, 1.0]),
    ],
)
def test_weights_from_accuracy(acc, expected):
    close(A.weights_from_accuracy(acc), expected)
    close(A.weights_from_accuracy(torch.tensor(acc)), expected)


def test_normalize_weights():
    w = A.normalize_weights([2, 6], 2)
    close(w, [0.25, 0.75])
    assert w.dtype == torch.float32
    assert A.normalize_weights(t64([1, 1]), 2).dtype == torch.float64


def test_validators_return_tensors():
    assert A.validate_probs(P).shape == (3, 2, 3)
    assert A.validate_logits([[[1, 2]]]).dtype == torch.float32
    assert A.validate_labels([[0, 1]], 2).dtype == torch.int64
    # within tolerance: sums to 1.0005
    A.validate_probs([[[0.5005, 0.5]]])


def test_half_precision_upcast():
    res = A.aggregate(torch.tensor(P, dtype=torch.float16))
    assert res.probabilities.dtype == torch.float32


# ---------------------------------------------------------------------------- errors

GOOD = [[[0.5, 0.5]], [[0.2, 0.8]]]  # 2 members x 1 item x 2 classes


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(predictions=[[0.5, 0.5], [0.2, 0.8]]), r"must be 3-D \(members x batch x classes\), got shape \(2, 2\)"),
        (dict(predictions=[0.5, 0.5]), r"must be 3-D .*got shape \(2,\)"),
        (dict(predictions=[[[float("nan"), 1.0]]]), r"NaN or infinite"),
        (dict(predictions=[[[float("inf"), 0.0]]]), r"NaN or infinite"),
        (dict(predictions=[[[float("inf"), 0.0]]], kind="logits"), r"NaN or infinite"),
        (dict(predictions=[[[0.6, 0.6]]]), r"must sum to 1 over classes \(max deviation 0\.2\)"),
        (dict(predictions=[[[1.2, -0.2]]]), r"must lie in \[0, 1\]"),
        (dict(predictions=GOOD, weights=[-1.0, 2.0]), r"weights must be non-negative"),
        (dict(predictions=GOOD, weights=[1.0, 1.0, 1.0]), r"weights has 3 entries but there are 2 members"),
        (dict(predictions=GOOD, weights=[0.0, 0.0]), r"at least one positive"),
        (dict(predictions=GOOD, weights=[float("nan"), 1.0]), r"weights contain NaN"),
        (dict(predictions=GOOD, weights="heavy"), r"weights"),
        (dict(predictions=GOOD, method="foo"), r"unknown method 'foo'; choose one of: mean, vote, weighted, logit_mean"),
        (dict(predictions=GOOD, kind="scores"), r"unknown kind 'scores'"),
        (dict(predictions=GOOD, method="weighted"), r"method 'weighted' needs weights"),
        (dict(predictions=torch.zeros(2, 0, 3)), r"empty batch"),
        (dict(predictions=torch.zeros(0, 2, 3)), r"no members"),
        (dict(predictions=torch.zeros(2, 0, dtype=torch.int64), kind="labels", method="vote", num_classes=3), r"empty batch"),
        (dict(predictions=[[0, 3]], kind="labels", num_classes=3, method="vote"), r"labels out of range 0\.\.2"),
        (dict(predictions=[[0, -1]], kind="labels", num_classes=3, method="vote"), r"labels out of range 0\.\.2"),
        (dict(predictions=[[0, 1]], kind="labels", method="vote"), r"num_classes is required for labels"),
        (dict(predictions=[[0, 1]], kind="labels", method="mean", num_classes=2), r"method 'mean' needs probabilities or logits"),
        (dict(predictions=[[0, 1]], kind="labels", method="logit_mean", num_classes=2), r"method 'logit_mean' needs"),
        (dict(predictions=[[0.5, 1]], kind="labels", method="vote", num_classes=2), r"labels must be integers"),
        (dict(predictions=[[[0.5, 0.5]], [[1.0]]]), r"could not be converted"),  # ragged
        (dict(predictions=None), r"missing"),
        (dict(predictions=GOOD, num_classes=3), r"num_classes is 3 but predictions have 2 classes"),
    ],
)
def test_aggregate_errors(kwargs, match):
    with pytest.raises(AggregationError, match=match):
        A.aggregate(**kwargs)


def test_aggregation_error_is_value_error():
    assert issubclass(AggregationError, ValueError)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: A.mean([[[0.5, 0.5]]], weights=[1, 2]), r"weights has 2 entries but there are 1 members"),
        (lambda: A.vote([[0.5, 0.5]]), r"must be 3-D"),
        (lambda: A.logit_mean([[[1.0, float("nan")]]]), r"NaN or infinite"),
        (lambda: A.vote_labels([[0, 5]], 3), r"labels out of range"),
        (lambda: A.vote_labels([[0, 1]], None), r"num_classes is required"),
        (lambda: A.vote_labels([0, 1], 3), r"labels must be 2-D"),
        (lambda: A.normalize_weights([1.0, -0.5], 2), r"non-negative"),
        (lambda: A.weights_from_accuracy([0.5, -0.1]), r"non-negative"),
        (lambda: A.weights_from_accuracy([]), r"empty"),
        (lambda: A.agreement([[0, 1]], [0, 1, 2]), r"2 items but labels have 3"),
        (lambda: A.validate_probs([[[0.3, 0.3]]]), r"max deviation 0\.4"),
    ],
)
def test_function_errors(call, match):
    with pytest.raises(AggregationError, match=match):
        call()


def test_label_votes_with_many_classes_do_not_build_a_members_by_classes_tensor():
    # 64 members x 1024 items x 10000 classes as a one-hot would be ~5 GB; the counts are [B, C]
    labels = torch.arange(64 * 1024).reshape(64, 1024) % 10000
    labels[:, 0] = 7                                       # every member votes 7 for item 0
    winners, shares = A.vote_labels(labels, 10000)
    assert shares.shape == (1024, 10000)
    assert winners[0].item() == 7 and shares[0, 7].item() == pytest.approx(1.0)
    assert torch.allclose(shares.sum(-1), torch.ones(1024))


# ------------------------------------------------------------- float32 range limits

F32_MAX = torch.finfo(torch.float32).max  # 3.4028235e38


def test_logit_mean_of_logits_whose_sum_overflows_float32():
    # mean of (3e38, 3e38) is 3e38, but their float32 sum is inf (and inf - inf = NaN in softmax)
    z = [[[3e38, 0.0]], [[3e38, 0.0]]]
    for weights in (None, [1.0, 1.0], [1.0, 3.0]):
        res = A.aggregate(z, method="logit_mean", kind="logits", weights=weights)
        assert res.probabilities.tolist() == [[1.0, 0.0]] and res.labels.tolist() == [0]
        assert res.probabilities.dtype == torch.float32
    # opposite extremes cancel: mean logits (0, 0) -> (1/2, 1/2)
    res = A.aggregate([[[3e38, -3e38]], [[-3e38, 3e38]]], method="logit_mean", kind="logits")
    assert res.probabilities.tolist() == [[0.5, 0.5]] and res.labels.tolist() == [0]
    # the largest float32 logits, weighted mean: still exactly (1, 0)
    res = A.aggregate(torch.tensor([[[F32_MAX, -F32_MAX]]] * 3), method="logit_mean", kind="logits",
                      weights=[1.0, 2.0, 3.0])
    assert res.probabilities.tolist() == [[1.0, 0.0]]
    # float64 logits near float64's limit
    res = A.aggregate(t64([[[1.7e308, 0.0]], [[1.7e308, -1.7e308]]]), method="logit_mean", kind="logits")
    assert res.probabilities.tolist() == [[1.0, 0.0]] and res.probabilities.dtype == torch.float64


def test_huge_weights_are_not_infinite():
    # finite Python floats beyond float32's range: normalized in float64, not first rounded to inf
    close(A.normalize_weights([1e39, 3e39], 2), [0.25, 0.75])
    close(A.normalize_weights([1e308, 1e308, 0.0], 3), [0.5, 0.5, 0.0])
    close(A.normalize_weights([1e-320, 1e308], 2), [0.0, 1.0])  # a subnormal next to a huge one
    assert A.normalize_weights([1e39, 3e39], 2).dtype == torch.float32
    res = A.aggregate(t64(P), method="weighted", weights=[1e38, 2e38, 1e38])  # = weights (1, 2, 1)
    close(res.probabilities, [[0.425, 0.475, 0.1], [0.175, 0.35, 0.475]])


EXTREME = {
    "probs": [[[1.0, 1e-45, 0.0]], [[1e-45, 1.0, 0.0]], [[0.0, 1e-38, 1.0]]],      # subnormal probabilities
    "logits": [[[3e38, -3e38, 0.0]], [[3.4e38, -3.4e38, 1e-45]], [[-3e38, 3e38, 3e38]]],
}


@pytest.mark.parametrize("kind", ["probs", "logits"])
@pytest.mark.parametrize("method", A.METHODS)
@pytest.mark.parametrize("weights", [None, [1.0, 1.0, 1.0], [1e38, 3e38, 1e-30], [0.0, 0.0, 1e-300]])
def test_extreme_inputs_give_finite_results(kind, method, weights):
    if method == "weighted" and weights is None:
        weights = [1.0, 2.0, 3.0]
    res = A.aggregate(EXTREME[kind], method=method, kind=kind, weights=weights)
    assert bool(torch.isfinite(res.probabilities).all()), res.probabilities
    close(res.probabilities.sum(-1), [1.0])
    assert bool(((res.probabilities >= 0) & (res.probabilities <= 1)).all())
    assert bool(torch.isfinite(res.agreement).all())
    if weights == [0.0, 0.0, 1e-300]:  # only the last member counts: its argmax (2 for probs; 1, the
        # lowest of the tied 3e38 logits), which is also the label of one member in three
        assert res.labels.tolist() == [2 if kind == "probs" else 1]
        close(res.agreement, [1 / 3])


@pytest.mark.parametrize("shape,dtype", [((5, 1, 10), torch.float32), ((5, 64, 10), torch.float32),
                                         ((3000, 2), torch.float32), ((4, 200, 15), torch.float32),
                                         ((2, 300, 16), torch.float32), ((130, 3), torch.float64)])
def test_softmax_is_torchs_to_float_rounding_on_either_path(shape, dtype):
    # few classes over many rows run over a classes-first copy (torch's CPU kernel is 3.5-5.5x slower there)
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=dtype) * 8
    got = A.softmax(z)
    assert got.shape == z.shape and got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, torch.softmax(z, dim=-1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.sum(-1), torch.ones(shape[:-1], dtype=dtype))


def test_softmax_of_extreme_logits_is_one_hot():
    z = torch.zeros(5, 64, 10)
    z[..., 3] = 3e38
    z[..., 7] = -3e38
    p = A.softmax(z)
    assert torch.isfinite(p).all() and torch.equal(p[..., 3], torch.ones(5, 64)) and float(p[..., 7].max()) == 0.0
