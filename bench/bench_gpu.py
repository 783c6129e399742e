"""The GPU check (issue 29, item 8): one table, in at most 4 minutes on one H100, of what only a GPU
shows. Each row runs on its own: a failure prints its error in that row and the others still run.
A row is printed as soon as it ends, and --out (JSON) is rewritten after each row, so a `timeout`
keeps every row that finished.

    python bench/bench_gpu.py --out gpu.json            # every row, on the visible GPU
    python bench/bench_gpu.py --part dpo,decode         # some rows only
    torchrun --nproc_per_node 8 bench/bench_gpu.py --part dpo   # the DPO step under FSDP2, 8 GPUs
    python bench/bench_gpu.py --tiny true --device cpu  # tiny shapes on CPU, seconds (the test)

Rows (--part, comma-separated; all by default):
- parity: model.py against transformers' LlavaNextForConditionalGeneration on the same random
  weights stored in --dtype (bf16), LLaVA-1.6-7B's geometry with --parity_layers decoder layers,
  one 640 x 480 image's prompt: the max |Δ| of the logits, and whether 8 greedy ids agree. Without
  transformers, or without that class in it: "n/a" and why.
- dpo: one LoRA DPO step through train_offline.py's own code: its Config, Ranks, build_policy (the
  checkpoint load swapped for random weights of the 7B geometry, made where they run: writing a 7B
  checkpoint to read back would take minutes), reference_logps (the cached reference, in a
  temporary --cache_dir), by_length, PairModel, pair_loss, pair_stats and optimizer_step, as
  main() calls them. s/step, MFU, peak memory (allocated, over the build, the reference pass and
  the steps), and the max |Δ| between the cached reference's log-probs and the policy's at step 0
  (the same weights there: any gap is precision).
- kernel: the attention a packed pair's mask gets: the attention ops the LLM's forward calls (from
  the profiler; a Flex path shows there as well), model.py's Flex switch if it has one, which SDPA
  backends accept the mask when forced (sdpa_kernel), and one layer's attention with the mask
  against plain causal at the same length.
- syncs: host syncs per decode token of VLM.generate, batch 1, the decode model below. On CUDA the
  warnings of torch.cuda.set_sync_debug_mode("warn"); on CPU the calls that would sync on a GPU
  (item, bool, int, float, index, tolist, numpy), counted. (syncs of 2n new tokens - syncs of n) / n,
  so the prefill's and the result's syncs cancel.
- decode: batch-1 decode tokens/s against the bandwidth roofline (below).

Decode: the 7B geometry as LLaVA-1.5 (no AnyRes: a 596-token prompt, 576 image tokens), --dtype
weights, batch 1, --new_tokens greedy tokens timed as their own loop (model.decode after
model.prefill, the best of --reps). A decode step must read every LLM weight once (the embedding
table aside: one row) and the keys and values written so far, so the roofline is bandwidth / those
bytes tokens/s; the share is measured tokens/s over that roofline.

DPO step: LLaVA-1.6-vicuna-7b's geometry: CLIP ViT-L/14-336 (width 1024, 24 layers), the 2-layer
projector, vicuna-7b (width 4096, 32 layers, 32 heads, MLP 11008, vocab 32064), AnyRes over
LLaVA-1.6's pinpoints. As `train_offline.py --lora_r 128 --lora_alpha 256 --dtype bfloat16
--grad_ckpt true`: the weights as build_policy keeps them, LoRA on the LLM's seven linears, the
projector trained, the tower frozen, AdamW. Each pair is one packed row [prompt | chosen |
rejected]: a 640 x 480 image (COCO's usual size: 2,340 image tokens after AnyRes unpadding),
--prompt_text text tokens, two --response_tokens responses; about 2,900 tokens per pair, --batch
pairs per device, split in train_offline.PARTS forwards as its loop splits them.

Model FLOPs of a step (recomputation by gradient checkpointing not counted; T the tokens of a row,
R_k its responses' lengths, P its prompt's):
- LLM linears (frozen), N the decoder's linear weights: "MFU" counts the standard 6·N·T (forward
  2·N·T, backward 4·N·T, as if their weight gradients were computed: the convention MFU is usually
  quoted in); "MFU 4NT" counts 4·N·T (forward, and the input-gradient half of the backward: all
  the step computes, as no frozen weight gets a gradient);
- LoRA: 6·N_lora·T (forward, input and weight gradients); LM head on response positions only:
  4·d·V·ΣR_k;
- attention: 3 x the forward's 4·d·K per layer, K = the query-key pairs each row computes, causal
  within the prompt and within each response, each response seeing the prompt: P(P+1)/2 + Σ_k (R_k·P
  + R_k(R_k+1)/2);
- tower (frozen, no gradient): 2·N_tower·T_views + attention; projector: 4·N_proj·T_image (forward,
  weight grads). MFU = those FLOPs / (step time x GPUs x peak bf16 FLOP/s). Peaks and bandwidths
  (dense bf16, SXM parts unless named, from NVIDIA's data sheets; --peak_tflops and --bandwidth
  override): H200 989 TFLOP/s, 4,800 GB/s; H100 SXM 989, 3,350; H100 PCIe 756, 2,000; A100 80GB 312,
  2,039; A100 40GB 312, 1,555.
"""

