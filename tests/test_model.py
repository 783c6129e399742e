"""model.py against transformers on tiny random-weight checkpoints that transformers itself builds and saves."""

import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import world  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # noqa: E402
import hub  # noqa: E402
import model as M  # noqa: E402
from model import VLM, KVCache, load_image, parse_config, sample  # noqa: E402
from tiny import bomb_png, build_hf, build_llava_hf, hf_config, random_image  # noqa: E402

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "assets", "world-base")

# the architectures the issue names: LLaVA-1.5 (CLIP + Llama), llava-interleave-qwen (SigLIP + Qwen2),
# LLaVA-1.6 (AnyRes) on Vicuna/Llama and on Mistral
ARCHS = {
    "llava15": dict(),
    "interleave_qwen": dict(vision="siglip", text="qwen2", layer=-1),
    "next_llama": dict(model_type="llava_next"),
    "next_mistral": dict(model_type="llava_next", text="mistral"),
    # class token kept, two layers concatenated
    "clip_full_two_layers": dict(layer=[-3, -1], strategy="full"),
}
PROMPTS = [
    "USER: <image>\nWhat is this? ASSISTANT:",
    "USER: <image>\nDescribe the picture in detail, please. ASSISTANT:",
    "USER: <image>\nIs there a dog? ASSISTANT:",
]
SIZES = [(40, 70), (90, 30), (28, 28)]  # non-square both ways, and square


@pytest.fixture(scope="module", params=list(ARCHS))
def pair(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    hf, proc = build_hf(path, **ARCHS[request.param])
    return hf, proc, VLM.from_pretrained(path).eval(), path


def hf_inputs(proc, n=3, modes=("RGB", "RGBA", "L")):
    ims = [random_image(h, w, m, seed=i) for i, ((h, w), m) in enumerate(zip(SIZES[:n], modes))]
    return ims, proc(
        text=PROMPTS[:n], images=ims, return_tensors="pt", padding=True, padding_side="left"
    )


def positions(am):
    return (am.cumsum(-1) - 1).clamp(min=0)


def test_logits_match_transformers_on_padded_batch(pair):
    hf, proc, ours, _ = pair
    _, inp = hf_inputs(proc)
    am = inp["attention_mask"]
    assert (am == 0).any(), "the batch must be padded"
    with torch.no_grad():
        ref = hf(**inp, position_ids=positions(am)).logits
        got = ours(inp["input_ids"], inp["pixel_values"], inp.get("image_sizes"), am)
    assert got.shape == ref.shape
    assert (got - ref)[am.bool()].abs().max() <= 1e-4


def test_pixels_and_placeholder_ids_match_processor(pair):
    _, proc, ours, _ = pair
    modes = ("RGBA", "P", "CMYK")
    ims, inp = hf_inputs(proc, modes=modes)
    ours_pix = ours.image_processor(ims)
    assert ours_pix["pixel_values"].shape == inp["pixel_values"].shape
    assert (ours_pix["pixel_values"] - inp["pixel_values"]).abs().max() <= 1e-5
    sizes = ours_pix.get("image_sizes")
    for i, text in enumerate(PROMPTS):
        ids = ours.encode_prompt(text, None if sizes is None else sizes[i : i + 1])
        assert ids == inp["input_ids"][i][inp["attention_mask"][i].bool()].tolist()


def test_greedy_generate_matches_transformers(pair):
    hf, proc, ours, _ = pair
    _, inp = hf_inputs(proc)
    hf.generation_config.eos_token_id = None  # random weights: generate exactly 20 tokens in both
    hf.generation_config.pad_token_id = 0
    # our sampling never emits the head's rows past the tokenizer (20 here), <image> or <pad>; transformers'
    # suppress_tokens does the same: those logits -inf, the others as they are
    banned = ours.never_sampled().nonzero().flatten().tolist()
    with torch.no_grad():
        ref = hf.generate(**inp, max_new_tokens=20, do_sample=False, suppress_tokens=banned)
    ref = ref[:, inp["input_ids"].shape[1] :]
    got = ours.generate(
        inp["input_ids"],
        inp["attention_mask"],
        inp["pixel_values"],
        inp.get("image_sizes"),
        max_new_tokens=20,
        eos_token_id=[],
    )
    assert got == ref.tolist()


def test_round_trip_save_load(pair, tmp_path):
    hf, proc, ours, _ = pair
    _, inp = hf_inputs(proc)
    out = str(tmp_path / "ours")
    ours.save_pretrained(out)
    cls = type(hf)
    theirs = cls.from_pretrained(out).eval()
    again = VLM.from_pretrained(out).eval()
    am = inp["attention_mask"]
    with torch.no_grad():
        a = theirs(**inp, position_ids=positions(am)).logits
        b = ours(inp["input_ids"], inp["pixel_values"], inp.get("image_sizes"), am)
        c = again(inp["input_ids"], inp["pixel_values"], inp.get("image_sizes"), am)
    assert (a - b)[am.bool()].abs().max() <= 1e-4
    assert torch.equal(b, c)
    # the atomic write left nothing
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p or ".old" in p]


