"""Memory per GPU and time per epoch of the paper's recipe (issue 21, item 7): LLaVA-1.6-7B, LoRA r
128 / alpha 256, bf16, FSDP2 on 8 GPUs and on 2 nodes x 8, as train_offline.py runs it.

    python bench/bench_memory.py                   # the tables, then the CPU check
    python bench/bench_memory.py --check false --mfu 0.35        # another assumed utilisation
    python bench/bench_memory.py --step_s 1.9 --measured_batch 2 # a step time bench_gpu.py measured

What is exact, what is measured, what is assumed:
- parameter counts: exact, from the 7B geometry (bench_gpu.llava16) built on the meta device with
  model.add_lora;
- weights: train_offline.py keeps fp32 master weights (`--dtype bfloat16` is an autocast), 4 B per
  parameter, sharded over the ranks by FSDP2. While a unit runs its parameters are gathered whole:
  the root (tower, projector, embeddings, LM head), which FSDP2 keeps gathered from forward to
  backward, and two decoder layers (the one running, the one prefetched). Trainable (LoRA,
  projector): fp32 gradients + AdamW's two moments, 12 B each, sharded;
- activations, measured at small scale: per decoder layer and pair of T tokens, the tensors autograd
  saves under bf16 autocast with fp32 weights are Wc + T·(26d + 8I + 14r + 4H + 8) + 2T² bytes (d
  width, I MLP width, r LoRA rank, H heads; MHA), where Wc = 2 B x the layer's weights (autocast's
  bf16 copies of the frozen weights, which the backward keeps) and 2T² the attention mask as SDPA
  keeps it (bf16). The coefficients come from torch's saved-tensor hooks on small CPU configs;
  `--check` measures them again on a config of its own, and the peak RSS of one PairModel
  forward+backward at two lengths. With gradient checkpointing a layer keeps only its fp32 input
  (4Td) and one layer at a time is recomputed. Outside the layers: the shared bool mask (T²), RoPE
  tables, the final norm (8Td), the LM head's bf16 weight copy and fp32 logits of the response
  tokens, the projector's activations. The backward's working set (three fp32 hidden-state gradients
  and the logits' gradient) is an estimate;
- --overhead_gb (CUDA context, allocator fragmentation, NCCL buffers): assumed, not measured;
- time per epoch: assumed, not measured (no GPU here): FLOPs executed per pair
  (bench_gpu.step_flops, plus the forward that checkpointing recomputes) / (GPUs x peak bf16 x
  --mfu); --step_s takes a measured step time of bench_gpu.py instead. The cached reference pass
  (one forward per pair, once per run) is shown apart.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_gpu  # noqa: E402
import train_offline as to  # noqa: E402
from model import parse_bool  # noqa: E402

GB = 1e9


def count(ps):
    return sum(p.numel() for p in ps)


def layer_bytes(vlm, T, b):
    """What a decoder layer saves for its backward, b pairs of T tokens: (constant, per-pair) B."""
    t, lm = vlm.cfg.text, vlm.model.language_model
    r = lm.layers[0].self_attn.q_proj.lora_A.shape[0]
    k = 26 * t.hidden_size + 8 * t.intermediate_size + 14 * r + 4 * t.num_attention_heads + 8
    return 2 * count(lm.layers[0].parameters()), b * (T * k + 2 * T * T)


def outside_bytes(vlm, T, R, n_feat, b):
    """Saved outside the layers: bool mask, RoPE tables, final norm, LM head (bf16 weight, fp32
    logits), projector (bf16 weights, activations)."""
    t, v = vlm.cfg.text, vlm.cfg.vision
    const = 2 * t.vocab_size * t.hidden_size  # the LM head's bf16 copy
    const += 2 * count(vlm.model.multi_modal_projector.parameters())
    per_pair = T * T + 8 * T * t.head_dim + 8 * T * t.hidden_size + 4 * R * t.vocab_size
    per_pair += n_feat * (2 * v.hidden_size + 4 * t.hidden_size)  # bf16 in, linear_1 and GELU out
    return const + b * per_pair


def memory(vlm, W, b, T, R, n_feat, ckpt, weight_bytes=4):
    """GB per GPU by term, for W ranks (FSDP2 when W > 1) and b pairs per micro-batch."""
    t, lm = vlm.cfg.text, vlm.model.language_model
    L, total = t.num_hidden_layers, count(vlm.parameters())
    layer = count(lm.layers[0].parameters())
    root = total - L * layer
    weights = total * weight_bytes / W + ((root + 2 * layer) * weight_bytes if W > 1 else 0)
    state = 12 * count(p for p in vlm.parameters() if p.requires_grad) / W
    const, per = layer_bytes(vlm, T, b)
    acts = L * b * 4 * T * t.hidden_size if ckpt else L * (const + per)
    acts += outside_bytes(vlm, T, R, n_feat, b)
    # in flight in the backward: hidden-state and logit gradients, and one layer's SDPA mask
    # conversions (the bool mask -> fp32 -> bf16, a torch profile shows them)
    work = b * (3 * 4 * T * t.hidden_size + 4 * R * t.vocab_size + 6 * T * T)
    work += (const + per) if ckpt else 0  # the layer being recomputed
    return dict(weights=weights / GB, state=state / GB, activations=acts / GB, backward=work / GB)


def largest_batch(vlm, W, T, R, n_feat, ckpt, cap, overhead):
    b = 0
    while b < 256 and sum(memory(vlm, W, b + 1, T, R, n_feat, ckpt).values()) + overhead <= cap:
        b += 1
    return b

# -----------------------------------------------------------------------------
# The check at small scale on CPU: saved-tensor bytes (exact) and peak RSS (what the process holds)


def small_model(ckpt=False):
    raw = bench_gpu.llava16(tiny=True)
    raw["text_config"].update(hidden_size=192, intermediate_size=520, num_hidden_layers=4,
                              num_attention_heads=6, num_key_value_heads=6)
    vlm = bench_gpu.materialize(bench_gpu.build(raw, torch.float32, (24, 48)), "cpu")
    vlm.model.language_model.checkpointing = ckpt
    return vlm


def saved_bytes(pm, batch):
    """Bytes of the tensors autograd saves in a forward (parameters aside), each storage once."""
    params = {p.untyped_storage().data_ptr() for p in pm.parameters()}
    seen = {}

    def pack(x):
        s = x.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return x
    amp = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), amp:
        pm(**batch)
    return sum(seen.values())


def rss_peak(resp, ckpt):
    """In a fresh process: {T: tokens, grow: peak RSS of a forward+backward over the RSS before}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--rss", str(resp), "--rss_ckpt", str(ckpt)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def rss_child(resp, ckpt):
    torch.set_num_threads(1)
    vlm = small_model(ckpt)
    pm = to.PairModel(vlm).train()
    batch, _ = bench_gpu.pair_batch(vlm, 1, (40, 53), 8, resp)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident size (VmHWM) restarts from the current one
    before = status_kb("VmRSS")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = pm(**batch)
    lp.sum().backward()
    grow = (status_kb("VmHWM") - before) * 1024
    print(json.dumps(dict(T=int((batch["segment"] >= 0).sum()), grow=grow)))


