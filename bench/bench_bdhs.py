"""BDHS pairs per second: bdhs.py's batched sampler against a straightforward one that re-encodes
the image and prompt for every sentence (one generate call per sentence, as a per-sentence loop over
an HF-style generate would).

    python bench/bench_bdhs.py                      # both cases below, both ratios, one run
    python bench/bench_bdhs.py --case base --n 16   # the world base only (or --model M)
    python bench/bench_bdhs.py --case llava16       # the LLaVA-1.6-shaped model only

Cases:
- base: the shipped world base model (--model), --n description prompts (an image is 9 tokens
  there);
- llava16: a LLaVA-1.6-shaped (llava_next, AnyRes) random model, --n16 of the same prompts with each
  96 px world image upscaled to 672 x 672, so AnyRes takes the 2 x 2 grid: 576 + 48 x 49 = 2,928
  image tokens per prompt, as LLaVA-1.6-7B gives a 672 px image. Scaled down so it runs in minutes
  on a CPU: the CLIP tower keeps 336 px / patch 14 (576 tokens per view) at width 64 and 2 layers
  (ViT-L/14: 1024, 24); the Llama decoder is width 256, 4 layers, 4 heads (vicuna-7b: 4096, 32, 32);
  the vocabulary is the world's tokenizer (490). Random weights never write a full stop, so every
  sentence runs to --llava16_tokens new tokens on both sides (a typical sentence).

Both sides get the same plans (sentence cuts, yes/no swaps), masks and greedy decoding, so their
texts must be equal; the script counts the equal ones, then prints pairs/s and the ratio. One
attempt per pair (n_bdhs 1) and no similarity check: the retries and the embedder cost both sides
alike. Each side runs once on the first prompts before it is timed (the stop-string table, allocator
warm-up).
"""

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bdhs  # noqa: E402
import data  # noqa: E402
import world  # noqa: E402
from model import VLM  # noqa: E402

# LLaVA-1.6's geometry (CLIP 336/14 tower, AnyRes up to 672 x 672), scaled down in width and depth
LLAVA16 = dict(
    model_type="llava_next",
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    vision_config=dict(
        model_type="clip_vision_model",
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=336,
        patch_size=14,
    ),
    text_config=dict(
        model_type="llama",
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    ),
)


def naive(vlm, recs, cfg, seed):
    """One generate call per sentence: the image and prompt are encoded again each time."""
    rng, gen, out = random.Random(seed), torch.Generator().manual_seed(seed), []
    for r in recs:
        prompt = data.prompt_ids(vlm, r)
        pix = vlm.image_processor([data.open_image(r["image"])])
        text = ""
        for ctx, p1, ws in bdhs.plan_sentences(r["chosen"], rng):
            ids = torch.tensor([prompt + bdhs.sentence_prefix(vlm, ctx, p1)])
            keep, _ = bdhs.image_key_mask(
                ids, torch.ones_like(ids), vlm.cfg.image_token_id, cfg.rho, gen
            )
            o = vlm.generate(
                ids,
                key_mask=keep,
                pixel_values=pix["pixel_values"],
                image_sizes=pix.get("image_sizes"),
                max_new_tokens=cfg.sentence_tokens,
                temperature=0.0,
                stop_strings=(".",),
            )[0]
            text += bdhs.join_sentence(p1, vlm.tokenizer.decode(o), ws)
        out.append(text)
    return out


def batched(vlm, recs, cfg):
    """bdhs.py's sampler, batch by batch, one plan stream over the batches (as naive() draws it)."""
    out, rng = [], random.Random(0)

    def no_check(texts):  # one attempt: the similarity is not used
        return torch.zeros(len(texts), 1)

    for b in range(0, len(recs), cfg.batch_size):
        batch = recs[b : b + cfg.batch_size]
        res = bdhs.bdhs_batch(vlm, no_check, batch, cfg, torch.Generator(), rng)
        out += [x for x, _ in res]
    return out


def llava16_model(base):
    """The scaled-down LLaVA-1.6-shaped random model, with the world base's tokenizer and
    template."""
    raw = dict(LLAVA16, image_token_index=base.cfg.image_token_id)
    raw["text_config"] = dict(raw["text_config"], vocab_size=base.cfg.text.vocab_size)
    vlm = VLM.from_config(raw).eval()
    vlm.tokenizer, vlm.template = base.tokenizer, base.template
    return vlm


def prompts(n, side=0):
    """n description prompts of the world; side > 0: each image upscaled to side x side pixels."""
    recs = [
        r
        for r in world.world_pairs(world.World(0), 8 * n, rejected=False)
        if r["meta"]["kind"] == "describe"
    ][:n]
    for r in recs if side else []:
        r["image"] = r["image"].resize((side, side), 0)  # 0: nearest, the cells stay sharp
    return recs


def compare(name, vlm, recs, cfg, warm):
    """Times both sides on the same records (after a warm-up on the first `warm`); prints them."""
    batched(vlm, recs[:warm], cfg), naive(vlm, recs[:warm], cfg, 0)
    t = time.perf_counter()
    ours = batched(vlm, recs, cfg)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = naive(vlm, recs, cfg, 0)
    t_naive = time.perf_counter() - t
    sents = sum(len(bdhs.split_sentences(r["chosen"])) for r in recs)
    img = vlm.image_token_counts(vlm.image_processor([recs[0]["image"]]).get("image_sizes"), 1)[0]
    print(
        f"\n{name}: {len(recs)} prompts, {sents} sentences, {img} image tokens per prompt, batch "
        f"{cfg.batch_size}, up to {cfg.sentence_tokens} new tokens per sentence"
    )
    print(f"identical rejected texts: {sum(x == y for x, y in zip(ours, theirs))}/{len(recs)}")
    print(
        f"| sampler | time (s) | pairs/s |\n|---|---|---|\n"
        f"| naive, one call per sentence | {t_naive:.2f} | {len(recs) / t_naive:.2f} |\n"
        f"| bdhs.py, shared prefill | {t_ours:.2f} | {len(recs) / t_ours:.2f} |"
    )
    print(f"ratio: {t_naive / t_ours:.2f}x")
    return t_naive / t_ours


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="both", choices=["both", "base", "llava16"])
    ap.add_argument("--model", default=world.BASE_MODEL)
    ap.add_argument("--n", type=int, default=64, help="prompts of the base case")
    ap.add_argument("--batch_size", type=int, default=32, help="prompts per call, base case")
    ap.add_argument("--n16", type=int, default=8, help="prompts of the llava16 case (one batch)")
    ap.add_argument("--llava16_tokens", type=int, default=24, help="new tokens per sentence")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    base = VLM.from_pretrained(a.model).eval()
    print(f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cpus, fp32")
    ratios = {}
    # rho 0: the mask is a no-op, so both sides see the same keys whatever order they draw it in
    if a.case in ("both", "base"):
        cfg = bdhs.Config(n_bdhs=1, rho=0.0, temperature=0.0, batch_size=a.batch_size)
        name = f"world base ({os.path.basename(a.model.rstrip('/'))})"
        ratios["world base"] = compare(name, base, prompts(a.n), cfg, warm=4)
    if a.case in ("both", "llava16"):
        cfg = bdhs.Config(
            n_bdhs=1, rho=0.0, temperature=0.0, batch_size=a.n16, sentence_tokens=a.llava16_tokens
        )
        name = "LLaVA-1.6-shaped random model (scaled down)"
        recs = prompts(a.n16, side=672)
        ratios["LLaVA-1.6-shaped"] = compare(name, llava16_model(base), recs, cfg, warm=1)
    print("\n" + ", ".join(f"{k}: {v:.2f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