def test_kv_cache_decode_equals_full_recompute(pair):
    _, proc, ours, _ = pair
    _, inp = hf_inputs(proc)
    ids, am = inp["input_ids"], inp["attention_mask"]
    px, sz = inp["pixel_values"], inp.get("image_sizes")
    got = ours.generate(ids, am, px, sz, max_new_tokens=8, eos_token_id=[])
    feats = ours.encode_images(px, sz)
    with torch.no_grad():  # no cache: the whole sequence again at every step
        for _ in range(8):
            logits = ours(ids, attention_mask=am, image_features=feats)[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
    assert got == ids[:, -8:].tolist()


def test_cache_copy_equals_separate_prefills_and_forced_prefix(pair):
    _, proc, ours, _ = pair
    _, inp = hf_inputs(proc, n=2)
    ids, am, px, sz = (
        inp["input_ids"],
        inp["attention_mask"],
        inp["pixel_values"],
        inp.get("image_sizes"),
    )
    # 3 rows per prompt, ragged forced tokens
    prefix = [
        [],
        [40, 41],
        [42, 43, 44, 45],
        [46],
        [47, 48, 49],
        [],
    ]
    got = ours.generate(
        ids, am, px, sz, max_new_tokens=6, eos_token_id=[], num_samples=3, prefix_ids=prefix
    )
    rep = lambda t: None if t is None else t.repeat_interleave(3, 0)  # noqa: E731
    want = []
    # each row alone: its prompt + forced tokens, prefilled from scratch
    for r, p in enumerate(prefix):
        b = r // 3
        row_ids = torch.cat([ids[b][am[b].bool()], torch.tensor(p, dtype=torch.long)])[None]
        want += ours.generate(
            row_ids,
            None,
            px[b : b + 1],
            None if sz is None else sz[b : b + 1],
            max_new_tokens=6,
            eos_token_id=[],
        )
    assert got == want
    sep = ours.generate(rep(ids), rep(am), rep(px), rep(sz), max_new_tokens=6, eos_token_id=[])
    assert ours.generate(ids, am, px, sz, max_new_tokens=6, eos_token_id=[], num_samples=3) == sep


def test_image_key_mask(pair):
    _, proc, ours, _ = pair
    _, inp = hf_inputs(proc)
    ids, am, px, sz = (
        inp["input_ids"],
        inp["attention_mask"],
        inp["pixel_values"],
        inp.get("image_sizes"),
    )
    is_img = ids == ours.cfg.image_token_id
    other = torch.randn_like(px)
    with torch.no_grad():
        full = ours(ids, px, sz, am)
        hidden = ours(ids, px, sz, am, key_mask=~is_img)
        hidden2 = ours(ids, other, sz, am, key_mask=~is_img)
    text = am.bool() & ~is_img
    # nothing of the pixels reaches a text token
    assert (hidden - hidden2)[text].abs().max() <= 1e-5
    assert (full - hidden)[text].abs().max() > 1e-3  # and hiding really changed something
    first = is_img.float().argmax(1)  # positions before the image see no image key either way
    before = am.bool() & (torch.arange(ids.shape[1])[None] < first[:, None])
    assert before.any() and (full - hidden)[before].abs().max() == 0
    # honoured while decoding: different pixels, same tokens
    g1 = ours.generate(ids, am, px, sz, key_mask=~is_img, max_new_tokens=6, eos_token_id=[])
    g2 = ours.generate(ids, am, other, sz, key_mask=~is_img, max_new_tokens=6, eos_token_id=[])
    assert g1 == g2


def test_partial_key_mask_keeps_positions(pair):
    """Hiding one image key equals a forward in which that key's attention is removed by hand: positions unchanged."""
    _, proc, ours, _ = pair
    _, inp = hf_inputs(proc, n=1)
    ids, px, sz = inp["input_ids"], inp["pixel_values"], inp.get("image_sizes")
    k = int((ids[0] == ours.cfg.image_token_id).nonzero()[0])
    km = torch.ones_like(ids, dtype=torch.bool)
    km[0, k] = False
    with torch.no_grad():
        a = ours(ids, px, sz, key_mask=km)
        b = ours(ids, px, sz)
    # up to and including the hidden key: identical
    assert torch.allclose(a[0, : k + 1], b[0, : k + 1])
    assert (a[0, k + 1 :] - b[0, k + 1 :]).abs().max() > 0


def test_lora_off_merge_and_save(pair, tmp_path):
    hf, proc, ours, path = pair
    _, inp = hf_inputs(proc, n=2)
    vlm = VLM.from_pretrained(path).eval()
    args = (inp["input_ids"], inp["pixel_values"], inp.get("image_sizes"), inp["attention_mask"])
    with torch.no_grad():
        base = vlm(*args)
        M.add_lora(vlm, r=4, alpha=8)
        assert torch.allclose(vlm(*args), base)  # B = 0: the adapters start as the identity
        for n, p in vlm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        tuned = vlm(*args)
        assert (tuned - base).abs().max() > 1e-3
        with M.lora_disabled(vlm):
            assert torch.allclose(vlm(*args), base)
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad and "language_model" in n}
    assert trainable and all("lora_" in n or "embed" in n or "norm" in n for n in trainable)
    vlm.save_pretrained(str(tmp_path / "m"))  # adapters merged into the saved weights
    with torch.no_grad():
        assert torch.allclose(VLM.from_pretrained(str(tmp_path / "m"))(*args), tuned, atol=1e-5)


