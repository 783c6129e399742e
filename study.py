"""study.py: the study's tables on the world, re-run over seeds and written into STUDY.md.

A table's row is a list of command lines, run as a user would type them. Each run (row x world
seed x training seed) keeps its output under runs/study/<key>/seed<k>-train<j>/, the key a hash of
its commands and of the code (CODE and the shipped base model: changed code runs again; a row two
tables share runs once); its results.json is the world report of `eval.py --data world`. A rerun
runs only what is missing; a failed run is counted and shown in its table's `runs` column. Two runs
go at a time, one thread each (on 2 cores that beats one run with two threads). Comparisons are
paired over world seeds: paired_ci's 95% t-interval of the per-seed mean difference.

World seeds 0, 1, 2 are the dev seeds, on which every default and choice was made; 3, 4, 5 are the
test seeds, on which nothing was tuned, and the only ones STUDY.md reports (mean ± std over seeds).

    python study.py                          # every table on the test seeds (~2 h on 2 CPU cores)
    python study.py --tables table12,online  # some tables
    python study.py --seeds 0 --tables main  # a dev seed (not written into STUDY.md)
    python study.py --train_seeds 0,1        # each run with two training seeds
"""
import functools
import hashlib
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

from model import (CACHE_ENV, UserError, cache_home, config_from_argv, folder_hash, run_main,
                   source_bytes)

DEV, TEST = [0, 1, 2], [3, 4, 5]
PY = sys.executable
# {seed}: the world seed; {train}: the training seed (LoRA's initialisation, the order of the
# pairs, sampling: train_offline's / train_online's / bdhs.py's --seed); {out}: the run's folder
OFF = "train_offline.py --eval_n 0 --world_seed {seed} --seed {train} --out_dir {out}"
ON = "train_online.py --eval_n 0 --world_seed {seed} --seed {train} --out_dir {out}"
PLAIN = "--rpo_alpha 0 --lr 1e-3"  # the paper's DPO, no NLL term; its best LR on dev seed 0
SMALL = "--pairs 1100"  # the ablations: 1,000 training pairs and 100 held out, to save time
# the world report, after a row's commands (of its checkpoint; of the shipped base for the base row)
REPORT = "eval.py --data world --world_seed {seed}{model}{half} --batch_size 256 --out {out}/report.json"
SHORTCUT = REPORT.format(seed="{seed}", model=" --model shortcut", half="", out="{out}")  # a row that is its report


