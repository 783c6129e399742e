"""eval.py: hallucination and capability metrics (paper §4.2, §7, App. B).

On the embedded world every answer can be checked against the scene, so the metrics are exact:
- POPE-style existence probing ("Is there a cup in the image?") with random, popular (the most frequent absent
  categories) and adversarial (the absent usual partner of a present object) negatives: accuracy, precision, recall,
  F1 and yes-ratio, with POPE's official answer parsing;
- description hallucination (Rohrbach et al. 2018): objects parsed from a detailed description and checked against
  the scene, giving CHAIR_i (share of mentioned objects that are absent), CHAIR_s (share of descriptions with any)
  and recall (share of present objects mentioned), plus the colours stated for correctly named objects;
- colour and count question accuracy.

    python eval.py --model assets/world-base --data world --world_seed 0 --out results.json
"""
import base64
import glob
import hashlib
import io
import json
import os
import random
import re
import time
from dataclasses import dataclass

import data
from model import VLM, config_from_argv

# -----------------------------------------------------------------------------
# Parsing answers

NEGATIONS = {"no", "not", "without", "nor", "none", "never"}
_WORD = re.compile(r"[a-z]+")
_NOUNS = {data.plural(c): c for c in data.CATEGORIES} | {c: c for c in data.CATEGORIES}


def parse_objects(text):
    """Object mentions in free text: [{"category", "color" (or None), "negated"}], in order of appearance. A mention
    is negated when a negation word comes earlier in its clause ("there is no cup", "not a red cup")."""
    out = []
    for clause in re.split(r"[.;!?,]| but | and ", text.lower()):
        words = _WORD.findall(clause)
        for k, w in enumerate(words):
            if w in _NOUNS:
                prev = words[k - 1] if k else ""
                out.append(dict(category=_NOUNS[w], color=prev if prev in data.COLORS else None,
                                negated=any(x in NEGATIONS for x in words[:k])))
    return out


def mentioned(text):
    """The set of categories a text asserts are present."""
    return {m["category"] for m in parse_objects(text) if not m["negated"]}


def yes_no(text):
    """POPE's official rule: the first sentence without commas; any of "No", "not", "no" means no."""
    words = text.split(".")[0].replace(",", "").split()
    return not any(w in ("No", "not", "no") for w in words)


def first_word(text, vocab):
    """The first word of the text that is in vocab, or None."""
    return next((w for w in _WORD.findall(text.lower()) if w in vocab), None)

# -----------------------------------------------------------------------------
# Metrics (percentages), each a pure function


def pope_metrics(pred, label):
    """pred, label: lists of bools (True = yes). Accuracy, precision, recall, F1 of the "yes" class, yes-ratio."""
    tp = sum(p and l for p, l in zip(pred, label))
    fp = sum(p and not l for p, l in zip(pred, label))
    fn = sum(l and not p for p, l in zip(pred, label))
    n = len(label)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    acc = sum(p == l for p, l in zip(pred, label)) / n
    return {k: 100 * v for k, v in dict(acc=acc, precision=precision, recall=recall, f1=f1,
                                        yes_ratio=sum(pred) / n).items()}


def chair(said, truth):
    """said, truth: one set of categories per description. CHAIR_i = absent mentions / mentions, CHAIR_s = share of
    descriptions with an absent mention, recall = present objects mentioned / present objects."""
    mentions = sum(len(s) for s in said)
    wrong = [len(s - t) for s, t in zip(said, truth)]
    return dict(chair_i=100 * sum(wrong) / max(mentions, 1), chair_s=100 * sum(w > 0 for w in wrong) / len(said),
                recall=100 * sum(len(s & t) for s, t in zip(said, truth)) / max(sum(len(t) for t in truth), 1))


def accuracy(pred, gold):
    return 100 * sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1)

# -----------------------------------------------------------------------------
# The world evaluation


