"""Distillation losses: pure functions on tensors.

Shapes: ``B`` examples, ``L`` tokens, ``H`` hidden size (all heads concatenated, as a q/k/v projection
outputs it), ``h`` heads. ``mask`` is the attention mask ``(B, L)``, 1 for a real token and 0 for padding.
Padding never contributes: padded keys get probability exactly 0, padded queries and tokens are left out of
the averages, so adding pad tokens to a batch leaves every loss unchanged.

Every function computes in float32 (whatever the inputs' dtype) and returns a scalar. The KL terms are
KL(teacher || student): ``sum p_teacher * (log p_teacher - log p_student)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) x T^2, averaged over examples.

    ``(B, C)`` logits (sequence classification), or ``(B, L, C)`` (token classification: averaged over the
    real tokens of ``mask``). With a single output (regression), the mean squared error of the logits instead.
    """
    s, t = _f32(student), _f32(teacher)
    if s.shape != t.shape:
        raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ in shape")
    if s.shape[-1] == 1:
        per_row = (s - t).pow(2).squeeze(-1)
    else:
        log_ps = F.log_softmax(s / temperature, dim=-1)
        log_pt = F.log_softmax(t / temperature, dim=-1)
        per_row = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * temperature**2
    if per_row.dim() == 2:  # (B, L): token-level
        if mask is None:
            return per_row.mean()
        m = mask.to(per_row.dtype)
        return (per_row * m).sum() / m.sum().clamp(min=1)
    return per_row.mean()


def span_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Extractive QA: ``(B, L, 2)`` start and end logits; the KL between the teacher's and the student's
    distributions over the real tokens (softmax along the sequence, at ``temperature``), x T^2, averaged over the
    examples and the two ends."""
    s, t = _f32(student), _f32(teacher)
    if s.shape != t.shape:
        raise ValueError(f"student span logits {tuple(s.shape)} and teacher's {tuple(t.shape)} differ in shape")
    keep = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device) if mask is None else mask.bool()
    keep = keep.unsqueeze(-1)
    low = torch.finfo(s.dtype).min
    log_ps = F.log_softmax((s / temperature).masked_fill(~keep, low), dim=1)
    log_pt = F.log_softmax((t / temperature).masked_fill(~keep, low), dim=1)
    per_end = torch.where(keep, log_pt.exp() * (log_pt - log_ps), torch.zeros_like(log_ps)).sum(1)  # (B, 2)
    return per_end.mean() * temperature**2


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore: int = -100) -> torch.Tensor:
    """Cross-entropy ``(B, C)`` logits against class ids, averaged over the examples whose label is not
    ``ignore``; 0 (still part of the graph) when none has one."""
    keep = labels != ignore
    if not keep.any():
        return _f32(logits).sum() * 0.0
    return F.cross_entropy(_f32(logits)[keep], labels[keep])


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Pooled sentence embeddings ``(B, D)``: ``cosine``, 1 - cos(student, teacher) averaged over the examples;
    ``mse``, the squared difference averaged over examples and dimensions."""
    s, t = _f32(student), _f32(teacher)
    if s.shape != t.shape:
        raise ValueError(f"student embeddings {tuple(s.shape)} and teacher embeddings {tuple(t.shape)} differ in shape")
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()
    if kind == "mse":
        return (s - t).pow(2).mean()
    raise ValueError(f"embedding loss {kind!r}: expected cosine or mse")


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Mean squared error over the real tokens and the hidden units; ``student`` already projected to the
    teacher's hidden size. ``normalize``: the squared error divided by the teacher's squared norm over the same
    tokens (SquareHead), a relative error that does not depend on the layer's scale."""
    s, t = _f32(student), _f32(teacher)
    if s.shape != t.shape:
        raise ValueError(f"student hidden states {tuple(s.shape)} and teacher's {tuple(t.shape)} differ in shape")
    m = mask.to(s.dtype).unsqueeze(-1)
    err = ((s - t).pow(2) * m).sum()
    if normalize:
        return err / (t.pow(2) * m).sum().clamp(min=1e-12)
    return err / (m.sum().clamp(min=1) * s.shape[-1])


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, L, H)`` -> ``(B, heads, L, H / heads)``."""
    b, n, hidden = x.shape
    if hidden % num_heads:
        raise ValueError(f"{num_heads} heads do not divide the hidden size {hidden}")
    return x.reshape(b, n, num_heads, hidden // num_heads).transpose(1, 2)


def relation_log_probs(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """log softmax(A_r B_r^T / sqrt(d_r)) per head r, padded keys masked out: ``(B, heads, L, L)``.

    With A = Q and B = K this is the self-attention distribution (before dropout); with A = B = V the
    MiniLM value relation.
    """
    a, b = split_heads(_f32(a), num_heads), split_heads(_f32(b), num_heads)
    scores = a @ b.transpose(-1, -2) / math.sqrt(a.shape[-1])
    keys = mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~keys, torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def relation_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) between two ``(B, heads, L, L)`` row distributions (log-probabilities), summed
    over the keys, averaged over the heads and the real query tokens."""
    if teacher_logp.shape != student_logp.shape:
        raise ValueError(f"teacher relations {tuple(teacher_logp.shape)} and student relations "
                         f"{tuple(student_logp.shape)} differ in shape")
    keys = mask.bool()[:, None, None, :]
    elementwise = teacher_logp.exp() * (teacher_logp - student_logp)
    per_query = torch.where(keys, elementwise, torch.zeros_like(elementwise)).sum(-1)  # (B, heads, L)
    queries = mask.to(per_query.dtype)[:, None, :]
    return (per_query * queries).sum() / (queries.sum().clamp(min=1) * per_query.shape[1])


def attention_kl(teacher_q: torch.Tensor, teacher_k: torch.Tensor, student_q: torch.Tensor,
                 student_k: torch.Tensor, mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """KL between the self-attention distributions softmax(Q K^T / sqrt(d_head)) of teacher and student,
    per head (both with ``num_heads`` heads; their head sizes may differ)."""
    return relation_kl(relation_log_probs(teacher_q, teacher_k, mask, num_heads),
                       relation_log_probs(student_q, student_k, mask, num_heads), mask)


def self_relation_kl(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor,
                     num_heads: int) -> torch.Tensor:
    """KL between the self-relations softmax(X_r X_r^T / sqrt(d_r)) of teacher and student, with the hidden
    units of each split into ``num_heads`` relation heads (the MiniLM value relation with the model's heads;
    MiniLMv2's q-q, k-k, v-v relations with the relation heads)."""
    return relation_kl(relation_log_probs(teacher, teacher, mask, num_heads),
                       relation_log_probs(student, student, mask, num_heads), mask)