def test_a_bf16_base_with_fp32_adapters_and_projector(pair):
    """The training layout of --dtype bfloat16: the base in bf16, what trains in fp32. It runs with and without
    autocast (sampling runs without), and both give the same logits up to bf16 rounding."""
    _, proc, _, path = pair
    _, inp = hf_inputs(proc, n=2)
    vlm = VLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    M.add_lora(vlm, r=4, alpha=8)
    vlm.model.multi_modal_projector.float()
    assert {p.dtype for n, p in vlm.named_parameters() if "lora_" in n} == {torch.float32}
    args = (inp["input_ids"], inp["pixel_values"], inp.get("image_sizes"), inp["attention_mask"])
    with torch.no_grad():
        for n, p in vlm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        plain = vlm(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = vlm(*args)
    assert plain.dtype == amp.dtype == torch.bfloat16
    assert (plain.float() - amp.float()).abs().max() < 0.1 * amp.float().abs().max()


def test_missing_or_misshapen_tensor_is_named(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, _, path = pair
    sd = load_file(os.path.join(path, "model.safetensors"))
    victim = sorted(k for k in sd if "layers.1.mlp.down_proj" in k)[0]
    for case in ("missing", "shape", "extra"):
        d = tmp_path / case
        d.mkdir()
        for fn in ("config.json", "tokenizer.json"):
            (d / fn).write_text(open(os.path.join(path, fn)).read())
        bad = dict(sd)
        if case == "missing":
            del bad[victim]
        elif case == "shape":
            bad[victim] = torch.zeros(3, 3)
        else:
            bad["language_model.model.bogus.weight"] = torch.zeros(1)
        save_file(bad, str(d / "model.safetensors"))
        with pytest.raises(
            (KeyError, ValueError), match="bogus" if case == "extra" else "down_proj"
        ):
            VLM.from_pretrained(str(d))


def test_sharded_checkpoint_loads(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, proc, ours, path = pair
    sd = load_file(os.path.join(path, "model.safetensors"))
    keys = sorted(sd)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    for fn, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / fn))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: fn for fn, ks in shards.items() for k in ks}})
    )
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    vlm = VLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert vlm.lm_head.weight.dtype == torch.bfloat16
    _, inp = hf_inputs(proc, n=1)
    with torch.no_grad():
        a = vlm.float()(inp["input_ids"], inp["pixel_values"], inp.get("image_sizes"))
        b = ours(inp["input_ids"], inp["pixel_values"], inp.get("image_sizes"))
    assert (a - b).abs().max() < 0.1  # bf16 weights, fp32 compute


def test_corrupt_image_names_file(tmp_path):
    good = tmp_path / "ok.png"
    random_image(30, 30).save(good)
    assert load_image(str(good)).mode == "RGB"
    bad = tmp_path / "broken.png"
    bad.write_bytes(good.read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match="broken.png"):
        load_image(str(bad))
    with pytest.raises(ValueError, match="nothere.jpg"):
        load_image(str(tmp_path / "nothere.jpg"))


def test_both_config_and_key_layouts(tmp_path):
    """rope_theta (4.x) and rope_parameters (5.x) read the same; old and new key layouts map to one name."""
    a, b = hf_config(), hf_config()
    b["text_config"].pop("rope_theta")
    b["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert parse_config(a).text == parse_config(b).text
    for old, new in [
        (
            "language_model.model.layers.0.mlp.up_proj.weight",
            "model.language_model.layers.0.mlp.up_proj.weight",
        ),
        ("language_model.lm_head.weight", "lm_head.weight"),
        (
            "vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias",
            "model.vision_tower.encoder.layers.0.mlp.fc1.bias",
        ),
        (
            "model.vision_tower.vision_model.embeddings.class_embedding",
            "model.vision_tower.embeddings.class_embedding",
        ),
        ("multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.weight"),
        ("image_newline", "model.image_newline"),
    ]:
        assert hub.hf_name(old) == new
    bad = hf_config()
    bad["text_config"]["rope_scaling"] = {"rope_type": "yarn", "factor": 2.0}
    with pytest.raises(ValueError, match="rope_type"):
        parse_config(bad)


def test_sampling_rules():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0]]).repeat(500, 1)
    assert sample(logits).eq(1).all()  # temperature 0 is greedy
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {1, 2}
    # token 1 alone holds > 30%
    assert set(sample(logits, 1.0, top_p=0.3, generator=g).tolist()) == {1}
    a = sample(logits, 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, sample(logits, 1.0, generator=torch.Generator().manual_seed(7)))


def test_stop_strings_and_eos(pair):
    _, proc, ours, _ = pair
    _, inp = hf_inputs(proc, n=1)
    args = (inp["input_ids"], inp["attention_mask"], inp["pixel_values"], inp.get("image_sizes"))
    free = ours.generate(*args, max_new_tokens=12, eos_token_id=[])[0]
    text = ours.tokenizer.decode(free)
    stop = next((ch for ch in text[1:] if ch.strip()), None)
    cut = ours.generate(*args, max_new_tokens=12, eos_token_id=[], stop_strings=[stop])[0]
    assert stop in ours.tokenizer.decode(cut) and cut == free[: len(cut)] and len(cut) < len(free)
    # a token first seen at step i
    i = next((i for i in range(1, len(free)) if free[i] not in free[:i]), 0)
    # EOS ends and is dropped
    assert ours.generate(*args, max_new_tokens=12, eos_token_id=free[i])[0] == free[:i]


@pytest.fixture(scope="module", params=[("llama", torch.float32), ("mistral", torch.bfloat16)])
def padded(request, tmp_path_factory):
    """A llava-hf-shaped folder whose padded logit rows, <image> and <pad> are the likeliest at every step."""
    text, dtype = request.param
    path = str(tmp_path_factory.mktemp(f"llava_hf_{text}"))
    info = build_llava_hf(path, text=text, dtype=dtype)[2]
    return VLM.from_pretrained(path, dtype=dtype).eval(), info


def bad_ids(ids, info):
    """The sampled ids the rest of the code cannot handle: past the tokenizer, the image token, the pad token."""
    return [t for t in ids if t >= info["tokens"] or t in (info["image"], info["pad"])]


