"""scripts/study.py: the study's tables on the world, re-run over seeds and written into STUDY.md.

A table's row is a list of command lines, run as a user would type them. Each run (row x world
seed x training seed) keeps its output under runs/study/<key>/seed<k>-train<j>/, the key a hash of
its commands and of the code (CODE and the shipped base model: changed code runs again; a row two
tables share runs once); its results.json is the world report of `eval.py --data world`. A rerun
runs only what is missing; a failed run is counted and shown in its table's `runs` column. Two runs
go at a time, one thread each (on 2 cores that beats one run with two threads).

Every per-run value that a table, a verdict or a figure uses goes to study_runs.csv (table, row,
world seed, training seed, metric, value), and everything written into STUDY.md is computed from
that file alone: anyone can recompute each statistic. Comparisons are paired over world seeds
(paired_ci: a 95% t-interval of the per-seed mean difference, called against MARGINS, fixed before
the runs on seeds 6-7 and training seed 1); the verdicts on the paper's findings are CLAIMS, data
here; the figures go to figures/ and README.md's headline block is STUDY.md's main table, cut down.

World seeds 0, 1, 2 are the dev seeds, on which every default and choice was made; 3-7 are the test
seeds, on which nothing was tuned, and the only ones STUDY.md reports. The main table (and its twin
test) runs on 3-7, the other tables on 3-5 (SEEDS), each with training seeds 0 and 1 but BDHS's own
choices, which no verdict rests on: training seed 0 only (TRAINS).

    python scripts/study.py                          # every table on the test seeds (many hours on 2 CPU cores)
    python scripts/study.py --tables table12,online  # some tables
    python scripts/study.py --seeds 0 --tables main  # a dev seed (not written into STUDY.md)
    python scripts/study.py --train_seeds 0          # one training seed per run
"""

import csv
import functools
import hashlib
import io
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import UserError, atomic_write, config_from_argv, run_main  # noqa: E402
from hub import CACHE_ENV, cache_home, folder_hash, source_bytes  # noqa: E402

DEV = [0, 1, 2]
TEST = [3, 4, 5, 6, 7]
# the world seeds of each table (without --seeds): the main table and its twin test on all five
# test seeds, the rest on three (their rows are many: 5 seeds x 2 training seeds would double the hours)
SEEDS = dict(main=TEST, twin=TEST)
OTHER_SEEDS = [3, 4, 5]
# training seeds per table: BDHS's own choices, which no verdict rests on, take one (the time)
TRAINS = dict(ablation=[0])
OTHER_TRAINS = [0, 1]
PY = sys.executable
# {seed}: the world seed; {train}: the training seed (LoRA's initialisation, the order of the
# pairs, sampling: train_offline's / train_online's / bdhs.py's --seed); {out}: the run's folder
OFF = "train_offline.py --eval_n 0 --world_seed {seed} --seed {train} --out_dir {out}"
ON = "train_online.py --eval_n 0 --world_seed {seed} --seed {train} --out_dir {out}"
PLAIN = "--rpo_alpha 0 --lr 1e-3"  # the paper's DPO, no NLL term; its best LR on dev seed 0
SMALL = "--pairs 1100"  # the ablations: 1,000 training pairs and 100 held out, to save time
# the world report, after a row's commands (of its checkpoint; of the shipped base for the base row)
REPORT = (
    "eval.py --data world --world_seed {seed}{model}{half} --batch_size 256 --out {out}/report.json"
)
# a row that is its report
SHORTCUT = REPORT.format(seed="{seed}", model=" --model shortcut", half="", out="{out}")
# the offline side of a matched comparison with an online row: the online run's β, one epoch, the projector
# frozen (online cannot train it) and as many training pairs as the online run kept ({pairs}: see kept_pairs)
MATCH = "--beta 0.5 --epochs 1 --lr_projector 0 --pairs {pairs}"
MATCHED = {  # matched row -> the online row whose kept pairs it takes (the same table, run before it)
    "offline DPO, matched to Online-DPO": "Online-DPO (rule)",
    "offline BDHS, matched to Online-BDHS": "Online-BDHS",
}
PARTNERS = "corruption set + partner pairs, DPO + NLL (opt-in; share set before the test seeds)"


def bdhs_row(flags, train=PLAIN):
    """BDHS pairs made by bdhs.py with the given flags, then plain DPO on them."""
    return [
        f"bdhs.py --world_seed {{seed}} --seed {{train}} --n 1100 --batch_size 256 --out {{out}}/pairs.jsonl {flags}",
        f"{OFF} --data {{out}}/pairs.jsonl {train}",
    ]


