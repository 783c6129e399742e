"""The data: an embedded synthetic visual world with a language-prior bias, and training batches built from it.

The study's premise (paper §1, §6) is a base model whose language prior outweighs the image: it "sees" the saucer
because cups usually come with saucers. No real weights or datasets can be downloaded here, so the embedded default
is a small world where that bias is built in and measurable in minutes on a CPU:

- 14 object categories in 7 usual pairs (cup+saucer, moon+star, ...), each with a typical colour;
- scenes of 1-5 objects on a 3x3 grid of positions, drawn as 96 px images; a unit of a scene is a pair with
  probability `prior` (the strength knob), and an object has its typical colour with probability `color_prior`;
- LLaVA-Instruct-style conversations: detailed descriptions ("There are two objects. A blue cup is at the top left. A
  white saucer is in the center."), yes/no existence, counting, colour and position questions;
- splits: `sft` (base-model training), `align` (prompts the base was trained on, with ground-truth responses: the
  role POVID / LLaVA-Instruct prompts play in the paper), `heldout` (same distribution, unseen scenes) and `broken`
  (every scene has one of a usual pair without its partner, and colours are uniformly random).

The world's rules (pairs, colours, glyphs) are fixed; `world_seed` picks the scenes, and example i of a split is a
pure function of (world_seed, split, i), so any slice can be regenerated without the ones before it.

    python data.py --split broken --n 8 --out world_samples   # writes PNGs and a JSONL to look at
"""
import hashlib
import io
import json
import math
import os
import random
import sys
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from model import TEMPLATES, config_from_argv, format_chat, load_image, open_image_header, to_rgb

# -----------------------------------------------------------------------------
# The world's rules: categories, usual pairs, typical colours, positions

PAIRS = [("cup", "saucer"), ("moon", "star"), ("house", "tree"), ("key", "lock"), ("pencil", "book"),
         ("apple", "pear"), ("arrow", "target")]
PARTNER = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
CATEGORIES = [c for pair in PAIRS for c in pair]
TYPICAL = dict(cup="blue", saucer="white", moon="white", star="yellow", house="red", tree="green", key="yellow",
               lock="black", pencil="orange", book="brown", apple="red", pear="green", arrow="purple", target="pink")
COLORS = dict(red=(215, 35, 35), orange=(245, 140, 20), yellow=(240, 215, 30), green=(35, 165, 60),
              blue=(40, 80, 225), purple=(135, 50, 180), pink=(245, 135, 195), brown=(125, 75, 35),
              black=(20, 20, 20), white=(245, 245, 245))
# 3x3 grid cells in reading order, with the phrase a description uses for each
POSITIONS = ["at the top left", "at the top", "at the top right", "on the left", "in the center", "on the right",
             "at the bottom left", "at the bottom", "at the bottom right"]
# how often each category starts a unit: some are popular (POPE's "popular" negatives are the most frequent ones)
FREQUENCY = {c: w for (a, b), w in zip(PAIRS, [3.0, 2.5, 2.0, 1.6, 1.3, 1.0, 0.8]) for c in (a, b)}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]  # six: a corruption may add a sixth
SIZE = 96  # image side in pixels: 3x3 cells of 32 px; glyphs are drawn at 3x and downsampled (anti-aliased)


def plural(c):
    return c + "s"  # every category name takes a plain -s