def test_never_sampled_holds_the_padded_rows_image_and_pad(padded):
    vlm, info = padded
    assert (
        vlm.tokenizer.get_vocab_size()
        == info["tokens"]
        < info["rows"]
        == vlm.lm_head.weight.shape[0]
    )
    want = set(range(info["tokens"], info["rows"])) | {info["image"], info["pad"]}
    assert set(vlm.never_sampled().nonzero().flatten().tolist()) == want
    assert vlm.eos_ids().isdisjoint(want)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(temperature=1.0),
        dict(temperature=1.0, top_k=3),
        dict(temperature=1.0, top_p=0.9),
        dict(temperature=0.7, top_k=20, top_p=0.5),
    ],
)
def test_sampling_never_emits_a_padded_row_image_or_pad_id(padded, kw):
    """Every sampling rule, several seeds, with the stop strings BDHS uses and several samples per prompt: no id
    that would index past the tokenizer's tables or be read as an image slot. The builder makes those ids the
    likeliest, so an unmasked sampler emits them at once."""
    vlm, info = padded
    batch = vlm.prepare(
        ["What is in the image?", "Describe the picture."],
        [random_image(40, 70, seed=0), random_image(90, 30, seed=1)],
    )
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        for stop in ((), (".",)):
            out = vlm.generate(
                **batch, max_new_tokens=10, generator=g, stop_strings=stop, num_samples=2, **kw
            )
            assert len(out) == 4 and all(out)
            assert [bad_ids(o, info) for o in out] == [[]] * 4, (seed, stop)
    # the masked ids are skipped, the rest untouched: greedy's first token is the best of the others
    with torch.no_grad():
        logits = vlm(**batch)[:, -1].float()
    logits[:, vlm.never_sampled()] = float("-inf")
    first = [o[0] for o in vlm.generate(**batch, max_new_tokens=1, eos_token_id=[])]
    assert first == logits.argmax(-1).tolist()


def test_eval_answers_on_a_padded_head_are_text(padded, monkeypatch):
    """eval.py's greedy answers sample no masked id, so they decode to text (unmasked: <image> after <image>,
    which decodes to nothing)."""
    import eval as ev

    vlm, info = padded
    sampled = []
    real_decode = M.decode

    def spy(*a, **kw):
        out = real_decode(*a, **kw)
        sampled.extend(t for o in out for t in o)
        return out

    monkeypatch.setattr(M, "decode", spy)
    ims = [random_image(40, 70, seed=0), random_image(90, 30, seed=1), random_image(28, 28, seed=2)]
    got = ev.answer(
        vlm,
        ims,
        ["Is there a dog?", "What is this?", "Describe it."],
        max_new_tokens=6,
        batch_size=2,
    )
    assert len(got) == 3 and all(a.strip() for a in got)
    assert sampled and not bad_ids(sampled, info)


def test_a_ranks_rows_are_read_from_the_file(tmp_path):
    """hub.read_tensor: a whole tensor, or rows [start, stop) of its first dimension (an FSDP2 rank's shard,
    possibly empty), in the file's dtype (bf16 included)."""
    from safetensors.torch import save_file

    ts = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5, 2).to(torch.bfloat16),
        "c": torch.arange(6).view(2, 3),
        "e": torch.zeros(0, 2),
    }
    save_file(ts, str(tmp_path / "t.safetensors"))
    with hub.open_weights(str(tmp_path / "t.safetensors")) as f:
        assert all(torch.equal(hub.read_tensor(f, k), v) for k, v in ts.items())
        assert torch.equal(hub.read_tensor(f, "b", (2, 4)), ts["b"][2:4])
        assert hub.read_tensor(f, "b", (5, 5)).shape == (0, 2)
        assert hub.read_tensor(f, "b", (0, 1)).dtype == torch.bfloat16


def test_cli_and_hub_id(pair, tmp_path, monkeypatch):
    """main() answers from a local folder; a hub id goes through huggingface_hub.snapshot_download."""
    import huggingface_hub
    import model

    _, _, _, path = pair
    img = tmp_path / "x.png"
    random_image(40, 50).save(img)
    calls = []
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append(repo) or path
    )
    text = model.main(
        ["--model", "someone/tiny-llava", "--image", str(img), "--max_new_tokens", "5"]
    )
    assert calls == ["someone/tiny-llava"] and isinstance(text, str)


def test_chat_templates():
    from model import format_chat

    q = [{"role": "user", "content": "<image>\nWhat is shown?"}]
    assert format_chat(q, "llava") == "USER: <image>\nWhat is shown? ASSISTANT:"  # llava-1.5-hf
    # llava-v1.6-mistral
    assert format_chat(q, "mistral") == "[INST] <image>\nWhat is shown? [/INST]"
    assert format_chat(q, "vicuna").startswith("A chat between") and format_chat(
        q, "vicuna"
    ).endswith("USER: <image>\nWhat is shown? ASSISTANT:")
    assert format_chat(q, "chatml").endswith(
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"
    )
    turns = q + [{"role": "assistant", "content": "A cup."}, {"role": "user", "content": "Colour?"}]
    assert (
        format_chat(turns, "llava")
        == "USER: <image>\nWhat is shown? ASSISTANT: A cup.</s>USER: Colour? ASSISTANT:"
    )


