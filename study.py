"""study.py: the study's tables on the world, re-run over seeds and written into STUDY.md.

A table's row is a list of command lines, run as a user would type them. Each run (row x world
seed) keeps its output under runs/study/<hash of its commands>/seed<k>/ (a row two tables share runs
once); its results.json is the world report of `eval.py --data world`. A rerun runs only what is
missing. Two runs go at a time, one thread each (on 2 cores that beats one run with two threads).

World seeds 0, 1, 2 are the dev seeds, on which every default and choice was made; 3, 4, 5 are the
test seeds, on which nothing was tuned, and the only ones STUDY.md reports (mean ± std over seeds).

    python study.py                          # every table on the test seeds (~2 h on 2 CPU cores)
    python study.py --tables table12,online  # some tables
    python study.py --seeds 0 --tables main  # a dev seed (not written into STUDY.md)
"""
import hashlib
import json
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

from model import CACHE_ENV, UserError, cache_home, config_from_argv, run_main

DEV, TEST = [0, 1, 2], [3, 4, 5]
PY = sys.executable
OFF = "train_offline.py --eval_n 0 --world_seed {seed} --out_dir {out}"
ON = "train_online.py --eval_n 0 --world_seed {seed} --out_dir {out}"
PLAIN = "--rpo_alpha 0 --lr 1e-3"  # the paper's DPO, no NLL term; its best LR on dev seed 0
SMALL = "--pairs 1100"  # the ablations: 1,000 training pairs and 100 held out, to save time


def bdhs_row(flags, train=PLAIN):
    """BDHS pairs made by bdhs.py with the given flags, then plain DPO on them."""
    return [f"bdhs.py --world_seed {{seed}} --n 1100 --batch_size 256 --out {{out}}/pairs.jsonl {flags}",
            f"{OFF} --data {{out}}/pairs.jsonl {train}"]


