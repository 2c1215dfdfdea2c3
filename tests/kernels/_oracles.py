"""Plain-Python oracles shared by the kernel tests of every backend (no third-party imports, so the
GPU suite can use them where hypothesis is missing)."""


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
