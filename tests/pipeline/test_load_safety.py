"""Loading a saved directory runs no code and refuses every edited / inconsistent file (issue 8).

Each case edits a fresh, valid save of a tiny repacked Chronos-Bolt (heads removed in two encoder
layers, FFN channels removed) the way the issue did, and checks that ``load_pruned`` raises a
ValueError / FileNotFoundError whose one-line message names the file and the field. Where the
edit would otherwise be caught by the checksums, the test recomputes them first (what someone
editing a directory on purpose would do), so that the field-level check itself is exercised.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
import torch

from tsprune.adapters import get_adapter
from tsprune.plan import load_pruned, repack_model, save_pruned

ENC0 = "encoder.block.0.layer.0.SelfAttention"
ENC1 = "encoder.block.1.layer.0.SelfAttention"
FFN1 = "encoder.block.1.layer.1.DenseReluDense"


def _tiny(seed: int = 0, d_model: int = 32, d_ff: int = 64):
    from chronos.chronos_bolt import ChronosBoltModelForForecasting
    from transformers import T5Config

    torch.manual_seed(seed)
    cfg = T5Config(
        d_model=d_model, d_kv=8, num_heads=4, d_ff=d_ff, num_layers=2, num_decoder_layers=1,
        feed_forward_proj="relu", vocab_size=2, decoder_start_token_id=0, pad_token_id=0,
        initializer_factor=0.5,
        chronos_config=dict(context_length=32, prediction_length=16, input_patch_size=16,
                            input_patch_stride=16, quantiles=[0.1, 0.5, 0.9], use_reg_token=True),
    )
    return ChronosBoltModelForForecasting(cfg).eval()


def _pruned():
    m = _tiny()
    ad = get_adapter(m, heads=True, block=4)
    sites = ad.sites(m)
    masks = {
        s.mask_name(side): torch.ones(getattr(s, f"mask_{side}").units)
        for s in sites for side in ("in", "out") if getattr(s, f"mask_{side}") is not None
    }
    masks[f"{ENC0}.v.out"][0] = 0  # encoder layer 0 keeps heads 1, 2, 3
    masks[f"{ENC1}.v.out"][2] = 0  # encoder layer 1 keeps heads 0, 1, 3
    masks[f"{FFN1}.wo.in"][:3] = 0  # 12 FFN channels gone
    new, plan = repack_model(m, ad, sites, masks)
    return new, plan


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    new, plan = _pruned()
    d = tmp_path_factory.mktemp("saved") / "m"
    save_pruned(new, d, plan)
    return d, new


@pytest.fixture
def copy(saved, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(saved[0], d)
    return d


def _ctx():
    return torch.randn(2, 32, generator=torch.Generator().manual_seed(3))


def _rehash(d):
    meta = json.loads((d / "meta.json").read_text())
    if isinstance(meta, dict) and isinstance(meta.get("sha256"), dict):
        meta["sha256"] = {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in meta["sha256"]}
        (d / "meta.json").write_text(json.dumps(meta))


def _edit(d, name, fn, rehash=True):
    """Load d/name as JSON, apply fn (returns the new object or edits in place), write, rehash."""
    obj = json.loads((d / name).read_text())
    res = fn(obj)
    (d / name).write_text(json.dumps(obj if res is None else res))
    if rehash and name != "meta.json":
        _rehash(d)


def _refused(d, *parts, exc=ValueError):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc) as ei:
            load_pruned(d)
    msg = str(ei.value)
    assert type(ei.value) in (ValueError, FileNotFoundError), type(ei.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg
    return msg


# -- the untouched save loads, bit for bit ----------------------------------------------------------
def test_valid_save_loads_exactly(saved):
    d, new = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh save of this version loads without a warning
        back = load_pruned(d)
    with torch.no_grad():
        assert torch.equal(back(context=_ctx()).quantile_preds, new(context=_ctx()).quantile_preds)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["format_version"] == 2 and set(meta["sha256"]) == {"plan.json", "config.json", "model.safetensors"}


# -- 1. no code from the directory ------------------------------------------------------------------
def test_malicious_config_class_runs_nothing(copy, tmp_path):
    marker = tmp_path / "PWNED"
    _edit(copy, "meta.json", lambda m: m.update(config_class="os:system"))
    (copy / "config.json").write_text(json.dumps({"command": f"echo PWNED > {marker}"}))
    _rehash(copy)
    msg = _refused(copy, "meta.json", "'config_class'", "os:system")
    assert not marker.exists()
    assert "T5Config" in msg


def test_malicious_model_class_runs_nothing(copy, tmp_path):
    marker = tmp_path / "PWNED"
    _edit(copy, "meta.json", lambda m: m.update(model_class="os:system", config_class="os:system"))
    (copy / "config.json").write_text(json.dumps({"command": f"echo PWNED > {marker}"}))
    _rehash(copy)
    msg = _refused(copy, "meta.json", "'model_class'", "'os:system' is not a supported model class")
    assert "ChronosBoltModelForForecasting" in msg  # lists what is supported
    assert not marker.exists()


def test_unknown_model_class_is_refused_not_imported(copy):
    _edit(copy, "meta.json", lambda m: m.update(model_class="no_such_pkg.mod:Model"))
    _refused(copy, "meta.json", "'model_class'")
    assert "no_such_pkg" not in sys.modules


def test_config_not_buildable_names_config_json(copy):
    _edit(copy, "config.json", lambda c: c.pop("chronos_config") and None)
    _refused(copy, "config.json", "ChronosBoltModelForForecasting")


# -- 2. field-by-field checks -----------------------------------------------------------------------
def test_meta_json_a_list(copy):
    (copy / "meta.json").write_text("[1, 2]")
    _refused(copy, "meta.json", "must be a JSON object")


def test_plan_json_a_list(copy):
    _edit(copy, "plan.json", lambda p: [p])
    _refused(copy, "plan.json", "must be a JSON object")


def test_plan_attrs_name_a_missing_module(copy):
    _edit(copy, "plan.json", lambda p: p["attrs"].update({"encoder.block.9.layer.0.SelfAttention": {"n_heads": 1}}))
    _refused(copy, "plan.json", "'attrs.encoder.block.9.layer.0.SelfAttention'", "no module")


def test_plan_attrs_cannot_overwrite_methods(copy):
    _edit(copy, "plan.json", lambda p: p["attrs"][ENC0].update(forward=1))
    _refused(copy, "plan.json", f"'attrs.{ENC0}.forward'", "not an integer size")


def test_plan_linears_null(copy):
    _edit(copy, "plan.json", lambda p: p.update(linears=None))
    _refused(copy, "plan.json", "'linears'", "expected a JSON object")


@pytest.mark.parametrize("bad", ["24", -1, 1.5, True, 10**12])
def test_plan_layer_out_bad_value(copy, bad):
    _edit(copy, "plan.json", lambda p: p["linears"][f"{ENC0}.q"].update(out=bad))
    _refused(copy, "plan.json", f"'linears.{ENC0}.q.out'")


def test_plan_edited_head_count(copy):
    _edit(copy, "plan.json", lambda p: p["attrs"][ENC1].update(n_heads=2))
    _refused(copy, "plan.json", f"'attrs.{ENC1}.n_heads'", "2 heads")


def test_plan_edited_ffn_width(copy):
    _edit(copy, "plan.json", lambda p: p["linears"][f"{FFN1}.wi"].update(out=48))
    _refused(copy, "plan.json", f"'extra.ffn.{FFN1}'", "48 outputs")


@pytest.mark.parametrize("bad", [[0, 1, 7], [0, 1, -1], [0, 0, 1], [0, 1]])
def test_plan_bias_heads_out_of_range_or_repeated(copy, bad):
    _edit(copy, "plan.json", lambda p: p["extra"]["bias_heads"].update({ENC1: bad}))
    _refused(copy, "plan.json", f"'extra.bias_heads.{ENC1}")


def test_plan_bias_heads_permuted(copy):
    """The issue: permuting one layer's bias_heads loaded silently and moved test MSE."""
    _edit(copy, "plan.json", lambda p: p["extra"]["bias_heads"].update({ENC1: p["extra"]["bias_heads"][ENC1][::-1]}))
    _refused(copy, "plan.json", f"'extra.bias_heads.{ENC1}'", "does not select this layer's heads")