def bdhs_row(flags, train=PLAIN):
    """BDHS pairs made by bdhs.py with the given flags, then plain DPO on them."""
    return [f"bdhs.py --world_seed {{seed}} --seed {{train}} --n 1100 --batch_size 256 --out {{out}}/pairs.jsonl {flags}",
            f"{OFF} --data {{out}}/pairs.jsonl {train}"]


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
    },
    "table12": {"DPO": [f"{OFF} --data world {PLAIN}"],  # the same run as main's last row
                **{loss: [f"{OFF} --data world --loss {loss.lower()} {PLAIN}"] for loss in ("IPO", "SLiC")}},
    "table6": {
        # ρ_th 0.98 / 1.0 left out: with 9 image tokens an attempt shows 0-1 of them whatever ρ_th
        "masking only, no guidance, ρ 0.99": bdhs_row("--guidance none --rho 0.99"),
        "BDHS_attn ρ 0.99": bdhs_row("--rho 0.99"),
        "BDHS_noise N 500": bdhs_row("--variant noise --noise_steps 500"),
        "POVID-style distortion N 500": bdhs_row("--variant distort"),
        "corruption set alone": [f"{OFF} --data world {SMALL} {PLAIN}"],
        "corruption set + BDHS_noise (Avg-DPO)": bdhs_row("--source world+corrupt --external true --variant noise"),
        "corruption set + BDHS_attn (Avg-DPO)": bdhs_row("--source world+corrupt --external true"),
    },
    "ablation": {  # BDHS's own choices, not ablated in the paper: attempts x threshold, guidance
        **{f"N_BDHS {n}, ε_s {e}": bdhs_row("--rho 0.99" if (n, e) == (5, 0.97) else f"--n_bdhs {n} --eps_s {e}")
           for n in (1, 3, 5) for e in (0.95, 0.97, 0.99)},  # (5, 0.97), the paper's, is Table 6's BDHS_attn row
        "guidance: sentence (Algorithm 1)": bdhs_row("--rho 0.99"),
        "guidance: token-level (teacher-forced, masked)": bdhs_row("--guidance token"),
        "guidance: none (unguided, masked)": bdhs_row("--guidance none --rho 0.99"),
    },
    "online": {
        "Online-DPO (rule)": [f"{ON} --algo online-dpo"],
        "Mixed-DPO (rule)": [f"{ON} --algo mixed-dpo"],
        "Online-BDHS": [f"{ON} --algo online-bdhs"],
        "Online-BDHS + corruption set (Avg-DPO)": [f"{ON} --algo online-bdhs --external true"],
        "PPO (rule)": [f"{ON} --algo ppo"],
        "RLOO (rule)": [f"{ON} --algo rloo"],
        "PPO (reward model)": [f"{OFF} --data world --loss rm --out_dir {{out}}/rm",
                               f"{ON} --algo ppo --annotator rm:{{out}}/rm/checkpoint"],
    },
    "generalisation": {  # aligned on half a of the usual pairs; the report measures both halves
        "DPO + NLL, corruption set (half a)": [f"{OFF} --data world --world_half a"],
        "DPO + NLL, BDHS (half a)": [f"{OFF} --data bdhs --world_half a"],
        "Online-DPO (rule, half a)": [f"{ON} --algo online-dpo --world_half a"],
    },
}
TABLES["twin"] = TABLES["main"]  # the twin test (eval.evaluate_twins) of the main table's runs, shared
# the columns each table shows (keys of the world report; "hq/": held-out phrasings; "ord/":
# ordinary scenes; "a/", "b/": the two halves of the pairs)
COLUMNS = {
    "main": ["chair_i", "recall", "pope_adversarial_f1", "pope_adversarial_yes_ratio", "hq/chair_i",
             "hq/pope_adversarial_f1", "ord/detail", "ord/recall", "ord/count_acc"],
    "online": ["chair_i", "recall", "pope_adversarial_f1", "pope_adversarial_yes_ratio", "hq/pope_adversarial_f1",
               "ord/detail", "rm_acc"],  # rm_acc: the reward model's accuracy on held-out pairs (Table 7)
    "generalisation": ["a/chair_i", "a/pope_adversarial_f1", "b/chair_i", "b/pope_adversarial_f1", "b/recall"],
    "twin": ["twin/yes_twin", "twin/no_broken", "twin/grounding", "twin/mention_twin", "twin/mention_broken",
             "twin/mention_grounding", "twin/skipped"],
}
DEFAULT_COLUMNS = ["chair_i", "chair_s", "recall", "pope_adversarial_f1",
                   "pope_adversarial_yes_ratio", "hq/pope_adversarial_f1", "ord/detail"]


# -----------------------------------------------------------------------------
# Paired comparisons: a 95% t-interval over world seeds of the per-seed mean difference


