"""The embedded world, its tokenizer and batches, the world metrics, and the shipped base model."""
import json
import os

import numpy as np
import pytest
import torch

import data
import eval as ev
import losses
from model import VLM, format_chat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -----------------------------------------------------------------------------
# The world


@pytest.mark.parametrize("split", data.World.SPLITS)
def test_world_is_deterministic_per_seed(split):
    a, b, c = data.World(3).example(split, 7), data.World(3).example(split, 7), data.World(4).example(split, 7)
    assert a["messages"] == b["messages"] and a["scene"] == b["scene"]
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert a["image"].size == (data.SIZE, data.SIZE) and a["image"].mode == "RGB"
    # another seed gives other scenes (compare several, one could coincide by chance)
    assert [data.World(3).scene(split, i) for i in range(5)] != [data.World(4).scene(split, i) for i in range(5)]
    # example i does not depend on the examples generated before it
    w = data.World(4)
    _ = [w.example(split, i) for i in range(3)]
    assert w.example(split, 7)["messages"] == c["messages"]


def _partner_rate(scenes):
    pair_members = [(s, c) for s in scenes for c in s.categories()]
    return sum(data.PARTNER[c] in s.categories() for s, c in pair_members) / len(pair_members)


def test_prior_strength_knob_and_broken_split():
    strong = [data.sample_scene(data.random.Random(i), prior=0.9) for i in range(400)]
    weak = [data.sample_scene(data.random.Random(i), prior=0.2) for i in range(400)]
    assert _partner_rate(strong) > 0.75 > 0.4 > _partner_rate(weak)
    for p in (0.3, 0.9):
        scenes = [data.sample_scene(data.random.Random(i), color_prior=p) for i in range(400)]
        assert abs(np.mean([o.color == data.TYPICAL[o.category] for s in scenes for o in s.objects]) - p) < 0.05
    broken = [data.World(0).scene("broken", i) for i in range(200)]
    for s in broken:  # every scene has an object whose usual partner is absent
        assert any(data.PARTNER[c] not in s.categories() for c in s.categories())
        assert 1 <= len(s.objects) <= 5 and len({o.cell for o in s.objects}) == len(s.objects)
    atypical = np.mean([o.color != data.TYPICAL[o.category] for s in broken for o in s.objects])
    assert 0.85 < atypical < 0.95  # colours are uniform: typical only by chance


def test_descriptions_and_answers_state_the_scene():
    s = data.Scene([data.Obj("apple", "orange", 0, 12, 10, 10), data.Obj("cup", "blue", 4, 12, 32, 32)])
    assert data.describe(s) == ("There are two objects. An orange apple is at the top left. "
                                "A blue cup is in the center.")
    assert data.exist_qa("arrow", True) == ("Is there an arrow in the image?", "Yes, there is an arrow.")
    assert data.exist_qa("cup", False)[1] == "No, there is no cup."
    assert data.count_answer(data.Scene(s.objects[:1])) == "There is one object."
    assert len(data.CATEGORIES) >= 12 and set(data.TYPICAL) == set(data.CATEGORIES)

# -----------------------------------------------------------------------------
# Tokenizer and batches


@pytest.fixture(scope="module")
def tiny_vlm():
    from train_offline import Config, scratch_model
    return scratch_model(Config())


def test_tokenizer_round_trip_and_specials(tiny_vlm):
    tok = tiny_vlm.tokenizer
    for i in range(20):
        text = format_chat(data.World(1).example("sft", i, image=False)["messages"], data.TEMPLATE, False)
        ids = tok.encode(text).ids
        assert ids[0] == 1 and tok.decode(ids[1:], skip_special_tokens=False) == text
    for k, name in enumerate(data.SPECIALS):
        assert tok.token_to_id(name) == k
    assert len(tok.encode("A red cup is at the top left.", add_special_tokens=False).ids) <= 9  # words merged