def test_plan_bias_heads_or_heads_deleted(copy):
    """Without its bias_heads a T5 layer would silently get a zero position bias."""
    _edit(copy, "plan.json", lambda p: p["extra"]["bias_heads"].pop(ENC1) and None)
    _refused(copy, "plan.json", f"'extra.bias_heads.{ENC1}'", "missing")


def test_plan_heads_deleted(copy):
    _edit(copy, "plan.json", lambda p: p["extra"].pop("heads") and None)
    _refused(copy, "plan.json", "'extra.heads.", "missing")


def test_plan_keep_lengths_agree_with_linears(copy):
    _edit(copy, "plan.json", lambda p: p["keep"][f"{FFN1}.wi.weight"]["rows"].pop() and None)
    _refused(copy, "plan.json", f"'keep.{FFN1}.wi.weight.rows'", "expected 52")


def test_meta_fields_missing_or_unknown(copy):
    _edit(copy, "meta.json", lambda m: m.pop("n_params") and None)
    _refused(copy, "meta.json", "'n_params'", "missing")


def test_plan_edit_without_rehash_fails_the_checksum(copy):
    _edit(copy, "plan.json", lambda p: p["extra"]["bias_heads"].update({ENC1: p["extra"]["bias_heads"][ENC1][::-1]}),
          rehash=False)
    _refused(copy, "plan.json does not match its sha256")


