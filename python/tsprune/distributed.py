"""Data-parallel calibration on torch.distributed: one flat all-reduce per macro-step.

Stage of the flow: glue between the Pruner / calibrate loop and torch.distributed. Every rank holds
the whole (frozen) model and the whole ScoreArena. For every global micro-batch (the same batches,
in the same order, as one process would see) each rank runs forward / backward on its contiguous
shard; the masked model accumulates the statistics the criterion reads (mask gradients, per-sample
squares, input activation squares) into the rank's own arena, with no communication. At a
macro-batch boundary the Pruner calls :meth:`ArenaSync.reduce_`: ONE all-reduce of the arena's
sums over samples (``arena.sample_sums()``, one contiguous slice of its flat buffer: [U] for taylor,
[2U] for taylor2, [C] activation squares for wanda; none for magnitude, whose weight norms are the
same on every rank). Scoring, EMA, threshold and pruning then run on every rank, and
:meth:`ArenaSync.sync_state_` broadcasts rank 0's ``[mask; imp]`` (one more flat tensor) so the
ranks can never drift apart, even by one fp rounding.

Equality with one process: the model's loss is a mean over the micro-batch, so a rank scales its
shard's loss by ``shard_size / global_micro_batch``; then its mask gradients are exactly its
samples' shares of the one-process gradient (and per-sample squares likewise), and the sum over
ranks equals the one-process accumulation up to fp summation order.

Failures: every collective runs asynchronously and is waited on with a timeout; a timeout or a
dead peer (gloo: connection reset) raises :class:`DistributedError` naming this rank, the
collective and the timeout, instead of hanging.

    torchrun --nproc_per_node=2 -m tsprune prune --data ETTh1 --out runs/p     # CLI
    dist.init_process_group("gloo"); pruner = Pruner(model, ...); calibrate(model, pruner, ...)  # API
"""
from __future__ import annotations

import datetime
import os
import time
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "DistributedError",
    "DEFAULT_TIMEOUT_S",
    "is_dist",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "launched",
    "init_from_env",
    "shutdown",
    "comm_device",
    "shard",
    "shard_bounds",
    "all_reduce_",
    "broadcast_",
    "all_gather",
    "sum_across_ranks",
    "barrier",
    "check_consistent",
    "model_fingerprint",
    "is_sharded",
    "ArenaSync",
]

ENV_TIMEOUT = "TSPRUNE_DIST_TIMEOUT"
ENV_BACKEND = "TSPRUNE_DIST_BACKEND"


def _env_timeout() -> float:
    try:
        return float(os.environ.get(ENV_TIMEOUT, 600))
    except ValueError:
        return 600.0


#: Seconds any collective may wait (``$TSPRUNE_DIST_TIMEOUT``, default 600). A healthy run never
#: waits long: every rank does the same work between collectives.
DEFAULT_TIMEOUT_S = _env_timeout()


class DistributedError(RuntimeError):
    """A collective failed: a peer rank died, hung past the timeout, or ranks disagree."""


def _dist():
    import torch.distributed as dist

    return dist


# -- who am I ------------------------------------------------------------------------------------
def is_dist() -> bool:
    """True when a torch.distributed process group is initialised with more than one rank (the
    only case where calibration communicates)."""
    try:
        dist = _dist()
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    d = _dist()
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", rank()))


def is_main() -> bool:
    """Rank 0 (or no process group): the one process that writes files, logs and shows progress."""
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (or an equivalent launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def _timeout(timeout_s: float | None) -> float:
    return DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT). Backend: ``backend``, else ``$TSPRUNE_DIST_BACKEND``, else nccl when
    CUDA is available, else gloo; with nccl the rank's GPU is ``LOCAL_RANK``. ``timeout_s`` also
    becomes this process's default collective timeout. Returns True when this
    call initialised the group (the caller then calls :func:`shutdown`), False when there was
    nothing to do (one process, or a group already initialised)."""
    dist = _dist()
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise DistributedError("tsprune distributed: torch.distributed is not available in this torch build")
    backend = backend or os.environ.get(ENV_BACKEND) or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    global DEFAULT_TIMEOUT_S
    t = _timeout(timeout_s)
    DEFAULT_TIMEOUT_S = t
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=t))
    except Exception as e:  # rendezvous failure: name it
        raise DistributedError(
            f"tsprune distributed: init_process_group({backend!r}) failed on rank "
            f"{os.environ.get('RANK')}/{os.environ.get('WORLD_SIZE')} (timeout {t:g} s): {e}"
        ) from e
    return True


def shutdown() -> None:
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _backend() -> str:
    return str(_dist().get_backend())


def comm_device() -> torch.device:
    """Where collective buffers live: the rank's GPU for nccl, else the CPU."""
    if is_dist() and _backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- sharding --------------------------------------------------------------------------------------
