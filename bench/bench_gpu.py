"""GPU figures (issue 21, item 6): batch-1 decode against the memory-bandwidth roofline, and a LoRA
DPO step on a 7B-geometry LLaVA-1.6 model with random weights, as tokens/s and model-FLOPs
utilisation (MFU), alone and under FSDP2.

    python bench/bench_gpu.py                       # both parts; FSDP2 too if more GPUs are visible
    torchrun --nproc_per_node 8 bench/bench_gpu.py --part dpo   # the DPO step under FSDP2 on 8 GPUs
    python bench/bench_gpu.py --tiny true --device cpu --fsdp_ranks 2   # tiny, on CPU (the test)

Decode (--part decode): bench_model.py's LLaVA-1.5-shaped model (Llama width 1024, 12 layers, vocab
32064) and the 7B geometry below, bf16, batch 1, a 596-token prompt (576 image tokens), --new_tokens
greedy tokens timed as their own loop (model.decode after model.prefill, the best of --reps). A
decode step must read every LLM weight once (the embedding table aside: one row) and the keys and
values written so far, so the roofline is bandwidth / those bytes tokens/s. The share printed is
measured tokens/s over that roofline.

DPO step (--part dpo): train_offline.py's LoRA path on LLaVA-1.6-vicuna-7b's geometry: CLIP
ViT-L/14-336 (width 1024, 24 layers), the 2-layer projector, vicuna-7b (width 4096, 32 layers, 32
heads, MLP 11008, vocab 32064), AnyRes over LLaVA-1.6's pinpoints. As `train_offline.py --lora_r 128
--lora_alpha 256 --dtype bfloat16 --grad_ckpt true`: fp32 master weights (the base frozen), bf16
autocast, LoRA on the LLM's seven linears, the projector trained, the tower frozen, AdamW, the
reference log-probs cached (computed once, not per step). Each pair is one packed row [prompt |
chosen | rejected]: a 640 x 480 image (COCO's usual size: 2,340 image tokens after AnyRes
unpadding), --prompt_text text tokens, two --response_tokens responses; about 2,900 tokens per pair.
The model is built on the meta device (sharded first under FSDP2) and filled with random values
where it lives.

Model FLOPs of a step (recomputation by gradient checkpointing not counted; T the tokens of a row,
R_k its responses' lengths, P its prompt's):
- LLM linears (frozen): forward 2·N·T and the input-gradient backward 2·N·T, N the decoder's linear
  weights; no weight gradients (the common 6·N·T counts them: it would report 1.5x this part);
- LoRA: 6·N_lora·T (forward, input and weight gradients); LM head on response positions only:
  4·d·V·ΣR_k;
- attention: 3 x the forward's 4·d·K per layer, K = the query-key pairs each row computes, causal
  within the prompt and within each response, each response seeing the prompt: P(P+1)/2 + Σ_k (R_k·P
  + R_k(R_k+1)/2);
- tower (frozen, no gradient): 2·N_tower·T_views + attention; projector: 4·N_proj·T_image (forward,
  weight grads). MFU = those FLOPs / (step time x GPUs x peak bf16 FLOP/s). Peaks and bandwidths
  (dense bf16, SXM parts unless named, from NVIDIA's data sheets; --peak_tflops and --bandwidth_gbs
  override): H200 989 TFLOP/s, 4,800 GB/s; H100 SXM 989, 3,350; H100 PCIe 756, 2,000; A100 80GB 312,
  2,039; A100 40GB 312, 1,555.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_model  # noqa: E402
import data  # noqa: E402
import losses  # noqa: E402
import model as M  # noqa: E402
import train_offline as to  # noqa: E402

# name substring -> (peak dense bf16 FLOP/s, memory bandwidth B/s); the first match wins
DEVICES = [("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12),
           ("A100-SXM4-40GB", 312e12, 1.555e12), ("A100", 312e12, 2.039e12)]


def llava16(tiny=False):
    """config.json of LLaVA-1.6-vicuna-7b's geometry, or a tiny one of its shape for CPU tests."""
    if tiny:
        v = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=28)
        t = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4)
        pins, image_token = [[x // 12 for x in p] for p in M.GRID_PINPOINTS], 4
    else:
        v = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, image_size=336)
        t = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32)
        pins, image_token = M.GRID_PINPOINTS, 32000
    return dict(model_type="llava_next", image_token_index=image_token, vision_feature_layer=-2,
                vision_feature_select_strategy="default", image_grid_pinpoints=pins,
                vision_config=dict(model_type="clip_vision_model", patch_size=14, **v),
                text_config=dict(model_type="llama", num_key_value_heads=t["num_attention_heads"],
                                 rms_norm_eps=1e-5, max_position_embeddings=4096, **t))


