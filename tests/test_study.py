"""study.py: the paired t-interval and its calls on fixed numbers, the run folder keyed by commands and code,
failed runs counted and shown, the shortcut row evaluated by its own report."""
import json
import pathlib
import shlex

import pytest

import study


@pytest.mark.parametrize("df,want", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (9, 2.262),
                                     (10, 2.228), (30, 2.042)])
def test_t_quantiles_equal_the_tables(df, want):
    assert study.t_quantile(0.975, df) == pytest.approx(want, abs=5e-4)
    assert study.t_cdf(want, df) == pytest.approx(0.975, abs=1e-4) and study.t_cdf(0.0, df) == 0.5
    assert study.t_cdf(-want, df) == pytest.approx(0.025, abs=1e-4)


def test_paired_ci_and_calls_on_fixed_numbers():
    # d = 1..5: mean 3, std sqrt(2.5), half-width t_{0.975,4} sqrt(2.5) / sqrt(5) = 2.776 * 0.7071 = 1.963
    r = study.paired_ci([1, 2, 3, 4, 5], [0, 0, 0, 0, 0], margin=1.0)
    assert r["diff"] == 3.0 and r["lo"] == pytest.approx(1.0368, abs=1e-3) and r["hi"] == pytest.approx(4.9632, abs=1e-3)
    assert r["call"] == "differs" and r["seeds"] == 5
    assert study.paired_ci([0, 0, 0, 0, 0], [1, 2, 3, 4, 5], margin=1.0)["call"] == "differs"  # either sign
    # paired: a shift shared by both rows on each seed cancels (unpaired, the spread of 0-40 would swamp it)
    a, b = [10.2, 20.1, 30.3, 40.0, 0.1], [10.0, 20.0, 30.0, 40.1, 0.0]
    r = study.paired_ci(a, b, margin=0.5)  # d = .2, .1, .3, -.1, .1: mean .12, std .148, half .184
    assert r["lo"] == pytest.approx(0.12 - 0.1837, abs=1e-3) and r["call"] == "ties"
    assert study.paired_ci(a, b, margin=0.2)["call"] == "inconclusive"  # the interval reaches past ±0.2
    # a list per seed: the mean over training seeds first (d = 2, 3), then df = 1 over the world seeds
    r = study.paired_ci([[1, 3], [2, 4]], [0, 0], margin=1.0)
    assert r["diff"] == 2.5 and r["hi"] - r["diff"] == pytest.approx(12.706 * 0.5, abs=1e-3)
    assert r["call"] == "inconclusive"
    assert study.paired_ci([1.0], [0.0], margin=1.0)["call"] == "inconclusive"  # one seed: no interval
    with pytest.raises(ValueError, match="3 world seeds against 2"):
        study.paired_ci([1, 2, 3], [1, 2], margin=1.0)


def test_run_folder_is_keyed_by_commands_and_code(tmp_path, monkeypatch):
    cfg = study.Config(root=str(tmp_path))
    one = study.run_dir(cfg, "main", [f"{study.OFF} --data world"], 3, 1)
    assert one.endswith("seed3-train1") and one != study.run_dir(cfg, "main", [f"{study.OFF} --data bdhs"], 3, 1)
    assert study.run_dir(cfg, "main", [study.SHORTCUT], 3, 1).endswith("seed3")  # no training seed: once per seed
    assert study.run_dir(cfg, "main", [], 3, 1) == study.run_dir(cfg, "twin", [], 3, 0)  # the base, shared
    monkeypatch.setattr(study, "source_bytes", lambda *names: b"other code")
    study.code_key.cache_clear()
    try:
        assert study.run_dir(cfg, "main", [f"{study.OFF} --data world"], 3, 1) != one
    finally:
        study.code_key.cache_clear()


def test_failed_runs_are_counted_and_shown(tmp_path, capsys):
    cfg = study.Config(root=str(tmp_path))
    fail = ["-c " + shlex.quote("import sys; sys.exit(3)")]  # a command line that fails, run as python's
    assert study.run_row(cfg, "main", "broken row", fail, 3, 0) is None
    out = study.run_dir(cfg, "main", fail, 3, 0)
    assert out in study.FAILED and "failed: main / broken row / seed 3" in capsys.readouterr().out
    assert "$ python -c" in pathlib.Path(out, "log.txt").read_text()
    ok = dict(chair_i=1.0, recall=90.0, minutes=1.0)
    md = study.markdown("main", {"base": [ok, ok], "broken row": [ok, None]}, [3, 4])
    assert "1 failed" in md and "| broken row | 1.0 |" in md and "| 1/2 |" in md and "| 2/2 |" in md


def test_a_row_that_is_its_report_runs_it_alone(tmp_path, monkeypatch):
    """The shortcut row's one command is its world report: run_row runs it and appends no report of a checkpoint."""
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        with open(out, "w") as f:
            json.dump({"shortcut": {"chair_i": 0.5}}, f)
        return type("Done", (), {"returncode": 0})()
    monkeypatch.setattr(study.subprocess, "run", fake_run)
    res = study.run_row(study.Config(root=str(tmp_path)), "main", "shortcut", [study.SHORTCUT], 4)
    assert len(calls) == 1 and calls[0][1:4] == ["eval.py", "--data", "world"] and "shortcut" in calls[0]
    assert res["chair_i"] == 0.5 and res["commands"] == [study.SHORTCUT]
