"""Issue 13: the shared residual-stream mask and sub-block gates, removed physically and exactly.

For every family that declares them (T5: Chronos-Bolt, Chronos; TimesFM 1/2 and 2.5; Chronos-2), with
``Pruner(residual=True, layers=True)``: random 0/1 residual and gate masks on top of random inner
masks (inner and gate values partly non-binary) -> the repacked model computes the masked model's
output (fp32: 1e-5 of the output scale, float64: 1e-10), has fewer parameters, a smaller stream and
fewer sub-blocks, and saves / loads exactly; the shared masks' accumulated gradients equal float64
central differences of the loss; the per-parameter score scale equals the parameters a unit really
removes; families without a declared stream refuse with the reason.
"""
from __future__ import annotations

import math

import pytest
import torch

from test_adapters import CASES, assert_exact, n_params
from tsprune import Pruner
from tsprune.adapters import get_adapter
from tsprune.checkpoint import load_pruned, save_pruned

FAMILIES = ["chronos-bolt", "chronos", "chronos-t5", "timesfm", "timesfm2.5", "chronos2"]


@pytest.fixture
def f64_norms(monkeypatch):
    """T5LayerNorm and TimesFM's RMS norms compute their variance in float32 even in a float64
    model, so a float64 run of them is exact only to float32 rounding (which the fp32 tests judge
    at 1e-5). For the float64 checks of the rescaling algebra (1e-10) and of gradients against
    finite differences, they keep float64 here; the formula is the models' own."""
    from chronos.chronos2.layers import Chronos2LayerNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm
    from transformers.models.timesfm.modeling_timesfm import TimesFmRMSNorm

    def forward(self, x):
        if x.dtype != torch.float64:
            return type(self)._orig_forward(self, x)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    classes = [T5LayerNorm, TimesFmRMSNorm, Chronos2LayerNorm]
    try:
        from transformers.models.timesfm2_5.modeling_timesfm2_5 import TimesFm2_5RMSNorm
        classes.append(TimesFm2_5RMSNorm)
    except ImportError:  # pragma: no cover
        pass
    for c in classes:
        monkeypatch.setattr(c, "_orig_forward", c.forward, raising=False)
        monkeypatch.setattr(c, "forward", forward)


def _pruner(case, model, **kw):
    return Pruner(model, block=case.block, residual=True, layers=True, **kw)


def _random_masks_(p: Pruner, g: torch.Generator, *, gates_fractional: bool = True) -> None:
    """Inner masks: ~35% zeros, ~15% values in (0.25, 1.5); residual: ~30% zeros (0/1 only: a
    fractional stream value cannot be repacked); gates: every third off, others 1 or fractional."""
    with torch.no_grad():
        for name, m in p.masks.items():
            if name == "residual":
                keep = (torch.rand(m.numel(), generator=g) >= 0.3).float()
                keep[0] = 1.0
                m.copy_(keep)
            elif name.endswith(".gate"):
                continue
            else:
                v = (torch.rand(m.numel(), generator=g) >= 0.35).double()
                odd = torch.rand(m.numel(), generator=g) < 0.15
                vals = 0.25 + 1.25 * torch.rand(m.numel(), generator=g, dtype=torch.float64)
                m.copy_(torch.where(odd & (v > 0), vals, v))
        gates = [n for n in p.masks if n.endswith(".gate")]
        for i, name in enumerate(gates):
            val = 0.0 if i % 3 == 1 else (0.5 + float(torch.rand(1, generator=g)) if gates_fractional and i % 3 == 2 else 1.0)
            p.masks[name].fill_(val)


def _built(name, dtype=torch.float32):
    case = CASES[name]
    model = case.build().to(dtype)
    for q in model.parameters():
        q.requires_grad_(False)
    return case, model


