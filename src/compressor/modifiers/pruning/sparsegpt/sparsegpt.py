"""The numeric core of SparseGPT: masks chosen with the inverse Hessian, the rest compensated.

SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot") prunes a Linear weight one input column at a time, in GPTQ's order and
with GPTQ's machinery: setting a weight to zero is an OBS step whose error is spread over the
columns not yet reached through the inverse Hessian ``H = 2/n sum x x^T`` of the layer's
inputs. Masks are chosen block by block ("adaptive mask selection"): for every block of
columns, the weights with the smallest OBS saliency ``w^2 / [H^-1]_jj^2`` (on the weights as
updated so far) are pruned, at the block's share of the sparsity (unstructured), or N:M
groups are chosen when the loop reaches each group's first column.

Everything here is a pure function of tensors; the modifier in ``base.py`` only collects the
Hessians and writes the results into the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.modifiers.quantization.gptq.hessian import inverse_hessian_cholesky

__all__ = ["SparseGPTResult", "sparsegpt_prune"]


@dataclass
class SparseGPTResult:
    """What SparseGPT returns for one weight.

    :param weight: the pruned and compensated weight, in the input's dtype
    :param mask: True where a weight was pruned (those entries of ``weight`` are exactly 0)
    :param loss: SparseGPT's estimate of the added squared error, ``sum (w - q)^2 /
        [H^-1]_jj^2 / 2``
    :param dampening_frac: the dampening that made the Hessian invertible
    """

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float
    dampening_frac: float


def _check(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None,
    block_size: int,
) -> None:
    if weight.dim() != 2:
        raise ValueError(f"SparseGPT prunes 2-D weights, got shape {tuple(weight.shape)}")
    columns = weight.shape[1]
    if hessian.shape != (columns, columns):
        raise ValueError(
            f"the Hessian is {tuple(hessian.shape)}, the weight has {columns} input columns"
        )
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if n_m is not None:
        n, m = n_m
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
        if columns % m:
            raise ValueError(f"M={m} does not divide the weight's {columns} input columns")
        if block_size % m:
            raise ValueError(f"M={m} does not divide block_size={block_size}")


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    *,
    mask_structure: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    overwrite_hessian: bool = False,
    keep_zeros: bool = False,
) -> SparseGPTResult:
    """Prune a ``(rows, columns)`` weight with SparseGPT.

    Columns are processed in blocks of ``block_size``. Unstructured: each block prunes
    ``int(sparsity * rows * block width)`` weights, those of least saliency ``w^2 /
    [H^-1]_jj^2`` across the whole block. N:M (``mask_structure=(n, m)``): in every group of
    ``m`` consecutive columns, each row keeps the ``n`` weights of greatest saliency, chosen
    when the loop reaches the group. Inside a block each column's error is fed to the block's
    later columns at once, and the block's error to every later column with one matrix
    product (GPTQ's lazy batch updates). Columns whose Hessian diagonal is zero (inputs always
    zero) are dead: their weights become zero before the masks are chosen.

    :param weight: the Linear's weight (not modified)
    :param hessian: ``(columns, columns)`` Hessian of the Linear's inputs
    :param sparsity: the fraction pruned, in [0, 1); ignored with ``mask_structure``, whose
        sparsity is ``1 - n/m``
    :param mask_structure: None (unstructured) or ``(n, m)``: keep ``n`` of every ``m``
        consecutive input weights
    :param block_size: columns per mask-selection and lazy-update block
    :param dampening_frac: fraction of the mean Hessian diagonal added to its diagonal
    :param overwrite_hessian: the caller no longer needs ``hessian``: it may be changed in
        place instead of copied
    :param keep_zeros: the weight's zeros stay pruned and count towards the sparsity
        (llm-compressor's ``preserve_sparsity_mask``: a second pass extends the mask of a
        first): they are chosen first, before any weight of least saliency, in each block
        (unstructured) or N:M group; a block or group with more zeros than its share keeps
        them all. Their updates by the compensation are pruned with them, as any pruned
        weight's are
    :raises ValueError: with ``keep_zeros``, unstructured, when the weight is already
        sparser than ``sparsity``
    """
    _check(weight, hessian, sparsity, mask_structure, block_size)
    columns = weight.shape[1]
    h = hessian.detach().to(device=weight.device, dtype=torch.float32)
    if h.data_ptr() == hessian.data_ptr() and not overwrite_hessian:
        h = h.clone()
    # the transpose: each input column one contiguous row, for the column loop
    wt = weight.detach().t().to(torch.float32).contiguous()
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
        wt[dead] = 0.0
    pruned = wt == 0 if keep_zeros else torch.zeros_like(wt, dtype=torch.bool)
    if keep_zeros and mask_structure is None:
        already = float(pruned.float().mean())
        if already > sparsity:
            raise ValueError(
                f"the weight is already {already:.3f} sparse, more than the target sparsity "
                f"{sparsity}: preserve_sparsity_mask keeps every zero; raise sparsity to at "
                "least that, or set preserve_sparsity_mask false"
            )
    hinv, frac = inverse_hessian_cholesky(h, dampening_frac, overwrite=True)
    losses = torch.zeros((), dtype=torch.float64, device=wt.device)
    for start in range(0, columns, block_size):
        stop = min(start + block_size, columns)
        block = wt[start:stop].clone()  # (width, rows), updated as the loop goes
        hinv_block = hinv[start:stop, start:stop]
        diag = hinv_block.diagonal()
        err = torch.empty_like(block)
        mask = pruned[start:stop]
        if mask_structure is None:
            _unstructured_block_mask_(mask, block, diag, sparsity)
        for j in range(stop - start):
            if mask_structure is not None and j % mask_structure[1] == 0:
                n, m = mask_structure
                _nm_group_mask_(mask[j : j + m], block[j : j + m], diag[j : j + m], n)
            column = block[j]
            q = column.masked_fill(mask[j], 0.0)
            err[j] = (column - q) / diag[j]
            block[j] = q
            if j + 1 < stop - start:
                block[j + 1 :].addr_(hinv_block[j, j + 1 :], err[j], alpha=-1.0)
        losses += err.double().square().sum() / 2
        wt[start:stop] = block
        if stop < columns:
            wt[stop:].addmm_(hinv[start:stop, stop:].t(), err, alpha=-1.0)
    return SparseGPTResult(
        weight=wt.t().to(weight.dtype).contiguous(),
        mask=pruned.t().contiguous(),
        loss=float(losses),
        dampening_frac=frac,
    )


def _unstructured_block_mask_(
    mask: torch.Tensor, block: torch.Tensor, diag: torch.Tensor, sparsity: float
) -> None:
    """Prune the ``int(sparsity * size)`` weights of least saliency in the block; those
    ``mask`` already prunes (zeros kept) come first and stay pruned."""
    count = int(sparsity * block.numel())
    if count == 0:
        return
    saliency = block.square() / diag.square().unsqueeze(1)
    saliency.masked_fill_(mask, -1.0)
    smallest = saliency.flatten().topk(count, largest=False).indices
    mask.view(-1)[smallest] = True


def _nm_group_mask_(mask: torch.Tensor, group: torch.Tensor, diag: torch.Tensor, n: int) -> None:
    """In each row of an ``(m, rows)`` group of columns, prune the ``m - n`` weights of least
    saliency; those ``mask`` already prunes (zeros kept) come first and stay pruned."""
    m = group.shape[0]
    saliency = group.square() / diag.square().unsqueeze(1)
    saliency.masked_fill_(mask, -1.0)
    smallest = saliency.topk(m - n, dim=0, largest=False).indices
    mask.scatter_(0, smallest, True)
