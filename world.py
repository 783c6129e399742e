"""world.py: the embedded synthetic world, the default everywhere (nothing can be downloaded here).
It carries the study's premise (paper §1, §6): a base model whose language prior outweighs the
image, that "sees" the saucer because cups usually come with saucers.

- 14 categories in 7 usual pairs (cup+saucer, moon+star, ...), each with a typical colour; scenes
  of 1-5 objects on a 3x3 grid, drawn as 96 px images.
- LLaVA-Instruct-style questions (description, existence, count, colour, position), each kind with
  TRAIN phrasings and HELDOUT ones that no training data uses: evaluation measures transfer.
- Splits: `sft` (the base model's; its annotations name an absent usual partner at the rate
  `hallucinate`, as text-only annotators do), `align` (prompts with ground truth, as POVID's),
  `heldout` and `broken` (one of a usual pair without its partner, random colours). Layouts hash
  to ten buckets, 0-6 for training splits and 7-9 for evaluation, so no evaluated scene is a
  training scene. `half` keeps a world to half of the pairs: align on one, measure on the other.

Also here: the tokenizer, the corruption set (the paper's rejected-by-corruption strategy, §4.3,
by rule), the online annotator's rule-based verifier, and what the world's report asks (eval.py's
world_report scores it). The shipped base model's recipe is scripts/world_base.py.

    python world.py --split broken --n 8 --out world_samples   # PNGs and a JSONL to look at
"""

import hashlib
import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from cli import config_from_argv, require, run_main
from model import format_chat

# -----------------------------------------------------------------------------
# The rules: categories, usual pairs, typical colours, positions

PAIRS = [
    ("cup", "saucer"),
    ("moon", "star"),
    ("house", "tree"),
    ("key", "lock"),
    ("pencil", "book"),
    ("apple", "pear"),
    ("arrow", "target"),
]
PARTNER = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
CATEGORIES = [c for pair in PAIRS for c in pair]
HALVES = {"a": {c for p in PAIRS[0::2] for c in p}, "b": {c for p in PAIRS[1::2] for c in p}}
TYPICAL = dict(
    cup="blue",
    saucer="white",
    moon="white",
    star="yellow",
    house="red",
    tree="green",
    key="yellow",
    lock="black",
    pencil="orange",
    book="brown",
    apple="red",
    pear="green",
    arrow="purple",
    target="pink",
)
COLORS = dict(
    red=(215, 35, 35),
    orange=(245, 140, 20),
    yellow=(240, 215, 30),
    green=(35, 165, 60),
    blue=(40, 80, 225),
    purple=(135, 50, 180),
    pink=(245, 135, 195),
    brown=(125, 75, 35),
    black=(20, 20, 20),
    white=(245, 245, 245),
)
# 3x3 grid cells in reading order, with the phrase a description uses for each
POSITIONS = [
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
]
# how often each category starts a unit: POPE's "popular" negatives are the most frequent absent
FREQUENCY = {c: w for (a, b), w in zip(PAIRS, [3.0, 2.5, 2.0, 1.6, 1.3, 1.0, 0.8]) for c in (a, b)}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]  # a corruption may add a sixth
SIZE = 96  # image side in pixels: 3x3 cells of 32 px
TRAIN_BUCKETS, EVAL_BUCKETS = range(0, 7), range(7, 10)