def answer(vlm, images, questions, max_new_tokens, batch_size=64):
    """Greedy answers to (image, question) pairs: batched, KV-cached generation. Images are PIL images or paths
    (opened one batch at a time)."""
    out = []
    for i in range(0, len(questions), batch_size):
        batch = vlm.prepare(questions[i:i + batch_size], [data.open_image(im) for im in images[i:i + batch_size]])
        ids = vlm.generate(**batch, max_new_tokens=max_new_tokens, temperature=0.0)
        out += [vlm.tokenizer.decode(x) for x in ids]
    return out


def probes(world: data.World, split, n):
    """The questions of the world evaluation: per scene a description, one POPE positive, one negative of each
    kind, a colour and a count question. Returns (scenes, items); an item is (scene index, kind, question, gold)."""
    rng = random.Random(f"probes-{world.seed}-{split}")
    scenes = [world.scene(split, i) for i in range(n)]
    items = []
    for i, s in enumerate(scenes):
        present = [o.category for o in s.objects]
        absent = [c for c in data.CATEGORIES if c not in present]
        partners = [data.PARTNER[c] for c in present if data.PARTNER[c] in absent]
        top = max(data.FREQUENCY[c] for c in absent if c not in partners)
        negatives = dict(random=rng.choice(absent), adversarial=rng.choice(partners) if partners else None,
                         popular=rng.choice([c for c in absent if data.FREQUENCY[c] == top and c not in partners]))
        items.append((i, "describe", data.DESCRIBE[0], set(present)))
        items.append((i, "pope_pos", data.exist_qa(rng.choice(present), True)[0], True))
        items += [(i, f"pope_{k}", data.exist_qa(c, False)[0], False) for k, c in negatives.items() if c]
        o = rng.choice(s.objects)
        items.append((i, "color", data.color_qa(o)[0], o.color))
        items.append((i, "count", data.COUNT[0], len(s.objects)))
    return scenes, items


def evaluate_world(vlm, world_seed=0, split="broken", n=500, batch_size=64):
    """All world metrics for the first n scenes of a split, as a flat dict (percentages)."""
    world = data.World(world_seed)
    scenes, items = probes(world, split, n)
    images = [data.render(s) for s in scenes]
    texts = [""] * len(items)  # the model's answer to each item
    for kind, max_new in (("describe", 96), ("pope", 3), ("color", 6), ("count", 6)):
        sel = [j for j, it in enumerate(items) if it[1].startswith(kind)]
        outs = answer(vlm, [images[items[j][0]] for j in sel], [items[j][2] for j in sel], max_new, batch_size)
        for j, t in zip(sel, outs):
            texts[j] = t

    def answered(kind):  # (answer, item) for the items of one kind
        return [(t, it) for t, it in zip(texts, items) if it[1] == kind]

    res = dict(split=split, world_seed=world_seed, n_images=n)
    pos = [(yes_no(t), True) for t, _ in answered("pope_pos")]
    for k in ("random", "popular", "adversarial"):
        pred, label = zip(*(pos + [(yes_no(t), False) for t, _ in answered(f"pope_{k}")]))
        res |= {f"pope_{k}_{m}": v for m, v in pope_metrics(pred, label).items()}
    desc = answered("describe")
    res |= chair([mentioned(t) for t, _ in desc], [it[3] for _, it in desc])
    stated, true_color = [], []  # colours the descriptions give to objects that are really there
    for t, it in desc:
        colors = {o.category: o.color for o in scenes[it[0]].objects}
        for m in parse_objects(t):
            if m["category"] in colors and m["color"] and not m["negated"]:
                stated.append(m["color"]), true_color.append(colors[m["category"]])
    res["desc_color_acc"] = accuracy(stated, true_color)
    res["color_acc"] = accuracy(*zip(*[(first_word(t, data.COLORS), it[3]) for t, it in answered("color")]))
    res["count_acc"] = accuracy(*zip(*[(first_word(t, data.NUMBERS), data.NUMBERS[it[3]])
                                       for t, it in answered("count")]))
    res["samples"] = [t for t, _ in desc[:3]]
    return res


