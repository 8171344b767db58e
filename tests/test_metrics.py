"""pyvarinf2.metrics against hand computations, numpy and scipy."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp
from scipy.stats import mannwhitneyu, norm

from pyvarinf2 import metrics

PROBS = np.array([[0.7, 0.2, 0.1],
                  [0.1, 0.3, 0.6],
                  [0.25, 0.5, 0.25]])
LABELS = np.array([0, 2, 0])


def _random_probs(rng, n, k):
    logits = rng.normal(scale=2.0, size=(n, k))
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def _ece_loop(probs, labels, n_bins=15):
    """Textbook ECE (Guo et al. 2017): bins (lo, hi] over linspace(0, 1, M + 1)."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return total


def test_accuracy_nll_brier_by_hand():
    assert metrics.accuracy(PROBS, LABELS) == pytest.approx(2 / 3)
    assert metrics.nll(PROBS, LABELS) == pytest.approx(
        -(math.log(0.7) + math.log(0.6) + math.log(0.25)) / 3, rel=1e-12)
    # (0.3² + 0.2² + 0.1²) + (0.1² + 0.3² + 0.4²) + (0.75² + 0.5² + 0.25²), / 3
    assert metrics.brier_score(PROBS, LABELS) == pytest.approx(
        (0.14 + 0.26 + 0.875) / 3, rel=1e-12)


def test_metrics_accept_torch_and_agree_with_numpy():
    rng = np.random.default_rng(0)
    p = _random_probs(rng, 200, 10)
    y = rng.integers(0, 10, 200)
    onehot = np.eye(10)[y]
    assert metrics.accuracy(torch.tensor(p), torch.tensor(y)) == pytest.approx(
        np.mean(p.argmax(1) == y))
    assert metrics.nll(torch.tensor(p), torch.tensor(y)) == pytest.approx(
        -np.mean(np.log(p[np.arange(200), y])), rel=1e-12)
    assert metrics.brier_score(p, y) == pytest.approx(np.mean(np.sum((p - onehot) ** 2, 1)),
                                                      rel=1e-12)


def test_ece_by_hand():
    # confidences 0.7, 0.6, 0.5 in distinct bins; correct, correct, wrong
    # ECE = (|1 - .7| + |1 - .6| + |0 - .5|) / 3 = 0.4
    assert metrics.expected_calibration_error(PROBS, LABELS) == pytest.approx(0.4)
    # all predictions at confidence 0.9 and all correct: one bin, gap 0.1
    p = np.tile([0.9, 0.1], (50, 1))
    assert metrics.ece(p, np.zeros(50, dtype=int)) == pytest.approx(0.1)
    # 9 of 10 correct at confidence 0.9: perfectly calibrated
    y = np.zeros(10, dtype=int)
    y[3] = 1
    assert metrics.ece(np.tile([0.9, 0.1], (10, 1)), y) == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), n=st.integers(1, 300), k=st.integers(2, 12),
       n_bins=st.sampled_from([1, 5, 10, 15]))
def test_ece_matches_textbook_loop(seed, n, k, n_bins):
    rng = np.random.default_rng(seed)
    p = _random_probs(rng, n, k)
    y = rng.integers(0, k, n)
    assert metrics.ece(p, y, n_bins=n_bins) == pytest.approx(_ece_loop(p, y, n_bins), abs=1e-12)


def test_calibration_bins_edges_go_to_the_lower_bin():
    # confidence exactly 1/3 (a bin edge with 15 bins is 5/15) belongs to (4/15, 5/15]
    p = np.array([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]])
    conf, acc, counts = metrics.calibration_bins(p, np.array([0, 0]), n_bins=15)
    assert counts[4] == 1 and counts[14] == 1 and counts.sum() == 2
    assert conf[4] == pytest.approx(1 / 3) and acc[14] == 1.0
    assert np.isnan(conf[0])


def test_rmse_against_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert metrics.rmse(a, b) == pytest.approx(np.sqrt(np.mean((a - b) ** 2)), rel=1e-12)
    assert metrics.rmse([1.0, 2.0], [1.0, 4.0]) == pytest.approx(math.sqrt(2.0))


def test_gaussian_log_likelihood_against_scipy():
    rng = np.random.default_rng(2)
    S, n = 7, 40
    y = rng.normal(size=n)
    mu = rng.normal(size=(S, n))
    sd = rng.uniform(0.2, 2.0, size=(S, n))
    expected = np.mean(logsumexp(norm.logpdf(y[None], mu, sd), axis=0) - math.log(S))
    assert metrics.gaussian_log_likelihood(y, mu, sd) == pytest.approx(expected, rel=1e-12)
    # one Gaussian per point
    assert metrics.gaussian_log_likelihood(y, mu[0], sd[0]) == pytest.approx(
        np.mean(norm.logpdf(y, mu[0], sd[0])), rel=1e-12)
    # a per-sample noise std (S, 1) broadcasts
    s1 = rng.uniform(0.5, 1.5, size=(S, 1))
    expected = np.mean(logsumexp(norm.logpdf(y[None], mu, s1), axis=0) - math.log(S))
    assert metrics.gaussian_log_likelihood(torch.tensor(y), torch.tensor(mu),
                                           torch.tensor(s1)) == pytest.approx(expected, rel=1e-12)


