"""scripts/study.py: the paired t-interval and its calls on fixed numbers, the run folder keyed by commands and code,
failed runs counted and shown, the shortcut row evaluated by its own report."""

import json
import os
import pathlib
import re
import shlex
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
)
import study  # noqa: E402


@pytest.mark.parametrize(
    "df,want",
    [
        (1, 12.706),
        (2, 4.303),
        (3, 3.182),
        (4, 2.776),
        (5, 2.571),
        (9, 2.262),
        (10, 2.228),
        (30, 2.042),
    ],
)
def test_t_quantiles_equal_the_tables(df, want):
    assert study.t_quantile(0.975, df) == pytest.approx(want, abs=5e-4)
    assert study.t_cdf(want, df) == pytest.approx(0.975, abs=1e-4) and study.t_cdf(0.0, df) == 0.5
    assert study.t_cdf(-want, df) == pytest.approx(0.025, abs=1e-4)


def test_paired_ci_and_calls_on_fixed_numbers():
    # d = 1..5: mean 3, std sqrt(2.5), half-width t_{0.975,4} sqrt(2.5) / sqrt(5) = 2.776 * 0.7071 = 1.963
    r = study.paired_ci([1, 2, 3, 4, 5], [0, 0, 0, 0, 0], margin=1.0)
    assert (
        r["diff"] == 3.0
        and r["lo"] == pytest.approx(1.0368, abs=1e-3)
        and r["hi"] == pytest.approx(4.9632, abs=1e-3)
    )
    assert r["call"] == "differs" and r["seeds"] == 5
    # either sign
    assert study.paired_ci([0, 0, 0, 0, 0], [1, 2, 3, 4, 5], margin=1.0)["call"] == "differs"
    # paired: a shift shared by both rows on each seed cancels (unpaired, the spread of 0-40 would swamp it)
    a, b = [10.2, 20.1, 30.3, 40.0, 0.1], [10.0, 20.0, 30.0, 40.1, 0.0]
    r = study.paired_ci(a, b, margin=0.5)  # d = .2, .1, .3, -.1, .1: mean .12, std .148, half .184
    assert r["lo"] == pytest.approx(0.12 - 0.1837, abs=1e-3) and r["call"] == "ties"
    # the interval reaches past ±0.2
    assert study.paired_ci(a, b, margin=0.2)["call"] == "inconclusive"
    # a list per seed: the mean over training seeds first (d = 2, 3), then df = 1 over the world seeds
    r = study.paired_ci([[1, 3], [2, 4]], [0, 0], margin=1.0)
    assert r["diff"] == 2.5 and r["hi"] - r["diff"] == pytest.approx(12.706 * 0.5, abs=1e-3)
    assert r["call"] == "inconclusive"
    # one seed: no interval
    assert study.paired_ci([1.0], [0.0], margin=1.0)["call"] == "inconclusive"
    with pytest.raises(ValueError, match="3 world seeds against 2"):
        study.paired_ci([1, 2, 3], [1, 2], margin=1.0)


def test_run_folder_is_keyed_by_commands_and_code(tmp_path, monkeypatch):
    cfg = study.Config(root=str(tmp_path))
    one = study.run_dir(cfg, "main", [f"{study.OFF} --data world"], 3, 1)
    assert one.endswith("seed3-train1") and one != study.run_dir(
        cfg, "main", [f"{study.OFF} --data bdhs"], 3, 1
    )
    # no training seed: once per seed
    assert study.run_dir(cfg, "main", [study.SHORTCUT], 3, 1).endswith("seed3")
    # the base, shared
    assert study.run_dir(cfg, "main", [], 3, 1) == study.run_dir(cfg, "twin", [], 3, 0)
    monkeypatch.setattr(study, "source_bytes", lambda *names: b"other code")
    study.code_key.cache_clear()
    try:
        assert study.run_dir(cfg, "main", [f"{study.OFF} --data world"], 3, 1) != one
    finally:
        study.code_key.cache_clear()


def test_failed_runs_are_counted_and_shown(tmp_path, capsys):
    cfg = study.Config(root=str(tmp_path))
    # a command line that fails, run as python's
    fail = ["-c " + shlex.quote("import sys; sys.exit(3)")]
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
    assert (
        len(calls) == 1
        and calls[0][1:4] == ["eval.py", "--data", "world"]
        and "shortcut" in calls[0]
    )
    assert res["chair_i"] == 0.5 and res["commands"] == [study.SHORTCUT]


# -----------------------------------------------------------------------------
# The per-run file, the verdicts, the figures and README's block, on fake per-run values