import argparse
import contextlib
import datetime
import gc
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_model  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import hub  # noqa: E402
import model as M  # noqa: E402
import train_offline as to  # noqa: E402

# name substring -> (peak dense bf16 FLOP/s, memory bandwidth B/s); the first match wins
DEVICES = [
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("A100-SXM4-40GB", 312e12, 1.555e12),
    ("A100", 312e12, 2.039e12),
]
PARTS = ("parity", "dpo", "kernel", "syncs", "decode")
HF_CLASSES = {
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
}  # transformers' class per model_type


def llava16(tiny=False, layers=None):
    """config.json of LLaVA-1.6-vicuna-7b's geometry, or a tiny one of its shape for CPU tests;
    `layers`: that many decoder layers instead of the model's."""
    if tiny:
        v = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
        )
        t = dict(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
        pins, image_token = [[x // 12 for x in p] for p in M.GRID_PINPOINTS], 4
    else:
        v = dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
        )
        t = dict(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
        )
        pins, image_token = M.GRID_PINPOINTS, 32000
    if layers:
        t["num_hidden_layers"] = layers
    return dict(
        model_type="llava_next",
        image_token_index=image_token,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=pins,
        vision_config=dict(model_type="clip_vision_model", patch_size=14, **v),
        text_config=dict(
            model_type="llama",
            num_key_value_heads=t["num_attention_heads"],
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
            **t,
        ),
    )


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
    return fill_random(module, device, seed)


@torch.no_grad()
def fill_random(module, device, seed=0, skip=()):
    """materialize's values, in place, for the parameters whose names hold none of `skip`."""
    g = torch.Generator(device).manual_seed(seed)
    for name, p in module.named_parameters():
        if any(s in name for s in skip):
            continue
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


def shown(x, unit="", digits=1):
    """A figure for the table; NaN (no peak or bandwidth known: --peak_tflops, --bandwidth) is n/a."""
    return "n/a" if x != x else f"{x:.{digits}f}{unit}"


def plain(x):
    """A row's figures for JSON: NaN becomes null (JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return None if isinstance(x, float) and x != x else x


def free(dev):
    """Returns the memory of the row that ended (its objects are gone) to the device."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def prompt_inputs(vlm, hw, n_text, dev, seed=0):
    """One prompt of a random hw image: BOS, 4 text tokens, the image's tokens, n_text text tokens
    -> input_ids (1, T), attention_mask, and the image processor's pixel_values (and image_sizes)."""
    from PIL import Image

    g, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    img, V = vlm.cfg.image_token_id, vlm.cfg.text.vocab_size
    hi = img if img > 5 else V  # token ids 5.. that are neither special nor the image's
    pix = vlm.image_processor([Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))])
    n_img = vlm.image_token_counts(pix.get("image_sizes"))[0]
    text = torch.randint(5, hi, (4 + n_text,), generator=g)
    ids = torch.cat([torch.tensor([1]), text[:4], torch.full((n_img,), img), text[4:]])[None]
    pix["pixel_values"] = pix["pixel_values"].to(dev, vlm.lm_head.weight.dtype)
    return dict(
        input_ids=ids.to(dev),
        attention_mask=torch.ones_like(ids).to(dev),
        **{k: v.to(dev) for k, v in pix.items()},
    )


# -----------------------------------------------------------------------------
# The table: a markdown row on stdout as each check ends, and the whole as JSON in --out


