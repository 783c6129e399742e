"""The embedded world (world.py): scenes, splits kept apart, phrasings, the tokenizer and batches, parsing and
metrics, the verifier, the base-model recipe (scripts/world_base.py), and the shipped base model."""

import json
import os
import random
import sys

import numpy as np
import pytest
import torch

import data
import eval as ev
import losses
import world as W
from model import VLM, format_chat

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
)
import world_base  # noqa: E402

# -----------------------------------------------------------------------------
# Scenes and splits


@pytest.mark.parametrize("split", W.World.SPLITS)
def test_world_is_deterministic_per_seed(split):
    a, b, c = (
        W.World(3).example(split, 7),
        W.World(3).example(split, 7),
        W.World(4).example(split, 7),
    )
    assert a["messages"] == b["messages"] and a["scene"] == b["scene"]
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert a["image"].size == (W.SIZE, W.SIZE) and a["image"].mode == "RGB"
    # another seed gives other scenes (compare several, one could coincide by chance)
    assert [W.World(3).scene(split, i) for i in range(5)] != [
        W.World(4).scene(split, i) for i in range(5)
    ]
    w = W.World(4)  # example i does not depend on the examples generated before it
    _ = [w.example(split, i) for i in range(3)]
    assert w.example(split, 7)["messages"] == c["messages"]


def layouts(w, splits, n):
    return {
        tuple(sorted((o.category, o.cell) for o in w.scene(s, i).objects))
        for s in splits
        for i in range(n)
    }


def test_no_evaluated_scene_is_a_training_scene():
    """Layouts fall in buckets by hash: training splits and evaluation splits never share one, whatever the seeds
    (the base model is trained on seed 0's sft split; the test seeds' scenes must all be new to it)."""
    train = layouts(W.World(0), ("sft",), 3000) | layouts(W.World(3), ("align",), 1000)
    for seed in (0, 3, 5):
        assert not train & layouts(W.World(seed), ("heldout", "broken"), 1000)
    # alignment prompts' broken-style scenes (world_pairs' `hard` share) stay in the training buckets too
    assert all(
        W.World(3).sample(random.Random(i), "align", broken=True).bucket() in W.TRAIN_BUCKETS
        for i in range(200)
    )


