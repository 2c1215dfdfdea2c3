"""Criteria as objects in the pipeline: a user's Criterion (object or registered name) runs through
Pruner / calibrate / compaction / the CLI parser with no name-specific code; a copy of a built-in
prunes exactly what the built-in prunes; ArenaSync all-reduces one slice of the arena per step."""
import pytest
import torch

import tsprune
import tsprune_kernels as K
from tsprune import distributed as D
from tsprune.criteria import Criterion, get_criterion, register_criterion
from tsprune.pretrain import build_model
from tsprune.synthetic import synthetic_task
from tsprune.train import calibrate

pytest.importorskip("chronos")


def tiny(seed=0):
    m = build_model(dict(d_model=32, d_kv=8, num_heads=4, d_ff=64,
                         chronos_config=dict(context_length=64, prediction_length=16)), seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1000 + seed)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


@pytest.fixture(scope="module")
def task():
    return synthetic_task(64, 16, seed=3, max_train_windows=48, max_eval_windows=8)


def _run(task, criterion, compact=True, dtype=torch.float32, **kw):
    model = tiny().to(dtype)
    pr = tsprune.Pruner(model, criterion=criterion, ema=0.5, prune_ratio_per_epoch=0.3, macro_batch_size=16,
                        max_prune_ratio=0.8, block=2, compact=compact, **kw)
    calibrate(model, pr, task.train, task.val, epochs=2, batch_size=8, val_tolerance=1.0, seed=5)
    return pr


def test_a_copy_of_taylor2_prunes_exactly_what_taylor2_prunes(task):
    builtin = get_criterion("taylor2")
    mine = Criterion("my_taylor2", builtin.stats, lambda a: -a.grad + 0.5 * a.sq)
    a, b = _run(task, "taylor2"), _run(task, mine)
    assert b.criterion is mine and b.needs_sq and a.criterion == "taylor2"
    assert sum(h.pruned for h in a.history) > 0
    assert [(h.macro_step, h.pruned, h.live, h.capped) for h in a.history] == \
           [(h.macro_step, h.pruned, h.live, h.capped) for h in b.history]
    for n, m in a.masks.items():
        assert torch.equal(m, b.masks[n]), n
    assert torch.equal(a.arena.imp, b.arena.imp)


def _act_norm(a):
    # input units: RMS-free activation energy of the unit's channels; output units: weight norm
    return torch.where(a.act_units, a.block_sum(a.act).sqrt(), a.block_sum(a.wsq).sqrt())


def test_custom_activation_criterion_runs_and_compaction_changes_nothing(task):
    crit = Criterion("act_norm_test", ("act", "wsq"), _act_norm)
    a = _run(task, crit, compact=False, dtype=torch.float64)
    b = _run(task, crit, compact=True, dtype=torch.float64)
    assert sum(h.pruned for h in a.history) > 0 and b.compacted is False  # calibrate ends expanded
    assert a.arena.sample_sums().numel() == a.arena.n_channels  # only act is summed over samples
    ins = torch.tensor([n.endswith(".in") for n in a.arena.slots])[a.arena.unit_slot]
    assert torch.equal(a.arena.act_units, ins)  # act collected on input masks only
    for n, m in a.masks.items():
        assert torch.equal(m != 0, b.masks[n] != 0), n
    assert [h.pruned for h in a.history] == [h.pruned for h in b.history]


def test_registered_name_works_in_the_pruner_and_the_cli():
    from tsprune.cli import build_parser
    from tsprune_kernels import criteria

    register_criterion(Criterion("grad_abs_test", ("grad",), lambda a: a.grad.abs()))
    try:
        pr = tsprune.Pruner(tiny(), criterion="grad_abs_test")
        assert pr.criterion.name == "grad_abs_test" and not pr.needs_sq
        assert pr.arena.act is None and pr.arena.wsq is None and pr.arena.sample_sums().numel() == pr.arena.n_units
        args = build_parser().parse_args(["prune", "--criterion", "grad_abs_test", "--out", "x"])
        assert args.criterion == "grad_abs_test"
    finally:
        criteria._REGISTRY.pop("grad_abs_test", None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--criterion", "grad_abs_test", "--out", "x"])


def test_magnitude_without_data_equals_the_kernel():
    m = tiny()
    pr = tsprune.Pruner(m, criterion="magnitude", max_prune_ratio=0.95)
    info = pr.prune_now(ratio=0.5)
    assert isinstance(info, K.StepResult) and isinstance(info, tsprune.pruner.StepInfo)
    assert info.macro_step == 1 and info.total == pr.arena.n_units and info.live == info.live_after
    want = torch.zeros(pr.arena.n_units)
    for s in pr.sites:
        w = m.get_submodule(s.path).weight
        for side, spec, dim in (("in", s.mask_in, 1), ("out", s.mask_out, 0)):
            if spec is not None:
                pr.arena._slice(want, s.mask_name(side)).copy_(K.magnitude_score(w, dim, spec.block))
    assert torch.equal(pr.arena.imp, want * (pr.arena.mask != 0))


def test_arena_sync_reduces_one_slice_of_the_arena(monkeypatch):
    calls = []
    monkeypatch.setattr(D, "is_dist", lambda: True)
    monkeypatch.setattr(D, "all_reduce_", lambda t, what, timeout_s=None: calls.append((t, what)) or t)
    sync = D.ArenaSync()
    for crit, n in (("taylor", 1), ("taylor2", 2), ("fisher", 1), ("wanda", None), ("magnitude", 0)):
        arena = K.ScoreArena([("a", 4, 2), ("b", 3, 1)], stats=crit)
        calls.clear()
        sync.reduce_(arena)
        if n == 0:
            assert calls == [], crit
            continue
        assert len(calls) == 1, crit
        t = calls[0][0]
        assert t.numel() == (arena.n_channels if n is None else n * arena.n_units), crit
        assert t.untyped_storage().data_ptr() == arena.flat.untyped_storage().data_ptr()
