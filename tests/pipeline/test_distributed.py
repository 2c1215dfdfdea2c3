"""Data-parallel calibration (tsprune.distributed) on gloo, 2 CPU processes: the same masks as one
process over the same global batches, the same repacked model, one flat all-reduce per macro-step,
clear errors (not hangs) when a rank dies or hangs, and ``torchrun -m tsprune prune``.

The ranks run this file as a script (``python test_distributed.py worker CONFIG``), one process
each, OMP_NUM_THREADS=1, on a free port; the one-process reference runs the same worker code in
the pytest process. Near ties: the tiny model's scores are perturbed random weights; a unit whose
|importance| is within fp-summation noise (~1e-7 relative) of the threshold could flip, so the test
asserts the pruned sets are identical and also reports the smallest relative gap at the threshold
(it is far above that noise for these seeds)."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

_HERE = pathlib.Path(__file__).resolve()
_ROOT = _HERE.parents[2]
for _p in (str(_ROOT), str(_ROOT / "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

CRITERIA = ("taylor", "taylor2", "wanda")
LOOKBACK, HORIZON = 64, 16


# ------------------------------------------------------------------------------------------------
# the worker (runs in each rank's process, or in the pytest process for the 1-process reference)
# ------------------------------------------------------------------------------------------------
def tiny(seed=0):
    from tsprune.pretrain import build_model

    m = build_model(dict(d_model=32, d_kv=8, num_heads=4, d_ff=64,
                         chronos_config=dict(context_length=LOOKBACK, prediction_length=HORIZON)), seed=seed)
    with torch.no_grad():  # random init gives near-constant outputs; perturb so every unit matters
        g = torch.Generator().manual_seed(1000 + seed)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


_PAIRS = {".q.out": ".k.out", ".k.out": ".q.out", ".v.out": ".o.in", ".o.in": ".v.out",
          ".wi.out": ".wo.in", ".wo.in": ".wi.out"}


def _partners(arena) -> torch.Tensor:
    """[U] index of each unit's coupled partner (-1: none). q.out/k.out, v.out/o.in and
    wi.out/wo.in units of one position have mathematically EQUAL mask gradients (q.k is symmetric
    in the pair; attention is linear in v; relu(h) * m == relu(h * m) for m >= 0), so their scores
    tie up to rounding and which of the two goes first is noise; the plan removes the position
    when either goes, and the other has score 0 at the next step. Gaps are measured without them."""
    out = torch.full((arena.n_units,), -1, dtype=torch.long)
    for name, sl in arena.slots.items():
        for a, b in _PAIRS.items():
            if name.endswith(a) and name[: -len(a)] + b in arena.slots:
                other = arena.slots[name[: -len(a)] + b]
                if other.units == sl.units:
                    out[sl.offset : sl.offset + sl.units] = torch.arange(other.offset, other.offset + sl.units)
    return out


def run_worker(cfg: dict) -> dict:
    """Calibrate a tiny Chronos-Bolt once per criterion; returns masks, histories, the repacked
    model's forecast on a fixed batch, the first macro-step's (reduced) accumulators, comm stats."""
    import tsprune
    from tsprune import distributed as D
    from tsprune.plan import repack_model
    from tsprune.synthetic import synthetic_task
    from tsprune.train import calibrate

    task = synthetic_task(LOOKBACK, HORIZON, seed=3, max_train_windows=cfg["train_windows"],
                          max_eval_windows=cfg["eval_windows"])
    probe_ctx, _ = task.test.batch(np.arange(8))
    out = {"rank": D.rank(), "world": D.world_size()}
    calls = {"n": 0}
    for crit in cfg["criteria"]:
        model = tiny(seed=cfg.get("model_seed", 0))
        pruner = tsprune.Pruner(model, criterion=crit, ema=0.5, prune_ratio_per_epoch=0.3,
                                macro_batch_size=cfg["macro_batch"], max_prune_ratio=0.8, block=2)
        if pruner.comm is not None and "timeout" in cfg:
            pruner.comm.timeout_s = cfg["timeout"]
        if cfg.get("fsdp") and D.is_dist():  # FSDP2: every block and the root sharded over the ranks
            from torch.distributed.fsdp import fully_shard

            pruner.attach()
            for blk in [*model.encoder.block, *model.decoder.block]:
                fully_shard(blk)
            fully_shard(model)
            assert D.is_sharded(model)
        first, gaps = {}, []
        partner = _partners(pruner.arena)
        step0 = pruner.arena.step

        def step(criterion, ema, *, _step0=step0, _first=first, _gaps=gaps, _pr=pruner, **k):
            ar = _pr.arena
            if not _first:
                _first["acc"] = ar.acc.clone()
            # the importance this step will rank (as ScoreArena.step computes it)
            s = k["score"] if k.get("score") is not None else ar.scores(criterion)
            imp = (s if ar.steps == 0 else ema * s + (1 - ema) * ar.imp).abs()
            before = ar.mask != 0
            res = _step0(criterion, ema, **k)
            # relative gap between the largest pruned and the smallest kept |imp| at the threshold
            gone, kept = before & (ar.mask == 0) & (imp > 0), ar.mask != 0
            split = (partner >= 0) & (kept != kept[partner.clamp(min=0)])  # an exact tie, see _partners
            gone, kept = gone & ~split, kept & ~split
            if bool(gone.any()) and bool(kept.any()):
                hi = float(imp[kept].min())
                _gaps.append((hi - float(imp[gone].max())) / hi)
            return res

        pruner.arena.step = step
        loss0 = pruner.adapter.loss

        def loss(*a, _loss0=loss0, **k):  # fault injection for the failure tests
            calls["n"] += 1
            if cfg.get("fail_rank") == D.rank() and calls["n"] == cfg.get("fail_at", -1):
                if cfg.get("fail_mode") == "hang":
                    time.sleep(3600)
                os._exit(13)  # abrupt death: no exception, no cleanup
            return _loss0(*a, **k)

        pruner.adapter.loss = loss
        res = calibrate(model, pruner, task.train, task.val, epochs=cfg["epochs"], batch_size=cfg["batch"],
                        val_tolerance=1.0, seed=5)
        pruner.adapter.loss = loss0
        masks = {n: v.clone() for n, v in pruner.masks.items()}
        if D.is_sharded(model):  # frozen weights: repack the unsharded original with the masks
            small, plan = repack_model(tiny(seed=cfg.get("model_seed", 0)), pruner.adapter, pruner.sites, masks)
        else:
            small = pruner.repack()
            plan = pruner.adapter.plan(model, masks)
        with torch.no_grad():
            pred = small(context=probe_ctx).quantile_preds
        out[crit] = {
            "masks": masks,
            "keep": {k: {kk: list(map(int, vv)) if vv is not None else None for kk, vv in v.items()}
                     for k, v in plan.keep.items()},
            "imp": pruner.arena.imp.clone(),
            "history": [(h.macro_step, h.pruned, h.live) for h in pruner.history],
            "val": [h["val_loss"] for h in res.history],
            "best_epoch": res.best_epoch,
            "pred": pred,
            "params": sum(p.numel() for p in small.parameters()),
            "first_acc": first.get("acc"),
            "gaps": gaps,
            "stats": dict(pruner.comm.stats) if pruner.comm is not None else None,
            "n_units": pruner.arena.n_units,
        }
    return out


def _worker_main(cfg_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    cfg = json.loads(pathlib.Path(cfg_path).read_text())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import datetime

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=cfg.get("timeout", 60)))
    res = run_worker(cfg)
    torch.save(res, pathlib.Path(cfg["out"]) / f"rank{res['rank']}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# helpers for the tests
# ------------------------------------------------------------------------------------------------
BASE = dict(criteria=list(CRITERIA), train_windows=96, eval_windows=24, batch=9, macro_batch=27, epochs=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra=None) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(_ROOT / "python"), str(_ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


def _launch(cfg: dict, tmp: pathlib.Path, world: int = 2) -> list[subprocess.Popen]:
    cfg = {**cfg, "out": str(tmp)}
    path = tmp / "cfg.json"
    path.write_text(json.dumps(cfg))
    port = str(_free_port())
    procs = []
    for r in range(world):
        env = _env(dict(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port))
        procs.append(subprocess.Popen([sys.executable, str(_HERE), "worker", str(path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    return procs


def _finish(procs, timeout=120):
    outs = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(procs)
            raise
        outs.append((p.returncode, o, e))
    return outs


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The 2-rank run (subprocesses) and the 1-process reference (here, meanwhile)."""
    tmp = tmp_path_factory.mktemp("dist2")
    procs = _launch(BASE, tmp)
    try:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ref = run_worker(BASE)
        finally:
            torch.set_num_threads(n)
        outs = _finish(procs)
    finally:
        _kill(procs)
    for rc, o, e in outs:
        assert rc == 0, e[-3000:]
    return ref, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
