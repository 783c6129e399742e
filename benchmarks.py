"""benchmarks.py: the paper's eight benchmarks (§7, Table 2) read from their public releases' own files,
each scored as its own script does (README: the exceptions), and the client of the LLM judge that scores the
open-ended ones (any OpenAI-compatible endpoint). `python eval.py --bench ...` runs them."""

import ast
import base64
import contextlib
import glob
import hashlib
import http.client
import io
import json
import os
import pathlib
import re
import socket
import string
import threading
import time
import urllib.error
import urllib.request

import data
import eval as ev  # the metrics and answers; eval.py imports this file only inside main (no cycle)
from cli import UserError, UserFileError, atomic_write, require
from hub import cache_home

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
                "(benchmarks.UNZIP_MAX_*); not extracted"
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


class Release:
    """A benchmark's folder under root: its files read as JSON or JSONL, its images' paths."""

    def __init__(self, root, name):
        self.root, self.name, self.dir = root, name, os.path.join(root, name)

    def json(self, fn):
        return json.loads(pathlib.Path(bench_file(self.root, self.name, fn)).read_text())

    def rows(self, fn, *keys):  # a JSONL file's records, each checked for the keys
        return [r for _, r in data.read_jsonl(bench_file(self.root, self.name, fn), *keys)]

    def path(self, *parts):
        return os.path.join(self.dir, *parts)


def load_bench(name, root, vocab=None):
    """-> items {id, image (path or bytes), question, gold, kind, ...} from a release's own files."""
    if name not in READERS:
        raise UserError(f"--bench {name!r}: expected one of {', '.join(list(GET) + list(FOLDER))}")
    release = Release(root, FOLDER.get(name, name))
    try:
        return READERS[name](release, vocab)
    except KeyError as e:  # a record without a field, or a question without its context / answer
        raise UserError(f"{name}: {release.dir}: no field or record {e}") from None


def pope_items(rel, vocab):
    return [
        dict(
            id=f"{kind}-{r['question_id']}",
            image=rel.path("images", r["image"]),
            question=r["text"],
            gold=r["label"] == "yes",
            kind=kind,
        )
        for kind in ("random", "popular", "adversarial")
        for r in rel.rows(f"coco_pope_{kind}.json", "question_id", "image", "text", "label")
    ]


def objhal_items(rel, vocab):
    recs = rel.rows("obj_halbench_300_with_image.jsonl", "image_id", "image", "question")
    truth = coco_truth(rel.root, {int(r["image_id"]) for r in recs}, vocab or coco_vocab())
    return [
        dict(
            id=i,
            image=base64.b64decode(r["image"]),
            question=r["question"],
            gold=truth[int(r["image_id"])],
            kind="objhal",
        )
        for i, r in enumerate(recs)
    ]


def mmhal_items(rel, vocab):
    return [
        dict(
            id=i,
            image=rel.path("images", r["image_src"].split("/")[-1]),
            question=r["question"],
            gold=r["gt_answer"],
            objects=r["image_content"],
            kind=r["question_type"],
        )
        for i, r in enumerate(rel.json("response_template.json"))
    ]


def llavaw_items(rel, vocab):
    qs = rel.rows("questions.jsonl", "question_id", "image", "text", "category")
    ctx = {c["image"]: c["caption"] for c in rel.rows("context.jsonl", "caption")}
    ref = {
        a["question_id"]: a["text"] for a in rel.rows("answers_gpt4.jsonl", "question_id", "text")
    }
    return [
        dict(
            id=q["question_id"],
            image=rel.path("images", q["image"]),
            question=q["text"],
            gold=ref[q["question_id"]],
            context=ctx[q["image"]],
            kind=q["category"],
        )
        for q in qs
    ]


def mmvet_items(rel, vocab):
    return [
        dict(
            id=k,
            image=rel.path("images", r["imagename"]),
            question=r["question"],
            gold=r["answer"],
            kind=tuple(sorted(set(r["capability"]))),
        )
        for k, r in rel.json("mm-vet.json").items()
    ]


def textvqa_items(rel, vocab):
    return [
        dict(
            id=r["question_id"],
            image=rel.path("train_images", r["image_id"] + ".jpg"),
            question=r["question"],
            gold=r["answers"],
            kind="textvqa",
        )
        for r in rel.json("TextVQA_0.5.1_val.json")["data"]
    ]


def gqa_items(rel, vocab):
    return [
        dict(
            id=q,
            image=rel.path("images", r["imageId"] + ".jpg"),
            question=r["question"],
            gold=r["answer"],
            kind="gqa",
        )
        for q, r in rel.json("testdev_balanced_questions.json").items()
    ]