BASE_VALUES = {
    "chair_i": 10.0,
    "chair_s": 30.0,
    "recall": 95.0,
    "pope_adversarial_f1": 63.0,
    "pope_adversarial_yes_ratio": 60.0,
    "hq/chair_i": 16.0,
    "hq/pope_adversarial_f1": 59.0,
    "ord/detail": 40.0,
    "ord/recall": 97.0,
    "ord/count_acc": 90.0,
    "twin/grounding": 10.0,
    "twin/yes_twin": 40.0,
    "twin/no_broken": 70.0,
    "minutes": 2.0,
}
# (row, metric) -> how the row differs from the base; "swing": ±6 by seed parity (too noisy to tell)
OFFSETS = {
    # the paper's BDHS raises recall: does not hold
    ("BDHS, DPO + NLL (the main job)", "recall"): -2.0,
    ("Online-DPO (rule)", "recall"): 5.0,  # the paper: online lower; here higher: does not hold
    ("Mixed-DPO (rule)", "pope_adversarial_f1"): "swing",  # the paper: a tie; here: inconclusive
    ("corruption set + BDHS_attn (Avg-DPO)", "recall"): 3.0,  # the paper: higher; here too: holds
}


def fake_value(row, metric, seed, train):
    off = OFFSETS.get((row, metric), 0.0)
    off = 6.0 * (-1) ** seed if off == "swing" else off
    # a small spread, shared by every row
    return BASE_VALUES[metric] + off + 0.01 * ((3 * seed + train) % 4)


def fake_records(tables=("main", "twin", "table12", "table6", "online")):
    recs = []
    for t in tables:
        seeds = study.SEEDS.get(t, study.OTHER_SEEDS)
        recs += [
            (t, "base", s, None, {m: fake_value("base", m, s, 0) for m in BASE_VALUES})
            for s in seeds
        ]
        for row in study.TABLES[t]:
            for s in seeds:
                for j in (0, 1):
                    res = {m: fake_value(row, m, s, j) for m in BASE_VALUES}
                    # one failed run
                    recs.append((t, row, s, j, None if (row, s, j) == ("IPO", 5, 1) else res))
    return recs


def claim(a, b, metric):
    return next(
        c for c in study.CLAIMS if c.a and c.a[1] == a and c.b[1] == b and c.metric == metric
    )


def test_per_run_file_round_trip_and_verdicts(tmp_path):
    path = str(tmp_path / "study_runs.csv")
    recs = fake_records()
    study.write_runs(recs, path)
    assert not os.path.exists(path + ".tmp")
    runs = study.read_runs(path)
    assert runs == study.read_runs_of(recs)  # the file holds what the tables are computed from
    assert runs["table12"]["IPO"][5, 1] is None and runs["main"]["base"][3, None][
        "chair_i"
    ] == fake_value("base", "chair_i", 3, 0)
    head = open(path).readline().strip()
    assert head == "table,row,world_seed,train_seed,metric,value"
    assert "table12,IPO,5,1,failed,1" in open(path).read()
    # writing some tables keeps the other tables' lines
    study.write_runs([r for r in recs if r[0] == "main"], path, keep=["table12"])
    assert set(study.read_runs(path)) == {"main", "table12"}
    runs = study.read_runs_of(recs)

    def verdict(a, b, metric):
        c = claim(a, b, metric)
        return study.judge(study.compare(runs, c), c.direction)

    # a differs, against
    assert verdict("BDHS, DPO + NLL (the main job)", "base", "recall") == "does not hold"
    assert verdict("Online-DPO (rule)", "corruption set, plain DPO", "recall") == "does not hold"
    assert (
        verdict("corruption set + BDHS_attn (Avg-DPO)", "corruption set alone", "recall") == "holds"
    )
    assert verdict("IPO", "DPO", "chair_i") == "holds"  # a tie where the paper's finding is a tie
    assert (
        verdict("Mixed-DPO (rule)", "corruption set, plain DPO", "pope_adversarial_f1")
        == "inconclusive"
    )
    assert verdict("BDHS_attn ρ 0.99", "masking only, no guidance, ρ 0.99", "chair_i").startswith(
        "inconclusive (a tie"
    )
    ci = study.compare(runs, claim("BDHS, DPO + NLL (the main job)", "base", "recall"))
    assert ci["seeds"] == 5 and ci["diff"] == pytest.approx(-2.0, abs=0.02)  # seeds 3-7, paired
    # the other tables: 3-5
    assert study.compare(runs, claim("IPO", "DPO", "chair_i"))["seeds"] == 3
    # the matched rows have no runs here: they are named inconclusive, never dropped
    block = study.verdict_block(runs)
    lines = [ln for ln in block.splitlines() if ln.startswith("| ")]
    assert len(lines) == len(study.CLAIMS) + 1
    assert block.count("| not tested here |") == sum(not c.metric for c in study.CLAIMS)
    # online's matched rows: in fake data
    assert "| -2.0 [" in block and "| no finished runs of both rows |" not in block
    # a table not run yet: its claims are not judged, the others are
    block = study.verdict_block({t: rows for t, rows in runs.items() if t != "online"})
    online = sum(c.metric != "" and "online" in (c.a[0], c.b[0]) for c in study.CLAIMS)
    assert block.count("| no finished runs of both rows | ") == online > 0
    assert block.count("| not judged (no runs) |") == online and "| -2.0 [" in block
    assert study.table_block("table12", runs).count("1 failed") == 1