class Table:
    """Runs each row in turn; a row's failure becomes its cells. `show` False (ranks > 0): silent."""

    def __init__(self, out, head, show=True):
        self.out, self.head, self.show, self.rows = out, head, show, {}
        if show:
            print("\n| check | result | detail |\n|---|---|---|", flush=True)

    def run(self, key, title, fn, *args):
        """fn(*args) -> a dict with "result" and "detail" (text) and any figures (JSON). What the
        row prints (build_policy's lines...) goes to the JSON's "log", not into the table."""
        out, t0 = io.StringIO(), time.perf_counter()
        try:
            with contextlib.redirect_stdout(out):
                row = fn(*args)
        except Exception as e:  # any failure is this row's result, not the run's
            traceback.print_exc()
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            row = dict(result="error", detail=msg, error=msg)
        row = dict(
            row, title=title, seconds=round(time.perf_counter() - t0, 1), log=out.getvalue()[-2000:]
        )
        self.rows[key] = row
        cell = (row["detail"] or "").replace("|", "/")
        if self.show:
            print(f"| {title} | {row['result']} | {cell} |", flush=True)
            if self.out:  # rewritten after each row: a timeout keeps the rows that ended
                with open(self.out + ".tmp", "w") as f:
                    json.dump(plain(dict(self.head, rows=self.rows)), f, indent=1)
                os.replace(self.out + ".tmp", self.out)
        return row


# -----------------------------------------------------------------------------
# Row parity: bf16 logits and greedy ids of model.py against transformers, the same random weights


def hf_twin(vlm, raw, dev):
    """transformers' model of `raw` on `dev`, holding vlm's weights (every parameter of theirs
    filled from ours, and all of ours used; keys as they lay them out, in any version)."""
    import transformers
    from transformers import AutoConfig

    cls = getattr(transformers, HF_CLASSES[raw["model_type"]])  # AttributeError: reported as n/a
    with tempfile.TemporaryDirectory() as tmp:  # through config.json, as a checkpoint loads
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(raw, f)
        config = AutoConfig.from_pretrained(tmp)
    with torch.device(dev):  # built where it runs: no host copy of the weights
        hf = cls(config)
    hf = hf.to(vlm.lm_head.weight.dtype).eval()
    ours = vlm.state_dict()
    sd = {k: ours[hub.hf_name(k)] for k in hf.state_dict() if hub.hf_name(k) in ours}
    missing = [k for k, _ in hf.named_parameters() if k not in sd]
    unused = set(ours) - {hub.hf_name(k) for k in sd}
    if missing or unused:
        raise KeyError(
            f"weights do not match: transformers' {missing[:3]}, ours {sorted(unused)[:3]}"
        )
    hf.load_state_dict(sd, strict=False)  # what it leaves out: buffers (position ids, RoPE)
    hf.generation_config.eos_token_id = None  # random weights: exactly N new tokens on both sides
    hf.generation_config.pad_token_id = 0
    return hf, cls.__name__


@torch.no_grad()
def parity_row(a, dev):
    try:
        import transformers

        version = transformers.__version__
    except ImportError as e:
        return dict(result="n/a", detail=f"no transformers: {e}")
    raw = llava16(a.tiny, a.parity_layers)
    vlm = materialize(build(raw, getattr(torch, a.dtype)), dev).eval()
    try:
        hf, cls = hf_twin(vlm, raw, dev)
    except AttributeError as e:  # an old transformers without the class
        return dict(result="n/a", detail=f"transformers {version}: {e}")
    x = prompt_inputs(vlm, a.image_hw, 20, dev)
    theirs = hf(**x).logits.float()  # (1, T, V)
    ours = vlm(**x).float()
    N = 8
    ref = hf.generate(**x, max_new_tokens=N, do_sample=False)[0, x["input_ids"].shape[1] :].tolist()
    got = vlm.generate(
        x["input_ids"],
        x["attention_mask"],
        x["pixel_values"],
        x.get("image_sizes"),
        max_new_tokens=N,
        eos_token_id=[],
    )[0]
    delta = float((ours - theirs).abs().max())
    same = [i for i in range(N) if got[i : i + 1] != ref[i : i + 1]]
    ids = "greedy ids equal" if not same else f"greedy ids differ from new token {same[0]}"
    argmax = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    L = vlm.cfg.text.num_hidden_layers
    return dict(
        result=f"max abs Δ {delta:.3g}; {ids} ({N} new)",
        max_abs_delta=delta,
        greedy_equal=not same,
        argmax_agree=argmax,
        ours=got,
        transformers=ref,
        detail=f"transformers {version} {cls}, {a.dtype}, {L} decoder layers, "
        f"{x['input_ids'].shape[1]} tokens, max abs logit "
        f"{float(theirs.abs().max()):.3g}, argmax agrees at {100 * argmax:.1f}%",
    )