# each benchmark's reader: (its Release, a synonym list for objhal) -> items
READERS = dict(
    pope=pope_items,
    objhal=objhal_items,
    mmhal=mmhal_items,
    mmhal_v=mmhal_items,
    llavaw=llavaw_items,
    mmvet=mmvet_items,
    textvqa=textvqa_items,
    gqa=gqa_items,
)


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
        return {f"objhal_{k}": v for k, v in ev.chair(said, truth).items()} | {
            "objhal_response_hall": ev.chair(*zip(*named))["chair_s"] if named else 0.0
        }
    if name == "pope":
        # LLaVA's model_vqa_loader.py strips each answer before eval_pope.py reads it: "No\n" is no
        yes = [ev.yes_no(p.strip()) for p in preds]
        scores += [dict(yes=y, correct=y == it["gold"]) for y, it in zip(yes, items)]
        res, kinds = {}, ("random", "popular", "adversarial")
        for kind in kinds:
            sel = [(y, it["gold"]) for it, y in zip(items, yes) if it["kind"] == kind]
            res |= {f"pope_{kind}_{k}": v for k, v in ev.pope_metrics(*zip(*sel)).items()}
        return res | {"pope": sum(res[f"pope_{k}_f1"] for k in kinds) / 3}
    if name == "textvqa":
        acc = [vqa_accuracy(p, it["gold"]) for it, p in zip(items, preds)]
        scores += [dict(accuracy=a) for a in acc]
        return {"textvqa": 100 * sum(acc) / len(items)}
    pred = [p.strip().rstrip(".").lower() for p in preds]
    scores += [dict(correct=p == it["gold"]) for p, it in zip(pred, items)]
    return {"gqa": ev.accuracy(pred, [it["gold"] for it in items])}


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
        if not self.url.startswith(("https://", "http://")):  # urllib would open file:// too
            raise UserError(f"JUDGE_BASE_URL {base!r}: an http:// or https:// address is needed")
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
        cuts the connection at the deadline, so a server that trickles bytes cannot hold it longer."""
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url, payload, headers, method="POST")
        conns = Cuttable()
        # only an https URL goes through a proxy: a CONNECT tunnel, so the key stays inside TLS
        # (urllib sends the proxy URL's user:password, both needed, as Proxy-Authorization on the
        # CONNECT alone), unless NO_PROXY names the host; plain http goes direct, since a proxy
        # would read the key
        proxy = {k: v for k, v in urllib.request.getproxies().items() if k == "https"}
        opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxy), conns, NoRedirect)
        opener.addheaders = []  # no User-Agent: the request's headers are ours alone
        timer = threading.Timer(self.timeout, conns.cut)
        timer.start()
        try:
            try:
                reply = opener.open(request, timeout=self.timeout)
            except urllib.error.HTTPError as e:  # a status that urllib raises: a reply all the same
                reply = e
            with reply:
                return reply.status, reply.headers, reply.read(), None
        except (OSError, http.client.HTTPException) as e:
            late = f"no complete reply within {self.timeout} s"
            return None, {}, b"", late if conns.late.is_set() else repr(e)
        finally:
            timer.cancel()

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


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """Follows no redirect: a 3xx comes back as the reply, so the key never leaves the configured host."""

    def redirect_request(self, *args):
        return None


class Cuttable(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib's http and https handlers, holding on to each connection's socket so that cut() can end
    the request at its deadline (a socket timeout bounds each read, not the whole reply)."""

    def __init__(self):
        super().__init__()
        self.conns, self.late = [], threading.Event()

    def do_open(self, http_class, req, **kw):
        conns = self.conns

        class Held(http_class):
            def connect(self):
                conns.append(self)  # while connecting (the proxy's CONNECT too): cut() reads .sock
                super().connect()
                self.held = self.sock  # urllib drops .sock once the reply's head is read

        return super().do_open(Held, req, **kw)

    def cut(self):  # at the deadline: wakes the read blocked in the requesting thread
        self.late.set()
        for c in self.conns:
            with contextlib.suppress(OSError, TypeError):  # TypeError: not connected yet
                socket.socket.shutdown(getattr(c, "held", c.sock), socket.SHUT_RDWR)


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
# WordNet's noun detachment rules
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
)
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
            with urllib.request.urlopen(url, timeout=60) as r:
                atomic_write(path, r.read())
        except OSError as e:
            raise UserFileError(
                f"--official: cannot download {url} ({e}); put that file at {path}"
            ) from None
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
    if name not in JUDGED:
        raise ValueError(f"{name} is not judged")
    return JUDGED[name](name, items, preds, judge, prompts, [] if scores is None else scores)


def by_kind(items, vals, f):
    """{kind: f(the values of that kind's items)}, kinds in the items' order."""
    kinds = dict.fromkeys(it["kind"] for it in items)
    return {k: f([v for v, it in zip(vals, items) if it["kind"] == k]) for k in kinds}


def judge_mmhal(name, items, preds, judge, prompts, scores):
    """MMHal-Bench's 0-6 ratings (MMHal-V: the judge sees the image too)."""
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
            [{"type": "text", "text": text}, image_part(it["image"])] if name == "mmhal_v" else text
        )
        s.append(rating(judge([{"role": "user", "content": content}], 1024, 0.0)))
    scores += [dict(rating=x) for x in s]
    return {
        name: ev.mean(s),
        f"{name}_hallucination_rate": 100 * ev.mean([x < 3 for x in s]),
        f"{name}_informativeness": 100 * ev.mean([x - 3 if x >= 3 else x for x in s]) / 3,
    } | {f"{name}/{k}": v for k, v in by_kind(items, s, ev.mean).items()}