# table -> {row: command lines}; the world report follows every row (eval.py on its checkpoint)
TABLES = {
    "main": {
        "BDHS, DPO + NLL (the main job)": [f"{OFF} --data bdhs"],
        "corruption set, DPO + NLL": [f"{OFF} --data world"],
        "BDHS, plain DPO": [f"{OFF} --data bdhs {PLAIN}"],
        "corruption set, plain DPO": [f"{OFF} --data world {PLAIN}"],
        # no training: the text rule "a usual partner is absent" over the base model (world.py);
        # an aligned row that only learned the shortcut matches it
        "shortcut baseline (no training)": [SHORTCUT],
        # opt-in data that should teach grounding (world.partner_pairs); not the main job
        PARTNERS: [f"{OFF} --data world+partners"],
    },
    "table12": {
        "DPO": [f"{OFF} --data world {PLAIN}"],  # the same run as main's last row
        **{loss: [f"{OFF} --data world --loss {loss.lower()} {PLAIN}"] for loss in ("IPO", "SLiC")},
    },
    "table6": {
        # ρ_th 0.98 / 1.0 left out: with 9 image tokens an attempt shows 0-1 of them whatever ρ_th
        "masking only, no guidance, ρ 0.99": bdhs_row("--guidance none --rho 0.99"),
        "BDHS_attn ρ 0.99": bdhs_row("--rho 0.99"),
        "BDHS_noise N 500": bdhs_row("--variant noise --noise_steps 500"),
        "POVID-style distortion N 500": bdhs_row("--variant distort"),
        "corruption set alone": [f"{OFF} --data world {SMALL} {PLAIN}"],
        "corruption set + BDHS_noise (Avg-DPO)": bdhs_row(
            "--source world+corrupt --external true --variant noise"
        ),
        "corruption set + BDHS_attn (Avg-DPO)": bdhs_row("--source world+corrupt --external true"),
    },
    "ablation": {  # BDHS's own choices, not ablated in the paper: attempts x threshold, guidance
        # one attempt is never retried, so ε_s never applies: one row, not three equal ones
        "N_BDHS 1 (ε_s never applies)": bdhs_row("--n_bdhs 1"),
        **{
            f"N_BDHS {n}, ε_s {e}": bdhs_row(
                "--rho 0.99" if (n, e) == (5, 0.97) else f"--n_bdhs {n} --eps_s {e}"
            )
            for n in (3, 5)
            for e in (0.95, 0.97, 0.99)
        },  # (5, 0.97), the paper's, is Table 6's BDHS_attn row
        "guidance: sentence (Algorithm 1)": bdhs_row("--rho 0.99"),
        "guidance: token-level (teacher-forced, masked)": bdhs_row("--guidance token"),
        "guidance: none (unguided, masked)": bdhs_row("--guidance none --rho 0.99"),
    },
    "online": {
        "Online-DPO (rule)": [f"{ON} --algo online-dpo"],
        "offline DPO, matched to Online-DPO": [f"{OFF} --data world {PLAIN} {MATCH}"],
        "Mixed-DPO (rule)": [f"{ON} --algo mixed-dpo"],
        "Online-BDHS": [f"{ON} --algo online-bdhs"],
        "offline BDHS, matched to Online-BDHS": [f"{OFF} --data bdhs {PLAIN} {MATCH}"],
        "Online-BDHS + corruption set (Avg-DPO)": [f"{ON} --algo online-bdhs --external true"],
        "PPO (rule)": [f"{ON} --algo ppo"],
        "RLOO (rule)": [f"{ON} --algo rloo"],
        "PPO (reward model)": [
            f"{OFF} --data world --loss rm --out_dir {{out}}/rm",
            f"{ON} --algo ppo --annotator rm:{{out}}/rm/checkpoint",
        ],
    },
    "generalisation": {  # aligned on half a of the usual pairs; the report measures both halves
        "DPO + NLL, corruption set (half a)": [f"{OFF} --data world --world_half a"],
        "DPO + NLL, BDHS (half a)": [f"{OFF} --data bdhs --world_half a"],
        "Online-DPO (rule, half a)": [f"{ON} --algo online-dpo --world_half a"],
    },
}
# the twin test (eval.evaluate_twins) of the main table's runs, shared
TABLES["twin"] = TABLES["main"]
# the columns each table shows (keys of the world report; "hq/": held-out phrasings; "ord/":
# ordinary scenes; "a/", "b/": the two halves of the pairs)
COLUMNS = {
    "main": [
        "chair_i",
        "recall",
        "pope_adversarial_f1",
        "pope_adversarial_yes_ratio",
        "hq/chair_i",
        "hq/pope_adversarial_f1",
        "twin/grounding",
        "ord/detail",
        "ord/recall",
        "ord/count_acc",
    ],
    "online": [
        "chair_i",
        "recall",
        "pope_adversarial_f1",
        "pope_adversarial_yes_ratio",
        "hq/pope_adversarial_f1",
        "ord/detail",
        "rm_acc",
        "pairs_kept",
    ],  # rm_acc: the reward model's accuracy on held-out pairs
    # (Table 7); pairs_kept: the pairs an online run trained on (its ties dropped), which its matched row takes
    "generalisation": [
        "a/chair_i",
        "a/pope_adversarial_f1",
        "b/chair_i",
        "b/pope_adversarial_f1",
        "b/recall",
    ],
    "twin": [
        "twin/yes_twin",
        "twin/no_broken",
        "twin/grounding",
        "twin/mention_twin",
        "twin/mention_broken",
        "twin/mention_grounding",
        "twin/skipped",
    ],
}
DEFAULT_COLUMNS = [
    "chair_i",
    "chair_s",
    "recall",
    "pope_adversarial_f1",
    "pope_adversarial_yes_ratio",
    "hq/pope_adversarial_f1",
    "ord/detail",
]

# A "ties" call needs the whole interval of the paired difference within ±margin. Each margin is about
# twice the median std over the test seeds 3-5 of the aligned rows in STUDY.md's 3-seed tables (one run
# each; the twin keys: sampling error), rounded up to half a point and at least 1 point; STUDY.md gives
# the reasoning. Fixed before any run on world seeds 6-7 or training seed 1: never tuned on results.
MARGINS = {
    "chair_i": 1.0,
    "chair_s": 2.0,
    "recall": 1.5,
    "pope_adversarial_f1": 3.0,
    "pope_adversarial_yes_ratio": 8.0,
    "hq/chair_i": 3.0,
    "hq/pope_adversarial_f1": 5.5,
    "ord/detail": 3.5,
    "ord/recall": 1.0,
    "ord/count_acc": 1.0,
    "twin/grounding": 5.0,
    "twin/yes_twin": 5.0,
    "twin/no_broken": 5.0,
    "twin/mention_twin": 5.0,
    "twin/mention_broken": 5.0,
    "twin/mention_grounding": 5.0,
    "rm_acc": 8.0,
    "pair_acc": 5.0,
}


def margin(metric):
    """A metric's margin; a half's key ("a/chair_i") takes its metric's."""
    key = metric[2:] if metric[:2] in ("a/", "b/") else metric
    if key not in MARGINS:
        raise KeyError(f"study.MARGINS has no margin for {metric!r}: add one before comparing it")
    return MARGINS[key]


# -----------------------------------------------------------------------------
# Paired comparisons: a 95% t-interval over world seeds of the per-seed mean difference


def t_cdf(t, df):
    """P(T <= t) for Student's t with integer df >= 1, in closed form (Abramowitz & Stegun 26.7.3-4):
    A = P(|T| < t) is a finite series in cos(θ), θ = atan(t / sqrt(df)); stdlib only, no scipy."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    # odd: (2/π) (θ + sinθ (cosθ + 2/3 cos³θ + ... + 2·4···(df-3) / 3·5···(df-2) cos^(df-2)θ))
    if df % 2:
        term = total = math.cos(theta) if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= 2 * k / (2 * k + 1) * c2
            total += term
        a = 2 / math.pi * (theta + math.sin(theta) * total)
    else:  # even: sinθ (1 + 1/2 cos²θ + 1·3/2·4 cos⁴θ + ... + 1·3···(df-3) / 2·4···(df-2) cos^(df-2)θ)
        term = total = 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        a = math.sin(theta) * total
    return (1 + a) / 2


def t_quantile(p, df):
    """The t with P(T <= t) = p (0.5 <= p < 1), by bisection on t_cdf."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_ci(a, b, margin, level=0.95):
    """a, b: per world seed, a metric's values (a number, or a list over training seeds) of two rows,
    in the same seed order -> the mean over seeds of d = mean(a) - mean(b) with its t-interval
    (df = seeds - 1) and the call: "differs" where the interval excludes 0, else "ties" where it
    lies within ±margin (the metric's margin, fixed before the runs), else "inconclusive"."""
    if len(a) != len(b):
        raise ValueError(
            f"paired_ci: {len(a)} world seeds against {len(b)}; a pair needs both rows on each seed"
        )
    d = [
        statistics.mean(x if isinstance(x, list) else [x])
        - statistics.mean(y if isinstance(y, list) else [y])
        for x, y in zip(a, b)
    ]
    n = len(d)
    if n < 2:  # no spread, no interval
        return dict(diff=d[0] if d else None, lo=None, hi=None, seeds=n, call="inconclusive")
    half = t_quantile((1 + level) / 2, n - 1) * statistics.stdev(d) / math.sqrt(n)
    diff = statistics.mean(d)
    lo, hi = diff - half, diff + half
    call = (
        "differs"
        if lo > 0 or hi < 0
        else "ties"
        if -margin <= lo and hi <= margin
        else "inconclusive"
    )
    return dict(diff=diff, lo=lo, hi=hi, seeds=n, call=call)


# A Config is a table, a flag a row, its help the comment beside it: kept as written
# fmt: off
@dataclass
class Config:
    tables: str = "all"        # comma-separated names of TABLES, or all
    seeds: str = ""            # world seeds of every table; "": each table's own (SEEDS: test seeds)
    train_seeds: str = ""      # training seeds ({train} in the commands); "": each table's own (TRAINS)
    root: str = "runs/study"   # a folder per run, kept: a rerun does only what is missing
    jobs: int = 2              # runs at a time, one thread each
    write: bool = True         # update study_runs.csv, STUDY.md, figures/ and README's block (test seeds only)
    BOUNDS = dict(jobs=">= 1")