def test_encode_conversation_labels_only_replies(tiny_vlm):
    ex = data.World(0).example("sft", 5, turns=3, image=False)
    ids, labels = data.encode_conversation(tiny_vlm, ex["messages"])
    text = format_chat(ex["messages"], data.TEMPLATE, False)
    assert ids == tiny_vlm.encode_prompt(text)  # piecewise tokenization equals the whole conversation's
    scored = tiny_vlm.tokenizer.decode([t for t, l in zip(ids, labels) if l != -100], skip_special_tokens=False)
    replies = [m["content"] for m in ex["messages"] if m["role"] == "assistant"]
    assert scored == "".join(f" {r}</s>" for r in replies)
    assert ids.count(4) == tiny_vlm.image_token_counts(None, 1)[0] == (data.SIZE // tiny_vlm.cfg.vision.patch_size) ** 2


def test_right_padded_batch_needs_no_attention_mask(tiny_vlm):
    exs = [data.World(0).example("sft", i) for i in range(3)]
    batch = data.collate(tiny_vlm, exs)
    with torch.no_grad():
        full = tiny_vlm(batch["input_ids"], batch["pixel_values"])
        for k, ex in enumerate(exs):  # each row alone, unpadded, gives the same logits on its real tokens
            ids, _ = data.encode_conversation(tiny_vlm, ex["messages"])
            alone = tiny_vlm(torch.tensor([ids]), batch["pixel_values"][k:k + 1])
            torch.testing.assert_close(full[k, :len(ids)], alone[0], atol=1e-5, rtol=1e-5)
    assert (batch["labels"][batch["input_ids"] == 0] == -100).all()
    loss = losses.sft_loss(full, batch["labels"])
    assert abs(loss.item() - np.log(tiny_vlm.cfg.text.vocab_size)) < 1.0  # near uniform at random init

# -----------------------------------------------------------------------------
# Parsing and metrics


@pytest.mark.parametrize("text,expected", [
    ("There are two objects. A red cup is at the top left. A white saucer is in the center.",
     [("cup", "red", False), ("saucer", "white", False)]),
    ("There are two objects. At the top, there is a pink moon. On the left, there is a yellow star.",
     [("moon", "pink", False), ("star", "yellow", False)]),
    ("I see two cups and three blue stars.", [("cup", None, False), ("star", "blue", False)]),
    ("No, there is no cup.", [("cup", None, True)]),
    ("There is not a red pencil, but there is a book.", [("pencil", "red", True), ("book", None, False)]),
    ("Without a key, the lock stays shut.", [("key", None, True), ("lock", None, False)]),
    ("An orange apple and a pear.", [("apple", "orange", False), ("pear", None, False)]),
    ("There are no trees or houses.", [("tree", None, True), ("house", None, True)]),
    ("The targets are pink; the arrow is not.", [("target", None, False), ("arrow", None, False)]),
    ("A cupboard and a starfish.", []),  # other words that merely contain a category name
])
def test_parse_objects(text, expected):
    got = [(m["category"], m["color"], m["negated"]) for m in ev.parse_objects(text)]
    assert got == expected


@pytest.mark.parametrize("text,yes", [("Yes, there is a cup.", True), ("No, there is no cup.", False),
                                      ("There is not a cup.", False), ("Yes", True), ("no.", False),
                                      ("Yes. No other objects.", True)])
def test_pope_answer_parsing(text, yes):
    assert ev.yes_no(text) is yes


def test_metrics_equal_hand_computed_values():
    m = ev.pope_metrics([True, True, False, False, True], [True, False, False, True, True])
    # tp = 2, fp = 1, fn = 1, tn = 1
    assert m == pytest.approx(dict(acc=60.0, precision=200 / 3, recall=200 / 3, f1=200 / 3, yes_ratio=60.0))
    assert ev.pope_metrics([False, False], [True, False])["f1"] == 0.0
    c = ev.chair([{"cup", "saucer"}, {"star"}, set()], [{"cup"}, {"star", "moon"}, {"key"}])
    # 3 mentions, 1 absent (saucer); 1 of 3 descriptions wrong; 2 of 4 present objects mentioned
    assert c == pytest.approx(dict(chair_i=100 / 3, chair_s=100 / 3, recall=50.0))
    assert ev.accuracy(["red", "blue", None], ["red", "red", "green"]) == pytest.approx(100 / 3)
    assert ev.first_word("There are three objects.", data.NUMBERS) == "three"


def test_probes_pick_the_right_negatives():
    w = data.World(2)
    scenes, items = ev.probes(w, "broken", 30)
    for i, kind, q, gold in items:
        present = scenes[i].categories()
        cat = q.split()[3]  # "Is there a cup in the image?"
        if kind == "pope_pos":
            assert cat in present and gold is True
        elif kind.startswith("pope_"):
            assert cat not in present and gold is False
        if kind == "pope_adversarial":
            assert data.PARTNER[cat] in present
        if kind == "pope_popular":
            top = max(data.FREQUENCY[c] for c in data.CATEGORIES if c not in present
                      and data.PARTNER[c] not in present)
            assert data.FREQUENCY[cat] == top
    assert sum(k == "pope_adversarial" for _, k, _, _ in items) == 30  # the broken split always has one

# -----------------------------------------------------------------------------
# The shipped base model


def test_shipped_base_model_matches_transformers():
    transformers = pytest.importorskip("transformers")
    ours = VLM.from_pretrained(data.BASE_MODEL).eval()
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(data.BASE_MODEL).eval()
    ex = [data.World(0).example("broken", i) for i in range(2)]
    batch = ours.prepare([e["messages"][0]["content"].removeprefix("<image>\n") for e in ex], [e["image"] for e in ex])
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"])
        b = theirs(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                   attention_mask=batch["attention_mask"], position_ids=pos).logits
    m = batch["attention_mask"].bool()
    assert (a[m] - b[m]).abs().max().item() < 1e-4
    with open(os.path.join(data.BASE_MODEL, "config.json")) as f:
        assert json.load(f)["model_type"] == "llava"
    assert sum(os.path.getsize(os.path.join(data.BASE_MODEL, f)) for f in os.listdir(data.BASE_MODEL)) < 12e6


def test_shipped_base_model_is_competent_on_a_few_scenes():
    vlm = VLM.from_pretrained(data.BASE_MODEL).eval()
    res = ev.evaluate_world(vlm, world_seed=5, split="heldout", n=24)
    assert res["recall"] > 70 and res["count_acc"] > 80 and res["desc_color_acc"] > 80
    for k in ev.KEYS:
        assert 0 <= res[k] <= 100


def test_sft_question_kinds_and_turns():
    w = data.World(0)
    exist = [w.example("sft", i, 1, image=False, kinds={"exist": 1.0})["messages"] for i in range(20)]
    assert all(len(m) == 2 and m[0]["content"].startswith("<image>\nIs there") for m in exist)
    assert {m[1]["content"].split()[0] for m in exist} == {"Yes,", "No,"}
    # three turns asked of two kinds: one question of each (a kind is not repeated within a conversation)
    two = w.example("sft", 3, 3, image=False, kinds={"exist": 1.0, "count": 1.0})["messages"]
    qs = [m["content"].split("\n")[-1] for m in two[::2]]
    assert len(qs) == 2 and sum(q.startswith("Is there") for q in qs) == 1 and sum(q in data.COUNT for q in qs) == 1
    assert [w.example("sft", i, image=False)["messages"] for i in range(5)] == \
        [w.example("sft", i, image=False, kinds=data.KINDS)["messages"] for i in range(5)]


def test_sft_annotations_name_absent_partners_at_the_set_rate():
    """--hallucinate h: the sft split's answers are written as if each absent usual partner were there with
    probability h (typical colour, a free cell, the count one higher); the image and every other split stay true."""
    w = data.World(0, hallucinate=0.5)
    named = lone = 0
    for i in range(300):
        e = w.example("sft", i, 1, image=False, kinds={"describe": 1.0})
        cats, said = e["scene"].categories(), ev.mentioned(e["messages"][1]["content"])
        absent = {data.PARTNER[c] for c in cats} - cats
        assert cats <= said and said - cats <= absent  # true objects all told; only absent partners invented
        lone, named = lone + len(absent), named + len(said - cats)
        told = len(e["scene"].objects) + len(said - cats)
        assert e["messages"][1]["content"].startswith(data.count_answer(data.Scene([None] * told)))
    assert 0.4 < named / lone < 0.6
    for split in ("align", "heldout", "broken"):
        assert [w.example(split, i, image=False)["messages"] for i in range(20)] == \
            [data.World(0).example(split, i, image=False)["messages"] for i in range(20)]
    assert [data.World(0, hallucinate=0.0).example("sft", i, image=False)["messages"] for i in range(20)] == \
        [data.World(0).example("sft", i, image=False)["messages"] for i in range(20)]


def test_train_offline_sft_two_steps(tmp_path):
    import train_offline
    train_offline.main(["--model", "scratch", "--loss", "sft", "--lora_r", "0", "--steps", "2", "--batch_size", "4",
                        "--vision_pretrain", "2", "--sft_kinds", "exist=1,describe=1", "--sft_turns", "1",
                        "--out_dir", str(tmp_path)])
    vlm = VLM.from_pretrained(str(tmp_path / "checkpoint"))
    assert vlm.template == data.TEMPLATE and vlm.tokenizer.get_vocab_size() == vlm.cfg.text.vocab_size
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [0, 1] and all(np.isfinite(r["loss"]) for r in recs)