# -----------------------------------------------------------------------------
# Row dpo: one LoRA DPO step through train_offline's own functions


def pair_items(vlm, B, hw, prompt_text, response, seed=0):
    """B pairs as train_offline's items: an hw image each, a prompt of its image tokens and
    prompt_text random tokens, two random responses of `response` tokens -> (items, image tokens)."""
    from PIL import Image

    g, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    img, V = vlm.cfg.image_token_id, vlm.cfg.text.vocab_size
    hi = img if img > 5 else V  # token ids 5.. that are neither special nor the image's

    def rand(n):
        return torch.randint(5, hi, (n,), generator=g).tolist()

    n_img = vlm.image_token_counts([hw])[0]
    items = [
        dict(
            image=Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)),
            prompt=[1] + rand(4) + [img] * n_img + rand(prompt_text - 4),
            responses=[rand(response), rand(response)],
        )
        for _ in range(B)
    ]
    return items, n_img


def pair_batch(vlm, B, hw, prompt_text, response, seed=0):
    """B packed pairs (data.collate_pairs) of pair_items -> (batch, image tokens per pair)."""
    items, n_img = pair_items(vlm, B, hw, prompt_text, response, seed)
    return data.collate_pairs(vlm, items), n_img


def attention_pairs(batch):
    """(B,) query-key pairs of each packed row: causal in the prompt, a response sees the prompt
    and itself."""
    resp, T = (batch["targets"] != -100).sum(-1), (batch["segment"] >= 0).sum(-1)
    P = T - resp.sum(-1)
    return P * (P + 1) // 2 + (resp * P[:, None] + resp * (resp + 1) // 2).sum(-1)


def step_flops(vlm, batch, n_img, base=4):
    """Model FLOPs of one training step on `batch` (the formula in the module docstring); `base`:
    FLOPs per frozen LLM weight and token, 4 (what is computed) or 6 (the standard count)."""
    t, v = vlm.cfg.text, vlm.cfg.vision
    lm = vlm.model.language_model
    frozen = sum(m.weight.numel() for m in lm.layers.modules() if isinstance(m, torch.nn.Linear))
    lora = sum(p.numel() for n, p in lm.named_parameters() if "lora_" in n)
    resp, T = (batch["targets"] != -100).sum(-1), (batch["segment"] >= 0).sum(-1)  # (B, K), (B,)
    attn = 4 * t.num_attention_heads * t.head_dim * t.num_hidden_layers
    attn *= attention_pairs(batch).sum().item()
    flops = base * frozen * T.sum().item() + 6 * lora * T.sum().item() + 3 * attn
    flops += 4 * t.hidden_size * t.vocab_size * resp.sum().item()
    p = v.image_size // v.patch_size
    grids = [vlm._unpadded_grid(tuple(map(int, hw)), p)[1] for hw in batch["image_sizes"]]
    n_views = sum(1 + gh * gw for gh, gw, _ in grids)
    Tv = (v.image_size // v.patch_size) ** 2 + 1
    layers = max(i % (v.num_hidden_layers + 1) for i in vlm.cfg.feature_layers)  # those LLaVA runs
    tower = layers * (
        2 * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) * Tv
        + 4 * v.hidden_size * Tv * Tv
    )
    proj = sum(p.numel() for p in vlm.model.multi_modal_projector.parameters())
    return flops + n_views * tower + 4 * proj * n_img * len(T)


@contextlib.contextmanager
def random_checkpoint(raw, dev):
    """Within the block VLM.from_pretrained gives random weights of `raw` on `dev`, in the dtype
    asked, instead of reading a checkpoint: build_policy runs as it is, on the 7B geometry."""
    saved, saved_load = M.VLM.__dict__["from_pretrained"], hub.load_weights

    def load(path, dtype=torch.float32, device=None, template="", **kw):
        vlm = build(raw, dtype)  # on the meta device, as --fsdp asks: its shards are filled below
        vlm.folder = None
        if device != "meta":
            vlm = materialize(vlm, dev)
        vlm.template, vlm.template_source = "vicuna", f"{path}: random weights"
        return vlm

    def fill_shards(vlm, path, raw, dtype, device):  # --fsdp's read of each rank's rows
        fill_random(vlm, device, skip=("lora_",))

    M.VLM.from_pretrained = staticmethod(load)
    hub.load_weights = fill_shards
    try:
        yield
    finally:
        M.VLM.from_pretrained = saved
        hub.load_weights = saved_load


