"""eval.py: evaluation (paper §4.2, §7, App. B): the metrics, the world's report and the command line.

On the embedded world (`--data world`, the default), world.py checks every answer against its scene,
so POPE, CHAIR, recall and the helpfulness measures are exact (world_report names its parts).
The paper's benchmarks (§7, Table 2's columns; `--bench`) are read and scored by benchmarks.py:
POPE, Object HalBench, MMHal-Bench, MMHal-V, LLaVA-Bench, MM-Vet, TextVQA and GQA, from each public
release's own files in --bench_dir, the open-ended ones by a judge model behind any OpenAI-compatible
endpoint (JUDGE_BASE_URL, JUDGE_MODEL, JUDGE_API_KEY).

    python eval.py --model runs/offline/checkpoint --world_seed 3 --out results.json
    python eval.py --model llava-hf/llava-v1.6-vicuna-7b-hf --bench pope,objhal,mmhal,mmhal_v,llavaw,mmvet,textvqa,gqa
"""

import hashlib
import json
import os
import pathlib
import time
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm import tqdm

import data
import world as W
from cli import DTYPES, UserError, atomic_write, config_from_argv, run_main
from hub import check_template, folder_hash, source_bytes, template_line
from model import VLM, max_prompt_tokens, rows_that_fit

# -----------------------------------------------------------------------------
# Metrics (percentages), each a pure function

yes_no = W.says_yes  # POPE's rule for a yes / no answer (world.py's verifier reads by it too)


def pope_metrics(pred, label):
    """pred, label: bools (True = yes) -> POPE's metrics; 0 where its script divides by zero."""
    tp = sum(p and l for p, l in zip(pred, label))
    fp = sum(p and not l for p, l in zip(pred, label))
    fn = sum(l and not p for p, l in zip(pred, label))
    n = len(label)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    acc = sum(p == l for p, l in zip(pred, label)) / n
    return {
        k: 100 * v
        for k, v in dict(
            acc=acc, precision=precision, recall=recall, f1=f1, yes_ratio=sum(pred) / n
        ).items()
    }


def chair(said, truth):
    """said: each description's mentions (a list counts repeats); truth: a set per description.
    CHAIR_i = absent mentions / mentions, CHAIR_s = share of descriptions with an absent mention,
    recall = distinct present objects mentioned / present objects."""
    mentions = sum(len(s) for s in said)
    wrong = [sum(o not in t for o in s) for s, t in zip(said, truth)]
    found = sum(len(set(s) & t) for s, t in zip(said, truth))  # distinct present objects named
    # each ratio before the factor 100, as Object HalBench's script (0 where it divides by zero)
    return dict(
        chair_i=100 * (sum(wrong) / max(mentions, 1)),
        chair_s=100 * (sum(w > 0 for w in wrong) / len(said)),
        recall=100 * (found / max(sum(len(t) for t in truth), 1)),
    )


def accuracy(pred, gold):
    return 100 * sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1)


# -----------------------------------------------------------------------------


def mean(xs):
    return sum(xs) / max(len(xs), 1)


# Answers, and tables of results


def answer(vlm, images, questions, max_new_tokens, batch_size=64, desc="answers"):
    """Greedy, batched, KV-cached answers; images are PIL images or paths (opened per batch)."""
    out = []
    bar = tqdm(total=len(questions), desc=desc, unit="q", leave=False)  # a tick per batch
    for i in range(0, len(questions), batch_size):
        batch = vlm.prepare(
            questions[i : i + batch_size],
            [data.open_image(im) for im in images[i : i + batch_size]],
        )
        ids = vlm.generate(**batch, max_new_tokens=max_new_tokens, temperature=0.0)
        out += [vlm.tokenizer.decode(x) for x in ids]
        bar.update(len(ids))
    bar.close()
    return out