def an(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


@dataclass
class Obj:
    category: str
    color: str
    cell: int  # index into POSITIONS
    size: int  # glyph side in pixels (22-28)
    x: float   # glyph centre in pixels
    y: float


@dataclass
class Scene:
    objects: list = field(default_factory=list)  # sorted by cell (reading order)
    background: tuple = (128, 128, 128)
    noise_seed: int = 0

    def categories(self):
        return {o.category for o in self.objects}

# -----------------------------------------------------------------------------
# Scene sampling: the prior lives here


def sample_scene(rng: random.Random, prior=0.9, color_prior=0.6, broken=False) -> Scene:
    """1-3 units, each a usual pair with probability `prior` (if it fits in 5 objects) or a single object; an object
    has its typical colour with probability `color_prior`. `broken`: the first unit is a single object whose partner
    is absent, and colours are typical only as often as chance (1 in 10)."""
    chosen = []
    units = rng.randint(1, 3)
    for u in range(units):
        free = [c for c in CATEGORIES if c not in chosen and PARTNER[c] not in chosen]
        c = rng.choices(free, [FREQUENCY[c] for c in free])[0]
        chosen.append(c)
        if not (broken and u == 0) and len(chosen) + 1 <= 5 and rng.random() < prior:
            chosen.append(PARTNER[c])
    p_typical = 1 / len(COLORS) if broken else color_prior
    cells = rng.sample(range(9), len(chosen))
    objects = []
    for c, cell in zip(chosen, cells):
        color = TYPICAL[c] if rng.random() < p_typical else rng.choice([k for k in COLORS if k != TYPICAL[c]])
        size = rng.randint(22, 28)
        x = (cell % 3 + 0.5) * SIZE / 3 + rng.uniform(-2, 2)  # a little jitter around the cell's centre
        y = (cell // 3 + 0.5) * SIZE / 3 + rng.uniform(-2, 2)
        objects.append(Obj(c, color, cell, size, x, y))
    bg = tuple(128 + rng.randint(-20, 20) for _ in range(3))
    return Scene(sorted(objects, key=lambda o: o.cell), bg, rng.randrange(2**31))

# -----------------------------------------------------------------------------
# Rendering: each category is a glyph mask built from a few primitives, filled with the object's colour


def _glyph(d: ImageDraw.ImageDraw, c, x0, y0, s):
    """Draws category c's mask (255 = object) into the s x s box at (x0, y0); 0 erases (holes)."""
    def box(a, b, e, f, fill=255):  # rectangle in box-relative units (0..1)
        d.rectangle([x0 + a * s, y0 + b * s, x0 + e * s, y0 + f * s], fill=fill)

    def oval(a, b, e, f, fill=255):
        d.ellipse([x0 + a * s, y0 + b * s, x0 + e * s, y0 + f * s], fill=fill)

    def poly(pts, fill=255):
        d.polygon([(x0 + u * s, y0 + v * s) for u, v in pts], fill=fill)

    if c == "cup":      # tapered body with a ring handle
        poly([(0.05, 0.15), (0.75, 0.15), (0.65, 0.95), (0.15, 0.95)]); oval(0.6, 0.3, 1.0, 0.7); oval(0.7, 0.42, 0.88, 0.58, 0)
    elif c == "saucer":  # a flat dish
        oval(0.0, 0.6, 1.0, 0.9)
    elif c == "moon":   # a crescent
        oval(0.0, 0.0, 1.0, 1.0); oval(0.3, -0.1, 1.2, 0.85, 0)
    elif c == "star":
        poly([(0.5 + (0.5 if k % 2 == 0 else 0.2) * math.sin(k * math.pi / 5),
               0.55 - (0.5 if k % 2 == 0 else 0.2) * math.cos(k * math.pi / 5)) for k in range(10)])
    elif c == "house":  # walls and a roof
        box(0.15, 0.5, 0.85, 1.0); poly([(0.0, 0.5), (0.5, 0.0), (1.0, 0.5)])
    elif c == "tree":   # a tall crown on a trunk
        poly([(0.1, 0.75), (0.5, 0.0), (0.9, 0.75)]); box(0.4, 0.7, 0.6, 1.0)
    elif c == "key":    # a ring bow, a shaft and teeth
        oval(0.0, 0.3, 0.4, 0.7); oval(0.12, 0.42, 0.28, 0.58, 0); box(0.35, 0.45, 1.0, 0.57); box(0.75, 0.55, 0.85, 0.75)
    elif c == "lock":   # a body under a shackle
        oval(0.2, 0.0, 0.8, 0.7); oval(0.35, 0.15, 0.65, 0.6, 0); box(0.1, 0.45, 0.9, 1.0)
    elif c == "pencil":  # a long bar with a point
        poly([(0.0, 0.4), (0.75, 0.4), (1.0, 0.5), (0.75, 0.6), (0.0, 0.6)])
    elif c == "book":   # a cover split by its spine
        box(0.1, 0.05, 0.9, 0.95); box(0.47, 0.05, 0.53, 0.95, 0)
    elif c == "apple":  # a round fruit with a stem
        oval(0.05, 0.2, 0.95, 1.0); box(0.45, 0.0, 0.55, 0.25)
    elif c == "pear":   # a small bulb on a large one
        oval(0.3, 0.0, 0.7, 0.45); oval(0.1, 0.3, 0.9, 1.0)
    elif c == "arrow":  # a shaft and a head
        box(0.0, 0.42, 0.6, 0.58); poly([(0.55, 0.15), (1.0, 0.5), (0.55, 0.85)])
    elif c == "target":  # rings around a bullseye
        oval(0.0, 0.0, 1.0, 1.0); oval(0.2, 0.2, 0.8, 0.8, 0); oval(0.35, 0.35, 0.65, 0.65)
    else:
        raise KeyError(c)


def render(scene: Scene) -> Image.Image:
    """The scene as a SIZE x SIZE RGB image: a tinted background with faint noise, glyphs filled with colours."""
    k = 3  # supersampling factor
    img = Image.new("RGB", (SIZE * k, SIZE * k), scene.background)
    for o in scene.objects:
        s = o.size * k
        x0, y0 = round(o.x * k - s / 2), round(o.y * k - s / 2)
        mask = Image.new("L", (s + 1, s + 1), 0)  # local mask around the glyph, pasted at its corner
        _glyph(ImageDraw.Draw(mask), o.category, 0, 0, s)
        img.paste(COLORS[o.color], (x0, y0, x0 + s + 1, y0 + s + 1), mask=mask)
    a = np.asarray(img.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float32)
    a += np.random.default_rng(scene.noise_seed).normal(0, 4, (SIZE, SIZE, 1))  # faint sensor noise
    return Image.fromarray(a.clip(0, 255).round().astype(np.uint8))

# -----------------------------------------------------------------------------
# Text: ground-truth answers for each question type, LLaVA-Instruct style

DESCRIBE = ["Describe the image in detail.", "What do you see in this picture?", "Give a detailed description of "
            "the image.", "Describe this scene.", "What is in the image? Describe everything."]
COUNT = ["How many objects are there?", "How many objects are in the image?", "Count the objects in the picture."]


def count_answer(scene):
    n = len(scene.objects)
    return "There is one object." if n == 1 else f"There are {NUMBERS[n]} objects."


def describe(scene: Scene) -> str:
    """The count, then one sentence per object in reading order."""
    return " ".join([count_answer(scene)] + [f"{an(o.color).capitalize()} {o.category} is {POSITIONS[o.cell]}."
                                             for o in scene.objects])


def exist_qa(c, present):
    return f"Is there {an(c)} in the image?", (f"Yes, there is {an(c)}." if present else f"No, there is no {c}.")


def color_qa(o: Obj):
    return f"What color is the {o.category}?", f"The {o.category} is {o.color}."


def sample_qa(rng: random.Random, scene: Scene, kind: str):
    """One (question, answer) pair of the given kind about the scene."""
    if kind == "describe":
        return rng.choice(DESCRIBE), describe(scene)
    if kind == "count":
        return rng.choice(COUNT), count_answer(scene)
    if kind == "exist":
        present = rng.random() < 0.5
        absent = [c for c in CATEGORIES if c not in scene.categories()]
        return exist_qa(rng.choice([o.category for o in scene.objects] if present else absent), present)
    o = rng.choice(scene.objects)
    if kind == "color":
        return color_qa(o)
    if kind == "position":
        return f"Where is the {o.category}?", f"The {o.category} is {POSITIONS[o.cell]}."
    raise ValueError(f"unknown question kind {kind!r}")


KINDS = {"describe": 0.35, "exist": 0.35, "color": 0.1, "count": 0.1, "position": 0.1}

# -----------------------------------------------------------------------------
# Splits


class World:
    """Deterministic examples: example i of a split depends only on (seed, split, i)."""
    SPLITS = ("sft", "align", "heldout", "broken")

    def __init__(self, seed=0, prior=0.9, color_prior=0.6, hallucinate=0.0):
        self.seed, self.prior, self.color_prior, self.hallucinate = seed, prior, color_prior, hallucinate

    def rng(self, split, i):
        if split not in self.SPLITS:
            raise ValueError(f"unknown world split {split!r}; expected one of {self.SPLITS}")
        return random.Random(f"world-{self.seed}-{split}-{i}")

    def scene(self, split, i) -> Scene:
        return sample_scene(self.rng(split, i), self.prior, self.color_prior, split == "broken")

    def example(self, split, i, turns=None, image=True, kinds=None):
        """{"id", "scene", "image", "messages"}: sft examples have 1-3 turns, the others one; `kinds` weighs the
        question kinds (default KINDS)."""
        rng = self.rng(split, i)
        scene = told = sample_scene(rng, self.prior, self.color_prior, split == "broken")
        if split == "sft" and self.hallucinate:  # the annotator "sees" each absent usual partner at this rate
            for c in [PARTNER[o.category] for o in scene.objects if PARTNER[o.category] not in scene.categories()]:
                told = with_object(rng, told, c) if rng.random() < self.hallucinate and len(told.objects) < 9 else told
        n = turns or (rng.randint(1, 3) if split == "sft" else 1)
        weights, kinds = kinds or KINDS, []
        n = min(n, len(weights))
        while len(kinds) < n:  # weighted, without repeats
            k = rng.choices(list(weights), list(weights.values()))[0]
            kinds += [k] if k not in kinds else []
        msgs = []
        for t, kind in enumerate(kinds):
            q, a = sample_qa(rng, told, kind)
            msgs += [{"role": "user", "content": ("<image>\n" if t == 0 else "") + q}, {"role": "assistant", "content": a}]
        return {"id": f"{split}-{self.seed}-{i}", "scene": scene, "image": render(scene) if image else None, "messages": msgs}

    def corpus(self, n=3000):
        """Text for training the tokenizer: the first n sft conversations in the chat template."""
        return [format_chat(self.example("sft", i, image=False)["messages"], TEMPLATE, False) for i in range(n)]

# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained on the world's text, with the LLaVA chat template's special tokens

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
TEMPLATE = "llava"  # "USER: <image>\n... ASSISTANT: ...</s>", the LLaVA-1.5 template; the same as Jinja for HF:
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}ASSISTANT: "
                 "{{ m['content'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
BASE_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "world-base")  # every --model default