def dpo_row(a, dev, peak, ranks):
    """train_offline.main()'s step, timed: --steps steps after one untimed (allocation, autotuning)."""
    W = ranks.W
    cfg = to.Config(
        model=f"random {'tiny' if a.tiny else '7B'} geometry",
        lora_r=a.lora_r,
        lora_alpha=a.lora_alpha,
        beta=0.1,
        rpo_alpha=0.0,
        lr=1e-6,
        lr_projector=2e-5,
        warmup=1,
        batch_size=a.batch * W,
        steps=a.steps + 1,
        grad_ckpt=a.grad_ckpt,
        dtype="bfloat16" if a.autocast else "float32",
        fsdp=W > 1,
        cache_dir=a.cache_dir,
    )
    sync = sync_of(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(cfg.seed)  # as main(): LoRA's initial A, the same on every rank
    with random_checkpoint(llava16(a.tiny), dev):
        pm, model, opt = to.build_policy(cfg, ranks)
    vlm = pm.vlm
    items, n_img = pair_items(vlm, cfg.batch_size, a.image_hw, a.prompt_text, a.response_tokens)
    t0 = time.perf_counter()
    ref = to.reference_logps(cfg, pm, items, a.batch, ranks)  # (N, K): the cache, as main() has it
    ref_s = time.perf_counter() - t0
    amp = torch.autocast(dev.type, dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32")
    parts = to.by_length(
        list(range(ranks.rank, cfg.batch_size, W)), items, dev.type
    )  # this rank's pairs
    times, delta, flops, flops_4nt, tokens, sums = [], 0.0, 0, 0, 0, {}
    for step in range(cfg.steps):
        ranks.barrier()
        sync()
        t0 = time.perf_counter()
        for k, idx in enumerate(parts):  # main()'s micro-step, one part at a time
            batch = to.to(data.collate_pairs(vlm, [items[i] for i in idx]), dev)
            with ranks.sync_grads(model, k == len(parts) - 1), amp:
                token_lp, scores = model(**batch)  # (b, K, L)
                loss, chosen, rejected = to.pair_loss(cfg, pm, batch, token_lp, scores, ref, idx)
                (loss.sum() / a.batch).backward()
            stats = to.pair_stats(loss, chosen, rejected, token_lp)  # its syncs are the step's
            if step == 0:  # the policy is the reference here: their gap is precision alone
                to.accumulate(sums, stats)
                gap = (token_lp.detach().sum(-1).cpu() - ref[idx]).abs().max()
                delta = max(delta, float(gap))
                cpu = to.to(batch, "cpu")
                # the frozen base's matmuls: 6·N·T, the standard count (2·N·T forward + 4·N·T
                # backward), for "MFU"; 4·N·T, what the step computes (no weight grads), "MFU 4NT"
                flops += step_flops(vlm, cpu, n_img, base=6) * W
                flops_4nt += step_flops(vlm, cpu, n_img) * W
                tokens += int((cpu["segment"] >= 0).sum()) * W
        to.optimizer_step(cfg, pm, opt, step, cfg.steps)
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    mfu = 100 * flops / (step_s * W * peak) if peak else float("nan")
    mfu4 = 100 * flops_4nt / (step_s * W * peak) if peak else float("nan")
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    n_lora = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)  # DTensors: global
    weights = str(next(p for n, p in pm.named_parameters() if "q_proj.weight" in n).dtype)
    sums, _ = to.to_host(sums)
    r = {k: s / max(n, 1) for k, (s, n) in sums.items()}  # step 0's metrics
    del model, pm, vlm, opt
    mem_text = f"{mem:.1f} GiB" if dev.type == "cuda" else "n/a (not CUDA)"
    return dict(
        result=f"{step_s:.3f} s/step; MFU {shown(mfu, '%')} (6NT), {shown(mfu4, '%')} "
        f"(4NT); peak {mem_text}; step-0 max abs Δ(ref, policy) {delta:.3g}",
        s_per_step=step_s,
        mfu_6nt=mfu,
        mfu_4nt=mfu4,
        peak_gib=mem,
        ref_delta=delta,
        tokens_per_s=tokens / step_s,
        tflop_per_step=flops / 1e12,
        ref_pass_s=ref_s,
        rewards_chosen=r["rewards/chosen"],
        rewards_rejected=r["rewards/rejected"],
        detail=f"{W} {dev.type} device(s){', FSDP2' if W > 1 else ''}, {a.batch} pair(s) "
        f"per device of {tokens // cfg.batch_size:,} tokens ({n_img} image), "
        f"{len(parts)} forward(s), median of {len(times) - 1}; {tokens / step_s:,.0f}"
        f" tokens/s, {flops / 1e12:.3g} TFLOP/step (6NT); LoRA r {a.lora_r} "
        f"({n_lora:,}), base {weights}, --dtype {cfg.dtype}, grad_ckpt "
        f"{a.grad_ckpt}; reference pass {ref_s:.1f} s",
    )


# -----------------------------------------------------------------------------
# Row kernel: which attention a packed pair's mask gets


def attention_ops(prof):
    """The attention ops a profile saw: SDPA's backends (aten::_scaled_dot_product_*), Flex's."""
    names = {e.key for e in prof.key_averages()}
    return sorted(
        n
        for n in names
        if n != "aten::scaled_dot_product_attention"
        and ("scaled_dot_product" in n or "flex" in n.lower())
    )


def kernel_row(a, dev):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    dtype = getattr(torch, a.dtype)
    vlm = materialize(build(llava16(a.tiny, 1), dtype), dev).eval()  # one decoder layer is enough
    batch = to.to(pair_batch(vlm, 1, a.image_hw, a.prompt_text, a.response_tokens)[0], dev)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    with torch.no_grad():
        feats = vlm.encode_images(batch["pixel_values"], batch["image_sizes"])

        def encoded(*args, **kw):  # the tower's own (unmasked) attention stays out of the profile
            return feats

        vlm.encode_images = encoded
        pm = to.PairModel(vlm)
        pm(**batch)  # warm-up: a lazy path (a compiled Flex) builds here
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            pm(**batch)
    ops = attention_ops(prof) or ["none seen"]
    switch = [n for n in dir(M) if "flex" in n.lower()]
    # the same mask as model.py's packed forward, (1, 1, T, T), against SDPA's backends
    seg = batch["segment"]
    B, T = seg.shape
    mask = M.attention_mask_4d(seg >= 0, torch.arange(T, device=dev).expand(B, T), None, seg)
    t = vlm.cfg.text
    q, k, v = torch.randn(3, B, t.num_attention_heads, T, t.head_dim, device=dev, dtype=dtype)
    backends = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    takes = {}
    for name in backends:
        if hasattr(SDPBackend, name):
            try:
                with warnings.catch_warnings(), sdpa_kernel(getattr(SDPBackend, name)):
                    warnings.simplefilter("ignore")  # "... not used because": the answer we want
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                takes[name.split("_")[0].lower()] = True
            except RuntimeError:
                takes[name.split("_")[0].lower()] = False
    sync, ms = sync_of(dev), {}
    for key, kw in (("masked", dict(attn_mask=mask)), ("causal", dict(is_causal=True))):
        F.scaled_dot_product_attention(q, k, v, **kw)
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            F.scaled_dot_product_attention(q, k, v, **kw)
        sync()
        ms[key] = 1e3 * (time.perf_counter() - t0) / 5
    short = [o.replace("aten::_scaled_dot_product_", "").replace("aten::", "") for o in ops]
    accepted = ", ".join(f"{n} {'yes' if ok else 'no'}" for n, ok in takes.items())
    return dict(
        result=f"{' + '.join(short)} (model.py: {', '.join(switch) or 'SDPA, no Flex path'})",
        ops=ops,
        flex_switch=switch,
        accepted=takes,
        masked_ms=ms["masked"],
        causal_ms=ms["causal"],
        detail=f"T {T}, {a.dtype}; the mask forced on each backend: {accepted}; one layer's "
        f"attention: masked {ms['masked']:.2f} ms, plain causal {ms['causal']:.2f} ms",
    )


# -----------------------------------------------------------------------------
# Rows syncs and decode: batch-1 decode of the 7B geometry


class SyncCount:
    """Host syncs within a `with` block, in `.n` after it. CUDA: the warnings that
    set_sync_debug_mode("warn") raises; elsewhere, the calls on tensors that would sync on a GPU."""

    CALLS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, dev):
        self.dev, self.n = dev, 0

    def __enter__(self):
        if self.dev.type == "cuda":
            self.caught = warnings.catch_warnings(record=True)
            self.seen = self.caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            return self
        self.saved = {name: vars(torch.Tensor).get(name) for name in self.CALLS}
        for name in self.CALLS:
            setattr(torch.Tensor, name, self.counted(getattr(torch.Tensor, name)))
        return self

    def counted(self, fn):
        def call(*args, **kw):
            self.n += 1
            return fn(*args, **kw)

        return call

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            self.n = sum("synchroniz" in str(w.message) for w in self.seen)
            self.caught.__exit__(*exc)
            return False
        for name, fn in self.saved.items():
            if fn is None:
                delattr(torch.Tensor, name)  # it was inherited: the base's comes back
            else:
                setattr(torch.Tensor, name, fn)
        return False