def test_weights_corrupted_fails_the_checksum(copy):
    raw = bytearray((copy / "model.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(raw))
    _refused(copy, "model.safetensors does not match its sha256")


def test_zero_flip_leaves_an_extra_tensor(copy):
    """The issue: "zero": true on an FFN Linear loaded and ignored that Linear's weight."""
    _edit(copy, "plan.json", lambda p: p["linears"][f"{FFN1}.wi"].update(zero=True))
    _refused(copy, "model.safetensors", f"'{FFN1}.wi.weight'", "does not have")


def test_aliases_name_a_missing_tensor(copy):
    _edit(copy, "meta.json", lambda m: m["aliases"].update({"encoder.embed_tokens.weight": "nope.weight"}))
    _refused(copy, "meta.json", "'aliases'")


def test_aliases_not_a_dict(copy):
    _edit(copy, "meta.json", lambda m: m.update(aliases=["x"]))
    _refused(copy, "meta.json", "'aliases'")


@pytest.mark.parametrize("fv,what", [("2", "positive integer"), (None, "positive integer"), (3, "newer"),
                                     (0, "positive integer")])
def test_format_version(copy, fv, what):
    _edit(copy, "meta.json", lambda m: m.update(format_version=fv))
    _refused(copy, "meta.json", "'format_version'", what)


def test_other_tsprune_version_loads_with_one_warning(copy):
    _edit(copy, "meta.json", lambda m: m.update(tsprune_version="99.0.0"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        load_pruned(copy)
    msgs = [str(r.message) for r in rec]
    assert len(msgs) == 1 and "99.0.0" in msgs[0] and "\n" not in msgs[0], msgs


def test_legacy_format_1_default_loads_with_one_warning():
    from tsprune.models import DEFAULT_DIR

    meta = json.loads((DEFAULT_DIR / "meta.json").read_text())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        m = load_pruned(DEFAULT_DIR)
    msgs = [str(r.message) for r in rec]
    if "sha256" in meta:  # re-saved with checksums: no warning at all
        assert msgs == []
    else:
        assert len(msgs) == 1 and "unverified legacy save" in msgs[0], msgs
    assert sum(p.numel() for p in m.parameters()) == meta["n_params"]


def test_format_2_without_checksums_is_refused(copy):
    _edit(copy, "meta.json", lambda m: m.pop("sha256") and None)
    _refused(copy, "meta.json", "'sha256'", "missing")


def test_shape_mismatch_in_weights(copy, saved):
    from safetensors.torch import load_file, save_file

    t = load_file(str(copy / "model.safetensors"))
    k = f"{ENC0}.q.weight"
    t[k] = torch.zeros(16, 32)
    save_file(t, str(copy / "model.safetensors"))
    _rehash(copy)
    _refused(copy, "model.safetensors", repr(k), "(16, 32)", "(24, 32)")


def test_missing_tensor_in_weights(copy):
    from safetensors.torch import load_file, save_file

    t = load_file(str(copy / "model.safetensors"))
    t.pop(f"{FFN1}.wo.weight")
    save_file(t, str(copy / "model.safetensors"))
    _rehash(copy)
    _refused(copy, "model.safetensors", "lacks", f"'{FFN1}.wo.weight'")


# -- reduced-precision storage ----------------------------------------------------------------------
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_storage_dtype_round_trip(saved, tmp_path, dt):
    d0, new = saved
    save_pruned(new, tmp_path / "h", storage_dtype=dt)
    meta = json.loads((tmp_path / "h" / "meta.json").read_text())
    assert meta["storage_dtype"] == str(dt).removeprefix("torch.")
    size0, size = (d0 / "model.safetensors").stat().st_size, (tmp_path / "h" / "model.safetensors").stat().st_size
    assert size < 0.55 * size0
    back = load_pruned(tmp_path / "h")
    assert all(p.dtype == torch.float32 for p in back.parameters())
    # every weight is the stored rounding of the fp32 one (float64 comparison of the values)
    ref = new.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v.double(), ref[k].to(dt).double()), k
    half = load_pruned(tmp_path / "h", dtype=None)
    assert all(p.dtype == dt for p in half.parameters())
    with torch.no_grad():
        out, want = back(context=_ctx()).quantile_preds, new(context=_ctx()).quantile_preds
    assert (out - want).abs().max() <= 0.05 * want.abs().max()


def test_storage_dtype_edited_is_refused(saved, tmp_path):
    save_pruned(saved[1], tmp_path / "h", storage_dtype=torch.bfloat16)
    _edit(tmp_path / "h", "meta.json", lambda m: m.update(storage_dtype="float16"))
    _refused(tmp_path / "h", "'storage_dtype'", "BF16")
    with pytest.raises(ValueError, match="storage_dtype"):
        save_pruned(saved[1], tmp_path / "i", storage_dtype=torch.int8)


# -- load_model: local paths vs hub names, no remote code -------------------------------------------
def test_load_model_missing_relative_path_is_not_a_hub_lookup(tmp_path, monkeypatch):
    from tsprune import models

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    calls = []
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(a))
    for spec in ("missing", "runs/missing", "./x/y", "a/b/c", "../nope"):
        with pytest.raises(FileNotFoundError, match="no such model directory"):
            models.load_model(spec)
    assert calls == []


def test_load_model_hf_dir_unknown_architecture(tmp_path):
    from tsprune import models

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Popen"], "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(ValueError, match="'architectures': 'Popen' is not an architecture tsprune supports"):
        models.load_model(str(tmp_path))


def test_load_model_hf_dir_known_architecture(tmp_path):
    from tsprune import models

    m = _tiny()
    m.save_pretrained(tmp_path / "hf")
    back = models.load_model(str(tmp_path / "hf"))
    assert type(back) is type(m)
    with torch.no_grad():
        assert torch.equal(back(context=_ctx()).quantile_preds, m(context=_ctx()).quantile_preds)


# -- 3. saves: modes, stale temp dirs, SIGKILL, concurrent writers ----------------------------------
def test_saved_files_follow_the_umask(saved, tmp_path):
    old = os.umask(0o027)
    try:
        save_pruned(saved[1], tmp_path / "u")
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "u").iterdir()}
    assert modes == {f: 0o640 for f in ("meta.json", "config.json", "plan.json", "model.safetensors")}, modes
    assert (tmp_path / "u").stat().st_mode & 0o777 == 0o750


