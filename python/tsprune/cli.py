"""The ``tsprune`` command: prune, finetune, evaluate, and run (all three settings in one go).

    tsprune run --data ETTh1 --horizon 96 --out runs/etth1      # zero-shot, fine-tune, prune-then-finetune
    tsprune prune --model default --data ETTh1 --out runs/p     # calibrate + repack + save
    tsprune finetune --model runs/p/pruned_model --data ETTh1 --out runs/f
    tsprune evaluate --model runs/f/model --data ETTh1
    torchrun --nproc_per_node=2 -m tsprune prune --data ETTh1 --out runs/p   # data-parallel calibration

Stage of the flow: glue only. Reads a model (models.py) and a task (data.py), drives the Pruner and
the loops (train.py), writes results (JSON + markdown table + sparsity heatmap) atomically.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import sys
import tempfile
import time

import torch


def _log(msg: str) -> None:
    from . import distributed as D

    if D.is_main():  # under torchrun: rank 0 only
        print(msg, file=sys.stderr, flush=True)


def _write_json(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=float)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _default_data() -> str:
    from .data import resolve_csv

    try:
        resolve_csv("ETTh1", download=False)
        return "ETTh1"
    except FileNotFoundError:
        return "synthetic"


def _task(a, model):
    from .data import make_task

    lookback = a.lookback or _context_length(model)
    data = a.data or _default_data()
    _log(f"data: {data}, lookback {lookback}, horizon {a.horizon}")
    return make_task(data, lookback, a.horizon, data_dir=a.data_dir, max_train_windows=a.max_train_windows,
                     max_eval_windows=a.max_eval_windows)


def _context_length(model) -> int:
    cc = getattr(model, "chronos_config", None)
    if cc is not None:
        return int(cc.context_length)
    cfg = getattr(model, "config", None)
    for k in ("context_length", "context_len"):
        if cfg is not None and getattr(cfg, k, None):
            return int(getattr(cfg, k))
    return 512


def _pruner_kwargs(a, n_train: int) -> dict:
    return dict(criterion=a.criterion, ema=a.ema, block=a.block, heads=a.heads,
                prune_ratio_per_epoch=a.prune_ratio_per_epoch, macro_batch_size=a.macro_batch_size,
                samples_per_epoch=n_train, max_prune_ratio=a.max_prune_ratio, residual=a.residual)


def _metrics(model, adapter, ds, a) -> dict:
    from .models import n_params
    from .train import evaluate

    t = time.time()
    m = evaluate(model, adapter, ds, a.batch_size, progress=a.progress)
    return {"mse": m["mse"], "mae": m["mae"], "n_windows": m["n"], "params": n_params(model),
            "eval_seconds": round(time.time() - t, 2)}


def _prune(model, task, a, out: pathlib.Path):
    """Calibrate with masks, repack, check exactness; returns (pruned model, report dict)."""
    from . import distributed as D
    from .plots import sparsity_heatmap
    from .pruner import Pruner
    from .train import calibrate, mean_loss

    ddp = D.is_dist()  # under torchrun: data-parallel calibration, the model on this rank's device
    if ddp:
        model.to(D.comm_device())
    pruner = Pruner(model, **_pruner_kwargs(a, len(task.train)))
    t = time.time()
    cal = calibrate(model, pruner, task.train, task.val, epochs=a.calib_epochs, batch_size=a.batch_size,
                    patience=a.patience, val_tolerance=a.val_tolerance, seed=a.seed,
                    progress=a.progress and D.is_main(), log=_log)
    calib_s = time.time() - t
    masked_val = mean_loss(model, pruner.adapter, task.val, a.batch_size, distributed=ddp)
    small = pruner.repack()
    pruner.detach()
    repacked_val = mean_loss(small, pruner.adapter, task.val, a.batch_size, distributed=ddp)
    if ddp:
        small.cpu()  # fine-tuning, evaluation and saving run on the CPU, as in one process
    heat = (sparsity_heatmap(pruner.sites, pruner.sparsity_by_site(), out / "sparsity.png",
                             title=f"{task.name}: units pruned per layer / module")
            if D.is_main() else out / "sparsity.png")  # files: rank 0 only
    report = {
        "pruned_units_fraction": pruner.pruned_fraction(),
        "best_epoch": cal.best_epoch,
        "calibration": cal.history,
        "calibration_seconds": round(calib_s, 2),
        "calibration_windows": cal.windows,
        "calibration_windows_per_second": round(cal.windows / calib_s, 1),
        "val_loss_masked": masked_val,
        "val_loss_repacked": repacked_val,
        "heatmap": str(heat),
        "sparsity_by_mask": pruner.sparsity_by_site(),
    }
    if ddp:
        report["distributed"] = {"world_size": D.world_size(), "backend": str(torch.distributed.get_backend()),
                                 **pruner.comm.stats}
    _log(f"pruned {report['pruned_units_fraction']:.1%} of units; val loss masked {masked_val:.5f} "
         f"vs repacked {repacked_val:.5f}")
    return small, report


def _finetune(model, adapter, task, a):
    from .train import finetune

    return finetune(model, adapter, task.train, task.val, epochs=a.ft_epochs, lr=a.lr,
                    batch_size=a.batch_size, patience=a.patience, max_steps=a.ft_max_steps,
                    seed=a.seed, progress=a.progress, log=_log)


def cmd_run(a) -> dict:
    from . import distributed as D
    from .adapters import get_adapter
    from .models import load_model
    from .plan import save_pruned
    from .plots import results_table

    out = pathlib.Path(a.out)
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = load_model(a.model)
    adapter = get_adapter(base)
    task = _task(a, base)
    _log(task.summary() if hasattr(task, "summary") else str(task))
    if D.is_dist():  # data-parallel calibration on every rank first; the rest runs on rank 0 alone
        pr = copy.deepcopy(base)
        small, rep = _prune(pr, task, a, out)
        del pr
        if not D.is_main():
            return {}
    results: dict = {"config": {**{k: v for k, v in vars(a).items() if k != "func"}, "data": task.name}}

    results["zero_shot"] = _metrics(base, adapter, task.test, a)
    _log(f"zero-shot: {results['zero_shot']}")

    ft = copy.deepcopy(base)
    ft_hist = _finetune(ft, adapter, task, a)
    results["finetune"] = {**_metrics(ft, adapter, task.test, a), "train": ft_hist}
    _log(f"finetune: mse {results['finetune']['mse']:.4f}")
    del ft

    if not D.is_dist():
        pr = copy.deepcopy(base)
        small, rep = _prune(pr, task, a, out)
        del pr
    ft_hist = _finetune(small, adapter, task, a)
    results["prune_finetune"] = {**_metrics(small, adapter, task.test, a), "prune": rep, "train": ft_hist}
    save_pruned(small, out / "pruned_model", extra={"data": task.name, "horizon": a.horizon})
    results["seconds"] = round(time.time() - t0, 1)
    _write_json(out / "results.json", results)
    table = results_table(results)
    _write_text(out / "results.md", f"# tsprune run: {task.name}, horizon {a.horizon}\n\n{table}\n")
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'sparsity.png'}, {out / 'pruned_model'}")
    return results


def cmd_prune(a) -> dict:
    from . import distributed as D
    from .models import load_model, n_params
    from .plan import save_pruned

    out = pathlib.Path(a.out)
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
    model = load_model(a.model)
    task = _task(a, model)
    before = n_params(model)
    small, rep = _prune(model, task, a, out)
    rep.update(params_before=before, params_after=n_params(small))
    if D.is_main():  # under torchrun every rank holds the same pruned model; rank 0 writes it
        save_pruned(small, out / "pruned_model", extra={"data": task.name})
        _write_json(out / "prune.json", rep)
        print(f"params {before:,} -> {rep['params_after']:,}; saved {out / 'pruned_model'}")
    D.barrier("final barrier (rank 0 writing the results)")  # a failed write fails every rank
    return rep


def cmd_finetune(a) -> dict:
    from .adapters import get_adapter
    from .models import load_model
    from .plan import save_pruned

    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(a.model)
    adapter = get_adapter(model)
    task = _task(a, model)
    hist = _finetune(model, adapter, task, a)
    res = {**_metrics(model, adapter, task.test, a), "train": hist}
    save_pruned(model, out / "model", extra={"data": task.name, "finetuned": True})
    _write_json(out / "finetune.json", res)
    print(f"test mse {res['mse']:.4f} mae {res['mae']:.4f}; saved {out / 'model'}")
    return res


def cmd_evaluate(a) -> dict:
    from .adapters import get_adapter
    from .models import load_model

    model = load_model(a.model)
    task = _task(a, model)
    res = _metrics(model, get_adapter(model), task.test, a)
    print(json.dumps(res, indent=1))
    if a.out:
        _write_json(pathlib.Path(a.out) / "evaluate.json", res)
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tsprune", description="prune-then-finetune for time series foundation models")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, out_required=True):
        sp.add_argument("--model", default="default", help="default | tsprune save dir | checkpoint dir | hub name")
        sp.add_argument("--data", default=None, help="CSV path or name (ETTh1, ...; default: ETTh1 if found, else synthetic)")
        sp.add_argument("--data-dir", default=None, help="folder of CSVs searched first (also $TSPRUNE_DATA_DIR)")
        sp.add_argument("--horizon", type=int, default=96)
        sp.add_argument("--lookback", type=int, default=None, help="default: the model's context length")
        sp.add_argument("--out", required=out_required)
        sp.add_argument("--batch-size", type=int, default=64)
        sp.add_argument("--max-train-windows", type=int, default=16384)
        sp.add_argument("--max-eval-windows", type=int, default=4096)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--threads", type=int, default=None)
        sp.add_argument("--no-progress", dest="progress", action="store_false")
        sp.add_argument("--dist-timeout", type=float, default=None,
                        help="under torchrun: seconds any collective may wait before the run fails "
                             "(default $TSPRUNE_DIST_TIMEOUT or 600)")

    def prune_args(sp):
        sp.add_argument("--criterion", default="taylor", choices=["taylor", "taylor2", "fisher", "magnitude", "wanda"])
        sp.add_argument("--ema", type=float, default=0.5)
        sp.add_argument("--block", type=int, default=1, help="channels per FFN / residual unit")
        sp.add_argument("--heads", action="store_true", help="attention units are whole heads")
        sp.add_argument("--prune-ratio-per-epoch", type=float, default=0.1)
        sp.add_argument("--macro-batch-size", type=int, default=1024)
        sp.add_argument("--max-prune-ratio", type=float, default=0.8)
        sp.add_argument("--calib-epochs", type=int, default=4)
        sp.add_argument("--val-tolerance", type=float, default=0.001,
                        help="keep the latest masks whose val loss is within this relative tolerance "
                             "of the best (0: SPEC rule, keep the best; default 0.1%%)")
        sp.add_argument("--residual", action="store_true",
                        help="also mask residual-stream sides (paper behaviour; zeros stay as zero weights)")

    def ft_args(sp):
        sp.add_argument("--ft-epochs", type=int, default=1)
        sp.add_argument("--ft-max-steps", type=int, default=None)
        sp.add_argument("--lr", type=float, default=1e-4)

    for name, fn, extra in (("run", cmd_run, (prune_args, ft_args)), ("prune", cmd_prune, (prune_args,)),
                            ("finetune", cmd_finetune, (ft_args,)), ("evaluate", cmd_evaluate, ())):
        sp = sub.add_parser(name, help=fn.__doc__)
        common(sp, out_required=name != "evaluate")
        sp.add_argument("--patience", type=int, default=1)
        for f in extra:
            f(sp)
        sp.set_defaults(func=fn)
    return p


def main(argv=None) -> int:
    from . import distributed as D

    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    own_group = False
    try:
        # torchrun --nproc_per_node=N -m tsprune ...: one process group (gloo on CPU, nccl on GPUs)
        own_group = D.init_from_env(timeout_s=a.dist_timeout)
        a.func(a)
    except (FileNotFoundError, ValueError, RuntimeError, TypeError) as e:
        where = f" (rank {D.rank()}/{D.world_size()})" if D.is_dist() or D.launched() else ""
        print(f"tsprune {a.cmd}: error{where}: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if own_group:
            D.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
