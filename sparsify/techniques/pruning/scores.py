"""Block scores for pruning: magnitude, Taylor (first order) and layer-wise OBS (second order).

Every function takes a weight as ``nn.Linear`` stores it, ``(out_features, in_features)``, and a block shape
``(rows, cols)`` in that orientation, and returns one score per block, shaped ``(out / rows, in / cols)``.
A low score means "cheap to remove".

- :func:`magnitude` -- the L1 or L2 norm of the block.
- :func:`taylor` -- the sum over the block of an accumulated |W * grad| (Molchanov et al. 2019; Intel Neural
  Compressor's ``snip_momentum``: score <- momentum x score + |W * grad| after every backward pass).
- :func:`obs_saliency` and :func:`obs_prune` -- layer-wise Optimal Brain Surgeon. With H = X^T X of the
  layer's inputs (:class:`HessianCollector`), the rows of W are independent least-squares problems that share
  H, so removing the weights w_rc (r in a block's rows R, one input column c) costs
  sum_{r in R} w_rc^2 / [H^-1]_cc, and the best correction of row r's kept weights is
  -w_rc H^-1[c, :] / [H^-1]_cc. :func:`obs_prune` applies the closed form for the whole pruned set of a row
  at once (the rows of a block row share it), which is exact for the chosen mask. (A column-by-column pass
  with a Cholesky factor of H^-1, as SparseGPT does for a mask it picks as it goes, was measured worse than no
  correction at all on a fixed block mask: its corrections flow into columns that are pruned later.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

Block = tuple[int, int]


def block_sum(t: torch.Tensor, block: Block) -> torch.Tensor:
    """Sum of ``t`` (out, in) over each ``(rows, cols)`` block: ``(out / rows, in / cols)``."""
    r, c = block
    o, i = t.shape
    return t.reshape(o // r, r, i // c, c).sum(dim=(1, 3))


def magnitude(w: torch.Tensor, block: Block, norm: str = "l2") -> torch.Tensor:
    """L2 (``"l2"``) or L1 (``"l1"``) norm of every block."""
    w = w.detach().float()
    return block_sum(w.square(), block).sqrt() if norm == "l2" else block_sum(w.abs(), block)


def taylor(accumulated: torch.Tensor, block: Block) -> torch.Tensor:
    """Sum over each block of the accumulated |W * grad| (first-order estimate of the loss change)."""
    return block_sum(accumulated.float(), block)


@torch.no_grad()
def accumulate_taylor(acc: torch.Tensor | None, weight: torch.Tensor, grad: torch.Tensor, momentum: float) -> torch.Tensor:
    """``momentum * acc + |weight * grad|`` (float32, in place when ``acc`` is given)."""
    fresh = (weight.detach().float() * grad.float()).abs_()
    if acc is None:
        return fresh
    return acc.mul_(momentum).add_(fresh)


class HessianCollector:
    """Accumulates H = sum over real tokens of x x^T of the inputs of some Linear layers (float64).

        with HessianCollector(modules) as hc:
            for batch in batches:
                hc.set_mask(batch["attention_mask"]); model(**batch)
        H = hc.hessians      # name -> (in, in) float64, on the CPU
        n = hc.tokens        # tokens seen

    Padding tokens are left out when a mask is set (``set_mask`` before each forward pass).
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.hessians: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    def set_mask(self, attention_mask: torch.Tensor | None) -> None:
        self._mask = None if attention_mask is None else attention_mask.bool()
        if self._mask is not None:
            self.tokens += int(self._mask.sum())

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            if self._mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self._mask.shape):
                x = x[self._mask.to(x.device)]
            x = x.reshape(-1, x.shape[-1]).to(dtype=torch.float64, device="cpu")
            h = x.T @ x
            if name in self.hessians:
                self.hessians[name] += h
            else:
                self.hessians[name] = h
        return hook

    def __enter__(self) -> "HessianCollector":
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _damped(h: torch.Tensor, damping: float) -> torch.Tensor:
    h = h.clone()
    dead = torch.diag(h) == 0  # an input that is always 0: its weights do not matter; keep H invertible
    h[dead, dead] = 1.0
    mean = torch.diag(h).mean()
    h += torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * (damping * mean)
    return h


def inverse_hessian(h: torch.Tensor, damping: float) -> torch.Tensor:
    """(H + damping x mean(diag H) x I)^-1, float64."""
    return torch.cholesky_inverse(torch.linalg.cholesky(_damped(h, damping)))


def obs_saliency(w: torch.Tensor, hinv_diag: torch.Tensor, block: Block) -> torch.Tensor:
    """OBS cost of removing each (r x 1) block: sum over its rows of w_rc^2 / [H^-1]_cc."""
    if block[1] != 1:
        raise ValueError(f"OBS scores need blocks of one input column (r x 1, out x in), got {block[0]}x{block[1]}")
    w = w.detach().to(torch.float64)
    return block_sum(w.square() / hinv_diag.to(w.device).unsqueeze(0), block)


@torch.no_grad()
def obs_prune(w: torch.Tensor, keep: torch.Tensor, h: torch.Tensor, damping: float) -> torch.Tensor:
    """Zero the weights where ``keep`` (bool, same shape as ``w``) is False and give the kept weights of every
    row their optimal values, minimising ||(W_new - W) X^T||^2 with H = X^T X (damped): the OBS closed form for
    removing the whole pruned set at once, w_K <- w H[:, K] H[K, K]^-1 for the kept columns K of a row.
    Rows with the same kept columns (the rows of an (r x 1) block row) share one solve. Returns the new weight
    (float32, on ``w``'s device); pruned entries are exactly 0."""
    device = w.device
    W = w.detach().to(dtype=torch.float64, device="cpu")
    keep = keep.to("cpu")
    hd = _damped(h.to(torch.float64), damping)
    out = torch.zeros_like(W)
    groups: dict[bytes, list[int]] = {}
    for r in range(W.shape[0]):
        groups.setdefault(keep[r].numpy().tobytes(), []).append(r)
    for rows in groups.values():
        cols = keep[rows[0]].nonzero().flatten()
        if len(cols) == 0:
            continue
        rhs = W[rows] @ hd[:, cols]  # (rows, |K|)
        out[torch.tensor(rows).unsqueeze(1), cols.unsqueeze(0)] = torch.linalg.solve(hd[cols][:, cols], rhs.T).T
    return out.to(dtype=torch.float32, device=device)


def output_energy(w: torch.Tensor, h: torch.Tensor) -> float:
    """trace(W H W^T): the squared norm of the layer's outputs (without bias) on the calibration inputs, so that
    OBS costs of different layers can be ranked together as relative errors."""
    w = w.detach().to(torch.float64).cpu()
    return float(((w @ h) * w).sum().clamp(min=1e-30))


def normalized(scores: torch.Tensor, block: Block) -> torch.Tensor:
    """A magnitude score per element, so that blocks of different sizes rank together (global scope)."""
    return scores / math.prod(block)