def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def check(lengths=(400, 1000)):
    """Predicted against measured activation bytes of a small model at two lengths."""
    print("\nCheck at small scale on CPU (width 192, MLP 520, 4 layers, 6 heads, LoRA r 24; fp32 "
          "weights, bf16 autocast; one pair, two responses of R tokens each):")
    print("| R | tokens | checkpointing | saved, measured (MB) | saved, model (MB) | peak RSS "
          "growth, measured (MB) | model + backward estimate (MB) |\n|---|---|---|---|---|---|---|")
    for ckpt in (False, True):
        vlm = small_model(ckpt)
        pm = to.PairModel(vlm).train()
        rows = []
        for resp in lengths:
            batch, n_img = bench_gpu.pair_batch(vlm, 1, (40, 53), 8, resp)
            T, R = int((batch["segment"] >= 0).sum()), 2 * resp
            n_feat = batch["pixel_values"].shape[1] * (vlm.cfg.vision.image_size // 14) ** 2
            m = memory(vlm, 1, 1, T, R, n_feat, ckpt)
            rows.append((rss_peak(resp, ckpt)["grow"] / 1e6,
                         (m["activations"] + m["backward"]) * 1e3))
            print(f"| {resp} | {T} | {ckpt} | {saved_bytes(pm, batch) / 1e6:.1f} | "
                  f"{m['activations'] * 1e3:.1f} | {rows[-1][0]:.1f} | {rows[-1][1]:.1f} |")
        growth = [b - a for a, b in zip(*rows)]  # the longer pair's extra: one-off costs cancel
        print(f"| | | {ckpt} | | | longer - shorter: {growth[0]:.1f} | {growth[1]:.1f} "
              f"(measured / model {growth[0] / growth[1]:.2f}) |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=5000)
    ap.add_argument("--batch_size", type=int, default=32, help="global pairs per optimizer step")
    ap.add_argument("--prompt_text", type=int, default=60, help="text tokens; the image adds 2,340")
    ap.add_argument("--response_tokens", type=int, default=250)
    ap.add_argument("--overhead_gb", type=float, default=3.0, help="assumed: CUDA context, NCCL...")
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    ap.add_argument("--mfu", type=float, default=0.40, help="assumed share of peak, FLOPs executed")
    ap.add_argument("--step_s", type=float, default=0.0, help="measured s/step (bench_gpu.py)")
    ap.add_argument("--measured_batch", type=int, default=2)
    ap.add_argument("--check", type=parse_bool, default=True)
    ap.add_argument("--rss", type=int, default=0)  # internal: one peak-RSS measurement
    ap.add_argument("--rss_ckpt", type=parse_bool, default=False)
    a = ap.parse_args(argv)
    if a.rss:
        return rss_child(a.rss, a.rss_ckpt)
    vlm = bench_gpu.build(bench_gpu.llava16(), torch.float32, (128, 256.0))  # meta: no memory
    batch, n_img = bench_gpu.pair_batch(vlm, 1, (480, 640), a.prompt_text, a.response_tokens)
    T, R = int((batch["segment"] >= 0).sum()), 2 * a.response_tokens
    n_feat = int((batch["pixel_values"].abs().flatten(2).sum(-1) > 0).sum()) * 576  # views x 576
    lora = count(p for n, p in vlm.named_parameters() if "lora_" in n)
    train = count(p for p in vlm.parameters() if p.requires_grad)
    print(f"LLaVA-1.6-7B geometry: {count(vlm.parameters()) / 1e9:.2f} B parameters, of which LoRA "
          f"(r 128) {lora / 1e6:.0f} M and trainable (LoRA + projector) {train / 1e6:.0f} M; "
          f"a pair is "
          f"{T} tokens ({n_img} image tokens, 640 x 480), responses {a.response_tokens} + "
          f"{a.response_tokens}; fp32 master weights, bf16 autocast; overhead {a.overhead_gb:g} GB "
          f"assumed; GB = 1e9 bytes")
    print("\n| GPUs | checkpointing | weights | LoRA + projector grads and AdamW | saved "
          "activations: constant (bf16 weight copies) | per pair | backward working set at 1 pair "
          "| total at 1 pair | largest micro-batch in 40 GB | in 80 GB |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for W in (8, 16):
        for ckpt in (True, False):
            m1, m2 = (memory(vlm, W, b, T, R, n_feat, ckpt) for b in (1, 2))
            tot = sum(m1.values()) + a.overhead_gb
            fits = [largest_batch(vlm, W, T, R, n_feat, ckpt, cap, a.overhead_gb)
                    for cap in (40, 80)]
            print(f"| {W} ({W // 8} x 8) | {'on' if ckpt else 'off'} | {m1['weights']:.1f} | "
                  f"{m1['state']:.2f} | {2 * m1['activations'] - m2['activations']:.2f} | "
                  f"{m2['activations'] - m1['activations']:.2f} | "
                  f"{m1['backward']:.2f} | {tot:.1f} | {fits[0]} | {fits[1]} |")
    flops = bench_gpu.step_flops(vlm, batch, n_img)  # model FLOPs of one pair's training step
    t = vlm.cfg.text
    layers = vlm.model.language_model.layers
    base = count(m.weight for m in layers.modules() if isinstance(m, torch.nn.Linear))
    fwd = 2 * base * T  # the linears' forward, which checkpointing runs again
    train_pairs = a.pairs - min(200, a.pairs // 10)  # train_offline holds out a tenth, at most 200
    steps = train_pairs // a.batch_size
    ref_flops = 2 * base * T + 2 * t.hidden_size * t.vocab_size * R  # the linears' forward
    print(f"\nTime per epoch of {a.pairs} pairs ({train_pairs} trained, {steps} steps of "
          f"{a.batch_size}); model FLOPs per pair {flops / 1e12:.1f} T, "
          f"{(flops + fwd) / 1e12:.1f} T executed with checkpointing; " +
          (f"measured {a.step_s} s per step of {a.measured_batch} pairs per GPU" if a.step_s
           else f"assumed {a.mfu:.0%} of {a.peak_tflops:g} TFLOP/s") +
          f"; the reference pass runs once per run ({ref_flops / 1e12:.1f} T per pair)")
    print("| GPUs | pairs per GPU per step | time per epoch (min) | reference pass (min) |\n"
          "|---|---|---|---|")
    peak = a.peak_tflops * 1e12
    for W in (8, 16):
        per_gpu = a.batch_size / W
        if a.step_s:  # a measured step of measured_batch pairs per GPU, scaled by the pairs
            epoch = steps * a.step_s * per_gpu / a.measured_batch
        else:
            epoch = steps * a.batch_size * (flops + fwd) / (W * peak * a.mfu)
        ref = a.pairs * ref_flops / (W * peak * a.mfu)
        print(f"| {W} | {per_gpu:g} | {epoch / 60:.1f} | {ref / 60:.1f} |")
    if a.check:
        check()


if __name__ == "__main__":
    main()