def test_causal_fast_path_equals_explicit_mask(pair):
    """An unpadded batch takes SDPA's is_causal path; a window wider than the input forces the explicit mask."""
    _, proc, ours, _ = pair
    _, inp = hf_inputs(proc, n=1)
    ids, px, sz = inp["input_ids"], inp["pixel_values"], inp.get("image_sizes")
    with torch.no_grad():
        a = ours(ids, px, sz)
        # any window forces the mask
        ours.cfg.text.sliding_window, sw = (
            10**6,
            ours.cfg.text.sliding_window,
        )
        b = ours(ids, px, sz)
        ours.cfg.text.sliding_window = sw
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("text,window", [("llama", None), ("mistral", 5)])
def test_flex_attention_equals_the_dense_mask(text, window, monkeypatch):
    """The packed forward through FlexAttention's block mask (CUDA's path; here eager, forward only) equals SDPA
    under attention_mask_4d: packed segments, padding at the left and the right, hidden keys (BDHS), GQA (4 query
    heads on 2 or 1 key heads), a sliding window narrower than the rows."""
    raw = hf_config(text=text)
    raw["text_config"]["sliding_window"] = window
    vlm = VLM.from_config(raw, seed=1).eval()
    assert vlm.cfg.text.num_key_value_heads < vlm.cfg.text.num_attention_heads
    # row 0: pads, a prompt of 6, responses of 4 and 3, pads; row 1: a prompt of 9, responses of 5, 2 and 3, then pads
    segment = torch.tensor(
        [
            [-1] * 4 + [0] * 6 + [1] * 4 + [2] * 3 + [-1] * 3,
            [0] * 9 + [1] * 5 + [2] * 2 + [3] * 3 + [-1],
        ]
    )
    ids = torch.randint(5, 300, segment.shape, generator=torch.Generator().manual_seed(0))
    hide = torch.ones_like(segment, dtype=torch.bool)
    hide[0, 5:8] = hide[1, 1:6] = (
        False  # prompt keys hidden from every query, as BDHS hides image tokens
    )
    with torch.no_grad():
        dense = vlm.hidden(ids, attention_mask=segment >= 0, key_mask=hide, segment=segment)
        monkeypatch.setattr(M, "FLEX_DEVICES", ("cuda", "cpu"))
        flex = vlm.hidden(ids, attention_mask=segment >= 0, key_mask=hide, segment=segment)
    assert flex.shape == dense.shape and (flex - dense).abs().max() <= 1e-5
    # at scale, blocks are skipped: a prompt of 256 and two responses of 384 are 8 x 8 blocks of 128, of which
    # causal attention needs 36; the second response's 3 query blocks skip the first's 3 key blocks too
    segment = torch.tensor([[0] * 256 + [1] * 384 + [2] * 384])
    # (8, 8) 1: a block the kernel computes
    blocks = M.block_mask(segment >= 0, segment).to_dense()[0, 0]
    assert (
        blocks.sum() == 36 - 9
        and blocks[5:, 2:5].sum() == 0
        and blocks.tril().sum() == blocks.sum()
    )


# -----------------------------------------------------------------------------
# Hostile and careless input: images, checkpoint files, model names, flags


def test_decompression_bombs_are_refused_from_the_header(tmp_path, monkeypatch):
    """One pixel limit for every way an image comes in (a file for llava, its size for llava_next's
    AnyRes, bytes from a parquet release), checked before anything is decoded: between PIL's warning
    and error limits (10000 x 9000) and past its error limit (20000 x 20000)."""
    import data
    import model

    for w, h in ((10000, 9000), (20000, 20000)):
        path = str(tmp_path / f"bomb{w}.png")
        raw = bomb_png(path, w, h)
        assert len(raw) < 60_000
        for read in (load_image, data.open_image, data.image_hw):
            with pytest.raises(ValueError, match=rf"bomb{w}\.png.* over the limit of 40,000,000 "):
                read(path)
        with pytest.raises(ValueError, match=rf"image of {len(raw)} bytes.* over the limit of 40"):
            data.open_image(raw)
    random_image(30, 30).save(tmp_path / "small.png")
    assert load_image(str(tmp_path / "small.png")).size == (30, 30)
    monkeypatch.setattr(model, "MAX_PIXELS", 899)
    with pytest.raises(ValueError, match=r"small\.png: 30x30 is 900 pixels, over the limit of 899"):
        load_image(str(tmp_path / "small.png"))
    code = "import model; print(model.MAX_PIXELS)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=os.environ | {"IMAGE_MAX_PIXELS": "1234"},
        check=True,
    ).stdout
    assert out.strip() == "1234"


def test_a_batch_decodes_one_image_at_a_time(tmp_path):
    """collate_pairs hands the processor one image at a time: one full-size 1000 x 1000 image is
    held at once (3 MB as an array, plus the 3 MB of bytes PIL hands numpy on the way), not the
    batch's four (12 MB and more)."""
    import tracemalloc

    import data
    from PIL import Image

    vlm = VLM.from_pretrained(world.BASE_MODEL)
    items = []
    for i in range(4):
        Image.new("RGB", (1000, 1000), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
        items.append(dict(image=str(tmp_path / f"{i}.png"), prompt=[1, 2], responses=[[3], [4]]))
    tracemalloc.start()
    try:
        px = data.collate_pairs(vlm, items)["pixel_values"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert px.shape[0] == 4 and peak < 3 * 3_000_000, peak


def test_bad_safetensors_files_are_named(tmp_path):
    """A malformed header, a length past the file, a file cut short or grown: one line naming the file."""
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(4)}, str(tmp_path / "ok.safetensors"))
    raw = (tmp_path / "ok.safetensors").read_bytes()
    with hub.open_weights(str(tmp_path / "ok.safetensors")) as f:
        assert f.get_slice("a").get_shape() == [4]
    cases = {
        "empty": b"",
        "cut": raw[:20],
        "huge": (1 << 62).to_bytes(8, "little") + raw[8:],
        "junk": (4).to_bytes(8, "little") + b"{{{{",
        "short": raw[:-3],
        "long": raw + b"xx",
    }
    for name, b in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(b)
        with pytest.raises(
            cli.UserFileError, match=rf"{name}\.safetensors: not a safetensors file"
        ) as e:
            hub.open_weights(str(tmp_path / f"{name}.safetensors"))
        assert "\n" not in str(e.value)
    d = tmp_path / "model"
    d.mkdir()
    shutil.copy(os.path.join(BASE, "config.json"), d)
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a safetensors file"):
        VLM.from_pretrained(str(d))
    (d / "model.safetensors").write_bytes(
        open(os.path.join(BASE, "model.safetensors"), "rb").read()[:-8]
    )
    with pytest.raises(
        ValueError, match=r"model\.safetensors: not a safetensors file, or truncated"
    ):
        VLM.from_pretrained(str(d))