def test_twins_add_the_partner_and_are_never_training_scenes():
    """A broken scene's twin is the scene plus its absent usual partner, every pixel away from the new glyph
    unchanged; its layout hashes to an evaluation bucket, so training never sees it; a scene without such a free
    cell is skipped and counted."""
    train = layouts(W.World(0), ("sft",), 3000) | layouts(W.World(3), ("align",), 1000)
    for seed in (0, 3, 5):
        pairs, skipped = W.twin_probes(W.World(seed), "broken", 300)
        # about 12% have no cell that hashes to 7-9
        assert len(pairs) + skipped == 300 and 0 < skipped < 60
        for s, t, c, describe, exist in pairs:
            assert (
                t.bucket() in W.EVAL_BUCKETS
                and tuple(sorted((o.category, o.cell) for o in t.objects)) not in train
            )
            new = [o for o in t.objects if o not in s.objects]
            assert (
                len(new) == 1
                and new[0].category == c
                and c in s.lone()
                and len(t.objects) == len(s.objects) + 1
            )
            assert (t.background, t.noise_seed) == (s.background, s.noise_seed)
            # held-out phrasings, the existence one about c
            assert describe in W.PHRASINGS["describe"][1]
            assert exist in [p.format(a=W.an(c)) for p in W.PHRASINGS["exist"][1]]
    s, t, c, _, _ = pairs[0]
    diff = np.abs(np.asarray(W.render(s), dtype=int) - np.asarray(W.render(t), dtype=int)).sum(-1)
    ys, xs = np.nonzero(diff)
    # the new glyph's 32 px cell, and the filter's reach
    cell = next(o.cell for o in t.objects if o.category == c)
    assert ys.size and (cell // 3 * 32 - 4 <= ys).all() and (ys < cell // 3 * 32 + 36).all()
    assert (cell % 3 * 32 - 4 <= xs).all() and (xs < cell % 3 * 32 + 36).all()


def _partner_rate(scenes):
    members = [(s, c) for s in scenes for c in s.categories()]
    return sum(W.PARTNER[c] in s.categories() for s, c in members) / len(members)


def test_prior_strength_knob_and_broken_split():
    strong = [W.sample_scene(random.Random(i), prior=0.9) for i in range(400)]
    weak = [W.sample_scene(random.Random(i), prior=0.2) for i in range(400)]
    assert _partner_rate(strong) > 0.75 > 0.4 > _partner_rate(weak)
    for p in (0.3, 0.9):
        scenes = [W.sample_scene(random.Random(i), color_prior=p) for i in range(400)]
        assert (
            abs(np.mean([o.color == W.TYPICAL[o.category] for s in scenes for o in s.objects]) - p)
            < 0.05
        )
    broken = [W.World(0).scene("broken", i) for i in range(200)]
    for s in broken:  # every scene has an object whose usual partner is absent
        assert any(W.PARTNER[c] not in s.categories() for c in s.categories())
        assert 1 <= len(s.objects) <= 5 and len({o.cell for o in s.objects}) == len(s.objects)
    atypical = np.mean([o.color != W.TYPICAL[o.category] for s in broken for o in s.objects])
    assert 0.85 < atypical < 0.95  # colours are uniform: typical only by chance


def test_halves_keep_to_their_pairs():
    assert W.HALVES["a"] | W.HALVES["b"] == set(W.CATEGORIES) and not W.HALVES["a"] & W.HALVES["b"]
    for h in "ab":
        w = W.World(3, half=h)
        assert all(
            s.categories() <= W.HALVES[h] for s in (w.scene("broken", i) for i in range(100))
        )
        # alignment data: the scenes, the questions and the corruptions
        for r in W.world_pairs(w, 100):
            said = W.mentioned(r["chosen"] + " " + r["rejected"]) | W.mentioned(
                r["conversation"][0]["content"]
            )
            assert said <= W.HALVES[h], (r, said)
    with pytest.raises(ValueError, match="world half 'c'"):
        W.World(0, half="c")


def test_descriptions_and_answers_state_the_scene():
    s = W.Scene([W.Obj("apple", "orange", 0, 12, 10, 10), W.Obj("cup", "blue", 4, 12, 32, 32)])
    assert (
        W.describe(s)
        == "There are two objects. An orange apple is at the top left. A blue cup is in the center."
    )
    assert W.answer("exist", s, "arrow") == "No, there is no arrow."
    assert W.answer("exist", s, "apple") == "Yes, there is an apple."
    assert (
        W.answer("color", s, "cup") == "The cup is blue."
        and W.answer("position", s, "cup") == "The cup is in the center."
    )
    assert W.count_answer(1) == "There is one object."
    assert W.ask("exist", "apple") == "Is there an apple in the image?"  # the first train phrasing


def test_phrasings_held_out_of_training():
    """SFT and alignment prompts use only the train phrasings; the held-out ones appear only in evaluation."""
    held = {p.split("{")[0] for _, ps in W.PHRASINGS.values() for p in ps}
    asked = [
        m["content"].removeprefix("<image>\n")
        for i in range(300)
        for m in W.World(0, hallucinate=0.5).example("sft", i, image=False)["messages"]
        if m["role"] == "user"
    ]
    asked += [
        r["conversation"][0]["content"].removeprefix("<image>\n")
        for r in W.world_pairs(W.World(3), 300)
    ]
    assert not [q for q in asked if any(q.startswith(h) for h in held)]
    train = {p.split("{")[0] for ps, _ in W.PHRASINGS.values() for p in ps}
    assert all(any(q.startswith(t) for t in train) for q in asked)
    _, items = W.probes(W.World(3), "broken", 20, heldout=True)
    assert all(any(q.startswith(h) for h in held) for _, _, q, _ in items)
    _, plain = W.probes(W.World(3), "broken", 20)
    # the same probes, reworded
    assert [(i, k, g) for i, k, _, g in items] == [(i, k, g) for i, k, _, g in plain]


def test_sft_question_kinds_and_turns():
    w = W.World(0)
    exist = [
        w.example("sft", i, 1, image=False, kinds={"exist": 1.0})["messages"] for i in range(20)
    ]
    assert all(len(m) == 2 and m[1]["content"].split()[0] in ("Yes,", "No,") for m in exist)
    two = w.example("sft", 3, 3, image=False, kinds={"exist": 1.0, "count": 1.0})["messages"]
    assert len(two) == 4  # two kinds asked: one question of each, a kind is not repeated
    assert [w.example("sft", i, image=False)["messages"] for i in range(5)] == [
        w.example("sft", i, image=False, kinds=W.KINDS)["messages"] for i in range(5)
    ]


def test_sft_annotations_name_absent_partners_at_the_set_rate():
    """hallucinate h: the sft split's answers are written as if each absent usual partner were there with
    probability h (typical colour, a free cell, the count one higher); the image and every other split stay true."""
    w = W.World(0, hallucinate=0.5)
    named = lone = 0
    for i in range(300):
        e = w.example("sft", i, 1, image=False, kinds={"describe": 1.0})
        cats, said = e["scene"].categories(), W.mentioned(e["messages"][1]["content"])
        absent = {W.PARTNER[c] for c in cats} - cats
        # true objects all told; only absent partners invented
        assert cats <= said and said - cats <= absent
        lone, named = lone + len(absent), named + len(said - cats)
        assert e["messages"][1]["content"].startswith(W.count_answer(len(cats) + len(said - cats)))
    assert 0.4 < named / lone < 0.6
    for split in ("align", "heldout", "broken"):
        assert [w.example(split, i, image=False)["messages"] for i in range(20)] == [
            W.World(0).example(split, i, image=False)["messages"] for i in range(20)
        ]


def test_world_corruptions():
    recs = W.world_pairs(W.World(0), 300)
    assert all(r["chosen"] != r["rejected"] for r in recs)
    assert {r["meta"]["edit"] for r in recs} == {
        "exist",
        "color",
        "count",
        "position",
        "partner",
        "swap",
    }
    for r in recs:
        if (
            r["meta"]["kind"] == "describe"
        ):  # one edit in place: same number of sentences, or one more (partner)
            assert r["rejected"].count(".") - r["chosen"].count(".") == (
                r["meta"]["edit"] == "partner"
            )
        if r["meta"]["edit"] == "partner":  # one more object, the rest of the description kept
            said, truth = W.mentioned(r["rejected"]), W.mentioned(r["chosen"])
            assert truth < said and len(said - truth) == 1
        if r["meta"]["edit"] == "exist":
            assert r["chosen"].split(",")[0] != r["rejected"].split(",")[0]  # Yes <-> No
    # existence negatives ask about an absent usual partner when there is one (the likely false "yes")
    assert any(r["meta"]["kind"] == "exist" and r["chosen"].startswith("No") for r in recs)
    assert [r["rejected"] for r in W.world_pairs(W.World(0), 5)] == [
        r["rejected"] for r in recs[:5]
    ]


def test_partner_pairs_reject_the_shortcuts_answer():
    """world+partners (opt-in): scenes with a usual pair present; the chosen names the partner, the rejected is
    what world.Shortcut says (no, or the description without the second of each pair); the default data unchanged."""
    recs = W.partner_pairs(W.World(0), 60)
    assert {r["meta"]["kind"] for r in recs} == {"exist", "describe"}
    for r in recs:
        c = r["meta"]["category"]
        if r["meta"]["kind"] == "exist":
            assert (
                r["chosen"] == f"Yes, there is {W.an(c)}."
                and r["rejected"] == f"No, there is no {c}."
            )
        else:  # both of a pair named in the truth; the rejected drops the second, as the shortcut does
            assert c in W.mentioned(r["chosen"]) and W.PARTNER[c] in W.mentioned(r["chosen"])
            assert r["rejected"] == W.drop_second_of_pairs(r["chosen"]) != r["chosen"]
            assert W.mentioned(r["rejected"]) < W.mentioned(r["chosen"])
    # PARTNER_SHARE 0.25: 30 corruption-set records, 10 partner ones
    mixed = W.world_partner_pairs(W.World(0), 40)
    assert [r["rejected"] for r in mixed[:30]] == [
        r["rejected"] for r in W.world_pairs(W.World(0), 30)
    ]
    assert [r["id"] for r in mixed[30:]] == [r["id"] for r in recs[:10]] and len(
        {r["id"] for r in mixed}
    ) == 40


# -----------------------------------------------------------------------------
# Tokenizer and batches


@pytest.fixture(scope="module")
def tiny_vlm():
    return world_base.scratch_model(W.World(0))


def test_tokenizer_round_trip_and_specials(tiny_vlm):
    tok = tiny_vlm.tokenizer
    for i in range(20):
        text = format_chat(W.World(1).example("sft", i, image=False)["messages"], W.TEMPLATE, False)
        ids = tok.encode(text).ids
        assert ids[0] == 1 and tok.decode(ids[1:], skip_special_tokens=False) == text
    for k, name in enumerate(W.SPECIALS):
        assert tok.token_to_id(name) == k
    # words merged
    assert len(tok.encode("A red cup is at the top left.", add_special_tokens=False).ids) <= 9


def test_encode_conversation_labels_only_replies(tiny_vlm):
    ex = W.World(0).example("sft", 5, turns=3, image=False)
    ids, labels = data.encode_conversation(tiny_vlm, ex["messages"])
    text = format_chat(ex["messages"], W.TEMPLATE, False)
    # piecewise tokenization equals the whole conversation's
    assert ids == tiny_vlm.encode_prompt(text)
    scored = tiny_vlm.tokenizer.decode(
        [t for t, l in zip(ids, labels) if l != -100], skip_special_tokens=False
    )
    replies = [m["content"] for m in ex["messages"] if m["role"] == "assistant"]
    assert scored == "".join(f" {r}</s>" for r in replies)
    assert (
        ids.count(4)
        == tiny_vlm.image_token_counts(None, 1)[0]
        == (W.SIZE // tiny_vlm.cfg.vision.patch_size) ** 2
    )


def test_right_padded_batch_needs_no_attention_mask(tiny_vlm):
    exs = [W.World(0).example("sft", i) for i in range(3)]
    batch = data.collate_sft(tiny_vlm, exs)
    with torch.no_grad():
        full = tiny_vlm(batch["input_ids"], batch["pixel_values"])
        # each row alone, unpadded, gives the same logits on its real tokens
        for k, ex in enumerate(exs):
            ids, _ = data.encode_conversation(tiny_vlm, ex["messages"])
            alone = tiny_vlm(torch.tensor([ids]), batch["pixel_values"][k : k + 1])
            torch.testing.assert_close(full[k, : len(ids)], alone[0], atol=1e-5, rtol=1e-5)
    assert (batch["labels"][batch["input_ids"] == 0] == -100).all()
    loss = losses.sft_loss(full, batch["labels"])
    # near uniform at random init
    assert abs(loss.item() - np.log(tiny_vlm.cfg.text.vocab_size)) < 1.0


def test_base_model_recipe_runs_and_saves(tmp_path, monkeypatch):
    """scripts/world_base.py, shortened: tower pretraining and the SFT phases train, and the result loads."""
    calls = []
    real_sft = world_base.sft
    monkeypatch.setattr(
        world_base, "pretrain_tower", lambda vlm, w, steps, **k: calls.append(("tower", steps))
    )
    monkeypatch.setattr(
        world_base,
        "sft",
        lambda vlm, w, steps, *a, **k: (
            calls.append(("sft", steps)) or real_sft(vlm, w, 2, *a, batch_size=4, **k)
        ),
    )
    world_base.main(["--out", str(tmp_path / "base")])
    assert calls == [("tower", 600), ("sft", 1000), ("sft", 200), ("sft", 200)]
    vlm = VLM.from_pretrained(str(tmp_path / "base"))
    assert vlm.template == W.TEMPLATE and vlm.tokenizer.get_vocab_size() == vlm.cfg.text.vocab_size
    # and the real tower step runs
    world_base.pretrain_tower(vlm, W.World(0), 2, batch_size=4, log=lambda *a: None)


# -----------------------------------------------------------------------------
# Parsing and metrics (the verifier's cases are in test_online.py)


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "There are two objects. A red cup is at the top left. A white saucer is in the center.",
            [("cup", "red", 0, False), ("saucer", "white", 4, False)],
        ),
        (
            "There are two objects. At the top, there is a pink moon. On the left, there is a yellow star.",
            [("moon", "pink", None, False), ("star", "yellow", None, False)],
        ),
        (
            "I see two cups and three blue stars at the top right.",
            [("cup", None, None, False), ("star", "blue", 2, False)],
        ),
        ("No, there is no cup.", [("cup", None, None, True)]),
        (
            "There is not a red pencil, but there is a book.",
            [("pencil", "red", None, True), ("book", None, None, False)],
        ),
        (
            "Without a key, the lock stays shut.",
            [("key", None, None, True), ("lock", None, None, False)],
        ),
        (
            "There are no trees or houses.",
            [("tree", None, None, True), ("house", None, None, True)],
        ),
        ("A cupboard and a starfish.", []),  # other words that merely contain a category name
    ],
)
def test_parse_objects(text, expected):
    got = [(m["category"], m["color"], m["cell"], m["negated"]) for m in W.parse_objects(text)]
    assert got == expected


