"""Issue 10: the paper's table on the embedded default model.

For each cell (data set, horizon) this runs ``tsprune run --search --seeds S`` in a subprocess:
zero-shot, fine-tune and prune-then-finetune with their hyper-parameters picked on VALIDATION MSE
from grids of the same size for both trained settings (fine-tune: lr; prune-then-finetune: the same
lr grid x prune ratio per epoch x ema), the picks repeated over S seeds, plus seasonal naive and the
NLinear-style ridge map, all on every window of the standard test split. Each cell writes
``<runs>/<data>_h<H>/results.json``; a cell whose results.json exists is not run again (the sweep is
resumable: rerun the same command after an interruption; a cell stopped midway continues from its
journal, ``tsprune run --resume``, so no finished fine-tune, calibration or test pass is repeated;
cells already in the committed accuracy.json are restored into a missing run folder rather than
re-run). A cell longer than a session: ``--snapshot`` copies the journal records (not the models)
of unfinished cells into ``benchmarks/results/accuracy_progress/<cell>/``; committed, they are put
back in a new checkout and the cell resumes there (the models later stages need are made again,
with the same seeds and checked against their records, so the numbers are those of an
uninterrupted run or the resume stops with one line; tests/pipeline/
test_cli_resume.py checks it). Then every finished cell is gathered into
``benchmarks/results/accuracy.json`` and ``accuracy.md``: mean +- std per row, parameters kept, whether
prune-then-finetune beats fine-tune by more than one standard deviation (of either), and the average
relative MSE change of prune-then-finetune against fine-tune (the paper's "4.4%" figure). Cells not
run are listed as such, never filled in.

    python benchmarks/bench_accuracy.py [--cells ETTh1:96,ETTh2:96] [--seeds 3] [--runs runs/accuracy]
        [--gather-only | --snapshot] [-- extra tsprune run options]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, write  # noqa: E402

LONG = (96, 192, 336, 720)
ALL_CELLS = ([(d, h, 512) for d in ("ETTh1", "ETTh2", "exchange_rate") for h in LONG]
             + [("national_illness", h, 104) for h in (24, 36, 48, 60)])


def parse_cells(spec: str | None):
    if not spec:
        return ALL_CELLS
    known = {(d, h): lb for d, h, lb in ALL_CELLS}
    out = []
    for item in spec.split(","):
        d, _, h = item.partition(":")
        if not h.isdigit():
            raise SystemExit(f"bench_accuracy: --cells entry {item!r} is not DATA:HORIZON")
        lb = known.get((d, int(h)), 104 if d == "national_illness" else 512)
        out.append((d, int(h), lb))
    return out


def restore_cells(runs: pathlib.Path, table: pathlib.Path) -> list[str]:
    """Cells finished earlier whose run folders are gone (a new checkout): write each one's
    results.json back from the committed table's rows (marked ``restored_from``), so they are
    skipped and gathered again instead of re-run. Returns the cells restored."""
    if not table.is_file():
        return []
    done = []
    t = json.loads(table.read_text())
    for r in t.get("rows", []):
        res = runs / f"{r['data']}_h{r['horizon']}" / "results.json"
        if r.get("status") != "done" or res.is_file():
            continue
        res.parent.mkdir(parents=True, exist_ok=True)
        keep = {k: r[k] for k in ("zero_shot", "finetune", "prune_finetune", "baselines", "search", "seconds")
                if k in r}
        res.write_text(json.dumps({**keep, "restored_from": f"{table.name} gathered at commit {t.get('commit')}"}))
        done.append(f"{r['data']}:{r['horizon']}")
    return done


PROGRESS = HERE / "results" / "accuracy_progress"


def _progress_files(prog: pathlib.Path) -> list[pathlib.Path]:
    """What a snapshot keeps of a journal: run.json, the stage records and the heatmaps; no model
    (a stage whose model is missing runs again on resume, with the same seed and the same result)."""
    return sorted(f for f in prog.iterdir() if f.is_file() and not f.name.startswith(".")
                  and not f.name.endswith(".tag.json") and f.suffix in (".json", ".png"))


def _cells_in(folder: pathlib.Path) -> list[pathlib.Path]:
    """The cell folders (``<data>_h<H>``) in ``folder``; hidden ones (temp copies) are not cells."""
    if not folder.is_dir():
        return []
    return sorted(c for c in folder.glob("*_h*") if c.is_dir() and not c.name.startswith("."))


def _place_records(src: pathlib.Path, dest: pathlib.Path, inner: str = "") -> bool:
    """Copy the journal records of ``src`` (:func:`_progress_files`) into ``dest/inner``, whole:
    into a temp folder beside ``dest`` that is then renamed over it (an existing ``dest`` replaced).
    A file that goes while it is copied (a running cell) is skipped; without run.json nothing is
    placed and False is returned."""
    import tempfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        into = tmp / inner
        into.mkdir(exist_ok=True)
        for f in _progress_files(src):
            try:
                shutil.copy2(f, into / f.name)
            except FileNotFoundError:  # removed by the running cell meanwhile
                pass
        if not (into / "run.json").is_file():
            return False
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def snapshot_progress(runs: pathlib.Path, store: pathlib.Path = PROGRESS, only=None) -> list[str]:
    """Copy the journal records of every unfinished cell under ``runs`` (or of the cell names in
    ``only``) into ``store/<cell>`` (to be committed: a cell needing more hours than a session has
    continues in the next checkout), and remove the snapshots of those cells that have finished.
    Safe beside a running cell (:func:`_place_records`). Returns the cells snapshotted."""
    done = []
    for cell in _cells_in(runs):
        if only is not None and cell.name not in only:
            continue
        prog, dst = cell / "progress", store / cell.name
        if (cell / "results.json").is_file():
            if dst.exists():
                shutil.rmtree(dst)
            continue
        if (prog / "run.json").is_file() and _place_records(prog, dst):
            done.append(cell.name)
    for stale in (store.glob(".*_h*") if store.is_dir() else []):  # left by an interrupted snapshot
        if only is None:
            shutil.rmtree(stale, ignore_errors=True)
    return done


def restore_progress(runs: pathlib.Path, store: pathlib.Path = PROGRESS) -> list[str]:
    """Put each snapshot back as ``runs/<cell>/progress`` where ``runs/<cell>`` does not exist at
    all (a new checkout); a cell folder that exists (finished, running, or emptied by hand to start
    the cell over) is never touched. ``tsprune run --resume`` then continues the cell. Each copy is
    renamed into place whole. Returns the cells restored."""
    return [snap.name for snap in _cells_in(store)
            if not (runs / snap.name).exists() and _place_records(snap, runs / snap.name, "progress")]


def run_cell(runs: pathlib.Path, d: str, h: int, lb: int, seeds: int, model: str, extra: list[str]) -> dict | None:
    out = runs / f"{d}_h{h}"
    res = out / "results.json"
    if res.is_file():
        return json.loads(res.read_text())
    cmd = [sys.executable, "-m", "tsprune", "run", "--model", model, "--data", d, "--horizon", str(h),
           "--lookback", str(lb), "--out", str(out), "--search", "--seeds", str(seeds), "--no-progress",
           "--resume", *extra]  # a cell stopped midway continues from its journal
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
    log = runs / f"{d}_h{h}.log"
    runs.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:  # appended: a resumed cell keeps the log of its earlier part
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        print(f"  FAILED (exit {rc}); see {log}", flush=True)
        return None
    return json.loads(res.read_text())


def _fmt(s: dict) -> str:
    if "mse_std" in s:
        return f"{s['mse']:.4f} ± {s['mse_std']:.4f}"
    return f"{s['mse']:.4f}"


def gather(cells, runs: pathlib.Path) -> dict:
    rows, changes, wins, losses, ties = [], [], 0, 0, 0
    for d, h, lb in cells:
        res = runs / f"{d}_h{h}" / "results.json"
        if not res.is_file():
            rows.append({"data": d, "horizon": h, "lookback": lb, "status": "not run"})
            continue
        r = json.loads(res.read_text())
        ft, pf = r["finetune"], r["prune_finetune"]
        sd = max(ft.get("mse_std", 0.0), pf.get("mse_std", 0.0))
        if pf["mse"] < ft["mse"] - sd:
            verdict, wins = "prune-then-finetune better", wins + 1
        elif pf["mse"] > ft["mse"] + sd:
            verdict, losses = "fine-tune better", losses + 1
        else:
            verdict, ties = "within 1 std", ties + 1
        change = pf["mse"] / ft["mse"] - 1.0
        changes.append(change)
        rows.append({"data": d, "horizon": h, "lookback": lb, "status": "done",
                     "zero_shot": r["zero_shot"], "finetune": ft, "prune_finetune": pf,
                     "baselines": r["baselines"], "search": r.get("search"), "verdict": verdict,
                     "mse_change_pf_vs_ft": change, "seconds": r.get("seconds"),
                     "test_windows": ft.get("test_windows")})
    summary = {"cells_done": len(changes), "cells_total": len(cells), "pf_wins": wins, "pf_losses": losses,
               "within_1_std": ties,
               "mean_mse_change_pf_vs_ft": statistics.mean(changes) if changes else None}
    return {"rows": rows, "summary": summary}


def markdown(g: dict, head: str) -> str:
    lines = [head, "",
             "| data | H | seasonal naive | linear | zero-shot | fine-tune | prune-then-finetune | params kept | "
             "PtF vs FT | verdict |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in g["rows"]:
        if r["status"] != "done":
            lines.append(f"| {r['data']} | {r['horizon']} | | | | | | | | not run |")
            continue
        b = r["baselines"]
        kept = r["prune_finetune"]["params"] / r["finetune"]["params"]
        lines.append(
            f"| {r['data']} | {r['horizon']} | {b['seasonal_naive']['mse']:.4f} | {b['linear']['mse']:.4f} | "
            f"{r['zero_shot']['mse']:.4f} | {_fmt(r['finetune'])} | {_fmt(r['prune_finetune'])} | {kept:.1%} | "
            f"{r['mse_change_pf_vs_ft']:+.1%} | {r['verdict']} |")
    vw = [f"{r['data']} h{r['horizon']} {r['search']['val_windows']:,} of {r['search']['val_windows_available']:,}"
          for r in g["rows"] if r["status"] == "done" and r.get("search")]
    if vw:
        lines += ["", "Validation windows the picks were made on (evenly spaced, of those available): "
                  + "; ".join(vw) + "."]
    s = g["summary"]
    ch = s["mean_mse_change_pf_vs_ft"]
    lines += ["", f"Cells done: {s['cells_done']} of {s['cells_total']}. Prune-then-finetune better than fine-tune "
                  f"beyond one standard deviation in {s['pf_wins']}, worse in {s['pf_losses']}, within one standard "
                  f"deviation in {s['within_1_std']}. Average MSE change of prune-then-finetune against fine-tune: "
                  + (f"{ch:+.2%}" if ch is not None else "n/a") + " (negative: pruning helps)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default=None, help="DATA:H,... (default: all 16 cells)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--model", default="default")
    p.add_argument("--runs", default="runs/accuracy", help="per-cell output folders (resumable)")
    p.add_argument("--gather-only", action="store_true", help="only gather finished cells into the table")
    p.add_argument("--name", default="accuracy", help="benchmarks/results/<name>.json / .md")
    p.add_argument("--snapshot", action="store_true",
                   help="only copy the journal records of unfinished cells into benchmarks/results/"
                        "accuracy_progress/ (commit them: the next checkout resumes those cells)")
    a = p.parse_args(argv)
    cells = parse_cells(a.cells)
    runs = pathlib.Path(a.runs)
    if a.snapshot:
        print(f"snapshotted into {PROGRESS}: {', '.join(snapshot_progress(runs)) or 'nothing'}", flush=True)
        return
    restored = restore_cells(runs, HERE / "results" / f"{a.name}.json")
    if restored:
        print(f"restored from benchmarks/results/{a.name}.json (not re-run): {', '.join(restored)}", flush=True)
    back = restore_progress(runs)  # after the finished cells: a finished cell's stale snapshot stays out
    if back:
        print(f"journals restored from {PROGRESS} (to resume; their models are made again): {', '.join(back)}",
              flush=True)
    if not a.gather_only:
        for d, h, lb in cells:
            run_cell(runs, d, h, lb, a.seeds, a.model, extra)
        # this command's cells only (another process may be running others): finished cells drop
        # their snapshot, a failed or stopped one keeps its records
        snapshot_progress(runs, only={f"{d}_h{h}" for d, h, _ in cells})
    # the table covers every standard cell (and any other asked for), not only this command's:
    # a --cells run must not shrink a committed table to its own rows
    g = gather(list(ALL_CELLS) + [c for c in cells if c not in ALL_CELLS], runs)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    payload = {"commit": commit, "model": a.model, "seeds": a.seeds, "extra_args": extra, **g}
    path = write(a.name, payload)
    m = machine()
    head = (f"# Accuracy: `{a.model}` model, {a.seeds} seeds, hyper-parameters picked on validation MSE\n\n"
            f"Gathered at commit {commit} on {m.get('cpu', m)} (each cell was measured when it ran; "
            f"benchmarks/README.md lists their commits); extra `tsprune run` options: "
            f"`{' '.join(extra) or 'none'}`. MSE on every window of the standard test split (scaled values).")
    md = path.with_suffix(".md")
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(markdown(g, head))
    os.replace(tmp, md)
    print(markdown(g, head))


if __name__ == "__main__":
    main()