def _stream_width(model, ad):
    return ad.layout(model).residual.width


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", FAMILIES)
def test_repack_with_residual_and_gates_matches_masked(name, dtype, request):
    if dtype == torch.float64:
        request.getfixturevalue("f64_norms")
    case, model = _built(name, dtype)
    p = _pruner(case, model)
    assert "residual" in p.masks and any(n.endswith(".gate") for n in p.masks)
    g = torch.Generator().manual_seed(13)
    _random_masks_(p, g)
    ctx, tgt = case.inputs(torch.Generator().manual_seed(14))
    ctx, tgt = ctx.to(dtype), tgt.to(dtype)
    with torch.no_grad():
        unmasked = case.output(model, ctx)
    p.attach()
    with torch.no_grad():
        ref = case.output(model, ctx)
        ref_loss = p.adapter.loss(model, ctx, tgt, **case.loss_kw)
    assert float((ref - unmasked).abs().max()) > 1e-3, "masks should change the output"
    new = p.repack()
    with torch.no_grad():
        assert_exact(case.output(new, ctx), ref)
        assert_exact(p.adapter.loss(new, ctx, tgt, **case.loss_kw), ref_loss)
    plan = new.tsprune_plan
    d = _stream_width(model, p.adapter)
    kept = plan.extra["residual"]
    assert len(kept) == int(p.masks["residual"].sum()) * p.arena.slots["residual"].block < d
    off = [k for k, v in plan.extra["gates"].items() if v == 0]
    assert len(off) == sum(float(m) == 0 for n, m in p.masks.items() if n.endswith(".gate")) > 0
    for path in off:  # a gated-off sub-block keeps no weight of its Linears
        assert all(plan.linears[q].get("zero") for q in plan.linears if q.startswith(path + "."))
    assert n_params(new) < n_params(model)