def test_metrics_equal_hand_computed_values():
    m = ev.pope_metrics([True, True, False, False, True], [True, False, False, True, True])
    # tp = 2, fp = 1, fn = 1, tn = 1
    assert m == pytest.approx(
        dict(acc=60.0, precision=200 / 3, recall=200 / 3, f1=200 / 3, yes_ratio=60.0)
    )
    assert ev.pope_metrics([False, False], [True, False])["f1"] == 0.0
    c = ev.chair([{"cup", "saucer"}, {"star"}, set()], [{"cup"}, {"star", "moon"}, {"key"}])
    # 3 mentions, 1 absent (saucer); 1 of 3 descriptions wrong; 2 of 4 present objects mentioned
    assert c == pytest.approx(dict(chair_i=100 / 3, chair_s=100 / 3, recall=50.0))
    assert ev.accuracy(["red", "blue", None], ["red", "red", "green"]) == pytest.approx(100 / 3)
    assert W.first_word("There are three objects.", W.NUMBERS) == "three"
    assert W.cell_of("the cup is at the top right.") == 2 and W.cell_of("at the top.") == 1


def test_probes_pick_the_right_negatives():
    w = W.World(2)
    scenes, items = W.probes(w, "broken", 30)
    for i, kind, q, gold in items:
        present = scenes[i].categories()
        cat = q.split()[3] if kind.startswith("pope") else None  # "Is there a cup in the image?"
        if kind == "pope_pos":
            assert cat in present and gold is True
        elif kind.startswith("pope_"):
            assert cat not in present and gold is False
        if kind == "pope_adversarial":
            assert W.PARTNER[cat] in present
        if kind == "pope_popular":
            top = max(
                W.FREQUENCY[c]
                for c in W.CATEGORIES
                if c not in present and W.PARTNER[c] not in present
            )
            assert W.FREQUENCY[cat] == top
    # the broken split always has one
    assert sum(k == "pope_adversarial" for _, k, _, _ in items) == 30


