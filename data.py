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
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from model import TEMPLATES, config_from_argv, format_chat

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
NUMBERS = ["zero", "one", "two", "three", "four", "five"]
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

    def __init__(self, seed=0, prior=0.9, color_prior=0.6):
        self.seed, self.prior, self.color_prior = seed, prior, color_prior

    def rng(self, split, i):
        if split not in self.SPLITS:
            raise ValueError(f"unknown world split {split!r}; expected one of {self.SPLITS}")
        return random.Random(f"world-{self.seed}-{split}-{i}")

    def scene(self, split, i) -> Scene:
        return sample_scene(self.rng(split, i), self.prior, self.color_prior, split == "broken")

    def example(self, split, i, turns=None, image=True):
        """{"id", "scene", "image", "messages"}: sft examples have 1-3 turns, the others one."""
        rng = self.rng(split, i)
        scene = sample_scene(rng, self.prior, self.color_prior, split == "broken")
        n = turns or (rng.randint(1, 3) if split == "sft" else 1)
        kinds = []
        while len(kinds) < n:  # weighted, without repeats
            k = rng.choices(list(KINDS), list(KINDS.values()))[0]
            kinds += [k] if k not in kinds else []
        msgs = []
        for t, kind in enumerate(kinds):
            q, a = sample_qa(rng, scene, kind)
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


def encode_conversation(vlm, messages):
    """(ids, labels) of a whole conversation in the model's chat template; labels are -100 except on the replies
    (their end-of-turn token included). Pieces are tokenized one by one, so the split is exact; each "<image>" becomes
    one placeholder per image feature."""
    t = TEMPLATES[vlm.template]
    ids, labels = [], []
    for k, m in enumerate(messages):
        if m["role"] == "user":
            text, train = (t["system"] if k == 0 else "") + t["user"].format(m["content"]) + t["assistant"], False
        else:
            text, train = t["reply"].format(m["content"]), True
        piece = vlm.encode_prompt(text, add_special_tokens=k == 0)
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
