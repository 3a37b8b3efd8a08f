"""The GRPO loss as pure functions: advantages, token log-probs, the clipped objective and the KL term."""

from __future__ import annotations

import pytest
import torch

from qwenlab.train.grpo.loss import group_advantages, grpo_loss, pack_batch, token_logprobs


def test_group_advantages_are_normalised_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 4)
    first = rewards[:4]
    assert torch.allclose(adv[:4], (first - first.mean()) / (first.std() + 1e-4))
    assert torch.all(adv[4:] == 0)  # a group that all scored the same teaches nothing


def test_pack_batch_masks_exactly_the_completion_targets():
    packed = pack_batch([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], torch.tensor([1.0, -1.0]), pad_id=0)
    assert packed.tokens.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    # position t predicts token t+1: row 0 targets 5, 6 at positions 2, 3; row 1 targets 7, 8, 9 at 0, 1, 2
    assert packed.completion_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]


def test_token_logprobs_gathers_the_next_token():
    logits = torch.randn(2, 4, 6)
    tokens = torch.randint(0, 6, (2, 4))
    expected = torch.log_softmax(logits[:, :-1] / 0.7, -1).gather(2, tokens[:, 1:, None]).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, tokens, temperature=0.7), expected)


def test_loss_is_the_token_mean_of_minus_advantage_at_ratio_one():
    logprobs = torch.randn(3, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.float32)
    advantages = torch.tensor([1.0, -0.5, 2.0])
    loss, _ = grpo_loss(logprobs, mask, advantages)
    expected = -(advantages[:, None] * mask).sum() / mask.sum()
    assert torch.allclose(loss, expected)
    loss.backward()
    # d loss / d logp = -A / N on completion tokens, 0 elsewhere
    assert torch.allclose(logprobs.grad, -advantages[:, None] * mask / mask.sum())


def test_clipping_stops_the_gradient_beyond_one_plus_epsilon():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.5, -0.5]], requires_grad=True)  # ratios e^0.5 > 1.2 and e^-0.5 < 0.8
    loss, _ = grpo_loss(new, torch.ones(1, 2), torch.tensor([1.0]), old_logprobs=old, epsilon=0.2)
    loss.backward()
    assert new.grad[0, 0] == 0  # positive advantage, ratio above 1 + eps: clipped
    assert new.grad[0, 1] != 0  # below 1 - eps with a positive advantage: min() keeps the unclipped term


def test_kl_term_is_zero_at_the_reference_and_positive_away_from_it():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    mask = torch.ones(1, 2)
    _, info = grpo_loss(logp, mask, torch.zeros(1), ref_logprobs=logp.clone(), beta=0.1)
    assert info["kl"] == pytest.approx(0.0)
    _, info = grpo_loss(logp, mask, torch.zeros(1), ref_logprobs=logp + 0.3, beta=0.1)
    assert info["kl"] > 0
    with pytest.raises(ValueError):
        grpo_loss(logp, mask, torch.zeros(1), beta=0.1)


def test_num_tokens_normaliser_supports_micro_batches():
    logprobs = torch.randn(4, 3)
    mask = torch.ones(4, 3)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    whole, _ = grpo_loss(logprobs, mask, adv)
    halves = [grpo_loss(logprobs[i:i + 2], mask[i:i + 2], adv[i:i + 2], num_tokens=12)[0] for i in (0, 2)]
    assert torch.allclose(whole, sum(halves))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_selected_token_logprobs_equal_the_full_logits_ones_and_their_gradients(temperature, chunk_rows):
    """The chunked head on the marked positions gives token_logprobs' values there, 0 elsewhere, and the same
    gradients for the hidden states and (when it is trained) the head's weight."""
    from qwenlab.train.grpo.loss import selected_token_logprobs

    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    weight = (torch.randn(50, 16, generator=g) * 0.5).requires_grad_(True)
    tokens = torch.randint(0, 50, (3, 7), generator=g)
    mask = (torch.rand(3, 6, generator=g) > 0.4).float()
    mask[2] = 0  # a row with nothing to train on
    upstream = torch.randn(3, 6, generator=g)
    expected = token_logprobs(hidden @ weight.t(), tokens, temperature) * mask
    got = selected_token_logprobs(hidden, weight, tokens, mask, temperature, chunk_rows=chunk_rows)
    assert torch.allclose(got, expected, atol=1e-5) and bool((got[mask == 0] == 0).all())
    grads_expected = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    grads_got = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    for a, b in zip(grads_got, grads_expected):
        assert torch.allclose(a, b, atol=1e-5)
    assert grads_expected[0].abs().max() > 0  # not trivially equal