def test_figures_and_outputs_from_fake_runs(tmp_path):
    runs = study.read_runs_of(fake_records())
    for row in study.TABLES["table6"]:  # BDHS's per-attempt shares on the table's BDHS rows
        for res in runs["table6"][row].values():
            if res:
                res |= {f"bdhs/non_similar@{k}": 50.0 + 10 * k for k in range(1, 6)}
    st, rd = tmp_path / "STUDY.md", tmp_path / "README.md"
    st.write_text("# study\n\n<!-- table:main -->\nold\n<!-- /table:main -->\n\ntext kept\n")
    rd.write_text("# readme\n\n<!-- study:headline -->\nold\n<!-- /study:headline -->\n\nkept\n")
    paths = study.write_outputs(runs, 1.5, str(st), str(rd), str(tmp_path / "figures"))
    assert sorted(os.path.basename(p) for p in paths) == [
        "bdhs_attempts.png",
        "main.png",
        "twin.png",
        "verdicts.png",
    ]
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(p) > 5000
    text = st.read_text()
    assert "\nold\n" not in text and "text kept" in text and "![main](figures/main.png)" in text
    assert "<!-- table:verdicts -->" in text and "runs (" in study.block_of(text, "cost")
    readme = rd.read_text()
    assert "kept" in readme and "![the main table, run by run](figures/main.png)" in readme
    check_headline(readme, text)
    # the main table's comparisons, paired: BDHS's recall 2 points under the base's on every run
    cols, rows = study.md_table(study.block_of(text, "paired_main"))
    cell = rows["BDHS, DPO + NLL (the main job) − base"]["recall"]
    assert cell.startswith("-2.0 [") and cell.endswith("] differs")
    assert rows["corruption set, DPO + NLL − base"]["chair_i"].endswith("] ties")
    assert set(study.md_table(study.block_of(text, "paired_twin"))[0]) > {"twin/grounding"}
    assert study.md_table(study.block_of(text, "paired_table12"))[1]["IPO − DPO"][
        "chair_i"
    ].endswith("] ties")
    # Table 6 and the online table: each comparison a row; the ablation table was not run, no block
    t6 = study.md_table(study.block_of(text, "paired_table6"))[1]
    assert len(t6) == len(study.T6_PAIRS) and "BDHS_attn ρ 0.99 − corruption set alone" in t6
    online = study.md_table(study.block_of(text, "paired_online"))[1]
    assert set(online) >= {
        "Online-DPO (rule) − offline DPO, matched to Online-DPO",
        "RLOO (rule) − PPO (rule)",
    }
    assert "paired_ablation" not in text


def check_headline(readme, study_text):
    """Every cell of README's headline block equals STUDY.md's main table's cell (same row, same column)."""
    cols, rows = study.md_table(study.block_of(readme, "headline", kind="study"))
    _, main = study.md_table(study.block_of(study_text, "main"))
    assert len(rows) >= 3 and "chair_i" in cols and "recall" in cols
    for row, cells in rows.items():
        for col in cols[1:]:
            assert cells[col] == main[row][col], (row, col)


def test_readme_headline_equals_study():
    """The committed README's headline figures are STUDY.md's (scripts/study.py writes both from the same runs),
    and every paired interval its lead quotes, "+1.3 [+0.7, +1.9]", is one of STUDY.md's generated blocks'."""
    root = pathlib.Path(study.__file__).parent.parent
    readme, text = (root / "README.md").read_text(), (root / "STUDY.md").read_text()
    check_headline(readme, text)
    blocks = re.findall(r"<!-- table:(\w+) -->", text)
    generated = [study.block_of(text, b) for b in blocks]
    prose = readme[: readme.index("<!-- study:headline -->")] + text
    for block in generated:
        prose = prose.replace(block, "")
    quoted = re.findall(r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]", prose.replace("−", "-"))
    assert quoted and [q for q in quoted if q not in "".join(generated)] == []