def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, stop) of rank ``rank_``'s contiguous share of ``n`` items: shares differ by at most
    one and, taken in rank order, tile 0..n exactly."""
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world is None else int(world)
    if not 0 <= r < w:
        raise ValueError(f"shard: rank {r} out of range for world size {w}")
    return r * n // w, (r + 1) * n // w


def shard(indices: Sequence[int] | np.ndarray, rank_: int | None = None, world: int | None = None):
    """This rank's contiguous slice of ONE global micro-batch's index list. The union over ranks,
    in rank order, is the micro-batch itself, so the global batch order is that of one process.
    A slice may be empty when the batch has fewer items than ranks."""
    a, b = shard_bounds(len(indices), rank_, world)
    return indices[a:b]


# -- collectives with a timeout and a clear error --------------------------------------------------
def _fail(what: str, t: float, e: BaseException) -> DistributedError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DistributedError(
        f"tsprune distributed: {what} failed on rank {rank()}/{world_size()} "
        f"(collective timeout {t:g} s): a peer rank died, failed or hung. Cause: {msg}"
    )


def _wait(work, what: str, t: float) -> None:
    try:
        ok = work.wait(timeout=datetime.timedelta(seconds=t))
    except Exception as e:
        raise _fail(what, t, e) from e
    if ok is False:
        raise _fail(what, t, TimeoutError(f"no completion within {t:g} s"))


def all_reduce_(tensor: torch.Tensor, what: str = "all_reduce", timeout_s: float | None = None) -> torch.Tensor:
    """In-place SUM over ranks of a contiguous tensor, waited on with a timeout."""
    if not is_dist():
        return tensor
    if not tensor.is_contiguous():
        raise ValueError(f"{what}: all_reduce needs a contiguous tensor")
    dist, t = _dist(), _timeout(timeout_s)
    try:
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
    except Exception as e:
        raise _fail(what, t, e) from e
    _wait(work, what, t)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0, what: str = "broadcast",
               timeout_s: float | None = None) -> torch.Tensor:
    """In place: every rank gets rank ``src``'s ``tensor``."""
    if not is_dist():
        return tensor
    dist, t = _dist(), _timeout(timeout_s)
    try:
        work = dist.broadcast(tensor, src=src, async_op=True)
    except Exception as e:
        raise _fail(what, t, e) from e
    _wait(work, what, t)
    return tensor


def all_gather(tensor: torch.Tensor, what: str = "all_gather", timeout_s: float | None = None) -> torch.Tensor:
    """[world, *tensor.shape]: every rank's ``tensor`` in rank order (same on every rank)."""
    if not is_dist():
        return tensor.unsqueeze(0).clone()
    dist, t = _dist(), _timeout(timeout_s)
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    try:
        work = dist.all_gather(out, tensor.contiguous(), async_op=True)
    except Exception as e:
        raise _fail(what, t, e) from e
    _wait(work, what, t)
    return torch.stack(out)


def sum_across_ranks(*values: float, what: str = "reduce of validation loss",
                     timeout_s: float | None = None) -> tuple[float, ...]:
    """Sums of float ``values`` over ranks, in float64, added in rank order after an all-gather,
    so every rank gets bit-identical results (decisions such as early stopping cannot differ)."""
    if not is_dist():
        return tuple(float(v) for v in values)
    x = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device())
    g = all_gather(x, what, timeout_s).cpu()
    tot = [0.0] * len(values)
    for r in range(g.shape[0]):
        for j in range(len(values)):
            tot[j] += float(g[r, j])
    return tuple(tot)


def barrier(what: str = "barrier", timeout_s: float | None = None) -> None:
    """Every rank reaches this point within the timeout, or DistributedError (on gloo, rank 0's
    error names the ranks that did not arrive: ``monitored_barrier``)."""
    if not is_dist():
        return
    dist, t = _dist(), _timeout(timeout_s)
    if _backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=t), wait_all_ranks=True)
        except Exception as e:
            raise _fail(what, t, e) from e
    else:
        all_reduce_(torch.zeros(1, device=comm_device()), what, t)


