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
