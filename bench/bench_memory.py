"""Memory per GPU of the paper's LoRA DPO at 7B (issue 29, item 7), ours beside TRL + PEFT, and the
time per epoch: LLaVA-1.6-vicuna-7B, LoRA r 128 / alpha 256, gradient checkpointing, bf16.

    python bench/bench_memory.py                       # the tables (modelled), no measurement
    python bench/bench_memory.py --check true          # + one measured 7B-width model, 2 layers, CPU
    python bench/bench_memory.py --step_s 1.9 --measured_batch 2 # a step time bench_gpu.py measured

Settings (GB = 1e9 B per GPU): the README's recipe (FSDP2, 8 GPUs of 80 GB, one node); 2 x 8 (HSDP:
replicated across the nodes, sharded over the 8 GPUs of a node, so the same shards per GPU); one 80 GB
card; one 24 GB card (no FSDP). Phases: load (weights in place), steady state (the peak of a training
micro-step: forward, then backward), the save, and the cached reference pass (once per run, before
the first step).

What the model assumes (the design of issue 29 items 2-4): the frozen base (tower, LLM, embeddings,
LM head) stored in bf16, 2 B per parameter; what trains (LoRA A/B, the projector) in fp32, 4 B, with
fp32 gradients and AdamW's two fp32 moments (12 B more); all sharded over the S GPUs of a node.
Under FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) a unit's parameters are
gathered in bf16 while it runs: the root (tower, projector, embeddings, head), which FSDP2 keeps
gathered from forward to backward, and two decoder layers (the one running, the one prefetched), plus
one layer's unsharded fp32 gradients before their reduce-scatter. On one card (no FSDP) autocast
casts the fp32 adapters and projector to bf16 once and keeps the copies until the autocast region
ends (after the backward: train_offline runs both inside it). Gradients are counted whole at the
peak (from the second micro-step of an accumulated step on, they exist; the recipe accumulates).
Intermediate saves hold only the trainables (gathered one tensor at a time); the final merged save
gathers one unit at a time and merges LoRA in fp32 (weight + B A, then cast).

Activations, exact at small scale (tests/test_bench.py compares them with the tensors autograd saves):
a decoder layer keeps, per row of T tokens under bf16 autocast with a bf16 base,
T (20 d + 8 I + 14 r + 4 H + 8) + 2 T^2 bytes (d width, I MLP width, r LoRA rank, H heads; 2 T^2 the
bf16 mask SDPA keeps), plus 2 B per adapter weight (its bf16 copy); in fp32 without autocast
T (28 d + 16 I + 28 r + 4 H + 8) + 4 T^2. With checkpointing a layer keeps its bf16 input (2 T d) and
one layer at a time is recomputed. Outside the layers: RoPE tables, the final norm, the bool mask,
the fp32 log-probs of the response tokens (4 R V), the projector's activations. The backward's
working set (gradients of the hidden states and of the logits, one layer's transients) is an
estimate, checked by the measured peak below. The overheads (CUDA context, allocator
fragmentation, NCCL buffers) are assumed: --context_gb, --nccl_gb.

TRL + PEFT (modelled, not measured at 7B): DPOTrainer with a peft LoraConfig on the same linears,
the base in bf16 and the adapters in fp32 (peft's default), bf16 autocast, gradient checkpointing,
and, to compare like with like, the same weights and sharding per GPU as ours. What differs is the
batch: trl concatenates [chosen; rejected], so a pair is two rows of prompt + one response (the image
and prompt go through the tower and the LLM twice), and the reference forward with the adapters
disabled runs on every step. Its LM head is fused (trl_head): no [N, V] logits, tiles of 4,096
tokens x 32,768 vocab entries recomputed in the backward; on CUDA a Triton kernel folds each tile and
only the response tokens are scored, so the head costs little. On CPU the fold runs in torch and
every position is scored, which is most of trl's peak at bench_dpo.py's CPU shape (fp32, no
checkpointing, 8 pairs): there the model is compared with that script's measured peak (--check,
--check_trl; the head alone in tests/test_bench.py).

--check measures, on this CPU, one model of 7B width (hidden 4096, MLP 11008, 32 heads, vocab 32064,
the full CLIP ViT-L/336 tower) with 2 decoder layers, as the model assumes (bf16 base, fp32
trainables): RSS growth over an in-process baseline after the load, and the peak of a LoRA DPO
micro-step with the gradients and AdamW moments of an earlier step in place. Its modelled figures
are the same functions at that geometry, with no GPU overheads. The CPU's SDPA keeps what CUDA's
memory-efficient kernel keeps (measured: no T^2 per head).
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_gpu  # noqa: E402
import train_offline as to  # noqa: E402
from cli import parse_bool  # noqa: E402

GB = 1e9
# name, GPUs sharing the weights (FSDP2 shards; HSDP shards within a node), GB per card
SETTINGS = [
    ("8 GPUs (FSDP2, 1 node)", 8, 80),
    ("2 x 8 (HSDP)", 8, 80),
    ("one 80 GB card", 1, 80),
    ("one 24 GB card", 1, 24),
]
# bench_dpo.py --mode lora, trl DPOTrainer + peft: peak extra RSS, MB (2^20 B), README "Speed and
# memory" (median of 3 runs, 2026-12-02); its shape is hidden 512 x 4 layers, vocab 32000, 8 pairs
TRL_MEASURED_MB = 8312
# the same side, one run with MALLOC_MMAP_THRESHOLD_=131072 (freed blocks go back to the system, so
# the peak RSS is the live set; bench_memory.py --check_trl true, 2026-12-06)
TRL_LIVE_MB = 6279
# fit on one measurement, the CI test's (width 1024, 2 layers, CPU): its measured step peak less
# the rest of the model, per token and unit of d + I; the 7B-width --check is out of that sample
WORK = 14
# trl's fused LM head: tokens per chunk, vocab entries per tile (trl/kernels/chunked_logprob.py and
# _CHUNKED_LOGPROB_CHUNK_SIZE in trl/trainer/utils.py, trl 1.16)
TRL_TOKENS = 4096
TRL_VOCAB = 32768
HW = (672, 672)  # a square image: 5 anyres tiles (2 x 2 and the overview), 2,928 image tokens


def count(ps):
    return sum(p.numel() for p in ps)


def build(raw, lora=(128, 256.0), base=torch.bfloat16, device=None):
    """The design's model: the frozen base in `base`, LoRA and the projector in fp32; on the meta
    device (no memory), or filled with random values on `device`."""
    vlm = bench_gpu.build(raw, base, lora)
    for p in vlm.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # as build_policy: what trains is fp32
    if device is not None:
        bench_gpu.materialize(vlm, device)
    return vlm


def geometry(vlm):
    """The counts the model needs, from a (meta) VLM with LoRA."""
    t, v = vlm.cfg.text, vlm.cfg.vision
    layer = vlm.model.language_model.layers[0]
    L = t.num_hidden_layers
    train = [p for p in vlm.parameters() if p.requires_grad]
    frozen = [p for p in vlm.parameters() if not p.requires_grad]
    linears = [m.weight for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    return dict(
        d=t.hidden_size,
        I=t.intermediate_size,
        H=t.num_attention_heads,
        D=t.head_dim,
        L=L,
        V=t.vocab_size,
        Cv=v.hidden_size,
        r=layer.self_attn.q_proj.lora_A.shape[0],
        frozen=count(frozen),
        train=count(train),
        lora=count(p for n, p in vlm.named_parameters() if "lora_" in n),
        layer=count(layer.parameters()),
        layer_lora=count(p for n, p in layer.named_parameters() if "lora_" in n),
        proj=count(vlm.model.multi_modal_projector.parameters()),
        root=count(vlm.parameters()) - L * count(layer.parameters()),
        largest=max(p.numel() for p in vlm.parameters()),
        largest_train=max(p.numel() for p in train),
        largest_linear=max(w.numel() for w in linears),
    )


def layer_saved(g, T, fp32=False):
    """Bytes one decoder layer saves for its backward, one row of T tokens (adapter copies aside)."""
    d, I, r, H = g["d"], g["I"], g["r"], g["H"]
    if fp32:
        return T * (28 * d + 16 * I + 28 * r + 4 * H + 8) + 4 * T * T
    return T * (20 * d + 8 * I + 14 * r + 4 * H + 8) + 2 * T * T


def activations(g, rows, R, n_feat, ckpt, fp32=False):
    """Saved for the backward, one pair: `rows` the token count of each row (ours: one packed row;
    trl: chosen and rejected), R response tokens in all, n_feat image features the projector
    trains on (0: a frozen projector)."""
    d, L, V, D = g["d"], g["L"], g["V"], g["D"]
    w = 4 if fp32 else 2
    out = 0
    for T in rows:
        if ckpt:  # every layer's input, the bool mask, one layer recomputed
            out += L * w * T * d + T * T + layer_saved(g, T, fp32)
        else:
            out += L * layer_saved(g, T, fp32)
        out += T * (3 * w * d + 4 + 2 * w * D + 1)  # final norm (fp32 in, rsqrt, out), RoPE tables
    out += R * (4 * V + 16)  # the response tokens' fp32 log-probs, the gather's index
    out += n_feat * (w * g["Cv"] + 2 * w * d)  # projector: its input, linear_1 and GELU out
    return out


def backward_work(g, rows, R, fp32=False):
    """In flight during the backward, one pair (an estimate): the logits' fp32 gradient and its
    cast, the hidden-state gradients (the residual's and a norm's), one layer's MLP gradients, and
    WORK B per token per unit of d + I of kernel transients and memory the allocator keeps."""
    d, I = g["d"], g["I"]
    w = 4 if fp32 else 2
    return R * 6 * g["V"] + sum(T * (3 * 4 * d + 3 * w * I + WORK * (d + I)) for T in rows)


def reference_work(g, rows, R, fp32=False):
    """The live set of a no-grad forward (the reference pass), one pair: one layer's transients
    (hidden state, norm in fp32, q/k/v, the MLP's three intermediates, the masks), the log-probs."""
    d, I = g["d"], g["I"]
    w = 4 if fp32 else 2
    per = sum(T * (6 * w * d + 4 * d + 3 * w * I) + 3 * T * T for T in rows)
    return per + R * (6 * g["V"])


def trl_head(g, N, fp32=False, triton=True, backward=True):
    """Peak working set of trl's fused LM head (trl/kernels/chunked_logprob.py, trl 1.16) over N
    scored tokens: chunks of TRL_TOKENS tokens x TRL_VOCAB vocab entries, one tile buffer in the
    compute dtype, recomputed in the backward; no [N, V] logits. On CUDA (Triton) the tile is folded
    in a kernel, and only the response tokens are scored (their hidden states gathered, N x d). On
    CPU the fold runs in torch on the whole tile: beside the buffer the backward holds 7 fp32 tiles
    (y, z, log p, p, the gradient, and the two operands of its product) and the target mask (1 B),
    the forward 3 (z, exp, the entropy's product) and the top-1 test's two masks. Plus the fp32
    gradient of the hidden states."""
    w = 4 if fp32 else 2
    tile = min(N, TRL_TOKENS) * min(g["V"], TRL_VOCAB)
    out = tile * w
    if triton:
        out += N * g["d"] * w
    else:
        out += tile * (7 * 4 + 1) if backward else tile * (3 * 4 + 2)
    if backward:
        out += N * g["d"] * 4
    return out


def memory(g, S, b, rows, R, n_feat, ckpt=True, fp32=False, train=None, fused=None):
    """Bytes per GPU by term at b pairs per micro-step, S GPUs sharing the weights (FSDP2 if > 1).
    `train`: the trainable count (default: the geometry's; trl trains LoRA alone). `fused`: trl's
    fused LM head in place of the response tokens' full-vocab log-probs, "triton" (CUDA: the
    response tokens scored) or "torch" (CPU: every position of every row scored)."""
    if fused is not None:
        m = memory(g, S, b, rows, 0, n_feat, ckpt, fp32, train)
        N = b * (R if fused == "triton" else sum(rows))
        m["head"] = trl_head(g, N, fp32, fused == "triton")
        return m
    train = g["train"] if train is None else train
    frozen = g["frozen"] + g["train"] - train
    wf = 4 if fp32 else 2
    m = dict(weights=(wf * frozen + 4 * train) / S, state=12 * train / S)
    if S > 1:  # the root and two layers gathered in bf16, one layer's fp32 gradients unsharded
        m["gathered"] = 2 * g["root"] + 2 * 2 * g["layer"] + 4 * g["layer_lora"]
    else:  # autocast's cached bf16 copies of the fp32 trainables
        m["gathered"] = 0 if fp32 else 2 * train
    m["activations"] = b * activations(g, rows, R, n_feat, ckpt, fp32)
    m["backward"] = b * backward_work(g, rows, R, fp32)
    return m


def phases(g, S, b, rows, R, n_feat, ckpt=True, train=None, ref_rows=None, fused=None):
    """GB per GPU: load, steady state at b pairs, save (the larger of an intermediate and the final
    merged one), the cached reference pass at b pairs; overheads not included."""
    m = memory(g, S, b, rows, R, n_feat, ckpt, train=train, fused=fused)
    resident = m["weights"] + m["state"]
    load = m["weights"] + 2 * g["largest"]  # one tensor read at a time (its slice under FSDP2)
    intermediate = resident + 3 * 4 * g["largest_train"]  # one tensor and its two moments gathered
    unit = 2 * g["layer"] + 4 * g["layer_lora"] if S > 1 else 0  # a layer gathered for the merge
    final = resident + unit + 2 * 4 * g["largest_linear"] + 2 * g["largest_linear"]  # W + BA, cast
    ref = m["weights"] + (m["gathered"] if S > 1 else 0)
    if fused is None:
        ref += b * reference_work(g, ref_rows or rows, R)
    else:  # trl's reference forward scores through the fused head too
        ref += b * reference_work(g, ref_rows or rows, 0)
        ref += trl_head(g, b * R, triton=fused == "triton", backward=False)
    return dict(
        load=load / GB,
        steady=sum(m.values()) / GB,
        save=max(intermediate, final) / GB,
        ref=ref / GB,
    )


def largest_batch(g, S, cap, rows, R, n_feat, overhead, **kw):
    b = 0
    while b < 256 and phases(g, S, b + 1, rows, R, n_feat, **kw)["steady"] + overhead <= cap:
        b += 1
    return b


def shapes(vlm, prompt_text, response, hw=HW):
    """Ours: (rows, R, n_feat) of one packed pair; trl's rows: prompt + one response, twice."""
    batch, n_img = bench_gpu.pair_batch(vlm, 1, hw, prompt_text, response)
    T = int((batch["segment"] >= 0).sum())
    R = 2 * response
    n_feat = int((batch["pixel_values"].abs().flatten(2).sum(-1) > 0).sum()) * 576  # views x 576
    P = T - R
    return dict(ours=[T], trl=[P + response, P + response], R=R, n_feat=n_feat, n_img=n_img, T=T)


def table(a):
    vlm = build(bench_gpu.llava16(), (a.lora_r, a.lora_alpha))  # meta: no memory
    g = geometry(vlm)
    s = shapes(vlm, a.prompt_text, a.response_tokens)
    print(
        f"LLaVA-1.6-vicuna-7B geometry: {(g['frozen'] + g['train']) / 1e9:.2f} B parameters; "
        f"trainable {g['train'] / 1e6:.0f} M (LoRA r {g['r']}: {g['lora'] / 1e6:.0f} M, projector "
        f"{g['proj'] / 1e6:.0f} M); a pair is {s['T']} tokens packed ({s['n_img']} image tokens, "
        f"{HW[1]} x {HW[0]}, anyres), responses {a.response_tokens} + {a.response_tokens}; trl's two rows "
        f"{s['trl'][0]} tokens each. Gradient checkpointing on. Overheads assumed: CUDA context "
        f"{a.context_gb:g} GB, NCCL {a.nccl_gb:g} GB. GB = 1e9 B per GPU."
    )
    print(
        "\n| setting | side | load | steady state, 1 pair / micro-step | max pairs / micro-step "
        "| save peak | reference pass peak (1 pair) | fits |\n|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for name, S, cap in SETTINGS:
        over = a.context_gb + (a.nccl_gb if S > 1 else 0)
        for side in ("ours", "trl + peft (modelled)"):
            trl = side != "ours"
            kw = dict(train=g["lora"], fused="triton") if trl else {}
            shape = s["trl"] if trl else s["ours"]
            n_feat = 0 if trl else s["n_feat"]
            p = phases(g, S, 1, shape, s["R"], n_feat, **kw)
            p = {k: v + over for k, v in p.items()}
            if trl:  # its reference forward runs every step, beside the gradients and moments
                p["ref"] += 12 * g["lora"] / S / GB
            fit = largest_batch(g, S, cap, shape, s["R"], n_feat, over, **kw)
            ok = max(p.values()) <= cap and fit >= 1
            rows.append(dict(setting=name, side=side, cap=cap, fit=fit, ok=ok, **p))
            print(
                f"| {name} | {side} | {p['load']:.1f} | {p['steady']:.1f} | {fit} | "
                f"{p['save']:.1f} | {p['ref']:.1f} | {'yes' if ok else 'no'} |"
            )
    return g, s, rows


def goal(rows):
    """The issue's goal: one 24 GB card at one pair per micro-step, and the recipe's peak per GPU at
    or below trl + peft's at equal micro-batch."""
    by = {(r["setting"], r["side"].split()[0]): r for r in rows}
    card = by[("one 24 GB card", "ours")]
    ours, trl = by[(SETTINGS[0][0], "ours")], by[(SETTINGS[0][0], "trl")]
    peak_o = max(ours[k] for k in ("load", "steady", "save", "ref"))
    peak_t = max(trl[k] for k in ("load", "steady", "save", "ref"))
    print(
        f"\nGoal: one 24 GB card runs LoRA DPO at 7B with one pair per micro-step: "
        f"{'met' if card['ok'] else 'not met'} (modelled peak "
        f"{max(card[k] for k in ('load', 'steady', 'save', 'ref')):.1f} GB); the recipe's peak "
        f"per GPU {peak_o:.1f} GB against trl + peft's {peak_t:.1f} GB (modelled) at 1 pair per "
        f"micro-step: {'met' if peak_o <= peak_t else 'not met'}"
    )
    return card["ok"] and peak_o <= peak_t


# -----------------------------------------------------------------------------
# Measured on CPU: the tensors autograd saves (the test's check of the activation terms)


def saved_bytes(pm, batch):
    """Bytes of the tensors autograd saves in a bf16-autocast forward (parameters aside), each
    storage once."""
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


# -----------------------------------------------------------------------------
# Measured on CPU: RSS growth over an in-process baseline (VmRSS, VmHWM of /proc/self/status)


def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident size (VmHWM) restarts from the current one


def width_config(width, layers, tower_full):
    """LLaVA-1.6 geometry at LLM width `width` (MLP 11008 / 4096 of it, heads of 128), `layers`
    decoder layers; the full ViT-L/336 tower, or a small one (CI)."""
    raw = bench_gpu.llava16()
    raw["text_config"].update(
        hidden_size=width,
        intermediate_size=width * 11008 // 4096,
        num_hidden_layers=layers,
        num_attention_heads=width // 128,
        num_key_value_heads=width // 128,
    )
    if not tower_full:
        raw["vision_config"].update(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4
        )
    return raw


def measure(width, layers, tower_full, prompt_text, response):
    """In this process (a fresh one): load, then one LoRA DPO micro-step with gradients and AdamW
    moments in place, as train_offline runs it with --dtype bfloat16 --grad_ckpt true. -> measured
    and modelled bytes of the load and of the step's peak, over the baseline."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    raw = width_config(width, layers, tower_full)
    meta = build(raw)
    g = geometry(meta)
    s = shapes(meta, prompt_text, response)
    batch, _ = bench_gpu.pair_batch(meta, 1, HW, prompt_text, response)
    del meta
    gc.collect()
    base = status_kb("VmRSS") * 1024
    vlm = build(raw, device="cpu")
    vlm.model.language_model.checkpointing = True
    pm = to.PairModel(vlm).train()
    load = status_kb("VmRSS") * 1024 - base
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    for p in params:  # an earlier micro-step's gradients and AdamW's moments (the memory they hold)
        p.grad = torch.zeros_like(p).fill_(0.0)
        opt.state[p] = dict(
            step=torch.tensor(1.0),
            exp_avg=torch.zeros_like(p).fill_(0.0),
            exp_avg_sq=torch.zeros_like(p).fill_(0.0),
        )
    gc.collect()
    reset_peak()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = pm(**batch)
        loss = -lp.sum()
        loss.backward()
    peak = status_kb("VmHWM") * 1024 - base
    m = memory(g, 1, 1, s["ours"], s["R"], s["n_feat"])
    return dict(
        T=s["T"],
        load=load,
        step=peak,
        load_model=m["weights"],
        step_model=sum(m.values()),
        width=width,
        layers=layers,
    )


def measure_child(width, layers, tower_full, prompt_text, response):
    """measure() in a fresh process, so that nothing of this one's counts."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--measure",
        f"{width},{layers},{int(tower_full)},{prompt_text},{response}",
    ]
    return run_child(cmd)


def run_child(cmd):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"the measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_head_child(N, d, V):
    """measure_head() in a fresh process."""
    return run_child([sys.executable, os.path.abspath(__file__), "--measure_head", f"{N},{d},{V}"])


def trl_at_bench_dpo(measure=False):
    """Modelled peak of bench_dpo.py --mode lora's trl side (fp32, no checkpointing, 8 pairs of its
    texts and 336 x 336 images), MB: weights, LoRA's state, activations of 16 rows of prompt + one
    response (padded to the longest), the backward's working set and trl's fused head as it runs on
    CPU (every position scored, the fold in torch: most of the peak). `measure`: also run that side
    (bench_dpo.py --side trl, a fresh process, minutes) with glibc's mmap threshold fixed at 128 KiB,
    so that what it frees goes back to the system and its peak RSS is the live set; None if not."""
    import bench_dpo
    import data
    import model as M

    a = argparse.Namespace(vision_hidden=256, vocab=32000, hidden=512, layers=4)
    with tempfile.TemporaryDirectory() as path:
        bench_dpo.build(a, path)
        vlm = M.VLM.from_pretrained(path)
        recs = [
            dict(
                id=str(i),
                image=e["image"],
                chosen=e["chosen"],
                rejected=e["rejected"],
                conversation=[{"role": "user", "content": "<image>\n" + e["question"]}],
            )
            for i, e in enumerate(bench_dpo.examples(8))
        ]
        items, _ = data.prepare_pairs(vlm, recs, warn=False)
        measured = None
        if measure:
            script = os.path.join(ROOT, "bench", "bench_dpo.py")
            cmd = [sys.executable, script, "--side", "trl", "--mode", "lora", "--path", path]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                raise RuntimeError(f"bench_dpo.py's trl side failed:\n{out.stderr[-3000:]}")
            measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    vlm.requires_grad_(False)
    M.add_lora(vlm, 128, 256.0)
    g = geometry(vlm)
    longest = max(len(it["prompt"]) + len(r) for it in items for r in it["responses"])
    R = sum(len(r) for it in items for r in it["responses"])  # trl counts the real tokens only
    # on CPU trl scores every position of the 16 padded rows through its torch-folded head
    m = memory(g, 1, 1, [longest] * 16, R, 0, ckpt=False, fp32=True, train=g["lora"], fused="torch")
    return sum(m.values()) / 2**20, longest, measured


def measure_head(N, d, V):
    """In this process (a fresh one): trl's fused LM head (ChunkedLogProbFunction, on CPU: the fold
    in torch) forward and backward over N tokens, fp32, the hidden states trained and the head
    frozen, as in trl's LoRA DPO. -> measured and modelled bytes of each peak over the baseline."""
    from trl.kernels import ChunkedLogProbFunction

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, d, generator=gen).requires_grad_(True)
    weight = torch.randn(V, d, generator=gen) * 0.02
    targets = torch.randint(0, V, (N,), generator=gen)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")  # what DPOTrainer asks for
    warm = torch.zeros(
        8, d, requires_grad=True
    )  # the code pages the ops touch, before the baseline
    lp = ChunkedLogProbFunction.apply(
        warm, weight[:64], None, targets[:8] % 64, 1.0, 64, None, 1.0, outputs
    )
    lp[0].sum().backward()
    base = status_kb("VmRSS") * 1024
    reset_peak()
    lp = ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, TRL_VOCAB, None, 1.0, outputs
    )
    forward = status_kb("VmHWM") * 1024 - base
    lp[0].sum().backward()
    backward = status_kb("VmHWM") * 1024 - base
    g = dict(V=V, d=d)
    return dict(
        forward=forward,
        backward=backward,
        forward_model=trl_head(g, N, fp32=True, triton=False, backward=False),
        backward_model=trl_head(g, N, fp32=True, triton=False),
    )


