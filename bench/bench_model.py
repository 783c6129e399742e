"""Forward time and batched greedy generation speed of model.py against transformers, same weights, one run.

    python bench/bench_model.py                 # CPU, fp32, the shapes below
    python bench/bench_model.py --device cuda --dtype bfloat16   # on a GPU, plus the decode roofline at batch 1

Model: a LLaVA-1.5-shaped random model (CLIP 336 px / patch 14 -> 576 image tokens; Llama decoder hidden 1024,
12 layers, 16 heads, vocab 32064). Generation: batch 8, left-padded prompts with one image each, 64 new tokens,
greedy, EOS disabled. "decode tok/s" excludes the prefill: (64 - 1) * B / (t(64 tokens) - t(1 token)).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import VLM  # noqa: E402

CONFIG = dict(model_type="llava", image_token_index=32000, vision_feature_layer=-2,
              vision_feature_select_strategy="default",
              vision_config=dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072,
                                 num_hidden_layers=6, num_attention_heads=12, image_size=336, patch_size=14),
              text_config=dict(model_type="llama", vocab_size=32064, hidden_size=1024, intermediate_size=2816,
                               num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16,
                               max_position_embeddings=4096))


def timed(fn, reps, sync):
    out, ts = None, []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    from transformers import AutoConfig, LlavaForConditionalGeneration
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(AutoConfig.for_model(**CONFIG)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = VLM.from_pretrained(d, dtype=dtype, device=dev).eval()
    hf = hf.to(dev, dtype)
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    B, N = a.batch, 576
    g = torch.Generator().manual_seed(0)
    lens = [20 + 7 * i for i in range(B)]  # ragged prompts, left-padded
    T = N + max(lens)
    ids = torch.zeros(B, T, dtype=torch.long)
    am = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, T - N - n:T - n] = 32000
        ids[b, T - n:] = torch.randint(3, 32000, (n,), generator=g)
        am[b, T - N - n:] = 1
    px = torch.randn(B, 3, 336, 336, generator=g).to(dev, dtype)
    ids, am = ids.to(dev), am.to(dev)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    print(f"device {dev}, dtype {a.dtype}, threads {torch.get_num_threads()}, batch {B}, prompt {T} tokens "
          f"({N} image), {a.new_tokens} new tokens")
    rows = []
    with torch.inference_mode():
        fb = max(1, B // 4)  # forward on a quarter of the batch
        t_hf, ref = timed(lambda: hf(input_ids=ids[:fb], pixel_values=px[:fb], attention_mask=am[:fb],
                                     position_ids=pos[:fb]).logits, a.reps, sync)
        t_us, got = timed(lambda: ours(ids[:fb], px[:fb], None, am[:fb]), a.reps, sync)
        diff = (ref.float() - got.float())[am[:fb].bool()].abs().max().item()
        rows.append((f"forward (batch {fb}) s", t_hf, t_us, t_hf / t_us))
        gen = {}
        for k in (1, a.new_tokens):
            t_hf, out_hf = timed(lambda: hf.generate(input_ids=ids, pixel_values=px, attention_mask=am,
                                                     max_new_tokens=k, do_sample=False), a.reps, sync)
            t_us, out_us = timed(lambda: ours.generate(ids, am, px, max_new_tokens=k, eos_token_id=[]), a.reps, sync)
            gen[k] = (t_hf, t_us, out_hf[:, T:].tolist(), out_us)
        K = a.new_tokens
        e2e_hf, e2e_us = B * K / gen[K][0], B * K / gen[K][1]
        dec_hf = B * (K - 1) / (gen[K][0] - gen[1][0])
        dec_us = B * (K - 1) / (gen[K][1] - gen[1][1])
        rows.append(("generate end-to-end tok/s", e2e_hf, e2e_us, e2e_us / e2e_hf))
        rows.append(("generate decode tok/s", dec_hf, dec_us, dec_us / dec_hf))
        same = gen[K][2] == gen[K][3]
    print(f"\n| measure | transformers | ours | ratio (ours better > 1) |\n|---|---|---|---|")
    for name, h, u, r in rows:
        print(f"| {name} | {h:.3f} | {u:.3f} | {r:.2f}x |")
    print(f"\nmax |logit diff| {diff:.2e}; greedy ids identical: {same}")
    if dev.type == "cuda":  # batch-1 decode against the memory-bandwidth roofline (weights read once per token)
        props = torch.cuda.get_device_properties(dev)
        t1, _ = timed(lambda: ours.generate(ids[:1], am[:1], px[:1], max_new_tokens=1, eos_token_id=[]), a.reps, sync)
        tk, _ = timed(lambda: ours.generate(ids[:1], am[:1], px[:1], max_new_tokens=K, eos_token_id=[]), a.reps, sync)
        tok_s = (K - 1) / (tk - t1)
        wbytes = sum(p.numel() * p.element_size() for p in ours.model.language_model.parameters()) + \
            ours.lm_head.weight.numel() * ours.lm_head.weight.element_size()
        print(f"batch-1 decode {tok_s:.1f} tok/s on {props.name}; LLM weights {wbytes / 1e9:.2f} GB "
              f"-> roofline = bandwidth / weight bytes (see README for the bandwidth used)")


if __name__ == "__main__":
    main()
