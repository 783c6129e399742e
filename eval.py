"""eval.py: evaluation (paper §4.2, §7, App. B): the world's report and the paper's benchmarks.

On the embedded world (`--data world`, the default), world.py checks every answer against its scene,
so POPE, CHAIR, recall and the helpfulness measures are exact (world_report names its parts).
On the paper's benchmarks (§7, Table 2's columns; `--bench`), read from each public release's own
files in --bench_dir (one folder each, see GET): POPE, TextVQA and GQA scored by rule; Object
HalBench's CHAIR and recall over COCO categories; MMHal-Bench, MMHal-V (its judge sees the image),
LLaVA-Bench and MM-Vet by a judge model behind any OpenAI-compatible endpoint (JUDGE_BASE_URL,
JUDGE_MODEL, JUDGE_API_KEY). Each score equals the benchmark's own script (README: the exceptions).

    python eval.py --model runs/offline/checkpoint --world_seed 3 --out results.json
    python eval.py --model llava-hf/llava-v1.6-vicuna-7b-hf --bench pope,objhal,mmhal,mmhal_v,llavaw,mmvet,textvqa,gqa
"""

import ast
import base64
import contextlib
import glob
import hashlib
import io
import json
import os
import pathlib
import re
import threading
import string
import time
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm import tqdm

import data
import world as W
from model import (
    DTYPES,
    VLM,
    UserError,
    UserFileError,
    cache_home,
    check_template,
    config_from_argv,
    folder_hash,
    max_prompt_tokens,
    rows_that_fit,
    run_main,
    source_bytes,
    template_line,
)

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
    code = source_bytes("world.py", "eval.py", "model.py")
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


# The paper's Table 2 columns, and the keys of evaluate_bench's results that fill them
TABLE2 = {
    "POPE": "pope",
    "MMHal": "mmhal",
    "MMHal-V": "mmhal_v",
    "LLaVA-W": "llavaw",
    "VQA^T": "textvqa",
    "GQA": "gqa",
    "MMVet": "mmvet",
    "Rec_coco": "objhal_recall",
    "CHAIR_s": "objhal_chair_s",
    "CHAIR_i": "objhal_chair_i",
}  # Object HalBench's CHAIR too

# -----------------------------------------------------------------------------
# The paper's benchmarks (Table 2), read from their public releases' own files

# LLaVA's suffix for short answers; its POPE, TextVQA and GQA questions end with it, as lmms-eval's
SHORT = "\nAnswer the question using a single word or phrase."
GET = {
    "pope": "POPE's output/coco/ folder (github.com/AoiDragon/POPE), with COCO val2014 images in images/",
    "objhal": "obj_halbench_300_with_image.jsonl (eval/data/ of github.com/RLHF-V/RLAIF-V), and COCO 2014's "
    "instances_val2014.json and captions_val2014.json (cocodataset.org) in annotations/",
    "mmhal": "response_template.json and, unzipped from test_data.zip, images/ (huggingface.co/datasets/"
    "Shengcao1006/MMHal-Bench, or run with --download true)",
    "llavaw": "questions.jsonl, context.jsonl, answers_gpt4.jsonl and images/ (huggingface.co/datasets/"
    "liuhaotian/llava-bench-in-the-wild, or run with --download true)",
    "mmvet": "mm-vet.json and images/, unzipped from mm-vet.zip (github.com/yuweihao/MM-Vet/releases)",
    "textvqa": "TextVQA_0.5.1_val.json and train_images/ from textvqa.org/dataset",
    "gqa": "testdev_balanced_questions.json from the GQA release (cs.stanford.edu/people/dorarad/gqa), images/",
}
HUB = {"mmhal": "Shengcao1006/MMHal-Bench", "llavaw": "liuhaotian/llava-bench-in-the-wild"}
FOLDER = {"mmhal_v": "mmhal"}  # MMHal-V is MMHal-Bench judged with the image