def test_missing_config_sizes_and_tokenizer_are_named(tmp_path):
    """A config.json without text_config.hidden_size gets transformers' default, which cannot fit
    the weights: the shape error names the missing key. A folder without tokenizer.json loads for
    tensors, and fails naming the folder when text is needed."""
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(os.path.join(BASE, "model.safetensors"), d)
    cfg = json.load(open(os.path.join(BASE, "config.json")))
    del cfg["text_config"]["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json has no text_config\.hidden_size"):
        VLM.from_pretrained(str(d))
    shutil.copy(os.path.join(BASE, "config.json"), d)
    vlm = VLM.from_pretrained(str(d))
    with torch.no_grad():
        assert vlm(torch.tensor([[1, 5, 6]])).shape[:2] == (1, 3)
    with pytest.raises(FileNotFoundError, match=rf"{d}: no tokenizer\.json"):
        vlm.encode_prompt("Is there a cup?")
    vlm.save_pretrained(str(tmp_path / "again"))
    assert not os.path.exists(tmp_path / "again" / "tokenizer.json")


def test_a_missing_local_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append(repo))
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/offline")
    for name in (
        "./ckpt",
        str(tmp_path / "gone"),
        "runs/offline/checkpoint",
        "runs/x",
        "a/b/c",
        "~/no-such-model",
    ):
        with pytest.raises(FileNotFoundError, match="no such model folder"):
            VLM.from_pretrained(name)
    assert calls == []


def test_atomic_write_is_all_or_nothing(tmp_path):
    """cli.atomic_write: text, bytes or a writer callable; a failed write leaves the file as it was and
    no temporary beside it."""
    path = str(tmp_path / "f.json")
    cli.atomic_write(path, "one")
    cli.atomic_write(path, b"two")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        cli.atomic_write(path, fail)
    assert open(path).read() == "two" and os.listdir(tmp_path) == ["f.json"]


def test_checkpoint_leftovers_are_mended_and_disk_errors_named(tmp_path, monkeypatch):
    vlm = VLM.from_pretrained(BASE)
    ck = str(tmp_path / "checkpoint")
    vlm.save_pretrained(ck)
    # killed between save_pretrained's two renames (only checkpoint.old<pid> left), and in a write
    os.rename(ck, ck + ".old123")
    os.makedirs(ck + ".tmp456")
    (tmp_path / "checkpoint.tmp456" / "model.safetensors").write_bytes(b"partial")
    hub.recover_checkpoint(ck)
    assert os.listdir(tmp_path) == ["checkpoint"]
    VLM.from_pretrained(ck)

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hub, "save_file", full)
    with pytest.raises(OSError, match=r"cannot write .*checkpoint\.tmp\d+/model\.safetensors: No "):
        vlm.save_pretrained(ck)
    assert os.listdir(tmp_path) == ["checkpoint"]  # the earlier one stays, the partial folder goes
    VLM.from_pretrained(ck)


# -----------------------------------------------------------------------------
# Command lines: help from the Config's comments, errors at parse time, one line per user error


def script_configs():
    import bdhs
    import eval as ev

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import study
    import train_offline as to
    import train_online as on

    return {
        "train_offline": to.Config,
        "train_online": on.Config,
        "bdhs": bdhs.Config,
        "eval": ev.Config,
        "world": world.Config,
        "study": study.Config,
    }