def test_shard_tiles_every_micro_batch_in_order():
    from tsprune import distributed as D
    from tsprune.train import batch_indices

    for n, bs, world in ((96, 9, 2), (10, 4, 3), (5, 8, 4), (7, 1, 2)):
        for idx in batch_indices(n, bs, shuffle=True, seed=1):
            parts = [D.shard(idx, r, world) for r in range(world)]
            assert np.array_equal(np.concatenate(parts), idx)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank 2 out of range"):
        D.shard(np.arange(4), 2, 2)
    assert not D.is_dist() and D.rank() == 0 and D.world_size() == 1 and D.is_main()
    assert D.sum_across_ranks(1.5, 2) == (1.5, 2.0)  # no process group: identity


@pytest.mark.parametrize("crit", CRITERIA)
def test_two_ranks_prune_exactly_what_one_process_prunes(one_and_two, crit):
    ref, (r0, r1) = one_and_two
    a, b, c = ref[crit], r0[crit], r1[crit]
    assert a["history"] and sum(p for _, p, _ in a["history"]) > 0  # something was pruned
    # identical pruned units: the physical plan (coupled keep indices) and every raw mask, both ranks
    assert a["keep"] == b["keep"] == c["keep"]
    for name, m in a["masks"].items():
        assert torch.equal(m != 0, b["masks"][name] != 0), (crit, name)
        assert torch.equal(b["masks"][name], c["masks"][name]), (crit, name)
    assert torch.equal(b["imp"], c["imp"])  # ranks never diverge: rank 0's state everywhere
    torch.testing.assert_close(b["imp"], a["imp"], rtol=1e-4, atol=1e-6 * float(a["imp"].abs().max()))
    assert a["history"] == b["history"] == c["history"]
    assert a["best_epoch"] == b["best_epoch"] == c["best_epoch"]
    np.testing.assert_allclose(b["val"], a["val"], rtol=1e-5)
    assert b["val"] == c["val"]  # the reduced validation loss is bit-identical on both ranks
    # the all-reduced accumulators of the first macro-step are the one-process sums
    if crit != "wanda":
        rows = 2 if crit == "taylor2" else 1
        scale = float(a["first_acc"][:rows].abs().max(1).values.min())
        torch.testing.assert_close(b["first_acc"][:rows], a["first_acc"][:rows], rtol=1e-4, atol=1e-5 * scale)
    # the same repacked model
    assert a["params"] == b["params"] == c["params"]
    torch.testing.assert_close(b["pred"], a["pred"], rtol=1e-5, atol=1e-5 * float(a["pred"].abs().max()))
    assert min(a["gaps"]) > 1e-5, f"near tie at the threshold: {min(a['gaps'])}"