def test_matched_rows_take_the_online_runs_kept_pairs(tmp_path, monkeypatch):
    """kept_pairs: per step the batch less its dropped share; the matched row's --pairs leaves that many to train on."""
    run = tmp_path / "online"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "train_config.json").write_text(
        json.dumps({"algo": "online-dpo", "batch_size": 32})
    )
    steps = [
        {"step": 0, "online/ties_or_dropped": 0.5},
        {"step": 1, "online/ties_or_dropped": 0.75},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    assert study.kept_pairs(str(run)) == {"pairs_kept": 24}  # 16 + 8
    for kept in (24, 700, 1800, 1984):
        n = study.matched_pairs(kept)
        assert n - min(200, n // 10) == kept
    seen = []

    def fake_row(cfg, table, row, cmds, seed, train=0):
        seen.append((row, cmds))
        return {"pairs_kept": 700} if row == "Online-DPO (rule)" else None

    monkeypatch.setattr(study, "run_row", fake_row)
    out = study.run_chain(study.Config(root=str(tmp_path)), "online", 3, 1)
    cmds = dict(seen)["offline DPO, matched to Online-DPO"]
    # 777 - 77 held out = 700
    assert "--beta 0.5 --epochs 1 --lr_projector 0 --pairs 777" in cmds[0]
    assert out["offline BDHS, matched to Online-BDHS"] is None  # its online run failed: failed too
    assert "offline BDHS, matched to Online-BDHS" not in dict(seen)


def test_bdhs_shares_per_attempt(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    metas = [
        dict(attempts=1, similarity=0.5),
        dict(attempts=2, similarity=0.9),
        dict(attempts=5, similarity=0.99),
        dict(attempts=1, similarity=1.0),
    ]
    settings = {"settings": {"variant": "attn", "n_bdhs": 5, "eps_s": 0.97}}
    (out / "pairs.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [settings] + [{"meta": {"bdhs": m}} for m in metas])
    )
    shares = study.bdhs_shares(str(out))
    assert [shares[f"bdhs/non_similar@{k}"] for k in range(1, 6)] == [25.0, 50.0, 50.0, 50.0, 50.0]


def test_every_compared_metric_has_a_margin():
    for c in study.CLAIMS:
        assert (c.metric == "") == (c.a is None) == (c.b is None)
        if c.metric:
            assert study.margin(c.metric) > 0 and c.a[1] in study.TABLES[c.a[0]] | {"base": 0}
            assert c.b[1] in study.TABLES[c.b[0]] | {"base": 0}
    assert study.margin("b/chair_i") == study.MARGINS["chair_i"]
    with pytest.raises(KeyError, match="no margin for 'nope'"):
        study.margin("nope")


def test_main_writes_the_file_study_figures_and_readme(tmp_path, monkeypatch):
    """python scripts/study.py's whole path with fake runs: the per-run file, STUDY.md's blocks, figures,
    README's block."""

    def fake_row(cfg, table, row, cmds, seed, train=0):
        res = {m: fake_value(row, m, seed, train) for m in BASE_VALUES}
        return res | {"pairs_kept": 700} if row.startswith("Online") else res

    monkeypatch.setattr(study, "run_row", fake_row)
    monkeypatch.chdir(tmp_path)
    pathlib.Path("STUDY.md").write_text("<!-- table:main -->\n<!-- /table:main -->\n")
    pathlib.Path("README.md").write_text("<!-- study:headline -->\n<!-- /study:headline -->\n")
    study.main(["--tables", "main,twin,online"])
    runs = study.read_runs("study_runs.csv")
    assert set(runs) == {"main", "twin", "online"}
    assert set(runs["main"]["BDHS, DPO + NLL (the main job)"]) == {
        (s, j) for s in range(3, 8) for j in (0, 1)
    }
    assert set(runs["main"]["shortcut baseline (no training)"]) == {(s, None) for s in range(3, 8)}
    assert set(runs["online"]["Online-DPO (rule)"]) == {(s, j) for s in (3, 4, 5) for j in (0, 1)}
    text = pathlib.Path("STUDY.md").read_text()
    assert "World seeds 3, 4, 5, 6, 7 × training seeds 0, 1" in study.block_of(text, "main")
    assert "holds" in study.block_of(text, "verdicts") and os.path.exists("figures/main.png")
    check_headline(pathlib.Path("README.md").read_text(), text)
    study.main(["--tables", "main", "--seeds", "0"])  # a dev seed: printed, nothing written
    assert study.read_runs("study_runs.csv") == runs


def test_each_table_its_own_seeds_unless_the_flags_name_them():
    cfg = study.Config()
    seeds, trains = study.plan(cfg, ["main", "online", "ablation"])
    assert seeds == {"main": [3, 4, 5, 6, 7], "online": [3, 4, 5], "ablation": [3, 4, 5]}
    assert trains == {"main": [0, 1], "online": [0, 1], "ablation": [0]}
    seeds, trains = study.plan(study.Config(seeds="0", train_seeds="2"), ["main", "ablation"])
    assert seeds == {"main": [0], "ablation": [0]} and trains == {"main": [2], "ablation": [2]}