KEYS = ["pope_random_f1", "pope_popular_f1", "pope_adversarial_f1", "pope_adversarial_yes_ratio", "chair_i", "chair_s",
        "recall", "color_acc", "desc_color_acc", "count_acc"]


def table(rows: dict, keys=KEYS):
    """{name: results} -> a Markdown table with one row per result and the headline metrics as columns."""
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# The paper's rule-scored benchmarks (Table 2), read from their public releases' own files: POPE, TextVQA, GQA

SHORT = "\nAnswer the question using a single word or phrase."  # LLaVA's prompt suffix for short-answer VQA
GET = {"pope": "POPE's output/coco/ folder (github.com/AoiDragon/POPE), with COCO val2014 images in images/",
       "textvqa": "TextVQA_0.5.1_val.json and train_images/ from textvqa.org/dataset",
       "gqa": "testdev_balanced_questions.json from the GQA release (cs.stanford.edu/people/dorarad/gqa), images/"}


def bench_file(root, name, fn):
    path = os.path.join(root, name, fn)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name}: {path} not found. Put {GET[name]} in {os.path.join(root, name)}")
    return path


def load_bench(name, root):
    """-> items {id, image (path), question, gold, kind}. POPE: one JSON object per line (question_id, image, text,
    label); TextVQA: {"data": [{question_id, image_id, question, answers (10)}]}; GQA: {qid: {imageId, question,
    answer}}."""
    d = os.path.join(root, name)
    if name == "pope":
        items = []
        for kind in ("random", "popular", "adversarial"):
            path = bench_file(root, name, f"coco_pope_{kind}.json")
            for n, line in enumerate(open(path), 1):
                if line.strip():
                    try:
                        r = json.loads(line)
                        items.append(dict(id=f"{kind}-{r['question_id']}", image=os.path.join(d, "images", r["image"]),
                                          question=r["text"], gold=r["label"] == "yes", kind=kind))
                    except (json.JSONDecodeError, KeyError) as e:
                        raise ValueError(f"{path}:{n}: not a POPE record ({e!r})") from None
        return items
    if name == "textvqa":
        recs = json.load(open(bench_file(root, name, "TextVQA_0.5.1_val.json")))["data"]
        return [dict(id=r["question_id"], image=os.path.join(d, "train_images", r["image_id"] + ".jpg"),
                     question=r["question"] + SHORT, gold=r["answers"], kind=name) for r in recs]
    if name == "gqa":
        recs = json.load(open(bench_file(root, name, "testdev_balanced_questions.json")))
        return [dict(id=q, image=os.path.join(d, "images", r["imageId"] + ".jpg"), question=r["question"] + SHORT,
                     gold=r["answer"], kind=name) for q, r in recs.items()]
    raise ValueError(f"--bench {name!r}: expected one of {', '.join(GET)}")


_NUMBER = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_CONTRACT = {w.replace("'", ""): w for w in (  # ours, without the forms that are words by themselves (well, its...)
    "aren't can't couldn't didn't doesn't don't hadn't hasn't haven't he'd he's i'm i've isn't it'd it'll mightn't "
    "might've mustn't must've needn't o'clock shan't she'd she'll she's shouldn't should've that's there's they'd "
    "they'll they're they've wasn't we're we've weren't what's where's who's won't wouldn't would've y'all you'd "
    "you'll you're you've").split()}


