"""A model with masked Linears compiles with torch.compile (fullgraph) and gives the eager outputs
and gradients: x, weights, bias, the mask gradients a mask's .grad receives, and the mask-gradient
and squared-gradient accumulators (ScoreArena views) that the backward op adds into in place.

Backends: ``aot_eager`` (AOTAutograd traces forward and backward through the ops' fakes, runs them
eagerly) and ``inductor`` (generated C++ around the opaque tsprune ops; needs a C++ compiler, which
this machine has). The ops run on whatever backend the dispatcher picks for CPU tensors (C++ when
built, else torch)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tsprune_kernels as K


class _MaskedMLP(nn.Module):
    """Three Linears whose forward is tsprune_kernels.masked_linear with arena masks: l1 has both
    sides masked (blocks of 2 on its output), l2 its input side, l3 its output side with a plain
    leaf mask (no accumulator: its gradient goes to .grad)."""

    def __init__(self, arena: K.ScoreArena, leaf_mask: torch.Tensor):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1, self.l2, self.l3 = nn.Linear(12, 16), nn.Linear(16, 10, bias=False), nn.Linear(10, 6)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        # the arena's views, taken once outside the forward as tsprune.masking binds them
        self.m = {n: arena.mask_view(n) for n in arena.slots}
        self.g = {n: arena.grad_view(n) for n in arena.slots}
        self.s = {n: arena.sq_view(n) for n in arena.slots}
        self.leaf_mask = leaf_mask

    def forward(self, x):
        m, g, s = self.m, self.g, self.s
        h = K.masked_linear(x, self.l1.weight, self.l1.bias, m["l1.in"], m["l1.out"], 1, 2,
                            grad_acc_in=g["l1.in"], grad_acc_out=g["l1.out"],
                            sq_acc_in=s["l1.in"], sq_acc_out=s["l1.out"])
        h = torch.tanh(h)
        h = K.masked_linear(h, self.l2.weight, None, m["l2.in"], None, 4, 1,
                            grad_acc_in=g["l2.in"], sq_acc_in=s["l2.in"])
        h = torch.relu(h)
        return K.masked_linear(h, self.l3.weight, self.l3.bias, None, self.leaf_mask, 1, 1)


def _run(compile_backend: str | None):
    arena = K.ScoreArena([("l1.in", 12, 1), ("l1.out", 8, 2), ("l2.in", 4, 4)])
    with torch.no_grad():  # some pruned units: the zero-unit paths of the kernels run too
        arena.mask[[1, 5, 14, 22]] = 0.0
    leaf = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 2.0], requires_grad=True)
    model = _MaskedMLP(arena, leaf)
    fwd = model if compile_backend is None else torch.compile(model, backend=compile_backend, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    outs, xgrads = [], []
    for _ in range(2):  # two micro-batches: the accumulators add up
        x = torch.randn(3, 5, 12, generator=g, requires_grad=True)
        y = fwd(x)
        y.square().sum().backward()
        outs.append(y.detach())
        xgrads.append(x.grad)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return outs, xgrads, grads, leaf.grad, arena.acc.clone()


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_masked_model_compiles_fullgraph_with_eager_gradients(compile_backend):
    torch._dynamo.reset()
    e_out, e_xg, e_grads, e_leaf, e_acc = _run(None)
    c_out, c_xg, c_grads, c_leaf, c_acc = _run(compile_backend)
    tol = dict(atol=1e-5, rtol=1e-5)
    for a, b in zip(e_out + e_xg, c_out + c_xg):
        torch.testing.assert_close(b, a, **tol)
    assert e_grads.keys() == c_grads.keys()
    for n in e_grads:
        torch.testing.assert_close(c_grads[n], e_grads[n], **tol)
    torch.testing.assert_close(c_leaf, e_leaf, **tol)  # a mask's .grad
    assert float(e_acc.abs().min(1).values.max()) >= 0 and float(e_acc.abs().sum()) > 0
    torch.testing.assert_close(c_acc, e_acc, **tol)  # [grad; sq] accumulators, in place


def test_compiled_graph_keeps_the_ops():
    """The tsprune ops appear in the traced graph as ops (not graph breaks, not inlined Python)."""
    seen = []

    def spy_backend(gm, example_inputs):  # the graph and its subgraphs (autograd.Function bodies)
        for mod in gm.modules():
            if isinstance(mod, torch.fx.GraphModule):
                seen.extend(str(n.target) for n in mod.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    arena = K.ScoreArena([("l1.in", 12, 1), ("l1.out", 8, 2), ("l2.in", 4, 4)])
    model = _MaskedMLP(arena, torch.ones(6, requires_grad=True))
    y = torch.compile(model, backend=spy_backend, fullgraph=True)(torch.randn(2, 3, 12))
    assert y.shape == (2, 3, 6)
    assert sum("tsprune.masked_linear_fwd" in s for s in seen) == 3, seen


def test_pruner_masked_family_model_compiles_with_eager_mask_gradients(name="chronos-bolt"):
    """A real family model with the Pruner's masks attached (some units already pruned) under
    torch.compile (aot_eager: AOTAutograd traces forward and backward through the ops' fakes;
    fullgraph: the whole T5 loss is one graph): the loss and every arena statistic
    the backward adds into equal eager's, and the compiled graphs do contain the masked ops."""
    import sys
    import pathlib

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from test_adapters import CASES

    from tsprune import Pruner
    from tsprune.train import frozen

    case = CASES[name]
    seen: list[str] = []

    def spy_aot_eager(gm, example_inputs):  # record the graph's ops, then compile as aot_eager
        for mod in gm.modules():
            if isinstance(mod, torch.fx.GraphModule):
                seen.extend(str(n.target) for n in mod.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def run(compiled: bool):
        torch._dynamo.reset()
        model = case.build().eval()
        pruner = Pruner(model, criterion="taylor2", block=case.block, macro_batch_size=10**9)
        with torch.no_grad():  # a few pruned units so the zero-unit kernel paths run
            pruner.arena.mask[:: 7] = 0.0
        g = torch.Generator().manual_seed(3)
        losses = []
        with frozen(model):
            pruner.attach()
            loss_fn = (lambda c, t: pruner.adapter.loss(model, c, t, **case.loss_kw))
            if compiled:
                loss_fn = torch.compile(loss_fn, backend=spy_aot_eager, fullgraph=True)
            for _ in range(2):
                ctx, tgt = case.inputs(g)
                loss = loss_fn(ctx, tgt)
                loss.backward()
                losses.append(float(loss.detach()))
            acc = pruner.arena.acc.clone()
            pruner.detach()
        return losses, acc

    e_loss, e_acc = run(False)
    c_loss, c_acc = run(True)
    assert sum("tsprune.masked_linear_fwd" in t for t in seen) >= 8, "the masked Linears were not compiled"
    assert float(e_acc.abs().sum()) > 0
    torch.testing.assert_close(torch.tensor(c_loss), torch.tensor(e_loss), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_acc, e_acc, rtol=1e-4, atol=1e-6 * float(e_acc.abs().max()))