def judge_llavaw(name, items, preds, judge, prompts, scores):
    """LLaVA-Bench: the judge scores the reference answer and ours; the ratio of their means."""
    pairs = []
    for it, p in zip(items, preds):
        ctx = "\n".join(it["context"]) if isinstance(it["context"], list) else it["context"]
        tpl = prompts.get(f"llavaw/{it['kind']}", prompts["llavaw"])  # official: per category
        require(tpl is not None, f"llavaw: the official rule.json has no llava_bench_{it['kind']}")
        text = fill(tpl, context=ctx, question=it["question"], reference=it["gold"], answer=p)
        system = {"role": "system", "content": prompts["llavaw_system"]}
        pairs.append(score_pair(judge([system, {"role": "user", "content": text}], 1024, 0.2)))
    scores += [dict(reference_score=q[0], score=q[1]) for q in pairs]
    rel = relative_score
    return {"llavaw": rel(pairs)} | {
        f"llavaw/{k}": v for k, v in by_kind(items, pairs, rel).items()
    }


def relative_score(pairs):
    """LLaVA's summary of [reference score, our score] pairs: per-column means (failed parses count
    as -1) rounded to 3 places, their ratio times 100 rounded to 1 (NaN where its script divides by
    zero)."""
    ours = round(ev.mean([q[1] for q in pairs]), 3)
    reference = round(ev.mean([q[0] for q in pairs]), 3) or float("nan")
    return round(ours / reference * 100, 1)


def judge_mmvet(name, items, preds, judge, prompts, scores):
    """MM-Vet's 0-1 correctness, overall and per capability."""
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
    pct = lambda xs: round(ev.mean(xs) * 100 * 10) / 10  # noqa: E731 (MM-Vet's: numpy's round)
    res = {f"mmvet/{c}": pct([v for v, it in zip(s, items) if c in it["kind"]]) for c in caps}
    return {"mmvet": pct(s)} | res


JUDGED = dict(mmhal=judge_mmhal, mmhal_v=judge_mmhal, llavaw=judge_llavaw, mmvet=judge_mmvet)
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
            answered[key] = ev.answer(
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
# `python eval.py --bench ...`: its flags are eval.Config's


def run(cfg):
    """Every model of --model on the benchmarks of --bench -> {model: results}; prints Table 2's
    columns, writes --out with answers.jsonl (each question's answer and score) beside it."""
    names = [b for b in cfg.bench.split(",") if b]
    if unknown := [b for b in names if b not in GET and b not in FOLDER]:
        raise UserError(
            f"--bench {','.join(unknown)}: no such benchmark; expected any of "
            f"{','.join(list(GET) + list(FOLDER))}"
        )
    for b in {FOLDER.get(b, b) for b in names} & set(HUB) if cfg.download else ():
        download(b, cfg.bench_dir)
    judge, judge_v, cache = judges(cfg, names)
    prompts = PROMPTS | json.loads(
        pathlib.Path(cfg.judge_prompts).read_text() if cfg.judge_prompts else "{}"
    )
    prompts |= official_prompts(cfg.bench_dir, names) if cfg.official else {}
    official = cfg.official and "objhal" in names
    vocab = coco_vocab(
        official_file(cfg.bench_dir, "objhal") if official else cfg.synonyms or SYNONYMS
    )
    rows, answers = {}, []
    for name, vlm, size, t0 in ev.each_model(cfg):
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
        rows[name] = res | {"seconds": round(time.time() - t0, 1)}
    print(ev.table(rows, list(TABLE2.values()), list(TABLE2)))
    if cfg.out:
        ev.atomic_json(cfg.out, rows)
    if cfg.out and answers:  # each question's answer and score, a line each, beside the summary
        path = os.path.join(os.path.dirname(cfg.out), "answers.jsonl")
        atomic_write(path, "".join(json.dumps(a) + "\n" for a in answers))
        print(f"answers: {path}")
    if cache:
        print(f"judgments: {cache}")
    return rows


def judges(cfg, names):
    """-> (judge, MMHal-V's judge, their cache's path), each None where no benchmark needs it."""
    judged = [b for b in names if b not in RULE]  # judges (and their caches) only where needed
    if not judged:
        return None, None, None
    opts = dict(timeout=cfg.judge_timeout, retries=cfg.judge_retries)
    cache = cfg.judge_cache or os.path.join(
        os.path.dirname(cfg.out) if cfg.out else cache_home(), "judgments.jsonl"
    )
    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    judge = JudgeClient(cache, model=cfg.judge_model or None, **opts)
    judge_v = JudgeClient(cache, model=cfg.judge_model_v, **opts) if "mmhal_v" in judged else None
    if not judge.key and "api.openai.com" in judge.url:
        raise UserError(
            f"--bench {cfg.bench}: the judged benchmarks need JUDGE_API_KEY (or "
            "OPENAI_API_KEY), or JUDGE_BASE_URL for an endpoint without a key"
        )
    return judge, judge_v, cache