def is_sharded(model: nn.Module) -> bool:
    """True for a model wrapped in FSDP (``fully_shard`` / FullyShardedDataParallel) or holding
    DTensor parameters: its forward and backward run collectives, so every rank must run the same
    number of passes (calibrate and mean_loss then give an empty shard a zero-weight pass)."""
    for m in model.modules():
        n = type(m).__name__
        if n == "FullyShardedDataParallel" or n.startswith("FSDP"):
            return True
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def model_fingerprint(model: nn.Module) -> float | None:
    """A float64 checksum of every parameter and buffer (ranks must hold the same model), or None
    for sharded models (each rank holds a different shard)."""
    if is_sharded(model):
        return None
    tot = 0.0
    with torch.no_grad():
        for i, t in enumerate(list(model.parameters()) + list(model.buffers())):
            if t.is_floating_point():
                tot += float(t.detach().double().sum()) * (1.0 + 1e-3 * (i % 7))
    return tot


def check_consistent(values: Mapping[str, float], what: str = "calibration setup",
                     timeout_s: float | None = None) -> None:
    """All ranks must pass equal ``values`` (layout sizes, dataset lengths, batch sizes, a model
    checksum ...), equal to 1e-9 relative (a checksum summed on different devices may round
    differently); otherwise every rank raises DistributedError listing the differences. NaN means
    "not checked" on that rank."""
    if not is_dist():
        return
    keys = list(values)
    x = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=comm_device())
    g = all_gather(x, f"consistency check of the {what}", timeout_s).cpu()
    bad = []
    for j, k in enumerate(keys):
        col = g[:, j]
        col = col[~torch.isnan(col)]
        if len(col) and not bool(((col - col[0]).abs() <= 1e-9 * col[0].abs().clamp(min=1.0)).all()):
            bad.append(f"{k}: " + ", ".join(f"rank {r}={g[r, j].item():.17g}" for r in range(g.shape[0])))
    if bad:
        raise DistributedError(f"tsprune distributed: ranks disagree on the {what}: " + "; ".join(bad))


# -- the score arena -------------------------------------------------------------------------------
class ArenaSync:
    """What a ScoreArena communicates under torch.distributed: ONE flat all-reduce of its sums over
    samples per macro-step (:meth:`reduce_`, before scoring) and one broadcast of rank 0's
    ``[mask; imp]`` after pruning (:meth:`sync_state_`). Sees only the arena. Counts calls, bytes
    and seconds in ``stats``."""

    def __init__(self, timeout_s: float | None = None):
        if not is_dist():
            raise DistributedError(
                "tsprune distributed: Pruner(distributed=True) needs an initialised torch.distributed "
                "process group with more than one rank"
            )
        self.timeout_s = _timeout(timeout_s)
        self.stats = {"reduce_calls": 0, "reduce_bytes": 0, "broadcast_calls": 0, "broadcast_bytes": 0,
                      "seconds": 0.0}
        self._state_buf: torch.Tensor | None = None

    def reduce_(self, arena) -> None:
        """Sum the macro-batch's statistics over ranks, in place: ``arena.sample_sums()`` (the
        sums the arena's criterion reads, one contiguous tensor) in ONE all-reduce; nothing when
        the criterion reads no sums (magnitude: weights are identical on every rank)."""
        t0 = time.perf_counter()
        buf = arena.sample_sums()
        if buf is not None and buf.numel():
            all_reduce_(buf, f"all_reduce of the score arena (macro-step {arena.steps + 1})", self.timeout_s)
            self.stats["reduce_calls"] += 1
            self.stats["reduce_bytes"] += buf.numel() * buf.element_size()
        self.stats["seconds"] += time.perf_counter() - t0

    def sync_state_(self, arena) -> None:
        """Every rank takes rank 0's mask and EMA importance (one flat [2, U] broadcast)."""
        t0 = time.perf_counter()
        if self._state_buf is None or self._state_buf.device != arena.mask.device:
            self._state_buf = torch.empty(2, arena.n_units, dtype=arena.mask.dtype, device=arena.mask.device)
        buf = self._state_buf
        if rank() == 0:
            buf[0].copy_(arena.mask)
            buf[1].copy_(arena.imp)
        broadcast_(buf, 0, "broadcast of rank 0's masks", self.timeout_s)
        if rank() != 0:
            arena.mask.copy_(buf[0])
            arena.imp.copy_(buf[1])
        self.stats["broadcast_calls"] += 1
        self.stats["broadcast_bytes"] += buf.numel() * buf.element_size()
        self.stats["seconds"] += time.perf_counter() - t0