def atomic_json(path, obj):
    """Writes JSON to a temp file of this process's own (runs share caches), then renames it in."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.tmp{os.getpid()}", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(f"{path}.tmp{os.getpid()}", path)


def download(name, root):
    """Fetches (or completes) root/name from the hub; zipped images go once to root/name/images/."""
    from huggingface_hub import snapshot_download

    d = os.path.join(root, name)
    snapshot_download(HUB[name], repo_type="dataset", local_dir=d)  # skips the files it already has
    for z in glob.glob(os.path.join(d, "*.zip")):
        if not os.path.exists(z + ".unzipped"):
            unzip(z, os.path.join(d, "unzipped"))
            os.makedirs(os.path.join(d, "images"), exist_ok=True)
            for p in glob.glob(os.path.join(d, "unzipped", "**", "images", "*"), recursive=True):
                os.replace(p, os.path.join(d, "images", os.path.basename(p)))
            open(z + ".unzipped", "w").close()


# Caps on a release's zip, far above the real ones; a zip bomb stops here
UNZIP_MAX_BYTES, UNZIP_MAX_FILES = 2 << 30, 100_000


def unzip(path, dest):
    """Extracts a checked zip: at most UNZIP_MAX_FILES members and UNZIP_MAX_BYTES in all (zipfile
    stops each member at its stated size), no absolute path, no '..'."""
    import zipfile

    with zipfile.ZipFile(path) as f:
        infos = f.infolist()
        total = sum(i.file_size for i in infos)
        if total > UNZIP_MAX_BYTES or len(infos) > UNZIP_MAX_FILES:
            raise UserError(
                f"{path}: {len(infos)} files, {total} bytes uncompressed: over the "
                f"cap of {UNZIP_MAX_FILES} files and {UNZIP_MAX_BYTES} bytes "
                "(eval.UNZIP_MAX_*); not extracted"
            )
        for i in infos:
            if i.filename.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", i.filename):
                raise UserError(
                    f"{path}: member {i.filename!r} would be written outside {dest}; not extracted"
                )
        f.extractall(dest)


def bench_file(root, name, fn):
    path = os.path.join(root, name, fn)
    if not os.path.exists(path):
        raise UserFileError(
            f"{name}: {path} not found. Put {GET[name]} in {os.path.join(root, name)}"
        )
    return path


def load_bench(name, root, vocab=None):
    """-> items {id, image (path or bytes), question, gold, kind, ...} from a release's own files."""
    folder = FOLDER.get(name, name)
    d = os.path.join(root, folder)
    load = lambda fn: json.loads(pathlib.Path(bench_file(root, folder, fn)).read_text())  # noqa
    rows = lambda fn, *keys: [r for _, r in data.read_jsonl(bench_file(root, folder, fn), *keys)]  # noqa
    path = lambda *p: os.path.join(d, *p)  # noqa: E731
    try:
        if name == "pope":
            return [
                dict(
                    id=f"{kind}-{r['question_id']}",
                    image=path("images", r["image"]),
                    question=r["text"],
                    gold=r["label"] == "yes",
                    kind=kind,
                )
                for kind in ("random", "popular", "adversarial")
                for r in rows(f"coco_pope_{kind}.json", "question_id", "image", "text", "label")
            ]
        if name == "objhal":
            recs = rows("obj_halbench_300_with_image.jsonl", "image_id", "image", "question")
            truth = coco_truth(root, {int(r["image_id"]) for r in recs}, vocab or coco_vocab())
            return [
                dict(
                    id=i,
                    image=base64.b64decode(r["image"]),
                    question=r["question"],
                    gold=truth[int(r["image_id"])],
                    kind=name,
                )
                for i, r in enumerate(recs)
            ]
        if name in ("mmhal", "mmhal_v"):
            recs = load("response_template.json")
            return [
                dict(
                    id=i,
                    image=path("images", r["image_src"].split("/")[-1]),
                    question=r["question"],
                    gold=r["gt_answer"],
                    objects=r["image_content"],
                    kind=r["question_type"],
                )
                for i, r in enumerate(recs)
            ]
        if name == "llavaw":
            qs = rows("questions.jsonl", "question_id", "image", "text", "category")
            ctx = {c["image"]: c["caption"] for c in rows("context.jsonl", "caption")}
            ref = {
                a["question_id"]: a["text"]
                for a in rows("answers_gpt4.jsonl", "question_id", "text")
            }
            return [
                dict(
                    id=q["question_id"],
                    image=path("images", q["image"]),
                    question=q["text"],
                    gold=ref[q["question_id"]],
                    context=ctx[q["image"]],
                    kind=q["category"],
                )
                for q in qs
            ]
        if name == "mmvet":
            return [
                dict(
                    id=k,
                    image=path("images", r["imagename"]),
                    question=r["question"],
                    gold=r["answer"],
                    kind=tuple(sorted(set(r["capability"]))),
                )
                for k, r in load("mm-vet.json").items()
            ]
        if name == "textvqa":
            return [
                dict(
                    id=r["question_id"],
                    image=path("train_images", r["image_id"] + ".jpg"),
                    question=r["question"],
                    gold=r["answers"],
                    kind=name,
                )
                for r in load("TextVQA_0.5.1_val.json")["data"]
            ]
        if name == "gqa":
            return [
                dict(
                    id=q,
                    image=path("images", r["imageId"] + ".jpg"),
                    question=r["question"],
                    gold=r["answer"],
                    kind=name,
                )
                for q, r in load("testdev_balanced_questions.json").items()
            ]
    except KeyError as e:  # a record without a field, or a question without its context / answer
        raise UserError(f"{name}: {d}: no field or record {e}") from None
    raise UserError(f"--bench {name!r}: expected one of {', '.join(list(GET) + list(FOLDER))}")


_NUMBER = dict(
    zip("zero one two three four five six seven eight nine ten".split(), map(str, range(11)))
)
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
# EvalAI's contractions, keyed by each form that lacks one apostrophe ("dont"; "couldnt've" and
# "couldn'tve"); forms that are words (were, well, its, shell, im, ...) are not in it
_CONTRACT = {
    k: w
    for w in (
        "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
        "haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't "
        "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've "
        "should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've "
        "someone'll someone's something'd something'd've something'll that's there'd there'd've "
        "there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't "
        "what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's "
        "who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've "
        "you'd you'd've you'll you're you've"
    ).split()
    for k in {w[:i] + w[i + 1 :] for i in range(len(w)) if w[i] == "'"}
}
_CONTRACT["somebody'd"] = "somebodyd"  # backwards in EvalAI's table