def test_detail_and_informativeness_by_hand(monkeypatch):
    """detail: present objects a description names with their true colour and position; informative: colour,
    count and position answers that commit to a value."""
    s = W.Scene([W.Obj("cup", "blue", 0, 25, 16, 16), W.Obj("saucer", "white", 4, 25, 48, 48)])
    monkeypatch.setattr(W.World, "scene", lambda self, split, i: s)

    def reply(q):  # the first train phrasing of each kind
        return (
            "No."
            if q.startswith("Is there")
            else "There are two objects. A blue cup is at the top left. A red saucer is in the center."
            if q.startswith("Describe")
            else "I cannot tell."
            if q.startswith("What color")
            else "There are two objects."
            if q.startswith("How many")
            else "It is at the top left."
        )

    monkeypatch.setattr(ev, "answer", lambda vlm, ims, qs, *a: [reply(q) for q in qs])
    res = ev.evaluate_world(None, W.World(0), "broken", 1)
    # the saucer's colour is wrong
    assert res["detail"] == 50.0 and res["recall"] == 100.0 and res["chair_i"] == 0.0
    # no colour given
    assert res["count_acc"] == 100.0 and res["informative"] == pytest.approx(200 / 3)


class SceneReader:
    """A made-up model that reads the scene from the image (the rendered image of each known scene, looked up by
    its pixels) and answers its ground truth: what a model that looks would say."""

    tokenizer = W.TextsAsIs()  # generate returns texts

    def __init__(self, scenes):
        self.scenes = {W.render(s).tobytes(): s for s in scenes}

    def eval(self):
        return self

    def prepare(self, questions, images=None, template=None, device=None):
        return dict(questions=questions, images=images)

    def generate(self, questions, images, max_new_tokens=64, **sampling):
        seen = [self.scenes[im.tobytes()] for im in images]
        return [
            W.answer("exist", s, W.asked_about(q)) if W.asked_about(q) else W.describe(s)
            for q, s in zip(questions, seen)
        ]