def build_tokenizer(world: World, vocab_size=512):
    """A tokenizers.Tokenizer: byte-level BPE (any text round-trips), BOS added by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(world.corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok

# -----------------------------------------------------------------------------
# Training batches: conversation -> ids with labels only on the assistant's replies


def encode_conversation(vlm, messages, image_sizes=None):
    """(ids, labels) of a whole conversation in the model's chat template; labels are -100 except on the replies
    (their end-of-turn token included). Pieces are tokenized one by one, so the split is exact; each "<image>" becomes
    one placeholder per image feature (AnyRes models need the image's (h, w) in `image_sizes` to count them)."""
    t = TEMPLATES[vlm.template]
    ids, labels = [], []
    for k, m in enumerate(messages):
        if m["role"] == "user":
            text, train = (t["system"] if k == 0 else "") + t["user"].format(m["content"]) + t["assistant"], False
        else:
            text, train = t["reply"].format(m["content"]), True
        piece = vlm.encode_prompt(text, image_sizes, add_special_tokens=k == 0)
        ids += piece
        labels += piece if train else [-100] * len(piece)
    return ids, labels


def collate(vlm, examples, pad_id=0):
    """Examples with one image each -> right-padded batch: input_ids, labels (-100 on pads), pixel_values.
    Right padding means real tokens never see a pad under the causal mask, so no attention mask is needed."""
    enc = [encode_conversation(vlm, e["messages"]) for e in examples]
    T = max(len(i) for i, _ in enc)
    ids = torch.tensor([i + [pad_id] * (T - len(i)) for i, _ in enc])
    labels = torch.tensor([l + [-100] * (T - len(l)) for _, l in enc])
    return dict(input_ids=ids, labels=labels, **vlm.image_processor([e["image"] for e in examples]))

# -----------------------------------------------------------------------------
# The world's preference pairs: the corruption strategy (paper §4.3, Table 13) done by rule instead of by GPT-4


def with_object(rng: random.Random, scene: Scene, c):
    """The scene as a biased annotator tells it: category c added in its typical colour at a free cell."""
    cell = rng.choice([k for k in range(9) if k not in {o.cell for o in scene.objects}])
    return replace(scene, objects=sorted(scene.objects + [Obj(c, TYPICAL[c], cell, 25, 0, 0)], key=lambda o: o.cell))


def corrupt(rng: random.Random, scene: Scene, kind: str, q: str):
    """A rejected answer to question q: the ground truth with one realistic hallucination, the kind a biased model
    makes: an absent usual partner added, an object named as another category, a colour turned typical, a count or a
    position changed. Returns (answer, edit)."""
    objs, cats = scene.objects, scene.categories()
    asked = q.rstrip("?").split()[3 if kind == "exist" else -1]  # "Is there a cup ...", "What color is the cup?"
    obj = next((o for o in objs if o.category == asked), None)

    def added():  # the partner of a lone object (else the most popular absent category)
        lone = [PARTNER[o.category] for o in objs if PARTNER[o.category] not in cats]
        return with_object(rng, scene, rng.choice(lone) if lone else
                           max((c for c in CATEGORIES if c not in cats), key=FREQUENCY.get))

    def recolored(o):
        new = TYPICAL[o.category] if o.color != TYPICAL[o.category] else rng.choice([k for k in COLORS if k != o.color])
        return replace(o, color=new)

    def moved(o):
        return replace(o, cell=rng.choice([k for k in range(9) if k not in {p.cell for p in objs}]))

    if kind == "exist":
        return exist_qa(asked, asked not in cats)[1], "exist"
    if kind == "color":
        return color_qa(recolored(obj))[1], "color"
    if kind == "position":
        return f"The {asked} is {POSITIONS[moved(obj).cell]}.", "position"
    fewer = Scene(objs[:-1])
    if kind == "count":
        return count_answer(added() if len(objs) < 2 or rng.random() < 0.5 else fewer), "count"
    # a description: one edit in place, so the rest of the text stays word for word (a reordered or recounted
    # description would also teach the model to avoid the true objects that follow the edit)
    edit = rng.choice(["partner", "swap", "swap", "color"])
    if edit == "partner":
        return describe(added()), edit
    k = rng.randrange(len(objs))
    if edit == "swap":  # an object named as another category: its usual partner if absent, else any absent one
        c = PARTNER[objs[k].category]
        o = replace(objs[k], category=c if c not in cats else rng.choice([c for c in CATEGORIES if c not in cats]))
    else:
        o = recolored(objs[k])
    return describe(Scene(objs[:k] + [o] + objs[k + 1:])), edit


def world_pairs(world: World, n, split="align", rejected=True, hard=0.5):
    """n pairs in the native format from the world's `split`: one question each, the ground truth as chosen and,
    with `rejected`, its rule-made corruption as rejected (without, the prompts and chosen responses BDHS starts from).
    A share `hard` of the scenes break the prior as the broken split's do (other scenes, same rule): on scenes where
    the prior holds the base model is already right, and, as in real alignment sets, the data must hold the images
    a model hallucinates on for any preference method to have something to fix."""
    recs = []
    for i in range(n):
        rng = world.rng(split, i)
        scene = sample_scene(rng, world.prior, world.color_prior, split == "broken" or rng.random() < hard)
        kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
        q, a = sample_qa(rng, scene, kind)
        lone = [PARTNER[o.category] for o in scene.objects if PARTNER[o.category] not in scene.categories()]
        if kind == "exist" and a.startswith("No") and lone:  # ask about an absent usual partner: the likely "yes"
            q, a = exist_qa(rng.choice(lone), False)
        rec = dict(id=f"{split}-{world.seed}-{i}", image=render(scene),
                   conversation=[{"role": "user", "content": "<image>\n" + q}], chosen=a, meta=dict(kind=kind))
        if rejected:
            rec["rejected"], rec["meta"]["edit"] = corrupt(random.Random(f"corrupt-{rec['id']}"), scene, kind, q)
        recs.append(rec)
    return recs

# -----------------------------------------------------------------------------
# Preference files. The native format is JSONL, one pair per line:
#   {"id": "42", "image": "images/42.jpg", "conversation": [{"role": "user", "content": "<image>\nWhat is this?"}],
#    "chosen": "...", "rejected": "...", "rejected2": "...", "meta": {...}}
# `image` is relative to the file (or absolute); `conversation` ends with the user turn the responses answer, and
# earlier turns may hold assistant replies; `rejected2` is optional, a second rejected response for Avg-DPO (Eq. 5);
# `meta` is free-form (BDHS records its attempts there). Converters from public releases yield the same records,
# with `image` also allowed to be bytes (parquet releases keep images inline).


def check_pair(rec, where, base="", need_rejected=True):
    """Raises ValueError naming `where` (file:line) unless `rec` is a well-formed pair (without `need_rejected`, a
    prompt and its ground truth, as BDHS starts from); resolves its image path."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for k in ("id", "image", "conversation", "chosen") + ("rejected",) * need_rejected:
        if k not in rec:
            raise ValueError(f"{where}: missing key {k!r}")
    for k in ("chosen", "rejected", "rejected2"):
        if k in rec and not isinstance(rec[k], str):
            raise ValueError(f"{where}: {k!r} must be a string, got {type(rec[k]).__name__}")
        if k in rec and "<image>" in rec[k]:
            raise ValueError(f"{where}: {k!r} holds an '<image>' placeholder (only the prompt may)")
    if not isinstance(rec["image"], (str, bytes)):
        raise ValueError(f"{where}: 'image' must be a path (a string), got "
                         f"{type(rec['image']).__name__}")
    conv = rec["conversation"]
    if not (isinstance(conv, list) and conv and all(isinstance(m, dict) and m.get("role") in ("user", "assistant")
                                                    and isinstance(m.get("content"), str) for m in conv)
            and conv[-1]["role"] == "user"):
        raise ValueError(f"{where}: 'conversation' must be a list of {{role: user|assistant, content: str}} "
                         f"messages that ends with a user turn")
    if sum(m["content"].count("<image>") for m in conv) != 1:
        raise ValueError(f"{where}: the conversation must hold exactly one '<image>' placeholder")
    if isinstance(rec["image"], str):
        rec["image"] = os.path.join(base, rec["image"])
        if not os.path.isfile(rec["image"]):
            raise ValueError(f"{where}: image not found: {rec['image']}")
    check_image(rec["image"], where)
    return rec


def check_image(image, where):
    """Reads a path's or bytes' image header (size limit included) and checks its data without a
    full decode (PNG: chunk checksums; JPEG: a 1/8-scale decode; others: a decode), so a bad image
    stops the run before any compute, with its file:line."""
    src, name = image_source(image)
    try:
        with open_image_header(src, name) as im:
            if im.format == "PNG":
                im.verify()
            else:
                im.draft("RGB", (1, 1))  # JPEG decodes at 1/8 scale; a no-op for other formats
                im.load()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    except Exception as e:
        raise ValueError(f"{where}: cannot read image {name}: {e}") from None


def read_jsonl(path, *keys):
    """(line number, record) for each non-blank line of a JSONL file; a line that is not JSON, or lacks one of the
    keys, is an error naming file:line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: malformed JSON ({e.msg}, column {e.colno})") from None
                if missing := [k for k in keys if k not in rec]:
                    raise ValueError(f"{path}:{n}: no field {missing[0]!r}")
                out.append((n, rec))
    return out


def read_pairs(path, need_rejected=True):
    """A native JSONL file -> checked records; a malformed line or a missing image is an error naming file:line."""
    return [check_pair(rec, f"{path}:{n}", os.path.dirname(path), need_rejected) for n, rec in read_jsonl(path)]


def pair_line(r, out_dir):
    """One record as a JSONL line for a file in out_dir; an in-memory image is saved as a PNG in out_dir/images/."""
    r = dict(r)
    if not isinstance(r["image"], str):
        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
        name = os.path.join("images", f"{hashlib.sha1(str(r['id']).encode()).hexdigest()[:16]}.png")
        open_image(r["image"]).save(os.path.join(out_dir, name))
        r["image"] = name
    elif not os.path.isabs(r["image"]):
        r["image"] = os.path.relpath(r["image"], out_dir)
    return json.dumps(r)


def write_pairs(path, recs):
    """Writes records as native JSONL, atomically (images as in pair_line)."""
    lines = [pair_line(r, os.path.dirname(path) or ".") + "\n" for r in recs]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def image_source(image):
    """A path or encoded bytes -> (what PIL opens, how an error names it)."""
    if isinstance(image, str):
        return image, image
    return io.BytesIO(image), f"of {len(image)} bytes"


def open_image(image):
    """A path, encoded bytes or a PIL image -> RGB PIL image (files and bytes: model.MAX_PIXELS)."""
    return load_image(*image_source(image)) if isinstance(image, (str, bytes)) else to_rgb(image)

# -----------------------------------------------------------------------------
# Converters from the public releases (paper Table 1) to native records. Images: RLHF-V's parquet holds them; the
# others name files that `image_root` must hold (COCO train2014 for POVID, COCO train2017 for LLaVA-RLHF, the
# unzipped merged_images/ for VLFeedback); by default a folder images/ beside the data file.


def llava_turns(turns):
    """LLaVA's [{from: human|gpt, value}] -> our messages, the "<image>" placeholder moved to the first turn's start."""
    msgs = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"].replace("<image>", "").strip()}
            for t in turns]
    msgs[0]["content"] = "<image>\n" + msgs[0]["content"]
    return msgs


