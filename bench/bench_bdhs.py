"""BDHS pairs per second: bdhs.py's batched sampler against a straightforward one that re-encodes the image and
prompt for every sentence (one generate call per sentence, as a per-sentence loop over an HF-style generate would).

    python bench/bench_bdhs.py                         # the shipped world base model, 64 description prompts
    python bench/bench_bdhs.py --model PATH --n 16     # any checkpoint (the prompts are still the world's)

Both sides get the same plans (sentence cuts, yes/no swaps), masks and greedy decoding, so their texts must be equal;
the script counts the equal ones, then prints pairs/s and the ratio. One attempt per pair (n_bdhs 1) and no similarity
check: the retries and the embedder cost both sides alike.
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


def naive(vlm, recs, cfg, seed):
    """One generate call per sentence: the image and prompt are encoded again each time."""
    rng, gen, out = random.Random(seed), torch.Generator().manual_seed(seed), []
    for r in recs:
        prompt = bdhs.prompt_ids(vlm, r)
        pix = vlm.image_processor([data.open_image(r["image"])])
        text = ""
        for ctx, p1, ws in bdhs.plan_sentences(r["chosen"], rng):
            ids = torch.tensor([prompt + bdhs.sentence_prefix(vlm, ctx, p1)])
            keep, _ = bdhs.image_key_mask(ids, torch.ones_like(ids), vlm.cfg.image_token_id, cfg.rho, gen)
            o = vlm.generate(ids, key_mask=keep, pixel_values=pix["pixel_values"], image_sizes=pix.get("image_sizes"),
                             max_new_tokens=cfg.sentence_tokens, temperature=0.0, stop_strings=(".",))[0]
            text += bdhs.join_sentence(p1, vlm.tokenizer.decode(o), ws)
        out.append(text)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=world.BASE_MODEL)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=32)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    vlm = VLM.from_pretrained(a.model).eval()
    recs = [r for r in world.world_pairs(world.World(0), 8 * a.n, rejected=False) if r["meta"]["kind"] == "describe"][:a.n]
    # rho 0: the mask is a no-op, so both sides see the same keys whatever order they draw it in
    cfg = bdhs.Config(n_bdhs=1, rho=0.0, temperature=0.0, batch_size=a.batch_size)
    sents = sum(len(bdhs.split_sentences(r["chosen"])) for r in recs)
    t = time.perf_counter()
    ours, rng = [], random.Random(0)  # one plan stream over the batches, as naive() draws it
    no_check = lambda texts: torch.zeros(len(texts), 1)  # noqa: E731  (one attempt: the similarity is not used)
    for b in range(0, len(recs), a.batch_size):
        ours += [x for x, _ in bdhs.bdhs_batch(vlm, no_check, recs[b:b + a.batch_size], cfg, torch.Generator(), rng)]
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = naive(vlm, recs, cfg, 0)
    t_naive = time.perf_counter() - t
    same = sum(x == y for x, y in zip(ours, theirs))
    print(f"{len(recs)} prompts, {sents} sentences, model {os.path.basename(a.model.rstrip('/'))}")
    print(f"identical rejected texts: {same}/{len(recs)}")
    print(f"bdhs.py (batched, shared prefill): {t_ours:.2f} s, {len(recs) / t_ours:.1f} pairs/s")
    print(f"naive (re-encode per sentence):    {t_naive:.2f} s, {len(recs) / t_naive:.1f} pairs/s")
    print(f"ratio: {t_naive / t_ours:.2f}x")


if __name__ == "__main__":
    main()