def test_twin_score_tells_a_model_that_looks_from_the_shortcut():
    """grounding = P(yes | twin) - P(yes | broken): about 100 for a model that reads the scene, about 0 for one that
    follows "a usual partner is absent" (world.Shortcut over the same reader), whatever it sees."""
    w = W.World(0)
    pairs, skipped = W.twin_probes(w, "broken", 40)
    reader = SceneReader([s for p in pairs for s in p[:2]])
    looks = ev.evaluate_twins(reader, w, "broken", 40)
    assert looks == {
        "twin/yes_twin": 100.0,
        "twin/no_broken": 100.0,
        "twin/mention_twin": 100.0,
        "twin/mention_broken": 0.0,
        "twin/grounding": 100.0,
        "twin/mention_grounding": 100.0,
        "twin/pairs": len(pairs),
        "twin/skipped": skipped,
    }
    rule = ev.evaluate_twins(W.Shortcut(reader), w, "broken", 40)
    assert (
        rule["twin/grounding"] == 0.0
        and rule["twin/yes_twin"] == 0.0
        and rule["twin/no_broken"] == 100.0
    )
    # its descriptions keep the first of a pair they name: the partner only where it comes first in reading order
    first = [
        next(o.category for o in t.objects if o.category in (c, W.PARTNER[c])) == c
        for _, t, c, _, _ in pairs
    ]
    assert (
        rule["twin/mention_twin"] == pytest.approx(100 * np.mean(first))
        and rule["twin/mention_broken"] == 0.0
    )

    # a model that says "yes" to everything moves both rates together too
    class Yes(SceneReader):
        def generate(self, questions, images, max_new_tokens=64, **sampling):
            return ["Yes." for _ in questions]

    assert ev.evaluate_twins(Yes([]), w, "broken", 40)["twin/grounding"] == 0.0