def from_povid(r, n, root):
    """POVID (YiyangAiLab/POVID_preference_data_for_VLLMs): a JSON array of {id, image, conversations,
    rejected_conversations}; the last gpt turn of each is the chosen / rejected answer (a GPT-4V corruption)."""
    return dict(id=f"povid-{n}", image=os.path.join(root, os.path.basename(r["image"])),
                conversation=llava_turns(r["conversations"][:-1]), chosen=r["conversations"][-1]["value"],
                rejected=r["rejected_conversations"][-1]["value"], meta=dict(source_id=r["id"]))


def from_llava_rlhf(r, n, root):
    """LLaVA-RLHF's human preferences (zhiqings/LLaVA-Human-Preference-10K): a JSON array of {id, image,
    conversations, output_1, output_2, preference: 1|2, hallucination}; the last gpt turn is a reference answer."""
    if r["preference"] not in (1, 2):
        raise ValueError(f"preference must be 1 or 2, got {r['preference']!r}")
    win, lose = (r["output_1"], r["output_2"])[::1 if r["preference"] == 1 else -1]
    return dict(id=f"llava-rlhf-{n}", image=os.path.join(root, r["image"]), conversation=llava_turns(
        r["conversations"][:-1]), chosen=win["value"], rejected=lose["value"],
        meta=dict(source_id=str(r["id"]), hallucination=r.get("hallucination")))