def llava15_tiny():
    """bench_model.py's config at a tiny width, for the decode part on CPU."""
    v = dict(bench_model.CONFIG["vision_config"], hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, image_size=28)
    t = dict(bench_model.CONFIG["text_config"], vocab_size=320, hidden_size=64,
             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4)
    return dict(bench_model.CONFIG, image_token_index=4, vision_config=v, text_config=t)


def build(raw, dtype, lora=None):
    """A VLM on the meta device in `dtype`, LoRA (r, alpha) added the way build_policy adds it."""
    with torch.device("meta"):
        vlm = M.VLM(M.parse_config(raw)).to(dtype)
    vlm.image_processor = M.ImageProcessor.default_for(vlm.cfg)
    if lora:
        vlm.requires_grad_(False)
        M.add_lora(vlm, *lora)
        vlm.model.multi_modal_projector.requires_grad_(True)
    return vlm


@torch.no_grad()
def materialize(module, device, seed=0):
    """Meta parameters (whole or FSDP shards) -> random values on `device`: normal(0, 0.02), norm
    gains 1, biases and LoRA's B 0 (so the policy starts as the reference, as in training)."""
    module.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    for name, p in module.named_parameters():
        t = p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 DTensor: this rank's shard
        if name.endswith("bias") or "lora_B" in name:
            t.zero_()
        elif t.dim() == 1 and "norm" in name:
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=g)
    return module


def device_specs(a, dev):
    """(peak bf16 FLOP/s, bandwidth B/s, name) from the flags, else from the device's name."""
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak, bw = a.peak_tflops * 1e12, a.bandwidth_gbs * 1e9
    for key, p, b in DEVICES:
        if key in name:
            peak, bw = peak or p, bw or b
            break
    return peak, bw, name


def sync_of(dev):
    return torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

# -----------------------------------------------------------------------------
# Part 1: batch-1 decode against the memory-bandwidth roofline


def decode_bytes(vlm, ctx):
    """Bytes one decode step reads: every LLM weight (the embedding's one row aside), the LM head,
    and the keys and values of `ctx` slots in every layer."""
    lm, t = vlm.model.language_model, vlm.cfg.text
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    weights = size(lm.parameters()) - size(lm.embed_tokens.parameters())
    weights += size(vlm.lm_head.parameters())
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * ctx
    kv *= vlm.lm_head.weight.element_size()
    return weights + kv


def decode_inputs(vlm, dev, dtype, n_text=20):
    """One prompt: the image's tokens, then n_text random text tokens; random pixels."""
    g = torch.Generator().manual_seed(0)
    n_img, img = vlm.image_token_counts()[0], vlm.cfg.image_token_id
    text = torch.randint(5, img if img > 5 else vlm.cfg.text.vocab_size, (n_text,), generator=g)
    ids = torch.cat([torch.full((n_img,), img), text])[None].to(dev)
    S = vlm.cfg.vision.image_size
    return ids, torch.ones_like(ids), torch.randn(1, 3, S, S, generator=g).to(dev, dtype)


def decode_roofline(a, name, raw, dev, bw):
    dtype = getattr(torch, a.dtype)
    vlm = materialize(build(raw, dtype), dev).eval()
    ids, am, px = decode_inputs(vlm, dev, dtype)
    K, sync = a.new_tokens, sync_of(dev)
    with torch.inference_mode():
        runs = [bench_model.ours_generation(vlm, ids, am, px, K, sync) for _ in range(a.reps)]
    tok_s = (K - 1) / min(r[1] for r in runs)  # K - 1 forwards: the prefill gives the first token
    nbytes = decode_bytes(vlm, ids.shape[1] + K // 2)  # the cache half-way through the decode
    roof = bw / nbytes if bw else float("nan")
    print(f"| {name} | {nbytes / 1e9:.3f} | {tok_s:.1f} | {tok_s * nbytes / 1e9:.1f} | "
          f"{roof:.0f} | {100 * tok_s / roof:.0f}% |")
    del vlm
    return tok_s / roof

# -----------------------------------------------------------------------------
# Part 2: a LoRA DPO step, alone or under FSDP2


def pair_batch(vlm, B, hw, prompt_text, response, seed=0):
    """B packed pairs (data.collate_pairs): an hw image each, a prompt of its image tokens and
    prompt_text random tokens, two random responses of `response` tokens."""
    g, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    img, V = vlm.cfg.image_token_id, vlm.cfg.text.vocab_size
    hi = img if img > 5 else V  # token ids 5.. that are neither special nor the image's

    def rand(n):
        return torch.randint(5, hi, (n,), generator=g).tolist()
    n_img = vlm.image_token_counts([hw])[0]
    from PIL import Image
    items = [dict(image=Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)),
                  prompt=[1] + rand(4) + [img] * n_img + rand(prompt_text - 4),
                  responses=[rand(response), rand(response)]) for _ in range(B)]
    return data.collate_pairs(vlm, items), n_img