def t_cdf(t, df):
    """P(T <= t) for Student's t with integer df >= 1, in closed form (Abramowitz & Stegun 26.7.3-4):
    A = P(|T| < t) is a finite series in cos(θ), θ = atan(t / sqrt(df)); stdlib only, no scipy."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/π) (θ + sinθ (cosθ + 2/3 cos³θ + ... + 2·4···(df-3) / 3·5···(df-2) cos^(df-2)θ))
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
        raise ValueError(f"paired_ci: {len(a)} world seeds against {len(b)}; a pair needs both rows on each seed")
    d = [statistics.mean(x if isinstance(x, list) else [x]) - statistics.mean(y if isinstance(y, list) else [y])
         for x, y in zip(a, b)]
    n = len(d)
    if n < 2:  # no spread, no interval
        return dict(diff=d[0] if d else None, lo=None, hi=None, seeds=n, call="inconclusive")
    half = t_quantile((1 + level) / 2, n - 1) * statistics.stdev(d) / math.sqrt(n)
    diff = statistics.mean(d)
    lo, hi = diff - half, diff + half
    call = "differs" if lo > 0 or hi < 0 else "ties" if -margin <= lo and hi <= margin else "inconclusive"
    return dict(diff=diff, lo=lo, hi=hi, seeds=n, call=call)


@dataclass
class Config:
    tables: str = "all"        # comma-separated names of TABLES, or all
    seeds: str = "3,4,5"       # world seeds; the test seeds by default
    train_seeds: str = "0"     # training seeds ({train} in the commands), each run on every world seed
    root: str = "runs/study"   # a folder per run, kept: a rerun does only what is missing
    jobs: int = 2              # runs at a time, one thread each
    write: bool = True         # update STUDY.md's tables (test seeds only)
    BOUNDS = dict(jobs=">= 1")


LOCKS = {}  # a run's folder -> the lock its callers share
FAILED = set()  # the folders of the runs that failed in this invocation
# the code a run executes: a change to any of them (or to the shipped base model) is a new run
CODE = ("model.py", "data.py", "losses.py", "world.py", "eval.py", "bdhs.py", "train_offline.py",
        "train_online.py")


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
                    print(f"failed: {table} / {row} / seed {seed}, training seed {train}: see {out}/log.txt",
                          flush=True)
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
        with open(done + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(done + ".tmp", done)
        print(f"done: {table} / {row} / seed {seed}, training seed {train} ({res['minutes']} min)", flush=True)
        return res


def cell(values):
    """mean ± std over runs (std with n - 1), or the value alone for one run."""
    if len(values) < 2:
        return f"{values[0]:.1f}" if values else "-"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown(table, results, seeds, trains=(0,)):
    """One table: a row per method (base first): metrics (mean ± std over the runs that finished),
    runs finished / started (a failed run is counted, never dropped silently), minutes per run, command."""
    cols = COLUMNS.get(table, DEFAULT_COLUMNS)
    lines = [f"| method | {' | '.join(cols)} | runs | min/run | command |", "|---" * (len(cols) + 4) + "|"]
    failed = 0
    for row, per_run in results.items():
        ok = [r for r in per_run if r]
        failed += len(per_run) - len(ok)
        vals = [cell([r[c] for r in ok if c in r]) for c in cols]
        cmds = " && ".join(f"python {c}" for c in TABLES.get(table, {}).get(row, []))
        cmds = f"`{cmds}` " if cmds else ""
        mins = cell([r["minutes"] for r in ok]) if row != "base" else "-"
        lines.append(f"| {row} | {' | '.join(vals)} | {len(ok)}/{len(per_run)} | {mins} | {cmds}|")
    head = f"World seeds {', '.join(map(str, seeds))} × training seeds {', '.join(map(str, trains))}, a run " \
        f"each (a row without training: one per world seed); {failed} failed, left out of the means and " \
        "counted in `runs`."
    return head + "\n\n" + "\n".join(lines)


def write_study(blocks, path="STUDY.md"):
    """Replaces each table's block between `<!-- table:NAME -->` and `<!-- /table:NAME -->`."""
    text = open(path).read() if os.path.exists(path) else ""
    for name, block in blocks.items():
        start, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
        new = f"{start}\n{block}\n{end}"
        if start in text:
            text = re.sub(f"{re.escape(start)}.*?{re.escape(end)}", lambda _: new, text, flags=re.S)
        else:
            text += f"\n{new}\n"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def seed_list(flag, text):
    if not all(x.strip().isdigit() for x in text.split(",")):
        raise UserError(f"--{flag} {text!r}: expected comma-separated seeds, e.g. 3,4,5")
    return [int(x) for x in text.split(",")]


def main(argv=None):
    cfg = config_from_argv(Config, argv, __doc__)
    names = list(TABLES) if cfg.tables == "all" else cfg.tables.split(",")
    if unknown := [n for n in names if n not in TABLES]:
        raise UserError(f"--tables: unknown {unknown}; expected some of {', '.join(TABLES)}")
    seeds = seed_list("seeds", cfg.seeds)
    trains = seed_list("train_seeds", cfg.train_seeds)
    print(f"cache: {cache_home()} (${CACHE_ENV}): BDHS pairs, reference log-probs, shared by the runs", flush=True)
    # the base once per seed (generalisation's apart: its report differs), then chains side by side:
    # a table's rows on one (world seed, training seed) run in order (they may share cached BDHS
    # pairs or ref log-probs)
    home = {t: "generalisation" if t == "generalisation" else "base" for t in names}
    bases = list(dict.fromkeys((home[t], s) for t in names for s in seeds))
    chains = [(t, s, j) for t in names for s in seeds for j in trains]
    with ThreadPoolExecutor(cfg.jobs) as pool:
        base = dict(zip(bases, pool.map(lambda ts: run_row(cfg, ts[0], "base", [], ts[1]), bases)))
        done = list(pool.map(lambda c: {"base": base[home[c[0]], c[1]]} | {
            row: run_row(cfg, c[0], row, cmds, c[1], c[2]) for row, cmds in TABLES[c[0]].items()}, chains))
    blocks = {}
    for t in names:
        per_row = {}  # row -> its results per run; a row without {train} (the base, the shortcut) once per seed
        for (tt, _, j), res in zip(chains, done):
            for row, r in res.items() if tt == t else ():
                if j == trains[0] or any("{train}" in c for c in TABLES[t].get(row, [])):
                    per_row.setdefault(row, []).append(r)
        blocks[t] = markdown(t, per_row, seeds, trains)
        print(f"\n## {t}\n{blocks[t]}")
    if FAILED:
        print(f"\n{len(FAILED)} runs failed (see `failed:` above); the tables count them in their runs column",
              flush=True)
    if cfg.write and set(seeds) <= set(TEST):
        write_study(blocks)


if __name__ == "__main__":
    run_main(main)
