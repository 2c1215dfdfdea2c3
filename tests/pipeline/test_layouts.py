"""The layout engine (python/tsprune/adapters/layout.py): every family's Layout describes its model,
a new family needs only a layout (a toy family written here, no class swap), the Pruner's sites
(residual sides dropped) plan exactly like the adapter's own, and the shared helpers (roll-out,
restructured attention forward) behave.

The conformance table of the real families is tests/pipeline/test_adapters.py."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_adapters import CASES, assert_exact, n_params, ones_masks
from tsprune import Pruner
from tsprune.adapters import Plan, ZeroLinear, get_adapter
from tsprune.adapters._common import roll_out
from tsprune.adapters.attention import heads_attention
from tsprune.adapters.layout import (
    FFN,
    Attention,
    Block,
    Layout,
    LayoutAdapter,
    adopt_class,
    check_layout,
    layout_sites,
)
from tsprune.masking import attach_masks
from tsprune.plan import load_exact, repack_model


# -- every family's layout ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_family_layout_describes_its_model(name):
    case = CASES[name]
    model = case.build()
    ad = get_adapter(model, block=case.block)
    assert isinstance(ad, LayoutAdapter)
    lay = ad.layout(model)
    check_layout(lay, model)
    assert ad.sites(model) == layout_sites(lay, model, block=case.block, heads=False)
    paths = {a.path for b in lay.blocks for a in b.attentions}
    assert paths and all(isinstance(model.get_submodule(p), lay.attention_cls.__mro__[1]) for p in paths)


def test_check_layout_refuses_a_wrong_description():
    model = CASES["patchtst"].build()
    ad = get_adapter(model)
    lay = ad.layout(model)
    a = lay.blocks[0].attentions[0]
    bad = Attention(a.path, a.kind, a.n_heads + 1, a.head_dim, a.sizes, proj=a.proj)
    with pytest.raises(ValueError, match="head channels"):
        check_layout(Layout((Block("x", (bad,)),), lay.attention_cls), model)
    bad = Attention(a.path, a.kind, a.n_heads, a.head_dim, (("num_heads", "heads"), ("x", "width")), proj=a.proj)
    with pytest.raises(ValueError, match="sizes"):
        check_layout(Layout((Block("x", (bad,)),), lay.attention_cls), model)
    with pytest.raises(ValueError, match="not a subclass"):
        check_layout(Layout((Block("x", (a,)),), nn.Linear), model)
    with pytest.raises(ValueError, match="cannot be restructured"):
        adopt_class(model.get_submodule(a.path), nn.Linear)


@pytest.mark.parametrize("name", ["chronos-bolt", "chronos2", "timesfm"])
def test_pruner_sites_plan_like_the_adapters(name):
    """Pruner(residual=False) drops the residual sides; planning with its sites gives the plan of the
    adapter's own sites (a side without a mask is fully alive either way)."""
    case = CASES[name]
    model = case.build()
    pr = Pruner(model, block=case.block, macro_batch_size=1)
    assert len(pr.sites) == len(pr.adapter.sites(model))
    assert all(s.mask_in is None or s.mask_out is None for s in pr.sites)
    g = torch.Generator().manual_seed(1)
    masks = {n: (torch.rand(m.numel(), generator=g) > 0.4).float() for n, m in pr.masks.items()}
    own = pr.adapter.plan(model, masks).to_json()
    assert pr.adapter.plan(model, masks, sites=pr.sites).to_json() == own
    pr.detach()


# -- a new family is one layout ---------------------------------------------------------------------
def _eager(mod, q, k, v, mask, *, dropout, scaling):
    """[B, h, S, d] -> ([B, S, h, d_v], weights): plain softmax attention."""
    w = torch.softmax(q @ k.transpose(-1, -2) * scaling, dim=-1)
    return (w @ v).transpose(1, 2), w