@pytest.mark.parametrize("name", [f for f in FAMILIES if f != "chronos"])  # the ChronosModel wrapper has no .config to save
def test_save_load_round_trip(name, tmp_path):
    case, model = _built(name)
    p = _pruner(case, model)
    _random_masks_(p, torch.Generator().manual_seed(21))
    new = p.repack()
    save_pruned(new, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    ctx, _ = case.inputs(torch.Generator().manual_seed(22))
    with torch.no_grad():
        torch.testing.assert_close(case.output(back, ctx), case.output(new, ctx), atol=0, rtol=0)
    assert n_params(back) == n_params(new)


@pytest.mark.parametrize("name", ["chronos-bolt", "timesfm", "timesfm2.5", "chronos2"])
def test_shared_mask_gradients_equal_finite_differences(name, f64_norms):
    """The arena's residual and gate gradients (summed over every place the mask acts) against
    float64 central differences of the loss, at non-binary mask values."""
    case, model = _built(name, torch.float64)
    p = _pruner(case, model)
    g = torch.Generator().manual_seed(31)
    with torch.no_grad():
        for n, m in p.masks.items():
            m.copy_(0.6 + 0.8 * torch.rand(m.numel(), generator=g, dtype=torch.float64))
    p.attach()
    ctx, tgt = case.inputs(torch.Generator().manual_seed(32))
    ctx, tgt = ctx.double(), tgt.double()
    p.adapter.loss(model, ctx, tgt, **case.loss_kw).backward()
    gates = [n for n in p.masks if n.endswith(".gate")]
    checks = [("residual", 0), ("residual", 5), (gates[0], 0), (gates[-1], 0), (gates[len(gates) // 2], 0)]
    for name_, i in checks:
        got = float(p.arena.grad_view(name_)[i])
        m = p.masks[name_]
        h = 2.0 ** -16  # the arena's masks are fp32: a power of two steps them exactly
        with torch.no_grad():
            m[i] += h
            up = float(p.adapter.loss(model, ctx, tgt, **case.loss_kw))
            m[i] -= 2 * h
            dn = float(p.adapter.loss(model, ctx, tgt, **case.loss_kw))
            m[i] += h
        fd = (up - dn) / (2 * h)
        assert math.isclose(got, fd, rel_tol=1e-4, abs_tol=1e-7), f"{name_}[{i}]: arena {got} vs finite difference {fd}"


@pytest.mark.parametrize("name", ["chronos-bolt", "timesfm2.5", "chronos2"])
def test_unit_params_equal_the_parameters_a_unit_removes(name):
    """The score scale's denominators: removing one residual unit (or one gate) alone removes
    exactly the parameters adapter.unit_params says (tied tables counted once)."""
    case, model = _built(name)
    p = _pruner(case, model)
    par = p.adapter.unit_params(model, p.sites, p.points)
    full = n_params(model)
    with torch.no_grad():
        p.masks["residual"][3] = 0.0
    assert full - n_params(p.repack()) == par["residual"]
    with torch.no_grad():
        p.masks["residual"][3] = 1.0
        gate = [n for n in p.masks if n.endswith(".gate")][1]
        p.masks[gate].zero_()
    assert full - n_params(p.repack()) == par[gate]
    # and the arena's scale is p_inner / p_unit for those units, 1 elsewhere
    s = p.unit_scale
    slot = p.arena.slots["residual"]
    assert torch.allclose(s[slot.offset : slot.offset + slot.units], torch.tensor(par["inner"] / par["residual"]))
    assert float(s[p.arena.slots[gate].offset]) == pytest.approx(par["inner"] / par[gate])
    inner = [sl for n, sl in p.arena.slots.items() if n != "residual" and not n.endswith(".gate")]
    assert all(bool((s[sl.offset : sl.offset + sl.units] == 1).all()) for sl in inner)


def test_calibration_prunes_residual_and_gates_and_repacks():
    """A short Pruner run on Chronos-Bolt: residual and gate units take part in the global ranking
    (scores scaled per parameter), the repacked model equals the masked one."""
    case, model = _built("chronos-bolt")
    p = _pruner(case, model, prune_ratio_per_epoch=0.6, macro_batch_size=3, max_prune_ratio=0.8).attach()
    g = torch.Generator().manual_seed(41)
    for _ in range(4):
        ctx, tgt = case.inputs(g)
        p.adapter.loss(model, ctx, tgt).backward()
        p.step(ctx.shape[0])
    assert p.macro_steps >= 2 and p.pruned_fraction() > 0.3
    assert 0 < int((p.masks["residual"] == 0).sum()) < p.masks["residual"].numel()
    ctx, _ = case.inputs(torch.Generator().manual_seed(42))
    with torch.no_grad():
        ref = case.output(model, ctx)
    new = p.repack()
    with torch.no_grad():
        assert_exact(case.output(new, ctx), ref)


@pytest.mark.parametrize("name", ["patchtst", "patchtsmixer"])
def test_families_without_a_declared_stream_refuse(name):
    case, model = _built(name)
    with pytest.raises(ValueError, match="declares no residual stream"):
        Pruner(model, block=case.block, residual=True)


def test_options_are_checked():
    case, model = _built("chronos-bolt")
    with pytest.raises(ValueError, match="residual must be"):
        Pruner(model, residual="both")
    with pytest.raises(ValueError, match="only 'grad'"):
        Pruner(model, residual=True, criterion="fisher")
    p = Pruner(model, residual=True)
    with torch.no_grad():
        p.masks["residual"][0] = 0.5
    with pytest.raises(ValueError, match="only 0 and 1"):
        p.repack()
    with torch.no_grad():
        p.masks["residual"].zero_()
    with pytest.raises(ValueError, match="every channel"):
        p.repack()


def test_paper_mode_keeps_per_linear_residual_masks():
    case, model = _built("chronos-bolt")
    p = Pruner(model, residual="paper")
    assert "residual" not in p.masks
    assert any(s.residual_in and s.mask_in is not None and s.mask_name("in") != "residual" for s in p.sites)
    ad = get_adapter(model)
    assert sum(1 for s in ad.sites(model) if s.residual_in or s.residual_out) == sum(
        1 for s in p.sites if s.residual_in or s.residual_out)


def test_cli_run_with_residual_and_layers(tmp_path):
    """`tsprune run --residual --layers` on the embedded default: results.json reports the stream
    width kept and the sub-blocks removed, the saved pruned model loads with that width, the
    heatmap has the gate columns and the residual row."""
    import contextlib
    import io
    import json

    from test_cli_run import FAST
    from tsprune.cli import main
    from tsprune.plots import sparsity_grid

    out = tmp_path / "run"
    e = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(e):
        rc = main(["run", *FAST, "--out", str(out), "--residual", "--layers", "--prune-ratio-per-epoch", "0.5",
                   "--val-tolerance", "10"])
    assert rc == 0, e.getvalue()
    res = json.loads((out / "results.json").read_text())
    prune = res["prune_finetune"]["prune"]
    assert prune["residual_width"]["of"] == 64 and 0 < prune["residual_width"]["kept"] <= 64
    assert isinstance(prune["sub_blocks_removed"], list)
    assert "residual" in prune["sparsity_by_mask"]
    assert any(k.endswith(".gate") for k in prune["sparsity_by_mask"])
    assert (out / "sparsity.png").is_file()
    back = load_pruned(out / "pruned_model")
    kept = back.tsprune_plan.extra.get("residual")
    assert back.encoder.final_layer_norm.weight.numel() == (len(kept) if kept else 64)
    # the grid the heatmap draws: gate columns, one residual row, no repeated residual columns
    model = Pruner(CASES["chronos-bolt"].build(), residual=True, layers=True)
    layers, cols, _ = sparsity_grid(model.sites, {n: 0.0 for n in model.masks}, model.points)
    assert "residual" in layers and "residual" in cols and "self_attn.gate" in cols and "ffn.gate" in cols
    assert "self_attn.q.in" not in cols  # q's input side is the shared stream mask, shown once


@pytest.mark.parametrize("name", ["chronos-bolt", "timesfm", "timesfm2.5", "chronos2"])
def test_compaction_with_residual_and_gates_prunes_the_same_units(name, f64_norms):
    """Calibration on the compacted model (stream shrunk, gated-off sub-blocks dropped after every
    pruning step) prunes exactly the units the full-size masked model prunes (float64), and both
    repack to the same model."""
    case = CASES[name]

    def run(compact):
        _, model = _built(name, torch.float64)
        model.eval()
        p = _pruner(case, model, ema=0.5, prune_ratio_per_epoch=0.4, macro_batch_size=1, max_prune_ratio=0.8,
                    compact=compact).attach()
        g = torch.Generator().manual_seed(51)
        masks, losses = [], []
        for _ in range(4):
            ctx, tgt = case.inputs(g)
            loss = p.adapter.loss(model, ctx.double(), tgt.double(), **case.loss_kw)
            loss.backward()
            losses.append(float(loss.detach()))
            p.step(1)
            masks.append({n: (m != 0).clone() for n, m in p.masks.items()})
        return model, p, masks, losses

    m0, p0, k0, l0 = run(False)
    m1, p1, k1, l1 = run(True)
    assert p1.compacted and not p0.compacted
    assert int((p1.masks["residual"] == 0).sum()) > 0, "the stream should have lost units"
    for step, (a, b) in enumerate(zip(k0, k1)):
        for n in a:
            assert torch.equal(a[n], b[n]), f"step {step}: {n} differs"
    for x, y in zip(l0, l1):
        assert abs(x - y) <= 1e-9 * max(1.0, abs(x)), (l0, l1)
    ctx, _ = case.inputs(torch.Generator().manual_seed(52))
    with torch.no_grad():
        assert_exact(case.output(m1, ctx.double()), case.output(m0, ctx.double()))
        r0, r1 = p0.repack(), p1.repack()
        assert n_params(r0) == n_params(r1)
        assert_exact(case.output(r1, ctx.double()), case.output(r0, ctx.double()))


def test_the_stream_keeps_one_unit():
    """A step that would take the stream's last unit gives back its most important one, so the
    pruned model always has a stream to repack."""
    case, model = _built("chronos-bolt")
    p = _pruner(case, model, macro_batch_size=1, max_prune_ratio=0.99).attach()
    ctx, tgt = case.inputs(torch.Generator().manual_seed(61))
    p.adapter.loss(model, ctx, tgt).backward()
    info = p.prune_now(ratio=1.0)
    r = p.masks["residual"]
    assert int((r != 0).sum()) == 1
    assert info.live_after == p.arena.n_live()
    with torch.no_grad():
        ref = case.output(model, ctx)
    assert_exact(case.output(p.repack(), ctx), ref)