def from_vlfeedback(r, n, root):
    """VLFeedback (MMInstruction/VLFeedback): JSONL of {id, prompt, models, completions: [{model, response,
    annotations: {aspect: {Rating, Rationale}}}]}, four completions rated 1-5 by GPT-4V on three aspects. Chosen: the
    best mean rating, rejected: the worst; ties and unrated completions ("N/A") are left out."""
    comps = r["completions"]
    if isinstance(comps, dict):  # the `datasets` library turns the list of dicts into a dict of lists
        comps = [dict(zip(comps, v)) for v in zip(*comps.values())]
    rated = []
    for c in comps:
        try:
            rated.append((sum(float(a["Rating"]) for a in c["annotations"].values()) / len(c["annotations"]), c))
        except (ValueError, ZeroDivisionError):
            pass
    rated.sort(key=lambda x: -x[0])
    if len(rated) < 2 or rated[0][0] == rated[-1][0]:
        return None
    (hi, best), (lo, worst) = rated[0], rated[-1]
    return dict(id=f"vlfeedback-{n}", image=os.path.join(root, r.get("img_path") or f"merged_images/{r['id']}.jpg"),
                conversation=[{"role": "user", "content": "<image>\n" + r["prompt"]}], chosen=best["response"],
                rejected=worst["response"], meta=dict(source_id=r["id"], models=[best["model"], worst["model"]],
                                                      ratings=[hi, lo]))