def help_text(cls, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: no wrapping inside a word
    with pytest.raises(SystemExit) as e:
        cli.config_from_argv(cls, ["--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "script", ["train_offline", "train_online", "bdhs", "eval", "world", "study"]
)
def test_help_shows_each_flags_comment_default_and_choices(script, monkeypatch, capsys):
    import dataclasses

    cls = script_configs()[script]
    out = help_text(cls, monkeypatch, capsys)
    comments = cli.field_comments(cls)
    for f in dataclasses.fields(cls):
        default = repr(f.default) if f.default == "" else f.default
        assert f"(default: {default}" in out.split(f"--{f.name} ", 1)[1], f.name
        if f.name in comments:
            assert comments[f.name] in out, f.name
    for name, values in cli.field_choices(cls).items():
        assert f"--{name} {{{','.join(values)}}}" in out
    assert "not flags" not in out  # a comment at the fields' indent belongs to no field


def test_help_comments_choices_and_bounds(monkeypatch, capsys):
    import losses
    import train_offline as to

    out = help_text(to.Config, monkeypatch, capsys)
    assert "--loss {" + ",".join([*losses.LOSSES, "rm"]) + "}" in out
    assert "--dtype {float32,bfloat16,float16}" in out
    # a comment continued on the next `#` line, aligned under it, is the same field's
    assert (
        "--data STR world (its corruption set), bdhs, bdhs+world (Avg-DPO), world+partners (opt-in: "
        "partner-present pairs too, world.partner_pairs), a .jsonl, or povid|vlfeedback|rlhfv|llava-rlhf[:PATH] "
        "(default: world)"
    ) in out
    assert "--batch_size INT global: micro-batch x grad_accum x ranks (default: 32; >= 1)" in out
    out = help_text(script_configs()["bdhs"], monkeypatch, capsys)
    assert "a native .jsonl (rejected optional) or povid|vlfeedback|rlhfv|llava-rlhf[:PATH]" in out
    out = help_text(script_configs()["train_online"], monkeypatch, capsys)
    assert "--data STR world (its align split), a native .jsonl, or povid|vlfeedback" in out


def test_model_py_help_and_dtype(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        M.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--dtype {float32,bfloat16,float16} the weights' dtype (default: float32)" in out
    with pytest.raises(
        cli.UserError, match=r"--dtype: invalid choice: 'bf16' \(choose from 'float32'"
    ):
        M.main(["--model", world.BASE_MODEL, "--dtype", "bf16"])


def test_run_main_prints_one_line_for_a_user_error(monkeypatch, capsys):
    def user():
        raise cli.UserKeyError("ckpt: checkpoint is missing 1 tensor(s): lm_head.weight")

    def bug():
        raise RuntimeError("a bug")

    with pytest.raises(SystemExit) as e:
        cli.run_main(user)
    assert e.value.code == 2
    assert (
        capsys.readouterr().err
        == "error: ckpt: checkpoint is missing 1 tensor(s): lm_head.weight\n"
    )
    monkeypatch.setenv("RANK", "1")  # the other ranks exit quietly
    with pytest.raises(SystemExit):
        cli.run_main(user)
    assert capsys.readouterr().err == ""
    with pytest.raises(RuntimeError, match="a bug"):  # a bug is no user error: its traceback stays
        cli.run_main(bug)


class MissingImages(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise cli.UserFileError(
            f"img{i}.png: no such image (relative paths resolve against --image_root)"
        )


def test_a_user_error_in_a_dataloader_worker_is_still_one_line(capsys):
    """A worker's error arrives wrapped in its traceback ("Caught UserFileError in DataLoader worker process
    0. Original Traceback ..."): run_main prints the original one line."""
    loader = torch.utils.data.DataLoader(MissingImages(), batch_size=None, num_workers=1)
    with pytest.raises(SystemExit) as e:
        cli.run_main(lambda: next(iter(loader)))
    assert e.value.code == 2
    want = "error: img0.png: no such image (relative paths resolve against --image_root)\n"
    assert capsys.readouterr().err == want


@pytest.mark.parametrize(
    "args,want",
    [
        (
            ["train_offline.py", "--dtype", "bf16"],
            "argument --dtype: invalid choice: 'bf16' (choose from 'float32', "
            "'bfloat16', 'float16')",
        ),
        (["train_online.py", "--lora_r", "-4"], "--lora_r -4: must be >= 1"),
        (["bdhs.py", "--source", "missing.jsonl"], "--source 'missing.jsonl': not a file"),
        (["model.py", "--model", "no/such/folder"], "no/such/folder: no such model folder"),
    ],
)
def test_scripts_exit_2_with_one_error_line(args, want, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, args[0]), *args[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], p.stderr
    assert "Traceback" not in p.stderr


# -- generation on the device (#29 item 5): shared prefill cache, compute dtype, device generator, host syncs --


def copied_cache(cache, reps, S):
    """The reference a SharedKVCache is compared with: a KVCache of S slots per sample row, its prompt
    slots copied from the prompt's row of `cache`."""
    prompt = torch.arange(cache.k.shape[1], device=cache.k.device).repeat_interleave(reps)
    L, _, Hk, Tp, D = cache.k.shape
    new = KVCache(
        types.SimpleNamespace(num_hidden_layers=L, num_key_value_heads=Hk, head_dim=D),
        len(prompt),
        S,
        cache.k.dtype,
        cache.k.device,
    )
    new.k[:, :, :, :Tp], new.v[:, :, :, :Tp] = cache.k[:, prompt], cache.v[:, prompt]
    new.key_mask[:, :Tp] = cache.key_mask[prompt]
    new.next_pos, new.pos = cache.next_pos[prompt], Tp
    return new


def test_shared_prefill_equals_copies_in_prompt_plus_n_responses_bytes(pair, monkeypatch):
    """Samples of a prompt read its one prefill cache (SharedKVCache): the same ids, bit for bit in fp32, as a
    copy of it per row (`copied_cache`), ragged counts and forced prefixes included; and it holds the prompts
    once plus each row's own slots, B x T + R x new, where the copies hold R x (T + new)."""
    _, proc, ours, _ = pair
    _, inp = hf_inputs(proc, n=2)
    ids, am, px, sz = (
        inp["input_ids"],
        inp["attention_mask"],
        inp["pixel_values"],
        inp.get("image_sizes"),
    )
    # 2 rows for prompt 0, 3 for prompt 1
    prefix = [
        [],
        [40, 41],
        [42, 43, 44],
        [46],
        [47, 48, 49, 50],
    ]
    kw = dict(
        max_new_tokens=6, eos_token_id=[], num_samples=[2, 3], prefix_ids=prefix, temperature=1.0
    )
    got, shared = {}, M.KVCache.share
    for share in (True, False):
        monkeypatch.setattr(M.KVCache, "share", shared if share else copied_cache)
        got[share] = ours.generate(
            ids, am, px, sz, generator=torch.Generator().manual_seed(0), **kw
        )
        greedy = ours.generate(ids, am, px, sz, max_new_tokens=6, eos_token_id=[], num_samples=3)
        got[share, "greedy"] = greedy
    assert got[True] == got[False] and got[True, "greedy"] == got[False, "greedy"]
    B, T = ids.shape
    N, new = 8, 5
    per_token = M.kv_bytes_per_token(ours, "cpu")
    sizes = {}
    for share in (True, False):
        monkeypatch.setattr(M.KVCache, "share", shared if share else copied_cache)
        cache, logits = M.prefill(ours, ids, am, px, sz, num_samples=N, max_new_tokens=new)
        assert logits.shape[0] == B * N and cache.next_pos.shape == (B * N,)
        parts = [cache.k, cache.v] + ([cache.pk, cache.pv] if share else [])
        sizes[share] = sum(t.numel() * t.element_size() for t in parts)
    assert sizes[True] == per_token * (B * T + B * N * new)  # the prompts once + N x each response
    assert sizes[False] == per_token * B * N * (T + new)  # the prompt copied into every row


def test_sample_draws_as_multinomial_on_the_logits_device():
    """`sample` draws exactly what torch.multinomial would from the same generator (without the check that
    reads the probabilities back on the host), and refuses a generator on another device."""
    for seed in range(20):
        logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(100 + seed)) * 3
        logits[:, :5] = float("-inf")
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(3):
            want = torch.multinomial((logits / 0.7).softmax(-1), 1, generator=g1).squeeze(-1)
            assert torch.equal(sample(logits, 0.7, generator=g2), want)
    with pytest.raises(ValueError, match=r"torch.Generator\('meta'\)"):
        sample(torch.zeros(2, 5, device="meta"), 1.0, generator=torch.Generator())
    g = torch.Generator().manual_seed(3)
    # on CPU the caller's own stream, so results stay as they were
    assert M.device_generator(g, "cpu") is g


def count_host_syncs(monkeypatch):
    """A counter of the Tensor methods that read a value back on the host (a CUDA sync each)."""
    n = [0]
    for name in (
        "__bool__",
        "item",
        "tolist",
        "cpu",
        "numpy",
        "__int__",
        "__float__",
        "__index__",
        "nonzero",
    ):

        def spy(self, *a, _real=getattr(torch.Tensor, name), **kw):  # noqa: B008 (bound per name)
            n[0] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return n


@pytest.fixture(scope="module")
def world_base():
    return VLM.from_pretrained(BASE).eval()


def test_decode_syncs_the_host_every_few_tokens_with_the_same_outputs(world_base, monkeypatch):
    """With sync_every 8 (CUDA's default) decode reads back at most 2 values per 8 tokens (stop strings, all
    ended?) and 2 at the end; per token (CPU's default) 2 a token. Rows that ended keep decoding until the
    check and are cut, so EOS and stop strings end every row where the per-token loop ends it."""
    vlm = world_base
    batch = vlm.prepare(
        ["What color is the cup?", "Describe the image.", "Describe the picture."],
        [random_image(64, 64, seed=i) for i in range(3)],
    )
    K = 24
    out, syncs = {}, {}
    for every in (1, 8):
        cache, logits = M.prefill(
            vlm,
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            num_samples=4,
            max_new_tokens=K,
        )
        stop = M.StopStrings(vlm.tokenizer, ["top"], vlm.lm_head.weight.shape[0])
        gen = torch.Generator().manual_seed(0)
        with monkeypatch.context() as m:
            n = count_host_syncs(m)
            out[every] = M.decode(
                vlm,
                cache,
                logits,
                K,
                1.0,
                generator=gen,
                eos=vlm.eos_ids(),
                stop=stop,
                banned=vlm.never_sampled(),
                sync_every=every,
            )
        syncs[every] = n[0]
    assert out[1] == out[8]
    lengths = [len(o) for o in out[1]]
    assert len(set(lengths)) > 2, lengths  # rows end at different steps
    texts = [vlm.tokenizer.decode(o) for o in out[1]]
    # by the stop string, by EOS
    assert any(t.endswith("top") for t in texts) and "blue." in texts[0]
    assert syncs[8] <= 2 * -(-K // 8) + 2 < syncs[1], syncs


def test_kv_cache_is_kept_in_the_compute_dtype(world_base):
    """The cache holds what attention computes in: autocast's dtype where it is on, else the weights'; and
    sampling under bf16 autocast runs on the shared cache with forced prefixes."""
    vlm = world_base
    batch = vlm.prepare(
        ["What color is the cup?", "Is there a dog?"],
        [random_image(64, 64, seed=i) for i in range(2)],
    )
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    cache, _ = M.prefill(vlm, *args, max_new_tokens=2)
    assert cache.k.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache, _ = M.prefill(
            vlm, *args, num_samples=[1, 2], prefix_ids=[[5], [], [6, 7]], max_new_tokens=2
        )
        assert (
            isinstance(cache, M.SharedKVCache) and cache.k.dtype == cache.pk.dtype == torch.bfloat16
        )
        out = vlm.generate(
            *args,
            max_new_tokens=4,
            num_samples=2,
            temperature=1.0,
            generator=torch.Generator().manual_seed(0),
        )
    assert len(out) == 4
    bf16 = VLM.from_pretrained(BASE, dtype=torch.bfloat16)
    assert M.prefill(bf16, *args, max_new_tokens=2)[0].k.dtype == torch.bfloat16


def test_generation_batches_fit_80gb_at_7b():
    """The --batch_size 0 figures bdhs.py's and eval.py's --help state: LLaVA-1.6-7B (Vicuna) in bf16 on an
    80 GB card, 0.5 MiB a cached token; and the CPU defaults elsewhere."""
    import bdhs

    raw = dict(
        model_type="llava_next", text_config=dict(model_type="llama"), image_token_index=32000
    )
    with torch.device("meta"):
        vlm = VLM(parse_config(raw)).to(torch.bfloat16)
    assert M.kv_bytes_per_token(vlm, "cpu") == 2 * 32 * 4096 * 2 == 2**19
    assert M.max_prompt_tokens(vlm) == 2928 + 256  # 672 x 672: the base view, 2 x 2 tiles, newlines
    guided = M.max_prompt_tokens(vlm) + bdhs.SENTENCES * (256 + bdhs.Config.sentence_tokens)
    assert M.rows_that_fit(vlm, guided, 32, total=80e9) == 10
    assert M.rows_that_fit(vlm, M.max_prompt_tokens(vlm) + 512, 64, total=80e9) == 16
    assert M.rows_that_fit(vlm, guided, 32) == 32  # not on CUDA: the default
