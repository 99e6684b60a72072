"""Losses as pure functions of tensors: no config, no I/O, each testable by hand.

Shapes: logits ``[batch, time, vocab]``; ``mask`` ``[batch, time]`` is 1 on the tokens that
count (response tokens) and 0 elsewhere. Per-token functions return ``[batch, time]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (0 when the mask is empty, never NaN)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def forward_kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) at every position: mass-covering, the classic KD objective."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def reverse_kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(student || teacher) at every position: mode-seeking, the on-policy distillation objective."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return (s.exp() * (s - t)).sum(-1)


def generalized_jsd_per_token(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024, Eq. 1).

    With the mixture ``m = beta * teacher + (1 - beta) * student``:
    ``beta * KL(teacher || m) + (1 - beta) * KL(student || m)``. ``beta = 0`` is forward KL and
    ``beta = 1`` reverse KL (the limits, as in TRL's GKD trainer).
    """
    if beta <= 0.0:
        return forward_kl_per_token(student_logits, teacher_logits, temperature)
    if beta >= 1.0:
        return reverse_kl_per_token(student_logits, teacher_logits, temperature)
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    b = torch.tensor(beta, dtype=s.dtype, device=s.device)
    m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
    kl_teacher = (t.exp() * (t - m)).sum(-1)
    kl_student = (s.exp() * (s - m)).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def divergence_per_token(
    kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """One of ``DIVERGENCES`` at every position."""
    if kind == "forward_kl":
        return forward_kl_per_token(student_logits, teacher_logits, temperature)
    if kind == "reverse_kl":
        return reverse_kl_per_token(student_logits, teacher_logits, temperature)
    if kind == "jsd":
        return generalized_jsd_per_token(student_logits, teacher_logits, beta, temperature)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCES}")


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of ``targets`` ``[batch, time]`` under ``logits`` at every position."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)


def response_logits(logits: torch.Tensor, start: torch.Tensor, length: int) -> torch.Tensor:
    """The logits that predict a response: for each row ``b``, positions
    ``start[b]-1 .. start[b]+length-2`` (the token before each response token predicts it).

    This aligns two views of one response whose prompts differ in length: gather each
    view's response logits by its own ``start`` and compare them position by position.
    """
    idx = (start.view(-1, 1) - 1 + torch.arange(length, device=logits.device).view(1, -1)).clamp(0, logits.shape[1] - 1)
    return logits.gather(1, idx.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


# --------------------------------------------------------------------------- GSPO


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages ``(r - mean_group) / (std_group + eps)`` for ``rewards``
    ``[groups * group_size]`` laid out group by group (the completions of one prompt are
    consecutive). ``std`` is the sample standard deviation (Bessel-corrected, as in TRL);
    ``scale=False`` only centres (Dr. GRPO)."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def sequence_log_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sequence ``[batch]``: the mean over its response tokens of ``log pi(y_t) - log pi_old(y_t)``,
    i.e. the log of GSPO's length-normalised sequence importance ratio (0 for an empty mask)."""
    mask = mask.to(logps.dtype)
    return ((logps - old_logps) * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def gspo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    epsilon_low: float = 3e-4,
    epsilon_high: float = 4e-4,
    scale_rewards: bool = True,
) -> torch.Tensor:
    """Group Sequence Policy Optimization loss (Zheng et al. 2025, arXiv 2507.18071, Eq. 5-7).

    ``logps`` / ``old_logps`` ``[batch, time]``: log-probabilities of the sampled response tokens
    under the current policy and under the policy that sampled them; ``mask`` marks the response
    tokens; ``rewards`` ``[batch]``, ``group_size`` consecutive completions per prompt.

    ``s_i = exp(mean_t log(pi / pi_old))`` is one importance ratio per sequence, clipped to
    ``[1 - epsilon_low, 1 + epsilon_high]``; the loss is
    ``-mean_i min(s_i * A_i, clip(s_i) * A_i)`` with group-normalised advantages ``A_i``.
    Sequences with no response tokens contribute 0 (and still count in the mean, as in TRL).
    """
    return gspo_loss_from_log_ratio(
        sequence_log_ratio(logps, old_logps, mask), rewards, group_size, (mask.sum(-1) > 0),
        epsilon_low, epsilon_high, scale_rewards,
    )


def gspo_loss_from_log_ratio(
    log_ratio: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    has_tokens: torch.Tensor,
    epsilon_low: float = 3e-4,
    epsilon_high: float = 4e-4,
    scale_rewards: bool = True,
) -> torch.Tensor:
    """`gspo_loss` from per-sequence length-normalised log ratios ``[batch]`` (for policies
    whose log-probs come per sequence, e.g. the Talker's: ``(logp - old_logp) / tokens``)."""
    advantages = group_advantages(rewards.to(log_ratio.dtype), group_size, scale=scale_rewards)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    objective = torch.minimum(ratio * advantages, clipped * advantages)
    return -(objective * has_tokens.to(log_ratio.dtype)).mean()


# --------------------------------------------------------------------------- DPO


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023), sigmoid form as in TRL's
    ``loss_type="sigmoid"`` with conservative label smoothing.

    Inputs ``[pairs]``: summed log-probabilities of the chosen / rejected sequences under the
    policy and the frozen reference. With implicit rewards
    ``r = beta * (log pi - log pi_ref)``, the loss is
    ``mean(-(1 - eps) log sigmoid(r_c - r_r) - eps log sigmoid(r_r - r_c))``.
    Returns ``(loss, chosen rewards, rejected rewards)``; a pair is ranked right when its
    chosen reward exceeds its rejected one (preference accuracy).
    """
    import torch.nn.functional as F

    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    margin = chosen - rejected
    losses = -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses.mean(), chosen.detach(), rejected.detach()