def test_gaussian_log_likelihood_is_stable_far_in_the_tails():
    # every density underflows in float64 (exp(-5e5)); the logmeanexp must not
    y = np.array([1000.0])
    mu = np.array([[0.0], [1.0]])
    sd = np.ones((2, 1))
    expected = logsumexp(norm.logpdf(1000.0, [0.0, 1.0], 1.0)) - math.log(2)
    got = metrics.gaussian_log_likelihood(y, mu, sd)
    assert math.isfinite(got) and got == pytest.approx(expected, rel=1e-12)


def test_ood_auroc_simple_cases():
    assert metrics.ood_auroc([0.1, 0.2, 0.3], [0.5, 0.6]) == 1.0
    assert metrics.ood_auroc([0.5, 0.6], [0.1, 0.2, 0.3]) == 0.0
    assert metrics.ood_auroc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5
    # out = {2, 3}, in = {1, 2}: pairs (2>1) (2=2 -> 1/2) (3>1) (3>2) = 3.5 / 4
    assert metrics.ood_auroc([1, 2], [2, 3]) == pytest.approx(0.875)


@settings(max_examples=40, deadline=None)
@given(a=st.lists(st.integers(0, 6), min_size=1, max_size=40),
       b=st.lists(st.integers(0, 6), min_size=1, max_size=40))
def test_ood_auroc_equals_mann_whitney_u_over_n1n2(a, b):
    s_in, s_out = np.array(a, float), np.array(b, float)
    u = mannwhitneyu(s_out, s_in, alternative="two-sided").statistic
    got = metrics.ood_auroc(s_in, s_out)
    assert got == pytest.approx(u / (len(a) * len(b)), abs=1e-12)
    # and the pairwise definition P(out > in) + P(out = in) / 2
    diff = s_out[:, None] - s_in[None, :]
    assert got == pytest.approx(np.mean((diff > 0) + 0.5 * (diff == 0)), abs=1e-12)


def test_predictive_entropy():
    p = np.array([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    np.testing.assert_allclose(metrics.predictive_entropy(p),
                               [math.log(2), 0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call", [
    lambda: metrics.accuracy(np.ones(3), [0, 1, 2]),
    lambda: metrics.nll(PROBS, [0, 1]),
    lambda: metrics.brier_score(PROBS, [0, 1, 3]),
    lambda: metrics.ece(PROBS, LABELS, n_bins=0),
    lambda: metrics.rmse([1.0, 2.0], [1.0]),
    lambda: metrics.gaussian_log_likelihood([0.0, 1.0], [[0.0, 1.0]], [[1.0, 0.0]]),
    lambda: metrics.gaussian_log_likelihood([0.0, 1.0], [[0.0, 1.0, 2.0]], 1.0),
    lambda: metrics.ood_auroc([], [1.0]),
    lambda: metrics.ood_auroc([np.nan], [1.0]),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("name", ["accuracy", "nll", "ece", "brier_score"])
@pytest.mark.parametrize("transform", [np.log, lambda p: 3.0 * np.log(p) + 1.0])
def test_logits_and_log_probabilities_are_refused(name, transform):
    # log p (or logits) scored as probabilities gave ECE 1.5, Brier 9.5, NLL 27.6
    with pytest.raises(ValueError, match="softmax"):
        getattr(metrics, name)(transform(PROBS), LABELS)
    with pytest.raises(ValueError, match="softmax"):
        metrics.predictive_entropy(transform(PROBS))


def test_non_finite_inputs_are_refused():
    bad = PROBS.copy()
    bad[1, 0] = np.nan          # not the label's column: nll never read it, accuracy took it
    for f in (metrics.accuracy, metrics.nll, metrics.ece, metrics.brier_score):
        with pytest.raises(ValueError, match="finite"):
            f(bad, LABELS)
    with pytest.raises(ValueError, match="finite"):
        metrics.rmse([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        metrics.gaussian_log_likelihood([1.0, np.nan], [1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="no examples"):
        metrics.gaussian_log_likelihood([], np.zeros((3, 0)), 1.0)


def test_labels_must_be_integers():
    with pytest.raises(ValueError, match="non-integer"):
        metrics.accuracy(PROBS, [0.9, 1.7, 2.2])      # truncated to 0, 1, 2 before: accuracy 1
    with pytest.raises(ValueError, match="booleans"):
        metrics.accuracy(PROBS[:, :2] / PROBS[:, :2].sum(1, keepdims=True),
                         np.array([True, False, True]))
    exact = metrics.accuracy(PROBS, LABELS)
    assert metrics.accuracy(PROBS, LABELS.astype(float)) == exact
    assert metrics.accuracy(torch.tensor(PROBS), torch.tensor(LABELS, dtype=torch.float16)) \
        == exact


def test_bfloat16_and_numpy_integer_bins():
    p = torch.tensor(PROBS, dtype=torch.bfloat16)
    assert metrics.nll(p, LABELS) == pytest.approx(metrics.nll(PROBS, LABELS), abs=5e-3)
    assert metrics.ece(PROBS, LABELS, n_bins=np.int64(10)) == metrics.ece(PROBS, LABELS, 10)
    with pytest.raises(ValueError, match="n_bins"):
        metrics.ece(PROBS, LABELS, n_bins=True)


def test_sample_entropies_refuse_logits_and_no_samples():
    from pyvarinf2 import predict
    probs = torch.softmax(torch.randn(4, 5, 3), -1)
    for f in (predict.predictive_entropy, predict.expected_entropy, predict.mutual_information):
        f(probs)
        with pytest.raises(ValueError, match="softmax"):
            f(torch.log(probs))
        with pytest.raises(ValueError, match="no samples"):
            f(probs[:0])
        with pytest.raises(ValueError, match="finite"):
            f(torch.full_like(probs, float("nan")))