def table(rows: dict, keys, heads=None):
    """{name: results} -> a Markdown table, a row per name, a column per key ("-" where absent)."""
    lines = ["| model | " + " | ".join(heads or keys) + " |", "|---" * (len(keys) + 1) + "|"]
    digits = {"mmhal": 2, "mmhal_v": 2}  # MMHal's 0-6 ratings get two decimals, percentages one
    for name, r in rows.items():
        cells = [f"{r[k]:.{digits.get(k, 1)}f}" if k in r else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def atomic_json(path, obj):
    """Writes JSON all or nothing (cli.atomic_write), making its folder if needed."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=1))


# -----------------------------------------------------------------------------
# The world's report: every answer checked against its scene (what is asked and read: world.py)


def evaluate_world(vlm, world, split="broken", n=500, heldout=False, batch_size=256):
    """All world metrics (percentages) on the first n scenes of a split, as a flat dict."""
    scenes, items = W.probes(world, split, n, heldout)
    images = [W.render(s) for s in scenes]
    texts = [""] * len(items)
    for kind, max_new in (
        ("describe", 96),
        ("pope", 3),
        ("color", 6),
        ("count", 6),
        ("position", 8),
    ):
        sel = [j for j, it in enumerate(items) if it[1].startswith(kind)]
        outs = answer(
            vlm,
            [images[items[j][0]] for j in sel],
            [items[j][2] for j in sel],
            max_new,
            batch_size,
            f"{split} {kind}",
        )
        for j, t in zip(sel, outs):
            texts[j] = t
    got = lambda kind: [(t, it) for t, it in zip(texts, items) if it[1] == kind]  # noqa: E731
    res = dict(
        split=split, world_seed=world.seed, half=world.half, heldout_phrasing=heldout, n_images=n
    )
    pos = [(yes_no(t), True) for t, _ in got("pope_pos")]
    for k in ("random", "popular", "adversarial"):
        pred, label = zip(*(pos + [(yes_no(t), False) for t, _ in got(f"pope_{k}")]))
        res |= {f"pope_{k}_{m}": v for m, v in pope_metrics(pred, label).items()}
    desc = got("describe")
    res |= chair([W.mentioned(t) for t, _ in desc], [it[3] for _, it in desc])
    # (scene, mention, object) for every mention of an object that is there
    hits = [
        (it[0], m, o)
        for t, it in desc
        for m in W.parse_objects(t)
        for o in scenes[it[0]].objects
        if m["category"] == o.category and not m["negated"]
    ]
    coloured = [(m["color"], o.color) for _, m, o in hits if m["color"]]
    res["desc_color_acc"] = accuracy(*zip(*coloured)) if coloured else 0.0
    # detail: the share of present objects a description names with their true colour and position
    right = {(i, o.category) for i, m, o in hits if m["color"] == o.color and m["cell"] == o.cell}
    res["detail"] = 100 * len(right) / sum(len(s.objects) for s in scenes)
    answers = {
        "color": [(W.first_word(t, W.COLORS), it[3]) for t, it in got("color")],
        "count": [(W.first_word(t, W.NUMBERS), W.NUMBERS[it[3]]) for t, it in got("count")],
        "position": [(W.cell_of(t.lower()), it[3]) for t, it in got("position")],
    }
    for k, pairs in answers.items():
        res[f"{k}_acc"] = accuracy(*zip(*pairs))
    # informativeness: the share of colour, count and position answers that commit to a value at all
    res["informative"] = 100 * mean([p is not None for pairs in answers.values() for p, _ in pairs])
    res["samples"] = [t for t, _ in desc[:3]]
    return res


def evaluate_twins(vlm, world, split="broken", n=500, batch_size=256):
    """The twin test (world.twin_probes) on the first n scenes of a split, as "twin/" keys: each
    scene (missing a usual partner) and its twin (the partner added) asked the same two held-out
    questions. A model that looks raises grounding = P(yes | twin) - P(yes | broken); one that
    learned "a usual partner is absent" moves both rates together (grounding about 0)."""
    pairs, skipped = W.twin_probes(world, split, n)
    images = [W.render(s) for p in pairs for s in p[:2]]  # scene, its twin, the next scene, ...

    def twice(k):  # field k of each pair, once for the scene and once for its twin
        return [p[k] for p in pairs for _ in range(2)]

    said = answer(vlm, images, twice(4), 3, batch_size, "twin exist")  # 3 tokens, as POPE's probes
    told = answer(vlm, images, twice(3), 96, batch_size, "twin describe")
    yes = [yes_no(t) for t in said]
    named = [c in W.mentioned(t) for t, c in zip(told, twice(2))]
    res = {
        "twin/yes_twin": 100 * mean(yes[1::2]),
        "twin/no_broken": 100 * mean([not y for y in yes[0::2]]),
        "twin/mention_twin": 100 * mean(named[1::2]),
        "twin/mention_broken": 100 * mean(named[0::2]),
    }
    res["twin/grounding"] = res["twin/yes_twin"] - (100 - res["twin/no_broken"])
    res["twin/mention_grounding"] = res["twin/mention_twin"] - res["twin/mention_broken"]
    return res | {"twin/pairs": len(pairs), "twin/skipped": skipped}  # counts: ints


def world_report(vlm, seed=0, half="", n=500, batch_size=256):
    """One flat dict: the broken split in the train phrasings (plain keys) and the held-out ones
    ("hq/"), ordinary scenes ("ord/"), the twin test ("twin/"); with `half`, the broken split of
    each half ("a/", "b/")."""

    def ev_(prefix, w, split, heldout=False):
        res = evaluate_world(vlm, w, split, n, heldout, batch_size)
        return {prefix + k: v for k, v in res.items() if isinstance(v, float)} | (
            {"samples": res["samples"]} if not prefix else {}
        )

    if half:
        return {
            k: v for h in "ab" for k, v in ev_(f"{h}/", W.World(seed, half=h), "broken").items()
        }
    w = W.World(seed)
    return (
        ev_("", w, "broken")
        | ev_("hq/", w, "broken", True)
        | ev_("ord/", w, "heldout")
        | evaluate_twins(vlm, w, "broken", n, batch_size)
    )


KEYS = [
    "pope_adversarial_f1",
    "pope_adversarial_yes_ratio",
    "chair_i",
    "chair_s",
    "recall",
    "hq/pope_adversarial_f1",
    "hq/chair_i",
    "ord/recall",
    "ord/detail",
    "ord/count_acc",
]
HALF_KEYS = ["a/chair_i", "a/pope_adversarial_f1", "b/chair_i", "b/pope_adversarial_f1", "b/recall"]


def before_after(base, ckpt, seed, half, n, out_dir, cache_dir):
    """World reports of base and ckpt -> out_dir/results.json; base's cached (files, settings, code)."""
    # what a report runs: loading (hub, model), the probes (world), the answers (eval, data's open_image);
    # cli's checks only raise, they cannot change a report
    code = source_bytes("world.py", "eval.py", "model.py", "hub.py", "data.py")
    key = hashlib.sha256(
        (folder_hash(base) + json.dumps([seed, half, n])).encode() + code
    ).hexdigest()[:16]
    cached = os.path.join(cache_dir, f"world-report-{key}.json")
    if os.path.exists(cached):
        before = json.loads(pathlib.Path(cached).read_text())
    else:
        before = world_report(VLM.from_pretrained(base).eval(), seed, half, n)
        atomic_json(cached, before)
    res = dict(before=before, after=world_report(VLM.from_pretrained(ckpt).eval(), seed, half, n))
    print(table(res, HALF_KEYS if half else KEYS))
    atomic_json(os.path.join(out_dir, "results.json"), res)
    return res


# -----------------------------------------------------------------------------
# Command line


# A Config is a table, a flag a row, its help the comment beside it: kept as written
# fmt: off
@dataclass
class Config:
    model: str = ""        # a checkpoint, or name=path,name=path (a row each); default W.BASE_MODEL;
                           # `shortcut`: the no-training shortcut baseline (world.py)
    template: str = ""     # chat template: vicuna | llava | mistral | chatml; "": each model's own
    data: str = "world"    # world: the world's report (other data: through --bench)
    world_seed: int = 0    # the world's report (world_report): 0-2 dev seeds, 3-5 test seeds
    world_half: Literal["", "a", "b"] = ""  # a or b: the broken split of each half of the pairs (generalisation)
    n: int = 500           # scenes per part of the world's report
    batch_size: int = 0    # prompts answered at once; 0: 64 on CPU, on a GPU as many as half the memory the
                           # weights leave holds the KV cache of (model.rows_that_fit): LLaVA-1.6-7B in bf16
                           # on 80 GB gets 16 (3,184 prompt + 512 new tokens a row, 0.5 MiB a token)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # where the models run
    dtype: Literal[DTYPES] = "float32"  # the weights' (and so the KV cache's) dtype; bfloat16 at 7B
    out: str = ""          # JSON: {name: results}; beside it, answers.jsonl (each question's answer
                           # and score) and judgments.jsonl
    bench: str = ""        # not the world: pope,objhal,mmhal,mmhal_v,llavaw,mmvet,textvqa,gqa
    bench_dir: str = "benchmarks"  # one folder per benchmark, holding its release's files (benchmarks.GET)
    download: bool = False  # fetch a missing MMHal-Bench or LLaVA-Bench release from the hub
    limit: int = 0         # evaluate the first N items of each benchmark (0: all)
    max_new_tokens: int = 512  # for the open-ended answers (short answers get 16)
    judge_model: str = ""  # the text judge (default $JUDGE_MODEL, else gpt-4-0613); URL, key: env
    judge_model_v: str = "gpt-4o"  # MMHal-V's judge, which sees the image
    judge_cache: str = ""  # every judgment, so a rerun asks only for what is missing; "": judgments.jsonl
                           # beside --out, else in the shared cache folder (model.cache_home)
    judge_timeout: float = 120.0  # seconds for one whole request to the judge
    judge_retries: int = 6  # after a 429 / 5xx, a malformed reply, a network error or a timeout
    judge_prompts: str = ""  # JSON {mmhal|llavaw|mmvet: template} replacing our wording ({fields})
    synonyms: str = ""     # a COCO synonym list in the standard format instead of ours (objhal)
    short_prompt: bool = True  # end POPE, TextVQA and GQA questions with SHORT (LLaVA, lmms-eval)
    official: bool = False  # the published judge prompts and synonym list, not ours (benchmarks.OFFICIAL)
    BOUNDS = dict(n=">= 1", batch_size=">= 0", limit=">= 0", max_new_tokens=">= 1", judge_retries=">= 0",
                  judge_timeout="> 0")
# fmt: on


def load_model(path, template="", dtype=torch.float32, device="cpu"):
    """A checkpoint, or `shortcut[:base]`: world.py's no-training baseline over a base model
    (the shipped one by default), which the world report evaluates as a model."""
    kw = dict(template=template, dtype=dtype, device=device)
    if path == "shortcut" or path.startswith("shortcut:"):
        base = path.removeprefix("shortcut").removeprefix(":") or W.BASE_MODEL
        return W.Shortcut(VLM.from_pretrained(base, **kw)).eval()
    return VLM.from_pretrained(path, **kw).eval()


def each_model(cfg):
    """Loads --model's models one at a time -> (row name, model, batch size, time its load began)."""
    for spec in (cfg.model or W.BASE_MODEL).split(","):
        name, _, path = spec.rpartition("=")
        name = name or os.path.basename(path.rstrip("/"))
        t0 = time.time()
        vlm = load_model(path, cfg.template, getattr(torch, cfg.dtype), cfg.device)
        print(f"{name}: {template_line(vlm)}")
        size = cfg.batch_size
        if not size:  # off CUDA the default; on CUDA what the card's memory holds
            on_gpu = cfg.device.startswith("cuda")
            size = (
                rows_that_fit(vlm, max_prompt_tokens(vlm) + cfg.max_new_tokens, 64)
                if on_gpu
                else 64
            )
        yield name, vlm, size, t0


def main(argv=None):
    cfg = config_from_argv(Config, argv, __doc__)
    if cfg.data != "world" and not cfg.bench:
        raise UserError(f"--data {cfg.data!r}: only the embedded world is implemented so far")
    check_template(cfg.template)
    if any(cfg.bench.split(",")):
        # imported here, not above: benchmarks.py imports this file's metrics at its top
        import benchmarks

        return benchmarks.run(cfg)
    rows = {}
    for name, vlm, size, t0 in each_model(cfg):
        res = world_report(vlm, cfg.world_seed, cfg.world_half, cfg.n, size)
        rows[name] = res | {"seconds": round(time.time() - t0, 1)}
    print(table(rows, HALF_KEYS if cfg.world_half else KEYS))
    for name, res in rows.items():
        if "samples" in res:
            print(f"sample descriptions ({name}):", *res["samples"][:3], sep="\n  ")
    if cfg.out:
        atomic_json(cfg.out, rows)
    return rows


if __name__ == "__main__":
    run_main(main)