# table -> {row: command lines}; the world report follows every row (eval.py on its checkpoint)
TABLES = {
    "main": {
        "BDHS, DPO + NLL (the main job)": [f"{OFF} --data bdhs"],
        "corruption set, DPO + NLL": [f"{OFF} --data world"],
        "BDHS, plain DPO": [f"{OFF} --data bdhs {PLAIN}"],
        "corruption set, plain DPO": [f"{OFF} --data world {PLAIN}"],
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
# the columns each table shows (keys of the world report; "hq/": held-out phrasings; "ord/":
# ordinary scenes; "a/", "b/": the two halves of the pairs)
COLUMNS = {
    "main": ["chair_i", "recall", "pope_adversarial_f1", "pope_adversarial_yes_ratio", "hq/chair_i",
             "hq/pope_adversarial_f1", "ord/detail", "ord/recall", "ord/count_acc"],
    "online": ["chair_i", "recall", "pope_adversarial_f1", "pope_adversarial_yes_ratio", "hq/pope_adversarial_f1",
               "ord/detail", "rm_acc"],  # rm_acc: the reward model's accuracy on held-out pairs (Table 7)
    "generalisation": ["a/chair_i", "a/pope_adversarial_f1", "b/chair_i", "b/pope_adversarial_f1", "b/recall"],
}
DEFAULT_COLUMNS = ["chair_i", "chair_s", "recall", "pope_adversarial_f1",
                   "pope_adversarial_yes_ratio", "hq/pope_adversarial_f1", "ord/detail"]


@dataclass
class Config:
    tables: str = "all"        # comma-separated names of TABLES, or all
    seeds: str = "3,4,5"       # world seeds; the test seeds by default
    root: str = "runs/study"   # a folder per run, kept: a rerun does only what is missing
    jobs: int = 2              # runs at a time, one thread each
    write: bool = True         # update STUDY.md's tables (test seeds only)
    BOUNDS = dict(jobs=">= 1")


LOCKS = {}  # a run's folder -> the lock its callers share


def run_row(cfg, table, row, commands, seed):
    """One row on one seed, then its world report, unless done -> results, or None on a failure."""
    # a run's folder is named by its commands: a row that two tables share runs once
    key = hashlib.sha256(json.dumps([commands, table == "generalisation"]).encode()).hexdigest()[:8]
    out = os.path.join(cfg.root, key, f"seed{seed}")
    done = os.path.join(out, "results.json")
    with LOCKS.setdefault(out, threading.Lock()):  # a shared run: the second caller waits
        if os.path.exists(done):
            return json.loads(pathlib.Path(done).read_text())
        shutil.rmtree(out, ignore_errors=True)  # what a killed runner left: started again
        os.makedirs(out)
        model = f" --model {out}/checkpoint" if commands else ""  # no command: the shipped base
        half = " --world_half a" if table == "generalisation" else ""
        report = (f"eval.py --data world --world_seed {{seed}}{model}{half} --batch_size 256 "
                  f"--out {{out}}/report.json")
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        t0 = time.time()
        with open(os.path.join(out, "log.txt"), "a") as log:
            for c in commands + [report]:
                line = c.format(seed=seed, out=out)
                log.write(f"$ python {line}\n")
                log.flush()
                cmd = [PY, *shlex.split(line)]
                if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                    print(f"failed: {table} / {row} / seed {seed}: see {out}/log.txt", flush=True)
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
        print(f"done: {table} / {row} / seed {seed} ({res['minutes']} min)", flush=True)
        return res


def cell(values):
    """mean ± std over seeds (std with n - 1), or the value alone for one seed."""
    if len(values) < 2:
        return f"{values[0]:.1f}" if values else "-"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown(table, results, seeds):
    """One table: a row per method (base first): metrics (mean ± std), minutes per run, command."""
    cols = COLUMNS.get(table, DEFAULT_COLUMNS)
    lines = [f"| method | {' | '.join(cols)} | min/run | command |", "|---" * (len(cols) + 3) + "|"]
    for row, per_seed in results.items():
        ok = [r for r in per_seed if r]
        vals = [cell([r[c] for r in ok if c in r]) for c in cols]
        cmds = " && ".join(f"python {c}" for c in TABLES.get(table, {}).get(row, []))
        cmds = f"`{cmds}` " if cmds else ""
        mins = cell([r["minutes"] for r in ok]) if row != "base" else "-"
        lines.append(f"| {row} | {' | '.join(vals)} | {mins} | {cmds}|")
    return f"World seeds {', '.join(map(str, seeds))} ({len(seeds)} runs per row).\n\n" + "\n".join(lines)


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


def main(argv=None):
    cfg = config_from_argv(Config, argv, __doc__)
    names = list(TABLES) if cfg.tables == "all" else cfg.tables.split(",")
    if unknown := [n for n in names if n not in TABLES]:
        raise UserError(f"--tables: unknown {unknown}; expected some of {', '.join(TABLES)}")
    if not all(s.strip().isdigit() for s in cfg.seeds.split(",")):
        raise UserError(f"--seeds {cfg.seeds!r}: expected comma-separated world seeds, e.g. 3,4,5")
    seeds = [int(s) for s in cfg.seeds.split(",")]
    print(f"cache: {cache_home()} (${CACHE_ENV}): BDHS pairs, reference log-probs, shared by the runs", flush=True)
    # the base once per seed (generalisation's apart: its report differs), then chains side by side:
    # a table's rows on one seed run in order (they may share cached BDHS pairs or ref log-probs)
    home = {t: "generalisation" if t == "generalisation" else "base" for t in names}
    bases = list(dict.fromkeys((home[t], s) for t in names for s in seeds))
    chains = [(t, s) for t in names for s in seeds]
    with ThreadPoolExecutor(cfg.jobs) as pool:
        base = dict(zip(bases, pool.map(lambda ts: run_row(cfg, ts[0], "base", [], ts[1]), bases)))
        done = list(pool.map(lambda ts: {"base": base[home[ts[0]], ts[1]]} | {
            row: run_row(cfg, ts[0], row, cmds, ts[1]) for row, cmds in TABLES[ts[0]].items()}, chains))
    blocks = {}
    for t in names:
        runs = [res for (tt, _), res in zip(chains, done) if tt == t]  # {row: results} per seed
        blocks[t] = markdown(t, {row: [r[row] for r in runs] for row in runs[0]}, seeds)
        print(f"\n## {t}\n{blocks[t]}")
    if cfg.write and set(seeds) <= set(TEST):
        write_study(blocks)


if __name__ == "__main__":
    run_main(main)