# fmt: on


LOCKS = {}  # a run's folder -> the lock its callers share
FAILED = set()  # the folders of the runs that failed in this invocation
# the code a run executes: a change to any of them (or to the shipped base model) is a new run
CODE = (
    "model.py",
    "data.py",
    "losses.py",
    "world.py",
    "eval.py",
    "bdhs.py",
    "train.py",
    "embedder.py",
    "releases.py",
    "hub.py",
    "cli.py",
    "train_offline.py",
    "train_online.py",
)


@functools.cache
def code_key():
    """The bytes of the project's code and the shipped base model's files, hashed once per study."""
    import world

    return hashlib.sha256(source_bytes(*CODE) + folder_hash(world.BASE_MODEL).encode()).hexdigest()


def run_dir(cfg, table, commands, seed, train):
    """A run's folder, named by its commands, the report it ends with and the code (a row that two
    tables share runs once; changed code runs again); a row that takes no training seed runs once."""
    half = table == "generalisation"
    key = hashlib.sha256(json.dumps([commands, half, REPORT, code_key()]).encode()).hexdigest()[:8]
    trains = any("{train}" in c for c in commands)
    return os.path.join(cfg.root, key, f"seed{seed}" + (f"-train{train}" if trains else ""))


def run_row(cfg, table, row, commands, seed, train=0):
    """One row on one (world seed, training seed), then its world report, unless done -> results,
    or None on a failure (counted and shown in the tables, see markdown)."""
    out = run_dir(cfg, table, commands, seed, train)
    done = os.path.join(out, "results.json")
    with LOCKS.setdefault(out, threading.Lock()):  # a shared run: the second caller waits
        if os.path.exists(done):
            return json.loads(pathlib.Path(done).read_text())
        shutil.rmtree(out, ignore_errors=True)  # what a killed or failed runner left: started again
        os.makedirs(out)
        model = f" --model {out}/checkpoint" if commands else ""  # no command: the shipped base
        half = " --world_half a" if table == "generalisation" else ""
        report = REPORT.format(seed="{seed}", model=model, half=half, out="{out}")
        # a row whose last command is a world report (the shortcut baseline) is evaluated by it
        steps = commands if commands and commands[-1].startswith("eval.py") else commands + [report]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        t0 = time.time()
        with open(os.path.join(out, "log.txt"), "a") as log:
            for c in steps:
                line = c.format(seed=seed, train=train, out=out)
                log.write(f"$ python {line}\n")
                log.flush()
                cmd = [PY, *shlex.split(line)]
                if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                    print(
                        f"failed: {table} / {row} / seed {seed}, training seed {train}: see {out}/log.txt",
                        flush=True,
                    )
                    FAILED.add(out)
                    return None
        res = next(iter(json.loads(pathlib.Path(out, "report.json").read_text()).values()))
        res |= {"minutes": round((time.time() - t0) / 60, 2), "commands": commands}
        # the held-out pairs' accuracy (Table 7) of the policy and of a reward model
        for name, sub in (("pair_acc", "metrics.jsonl"), ("rm_acc", "rm/metrics.jsonl")):
            path = os.path.join(out, sub)
            lines = open(path).readlines() if os.path.exists(path) else []
            evals = [json.loads(x) for x in lines if '"eval/' in x]
            if evals:
                res[name] = 100 * evals[-1]["eval/rewards/accuracies"]
        res |= kept_pairs(out) | bdhs_shares(out)
        atomic_write(done, json.dumps(res, indent=1))
        print(
            f"done: {table} / {row} / seed {seed}, training seed {train} ({res['minutes']} min)",
            flush=True,
        )
        return res


def kept_pairs(out):
    """An Online-DPO or Online-BDHS run's training pairs -> {"pairs_kept": n}, else {}. Per step (a line of
    metrics.jsonl), its batch of prompts less the share dropped (`online/ties_or_dropped`: the two samples
    tie, or a score is unreadable; Online-BDHS: a response equal to the ground truth)."""
    conf, path = (
        os.path.join(out, "checkpoint", "train_config.json"),
        os.path.join(out, "metrics.jsonl"),
    )
    if not (os.path.exists(conf) and os.path.exists(path)):
        return {}
    conf = json.loads(pathlib.Path(conf).read_text())
    if conf.get("algo") not in ("online-dpo", "online-bdhs"):
        return {}
    steps = [json.loads(x) for x in open(path) if '"eval/' not in x]
    return {
        "pairs_kept": round(
            sum(conf["batch_size"] * (1 - r.get("online/ties_or_dropped", 0.0)) for r in steps)
        )
    }