def test_save_never_replaces_a_directory_that_is_not_a_save(saved, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a tsprune save"):
        save_pruned(saved[1], tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mine.lock", "mine"]  # temp dir removed
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_pruned(saved[1], tmp_path / "f")
    (tmp_path / "empty").mkdir()
    save_pruned(saved[1], tmp_path / "empty")  # an empty directory is fine
    load_pruned(tmp_path / "empty")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_dirs_of_dead_writers_are_removed(saved, tmp_path):
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = [f".m.tmp-{dead}-abc", f".m.old-{dead}-xyz", f".m.old-{dead}"]
        keep = [f".m.tmp-{live.pid}-abc", ".other.tmp-1-x", f".m.old-{live.pid}-q"]
        for n in stale + keep:
            (tmp_path / n).mkdir()
            (tmp_path / n / "model.safetensors").write_bytes(b"x" * 10)
        old_legacy = tmp_path / ".m.tmp-k2j3h4"  # pre-PID name, an hour old
        old_legacy.mkdir()
        os.utime(old_legacy, (time.time() - 3600, time.time() - 3600))
        save_pruned(saved[1], tmp_path / "m")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(keep + ["m", ".m.lock"]), left
    finally:
        live.kill()
        live.wait()


_KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path[:0] = {paths!r}
    import torch, tsprune.plan as P
    sys.path.insert(0, {testdir!r})
    from test_load_safety import _tiny
    m = _tiny(d_model={d_model}, d_ff={d_ff})
    def slow(fd):  # the writer is killed while fsyncing its temp directory
        print("writing", flush=True)
        time.sleep(60)
    P.os.fsync = slow
    P.save_pruned(m, {out!r})
""")


def test_sigkill_during_save_leaves_nothing_for_the_next_save(saved, tmp_path):
    import tsprune

    paths = [os.path.dirname(os.path.dirname(tsprune.__file__)), os.getcwd()]
    here = os.path.dirname(__file__)
    out = tmp_path / "m"
    save_pruned(saved[1], out)  # an existing save, kept intact through the kill
    (tmp_path / f".m.old-{_dead_pid()}").mkdir()  # a half-deleted old copy: the writer removes it
    script = _KILL_SCRIPT.format(paths=paths, testdir=here, d_model=32, d_ff=64, out=str(out))
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"  # weights written, killed before the swap
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    left = [n.name for n in tmp_path.iterdir() if n.name.startswith(".m.")]
    assert sorted(n[:7] for n in left) == [".m.lock", ".m.tmp-"], left  # the killed writer's temp dir
    load_pruned(out)  # the previous save is untouched
    save_pruned(saved[1], out)
    assert sorted(n.name for n in tmp_path.iterdir()) == [".m.lock", "m"]
    load_pruned(out)


def test_concurrent_writers_all_succeed_and_the_result_loads(saved, tmp_path):
    new = saved[1]
    out = tmp_path / "m"
    errors: list[BaseException] = []
    n_ok = [0]

    def writer(i):
        for _ in range(3):
            try:
                save_pruned(new, out, extra={"writer": i})
                n_ok[0] += 1
            except BaseException as e:  # noqa: BLE001 - the test reports any
                errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and n_ok[0] == 18
    assert sorted(n.name for n in tmp_path.iterdir()) == [".m.lock", "m"]
    back = load_pruned(out)
    assert json.loads((out / "meta.json").read_text())["extra"]["writer"] in range(6)
    with torch.no_grad():
        assert torch.equal(back(context=_ctx()).quantile_preds, new(context=_ctx()).quantile_preds)


# -- other families: their per-layer extras are checked too --------------------------------------
def _family_save(name, tmp_path):
    import test_adapters as ta  # the families' scaled-down builders (tests/pipeline is on sys.path)

    case = ta.CASES[name]
    _, new, plan, _, _, _ = ta._check_repack(case, False, torch.float32, seed=900)
    save_pruned(new, tmp_path / "m", plan)
    load_pruned(tmp_path / "m")  # valid as saved
    return tmp_path / "m", plan


def test_timesfm_orig_head_dim_and_scaling_are_checked(tmp_path):
    d, plan = _family_save("timesfm", tmp_path)
    ap = next(iter(plan.attrs))
    _edit(d, "plan.json", lambda p: p["attrs"][ap].update(orig_head_dim=p["attrs"][ap]["orig_head_dim"] + 1))
    _refused(d, "plan.json", f"'attrs.{ap}.orig_head_dim'")
    _edit(d, "plan.json", lambda p: p["attrs"][ap].update(orig_head_dim=p["attrs"][ap]["orig_head_dim"] - 1))
    _edit(d, "plan.json", lambda p: p["params"].update({f"{ap}.scaling": [p["params"][f"{ap}.scaling"][0] + 1]}))
    _refused(d, "plan.json", f"'params.{ap}.scaling'")


def test_chronos2_rope_pairs_permuted_is_refused(tmp_path):
    d, plan = _family_save("chronos2", tmp_path)
    ap, pairs = next((a, p) for a, p in plan.extra["rope_pairs"].items() if p and len(p[0]) > 1)
    _edit(d, "plan.json", lambda p: p["extra"]["rope_pairs"][ap].__setitem__(0, pairs[0][::-1]))
    _refused(d, "plan.json", f"'extra.rope_pairs.{ap}[0]'", "ascending")