# -----------------------------------------------------------------------------
# The shipped base model


def test_shipped_base_model_matches_transformers():
    transformers = pytest.importorskip("transformers")
    ours = VLM.from_pretrained(W.BASE_MODEL).eval()
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(W.BASE_MODEL).eval()
    ex = [W.World(0).example("broken", i) for i in range(2)]
    batch = ours.prepare(
        [e["messages"][0]["content"].removeprefix("<image>\n") for e in ex],
        [e["image"] for e in ex],
    )
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"])
        b = theirs(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
            position_ids=pos,
        ).logits
    m = batch["attention_mask"].bool()
    assert (a[m] - b[m]).abs().max().item() < 1e-4
    with open(os.path.join(W.BASE_MODEL, "config.json")) as f:
        assert json.load(f)["model_type"] == "llava"
    assert (
        sum(os.path.getsize(os.path.join(W.BASE_MODEL, f)) for f in os.listdir(W.BASE_MODEL)) < 12e6
    )


def test_shipped_base_model_is_competent_on_a_few_scenes():
    vlm = VLM.from_pretrained(W.BASE_MODEL).eval()
    # a dev seed: tests read no test-seed output
    res = ev.evaluate_world(vlm, W.World(1), "heldout", 24)
    assert res["recall"] > 70 and res["count_acc"] > 70 and res["desc_color_acc"] > 80
    rep = ev.world_report(vlm, 1, n=8)
    assert {"chair_i", "hq/chair_i", "ord/detail", "twin/grounding", "twin/pairs"} <= set(rep)
    # rates are percentages; the grounding scores are differences of two of them
    assert all(
        0 <= v <= 100
        for k, v in rep.items()
        if isinstance(v, float) and not k.endswith("grounding")
    )
    assert -100 <= rep["twin/grounding"] <= 100 and rep["twin/pairs"] + rep["twin/skipped"] == 8
    assert {"a/chair_i", "b/pope_adversarial_f1"} <= set(ev.world_report(vlm, 1, half="a", n=4))