def an(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


@dataclass
class Obj:
    category: str
    color: str
    cell: int  # index into POSITIONS
    size: int  # glyph side in pixels (22-28)
    x: float  # glyph centre in pixels
    y: float


@dataclass
class Scene:
    objects: list = field(default_factory=list)  # sorted by cell (reading order)
    background: tuple = (128, 128, 128)
    noise_seed: int = 0

    def categories(self):
        return {o.category for o in self.objects}

    def lone(self):  # the absent usual partners of its objects, in reading order
        cats = self.categories()
        return [PARTNER[o.category] for o in self.objects if PARTNER[o.category] not in cats]

    def bucket(self):
        """0-9 from the layout alone (categories and cells), whatever the seed, colours or sizes."""
        layout = sorted((o.category, o.cell) for o in self.objects)
        return int(hashlib.sha256(repr(layout).encode()).hexdigest(), 16) % 10


# -----------------------------------------------------------------------------
# Scenes: the prior lives here


def sample_scene(rng, prior=0.9, color_prior=0.6, broken=False, cats=CATEGORIES):
    """1-3 units from `cats`, each a usual pair with probability `prior`; `broken`: first lone."""
    chosen = []
    for u in range(rng.randint(1, 3)):
        free = [c for c in cats if c not in chosen and PARTNER[c] not in chosen]
        if not free:
            break
        chosen.append(rng.choices(free, [FREQUENCY[c] for c in free])[0])
        if not (broken and u == 0) and len(chosen) < 5 and rng.random() < prior:
            chosen.append(PARTNER[chosen[-1]])
    p_typical = 1 / len(COLORS) if broken else color_prior
    objects = []
    for c, cell in zip(chosen, rng.sample(range(9), len(chosen))):
        other = [k for k in COLORS if k != TYPICAL[c]]
        color = TYPICAL[c] if rng.random() < p_typical else rng.choice(other)
        x = (cell % 3 + 0.5) * SIZE / 3 + rng.uniform(-2, 2)  # jitter around the centre
        y = (cell // 3 + 0.5) * SIZE / 3 + rng.uniform(-2, 2)
        objects.append(Obj(c, color, cell, rng.randint(22, 28), x, y))
    bg = tuple(128 + rng.randint(-20, 20) for _ in range(3))
    return Scene(sorted(objects, key=lambda o: o.cell), bg, rng.randrange(2**31))


# -----------------------------------------------------------------------------
# Rendering: each category is a glyph mask built from a few primitives, filled with its colour


def glyph(d: ImageDraw.ImageDraw, c, s):
    """Draws category c's mask (255 = object, 0 erases a hole) into the s x s box at the origin."""

    def box(a, b, e, f, fill=255):  # shapes in box-relative units (0..1)
        d.rectangle([a * s, b * s, e * s, f * s], fill=fill)

    def oval(a, b, e, f, fill=255):
        d.ellipse([a * s, b * s, e * s, f * s], fill=fill)

    def poly(pts, fill=255):
        d.polygon([(u * s, v * s) for u, v in pts], fill=fill)

    if c == "cup":  # a tapered body with a ring handle
        poly([(0.05, 0.15), (0.75, 0.15), (0.65, 0.95), (0.15, 0.95)])
        oval(0.6, 0.3, 1.0, 0.7), oval(0.7, 0.42, 0.88, 0.58, 0)
    elif c == "saucer":  # a flat dish
        oval(0.0, 0.6, 1.0, 0.9)
    elif c == "moon":  # a crescent
        oval(0.0, 0.0, 1.0, 1.0), oval(0.3, -0.1, 1.2, 0.85, 0)
    elif c == "star":
        r = [0.5 if k % 2 == 0 else 0.2 for k in range(10)]
        poly(
            [
                (0.5 + r[k] * math.sin(k * math.pi / 5), 0.55 - r[k] * math.cos(k * math.pi / 5))
                for k in range(10)
            ]
        )
    elif c == "house":  # walls and a roof
        box(0.15, 0.5, 0.85, 1.0), poly([(0.0, 0.5), (0.5, 0.0), (1.0, 0.5)])
    elif c == "tree":  # a tall crown on a trunk
        poly([(0.1, 0.75), (0.5, 0.0), (0.9, 0.75)]), box(0.4, 0.7, 0.6, 1.0)
    elif c == "key":  # a ring bow, a shaft and teeth
        oval(0.0, 0.3, 0.4, 0.7), oval(0.12, 0.42, 0.28, 0.58, 0)
        box(0.35, 0.45, 1.0, 0.57), box(0.75, 0.55, 0.85, 0.75)
    elif c == "lock":  # a body under a shackle
        oval(0.2, 0.0, 0.8, 0.7), oval(0.35, 0.15, 0.65, 0.6, 0), box(0.1, 0.45, 0.9, 1.0)
    elif c == "pencil":  # a long bar with a point
        poly([(0.0, 0.4), (0.75, 0.4), (1.0, 0.5), (0.75, 0.6), (0.0, 0.6)])
    elif c == "book":  # a cover split by its spine
        box(0.1, 0.05, 0.9, 0.95), box(0.47, 0.05, 0.53, 0.95, 0)
    elif c == "apple":  # a round fruit with a stem
        oval(0.05, 0.2, 0.95, 1.0), box(0.45, 0.0, 0.55, 0.25)
    elif c == "pear":  # a small bulb on a large one
        oval(0.3, 0.0, 0.7, 0.45), oval(0.1, 0.3, 0.9, 1.0)
    elif c == "arrow":  # a shaft and a head
        box(0.0, 0.42, 0.6, 0.58), poly([(0.55, 0.15), (1.0, 0.5), (0.55, 0.85)])
    elif c == "target":  # rings around a bullseye
        oval(0.0, 0.0, 1.0, 1.0), oval(0.2, 0.2, 0.8, 0.8, 0), oval(0.35, 0.35, 0.65, 0.65)
    else:
        raise KeyError(c)


def render(scene: Scene) -> Image.Image:
    """The scene as a SIZE x SIZE RGB image: glyphs drawn at 3x, downsampled, over faint noise."""
    k = 3  # supersampling
    img = Image.new("RGB", (SIZE * k, SIZE * k), scene.background)
    for o in scene.objects:
        s = o.size * k
        x0, y0 = round(o.x * k - s / 2), round(o.y * k - s / 2)
        mask = Image.new("L", (s + 1, s + 1), 0)  # a local mask, pasted at the glyph's corner
        glyph(ImageDraw.Draw(mask), o.category, s)
        img.paste(COLORS[o.color], (x0, y0, x0 + s + 1, y0 + s + 1), mask=mask)
    a = np.asarray(img.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float32)
    a += np.random.default_rng(scene.noise_seed).normal(0, 4, (SIZE, SIZE, 1))
    return Image.fromarray(a.clip(0, 255).round().astype(np.uint8))


# -----------------------------------------------------------------------------
# Text: questions in two sets of phrasings, and their ground-truth answers

PHRASINGS = {  # kind -> (train phrasings, held-out ones); {a} is "a cup" / "an apple", {c} "cup"
    "describe": (
        [
            "Describe the image in detail.",
            "What do you see in this picture?",
            "Give a detailed description of the image.",
            "Describe this scene.",
            "What is in the image? Describe everything.",
        ],
        [
            "Tell me about everything this image shows.",
            "Walk me through the contents of this picture.",
        ],
    ),
    "exist": (
        ["Is there {a} in the image?", "Do you see {a} here?", "Is {a} present in this picture?"],
        ["Does the image contain {a}?", "Can {a} be seen in this scene?"],
    ),
    "color": (
        ["What color is the {c}?", "What is the color of the {c}?"],
        ["Which colour does the {c} have?", "Tell me the shade of the {c}."],
    ),
    "count": (
        [
            "How many objects are there?",
            "How many objects are in the image?",
            "Count the objects in the picture.",
        ],
        ["What is the number of objects shown?", "How many things can you see?"],
    ),
    "position": (
        ["Where is the {c}?", "Where is the {c} located?"],
        ["In which part of the image is the {c}?", "Whereabouts is the {c}?"],
    ),
}
KINDS = {"describe": 0.35, "exist": 0.35, "color": 0.1, "count": 0.1, "position": 0.1}


def ask(kind, c=None, rng=None, heldout=False):
    """A question of `kind` about c: a random phrasing of the set, or its first without rng."""
    options = PHRASINGS[kind][heldout]
    q = rng.choice(options) if rng else options[0]
    return q.format(a=an(c), c=c) if c else q


def count_answer(n):
    return "There is one object." if n == 1 else f"There are {NUMBERS[n]} objects."


def describe(scene: Scene) -> str:
    """The count, then one sentence per object in reading order."""
    return " ".join(
        [count_answer(len(scene.objects))]
        + [
            f"{an(o.color).capitalize()} {o.category} is {POSITIONS[o.cell]}."
            for o in scene.objects
        ]
    )


def answer(kind, scene, c=None):
    """The ground truth to a question of `kind` about category c in the scene."""
    o = next((o for o in scene.objects if o.category == c), None)
    if kind == "describe":
        return describe(scene)
    if kind == "count":
        return count_answer(len(scene.objects))
    if kind == "exist":
        return f"Yes, there is {an(c)}." if o else f"No, there is no {c}."
    if kind == "color":
        return f"The {c} is {o.color}."
    return f"The {c} is {POSITIONS[o.cell]}."


def sample_qa(rng, scene: Scene, kind, cats=CATEGORIES):
    """(question, answer, category), train phrasing; `exist` asks of an absent c half the time."""
    c = None
    if kind == "exist":  # about a present or an absent category, half the time each
        c = rng.choice(
            [o.category for o in scene.objects]
            if rng.random() < 0.5
            else [c for c in cats if c not in scene.categories()]
        )
    elif kind in ("color", "position"):
        c = rng.choice(scene.objects).category
    return ask(kind, c, rng), answer(kind, scene, c), c


# -----------------------------------------------------------------------------
# Splits: example i of a split depends only on (seed, split, i)


class World:
    SPLITS = ("sft", "align", "heldout", "broken")

    def __init__(self, seed=0, prior=0.9, color_prior=0.6, hallucinate=0.0, half=""):
        require(half in ("", "a", "b"), f"world half {half!r}: expected '', 'a' or 'b'", ValueError)
        self.seed, self.prior, self.color_prior = seed, prior, color_prior
        self.hallucinate, self.half = hallucinate, half
        self.cats = [c for c in CATEGORIES if not half or c in HALVES[half]]

    def rng(self, split, i):
        if split not in self.SPLITS:
            raise ValueError(f"unknown world split {split!r}; expected one of {self.SPLITS}")
        return random.Random(f"world-{self.seed}-{split}-{i}")

    def sample(self, rng, split, broken=None):
        """A scene of the split, drawn again until its layout lies in the split's buckets."""
        buckets = TRAIN_BUCKETS if split in ("sft", "align") else EVAL_BUCKETS
        broken = split == "broken" if broken is None else broken
        while True:
            s = sample_scene(rng, self.prior, self.color_prior, broken, self.cats)
            if s.bucket() in buckets:
                return s

    def scene(self, split, i) -> Scene:
        return self.sample(self.rng(split, i), split)

    def example(self, split, i, turns=None, image=True, kinds=None):
        """{"id", "scene", "image", "messages"}; sft: 1-3 turns of distinct kinds (`kinds`)."""
        rng = self.rng(split, i)
        scene = told = self.sample(rng, split)
        if split == "sft" and self.hallucinate:  # "sees" absent partners at this rate
            for c in scene.lone():
                if rng.random() < self.hallucinate and len(told.objects) < 9:
                    told = with_object(rng, told, c)
        weights = kinds or KINDS
        n, chosen = min(turns or (rng.randint(1, 3) if split == "sft" else 1), len(weights)), []
        while len(chosen) < n:  # weighted, without repeats
            k = rng.choices(list(weights), list(weights.values()))[0]
            chosen += [k] if k not in chosen else []
        msgs = []
        for t, kind in enumerate(chosen):
            q, a, _ = sample_qa(rng, told, kind, self.cats)
            msgs += [
                {"role": "user", "content": "<image>\n" * (t == 0) + q},
                {"role": "assistant", "content": a},
            ]
        return dict(
            id=f"{split}-{self.seed}-{i}",
            scene=scene,
            image=render(scene) if image else None,
            messages=msgs,
        )


# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained on the world's text, with LLaVA-1.5's chat special tokens

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
TEMPLATE = "llava"  # "USER: <image>\n... ASSISTANT: ...</s>"; the same in Jinja for transformers:
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# the --model default
BASE_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "world-base")


def build_tokenizer(world: World, vocab_size=512, n=3000):
    """A tokenizers.Tokenizer trained on the first n sft conversations: byte-level BPE, BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        format_chat(world.example("sft", i, image=False)["messages"], TEMPLATE, False)
        for i in range(n)
    ]
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


# -----------------------------------------------------------------------------
# The corruption set (paper §4.3, Table 13): the truth with one realistic hallucination, by rule


def with_object(rng, scene: Scene, c):
    """The scene as a biased annotator tells it: c added in its typical colour at a free cell."""
    cell = rng.choice([k for k in range(9) if k not in {o.cell for o in scene.objects}])
    return replace(
        scene,
        objects=sorted(scene.objects + [Obj(c, TYPICAL[c], cell, 25, 0, 0)], key=lambda o: o.cell),
    )


def corrupt(rng, scene: Scene, kind, c, allowed=CATEGORIES):
    """(rejected answer about c, edit): one error of the kinds a biased model makes."""
    objs, cats = scene.objects, scene.categories()

    def added():  # the partner of a lone object (else the most popular absent category)
        lone = scene.lone()
        absent = max((c for c in allowed if c not in cats), key=FREQUENCY.get)
        return with_object(rng, scene, rng.choice(lone) if lone else absent)

    def recolored(o):
        other = rng.choice([k for k in COLORS if k != o.color])
        return replace(o, color=TYPICAL[o.category] if o.color != TYPICAL[o.category] else other)

    if kind == "exist":  # the answer turned round
        return (f"No, there is no {c}." if c in cats else f"Yes, there is {an(c)}."), kind
    obj = next((o for o in objs if o.category == c), None)
    if kind == "color":
        return answer("color", Scene([recolored(obj)]), c), kind
    if kind == "position":
        free = [k for k in range(9) if k not in {o.cell for o in objs}]
        return answer("position", Scene([replace(obj, cell=rng.choice(free))]), c), kind
    if kind == "count":
        fewer = len(objs) > 1 and rng.random() >= 0.5
        return count_answer(len(objs) - 1 if fewer else len(added().objects)), kind
    # a description: one edit in place, so the rest stays word for word (a reordered or recounted
    # description would also teach the model to avoid the true objects after the edit)
    edit = rng.choice(["partner", "swap", "swap", "color"])
    if edit == "partner":
        return describe(added()), edit
    k = rng.randrange(len(objs))
    if edit == "swap":  # its partner if absent, else any absent category
        new = PARTNER[objs[k].category]
        new = new if new not in cats else rng.choice([x for x in allowed if x not in cats])
        o = replace(objs[k], category=new)
    else:
        o = recolored(objs[k])
    return describe(Scene(objs[:k] + [o] + objs[k + 1 :])), edit


def world_pairs(world: World, n, split="align", rejected=True, hard=0.5):
    """n native records, one question each: the truth as chosen and (`rejected`) its corruption.
    A share `hard` of scenes break the prior (where it holds, the base model is right already)."""
    recs = []
    for i in range(n):
        rng = world.rng(split, i)
        scene = world.sample(rng, split, broken=rng.random() < hard)
        kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
        q, a, c = sample_qa(rng, scene, kind, world.cats)
        lone = scene.lone()
        if kind == "exist" and c not in scene.categories() and lone:  # the likely false "yes"
            c = rng.choice(lone)
            q, a = ask("exist", c, rng), answer("exist", scene, c)
        rec = dict(
            id=f"{split}-{world.seed}-{i}",
            image=render(scene),
            conversation=[{"role": "user", "content": "<image>\n" + q}],
            chosen=a,
            meta=dict(kind=kind, category=c),
        )
        if rejected:
            rng = random.Random(f"corrupt-{rec['id']}")
            rec["rejected"], rec["meta"]["edit"] = corrupt(rng, scene, kind, c, world.cats)
        recs.append(rec)
    return recs


# The share of `--data world+partners` that partner_pairs replaces (opt-in; never a default): set before any
# run, to be checked on the dev seeds 0-2 only (STUDY.md reports the row on the test seeds as it stands)
PARTNER_SHARE = 0.25


def partner_pairs(world: World, n, split="align"):
    """n records on scenes where both objects of a usual pair are there: the chosen names the partner,
    the rejected is the shortcut's answer (world.Shortcut): "no" to the existence question, or the
    description without the second of each pair. The lesson the corruption set lacks: a partner is
    absent only where the image says so."""
    recs = []
    for i in range(n):
        rng = random.Random(f"partners-{world.seed}-{split}-{i}")  # apart from world_pairs' scenes
        while True:  # a training-bucket scene with a present pair (prior 0.9: a few draws)
            scene = world.sample(rng, split, broken=False)
            cats = scene.categories()
            paired = [o.category for o in scene.objects if PARTNER[o.category] in cats]
            if paired:
                break
        kind = rng.choice(["exist", "describe"])
        c = rng.choice(paired)
        chosen = answer(kind, scene, c)
        rejected = f"No, there is no {c}." if kind == "exist" else drop_second_of_pairs(chosen)
        recs.append(
            dict(
                id=f"{split}-partner-{world.seed}-{i}",
                image=render(scene),
                conversation=[{"role": "user", "content": "<image>\n" + ask(kind, c, rng)}],
                chosen=chosen,
                rejected=rejected,
                meta=dict(kind=kind, category=c, edit="partner_dropped"),
            )
        )
    return recs


def world_partner_pairs(world: World, n):
    """`--data world+partners`: the corruption set's first n - k records and k = PARTNER_SHARE n partner_pairs."""
    k = round(PARTNER_SHARE * n)
    return world_pairs(world, n - k) + partner_pairs(world, k)


# -----------------------------------------------------------------------------
# Reading answers: the objects, colours and positions a text states


def cell_of(text):
    """The grid cell a text's position phrase names (the longest phrase that fits), or None."""
    return next(
        (k for k in sorted(range(9), key=lambda k: -len(POSITIONS[k])) if POSITIONS[k] in text),
        None,
    )


def parse_objects(text):
    """[{"category", "color" or None, "cell" or None, "negated"}] in order; negated: a negation
    word comes before it in its clause ("there is no cup", "not a red cup")."""
    out = []
    for clause in re.split(r"[.;!?,]| but | and ", text.lower()):
        words = re.findall(r"[a-z]+", clause)
        for k, w in enumerate(words):
            c = w if w in PARTNER else w[:-1] if w.endswith("s") and w[:-1] in PARTNER else None
            if c:
                prev = words[k - 1] if k else ""
                out.append(
                    dict(
                        category=c,
                        color=prev if prev in COLORS else None,
                        cell=cell_of(clause),
                        negated=any(
                            x in ("no", "not", "without", "nor", "none", "never") for x in words[:k]
                        ),
                    )
                )
    return out


def mentioned(text):
    """The set of categories a text says are there."""
    return {m["category"] for m in parse_objects(text) if not m["negated"]}


def first_word(text, vocab):
    """The first word of the text that is in vocab, or None."""
    return next((w for w in re.findall(r"[a-z]+", text.lower()) if w in vocab), None)


def says_yes(text):
    """POPE's yes / no rule: no "No", "not" or "no" before the first period (commas out)."""
    return not any(w in ("No", "not", "no") for w in text.split(".")[0].replace(",", "").split(" "))


def rule_score(text, rec):
    """The online rule annotator: +1 per object there, -2 per one invented, ±1 per colour, the
    count, yes / no, colour or position asked; over a perfect score: in [-1, 1] if none invented."""
    truth, kind = rec["chosen"], rec.get("meta", {}).get("kind")
    if truth.split(",")[0].lower() in ("yes", "no"):
        return 1.0 if says_yes(text) == says_yes(truth) else -1.0
    want = {m["category"]: m["color"] for m in parse_objects(truth) if not m["negated"]}
    said = [m for m in parse_objects(text) if not m["negated"]]
    got = sum(1 if c in want else -2 for c in {m["category"] for m in said})
    top = len(want) + sum(c is not None for c in want.values())
    for m in said:
        if m["category"] in want and m["color"] and want[m["category"]]:
            got += 1 if m["color"] == want[m["category"]] else -1
    checks = [(first_word(truth, NUMBERS), first_word(text, NUMBERS))]
    if kind == "color":
        checks.append((first_word(truth, COLORS), first_word(text, COLORS)))
    if kind == "position":
        checks.append(([p for p in POSITIONS if p in truth], [p for p in POSITIONS if p in text]))
    for g, t in checks:
        if g:
            got, top = got + (1 if g == t else -1), top + 1
    return got / max(top, 1)


# -----------------------------------------------------------------------------
# What the world's report asks (eval.py's world_report measures it): POPE probes and questions


def probes(world: World, split, n, heldout=False):
    """-> scenes, [(scene index, kind, question, gold)]: per scene a description, a POPE positive,
    a negative of each kind, colour, count and position (the first train phrasing, or held-out)."""
    rng, phrasing = (
        random.Random(f"probes-{world.seed}-{split}"),
        random.Random(f"phrasing-{world.seed}-{split}"),
    )
    scenes, items = [world.scene(split, i) for i in range(n)], []
    q = lambda kind, c=None: ask(kind, c, phrasing if heldout else None, heldout)  # noqa: E731
    for i, s in enumerate(scenes):
        present = [o.category for o in s.objects]
        absent = [c for c in world.cats if c not in present]
        partners = s.lone()  # its categories are all in world.cats
        rest = [c for c in absent if c not in partners] or absent
        top = max(FREQUENCY[c] for c in rest)
        negatives = dict(
            random=rng.choice(absent),
            adversarial=rng.choice(partners) if partners else None,
            popular=rng.choice([c for c in rest if FREQUENCY[c] == top]),
        )
        o = rng.choice(s.objects)
        items += [
            (i, "describe", q("describe"), set(present)),
            (i, "pope_pos", q("exist", rng.choice(present)), True),
        ]
        items += [(i, f"pope_{k}", q("exist", c), False) for k, c in negatives.items() if c]
        items += [
            (i, "color", q("color", o.category), o.color),
            (i, "count", q("count"), len(s.objects)),
            (i, "position", q("position", o.category), o.cell),
        ]
    return scenes, items


def twin(scene: Scene, rng):
    """-> (twin, partner): the scene with one of its absent usual partners (rng's pick) added in a
    free cell, every other object, the background and the noise kept, so the two images differ by
    that glyph only; twin is None where no free cell puts the new layout in an evaluation bucket
    (a layout's bucket is its hash: a twin must never be a scene that training could have seen),
    or where every usual partner is there already (partner None; never in the broken split)."""
    if not scene.lone():
        return None, None
    c = rng.choice(scene.lone())
    free = [k for k in range(9) if k not in {o.cell for o in scene.objects}]
    cells = [
        k for k in free if Scene(scene.objects + [Obj(c, "", k, 0, 0, 0)]).bucket() in EVAL_BUCKETS
    ]
    if not cells:
        return None, c
    cell = rng.choice(cells)
    color = rng.choice(list(COLORS))  # uniform, as the broken split's colours: no colour cue
    x = (cell % 3 + 0.5) * SIZE / 3 + rng.uniform(-2, 2)  # jittered as sample_scene's glyphs
    y = (cell // 3 + 0.5) * SIZE / 3 + rng.uniform(-2, 2)
    new = Obj(c, color, cell, rng.randint(22, 28), x, y)
    return replace(scene, objects=sorted(scene.objects + [new], key=lambda o: o.cell)), c


def twin_probes(world: World, split, n):
    """The twin test of the first n scenes of a split -> (pairs, skipped): per scene that has a twin,
    (scene, twin, partner, description question, existence question about the partner), the two
    questions in held-out phrasings and the same for both scenes; skipped: scenes with no twin."""
    phrasing = random.Random(f"twin-phrasing-{world.seed}-{split}")
    pairs, skipped = [], 0
    for i in range(n):
        s = world.scene(split, i)
        t, c = twin(s, random.Random(f"twin-{world.seed}-{split}-{i}"))
        if t is None:
            skipped += 1
            continue
        pairs.append(
            (s, t, c, ask("describe", None, phrasing, True), ask("exist", c, phrasing, True))
        )
    return pairs, skipped


# -----------------------------------------------------------------------------
# The shortcut baseline (no training): what an aligned model may have learned instead of looking. The alignment data
# switches existence negatives to the absent usual partner, and half its scenes are `broken`, so a text rule can
# score: an existence question about some category's usual partner is answered "no" without looking (every category
# here has a partner, so it always says no: POPE F1 0, twin grounding 0 by construction, the floor to beat); a
# description is the base model's, minus every sentence that names X after X's partner was named; any other question
# gets the base model's answer. `python eval.py --model shortcut[:BASE] --world_seed 0` reports it like a model.

# existence phrasings, train and held-out, as patterns that catch the category: "Is there (a|an) X ..."
EXIST = [
    re.compile(re.escape(p).replace(re.escape("{a}"), r"an? ([a-z]+)") + "$")
    for ps in PHRASINGS["exist"]
    for p in ps
]
DESCRIBE = {p for ps in PHRASINGS["describe"] for p in ps}


def asked_about(question):
    """The category an existence question asks about, or None for any other question."""
    for pattern in EXIST:
        m = pattern.match(question.strip())
        if m and m[1] in PARTNER:
            return m[1]
    return None


def drop_second_of_pairs(text):
    """The description without every sentence that names X after an earlier sentence named X's
    usual partner (sentences end with '.'; a sentence naming no category is kept)."""
    kept, named = [], set()
    for sentence in re.findall(r"[^.]*\.?", text):
        said = mentioned(sentence)
        if any(PARTNER[c] in named for c in said):
            continue
        named |= said
        kept.append(sentence)
    return "".join(kept)


class TextsAsIs:
    """The tokenizer eval.answer decodes with: Shortcut.generate returns texts already."""

    def decode(self, text, skip_special_tokens=True):
        return text


class Shortcut:
    """The shortcut over a base model (a VLM or anything with its prepare / generate / tokenizer)."""

    def __init__(self, base):
        self.base = base
        self.tokenizer = TextsAsIs()
        self.template = getattr(base, "template", None)
        self.template_source = f"the base model's ({getattr(base, 'template_source', None)})"

    # the rest (cfg, lm_head, parameters: batch sizing) is the base model's
    def __getattr__(self, name):
        return getattr(self.__dict__["base"], name)

    def eval(self):
        self.base.eval()
        return self

    def prepare(self, questions, images=None, template=None, device=None):
        """Keeps the questions: what to ask the base model is decided per question in generate."""
        return dict(questions=list(questions), images=images, template=template, device=device)

    def generate(
        self, questions, images=None, template=None, device=None, max_new_tokens=64, **sampling
    ):
        """Texts, one per question: the rule's answer, or the base model's (descriptions filtered)."""
        out = [None] * len(questions)
        for j, q in enumerate(questions):
            if (c := asked_about(q)) is not None:
                out[j] = answer("exist", Scene(), c)  # "No, there is no c.": the scene is not read
        rest = [j for j, t in enumerate(out) if t is None]
        if rest:
            shown = [images[j] for j in rest] if images else None
            batch = self.base.prepare([questions[j] for j in rest], shown, template, device)
            ids = self.base.generate(**batch, max_new_tokens=max_new_tokens, **sampling)
            for j, x in zip(rest, ids):
                text = self.base.tokenizer.decode(x)
                out[j] = drop_second_of_pairs(text) if questions[j].strip() in DESCRIBE else text
        return out


# -----------------------------------------------------------------------------
# Command line


# A Config is a table, a flag a row, its help the comment beside it: kept as written
# fmt: off
@dataclass
class Config:
    split: Literal[World.SPLITS] = "broken"  # write n examples of a split, PNGs and a JSONL, to look at
    n: int = 8              # examples to write
    world_seed: int = 0     # the world's scenes: 0-2 dev seeds, 3-5 test seeds
    half: Literal["", "a", "b"] = ""  # the categories of one half of the world only
    out: str = "world_samples"  # the folder of the examples
    BOUNDS = dict(n=">= 0")
# fmt: on


def main(argv=None):
    cfg = config_from_argv(Config, argv, __doc__)
    world = World(cfg.world_seed, half=cfg.half)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, f"{cfg.split}.jsonl"), "w") as f:
        for i in range(cfg.n):
            ex = world.example(cfg.split, i)
            path = os.path.join(cfg.out, f"{ex['id']}.png")
            ex["image"].save(path)
            f.write(
                json.dumps(
                    dict(
                        id=ex["id"], image=path, messages=ex["messages"], scene=asdict(ex["scene"])
                    )
                )
                + "\n"
            )
    print(f"wrote {cfg.n} {cfg.split} examples to {cfg.out}/")


if __name__ == "__main__":
    run_main(main)