def test_one_flat_collective_per_macro_step(one_and_two):
    _, (r0, r1) = one_and_two
    for crit in CRITERIA:
        st, n_units, steps = r0[crit]["stats"], r0[crit]["n_units"], len(r0[crit]["history"])
        assert st == r1[crit]["stats"] or st["reduce_bytes"] == r1[crit]["stats"]["reduce_bytes"]
        assert st["reduce_calls"] == steps and st["broadcast_calls"] == steps
        assert st["broadcast_bytes"] == steps * 2 * n_units * 4
        if crit == "taylor":
            assert st["reduce_bytes"] == steps * n_units * 4
        elif crit == "taylor2":
            assert st["reduce_bytes"] == steps * 2 * n_units * 4


def test_fsdp2_sharded_model_prunes_what_one_process_prunes(tmp_path):
    """fully_shard (FSDP2) on gloo: 91 windows in micro-batches of 9 end with a 1-window batch (rank 1's
    shard is empty: a zero-weight pass keeps FSDP's all-gathers paired); 19 validation windows give
    the ranks 1 and 2 batches. Masks, plan and repacked model equal the one-process run's."""
    cfg = {**BASE, "criteria": ["taylor2"], "train_windows": 91, "eval_windows": 19, "fsdp": True}
    procs = _launch(cfg, tmp_path)
    try:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ref = run_worker({**cfg, "fsdp": False})["taylor2"]
        finally:
            torch.set_num_threads(n)
        outs = _finish(procs)
    finally:
        _kill(procs)
    for rc, _, e in outs:
        assert rc == 0, e[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["taylor2"] for r in range(2))
    assert sum(p for _, p, _ in ref["history"]) > 0
    assert ref["keep"] == r0["keep"] == r1["keep"]
    for name, m in ref["masks"].items():
        assert torch.equal(m, r0["masks"][name]) and torch.equal(m, r1["masks"][name]), name
    assert ref["history"] == r0["history"] and ref["best_epoch"] == r0["best_epoch"]
    np.testing.assert_allclose(r0["val"], ref["val"], rtol=1e-5)
    torch.testing.assert_close(r0["pred"], ref["pred"], rtol=1e-5, atol=1e-5 * float(ref["pred"].abs().max()))


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_failing_rank_ends_the_run_with_an_error_not_a_hang(tmp_path, mode):
    cfg = {**BASE, "criteria": ["taylor"], "fail_rank": 1, "fail_at": 5, "fail_mode": mode, "timeout": 6}
    t0 = time.time()
    procs = _launch(cfg, tmp_path)
    try:
        rc0, _, err0 = _finish(procs[:1], timeout=60)[0]
        elapsed = time.time() - t0
    finally:
        _kill(procs)
    assert rc0 != 0 and elapsed < 60
    assert "DistributedError" in err0 and "failed on rank 0/2" in err0, err0[-3000:]
    if mode == "hang":
        assert "timeout 6 s" in err0
    if mode == "die":
        assert procs[1].returncode == 13