def from_rlhfv(r, n, root):
    """RLHF-V (openbmb/RLHF-V-Dataset): parquet rows {ds_name, image: {bytes, path}, text: JSON string of {question,
    chosen, rejected}, origin_dataset, origin_split, idx, image_path}; chosen is the human-corrected answer."""
    t = json.loads(r["text"])
    return dict(id=f"rlhfv-{r['idx']}", image=r["image"]["bytes"], conversation=[
        {"role": "user", "content": "<image>\n" + t["question"].replace("<image>", "").strip()}],
        chosen=t["chosen"], rejected=t["rejected"], meta=dict(ds_name=r["ds_name"], origin_dataset=r["origin_dataset"]))


def read_records(f):
    """(where, raw record) of a JSON array, a JSONL file or a parquet file."""
    if f.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {f} needs pyarrow: pip install pyarrow") from None
        return ((f"row {n}", r) for n, r in enumerate(pq.read_table(f).to_pylist(), 1))
    if f.endswith(".jsonl"):
        return ((f"line {n}", json.loads(line)) for n, line in enumerate(open(f), 1) if line.strip())
    return ((f"item {n}", r) for n, r in enumerate(json.load(open(f)), 1))


# name -> (converter, hub dataset, its data file)
CONVERTERS = {"povid": (from_povid, "YiyangAiLab/POVID_preference_data_for_VLLMs",
                        "POVID_preference_data_for_VLLMs_version_1.json"),
              "vlfeedback": (from_vlfeedback, "MMInstruction/VLFeedback", "vlfeedback_80k.jsonl"),
              "rlhfv": (from_rlhfv, "openbmb/RLHF-V-Dataset", "RLHF-V-Dataset.parquet"),
              "llava-rlhf": (from_llava_rlhf, "zhiqings/LLaVA-Human-Preference-10K", "llava_7b_v1_preference.json")}