def vqa_normalize(text):
    """The TextVQA answer normalisation (EvalAI's, as LLaVA's TextVQA evaluation runs it): lower case, commas and
    question marks out, "'s" split off; other punctuation dropped when a space is beside it somewhere in the text,
    else made a space; periods dropped unless before a digit; number words to digits, articles out, contractions
    given their apostrophe."""
    t = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    t = t.replace("\n", " ").replace("\t", " ").strip()
    out = t
    for p in _PUNCT:
        out = out.replace(p, "" if (p + " " in t or " " + p in t) else " ")
    words = [_NUMBER.get(w, "0" if w == "none" else w) for w in re.sub(r"\.(?!\d)", "", out).split()]
    return " ".join(_CONTRACT.get(w, w) for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(pred, answers):
    """Soft VQA accuracy of one prediction against the human answers: the mean over leave-one-out subsets of
    min(1, matching answers / 3)."""
    p, gts = vqa_normalize(pred), [vqa_normalize(a) for a in answers]
    return sum(min(1.0, sum(g == p for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))) / len(gts)


def score_bench(name, items, preds):
    """Percentages. POPE: accuracy, precision, recall, F1 and yes-ratio per kind, and `pope` = the mean F1."""
    if name == "pope":
        res = {}
        for kind in ("random", "popular", "adversarial"):
            sel = [(yes_no(p), it["gold"]) for it, p in zip(items, preds) if it["kind"] == kind]
            res |= {f"pope_{kind}_{k}": v for k, v in pope_metrics(*zip(*sel)).items()}
        return res | {"pope": sum(res[f"pope_{k}_f1"] for k in ("random", "popular", "adversarial")) / 3}
    if name == "textvqa":
        return {"textvqa": 100 * sum(vqa_accuracy(p, it["gold"]) for it, p in zip(items, preds)) / len(items)}
    return {"gqa": accuracy([p.strip().rstrip(".").lower() for p in preds], [it["gold"] for it in items])}


def evaluate_bench(vlm, names, root, limit=0, batch_size=64):
    res = {}
    for name in names:
        items = load_bench(name, root)[:limit or None]
        preds = answer(vlm, [it["image"] for it in items], [it["question"] for it in items], 16, batch_size)
        res |= score_bench(name, items, preds) | {f"{name}_n": len(items)}
    return res

# -----------------------------------------------------------------------------
# A judge for the open-ended benchmarks (MMHal-Bench, MMHal-V, LLaVA-Bench, MM-Vet): any OpenAI-compatible
# chat-completions endpoint, through the standard library, every judgment cached on disk as it arrives


class JudgeClient:
    """POSTs to {JUDGE_BASE_URL}/chat/completions (default https://api.openai.com/v1) with JUDGE_MODEL and the key
    JUDGE_API_KEY (or OPENAI_API_KEY). 429 and 5xx answers and network errors are retried with exponential back-off
    (or the server's Retry-After); requests are spaced at least `min_interval` seconds apart. Each judgment is
    appended to the JSONL `cache` (flushed and synced), keyed by model, messages and settings, so a rerun or an
    interrupted run asks only for what is missing."""

    def __init__(self, cache, base_url=None, model=None, api_key=None, retries=6, backoff=2.0, min_interval=0.0,
                 timeout=120.0):
        env = os.environ.get
        self.url = (base_url or env("JUDGE_BASE_URL", "https://api.openai.com/v1")).rstrip("/") + "/chat/completions"
        self.model = model or env("JUDGE_MODEL", "gpt-4-0613")
        self.key = api_key or env("JUDGE_API_KEY", env("OPENAI_API_KEY", ""))
        self.path, self.retries, self.backoff = cache, retries, backoff
        self.min_interval, self.timeout = min_interval, timeout
        self.cache, self.last = {}, 0.0
        if os.path.exists(cache):
            for line in open(cache):
                try:
                    r = json.loads(line)
                    self.cache[r["key"]] = r["content"]
                except (json.JSONDecodeError, KeyError):
                    pass  # a line cut by a kill
        self.asked = 0  # requests sent by this client (cache hits send none)

    def __call__(self, messages, max_tokens=512, temperature=0.0):
        import urllib.error
        import urllib.request
        body = dict(model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature)
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if key in self.cache:
            return self.cache[key]
        req = urllib.request.Request(self.url, json.dumps(body).encode(), {"Content-Type": "application/json",
                                                                          "Authorization": f"Bearer {self.key}"})
        for attempt in range(self.retries + 1):
            time.sleep(max(0.0, self.last + self.min_interval - time.monotonic()))
            self.last, self.asked, delay = time.monotonic(), self.asked + 1, 0.0
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    content = json.load(r)["choices"][0]["message"]["content"]
                break
            except urllib.error.HTTPError as e:
                err, retry = f"HTTP {e.code} {e.read()[:200]!r}", e.code == 429 or e.code >= 500
                delay = float(e.headers.get("Retry-After") or 0)
            except (urllib.error.URLError, OSError) as e:
                err, retry = repr(e), True
            if not retry or attempt == self.retries:
                raise RuntimeError(f"judge {self.url} failed after {attempt + 1} request(s): {err}. The {len(self.cache)} "
                                   f"judgments made so far are kept in {self.path}; rerun to continue.")
            time.sleep(max(delay, self.backoff * 2 ** attempt))
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(key=key, content=content)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.cache[key] = content
        return content


def image_part(image):
    """A PIL image as a chat-completions content part (a PNG data URL), for judges that see the image (MMHal-V)."""
    buf = io.BytesIO()
    data.open_image(image).save(buf, format="PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}

# -----------------------------------------------------------------------------
# Command line


@dataclass
class Config:
    model: str = data.BASE_MODEL  # a checkpoint, or several as name=path,name=path (one table row each)
    data: str = "world"
    world_seed: int = 0
    split: str = "broken"  # broken: the prior does not hold; heldout: unseen scenes from the training distribution
    n: int = 500
    batch_size: int = 64
    out: str = ""          # JSON: {name: results}
    results: str = ""      # instead of evaluating: a table of train_offline runs' results.json files (a glob); one
                           # row per run (its folder's name) plus the first run's "before" as "base"
    bench: str = ""        # instead of the world: pope,textvqa,gqa (the judge-scored ones are not written yet)
    bench_dir: str = "benchmarks"  # one folder per benchmark, holding its release's files (see GET)
    limit: int = 0         # evaluate the first N items of each benchmark (0: all)


def results_table(pattern):
    """The before/after files of several runs (train_offline's world results) as one table."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"--results {pattern!r}: no file matches")
    runs = [(os.path.basename(os.path.dirname(f)), json.load(open(f))) for f in files]
    return table({"base": runs[0][1]["before"]} | {name: r["after"] for name, r in runs})


def main(argv=None):
    cfg = config_from_argv(Config, argv, __doc__)
    if cfg.results:
        print(results_table(cfg.results))
        return
    if cfg.data != "world" and not cfg.bench:
        raise SystemExit(f"--data {cfg.data!r}: only the embedded world is implemented so far")
    names = [b for b in cfg.bench.split(",") if b]
    rows = {}
    for spec in cfg.model.split(","):
        name, _, path = spec.rpartition("=")
        name = name or os.path.basename(path.rstrip("/"))
        t0 = time.time()
        vlm = VLM.from_pretrained(path).eval()
        rows[name] = evaluate_bench(vlm, names, cfg.bench_dir, cfg.limit, cfg.batch_size) if names else \
            evaluate_world(vlm, cfg.world_seed, cfg.split, cfg.n, cfg.batch_size)
        rows[name]["seconds"] = round(time.time() - t0, 1)
    print(table(rows, [k for k in ("pope", "textvqa", "gqa") if f"{k}_n" in rows[name]] if names else KEYS))
    for name, res in rows.items():
        if "samples" in res:
            print(f"sample descriptions ({name}):", *res["samples"][:3], sep="\n  ")
    if cfg.out:
        tmp = cfg.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=2)
        os.replace(tmp, cfg.out)
    return rows


if __name__ == "__main__":
    main()