def vqa_normalize(text):
    """TextVQA's answer normalisation: EvalAI's, as LLaVA's TextVQA evaluation runs it."""
    t = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    t = t.replace("\n", " ").replace("\t", " ").strip()
    out = t
    for p in _PUNCT:
        out = out.replace(p, "" if (p + " " in t or " " + p in t) else " ")
    out = re.sub(r"\.(?!\d)", "", out, count=32)  # EvalAI passes re.UNICODE (32) as the count
    words = [_NUMBER.get(w, "0" if w == "none" else w) for w in out.split()]
    return " ".join(_CONTRACT.get(w, w) for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(pred, answers):
    """Soft VQA accuracy: the mean over leave-one-out subsets of min(1, matching answers / 3)."""
    p, gts = vqa_normalize(pred), [vqa_normalize(a) for a in answers]
    agree = [sum(g == p for j, g in enumerate(gts) if j != i) for i in range(len(gts))]
    return sum(min(1.0, a / 3) for a in agree) / len(gts)


def score_bench(name, items, preds, vocab=None, scores=None):
    """Percentages of the rule-scored benchmarks; POPE's `pope` is the mean F1 of its 3 kinds. A list
    `scores` gets each item's score, a dict each (answers.jsonl)."""
    scores = [] if scores is None else scores
    if name == "objhal":
        vocab = vocab or coco_vocab()
        said = [coco_mentions(p.replace("Assistant:", ""), vocab) for p in preds]  # as its reader
        truth = [it["gold"] for it in items]
        scores += [
            dict(mentions=s, hallucinated=[o for o in s if o not in t]) for s, t in zip(said, truth)
        ]
        named = [(s, t) for s, t in zip(said, truth) if s]  # for its "response hallucination"
        return {f"objhal_{k}": v for k, v in chair(said, truth).items()} | {
            "objhal_response_hall": chair(*zip(*named))["chair_s"] if named else 0.0
        }
    if name == "pope":
        # LLaVA's model_vqa_loader.py strips each answer before eval_pope.py reads it: "No\n" is no
        yes = [yes_no(p.strip()) for p in preds]
        scores += [dict(yes=y, correct=y == it["gold"]) for y, it in zip(yes, items)]
        res, kinds = {}, ("random", "popular", "adversarial")
        for kind in kinds:
            sel = [(y, it["gold"]) for it, y in zip(items, yes) if it["kind"] == kind]
            res |= {f"pope_{kind}_{k}": v for k, v in pope_metrics(*zip(*sel)).items()}
        return res | {"pope": sum(res[f"pope_{k}_f1"] for k in kinds) / 3}
    if name == "textvqa":
        acc = [vqa_accuracy(p, it["gold"]) for it, p in zip(items, preds)]
        scores += [dict(accuracy=a) for a in acc]
        return {"textvqa": 100 * sum(acc) / len(items)}
    pred = [p.strip().rstrip(".").lower() for p in preds]
    scores += [dict(correct=p == it["gold"]) for p, it in zip(pred, items)]
    return {"gqa": accuracy(pred, [it["gold"] for it in items])}


# -----------------------------------------------------------------------------
# A judge for the open-ended benchmarks (MMHal-Bench, MMHal-V, LLaVA-Bench, MM-Vet): any
# OpenAI-compatible chat-completions endpoint, via the standard library, each judgment cached on disk


class JudgeClient:
    """POSTs to {JUDGE_BASE_URL}/chat/completions as JUDGE_MODEL, key JUDGE_API_KEY or OPENAI_API_KEY.
    Retries 429, 5xx, malformed replies, network errors and timeouts (back-off or Retry-After, each
    wait capped at max_wait); refuses redirects, so the key goes to the configured host only (an https
    one through HTTPS_PROXY's tunnel where set); appends each judgment to the JSONL `cache`, so a rerun
    asks only for what is missing. Thread-safe."""

    def __init__(
        self,
        cache,
        base_url=None,
        model=None,
        api_key=None,
        retries=6,
        backoff=2.0,
        min_interval=0.0,
        timeout=120.0,
        max_wait=60.0,
    ):
        env = os.environ.get
        base = base_url or env("JUDGE_BASE_URL", "https://api.openai.com/v1")
        self.url = base.rstrip("/") + "/chat/completions"
        self.model = model or env("JUDGE_MODEL", "gpt-4-0613")
        self.key = api_key or env("JUDGE_API_KEY", env("OPENAI_API_KEY", ""))
        self.path, self.retries, self.backoff = cache, retries, backoff
        self.min_interval, self.timeout, self.max_wait = min_interval, timeout, max_wait
        self.cache, self.last, self.lock = {}, 0.0, threading.Lock()
        if os.path.exists(cache):
            for line in open(cache, encoding="utf-8", errors="replace"):
                with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut by a kill
                    r = json.loads(line)
                    if isinstance(r["content"], str):  # a cached null is asked again
                        self.cache[r["key"]] = r["content"]
        self.asked = 0  # requests sent by this client (cache hits send none)

    def __call__(self, messages, max_tokens=512, temperature=0.0):
        body = dict(
            model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature
        )
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        with self.lock:
            if key in self.cache:
                return self.cache[key]
        payload = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            self.wait_turn()
            status, headers, raw, err = self.post(payload)
            content = reply_text(raw) if status == 200 else None
            if content is not None:
                break
            if status and 300 <= status < 400:
                raise RuntimeError(
                    f"judge {self.url} answered HTTP {status}, a redirect to "
                    f"{headers.get('Location')!r}: redirects are refused, so that the API key "
                    "never leaves the configured host. Set JUDGE_BASE_URL to the endpoint itself."
                )
            what = "a malformed reply" if status == 200 else f"HTTP {status}"
            err = err or f"{what} {raw[:200]!r}"
            final = status is not None and 400 <= status < 500 and status != 429  # client error
            if final or attempt == self.retries:
                raise RuntimeError(
                    f"judge {self.url} failed after {attempt + 1} request(s): {err}. The "
                    f"{len(self.cache)} judgments made so far are kept in {self.path}; rerun to "
                    "continue."
                )
            wait = max(retry_after(headers.get("Retry-After")), self.backoff * 2**attempt)
            time.sleep(min(wait, self.max_wait))
        self.remember(key, content)
        return content

    def wait_turn(self):
        """Takes the next request slot, min_interval after any thread's last, and waits for it."""
        with self.lock:
            t = max(time.monotonic(), self.last + self.min_interval)
            self.last, self.asked = t, self.asked + 1
        time.sleep(max(0.0, t - time.monotonic()))

    def post(self, payload):
        """One POST, no redirect followed -> (status or None, headers, body, error or None). A timer
        closes the socket at the deadline, so a server that trickles bytes cannot hold it longer."""
        import http.client
        import socket
        import urllib.parse
        import urllib.request

        u = urllib.parse.urlsplit(self.url)
        http_ = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        # plain http goes direct: a proxy would read the key
        proxy = urllib.request.getproxies().get("https", "")
        # a CONNECT tunnel:
        if u.scheme == "https" and proxy and not urllib.request.proxy_bypass(u.hostname):
            # the key stays in TLS
            p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
            conn = http_(p.hostname, p.port or 80, timeout=self.timeout)
            cred = base64.b64encode(
                urllib.parse.unquote(f"{p.username}:{p.password or ''}").encode()
            ).decode()
            conn.set_tunnel(
                u.hostname, u.port, {"Proxy-Authorization": f"Basic {cred}"} if p.username else None
            )
        else:
            conn = http_(u.hostname, u.port, timeout=self.timeout)
        late = threading.Event()

        def cut():  # at the deadline: wakes the read blocked in the calling thread
            late.set()
            with contextlib.suppress(OSError, TypeError):  # TypeError: not connected yet
                socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)

        timer = threading.Timer(self.timeout, cut)
        timer.start()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        try:
            conn.request("POST", u.path + (f"?{u.query}" if u.query else ""), payload, headers)
            r = conn.getresponse()
            return r.status, r.headers, r.read(), None
        except (OSError, http.client.HTTPException) as e:
            late_ = f"no complete reply within {self.timeout} s"
            return None, {}, b"", late_ if late.is_set() else repr(e)
        finally:
            timer.cancel()
            conn.close()

    def remember(self, key, content):
        """Appends a judgment in one write, on a new line if a kill cut the last line short."""
        line = (json.dumps(dict(key=key, content=content)) + "\n").encode()
        with self.lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                end = os.lseek(fd, 0, os.SEEK_END)
                os.write(fd, b"\n" * (end > 0 and os.pread(fd, 1, end - 1) != b"\n") + line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.cache[key] = content


def reply_text(raw):
    """A chat-completions reply's message text, or None when the reply is not one."""
    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
        content = json.loads(raw)["choices"][0]["message"]["content"]
        return content if isinstance(content, str) else None


def retry_after(value):
    """Retry-After in seconds, from seconds or an HTTP date; 0 when absent or unreadable."""
    import email.utils

    with contextlib.suppress(ValueError):
        return float(value or 0)
    with contextlib.suppress(TypeError, ValueError):  # the date form
        return email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    return 0.0


def image_part(image):
    """A chat-completions image part (MMHal-V): a JPEG or PNG file as it is, anything else as PNG."""
    from PIL import Image

    raw = open(image, "rb").read() if isinstance(image, str) else image
    raw = raw if isinstance(raw, bytes) else b""  # a PIL image is saved as PNG below
    fmt = Image.open(io.BytesIO(raw)).format.lower() if raw else ""
    if fmt not in ("jpeg", "png"):
        buf = io.BytesIO()
        data.open_image(image).save(buf, format="PNG")
        raw, fmt = buf.getvalue(), "png"
    url = f"data:image/{fmt};base64," + base64.b64encode(raw).decode()
    return {"type": "image_url", "image_url": {"url": url}}


# -----------------------------------------------------------------------------
# Object HalBench (Table 2's Recall_coco): CHAIR (Rohrbach et al. 2018) on COCO descriptions, by
# rule as RLAIF-V's eval_gpt_obj_halbench.py (NLTK tokens, WordNet lemmas, two-word names, synonyms),
# here without NLTK or WordNet (tests/test_eval.py). Synonym list: a category per line, its COCO
# name then its synonyms, ", "-separated; --synonyms FILE reads another, --official true the paper's.
SYNONYMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "coco_synonyms.txt")
# CHAIR's pairs besides the list's two-word names: "baby"/"adult" + animal, "passenger jet"/"train"
# are only the animal or vehicle, a toilet seat a toilet; home plate and train tracks name nothing
PAIRS = {
    f"{q} {a}": a
    for q in ("baby", "adult")
    for a in "bird cat dog horse sheep cow elephant bear zebra giraffe animal cub".split()
}
PAIRS |= {
    "passenger jet": "jet",
    "passenger train": "train",
    "bow tie": "tie",
    "toilet seat": "toilet",
    "home plate": "home plate",
    "train track": "train track",
}
# what NLTK's tokenizer splits off as tokens (it keeps hyphens, slashes, inner periods in words)
_SPLIT = re.compile(r"[;@#$%&?!*()\[\]{}<>\"`«»“”‘’„\u2012-\u2015]|''|--|\.{2,}|[:,](?!\d)")
_SUFFIXES = (
    ("s", ""),
    ("ses", "s"),
    ("ves", "f"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("men", "man"),
    ("ies", "y"),
)  # WordNet's noun detachment rules
# WordNet's facts the rules need: lemmas they miss (irregular plurals; "men" is a word there, so it
# stays; "vases" is "vas"), and listed words it lacks, which take no plural ("bikers" names nobody)
LEMMA = dict(
    w.split(":")
    for w in (
        "men:men vases:vas mice:mouse knives:knife pocketknives:pocketknife geese:goose oxen:ox "
        "children:child grandchildren:grandchild brethren:brother buffaloes:buffalo busses:bus "
        "flamingoes:flamingo taxies:taxi shears:shear"
    ).split()
)
NOT_WORDNET = set(
    "biker bluejay brindle children coworker firetruck hairdryer hot knive lenovo "
    "longboard macbook netbook paddleboat pitbull potted riverboat sailboard "
    "shortboard skimboard skis smartphone solider sports stovetop teddybear "
    "televison".split()
)


def chair_words(text):
    """nltk.word_tokenize(text.lower()) by rule ("hot-dog", "cat/dog", "dog.the" stay one word)."""
    # a word's final period ends a sentence (Punkt), and the sentence's last period is split off
    t = re.sub(r"(?<=[^.\s])\.(?='*(\s|$))", " . ", _SPLIT.sub(r" \g<0> ", text.lower()))
    t = " " + re.sub(r"(?<=[^'])' (?=\s*\S)", " ' ", t) + " "  # a closing quote before more text
    t = re.sub(r"(?<![\w'])'(?=\w)", "' ", t)
    return re.sub(r"(?<=[^'\s])('s|'m|'d|'ll|'re|'ve|')(?=\s)", r" \1", t).split()  # "dog 's"


def lemma(word, known):
    """NLTK's WordNet lemma: the shortest of word and its rule forms in WordNet (here: known)."""
    if word in LEMMA:
        return LEMMA[word]
    forms = [word] + [word[: -len(a)] + b for a, b in _SUFFIXES if word.endswith(a)]
    return min([w for w in forms if w in known and w not in NOT_WORDNET] or [word], key=len)


def coco_vocab(path=SYNONYMS):
    """A synonym list -> {synonym: category} as CHAIR reads it (its last category, case kept)."""
    vocab = {}
    for line in open(path).read().splitlines():
        names = [s.strip() for s in line.strip().split(", ")]
        vocab |= {s: names[0] for s in names if s}
    return vocab


def coco_mentions(text, vocab):
    """The COCO categories a text names, in order, repeats included, as CHAIR finds them."""
    known = {w for s in [*vocab, *PAIRS] for w in s.split(" ")}
    words, out, k = [lemma(w, known) for w in chair_words(text)], [], 0
    while k < len(words):
        pair = " ".join(words[k : k + 2])
        n = 2 if pair in PAIRS or (" " in pair and pair in vocab) else 1  # "stove top oven": no
        out.append(PAIRS.get(pair, pair) if n == 2 else words[k])
        k += n
    if "toilet" in out and "seat" in out:  # "the seat of the toilet" is no chair
        out = [w for w in out if w != "seat"]
    return [vocab[w] for w in out if w in vocab]


def coco_truth(root, ids, vocab):
    """{image id: categories}: its COCO instances plus what its captions name (val2014's files only;
    the official script also reads train2014's, which hold nothing for these images)."""
    truth, captioned = {i: set() for i in ids}, set()
    for fn in ("instances_val2014.json", "captions_val2014.json"):
        path = bench_file(root, "objhal", os.path.join("annotations", fn))
        ann = json.loads(pathlib.Path(path).read_text())
        names = {c["id"]: vocab.get(c["name"], c["name"]) for c in ann.get("categories", [])}
        for a in ann["annotations"]:
            if a["image_id"] in truth and fn.startswith("instances"):
                truth[a["image_id"]].add(names[a["category_id"]])
            elif a["image_id"] in truth:
                truth[a["image_id"]].update(coco_mentions(a["caption"], vocab))
                captioned.add(a["image_id"])
    if missing := sorted(ids - captioned):
        raise UserError(
            f"objhal: {path} has no caption of image ids {missing[:5]}: "
            "not COCO val2014's annotations?"
        )
    return truth


# -----------------------------------------------------------------------------
# The judge-scored benchmarks. Each has our wording of its judge's task, asking for the reply format
# the benchmark's own score parsing reads; --judge_prompts FILE (JSON {bench: template}) substitutes
# any other wording, such as the benchmark's published prompt, with the same {fields}.


def review(head, role):
    """LLaVA-Bench's review layout (its eval_gpt_review_bench.py): context, question, two answers."""
    return (
        f"[{head}]\n{{context}}\n\n[Question]\n{{question}}\n\n[{role} 1]\n{{reference}}\n\n"
        f"[End of {role} 1]\n\n[{role} 2]\n{{answer}}\n\n[End of {role} 2]\n\n"
    )


PROMPTS = dict(
    mmhal="""You are grading an AI assistant's answer to a question about an image, above all for hallucination: a \
claim about the image that is false or not supported by it. You are given a list of what the image contains, the \
question, an answer written by a person, and the answer to grade. The person's answer may be brief or incomplete: \
extra detail, reasoning or background knowledge is welcome as long as it makes no false claim about the image, and \
an answer that says it is unsure is not a hallucination.

Image contents: {objects}
Question: {question}
Answer written by a person: {reference}
Answer to grade: {answer}

Explain briefly, then give a rating on this scale:
6: very informative, with good analysis or reasoning, and no hallucination
5: very informative, no hallucination
4: somewhat informative, no hallucination
3: not informative, no hallucination
2: very informative, with hallucination
1: somewhat informative, with hallucination
0: not informative, with hallucination
End with a line of the form "Rating: N".""",
    llavaw="""Two AI assistants answered a user's question about an image. You cannot see the image; a description \
of it is given instead.

"""
    + review("Image description", "Assistant")
    + """Rate how helpful, relevant, accurate and detailed each answer is, from 1 to 10 (higher is better). On the \
first line write only the two scores, Assistant 1's then Assistant 2's, separated by a space. Then explain your \
rating, without letting the order of the answers or their length sway it.""",
    llavaw_system="You grade answers carefully and fairly.",
    mmvet="""Compare an AI assistant's answer with the ground truth of a question and give a correctness score \
between 0.0 (wrong) and 1.0 (fully right). In a ground truth, <AND> joins parts that must all be in the answer (give \
the share found) and <OR> joins alternatives, any one of which is right. For open-ended questions, judge how much of \
the ground truth the answer covers, and how well. Reply with the score alone.

Question | Ground truth | Answer | Score
What is 12 x 3? | 36 | The product is 36. | 1.0
What is 12 x 3? | 36 | 38 | 0.0
Which fruits are on the plate? | apple <AND> pear | An apple and a banana. | 0.5
Where was this taken? | beach <OR> seaside | On a sandy beach. | 1.0
{question} | {reference} | {answer} |""",
    mmvet_retry="\nScore (a number):",
)


def rating(text):
    """MMHal-Bench's parsing: the one N in 0..6 for which "rating: N" occurs; 0 when none or several do."""
    found = [s for s in range(7) if f"rating: {s}" in text.lower()]
    return found[0] if len(found) == 1 else 0


def score_pair(text):
    """LLaVA-Bench's parsing: two numbers on the first line (a comma also separates); [-1, -1] otherwise."""
    try:
        # one space exactly: "8  6" fails, as in LLaVA
        s = text.split("\n")[0].replace(",", " ").split(" ")
        return [float(s[0]), float(s[1])] if len(s) == 2 else [-1.0, -1.0]
    except ValueError:
        return [-1.0, -1.0]


def correctness(text):
    """MM-Vet's rule: the first piece split on " ", stripped, in [0, 1], else None (ask again)."""
    with contextlib.suppress(ValueError, IndexError):
        v = float(text.split(" ")[0].strip())
        return v if 0.0 <= v <= 1.0 else None


def fill(template, **fields):
    """{name} -> value for the given names only, in one pass (so a value's braces stay)."""
    return re.sub("{(" + "|".join(fields) + ")}", lambda m: str(fields[m[1]]), template)


def mean(xs):
    return sum(xs) / max(len(xs), 1)


GH, HF = "https://raw.githubusercontent.com/", "https://huggingface.co/"
# --official true: the published judge prompts and Object HalBench's synonym list, in their formats,
# each fetched once into its benchmark's folder (llavaw_system into llavaw/)
OFFICIAL = dict(
    objhal=GH + "RLHF-V/RLAIF-V/main/eval/data/synonyms_refine.txt",
    mmhal=HF + "datasets/Shengcao1006/MMHal-Bench/raw/main/eval_gpt4.py",
    llavaw=GH + "haotian-liu/LLaVA/main/llava/eval/table/rule.json",
    llavaw_system=GH + "haotian-liu/LLaVA/main/llava/eval/eval_gpt_review_bench.py",
    mmvet=GH + "yuweihao/MM-Vet/main/mm-vet_evaluator.py",
)


def official_file(root, key):
    """The path of OFFICIAL[key]'s file in its folder under root (downloaded if missing)."""
    url = OFFICIAL[key]
    path = os.path.join(root, key.split("_")[0], url.rsplit("/", 1)[1])
    if not os.path.exists(path):
        import urllib.request

        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(path + ".tmp", "wb") as f:
                f.write(r.read())
        except OSError as e:
            raise UserFileError(
                f"--official: cannot download {url} ({e}); put that file at {path}"
            ) from None
        os.replace(path + ".tmp", path)
    return path


def py_string(path, what, pick):
    """The first string that pick(node) finds in a Python file's syntax tree (ast: never run)."""
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(s := pick(node), ast.Constant) and isinstance(s.value, str):
            return s.value
    raise UserError(f"--official: {path} has no {what}; is it the published file?")


def official_prompts(root, names):
    """The published judge prompts of the benchmarks in names, as templates with our {fields}."""
    out, named = (
        {},
        lambda name: (
            lambda n: (  # noqa: E731 (the value of `name = "..."`)
                n.value
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == name
                else None
            )
        ),
    )
    if {"mmhal", "mmhal_v"} & set(names):  # eval_gpt4.py: template = '''...''', four {} to format
        path = official_file(root, "mmhal")
        parts = list(string.Formatter().parse(py_string(path, "template", named("template"))))
        if sum(f is not None for _, f, _, _ in parts) != 4:
            raise UserError(f"--official: {path}: the template should have 4 {{}} fields")
        fields = iter(["{objects}", "{question}", "{reference}", "{answer}"])
        out["mmhal"] = "".join(s + (next(fields) if f is not None else "") for s, f, _, _ in parts)
    if "llavaw" in names:  # rule.json: {"llava_bench_<category>": {"role", "prompt"}}, laid out
        out["llavaw"] = None  # a category without a rule is an error, as there
        for k, r in json.loads(pathlib.Path(official_file(root, "llavaw")).read_text()).items():
            if k.startswith("llava_bench_") and {"role", "prompt"} <= set(r):
                layout = review("Context", r["role"])  # as LLaVA's eval_gpt_review_bench.py
                out[f"llavaw/{k[12:]}"] = layout + f"[System]\n{r['prompt']}\n\n"

        def keys(n):
            return {getattr(k, "value", 0): v for k, v in zip(n.keys, n.values)}

        def system(n):  # the {"role": "system", "content": ...} dict's content
            if isinstance(n, ast.Dict) and getattr(keys(n).get("role"), "value", 0) == "system":
                return keys(n).get("content")
            return None

        path = official_file(root, "llavaw_system")
        out["llavaw_system"] = py_string(path, "system message", system)
    if "mmvet" in names:  # mm-vet_evaluator.py: prompt = """...""", "\n" and the " | "-joined row
        path = official_file(root, "mmvet")
        out["mmvet"] = (
            py_string(path, "prompt", named("prompt")) + "\n{question} | {reference} | {answer} | "
        )

        def retry(n):  # the text added after the row
            if (
                isinstance(n, ast.BinOp)
                and isinstance(n.left, ast.BinOp)
                and isinstance(n.left.right, ast.Call)
            ):
                return n.right
            return None

        out["mmvet_retry"] = py_string(path, "text for asking again", retry)
    return out


def judge_bench(name, items, preds, judge, prompts=PROMPTS, scores=None):
    """Scores as each benchmark's own scripts report them, overall and per kind; judge(messages,
    max_tokens, temperature) -> reply text, seeing images for mmhal_v. A list `scores` gets each
    item's score, a dict each (answers.jsonl)."""
    scores = [] if scores is None else scores

    def by_kind(vals, f):  # {kind: f(the values of that kind's items)}, kinds in the items' order
        kinds = dict.fromkeys(it["kind"] for it in items)
        return {k: f([v for v, it in zip(vals, items) if it["kind"] == k]) for k in kinds}

    if name in ("mmhal", "mmhal_v"):
        s = []
        for it, p in zip(items, preds):
            text = fill(
                prompts["mmhal"],
                objects=", ".join(it["objects"]),
                question=it["question"],
                reference=it["gold"],
                answer=p,
            )
            content = (
                [{"type": "text", "text": text}, image_part(it["image"])]
                if name == "mmhal_v"
                else text
            )
            s.append(rating(judge([{"role": "user", "content": content}], 1024, 0.0)))
        scores += [dict(rating=x) for x in s]
        return {
            name: mean(s),
            f"{name}_hallucination_rate": 100 * mean([x < 3 for x in s]),
            f"{name}_informativeness": 100 * mean([x - 3 if x >= 3 else x for x in s]) / 3,
        } | {f"{name}/{k}": v for k, v in by_kind(s, mean).items()}
    if name == "llavaw":
        pairs = []
        for it, p in zip(items, preds):
            ctx = "\n".join(it["context"]) if isinstance(it["context"], list) else it["context"]
            tpl = prompts.get(f"llavaw/{it['kind']}", prompts["llavaw"])  # official: per category
            if tpl is None:
                raise UserError(f"llavaw: the official rule.json has no llava_bench_{it['kind']}")
            text = fill(tpl, context=ctx, question=it["question"], reference=it["gold"], answer=p)
            pairs.append(
                score_pair(
                    judge(
                        [
                            {"role": "system", "content": prompts["llavaw_system"]},
                            {"role": "user", "content": text},
                        ],
                        1024,
                        0.2,
                    )
                )
            )
        scores += [dict(reference_score=q[0], score=q[1]) for q in pairs]

        # LLaVA's summary: per-column means (failed parses count as -1) rounded to 3 places, their
        # ratio times 100 rounded to 1 (NaN where its script divides by zero)
        def rel(ps):
            ours = round(mean([q[1] for q in ps]), 3)
            reference = round(mean([q[0] for q in ps]), 3) or float("nan")
            return round(ours / reference * 100, 1)

        return {"llavaw": rel(pairs)} | {f"llavaw/{k}": v for k, v in by_kind(pairs, rel).items()}
    if name == "mmvet":
        s = []
        for it, p in zip(items, preds):
            gt = it["gold"].replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
            text = fill(prompts["mmvet"], question=it["question"], reference=gt, answer=p)
            # MM-Vet's grader: ask again, warmer, up to 5 times (it sends a 6th, reply unread)
            for k, t in enumerate((0.0, 0.0, 0.5, 1.0, 1.5)):
                ask = text + (prompts["mmvet_retry"] if k else "")
                v = correctness(judge([{"role": "user", "content": ask}], 3, t))
                if v is not None:
                    break
            s.append(v or 0.0)
        scores += [dict(correctness=v) for v in s]
        caps = dict.fromkeys(c for it in items for c in it["kind"])
        pct = lambda xs: round(mean(xs) * 100 * 10) / 10  # noqa: E731 (MM-Vet's: numpy's round)
        res = {f"mmvet/{c}": pct([v for v, it in zip(s, items) if c in it["kind"]]) for c in caps}
        return {"mmvet": pct(s)} | res
    raise ValueError(f"{name} is not judged")


RULE = ("pope", "objhal", "textvqa", "gqa")


def evaluate_bench(
    vlm,
    names,
    root,
    judge=None,
    judge_v=None,
    limit=0,
    batch_size=64,
    max_new_tokens=512,
    prompts=PROMPTS,
    vocab=None,
    short_prompt=True,
    answers=None,
):
    """Answers each benchmark (short answers: 16 tokens, and SHORT unless short_prompt is False) and
    scores it; judge and judge_v (which sees images) read the open-ended ones. A list `answers` gets
    a record per question: {bench, id, kind, question, answer, its score's fields}."""
    res, answered = {}, {}
    answers = [] if answers is None else answers
    for name in names:
        if name not in RULE and (judge_v if name == "mmhal_v" else judge) is None:
            raise UserError(
                f"--bench {name}: needs a judge (JUDGE_BASE_URL, JUDGE_MODEL, JUDGE_API_KEY)"
            )
        items = load_bench(name, root, vocab)[: limit or None]
        key = FOLDER.get(name, name)  # MMHal and MMHal-V judge the same answers
        if key not in answered:
            short = name in ("pope", "textvqa", "gqa")
            qs = [it["question"] + (SHORT if short and short_prompt else "") for it in items]
            images = [it["image"] for it in items]
            answered[key] = answer(
                vlm, images, qs, 16 if short else max_new_tokens, batch_size, name
            )
        preds, scores = answered[key], []
        if name in RULE:
            res |= score_bench(name, items, preds, vocab, scores)
        else:
            res |= judge_bench(
                name, items, preds, judge_v if name == "mmhal_v" else judge, prompts, scores
            )
        res[f"{name}_n"] = len(items)
        answers += [
            dict(bench=name, id=it["id"], kind=it["kind"], question=it["question"], answer=p) | sc
            for it, p, sc in zip(items, preds, scores)
        ]
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
    bench_dir: str = "benchmarks"  # one folder per benchmark, holding its release's files (see GET)
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
    official: bool = False  # the published judge prompts and synonym list, not ours (OFFICIAL)
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


def main(argv=None):
    cfg = config_from_argv(Config, argv, __doc__)
    if cfg.data != "world" and not cfg.bench:
        raise UserError(f"--data {cfg.data!r}: only the embedded world is implemented so far")
    check_template(cfg.template)
    names = [b for b in cfg.bench.split(",") if b]
    if unknown := [b for b in names if b not in GET and b not in FOLDER]:
        raise UserError(
            f"--bench {','.join(unknown)}: no such benchmark; expected any of "
            f"{','.join(list(GET) + list(FOLDER))}"
        )
    for b in {FOLDER.get(b, b) for b in names} & set(HUB) if cfg.download else ():
        download(b, cfg.bench_dir)
    judged = [b for b in names if b not in RULE]  # judges (and their caches) only where needed
    opts = dict(timeout=cfg.judge_timeout, retries=cfg.judge_retries)
    cache = cfg.judge_cache or os.path.join(
        os.path.dirname(cfg.out) if cfg.out else cache_home(), "judgments.jsonl"
    )
    if judged:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    judge = JudgeClient(cache, model=cfg.judge_model or None, **opts) if judged else None
    judge_v = JudgeClient(cache, model=cfg.judge_model_v, **opts) if "mmhal_v" in judged else None
    if judged and not judge.key and "api.openai.com" in judge.url:
        raise UserError(
            f"--bench {cfg.bench}: the judged benchmarks need JUDGE_API_KEY (or "
            "OPENAI_API_KEY), or JUDGE_BASE_URL for an endpoint without a key"
        )
    prompts = PROMPTS | json.loads(
        pathlib.Path(cfg.judge_prompts).read_text() if cfg.judge_prompts else "{}"
    )
    prompts |= official_prompts(cfg.bench_dir, names) if cfg.official else {}
    official = cfg.official and "objhal" in names
    vocab = coco_vocab(
        official_file(cfg.bench_dir, "objhal") if official else cfg.synonyms or SYNONYMS
    )
    rows, answers = {}, []
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
        if names:
            mine = []
            res = evaluate_bench(
                vlm,
                names,
                cfg.bench_dir,
                judge,
                judge_v,
                cfg.limit,
                size,
                cfg.max_new_tokens,
                prompts,
                vocab,
                cfg.short_prompt,
                mine,
            )
            answers += [dict(model=name) | a for a in mine]
        else:
            res = world_report(vlm, cfg.world_seed, cfg.world_half, cfg.n, size)
        rows[name] = res | {"seconds": round(time.time() - t0, 1)}
    if names:
        print(table(rows, list(TABLE2.values()), list(TABLE2)))
    else:
        print(table(rows, HALF_KEYS if cfg.world_half else KEYS))
    for name, res in rows.items():
        if "samples" in res:
            print(f"sample descriptions ({name}):", *res["samples"][:3], sep="\n  ")
    if cfg.out:
        atomic_json(cfg.out, rows)
    if cfg.out and answers:  # each question's answer and score, a line each, beside the summary
        path = os.path.join(os.path.dirname(cfg.out), "answers.jsonl")
        with open(f"{path}.tmp{os.getpid()}", "w") as f:
            f.writelines(json.dumps(a) + "\n" for a in answers)
        os.replace(f"{path}.tmp{os.getpid()}", path)
        print(f"answers: {path}")
    if judged:
        print(f"judgments: {cache}")
    return rows


if __name__ == "__main__":
    run_main(main)