def check():
    print(
        "\nCheck on CPU (measured: RSS growth over the baseline before the load; modelled: the "
        "functions above at that geometry, no GPU overheads):"
    )
    r = measure_child(4096, 2, True, 60, 250)
    print(
        "| model | tokens | load, measured (GB) | load, modelled | micro-step peak, measured "
        "| micro-step peak, modelled | measured / modelled |\n|---|---|---|---|---|---|---|"
    )
    print(
        f"| width 4096, MLP 11008, 32 heads, 2 layers, ViT-L/336 | {r['T']} | {r['load'] / GB:.2f} "
        f"| {r['load_model'] / GB:.2f} | {r['step'] / GB:.2f} | {r['step_model'] / GB:.2f} | "
        f"{r['step'] / r['step_model']:.3f} |"
    )
    check_trl(False)
    return r


def check_trl(measure):
    """trl + peft's model at bench_dpo.py --mode lora's shape against that script's measurements:
    the README's (glibc's defaults) and, with `measure`, one run with freed memory returned."""
    trl, longest, live = trl_at_bench_dpo(measure)
    if live is None:
        live = TRL_LIVE_MB
        when = "recorded; --check_trl true measures it again, ~2-6 min"
    else:
        when = "measured now"
    ok = "yes" if abs(trl / live - 1) <= 0.15 else "no"
    print(
        f"trl + peft at bench_dpo.py --mode lora's shape (16 rows of {longest} tokens, fp32): "
        f"modelled {trl:,.0f} MB; measured with freed memory returned {live:,.0f} MB ({when}), "
        f"modelled / measured {trl / live:.2f} (within 15%: {ok}); "
        f"measured with glibc's defaults {TRL_MEASURED_MB:,} MB (README), modelled / measured "
        f"{trl / TRL_MEASURED_MB:.2f}: the rest is what glibc keeps resident after the forwards free it"
    )
    return trl, live


