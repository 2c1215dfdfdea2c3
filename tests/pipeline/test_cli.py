"""CLI: parse-time range checks, --out checked before any work, one-line errors (exit 2)."""
import pytest

from tsprune.cli import main


@pytest.mark.parametrize("opt,val", [("--batch-size", "0"), ("--lookback", "0"), ("--horizon", "-1"),
                                     ("--prune-ratio-per-epoch", "1.5"), ("--max-prune-ratio", "1"),
                                     ("--ema", "2"), ("--seeds", "0"), ("--eval-batch-size", "0")])
def test_numeric_options_are_range_checked_at_parse_time(opt, val, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["run", "--out", str(tmp_path / "o"), opt, val])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and opt in err and err.startswith("tsprune run: error:")
    assert not (tmp_path / "o").exists()  # nothing ran


def test_out_is_checked_before_any_work(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    for out, msg in ((f, "exists and is not a directory"), (f / "sub", "is a file, not a directory"),
                     ("/sys/kernel/tsprune_out", "cannot write there")):
        assert main(["run", "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err and str(out) in err, err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "(default: 0.5)" in out and "--criterion" in out and "--search" in out
