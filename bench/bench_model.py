"""Forward, prefill and decode speed of model.py against transformers, same weights, same process.

    python bench/bench_model.py --runs 3                     # CPU, fp32: the figures in the README
    python bench/bench_model.py --device cuda --dtype bfloat16   # on a GPU, plus batch-1 decode against the roofline

Model: a LLaVA-1.5-shaped random model (CLIP 336 px / patch 14 -> 576 image tokens; Llama decoder hidden 1024,
12 layers, 16 heads, vocab 32064). Generation: batch 8, left-padded prompts with one image each, 64 new tokens,
greedy, EOS disabled. Each side's prefill and decode are timed apart, inside one generation:
- ours: `model.prefill` (prompt and image into the cache, first logits), then `model.decode` (64 sampling steps,
  63 forwards);
- transformers: `generate` with a logits processor that stamps the time at each step: prefill = start to the first
  stamp, decode = first stamp to the last (63 forwards).
Every run prints each figure's ratio (ours faster > 1); with --runs N, the median and the min-max of the N runs.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
from model import VLM  # noqa: E402

CONFIG = dict(
    model_type="llava",
    image_token_index=32000,
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    vision_config=dict(
        model_type="clip_vision_model",
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=6,
        num_attention_heads=12,
        image_size=336,
        patch_size=14,
    ),
    text_config=dict(
        model_type="llama",
        vocab_size=32064,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=4096,
    ),
)


def timed(fn, reps, sync):
    out, ts = None, []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def inputs(B, N, dev, dtype, seed=0):
    """Left-padded ragged prompts: N image tokens, then 20, 27, ... text tokens."""
    g = torch.Generator().manual_seed(seed)
    lens = [20 + 7 * i for i in range(B)]
    T = N + max(lens)
    ids, am = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, T - N - n : T - n] = 32000
        ids[b, T - n :] = torch.randint(3, 32000, (n,), generator=g)
        am[b, T - N - n :] = 1
    return ids.to(dev), am.to(dev), torch.randn(B, 3, 336, 336, generator=g).to(dev, dtype)


def ours_generation(vlm, ids, am, px, K, sync):
    """(prefill s, decode s, new ids) of model.py's generation."""
    sync()
    t0 = time.perf_counter()
    cache, logits = model.prefill(vlm, ids, am, px, max_new_tokens=K)
    sync()
    t1 = time.perf_counter()
    out = model.decode(vlm, cache, logits, K)
    sync()
    return t1 - t0, time.perf_counter() - t1, out


def hf_generation(hf, ids, am, px, K, sync):
    """(prefill s, decode s, new ids) of transformers' generate, from per-step time stamps."""
    stamps = []

    def stamp(input_ids, scores):  # called once per new token, before it is chosen
        sync()
        stamps.append(time.perf_counter())
        return scores

    sync()
    t0 = time.perf_counter()
    out = hf.generate(
        input_ids=ids,
        pixel_values=px,
        attention_mask=am,
        max_new_tokens=K,
        do_sample=False,
        logits_processor=[stamp],
    )
    return stamps[0] - t0, stamps[-1] - stamps[0], out[:, ids.shape[1] :].tolist()