def epoch_time(a):
    """Time per epoch: model FLOPs (bench_gpu.step_flops, plus the forward that checkpointing
    recomputes) / (GPUs x peak bf16 x --mfu), or a measured step of bench_gpu.py."""
    vlm = build(bench_gpu.llava16(), (a.lora_r, a.lora_alpha))
    batch, n_img = bench_gpu.pair_batch(vlm, 1, HW, a.prompt_text, a.response_tokens)
    T, R = int((batch["segment"] >= 0).sum()), 2 * a.response_tokens
    t = vlm.cfg.text
    flops = bench_gpu.step_flops(vlm, batch, n_img)
    layers = vlm.model.language_model.layers
    base = count(m.weight for m in layers.modules() if isinstance(m, torch.nn.Linear))
    fwd = 2 * base * T  # the linears' forward, which checkpointing runs again
    train_pairs = a.pairs - min(200, a.pairs // 10)  # train_offline holds out a tenth, at most 200
    steps = train_pairs // a.batch_size
    ref_flops = 2 * base * T + 2 * t.hidden_size * t.vocab_size * R
    print(
        f"\nTime per epoch of {a.pairs} pairs ({train_pairs} trained, {steps} steps of "
        f"{a.batch_size}), assumed, not measured: "
        + (
            f"measured {a.step_s} s per step of {a.measured_batch} pairs per GPU"
            if a.step_s
            else f"{a.mfu:.0%} of {a.peak_tflops:g} TFLOP/s"
        )
        + "; the reference pass runs once per run"
    )
    print(
        "| GPUs | pairs per GPU per step | time per epoch (min) | reference pass (min) |\n"
        "|---|---|---|---|"
    )
    peak = a.peak_tflops * 1e12
    for W in (8, 16):
        per_gpu = a.batch_size / W
        if a.step_s:  # a measured step of measured_batch pairs per GPU, scaled by the pairs
            epoch = steps * a.step_s * per_gpu / a.measured_batch
        else:
            epoch = steps * a.batch_size * (flops + fwd) / (W * peak * a.mfu)
        ref = a.pairs * ref_flops / (W * peak * a.mfu)
        print(f"| {W} | {per_gpu:g} | {epoch / 60:.1f} | {ref / 60:.1f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", type=int, default=5000)
    ap.add_argument("--batch_size", type=int, default=32, help="global pairs per optimizer step")
    ap.add_argument("--prompt_text", type=int, default=60, help="text tokens; the image adds 2,868")
    ap.add_argument("--response_tokens", type=int, default=250)
    ap.add_argument("--lora_r", type=int, default=128)
    ap.add_argument("--lora_alpha", type=float, default=256.0)
    ap.add_argument(
        "--context_gb",
        type=float,
        default=1.0,
        help="assumed: CUDA context, cuBLAS workspace, allocator fragmentation",
    )
    ap.add_argument("--nccl_gb", type=float, default=1.0, help="assumed: NCCL buffers (> 1 GPU)")
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    ap.add_argument("--mfu", type=float, default=0.40, help="assumed share of peak, FLOPs executed")
    ap.add_argument("--step_s", type=float, default=0.0, help="measured s/step (bench_gpu.py)")
    ap.add_argument("--measured_batch", type=int, default=2)
    ap.add_argument("--check", type=parse_bool, default=False, help="measure on CPU (~1 min, 5 GB)")
    ap.add_argument(
        "--check_trl",
        type=parse_bool,
        default=False,
        help="run bench_dpo.py --mode lora's trl side once and compare (2-6 min, 7 GB)",
    )
    ap.add_argument("--measure", default="")  # internal: width,layers,tower_full,prompt,response
    ap.add_argument("--measure_head", default="")  # internal: tokens,width,vocab
    a = ap.parse_args(argv)
    if a.measure_head:
        N, d, V = (int(x) for x in a.measure_head.split(","))
        print(json.dumps(measure_head(N, d, V)))
        return
    if a.measure:
        w, n, full, p, r = (int(x) for x in a.measure.split(","))
        print(json.dumps(measure(w, n, bool(full), p, r)))
        return
    _, _, rows = table(a)
    goal(rows)
    epoch_time(a)
    if a.check:
        check()
    if a.check_trl:
        check_trl(True)


if __name__ == "__main__":
    main()