def decode_model(a, dev, cache):
    """The 7B geometry as LLaVA-1.5 (decode reads the LLM only), --dtype weights; built once."""
    if "vlm" not in cache:
        raw = dict(llava16(a.tiny), model_type="llava")
        cache["vlm"] = materialize(build(raw, getattr(torch, a.dtype)), dev).eval()
    return cache["vlm"]


def syncs_row(a, dev, cache):
    vlm = decode_model(a, dev, cache)
    x = decode_inputs(vlm, dev, vlm.lm_head.weight.dtype)
    n = max(1, a.new_tokens // 2)
    counts = []
    for K in (n, 2 * n):
        with SyncCount(dev) as c:
            vlm.generate(x[0], x[1], x[2], max_new_tokens=K, eos_token_id=[])
        counts.append(c.n)
    per = (counts[1] - counts[0]) / n
    how = (
        "torch.cuda.set_sync_debug_mode('warn')"
        if dev.type == "cuda"
        else "calls that sync on a GPU (item, bool, int, float, index, tolist, numpy)"
    )
    return dict(
        result=f"{per:.2f} per decode token",
        per_token=per,
        counts=counts,
        detail=f"VLM.generate, batch 1: {counts[0]} syncs for {n} new tokens, {counts[1]} "
        f"for {2 * n}; counted by {how}",
    )


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


def decode_row(a, dev, bw, cache):
    vlm = decode_model(a, dev, cache)
    ids, am, px = decode_inputs(vlm, dev, vlm.lm_head.weight.dtype)
    K, sync = a.new_tokens, sync_of(dev)
    with torch.inference_mode():
        runs = [bench_model.ours_generation(vlm, ids, am, px, K, sync) for _ in range(a.reps)]
    tok_s = (K - 1) / min(r[1] for r in runs)  # K - 1 forwards: the prefill gives the first token
    nbytes = decode_bytes(vlm, ids.shape[1] + K // 2)  # the cache half-way through the decode
    roof = bw / nbytes if bw else float("nan")
    return dict(
        result=f"{tok_s:.1f} tok/s = {shown(100 * tok_s / roof, '%', 0)} of the roofline "
        f"{shown(roof, ' tok/s', 0)}",
        tok_s=tok_s,
        roofline_tok_s=roof,
        share=tok_s / roof,
        gb_per_token=nbytes / 1e9,
        detail=f"{a.dtype}, {nbytes / 1e9:.3f} GB read per token at {shown(bw / 1e9, ' GB/s', 0)}, "
        f"{tok_s * nbytes / 1e9:.1f} GB/s reached; {K} new tokens after a "
        f"{ids.shape[1]}-token prompt, best of {a.reps}",
    )


# -----------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--part", default="all", help=f"all, or some of {','.join(PARTS)}")
    ap.add_argument("--out", default="", help="the table as JSON, rewritten after each row")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--tiny", type=cli.parse_bool, default=False, help="tiny geometries (CPU tests)"
    )
    ap.add_argument(
        "--bandwidth_gbs",
        "--bandwidth",
        type=float,
        default=0.0,
        help="GB/s; 0: from the device name",
    )
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="dense bf16; 0: from the name")
    ap.add_argument("--dtype", default="bfloat16", help="weights of parity, kernel and decode")
    ap.add_argument("--parity_layers", type=int, default=2, help="decoder layers of the parity row")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2, help="pairs per device and step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps, after one untimed")
    ap.add_argument("--prompt_text", type=int, default=60)
    ap.add_argument("--response_tokens", type=int, default=250)
    ap.add_argument("--lora_r", type=int, default=128)
    ap.add_argument("--lora_alpha", type=float, default=256.0)
    ap.add_argument(
        "--autocast", type=cli.parse_bool, default=True, help="--dtype bfloat16 of the step"
    )
    ap.add_argument("--grad_ckpt", type=cli.parse_bool, default=True)
    ap.add_argument("--cache_dir", default="", help="the reference cache; default: a temporary one")
    ap.add_argument(
        "--fsdp_ranks",
        type=int,
        default=-1,
        help="ranks of the FSDP2 run; -1: the visible GPUs if more than one, 0: none",
    )
    a = ap.parse_args(argv)
    parts = PARTS if a.part == "all" else a.part.split(",")
    if bad := [p for p in parts if p not in PARTS]:
        ap.error(f"--part {a.part}: {bad} not among {', '.join(PARTS)} (or all)")
    if a.steps < 1 or a.new_tokens < 2 or a.reps < 1:
        ap.error("--steps, --reps >= 1 and --new_tokens >= 2: a row needs something to time")
    a.image_hw = (40, 53) if a.tiny else (480, 640)
    if a.tiny:
        a.prompt_text, a.response_tokens = min(a.prompt_text, 8), min(a.response_tokens, 12)
    ranks = to.Ranks()  # as train_offline has it: no set_device of our own (issue 29, item 1)
    dev = torch.device(ranks.device if ranks.W > 1 else a.device)
    ranks.device = str(dev)
    tmp = None
    if not a.cache_dir:  # one folder every rank names alike (torchrun's run id), removed at the end
        run = os.environ.get("TORCHELASTIC_RUN_ID", str(os.getpid()))
        a.cache_dir = tmp = os.path.join(tempfile.gettempdir(), f"bench_gpu-{run}")
    if ranks.W > 1 and a.out:  # the FSDP2 run keeps the single-device table
        root, ext = os.path.splitext(a.out)
        a.out = f"{root}-fsdp{ranks.W}{ext}"
    peak, bw, name = device_specs(a, dev)
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = "n/a"
    head = dict(
        device=name,
        torch=torch.__version__,
        transformers=tf,
        peak_tflops=peak / 1e12,
        bandwidth_gbs=bw / 1e9,
        date=datetime.date.today().isoformat(),
        argv=sys.argv[1:] if argv is None else list(argv),
    )
    ranks.print(
        f"device {name}, peak bf16 {peak / 1e12:.0f} TFLOP/s, bandwidth {bw / 1e9:.0f} GB/s,"
        f" torch {torch.__version__}, transformers {tf}, {ranks.W} rank(s)"
    )
    torch.manual_seed(0)
    table, cache = Table(a.out, head, ranks.rank == 0), {}
    geometry = "tiny" if a.tiny else "7B geometry"
    if "parity" in parts and ranks.W == 1:
        table.run(
            "parity",
            f"bf16 logits vs transformers ({geometry}, {a.parity_layers} layers)",
            parity_row,
            a,
            dev,
        )
        free(dev)
    if "dpo" in parts:
        table.run(
            "dpo",
            f"LoRA DPO step, train_offline ({geometry}, {ranks.W} device(s))",
            dpo_row,
            a,
            dev,
            peak,
            ranks,
        )
        free(dev)
    if "kernel" in parts and ranks.W == 1:
        table.run("kernel", "attention of a packed pair's mask", kernel_row, a, dev)
        free(dev)
    if "syncs" in parts and ranks.W == 1:
        table.run("syncs", "host syncs per decode token", syncs_row, a, dev, cache)
    if "decode" in parts and ranks.W == 1:
        table.run(
            "decode", f"batch-1 decode ({geometry}, {a.dtype})", decode_row, a, dev, bw, cache
        )
    cache.clear()
    free(dev)
    n = a.fsdp_ranks if a.fsdp_ranks >= 0 else torch.cuda.device_count() * (dev.type == "cuda")
    if "dpo" in parts and ranks.W == 1 and n > 1:  # FSDP2, a process per GPU
        args = argv if argv is not None else sys.argv[1:]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(n),
            os.path.abspath(__file__),
            *args,
            "--part",
            "dpo",
        ]
        done = subprocess.run(cmd)
        if done.returncode:  # its error is above; the table of this process stands
            print(f"the FSDP2 run on {n} ranks failed (exit {done.returncode})", flush=True)
    ranks.barrier()
    if tmp and ranks.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if ranks.W > 1:
        ranks.end()
    return table.rows


if __name__ == "__main__":
    main()