def attention_pairs(batch):
    """(B,) query-key pairs of each packed row: causal in the prompt, a response sees the prompt
    and itself."""
    resp, T = (batch["targets"] != -100).sum(-1), (batch["segment"] >= 0).sum(-1)
    P = T - resp.sum(-1)
    return P * (P + 1) // 2 + (resp * P[:, None] + resp * (resp + 1) // 2).sum(-1)


def step_flops(vlm, batch, n_img):
    """Model FLOPs of one training step on `batch` (the formula in the module docstring)."""
    t, v = vlm.cfg.text, vlm.cfg.vision
    lm = vlm.model.language_model
    base = sum(m.weight.numel() for m in lm.layers.modules() if isinstance(m, torch.nn.Linear))
    lora = sum(p.numel() for n, p in lm.named_parameters() if "lora_" in n)
    resp, T = (batch["targets"] != -100).sum(-1), (batch["segment"] >= 0).sum(-1)  # (B, K), (B,)
    attn = 4 * t.num_attention_heads * t.head_dim * t.num_hidden_layers
    attn *= attention_pairs(batch).sum().item()
    flops = 4 * base * T.sum().item() + 6 * lora * T.sum().item() + 3 * attn
    flops += 4 * t.hidden_size * t.vocab_size * resp.sum().item()
    p = v.image_size // v.patch_size
    grids = [vlm._unpadded_grid(tuple(map(int, hw)), p)[1] for hw in batch["image_sizes"]]
    n_views = sum(1 + gh * gw for gh, gw, _ in grids)
    Tv = (v.image_size // v.patch_size) ** 2 + 1
    layers = max(i % (v.num_hidden_layers + 1) for i in vlm.cfg.feature_layers)  # those LLaVA runs
    tower = layers * (2 * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size) * Tv
                      + 4 * v.hidden_size * Tv * Tv)
    proj = sum(p.numel() for p in vlm.model.multi_modal_projector.parameters())
    return flops + n_views * tower + 4 * proj * n_img * len(T)