class ToyAttention(nn.Module):
    """Reads its sizes from attributes, so the engine restructures it without a class swap."""

    def __init__(self, d: int, h: int, hd: int):
        super().__init__()
        self.n_heads, self.head_dim, self.v_head_dim = h, hd, hd
        self.scaling = hd**-0.5  # the original 1/sqrt(head_dim), kept after pruning
        self.q, self.k, self.v = (nn.Linear(d, h * hd) for _ in range(3))
        self.o = nn.Linear(h * hd, d)

    def forward(self, x):
        return heads_attention(self, x, None, None, proj=("q", "k", "v", "o"),
                               dims=(self.n_heads, self.head_dim, self.v_head_dim), attention=_eager,
                               scaling=self.scaling, dropout=0.0)[0]


class ToyFFN(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, f), nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Toy(nn.Module):
    def __init__(self, d=16, h=4, hd=6, f=24, n=2):
        super().__init__()
        self.inp, self.out = nn.Linear(1, d), nn.Linear(d, 1)
        self.attn = nn.ModuleList(ToyAttention(d, h, hd) for _ in range(n))
        self.ffn = nn.ModuleList(ToyFFN(d, f) for _ in range(n))

    def forward(self, x):  # [B, S] -> [B, S]
        z = self.inp(x.unsqueeze(-1))
        for a, f in zip(self.attn, self.ffn):
            z = z + a(z)
            z = z + f(z)
        return self.out(z).squeeze(-1)


class ToyAdapter(LayoutAdapter):
    family = "toy"
    sizes = (("n_heads", "heads"), ("head_dim", "qk_dim"), ("v_head_dim", "v_dim"))

    def layout(self, model):
        return Layout(tuple(
            Block(f"layer.{i}",
                  (Attention(f"attn.{i}", "self_attn", a.n_heads, a.head_dim, self.sizes),),
                  (FFN(f"ffn.{i}", ("ffn.up", f"ffn.{i}.up"), ("ffn.down", f"ffn.{i}.down"), F.silu,
                       gate=("ffn.gate", f"ffn.{i}.gate")),))
            for i, a in enumerate(model.attn)
        ))  # attention_cls None: attributes only


@pytest.mark.parametrize("heads", [False, True])
def test_a_new_family_is_one_layout(heads):
    torch.manual_seed(0)
    model = Toy().double().eval()
    ad = ToyAdapter(model, block=4, heads=heads)
    sites = ad.sites(model)
    assert [s.kind for s in sites[:7]] == ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                                           "ffn.gate", "ffn.up", "ffn.down"]
    g = torch.Generator().manual_seed(3)
    masks = {n: (torch.rand(m.numel(), generator=g, dtype=torch.float64) > 0.4).double()
             for n, m in ones_masks(sites, torch.float64).items()}
    masks["attn.1.v.out"].zero_()  # layer 1 loses every head
    x = torch.randn(3, 10, generator=g, dtype=torch.float64)
    with torch.no_grad():
        attach_masks(model, sites, masks)
        ref = model(x)
        new, plan = repack_model(model, ad, sites, masks)
        assert_exact(new(x), ref)
    assert n_params(new) < n_params(model)
    assert type(new.attn[0]) is ToyAttention and isinstance(new.attn[1].o, ZeroLinear)
    assert plan.extra["heads"]["attn.1"] == [] and new.attn[1].n_heads == 0
    fresh = Toy().double().eval()
    ad.apply_plan(fresh, Plan.from_json(json.loads(json.dumps(plan.to_json(with_keep=False)))))
    load_exact(fresh, new.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), new(x), atol=0, rtol=0)


# -- shared helpers ---------------------------------------------------------------------------------
def test_roll_out_appends_each_block_to_the_context():
    seen = []

    def step(ctx):  # forecasts 3 steps: the last value + 1, 2, 3
        seen.append(ctx.shape[-1])
        return ctx[:, -1:] + torch.arange(1, 4, dtype=ctx.dtype)

    y = roll_out(step, torch.zeros(2, 5), 7)
    assert seen == [5, 8, 11]
    torch.testing.assert_close(y, torch.tensor([[1.0, 2, 3, 4, 5, 6, 7]] * 2))
