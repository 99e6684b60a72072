import math

import pytest
import torch

from posttrain.losses import (
    forward_kl_per_token,
    generalized_jsd_per_token,
    masked_mean,
    response_logits,
    reverse_kl_per_token,
    token_nll,
)


def _two_token_logits(p):
    return torch.tensor([[[math.log(p), math.log(1 - p)]]])


def test_forward_and_reverse_kl_match_hand_computation():
    s, t = _two_token_logits(0.8), _two_token_logits(0.5)
    # KL(t || s) = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2)
    fwd = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    # KL(s || t) = 0.8 ln(0.8/0.5) + 0.2 ln(0.2/0.5)
    rev = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert forward_kl_per_token(s, t).item() == pytest.approx(fwd, abs=1e-6)
    assert reverse_kl_per_token(s, t).item() == pytest.approx(rev, abs=1e-6)
    assert reverse_kl_per_token(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_generalized_jsd_matches_hand_computation_and_limits():
    s, t = _two_token_logits(0.9), _two_token_logits(0.3)
    beta = 0.5
    m = [beta * 0.3 + (1 - beta) * 0.9, beta * 0.7 + (1 - beta) * 0.1]
    kl_t = 0.3 * math.log(0.3 / m[0]) + 0.7 * math.log(0.7 / m[1])
    kl_s = 0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1])
    assert generalized_jsd_per_token(s, t, beta).item() == pytest.approx(beta * kl_t + (1 - beta) * kl_s, abs=1e-6)
    assert generalized_jsd_per_token(s, t, 0.0).item() == pytest.approx(forward_kl_per_token(s, t).item())
    assert generalized_jsd_per_token(s, t, 1.0).item() == pytest.approx(reverse_kl_per_token(s, t).item())


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_agrees_with_trl_gkd(beta):
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 1, 2, 3, -100], [4, 5, -100, -100, -100]])
    mask = (labels != -100).float()
    ours = masked_mean(generalized_jsd_per_token(s, t, beta, temperature=2.0), mask)
    theirs = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=2.0)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_token_nll_and_masked_mean():
    logits = torch.log(torch.tensor([[[0.25, 0.75], [0.6, 0.4]]]))
    nll = token_nll(logits, torch.tensor([[1, 0]]))
    assert nll.tolist()[0] == pytest.approx([-math.log(0.75), -math.log(0.6)], abs=1e-6)
    assert masked_mean(nll, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert masked_mean(nll, torch.zeros(1, 2)).item() == 0.0


def test_response_logits_align_views_with_different_prompt_lengths():
    # Two views of the same 2-token response: prompt of 3 tokens vs prompt of 5 tokens.
    vocab = 4
    a = torch.arange(1 * 5 * vocab, dtype=torch.float).view(1, 5, vocab)
    b = torch.arange(1 * 7 * vocab, dtype=torch.float).view(1, 7, vocab) + 1000
    ra = response_logits(a, torch.tensor([3]), 2)
    rb = response_logits(b, torch.tensor([5]), 2)
    # the logits that predict response token j sit at position start - 1 + j
    assert torch.equal(ra[0, 0], a[0, 2]) and torch.equal(ra[0, 1], a[0, 3])
    assert torch.equal(rb[0, 0], b[0, 4]) and torch.equal(rb[0, 1], b[0, 5])


def test_dpo_loss_matches_hand_computation_and_prefers_the_chosen():
    import math

    from posttrain.losses import dpo_loss

    pc, pr = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -19.0])
    rc, rr = torch.tensor([-11.0, -20.0]), torch.tensor([-11.0, -20.0])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 1: margin 0.5 * ((1) - (-1)) = 1.0; pair 2: 0.5 * (0 - 1) = -0.5
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert abs(loss.item() - expected) < 1e-6
    assert torch.allclose(chosen, torch.tensor([0.5, 0.0])) and torch.allclose(rejected, torch.tensor([-0.5, 0.5]))
    smooth, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    expected_smooth = (0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(1.0))
                       + 0.9 * math.log1p(math.exp(0.5)) + 0.1 * math.log1p(math.exp(-0.5))) / 2
    assert abs(smooth.item() - expected_smooth) < 1e-6
    # the gradient raises the chosen log-prob and lowers the rejected one
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    dpo_loss(pc, pr, rc, rr, beta=0.5)[0].backward()
    assert torch.all(pc.grad < 0) and torch.all(pr.grad > 0)


def test_gspo_from_sequence_log_ratios_equals_the_token_form():
    from posttrain.losses import gspo_loss, gspo_loss_from_log_ratio

    g = torch.Generator().manual_seed(0)
    logps, old = torch.randn(4, 6, generator=g) * 0.01 - 2, torch.randn(4, 6, generator=g) * 0.01 - 2
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2])
    token_form = gspo_loss(logps, old, mask, rewards, group_size=2)
    sums = ((logps - old) * mask).sum(-1)
    sequence_form = gspo_loss_from_log_ratio(sums / mask.sum(-1), rewards, 2, mask.sum(-1) > 0)
    assert torch.allclose(token_form, sequence_form)