def dpo_step(a, raw, dev, peak, ranks):
    """Times train_offline's LoRA DPO step; prints tokens/s, MFU and peak memory (rank 0)."""
    vlm = build(raw, getattr(torch, a.weights), (a.lora_r, a.lora_alpha))
    vlm.model.language_model.checkpointing = a.grad_ckpt
    pm = to.PairModel(vlm)
    if ranks.W > 1:  # as build_policy: each decoder layer its own unit, the rest the root's
        from torch.distributed.fsdp import fully_shard
        for layer in vlm.model.language_model.layers:
            fully_shard(layer)
        fully_shard(pm)
    materialize(pm, dev)  # sharded first: each rank fills only its shards
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0)
    batch, n_img = pair_batch(vlm, a.batch, a.image_hw, a.prompt_text, a.response_tokens,
                              seed=ranks.rank)
    batch = to.to(batch, dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.autocast)
    sync = sync_of(dev)
    with torch.no_grad(), amp:
        ref = pm(**batch)[0].sum(-1)  # the cached reference: computed once per pair, not per step
    times = []
    for _ in range(a.steps):
        ranks.barrier()
        sync()
        t0 = time.perf_counter()
        with amp:
            lp, _ = pm(**batch)
            loss = losses.preference_loss("dpo", lp.sum(-1), ref, to.counts(batch), 0.1)[0].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[1:] or times)
    tokens = int((batch["segment"] >= 0).sum()) * ranks.W
    flops = step_flops(vlm, to.to(batch, "cpu"), n_img) * ranks.W
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    n_lora = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)  # DTensors: global
    mfu = 100 * flops / (step * ranks.W * peak) if peak else float("nan")
    per = tokens // (a.batch * ranks.W)
    ranks.print(f"\nLoRA DPO step, {'FSDP2 on ' if ranks.W > 1 else ''}{ranks.W} {dev.type} "
                f"device(s): {a.batch} pair(s) per device of {per} tokens ({n_img} image tokens), "
                f"LoRA r {a.lora_r} / alpha {a.lora_alpha:g} ({n_lora:,} parameters), "
                f"{a.weights} weights, bf16 autocast {a.autocast}, grad_ckpt {a.grad_ckpt}")
    ranks.print(f"| devices | s/step (median of {len(times) - 1 or 1}) | tokens/s | TFLOP/step | "
                f"MFU | peak GiB |\n|---|---|---|---|---|---|\n| {ranks.W} | {step:.3f} | "
                f"{tokens / step:,.0f} | {flops / 1e12:.3g} | {mfu:.1f}% | {mem:.1f} |")
    return tokens / step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", choices=["all", "decode", "dpo"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", type=M.parse_bool, default=False, help="tiny geometries (CPU tests)")
    ap.add_argument("--bandwidth_gbs", type=float, default=0.0, help="0: from the device name")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="dense bf16; 0: from the name")
    ap.add_argument("--dtype", default="bfloat16", help="decode weights")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2, help="pairs per device and step")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompt_text", type=int, default=60)
    ap.add_argument("--response_tokens", type=int, default=250)
    ap.add_argument("--lora_r", type=int, default=128)
    ap.add_argument("--lora_alpha", type=float, default=256.0)
    ap.add_argument("--weights", default="float32", help="master weights (train_offline: float32)")
    ap.add_argument("--autocast", type=M.parse_bool, default=True, help="bf16 (--dtype bfloat16)")
    ap.add_argument("--grad_ckpt", type=M.parse_bool, default=True)
    ap.add_argument("--fsdp_ranks", type=int, default=-1,
                    help="ranks of the FSDP2 run; -1: the visible GPUs if more than one, 0: none")
    a = ap.parse_args(argv)
    a.image_hw = (40, 53) if a.tiny else (480, 640)
    if a.tiny:
        a.prompt_text, a.response_tokens = min(a.prompt_text, 8), min(a.response_tokens, 12)
    ranks = to.Ranks()
    if ranks.W > 1 and ranks.device.startswith("cuda"):
        torch.cuda.set_device(ranks.device)
    dev = torch.device(ranks.device if ranks.W > 1 else a.device)
    peak, bw, name = device_specs(a, dev)
    ranks.print(f"device {name}, peak bf16 {peak / 1e12:.0f} TFLOP/s, bandwidth "
                f"{bw / 1e9:.0f} GB/s, torch {torch.__version__}")
    torch.manual_seed(0)
    if a.part in ("all", "decode") and ranks.W == 1:
        print(f"\nbatch-1 decode, {a.dtype}, {a.new_tokens} new tokens, best of {a.reps}\n"
              f"| model | GB read per token | tok/s | GB/s | roofline tok/s | share |\n"
              f"|---|---|---|---|---|---|")
        models = {"tiny LLaVA-1.5": llava15_tiny()} if a.tiny else \
            {"bench_model.py's (1024 x 12)": bench_model.CONFIG,  # decode reads the LLM only: llava
             "7B geometry (vicuna-7b LLM)": dict(llava16(), model_type="llava")}
        for n, raw in models.items():
            decode_roofline(a, n, raw, dev, bw)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if a.part in ("all", "dpo"):
        dpo_step(a, llava16(a.tiny), dev, peak, ranks)
    n = a.fsdp_ranks if a.fsdp_ranks >= 0 else torch.cuda.device_count() * (dev.type == "cuda")
    if a.part in ("all", "dpo") and ranks.W == 1 and n > 1:  # FSDP2, a process per GPU
        args = argv if argv is not None else sys.argv[1:]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(n), os.path.abspath(__file__), *args, "--part", "dpo"]
        subprocess.run(cmd, check=True)
    if ranks.W > 1:
        ranks.end()


if __name__ == "__main__":
    main()
