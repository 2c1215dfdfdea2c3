"""Oracles shared by the kernel tests of every backend (torch only, no third-party test imports,
so the GPU suite can use them where hypothesis is missing).

These are the formulas, written plainly, that every backend (tsprune_kernels/torch_impl.py, the
C++ extension, Triton) is checked against, usually in float64. They are not the torch backend:
that one folds masks into the weight and recovers mask gradients from the output, as the fast
kernels do; this is autograd through the definition."""
import torch.nn.functional as F

# The contract's "is zero" table (docs/KERNELS.md) is a production value, shared by the backends;
# re-exported so the tests that check it read it from the same place as the oracle.
from tsprune_kernels.torch_impl import zero_threshold  # noqa: F401


def _expand(t, mask, block):
    """``t * expand(mask)`` along the last dim, each mask entry repeated over ``block`` channels."""
    if mask is None:
        return t
    return t * mask.to(t.dtype).repeat_interleave(block)


def masked_linear(x, weight, bias=None, mask_in=None, mask_out=None, block_in=1, block_out=1):
    """((x * expand(mask_in)) @ weight.T + bias) * expand(mask_out), by the formula: differentiable
    by autograd w.r.t. every tensor argument (the oracle of the mask gradients)."""
    return _expand(F.linear(_expand(x, mask_in, block_in), weight, bias), mask_out, block_out)


def prune_oracle(mask, imp, k):
    """prune_lowest_ by sorting: every live zero-score unit, plus the k live units of smallest
    nonzero |imp| (ties: lower index first). Returns (mask, imp, count) on copies."""
    mask, imp = mask.clone(), imp.clone()
    live = [i for i in range(mask.numel()) if mask[i] != 0]
    zero = [i for i in live if imp[i] == 0]
    cand = sorted((abs(float(imp[i])), i) for i in live if imp[i] != 0)
    chosen = zero + [i for _, i in cand[:k]]
    mask[chosen] = 0
    imp[chosen] = 0
    return mask, imp, len(chosen)