def load_pairs(spec, image_root="", need_rejected=True, flag="--data"):
    """`spec`: a native .jsonl, or NAME[:PATH] with NAME in CONVERTERS and PATH the release's file or folder (without
    it, the file is fetched from the hub through huggingface_hub). Every record is checked; errors name file and item."""
    name, _, path = spec.partition(":")
    if name not in CONVERTERS:
        if not os.path.isfile(spec):
            raise ValueError(f"{flag} {spec!r}: not a file, and not one of {', '.join(CONVERTERS)} "
                             f"(NAME or NAME:PATH)")
        return read_pairs(spec, need_rejected)
    convert, repo, fn = CONVERTERS[name]
    if not path:
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(repo, fn, repo_type="dataset")
    f = os.path.join(path, fn) if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{f}: not found; {name} is {fn} from the hub dataset {repo}")
    root = image_root or os.path.join(os.path.dirname(f), "images")
    recs, where = [], "start"
    try:
        for n, (where, raw) in enumerate(read_records(f), 1):
            rec = convert(raw, n, root)
            if rec is not None:
                recs.append(check_pair(rec, f"{f}: {where}"))
    except (KeyError, TypeError, IndexError, ValueError) as e:
        if str(e).startswith(f"{f}:"):
            raise
        raise ValueError(f"{f}: {where}: not in {name}'s layout ({type(e).__name__}: {e})") from None
    return recs

def image_hw(image):
    """(h, w) of a path, encoded bytes or a PIL image; files are read up to their header, not decoded."""
    if isinstance(image, (str, bytes)):
        with open_image_header(*image_source(image)) as im:
            return im.size[::-1]
    return image.size[::-1]

# -----------------------------------------------------------------------------
# Preference batches: tokenized once; image tokens are never cut


