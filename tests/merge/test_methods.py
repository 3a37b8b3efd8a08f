"""Each merge method on small hand-computed tensors."""

import math

import pytest
import torch

from qwenlab.errors import QwenlabError
from qwenlab.merge.methods import METHODS
from qwenlab.merge.methods.sparsify import keep_largest_, keep_middle_, keep_random_, rank_band_mask

T = torch.tensor


def run(name, tensors, **params):
    method = METHODS[name]
    full = {p.name: p.default for p in method.parameters if not p.required}
    full.update(params)
    return method.function([t.float() for t in tensors], full)


def test_linear_normalized_and_not():
    x, y = T([1.0, 2.0]), T([3.0, 6.0])
    assert torch.allclose(run("linear", [x, y], weight=[1.0, 3.0]), T([2.5, 5.0]))
    assert torch.allclose(run("linear", [x, y], weight=[1.0, 3.0], normalize=False), T([10.0, 20.0]))
    with pytest.raises(QwenlabError, match="sum to 0"):
        run("linear", [x, y], weight=[1.0, -1.0])


def test_slerp_orthogonal_vectors_follow_the_arc():
    v0, v1 = T([1.0, 0.0]), T([0.0, 1.0])
    out = run("slerp", [v0, v1], t=0.5)
    assert torch.allclose(out, T([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)
    assert torch.allclose(run("slerp", [v0, v1], t=0.0), v0) and torch.allclose(run("slerp", [v0, v1], t=1.0), v1)
    # the angle is split in proportion to t: at t = 1/3 the result is 30° from v0
    out = run("slerp", [v0, v1], t=1 / 3)
    assert torch.allclose(out, T([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)


def test_slerp_nearly_colinear_vectors_interpolate_linearly():
    # cos θ ≈ 0.99995 > 0.9995: sin θ is tiny, so mergekit (and we) fall back to (1−t)·v0 + t·v1
    v0, v1 = T([1.0, 0.0, 0.0]), T([1.0, 0.01, 0.0]) * 2
    out = run("slerp", [v0, v1], t=0.25)
    assert torch.allclose(out, 0.75 * v0 + 0.25 * v1)
    assert torch.isfinite(out).all()
    # identical and opposite directions too: no NaN from arccos(±1)
    assert torch.allclose(run("slerp", [v0, 3 * v0], t=0.5), 2 * v0)
    assert torch.allclose(run("slerp", [v0, -v0], t=0.5), torch.zeros(3))


def test_slerp_uses_unnormalized_magnitudes():
    v0, v1 = T([2.0, 0.0]), T([0.0, 4.0])
    out = run("slerp", [v0, v1], t=0.5)
    assert torch.allclose(out, math.sqrt(0.5) * (v0 + v1), atol=1e-6)


def test_task_arithmetic_weights_normalize_and_lambda():
    base, x, y = T([1.0, 1.0]), T([2.0, 1.0]), T([1.0, 4.0])
    out = run("task_arithmetic", [base, x, y], weight=[1.0, 0.5], **{"lambda": 2.0})
    assert torch.allclose(out, base + 2 * (T([1.0, 0.0]) + 0.5 * T([0.0, 3.0])))
    out = run("task_arithmetic", [base, x, y], weight=[1.0, 0.5], normalize=True)
    assert torch.allclose(out, base + (T([1.0, 0.0]) + 0.5 * T([0.0, 3.0])) / 1.5)


def test_ties_sign_election_by_total_weighted_magnitude():
    base = torch.zeros(4)
    x = T([3.0, -1.0, 2.0, 0.0])
    y = T([-1.0, -1.0, -5.0, 1.0])
    z = T([-1.0, 2.0, 1.0, -1.0])
    out = run("ties", [base, x, y, z], weight=[1.0, 1.0, 1.0], density=[1.0, 1.0, 1.0])
    # entry 0: sum +1 -> + wins by magnitude though 2 of 3 models vote −: only x's 3 survives.
    # entry 1: sum 0 -> ties go to +: only z's 2.  entry 2: sum −2 -> −: y's −5.
    # entry 3: sum 0 -> +: y's 1 (x's trimmed-to-zero entry never votes or counts in the mean).
    assert torch.allclose(out, T([3.0, 2.0, -5.0, 1.0]))
    # with normalize off the agreeing entries are summed, not averaged
    both = run("ties", [base, T([1.0, 2.0, 0, 0]), T([3.0, 4.0, 0, 0])], weight=[1.0, 1.0], density=[1.0, 1.0])
    assert torch.allclose(both, T([2.0, 3.0, 0, 0]))
    summed = run("ties", [base, T([1.0, 2.0, 0, 0]), T([3.0, 4.0, 0, 0])], weight=[1.0, 1.0],
                 density=[1.0, 1.0], normalize=False)
    assert torch.allclose(summed, T([4.0, 6.0, 0, 0]))


def test_ties_weights_apply_before_the_election():
    base = torch.zeros(1)
    out = run("ties", [base, T([1.0]), T([-3.0])], weight=[5.0, 1.0], density=[1.0, 1.0])
    assert torch.allclose(out, T([1.0]))  # 5·1 outweighs 1·(−3): + is elected, x alone survives (5/5)


def test_ties_trims_to_the_largest_magnitudes():
    base = T([0.0, 0.0, 0.0, 0.0])
    x = T([0.1, -0.4, 0.3, 0.2])
    out = run("ties", [base, x], weight=[1.0], density=[0.5])
    assert torch.allclose(out, T([0.0, -0.4, 0.3, 0.0]))
    # density keeps at least one entry
    assert torch.count_nonzero(keep_largest_(x.clone(), 0.01)) == 1


def test_rank_band_mask_keeps_exact_counts_with_ties():
    values = T([1.0, 2.0, 2.0, 2.0, 3.0])
    assert rank_band_mask(values, 3, 5).tolist() == [False, False, False, True, True]
    assert rank_band_mask(values, 1, 3).tolist() == [False, True, True, False, False]
    assert rank_band_mask(values, 0, 5).all() and not rank_band_mask(values, 2, 2).any()


def test_breadcrumbs_drops_outliers_and_small_entries():
    delta = T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    kept = keep_middle_(delta.clone(), density=0.5, gamma=0.2)  # drop the 2 largest and the 3 smallest
    assert kept.tolist() == [0, 0, 0, -4.0, 5.0, -6.0, 7.0, -8.0, 0, 0]
    out = run("breadcrumbs", [torch.zeros(10), delta], weight=[1.0], density=[0.5], gamma=[0.2])
    assert torch.allclose(out, kept)
    # density + gamma > 1: outlier removal shrinks so that density·n entries remain
    assert torch.count_nonzero(keep_middle_(delta.clone(), density=0.9, gamma=0.5)) == 9


def test_dare_keeps_a_fraction_and_restores_the_l1_norm():
    delta = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    kept = keep_random_(delta.clone(), density=0.3, seed=7)
    assert abs(torch.count_nonzero(kept).item() / delta.numel() - 0.3) < 0.01
    assert math.isclose(kept.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-4)
    assert torch.equal(kept, keep_random_(delta.clone(), density=0.3, seed=7))  # the seed fixes the mask
    assert not torch.equal(kept, keep_random_(delta.clone(), density=0.3, seed=8))
    base = torch.zeros_like(delta)
    out = run("dare_linear", [base, base + delta], weight=[1.0], density=[0.3], seeds=[7])
    assert torch.equal(out, kept)


def test_model_stock_ratio_from_the_angle():
    base = torch.zeros(2)
    x, y = T([1.0, 0.0]), T([0.0, 1.0])  # orthogonal task vectors: cos = 0, t = 0, stay at the base
    assert torch.allclose(run("model_stock", [base, x, y]), base)
    x, y = T([1.0, 1.0]), T([1.0, 1.0])  # parallel: cos = 1, t = 2/2 = 1, the average
    assert torch.allclose(run("model_stock", [base, x, y]), T([1.0, 1.0]))
    x, y = T([1.0, 0.0]), T([0.5, 0.5 * math.sqrt(3)])  # 60°: c = 0.5, t = 2·0.5/1.5
    expected = (2 / 3) * (x + y) / 2
    assert torch.allclose(run("model_stock", [base, x, y]), expected, atol=1e-6)


def test_passthrough_and_nuslerp():
    x = T([1.0, -2.0])
    assert torch.equal(run("passthrough", [x], scale=[None]), x)
    assert torch.allclose(run("passthrough", [x], scale=[0.5]), x * 0.5)
    v0, v1 = T([1.0, 0.0]), T([0.0, 1.0])
    out = run("nuslerp", [v0, v1], weight=[1.0, 1.0])
    assert torch.allclose(out, T([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)
    with_base = run("nuslerp", [T([1.0, 1.0]), T([2.0, 1.0]), T([1.0, 2.0])], weight=[1.0, 1.0])
    assert torch.allclose(with_base, T([1.0, 1.0]) + math.sqrt(0.5), atol=1e-6)


def test_every_method_has_a_docstring_with_its_formula_and_source():
    for method in METHODS.values():
        doc = method.function.__doc__ or ""
        assert "=" in doc or "copy" in doc.lower(), method.name
        assert method.reference, method.name


def test_rank_band_mask_equals_a_stable_sort_on_data_with_many_ties():
    values = torch.randint(0, 50, (5000,), generator=torch.Generator().manual_seed(1)).float()
    ranks = torch.empty(5000, dtype=torch.long)
    ranks[torch.sort(values, stable=True).indices] = torch.arange(5000)
    for start, stop in ((0, 1234), (1000, 5000), (700, 4100), (2500, 2501)):
        assert torch.equal(rank_band_mask(values, start, stop), (ranks >= start) & (ranks < stop))


def test_rank_band_mask_with_one_tied_value_at_both_ends():
    values = T([5.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    assert rank_band_mask(values, 0, 3).tolist() == [False, True, True, False, False, True]
    assert rank_band_mask(values, 2, 4).tolist() == [False, False, True, True, False, False]