def matched_pairs(kept):
    """train_offline's --pairs that leaves `kept` pairs to train on (it holds out min(200, a tenth))."""
    n = kept
    while n - min(200, n // 10) < kept:
        n += 1
    return n


def bdhs_shares(out):
    """A run with BDHS pairs of its own ({out}/pairs.jsonl) -> the share of prompts with a non-similar
    rejected response after each attempt, "bdhs/non_similar@k" (the paper's Fig. 10), else {}."""
    import data

    path = os.path.join(out, "pairs.jsonl")
    settings = data.read_settings(path) if os.path.exists(path) else None
    if settings is None:  # bdhs.py's first line: the settings its pairs were made with
        return {}
    metas = [json.loads(x)["meta"]["bdhs"] for x in open(path).readlines()[1:] if x.strip()]
    if settings["variant"] == "distort" or not metas:  # one teacher-forced attempt: no similarity
        return {}
    out = {}
    for k in range(1, settings["n_bdhs"] + 1):
        ok = sum(m["attempts"] <= k and m["similarity"] < settings["eps_s"] for m in metas)
        out[f"bdhs/non_similar@{k}"] = 100 * ok / len(metas)
    return out


def cell(values):
    """mean ± std over runs (std with n - 1), or the value alone for one run."""
    if len(values) < 2:
        return f"{values[0]:.1f}" if values else "-"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown(table, results, seeds, trains=(0,)):
    """One table: a row per method (base first): metrics (mean ± std over the runs that finished),
    runs finished / started (a failed run is counted, never dropped silently), minutes per run, command."""
    cols = COLUMNS.get(table, DEFAULT_COLUMNS)
    lines = [
        f"| method | {' | '.join(cols)} | runs | min/run | command |",
        "|---" * (len(cols) + 4) + "|",
    ]
    failed = 0
    for row, per_run in results.items():
        ok = [r for r in per_run if r]
        failed += len(per_run) - len(ok)
        vals = [cell([r[c] for r in ok if c in r]) for c in cols]
        cmds = " && ".join(f"python {c}" for c in TABLES.get(table, {}).get(row, []))
        cmds = f"`{cmds}` " if cmds else ""
        mins = cell([r["minutes"] for r in ok]) if row != "base" else "-"
        lines.append(f"| {row} | {' | '.join(vals)} | {len(ok)}/{len(per_run)} | {mins} | {cmds}|")
    head = (
        f"World seeds {', '.join(map(str, seeds))} × training seeds {', '.join(map(str, trains))}, a run "
        f"each (a row without training: one per world seed); {failed} failed, left out of the means and "
        "counted in `runs`."
    )
    return head + "\n\n" + "\n".join(lines)


def write_study(blocks, path="STUDY.md", kind="table"):
    """Replaces each block between `<!-- KIND:NAME -->` and `<!-- /KIND:NAME -->` (appended if absent)."""
    text = open(path).read() if os.path.exists(path) else ""
    for name, block in blocks.items():
        start, end = f"<!-- {kind}:{name} -->", f"<!-- /{kind}:{name} -->"
        new = f"{start}\n{block}\n{end}"
        if start in text:
            i = text.index(start)
            j = text.index(end, i) + len(end)
            text = text[:i] + new + text[j:]
        else:
            text += f"\n{new}\n"
    atomic_write(path, text)


# -----------------------------------------------------------------------------
# The per-run file: every value the tables, verdicts and figures use, one line each

RUNS_FILE = "study_runs.csv"
FIELDS = ["table", "row", "world_seed", "train_seed", "metric", "value"]
# beside the columns: cost, Table 7, matching
EXTRA_KEYS = ["minutes", "pair_acc", "rm_acc", "pairs_kept"]


def keys_of(table, res):
    """The metrics of a run that go into the file: its table's columns, the verdicts' and figures' keys."""
    want = COLUMNS.get(table, DEFAULT_COLUMNS) + EXTRA_KEYS + [c.metric for c in CLAIMS if c.metric]
    want += FIGURE_KEYS + [k for k in res if k.startswith(("twin/", "bdhs/"))]
    return [k for k in dict.fromkeys(want) if isinstance(res.get(k), (int, float))]


def write_runs(records, path=RUNS_FILE, keep=()):
    """records: (table, row, world seed, training seed or None, results or None for a failed run) -> the CSV,
    written all or nothing; the lines of the tables in `keep` already there stay."""
    old = [r for r in read_rows(path) if r["table"] in keep] if os.path.exists(path) else []
    buf = io.StringIO()
    w = csv.DictWriter(buf, FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(old)
    for table, row, seed, train, res in records:
        base = dict(
            table=table, row=row, world_seed=seed, train_seed="" if train is None else train
        )
        if res is None:  # a failed run: a line of its own, so the file counts it too
            w.writerow(base | dict(metric="failed", value=1))
        for k in keys_of(table, res) if res else ():
            w.writerow(base | dict(metric=k, value=repr(float(res[k]))))
    atomic_write(path, buf.getvalue())


def read_rows(path=RUNS_FILE):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_runs(path=RUNS_FILE):
    """The CSV -> {table: {row: {(world seed, training seed or None): {metric: value} or None (failed)}}},
    rows in the file's order."""
    runs = {}
    for r in read_rows(path):
        run = (int(r["world_seed"]), int(r["train_seed"]) if r["train_seed"] else None)
        per = runs.setdefault(r["table"], {}).setdefault(r["row"], {})
        if r["metric"] == "failed":
            per[run] = None
        else:
            per.setdefault(run, {})[r["metric"]] = float(r["value"])
    return runs


def per_seed(runs, table, row, metric):
    """{world seed: [the metric over its finished runs (training seeds)]}, seeds with none left out."""
    out = {}
    for (seed, _), res in sorted(
        runs.get(table, {}).get(row, {}).items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)
    ):
        if res and metric in res:
            out.setdefault(seed, []).append(res[metric])
    return out


def table_block(table, runs):
    """A table's markdown from the per-run values (base first, then TABLES' order)."""
    rows = runs.get(table, {})
    order = (
        ["base"]
        + [r for r in TABLES[table] if r in rows]
        + [r for r in rows if r != "base" and r not in TABLES[table]]
    )
    per_row = {r: list(rows[r].values()) for r in order if r in rows}
    seeds = sorted({s for r in rows.values() for s, _ in r})
    trains = sorted({j for r in rows.values() for _, j in r if j is not None}) or [0]
    return markdown(table, per_row, seeds, trains)


# -----------------------------------------------------------------------------
# The verdicts: each of the paper's findings, as paired differences of two rows on one metric


@dataclass(frozen=True)
class Claim:
    finding: str  # the paper's finding, in its numbers
    tests: str  # what the world tests of it, and what it cannot
    # (table, row): the row the finding says is ahead (direction > 0), or the tied one
    a: tuple = None
    b: tuple = None  # (table, row) it is compared with; None: not tested here
    metric: str = ""  # a world report key; "" with a, b None: not tested here
    # the paper's sign of mean(a) - mean(b) on the metric: +1, -1, or 0 (about equal)
    direction: int = 0


M, CS, BP, CP = (
    ("main", "BDHS, DPO + NLL (the main job)"),
    ("main", "corruption set, DPO + NLL"),
    ("main", "BDHS, plain DPO"),
    ("main", "corruption set, plain DPO"),
)
BASE = ("main", "base")
ODPO, MDPO, OBDHS = (
    ("online", "Online-DPO (rule)"),
    ("online", "Mixed-DPO (rule)"),
    ("online", "Online-BDHS"),
)
MATCHED_DPO, MATCHED_BDHS = (
    ("online", "offline DPO, matched to Online-DPO"),
    ("online", "offline BDHS, matched to Online-BDHS"),
)
ATTN, NOISE, MASK = (
    ("table6", "BDHS_attn ρ 0.99"),
    ("table6", "BDHS_noise N 500"),
    ("table6", "masking only, no guidance, ρ 0.99"),
)
CS1K, AVG = ("table6", "corruption set alone"), ("table6", "corruption set + BDHS_attn (Avg-DPO)")
PROXY = "CHAIR_i stands in for MMHal's GPT-4-judged hallucination; "
DETAIL = "detail on ordinary scenes stands in for LLaVA-W's GPT-4-judged helpfulness; "
C1 = (
    "BDHS is competitive with data built by costlier means (Tables 2, 6): BDHS 5k vs POVID 5k, POPE 88.75 vs "
    "88.18, Object HalBench recall 75.58 vs 71.80, MMHal 2.61 vs 2.93"
)
C3 = "Online-DPO beats offline DPO (Table 9; POVID): LLaVA-W 82.61 vs 78.63, POPE 86.49 vs 88.09, recall lower online"
C3M = "the same, matched: the offline side at the online β 0.5, 1 epoch, projector frozen, the online run's kept pairs"
C4 = (
    "Mixed-DPO combines offline and online (Table 9; POVID): recall 74.53, the best of the three; POPE 88.03 vs "
    "offline 88.09"
)
C5 = "IPO and SLiC perform about like DPO (Table 12); SLiC best on POPE"
T5 = (
    "every loss at β 1 only (the paper searched β per loss); a tie is the interval within the margin, not the "
    "runs too noisy to tell (that is inconclusive)"
)
C6 = (
    "Avg-DPO with BDHS improves on the external set alone (Table 6): POVID + BDHS_attn vs POVID: POPE 88.56 vs "
    "88.18, LLaVA-W 85.35 vs 81.89, recall 75.05 vs 71.80"
)
C7 = (
    "Attention masking beats noise (Tables 6, 15): BDHS_attn vs BDHS_noise: POPE 88.75 vs 88.60, MMHal 2.61 vs "
    "2.37, LLaVA-W 86.33 vs 84.53"
)
C8 = "Ground-truth guidance helps BDHS (Table 15): guided vs masking only: MMHal 2.61 vs 2.52, recall 75.58 vs 77.04"
C9 = (
    "Online-BDHS improves on offline BDHS (Tables 2, 6): MMHal-V 2.99 vs 2.71, the rest about equal"
)
C9M = "the same, matched: offline BDHS at β 0.5, 1 epoch, projector frozen, the Online-BDHS run's pairs"
C11 = "PPO and RLOO: neither clearly better (Table 8): POPE 87.54 vs 87.17, mixed elsewhere"
CLAIMS = [
    Claim(
        C1,
        "main job vs the corruption set (DPO + NLL both; the corruption set, built from the scene, stands "
        "in for POVID)",
        M,
        CS,
        "chair_i",
        0,
    ),
    Claim(C1, "the same, POPE adversarial F1", M, CS, "pope_adversarial_f1", 0),
    Claim(C1, "the same, recall of the broken scenes' descriptions", M, CS, "recall", +1),
    Claim(
        C1,
        "the same, CHAIR_i asked in held-out phrasings (nothing trained on them)",
        M,
        CS,
        "hq/chair_i",
        0,
    ),
    Claim(
        "BDHS raises recall over the base (Table 2): Object HalBench recall 68.1 → 75.6",
        "main job vs the base; the world's base already names most objects",
        M,
        BASE,
        "recall",
        +1,
    ),
    Claim(
        C3,
        DETAIL + "Online-DPO (rule annotator) vs offline plain DPO on the corruption set",
        ODPO,
        CP,
        "ord/detail",
        +1,
    ),
    Claim(C3, "the same, POPE adversarial F1", ODPO, CP, "pope_adversarial_f1", -1),
    Claim(C3, "the same, recall", ODPO, CP, "recall", -1),
    Claim(
        C3M,
        DETAIL + "Online-DPO vs offline DPO matched (β, epochs, projector, pairs)",
        ODPO,
        MATCHED_DPO,
        "ord/detail",
        +1,
    ),
    Claim(C3M, "the same, POPE adversarial F1", ODPO, MATCHED_DPO, "pope_adversarial_f1", -1),
    Claim(C3M, "the same, recall", ODPO, MATCHED_DPO, "recall", -1),
    Claim(C4, "Mixed-DPO vs Online-DPO, recall", MDPO, ODPO, "recall", +1),
    Claim(C4, "Mixed-DPO vs offline plain DPO, recall", MDPO, CP, "recall", +1),
    Claim(
        C4,
        "Mixed-DPO vs offline plain DPO, POPE adversarial F1",
        MDPO,
        CP,
        "pope_adversarial_f1",
        0,
    ),
    Claim(C5, T5 + "; IPO vs DPO, CHAIR_i", ("table12", "IPO"), ("table12", "DPO"), "chair_i", 0),
    Claim(
        C5,
        "IPO vs DPO, POPE adversarial F1",
        ("table12", "IPO"),
        ("table12", "DPO"),
        "pope_adversarial_f1",
        0,
    ),
    Claim(C5, "SLiC vs DPO, CHAIR_i", ("table12", "SLiC"), ("table12", "DPO"), "chair_i", 0),
    Claim(
        C5,
        "SLiC vs DPO, POPE adversarial F1",
        ("table12", "SLiC"),
        ("table12", "DPO"),
        "pope_adversarial_f1",
        +1,
    ),
    Claim(
        C6,
        "corruption set + BDHS_attn vs the corruption set alone, 1,000 pairs, plain DPO; recall",
        AVG,
        CS1K,
        "recall",
        +1,
    ),
    Claim(C6, "the same, POPE adversarial F1", AVG, CS1K, "pope_adversarial_f1", 0),
    Claim(C6, DETAIL + "the same rows", AVG, CS1K, "ord/detail", +1),
    Claim(
        C7, "BDHS_attn vs BDHS_noise, POPE adversarial F1", ATTN, NOISE, "pope_adversarial_f1", 0
    ),
    Claim(C7, PROXY + "the same rows", ATTN, NOISE, "chair_i", -1),
    Claim(C7, DETAIL + "the same rows", ATTN, NOISE, "ord/detail", +1),
    Claim(C8, PROXY + "sentence guidance (Algorithm 1) vs masking only", ATTN, MASK, "chair_i", -1),
    Claim(C8, "the same, recall", ATTN, MASK, "recall", -1),
    Claim(C9, PROXY + "Online-BDHS vs offline BDHS (plain DPO)", OBDHS, BP, "chair_i", -1),
    Claim(C9, "the same, POPE adversarial F1", OBDHS, BP, "pope_adversarial_f1", 0),
    Claim(C9, "the same, recall", OBDHS, BP, "recall", 0),
    Claim(
        C9M,
        PROXY + "Online-BDHS vs offline BDHS matched (β, epochs, projector, pairs)",
        OBDHS,
        MATCHED_BDHS,
        "chair_i",
        -1,
    ),
    Claim(C9M, "the same, POPE adversarial F1", OBDHS, MATCHED_BDHS, "pope_adversarial_f1", 0),
    Claim(C9M, "the same, recall", OBDHS, MATCHED_BDHS, "recall", 0),
    Claim(
        "RL with a weak reward model does not help (Tables 7, 8): POVID's RM collapses PPO / RLOO; reward models "
        "0.97-0.99 accurate in distribution",
        "the world's reward model ranks far fewer held-out pairs right (rm_acc, the online table): a weaker model "
        "than the paper's, so what PPO on it does says nothing of the paper's",
    ),
    Claim(
        C11,
        "PPO vs RLOO, rule reward; POPE adversarial F1",
        ("online", "PPO (rule)"),
        ("online", "RLOO (rule)"),
        "pope_adversarial_f1",
        0,
    ),
    Claim(
        C11, "the same, CHAIR_i", ("online", "PPO (rule)"), ("online", "RLOO (rule)"), "chair_i", 0
    ),
    Claim(
        C11, "the same, recall", ("online", "PPO (rule)"), ("online", "RLOO (rule)"), "recall", 0
    ),
    Claim(
        "Corrupted rejections work as well as ranked ones; novel prompts and GPT-4V chosen responses are not needed "
        "(Tables 4, 5): VLFeedback corruption ≥ ranking",
        "the world has one source of prompts and one kind of chosen response",
    ),
    Claim(
        "Reward models trained on constructed pairs score below chance on another construction (Table 7): POVID "
        "RM on RLHF-V 0.34",
        "one construction is trained on; BDHS pairs were not scored by the reward model",
    ),
    Claim(
        "Benchmarks judged by GPT-4 (MMHal, MMHal-V, LLaVA-W, MMVet)",
        "the world has no judge; `eval.py --bench` scores them with any endpoint",
    ),
    Claim(
        "Alignment makes the model use the image (BDHS's premise, §1; no figure in the paper)",
        "the twin test: P(yes | twin) - P(yes | broken) on the absent partner, main job vs the base",
        M,
        BASE,
        "twin/grounding",
        +1,
    ),
    Claim(
        "(not the paper's) partner-present pairs teach grounding: an opt-in data source, its share set before "
        "any test seed",
        "twin grounding, corruption set + partner pairs vs the corruption set (DPO + NLL)",
        ("main", PARTNERS),
        CS,
        "twin/grounding",
        +1,
    ),
]


def judge(ci, direction):
    """A paired interval's call -> the verdict: holds / does not hold only from a "differs" call with the
    finding's sign or against it, or from a tie where the finding is a tie; anything else is inconclusive."""
    if ci is None:
        return "not tested here"
    if ci["call"] == "differs":
        if direction and (ci["diff"] > 0) == (direction > 0):
            return "holds"
        return "does not hold"
    if ci["call"] == "ties":
        return (
            "holds" if direction == 0 else "inconclusive (a tie: no difference beyond the margin)"
        )
    return "inconclusive"


def compare(runs, claim):
    """A claim's paired interval over the world seeds both rows finished on, or None (not tested here,
    or no common seeds)."""
    if not claim.metric:
        return None
    a, b = per_seed(runs, *claim.a, claim.metric), per_seed(runs, *claim.b, claim.metric)
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        return None
    return paired_ci([a[s] for s in seeds], [b[s] for s in seeds], margin(claim.metric))


def verdict_block(runs):
    """The verdict table: a row per claim; a finding's text once for its rows."""
    lines = [
        "| the paper's finding | what the world tests (and cannot) | Δ = a − b [95% CI] (seeds) | margin | "
        "verdict |",
        "|---|---|---|---|---|",
    ]
    last = None
    for c in CLAIMS:
        ci = compare(runs, c)
        if c.metric and ci is None:  # a table not run (yet), or every run of a row failed
            diff, verdict = "no finished runs of both rows", "not judged (no runs)"
        elif ci is None:
            diff, verdict = "-", "not tested here"
        elif ci["lo"] is None:
            diff, verdict = f"{ci['diff']:+.1f} (1 seed: no interval)", judge(ci, c.direction)
        else:
            diff = f"{ci['diff']:+.1f} [{ci['lo']:+.1f}, {ci['hi']:+.1f}] ({ci['seeds']})"
            verdict = judge(ci, c.direction)
        if c.metric:
            sign = {1: "a > b", -1: "a < b", 0: "a ≈ b"}[c.direction]
            test = f"{c.tests}. `{c.metric}`: a = {c.a[1]}, b = {c.b[1]}; the paper: {sign}"
        else:
            test = c.tests
        width = f"±{margin(c.metric)}" if c.metric else "-"
        lines.append(
            f"| {c.finding if c.finding != last else '〃'} | {test} | {diff} | {width} | {verdict} |"
        )
        last = c.finding
    return "\n".join(lines)


# Rows against rows, each metric a paired interval (the text around the tables quotes these): a block's
# comparisons (a, b) and its columns
MAIN_PAIRS = [(M, BASE), (CS, BASE), (BP, BASE), (CP, BASE), (M, CS), (M, BP), (CS, CP)]
MAIN_PAIRS += [(("main", PARTNERS), CS)]
LOSS_PAIRS = [(("table12", "IPO"), ("table12", "DPO")), (("table12", "SLiC"), ("table12", "DPO"))]
HALF_PAIRS = [
    (("generalisation", row), ("generalisation", "base")) for row in TABLES["generalisation"]
]
# Table 6's rows against the corruption set alone and BDHS_attn against its variants; BDHS's own
# choices against the paper's (N_BDHS 5, ε_s 0.97, sentence guidance); the online rows against their
# offline and matched counterparts and the RL rows against the base
T6 = "table6"
T6_PAIRS = [((T6, row), CS1K) for row in TABLES[T6] if row != CS1K[1]]
T6_PAIRS += [(ATTN, NOISE), (ATTN, MASK), ((T6, "POVID-style distortion N 500"), (T6, "base"))]
PAPERS = ("ablation", "N_BDHS 5, ε_s 0.97")
ABLATION_PAIRS = [
    (("ablation", row), PAPERS)
    for row in TABLES["ablation"]
    if row not in (PAPERS[1], "guidance: sentence (Algorithm 1)")
]
RL = [("online", row) for row in ("PPO (rule)", "RLOO (rule)", "PPO (reward model)")]
ONLINE_PAIRS = [(ODPO, CP), (ODPO, MATCHED_DPO), (MDPO, ODPO), (MDPO, CP), (OBDHS, BP)]
ONLINE_PAIRS += [
    (OBDHS, MATCHED_BDHS),
    (("online", "Online-BDHS + corruption set (Avg-DPO)"), OBDHS),
]
ONLINE_PAIRS += [(row, ("online", "base")) for row in RL] + [(RL[1], RL[0])]
PAIRED = {
    "paired_main": (
        MAIN_PAIRS,
        [
            "chair_i",
            "recall",
            "pope_adversarial_f1",
            "hq/chair_i",
            "hq/pope_adversarial_f1",
            "ord/detail",
            "ord/recall",
        ],
    ),
    "paired_twin": (
        MAIN_PAIRS,
        [
            "twin/grounding",
            "twin/yes_twin",
            "twin/no_broken",
            "twin/mention_twin",
            "twin/mention_broken",
        ],
    ),
    "paired_table12": (
        LOSS_PAIRS,
        [
            "chair_i",
            "chair_s",
            "recall",
            "pope_adversarial_f1",
            "hq/pope_adversarial_f1",
            "ord/detail",
        ],
    ),
    "paired_generalisation": (HALF_PAIRS, COLUMNS["generalisation"]),
    "paired_table6": (T6_PAIRS, ["chair_i", "recall", "pope_adversarial_f1", "ord/detail"]),
    "paired_ablation": (ABLATION_PAIRS, ["chair_i", "recall", "pope_adversarial_f1", "ord/detail"]),
    "paired_online": (
        ONLINE_PAIRS,
        ["chair_i", "recall", "pope_adversarial_f1", "hq/pope_adversarial_f1", "ord/detail"],
    ),
}


def paired_block(runs, pairs, cols):
    """A row per comparison a − b of `pairs`, a cell per metric: the paired difference, its 95%
    interval and the call (differs / ties / inconclusive; "-" where either row has no runs)."""
    lines = [f"| a − b | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]
    for a, b in pairs:
        cells = []
        for metric in cols:
            ci = compare(runs, Claim("", "", a, b, metric))
            if ci is None or ci["lo"] is None:
                cells.append("-")
            else:
                cells.append(f"{ci['diff']:+.1f} [{ci['lo']:+.1f}, {ci['hi']:+.1f}] {ci['call']}")
        lines.append(f"| {a[1]} − {b[1]} | {' | '.join(cells)} |")
    return "\n".join(lines)


def cost_block(runs, wall_minutes):
    """What the study cost: runs, failures, run-minutes, and this invocation's wall time."""
    done = {}  # a run two tables share counts once: by its row's commands, seed and training seed
    failed = 0
    for table, rows in runs.items():
        for row, per in rows.items():
            for run, res in per.items():
                # the base's runs: one per seed, the generalisation table's apart (its report differs)
                cmds = (
                    ["base", table == "generalisation"]
                    if row == "base"
                    else TABLES.get(table, {}).get(row, [row])
                )
                key = (json.dumps(cmds), run)
                failed += res is None and key not in done
                done[key] = res["minutes"] if res and "minutes" in res else 0.0
    total = sum(done.values())
    return (
        f"{len(done)} runs ({failed} failed), {total:.0f} run-minutes in all (the sum of each run's wall time, "
        f"its world report included); the last `python scripts/study.py` took {wall_minutes:.0f} minutes of wall time "
        f"on {os.cpu_count()} cores (runs finished earlier are read back, not run again)."
    )


# -----------------------------------------------------------------------------
# Figures (matplotlib, imported here only: a dev requirement, never the runtime's)

FIGURES = "figures"  # next to STUDY.md
MAIN_FIGURE = [
    "chair_i",
    "recall",
    "pope_adversarial_f1",
    "hq/chair_i",
    "hq/pope_adversarial_f1",
    "twin/grounding",
]
FIGURE_KEYS = MAIN_FIGURE + ["twin/yes_twin", "twin/no_broken"]


def mean_ci(by_seed):
    """{seed: [values]} -> (mean over seeds of the per-seed means, the 95% t half-width; 0 for one seed)."""
    means = [statistics.mean(v) for v in by_seed.values()]
    if len(means) < 2:
        return (means[0] if means else float("nan")), 0.0
    return statistics.mean(means), t_quantile(0.975, len(means) - 1) * statistics.stdev(
        means
    ) / math.sqrt(len(means))


def draw_figures(runs, folder=FIGURES):
    """PNGs of the main table, the verdicts, the twin test and BDHS's attempts -> their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, draw in (
        ("main", draw_main),
        ("verdicts", draw_verdicts),
        ("twin", draw_twin),
        ("bdhs_attempts", draw_attempts),
    ):
        fig = draw(plt, runs)
        if fig is None:  # nothing to draw (those runs are not in the file)
            continue
        path = os.path.join(folder, f"{name}.png")
        atomic_write(
            path, functools.partial(fig.savefig, format="png", dpi=110, bbox_inches="tight")
        )
        plt.close(fig)
        paths.append(path)
    return paths


def points_and_ci(ax, runs, table, rows, metric):
    """Per run a dot (a training seed's shade), per row the mean over seeds with its 95% t-interval."""
    for y, row in enumerate(rows):
        by_seed = per_seed(runs, table, row, metric)
        for k, vals in enumerate(by_seed.values()):
            for j, v in enumerate(vals):
                ax.plot(
                    v, y + 0.12 * (j - 0.5) + 0.03 * (k - 2), "o", ms=3, alpha=0.6, color=f"C{j}"
                )
        if by_seed:
            m, half = mean_ci(by_seed)
            ax.errorbar(m, y, xerr=half, fmt="|", color="black", capsize=3, ms=12)
    # shared y: subplots shows them on the first column only
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(metric, fontsize=9)


def draw_main(plt, runs):
    rows = [r for r in ["base", *TABLES["main"]] if r in runs.get("main", {})]
    if not rows:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(13, 2 + 0.5 * len(rows)), sharey=True)
    for ax, metric in zip(axes.flat, MAIN_FIGURE):
        points_and_ci(ax, runs, "main", rows, metric)
    axes.flat[0].set_ylim(len(rows) - 0.5, -0.5)  # the base on top (shared by every panel)
    fig.tight_layout()
    fig.suptitle(
        "The main table: dots are runs (world seed x training seed), bars the 95% t-interval over seeds",
        fontsize=10,
        y=1.02,
    )
    return fig


def draw_verdicts(plt, runs):
    """Each tested claim: the per-seed differences and their interval, in units of its metric's margin."""
    tested = [(c, compare(runs, c)) for c in CLAIMS if c.metric]
    tested = [(c, ci) for c, ci in tested if ci and ci["lo"] is not None]
    if not tested:
        return None
    fig, ax = plt.subplots(figsize=(9, 1 + 0.28 * len(tested)))
    ax.axvspan(-1, 1, color="0.9", label="within the margin")
    ax.axvline(0, color="0.5", lw=0.8)
    for y, (c, ci) in enumerate(tested):
        a, b, m = per_seed(runs, *c.a, c.metric), per_seed(runs, *c.b, c.metric), margin(c.metric)
        for s in sorted(a.keys() & b.keys()):
            ax.plot(
                (statistics.mean(a[s]) - statistics.mean(b[s])) / m,
                y,
                "o",
                ms=3,
                alpha=0.5,
                color="C0",
            )
        ax.errorbar(
            ci["diff"] / m,
            y,
            xerr=[[(ci["diff"] - ci["lo"]) / m], [(ci["hi"] - ci["diff"]) / m]],
            fmt="D",
            ms=4,
            color={"holds": "C2", "does not hold": "C3"}.get(judge(ci, c.direction), "black"),
            capsize=3,
        )
    ax.set_yticks(
        range(len(tested)), [f"{c.a[1]} − {c.b[1]}: {c.metric}" for c, _ in tested], fontsize=6
    )
    ax.invert_yaxis()
    ax.set_xlabel(
        "paired difference / margin (dots: world seeds; green holds, red does not hold, black inconclusive)"
    )
    return fig


def draw_twin(plt, runs):
    """P(yes | twin) against P(yes | broken) per run: a model that looks lies above the diagonal."""
    rows = [r for r in ["base", *TABLES["main"]] if r in runs.get("twin", {})]
    if not rows:
        return None
    # the right panel wider: its row names take half of it
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(16, 4.5), gridspec_kw=dict(width_ratios=[1, 1.6]))
    ax.plot([0, 100], [0, 100], color="0.6", lw=0.8, label="grounding 0 (the shortcut's line)")
    for k, row in enumerate(rows):
        pts = [
            (100 - r["twin/no_broken"], r["twin/yes_twin"])
            for r in runs["twin"][row].values()
            if r and "twin/no_broken" in r and "twin/yes_twin" in r
        ]
        if pts:
            ax.plot(*zip(*pts), "o", ms=4, alpha=0.7, color=f"C{k}", label=row)
    ax.set_xlabel("P(yes | broken scene), %")
    ax.set_ylabel("P(yes | its twin), %")
    ax.legend(fontsize=6)
    points_and_ci(bx, runs, "twin", rows, "twin/grounding")
    bx.set_ylim(len(rows) - 0.5, -0.5)
    fig.suptitle(
        "The twin test: the absent partner asked about on a broken scene and on its twin",
        fontsize=10,
    )
    fig.tight_layout()  # room for the long row names between the panels
    return fig


def draw_attempts(plt, runs):
    """BDHS's share of prompts with a non-similar rejected response after each attempt (the paper's Fig. 10)."""
    lines = {}  # a line's points -> the rows it stands for (equal pairs: Avg-DPO's BDHS side)
    points = {}  # a row's commands -> its line's points (a run two tables share is drawn once)
    for table in ("table6", "ablation"):
        for row, per in runs.get(table, {}).items():
            ks = sorted(
                {
                    int(k.split("@")[1])
                    for r in per.values()
                    if r
                    for k in r
                    if k.startswith("bdhs/non_")
                }
            )
            if ks:
                pts = points.setdefault(
                    tuple(TABLES[table][row]),
                    tuple(mean_ci(per_seed(runs, table, row, f"bdhs/non_similar@{k}")) for k in ks),
                )
                lines.setdefault(pts, []).append(row)
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for k, (pts, rows) in enumerate(lines.items()):
        row = rows[0] + (f" (= {'; '.join(rows[1:])})" if rows[1:] else "")
        ax.errorbar(
            range(1, len(pts) + 1),
            [m for m, _ in pts],
            yerr=[h for _, h in pts],
            marker="o",
            ms=3,
            capsize=2,
            label=row,
            color=f"C{k % 10}",
            ls="-" if k < 10 else "--",
        )
    ax.set_xlabel("attempt")
    ax.set_ylabel("non-similar rejected responses, % of prompts")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


# -----------------------------------------------------------------------------
# README's headline block: STUDY.md's main table, cut to its headline rows and columns

HEADLINE_ROWS = [
    "base",
    "BDHS, DPO + NLL (the main job)",
    "corruption set, DPO + NLL",
    "shortcut baseline (no training)",
    PARTNERS,
]
HEADLINE_COLUMNS = [
    "chair_i",
    "recall",
    "pope_adversarial_f1",
    "hq/chair_i",
    "hq/pope_adversarial_f1",
    "twin/grounding",
    "ord/detail",
]


def md_table(text):
    """The first markdown table in text -> (columns, {first cell: {column: cell}})."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    if len(lines) < 2:
        return [], {}
    cols = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(cols, cells))
    return cols, rows


def block_of(text, name, kind="table"):
    m = re.search(
        f"<!-- {kind}:{re.escape(name)} -->(.*?)<!-- /{kind}:{re.escape(name)} -->",
        text,
        flags=re.S,
    )
    return m[1] if m else ""


def headline(study_text, figure=""):
    """README's block: the headline rows and columns of STUDY.md's main table, cell for cell."""
    main = block_of(study_text, "main")
    cols, rows = md_table(main)
    cols = [c for c in HEADLINE_COLUMNS if c in cols]
    seeds = main.strip().split("\n")[0]  # the table's first line: its seeds and runs
    lines = [f"| method | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]
    lines += [
        f"| {r} | {' | '.join(rows[r][c] for c in cols)} |" for r in HEADLINE_ROWS if r in rows
    ]
    fig = f"\n\n![the main table, run by run]({figure})" if figure else ""
    return (
        f"From STUDY.md's main table (written by `python scripts/study.py`). {seeds}\n\n"
        + "\n".join(lines)
        + fig
    )


# -----------------------------------------------------------------------------
# The study


def seed_list(flag, text):
    if not all(x.strip().isdigit() for x in text.split(",")):
        raise UserError(f"--{flag} {text!r}: expected comma-separated seeds, e.g. 3,4,5")
    return [int(x) for x in text.split(",")]


def run_chain(cfg, table, seed, train):
    """A table's rows on one (world seed, training seed), in order: a matched row runs after its online
    row and takes that run's kept pairs (an online run that failed leaves its matched row failed too)."""
    out = {}
    for row, cmds in TABLES[table].items():
        if row in MATCHED:
            online = out.get(MATCHED[row])
            if not online or "pairs_kept" not in online:
                print(
                    f"failed: {table} / {row} / seed {seed}, training seed {train}: no kept pairs of "
                    f"{MATCHED[row]!r} to match",
                    flush=True,
                )
                out[row] = None
                continue
            cmds = [c.replace("{pairs}", str(matched_pairs(online["pairs_kept"]))) for c in cmds]
        out[row] = run_row(cfg, table, row, cmds, seed, train)
    return out


def plan(cfg, names):
    """The tables' world seeds and training seeds: the flags', else each table's own (SEEDS, TRAINS)."""
    seeds = {
        t: seed_list("seeds", cfg.seeds) if cfg.seeds else SEEDS.get(t, OTHER_SEEDS) for t in names
    }
    trains = {
        t: seed_list("train_seeds", cfg.train_seeds)
        if cfg.train_seeds
        else TRAINS.get(t, OTHER_TRAINS)
        for t in names
    }
    return seeds, trains


def main(argv=None):
    t0 = time.time()
    cfg = config_from_argv(Config, argv, __doc__)
    names = list(TABLES) if cfg.tables == "all" else cfg.tables.split(",")
    if unknown := [n for n in names if n not in TABLES]:
        raise UserError(f"--tables: unknown {unknown}; expected some of {', '.join(TABLES)}")
    seeds, trains = plan(cfg, names)
    print(
        f"cache: {cache_home()} (${CACHE_ENV}): BDHS pairs, reference log-probs, shared by the runs",
        flush=True,
    )
    # the base once per seed (generalisation's apart: its report differs), then chains side by side:
    # a table's rows on one (world seed, training seed) run in order (they may share cached BDHS
    # pairs or ref log-probs; a matched row needs its online row's run)
    home = {t: "generalisation" if t == "generalisation" else "base" for t in names}
    bases = list(dict.fromkeys((home[t], s) for t in names for s in seeds[t]))
    chains = [(t, s, j) for t in names for s in seeds[t] for j in trains[t]]
    with ThreadPoolExecutor(cfg.jobs) as pool:
        base = dict(zip(bases, pool.map(lambda ts: run_row(cfg, ts[0], "base", [], ts[1]), bases)))
        done = list(pool.map(lambda c: run_chain(cfg, *c), chains))
    # (table, row, world seed, training seed or None, results or None): a row without {train} (the base,
    # the shortcut) once per world seed
    records = [(t, "base", s, None, base[home[t], s]) for t in names for s in seeds[t]]
    for (t, s, j), res in zip(chains, done):
        for row, r in res.items():
            if any("{train}" in c for c in TABLES[t][row]):
                records.append((t, row, s, j, r))
            elif j == trains[t][0]:
                records.append((t, row, s, None, r))
    if FAILED:
        print(
            f"\n{len(FAILED)} runs failed (see `failed:` above); the tables count them in their runs column",
            flush=True,
        )
    if not (cfg.write and all(set(v) <= set(TEST) for v in seeds.values())):
        runs = read_runs_of(records)
        for t in names:
            print(f"\n## {t}\n{table_block(t, runs)}")
        return
    write_runs(records, keep=[t for t in TABLES if t not in names])  # the other tables' lines stay
    write_outputs(read_runs(), (time.time() - t0) / 60)


def read_runs_of(records):
    """The records as read_runs gives the file back (every run's metrics, no file written)."""
    runs = {}
    for table, row, seed, train, res in records:
        keep = {k: float(res[k]) for k in keys_of(table, res)} if res else None
        runs.setdefault(table, {}).setdefault(row, {})[seed, train] = keep
    return runs


def write_outputs(runs, wall_minutes, study="STUDY.md", readme="README.md", folder=FIGURES):
    """STUDY.md's blocks, its figures and README's headline block, all from the per-run values."""
    blocks = {t: table_block(t, runs) for t in TABLES if t in runs}
    blocks |= {"verdicts": verdict_block(runs), "cost": cost_block(runs, wall_minutes)}
    for name, (pairs, cols) in PAIRED.items():
        if pairs[0][0][0] in runs:  # the table of its rows was run
            blocks[name] = paired_block(runs, pairs, cols)
    paths = draw_figures(runs, folder)
    rel = {
        os.path.basename(p)[:-4]: os.path.relpath(p, os.path.dirname(os.path.abspath(study)))
        for p in paths
    }
    blocks |= {f"figure_{name}": f"![{name}]({p})" for name, p in rel.items()}
    write_study(blocks, study)
    figure = (
        os.path.relpath(os.path.join(folder, "main.png"), os.path.dirname(os.path.abspath(readme)))
        if "main" in rel
        else ""
    )
    write_study(
        {"headline": headline(pathlib.Path(study).read_text(), figure)}, readme, kind="study"
    )
    return paths


if __name__ == "__main__":
    run_main(main)