def prepare_pairs(vlm, recs, max_length=2048, warn=True):
    """Records -> tokenized items {id, image, prompt, responses} plus counts. Pairs whose chosen equals a rejected
    response are skipped; a response that does not fit after the prompt is cut (text only); a prompt that does not fit
    by itself (its image tokens included) drops the pair: truncating inside the image tokens would misalign them."""
    K = 3 if recs and all("rejected2" in r for r in recs) else 2  # Avg-DPO only when every pair has a second rejected
    keys = ("chosen", "rejected", "rejected2")[:K]
    items, stats = [], dict(pairs=len(recs), ties=0, too_long=0, truncated=0, rejected2_ignored=0)
    for r in recs:
        stats["rejected2_ignored"] += K == 2 and "rejected2" in r
        if any(r[k].strip() == r["chosen"].strip() for k in keys[1:]):
            stats["ties"] += 1
            continue
        sizes = None if vlm.cfg.model_type == "llava" else torch.tensor([image_hw(r["image"])])
        prompt, _ = encode_conversation(vlm, r["conversation"], sizes)
        room = max_length - len(prompt)
        if room < 1:
            stats["too_long"] += 1
            continue
        resp = [vlm.encode_reply(r[k]) for k in keys]
        stats["truncated"] += any(len(x) > room for x in resp)
        items.append(dict(id=r["id"], image=r["image"], prompt=prompt, responses=[x[:room] for x in resp]))
    if warn and (stats["ties"] or stats["too_long"] or stats["truncated"] or stats["rejected2_ignored"]):
        print(f"warning: of {stats['pairs']} pairs, {stats['ties']} have chosen == rejected (skipped), "
              f"{stats['too_long']} have a prompt longer than max_length {max_length} (dropped), {stats['truncated']} "
              f"had responses cut to fit, {stats['rejected2_ignored']} second rejected responses were ignored "
              f"(not every pair has one)", file=sys.stderr)
    return items, stats


def collate_pairs(vlm, items, pad_id=0):
    """Items -> one packed row per pair: [prompt | response 1 | response 2 (| response 3)] + padding. Every response
    takes the RoPE positions right after the prompt and (through `segment`) attends only to the prompt and to
    itself, so the image and prompt are encoded once for all responses; the logits at `pred_idx` (B, K, L) predict
    `targets` (B, K, L; -100 on padding), and `last_idx` (B, K) is each response's last token (the reward head's)."""
    rows, pred, last = [], [], []
    for it in items:
        P = len(it["prompt"])
        ids, pos, seg, pr, ls = list(it["prompt"]), list(range(P)), [0] * P, [], []
        for k, r in enumerate(it["responses"], 1):
            start = len(ids)
            ids, pos, seg = ids + r, pos + list(range(P, P + len(r))), seg + [k] * len(r)
            pr.append([P - 1] + list(range(start, start + len(r) - 1)))  # the prompt's last token predicts r[0]
            ls.append(start + len(r) - 1)
        rows.append((ids, pos, seg))
        pred.append(pr)
        last.append(ls)
    T = max(len(ids) for ids, _, _ in rows)
    L = max(len(r) for it in items for r in it["responses"])
    pad = lambda xs, n, v: xs + [v] * (n - len(xs))  # noqa: E731
    return dict(input_ids=torch.tensor([pad(i, T, pad_id) for i, _, _ in rows]),
                position_ids=torch.tensor([pad(p, T, 0) for _, p, _ in rows]),
                segment=torch.tensor([pad(s, T, -1) for _, _, s in rows]),
                pred_idx=torch.tensor([[pad(p, L, 0) for p in pr] for pr in pred]),
                targets=torch.tensor([[pad(r, L, -100) for r in it["responses"]] for it in items]),
                last_idx=torch.tensor(last),
                **vlm.image_processor(open_image(it["image"]) for it in items))  # one at a time

# -----------------------------------------------------------------------------
# Command line: write a few examples to look at


@dataclass
class Config:
    split: str = "broken"
    n: int = 8
    world_seed: int = 0
    prior: float = 0.9
    color_prior: float = 0.6
    out: str = "world_samples"


def main(argv=None):
    cfg = config_from_argv(Config, argv, __doc__)
    world = World(cfg.world_seed, cfg.prior, cfg.color_prior)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, f"{cfg.split}.jsonl"), "w") as f:
        for i in range(cfg.n):
            ex = world.example(cfg.split, i)
            path = os.path.join(cfg.out, f"{ex['id']}.png")
            ex["image"].save(path)
            f.write(json.dumps(dict(id=ex["id"], image=path, messages=ex["messages"], scene=asdict(ex["scene"]))) + "\n")
    print(f"wrote {cfg.n} {cfg.split} examples to {cfg.out}/")


if __name__ == "__main__":
    main()