def one_run(hf, ours, a, dev, sync):
    B, K = a.batch, a.new_tokens
    ids, am, px = inputs(B, 576, dev, getattr(torch, a.dtype))
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    fb = max(1, B // 4)  # forward on a quarter of the batch
    t_hf, ref = timed(
        lambda: (
            hf(
                input_ids=ids[:fb],
                pixel_values=px[:fb],
                attention_mask=am[:fb],
                position_ids=pos[:fb],
            ).logits
        ),
        a.reps,
        sync,
    )
    t_us, got = timed(lambda: ours(ids[:fb], px[:fb], None, am[:fb]), a.reps, sync)
    diff = (ref.float() - got.float())[am[:fb].bool()].abs().max().item()
    h = [hf_generation(hf, ids, am, px, K, sync) for _ in range(a.reps)]
    u = [ours_generation(ours, ids, am, px, K, sync) for _ in range(a.reps)]
    med = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
    rows = {
        f"forward (batch {fb}) s": (t_hf, t_us, t_hf / t_us),
        "prefill s": (med(h, 0), med(u, 0), med(h, 0) / med(u, 0)),
        "decode tok/s": (B * (K - 1) / med(h, 1), B * (K - 1) / med(u, 1), med(h, 1) / med(u, 1)),
    }
    steps = (
        1e3 * med(h, 1) / (K - 1),
        1e3 * med(u, 1) / (K - 1),
        1e3 * matmul_floor(ours, B, a.reps, sync),
    )
    return rows, diff, h[0][2] == u[0][2], steps


def matmul_floor(vlm, B, reps, sync):
    """Seconds of one decode step's linear layers alone (the same weights and F.linear, B rows of one token): the
    step's cost if attention, norms and sampling were free."""
    lins = [m for m in vlm.model.language_model.modules() if isinstance(m, torch.nn.Linear)] + [
        vlm.lm_head
    ]
    xs = [
        torch.randn(B, m.in_features, device=vlm.lm_head.weight.device, dtype=m.weight.dtype)
        for m in lins
    ]
    return timed(lambda: [m(x) for m, x in zip(lins, xs)], max(reps, 3), sync)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument(
        "--reps", type=int, default=3, help="repetitions within a run (the median is kept)"
    )
    ap.add_argument("--runs", type=int, default=1)
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
    print(
        f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else os.cpu_count()} cpus), "
        f"dtype {a.dtype}, torch threads {torch.get_num_threads()}, batch {a.batch}, {576} image tokens, "
        f"{a.new_tokens} new tokens, {a.runs} run(s) of {a.reps} repetitions"
    )
    ratios = {}
    with torch.inference_mode():
        for run in range(a.runs):
            rows, diff, same, (hf_ms, our_ms, floor_ms) = one_run(hf, ours, a, dev, sync)
            print(
                f"\nrun {run + 1}\n| measure | transformers | ours | ratio (ours faster > 1) |\n|---|---|---|---|"
            )
            for name, (h, u, r) in rows.items():
                print(f"| {name} | {h:.3f} | {u:.3f} | {r:.2f}x |")
                ratios.setdefault(name, []).append(r)
            print(f"max |logit diff| {diff:.2e}; greedy ids identical: {same}")
            print(
                f"decode step: transformers {hf_ms:.1f} ms, ours {our_ms:.1f} ms, of which the matmuls alone "
                f"{floor_ms:.1f} ms ({100 * floor_ms / our_ms:.0f}%); 2x transformers needs a step <= "
                f"{hf_ms / 2:.1f} ms"
            )
        if a.runs > 1:
            print("\n| measure | median ratio | min | max |\n|---|---|---|---|")
            for name, rs in ratios.items():
                print(
                    f"| {name} | {statistics.median(rs):.2f}x | {min(rs):.2f}x | {max(rs):.2f}x |"
                )
        if (
            dev.type == "cuda"
        ):  # batch-1 decode against the memory-bandwidth roofline (weights read once per token)
            ids, am, px = inputs(1, 576, dev, dtype)
            _, t, _ = min(
                (ours_generation(ours, ids, am, px, a.new_tokens, sync) for _ in range(a.reps)),
                key=lambda r: r[1],
            )
            tok_s = (a.new_tokens - 1) / t
            wbytes = (
                sum(p.numel() * p.element_size() for p in ours.model.language_model.parameters())
                + ours.lm_head.weight.numel() * ours.lm_head.weight.element_size()
            )
            print(
                f"\nbatch-1 decode {tok_s:.1f} tok/s on {torch.cuda.get_device_name(dev)}; LLM weights "
                f"{wbytes / 1e9:.3f} GB -> {tok_s * wbytes / 1e9:.0f} GB/s read; divide by the device's memory "
                f"bandwidth for the share of the roofline"
            )


if __name__ == "__main__":
    main()