def test_torchrun_prune_matches_one_process(tmp_path):
    args = ["prune", "--data", "synthetic", "--lookback", "64", "--horizon", "16", "--max-train-windows", "96",
            "--max-eval-windows", "24", "--batch-size", "9", "--macro-batch-size", "27", "--calib-epochs", "2",
            "--prune-ratio-per-epoch", "0.3", "--val-tolerance", "1.0", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "tsprune"]
    p2 = subprocess.Popen(torchrun + args + ["--out", str(tmp_path / "two")], env=_env(), cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        p1 = subprocess.run([sys.executable, "-m", "tsprune"] + args + ["--threads", "1", "--out", str(tmp_path / "one")],
                            env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
        o2, e2 = p2.communicate(timeout=120)
    finally:
        _kill([p2])
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert p2.returncode == 0, e2[-3000:]
    assert o2.count("saved") == 1 and e2.count("calibrate epoch 1: masked val") == 1  # rank 0 alone prints and logs
    j1 = json.loads((tmp_path / "one" / "prune.json").read_text())
    j2 = json.loads((tmp_path / "two" / "prune.json").read_text())
    assert j2["distributed"]["world_size"] == 2 and j2["distributed"]["backend"] == "gloo"
    assert 0 < j1["pruned_units_fraction"] == j2["pruned_units_fraction"]
    assert j1["params_after"] == j2["params_after"] < j1["params_before"]
    assert j1["sparsity_by_mask"] == j2["sparsity_by_mask"]
    plan1 = json.loads((tmp_path / "one" / "pruned_model" / "plan.json").read_text())
    plan2 = json.loads((tmp_path / "two" / "pruned_model" / "plan.json").read_text())
    assert plan1 == plan2
    assert abs(j1["val_loss_repacked"] - j2["val_loss_repacked"]) <= 1e-5 * abs(j1["val_loss_repacked"])
    # only rank 0 wrote, atomically: no leftover temporary files
    names = sorted(p.name for p in (tmp_path / "two").iterdir() if p.name != ".pruned_model.lock")  # save_pruned's lock
    assert names == ["prune.json", "pruned_model", "sparsity.png"]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker_main(sys.argv[2])
