"""train.py: the training machinery both trainers share: one DPO step (packed forward, loss, backward,
optimizer step), the policy (LoRA, DDP / FSDP2), checkpoints, metrics and the ranks of a torchrun.

Read train_step() first: it is train_offline.py's step, from a batch of pairs to opt.step()."""

import contextlib
import dataclasses
import json
import math
import os
import pickle
import shutil
import socket
import sys
import time
import types
import uuid

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import cli
import data
import hub
import losses
import model as M
from cli import non_defaults
from model import VLM

# -----------------------------------------------------------------------------
# One step: a batch of pairs -> packed forward -> loss -> backward -> opt.step()


def train_step(cfg, pm, model, opt, micros, ref, ranks, log, step, steps):
    """One optimizer step over `micros`, its grad_accum micro-steps, each [(rows, batch)]: one packed
    forward per batch (by_length), then the loss and its backward; the gradients are all-reduced after
    the step's last forward. ref: the cached reference log-probs (N, K), or None (adapters off, or an
    RM). -> (lr, grad norm), as optimizer_step."""
    B = cfg.batch_size // (ranks.W * cfg.grad_accum)  # pairs per micro-step and rank
    amp = autocast(cfg, ranks.device)
    for micro, parts in enumerate(micros):
        for part, (idx, batch) in enumerate(parts):
            batch = to(batch, ranks.device)
            last = micro == cfg.grad_accum - 1 and part == len(parts) - 1  # all-reduce after it
            with ranks.sync_grads(model, last), amp:
                token_lp, scores = model(**batch)  # (b, K, L) every response's log-probs
                loss, chosen, rejected = pair_loss(cfg, pm, batch, token_lp, scores, ref, idx)
                # each rank averages over its share of the batch; DDP's mean over ranks ends it
                (loss.sum() / (B * cfg.grad_accum)).backward()
            log.add(pair_stats(loss, chosen, rejected, token_lp))
    return optimizer_step(cfg, pm, opt, step, steps)


class PairModel(nn.Module):
    """What DDP / FSDP wrap: the VLM, plus a reward head (`head="reward"`) or PPO's ("value")."""

    def __init__(self, vlm: VLM, head=None):
        super().__init__()
        self.vlm = vlm
        self.score, self.value = new_heads(vlm.cfg.text.hidden_size, head)

    def forward(
        self,
        input_ids,
        pixel_values,
        image_sizes=None,
        position_ids=None,
        segment=None,
        pred_idx=None,
        targets=None,
        last_idx=None,
    ):
        """A collate_pairs batch -> per-token log-probs (B, K, L) in fp32, 0 on padding, and the
        head's outputs: reward scores (B, K) at each response's last token, or values (B, K, L)."""
        h = self.vlm.hidden(
            input_ids, pixel_values, image_sizes, segment >= 0, position_ids, segment=segment
        )
        B, K, L = targets.shape
        pick = lambda idx: h.gather(1, idx.reshape(B, -1, 1).expand(-1, -1, h.shape[-1]))  # noqa: E731
        if self.score is not None:
            return None, self.score(pick(last_idx)).view(B, K).float()
        hp = pick(pred_idx)  # (B, K * L, C): the positions that predict a response token
        lp = losses.gathered_logps(self.vlm.lm_head(hp).view(B, K, L, -1), targets)
        return lp, None if self.value is None else self.value(hp).view(B, K, L).float()


def new_heads(C, head):
    """(score, value) on hidden size C: a reward head (`head="reward"`) or PPO's value head ("value"), the
    other None, drawn from torch's global generator (build_policy's sharded path draws them again)."""
    score = nn.Linear(C, 1, bias=False) if head == "reward" else None
    value = nn.Linear(C, 1) if head == "value" else None
    if value is not None:  # values start at 0
        nn.init.zeros_(value.weight), nn.init.zeros_(value.bias)
    return score, value


def counts(batch):
    return (batch["targets"] != -100).sum(-1)  # (B, K) tokens per response


def autocast(cfg, device):
    """--dtype's one autocast context, for the policy's forwards and the reference's alike (off in fp32)."""
    return torch.autocast(
        device.split(":")[0], dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32"
    )


@torch.no_grad()
def reference(pm: PairModel, batch):
    """The reference's (B, K) log-probs: the same weights with the adapters switched off."""
    with M.lora_disabled(pm.vlm):
        return pm(**batch)[0].sum(-1)


def pair_loss(cfg, pm, batch, lp, scores, ref, idx):
    """-> per-pair losses (B,), chosen and rejected rewards of cfg.loss (with cfg.beta, cfg.rpo_alpha);
    the reference: ref[idx] or the adapters off."""
    if cfg.loss == "rm":
        return losses.rm_loss(scores[:, 0], scores[:, 1])
    ref_lp = ref[idx].to(lp.device, non_blocking=True) if ref is not None else reference(pm, batch)
    return losses.preference_loss(
        cfg.loss, lp.sum(-1), ref_lp, counts(batch), cfg.beta, rpo_alpha=cfg.rpo_alpha
    )


def loss_name(loss):
    """A preference loss's name in a run's objective line: its key in losses.LOSSES where none is set here."""
    return {"dpo": "DPO", "ipo": "IPO", "slic": "SLiC"}.get(loss, loss)


def pair_stats(loss, c, r, token_lp, w=None):
    """A micro-batch's metrics as [sum, count] under TRL's names; w: the pairs' weights (online). The
    sums stay on the device, in fp64 (what Python's floats were), until `to_host` reads them all at once."""
    n = len(loss)
    # none: an RM
    logps = token_lp.detach().sum(-1) if token_lp is not None else loss.new_zeros(n, 2)
    stats = {
        "loss": loss.detach(),
        "rewards/chosen": c,
        "rewards/rejected": r,
        "rewards/margins": c - r,
        "rewards/accuracies": (c > r).float(),
        "logps/chosen": logps[:, 0],
        "logps/rejected": logps[:, 1],
    }
    if w is None:
        return {k: [v.detach().sum().double(), n] for k, v in stats.items()}
    return {k: [(v * w).sum().item(), w.sum().item()] for k, v in stats.items()}


def accumulate(sums, stats):
    """Adds {key: [sum, count]} into sums, in place."""
    for k, v in stats.items():
        sums[k] = [a + b for a, b in zip(sums.get(k, [0.0, 0]), v)]


def to_host(sums, extra=None):
    """-> sums {key: [sum, count]} and extra {key: value} with their 0-d tensors as Python floats, read
    back in one host sync (a step's only one on a GPU) rather than one per value."""
    extra = extra or {}
    ts = [s for s, _ in sums.values() if torch.is_tensor(s)] + [
        v for v in extra.values() if torch.is_tensor(v)
    ]
    got = iter(torch.stack([t.double() for t in ts]).tolist() if ts else [])
    sums = {k: [next(got) if torch.is_tensor(s) else s, n] for k, (s, n) in sums.items()}
    return sums, {k: next(got) if torch.is_tensor(v) else v for k, v in extra.items()}


def optimizer_step(cfg, pm, opt, step, steps):
    """Warm-up and cosine learning rates, clipping at 1, a step -> (lr, grad norm unclipped)."""
    scale = min(1.0, (step + 1) / max(1, cfg.warmup)) * 0.5 * (1 + math.cos(math.pi * step / steps))
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * scale
    norm = torch.nn.utils.clip_grad_norm_(pm.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    return cfg.lr * scale, norm  # the norm read by Metrics.write


def to(batch, device):
    """A batch onto the device: non-blocking (from pinned memory, no host sync); image_sizes stay on
    the host, where the image-token counts are read."""
    return {
        k: v if k == "image_sizes" else v.to(device, non_blocking=True) for k, v in batch.items()
    }


# -----------------------------------------------------------------------------
# The loop's batches: rows of a step from a per-epoch shuffle, cut by length, decoded ahead


def batch_rows(n, cfg, step, micro, B, ranks):
    """The rows of `step` out of n: a per-epoch shuffle seeded by the step (so resume is exact), of
    whose micro-step slice rank r takes r, r + W, ...: the same data for any number of ranks."""
    per_epoch = max(1, n // cfg.batch_size)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + step // per_epoch))
    base = (step % per_epoch) * cfg.batch_size + micro * B * ranks.W
    return [perm[base + ranks.rank + k * ranks.W].item() for k in range(B)]


PARTS = 4  # on the world's CPU runs, 1.6x faster steps than one padded batch (2: 1.5x, 8: 1.5x)


def by_length(rows, items, device="cpu"):
    """Rows sorted by length, cut in PARTS padded apart; as many on every rank (for FSDP). On a GPU one
    forward holds them all: padding costs less there than PARTS forwards (and FSDP gathers) do."""
    rows = sorted(rows, key=lambda i: length(items[i]))
    k = max(1, min(PARTS if device == "cpu" else 1, len(rows)))
    return [rows[j * len(rows) // k : (j + 1) * len(rows) // k] for j in range(k)]


def length(item):
    return len(item["prompt"]) + sum(map(len, item["responses"]))  # a pair's packed row


class MicroBatches(torch.utils.data.Dataset):
    """Micro-step j of a run from step `start`: [(rows, collated batch)], one per forward. It keeps only
    what collate_pairs reads of the VLM and batch_rows of Ranks, so that DataLoader workers get a copy."""

    def __init__(self, cfg, vlm, items, train_idx, B, ranks, start):
        self.cfg, self.items, self.train_idx, self.B, self.start = cfg, items, train_idx, B, start
        self.vlm = types.SimpleNamespace(image_processor=vlm.image_processor)
        self.ranks = types.SimpleNamespace(W=ranks.W, rank=ranks.rank)
        self.device = ranks.device.split(":")[0]

    def __getitem__(self, j):
        step, micro = self.start + j // self.cfg.grad_accum, j % self.cfg.grad_accum
        at = batch_rows(len(self.train_idx), self.cfg, step, micro, self.B, self.ranks)
        rows = [self.train_idx[i] for i in at]
        # rows of like lengths together: less padding
        parts = by_length(rows, self.items, self.device)
        return [(idx, data.collate_pairs(self.vlm, [self.items[i] for i in idx])) for idx in parts]


def micro_batches(cfg, vlm, items, train_idx, B, ranks, start, steps):
    """An iterator over the micro-steps' batches from step `start` to `steps`: decoded in the loop on the
    host; on CUDA (or with --workers N) in a DataLoader's processes, ahead of the step, pinned for the copy."""
    ds = MicroBatches(cfg, vlm, items, train_idx, B, ranks, start)
    n = (steps - start) * cfg.grad_accum
    cuda = ranks.device.startswith("cuda")
    workers = cfg.workers if cfg.workers >= 0 else 4 * cuda
    if not workers:
        return (ds[j] for j in range(n))
    # batch_size None: each item is already a micro-step's batches; the data depend on j only (exact resume).
    # Its own generator: the workers' seeds are not drawn from the global RNG, which stays as in the loop
    return iter(
        torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            sampler=range(n),
            num_workers=workers,
            pin_memory=cuda,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
    )


# -----------------------------------------------------------------------------
# The policy: the model with LoRA adapters (and a head), wrapped for DDP / FSDP2, and its optimizer


def build_policy(cfg, ranks, head=None, lr_projector=0.0, grad_ckpt=False):
    """-> (PairModel, the wrapped model to train, AdamW over the adapters, projector and head). The
    projector trains at lr_projector (0: frozen); grad_ckpt recomputes each decoder layer in the backward."""
    if ranks.W > 1 and cfg.fsdp:
        pm = sharded_policy(cfg, ranks, head, lr_projector, grad_ckpt)
        model = pm
    else:
        # bf16: the frozen base's half
        vlm = VLM.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype), template=cfg.template)
        ranks.print(hub.template_line(vlm))
        choose_trainables(cfg, vlm, head, lr_projector, grad_ckpt)
        pm = PairModel(vlm, head)
        # What trains is fp32, and so are its AdamW moments (the adapters and heads already are): a bf16
        # weight would round an update at LR 1e-6 away. From a bf16 load it starts at the bf16 value, which
        # is the reference's weight too.
        for p in pm.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        pm = pm.to(ranks.device)
        model = pm
        if ranks.W > 1:
            model = nn.parallel.DistributedDataParallel(pm)
    groups = {}  # learning rate -> parameters
    for n, p in pm.named_parameters():
        if p.requires_grad:
            lr = lr_projector if ".multi_modal_projector." in n else cfg.lr
            groups.setdefault(lr, []).append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "base_lr": lr} for lr, ps in groups.items()],
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )
    ranks.print(
        f"trainable parameters: {sum(p.numel() for ps in groups.values() for p in ps):,} of "
        f"{sum(p.numel() for p in pm.parameters()):,}"
    )
    return pm, model, opt


def choose_trainables(cfg, vlm, head, lr_projector, grad_ckpt):
    """What trains: LoRA adapters (or the whole LLM), the projector at its own rate; the rest frozen."""
    vlm.requires_grad_(False)
    if cfg.lora_r:
        M.add_lora(vlm, cfg.lora_r, cfg.lora_alpha)
    else:  # full fine-tuning of the LLM (its LM head included)
        vlm.model.language_model.requires_grad_(True), vlm.lm_head.requires_grad_(head is None)
    vlm.model.multi_modal_projector.requires_grad_(lr_projector > 0)
    vlm.model.language_model.checkpointing = grad_ckpt


def sharded_policy(cfg, ranks, head, lr_projector, grad_ckpt):
    """FSDP2 without a whole copy of the model anywhere: built on the meta device, cut into units, each
    unit sharded over the ranks of a node (and replicated across nodes: HSDP), then every rank reads only
    its own rows of each tensor from the checkpoint's files. LoRA's A and the heads get the values a
    single process draws, in its order (the full tensors on the host, one at a time: they are small)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = getattr(torch, cfg.dtype)
    vlm = VLM.from_pretrained(cfg.model, dtype=dtype, device="meta", template=cfg.template)
    ranks.print(hub.template_line(vlm))
    # on the meta device: LoRA's A not drawn yet
    choose_trainables(cfg, vlm, head, lr_projector, grad_ckpt)
    with torch.device("meta"):
        pm = PairModel(vlm, head)
    pm.to(dtype)  # the frozen base in --dtype; what trains in fp32, as in a single process
    for p in pm.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    # bf16: units all-gather in bf16 (the fp32 adapters cast once per gather) and reduce gradients in fp32
    mp = (
        MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if cfg.dtype != "float32"
        else MixedPrecisionPolicy()
    )
    mesh = fsdp_mesh(ranks)
    ranks.print(
        f"FSDP2: sharded over {mesh.size(-1)} ranks"
        + (f", replicated across {mesh.size(0)} nodes (HSDP)" if mesh.ndim == 2 else "")
    )
    for unit in fsdp_units(vlm):  # children first; the root keeps the rest
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(pm, mesh=mesh, mp_policy=mp)
    pm.to_empty(device=ranks.device)  # this rank's shards, allocated, unset
    if vlm.cfg.tie_word_embeddings:  # to_empty makes a new Parameter per module: tie them again
        vlm.lm_head.weight = vlm.model.language_model.embed_tokens.weight
    with torch.no_grad():
        for m in vlm.modules():  # add_lora's order, so LoRA's A gets a single process's draws
            if isinstance(m, M.LoRALinear):
                fill_rows(m.lora_A, M.init_lora_A(torch.empty(m.lora_A.shape)))
                m.lora_B.to_local().zero_()
        for mine, drawn in zip((pm.score, pm.value), new_heads(vlm.cfg.text.hidden_size, head)):
            if drawn is not None:  # after LoRA's draws, as in a single process
                for p, q in zip(mine.parameters(), drawn.parameters()):
                    fill_rows(p, q)
    # each rank its rows of each tensor
    hub.load_weights(vlm, vlm.folder, vlm.cfg.raw, dtype, ranks.device)
    return pm


def fill_rows(p, full):
    """Copies this rank's rows of `full` (the whole tensor, on the host) into FSDP2 parameter p's shard."""
    start, stop = hub.shard_rows(p)
    p.to_local().copy_(full[start:stop])


def fsdp_units(vlm):
    """FSDP2's units below the root: every tower and decoder layer, the projector (its own: it may train
    in fp32), the LM head unless tied to the embeddings. The root keeps the embeddings, norms and heads."""
    tower = vlm.model.vision_tower.encoder.layers
    # the layers past it never run, and a unit that never gathers fails FSDP2's end of backward: they
    # stay in the root
    used = max(i % (len(tower) + 1) for i in vlm.cfg.feature_layers)
    units = [*tower[:used], vlm.model.multi_modal_projector, *vlm.model.language_model.layers]
    if not vlm.cfg.tie_word_embeddings:
        units.append(vlm.lm_head)
    return units


def fsdp_mesh(ranks):
    """One node: a 1-D mesh over its ranks. Past one node (torchrun's LOCAL_WORLD_SIZE < WORLD_SIZE), HSDP's
    2-D mesh (nodes, ranks per node): parameters sharded within a node, replicated across nodes, so that
    only the gradients' all-reduce crosses the slower link between nodes."""
    from torch.distributed.device_mesh import init_device_mesh

    kind = ranks.device.split(":")[0]
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.W))
    if local >= ranks.W or ranks.W % local:  # one node, or nodes of unequal sizes: shard over all
        return init_device_mesh(kind, (ranks.W,), mesh_dim_names=("shard",))
    return init_device_mesh(kind, (ranks.W // local, local), mesh_dim_names=("replicate", "shard"))


# -----------------------------------------------------------------------------
# Checkpoints and metrics: the model in HF layout (adapters merged), a training state for --resume


STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
# settings free to change between the legs of a resumed run
VOLATILE = (
    "resume",
    "overwrite",
    "save_every",
    "eval_n",
    "cache_dir",
    "annotator_threads",
    "workers",
)


def load_state(path, mmap=False):
    """A training state (tensors and plain values only); `mmap`: its tensors stay on disk until read."""
    try:
        return torch.load(path, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise cli.UserError(
            f"--resume: refused to load {path}: it holds more than tensors and plain values, "
            f"which a training state never does ({str(e).splitlines()[0]})"
        ) from None


def resumable_config(cls, argv=None, doc=None):
    """-> (the Config of the flags, out_dir's training state or None). With `--resume true`, the settings kept
    in the state fill the flags not given, before anything loads. A flag given with another value than the
    run's is an error naming both values (but the VOLATILE ones, free to change between a run's legs)."""
    given = cli.flags_from_argv(cls, argv, doc)
    cfg = cli.check_config(cls(**given))
    if not cfg.resume:
        return cfg, None
    state = os.path.join(cfg.out_dir, "state.pt")
    rank = int(os.environ.get("RANK", 0))
    # rank 0 decides: there is no process group yet to ask it
    if rank == 0 and not os.path.exists(state):
        raise cli.UserFileError(f"--resume: no training state at {state}")
    try:
        st = load_state(state, mmap=True)  # the tensors stay on disk until Checkpoint.resume
    except FileNotFoundError:  # rank 0 found it: this node does not share out_dir
        raise cli.UserFileError(
            f"--resume: rank {rank} cannot read {state}, which rank 0 sees: --out_dir must "
            f"be a folder shared by every node"
        ) from None
    saved = st["config"]
    if changed := [
        k for k, v in given.items() if k in saved and k not in VOLATILE and saved[k] != v
    ]:
        raise cli.UserError(
            f"--resume: {state} was written with other settings: "
            + ", ".join(f"--{k} {given[k]} (the run's: {saved[k]})" for k in changed)
        )
    names = {f.name for f in dataclasses.fields(cls)}  # a setting since removed is dropped
    return cli.check_config(cls(**({k: v for k, v in saved.items() if k in names} | given))), st


class Checkpoint:
    """out_dir/state.pt (what trains, the optimizer and the step, for --resume) at every save; out_dir/checkpoint
    (HF layout, adapters merged, atomic) once, at the last step."""

    def __init__(self, cfg, pm, opt, ranks):
        self.cfg, self.pm, self.opt, self.ranks = cfg, pm, opt, ranks
        self.state = os.path.join(cfg.out_dir, "state.pt")

    def resume(self, steps, st):
        """-> the step to start from (0 without --resume), or None when the run is complete. st: the
        training state resumable_config read (and checked the settings of)."""
        if not self.cfg.resume:
            return 0
        want = {n for n, p in self.pm.named_parameters() if p.requires_grad}
        if odd := sorted(set(st["model"]) ^ want):  # strict=False below would skip them silently
            raise cli.UserError(
                f"--resume: {self.state} does not hold this model's trainable tensors: "
                f"{len(odd)} differ, e.g. {odd[:3]}"
            )
        # the trainable tensors onto the base just loaded (FSDP2: each rank takes its shards)
        set_model_state_dict(
            self.pm, st["model"], options=StateDictOptions(full_state_dict=True, strict=False)
        )
        set_optimizer_state_dict(
            self.pm, self.opt, st["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
        if st["step"] + 1 >= steps:
            self.ranks.print(
                f"{self.cfg.out_dir}: the run is complete ({steps} steps); nothing to resume"
            )
            return None
        return st["step"] + 1

    def save(self, step, final=False):
        """The state of what trains, never the frozen model (a save mid-run of a 7B LoRA run is its
        adapters and their AdamW moments, not 28 GB). `final` (the last step) writes the merged HF
        checkpoint first, then the state: a kill between the two resumes the older state, whose run
        ends by writing the checkpoint again."""
        pm, cfg = self.pm, self.cfg
        hf_dir = os.path.join(cfg.out_dir, "checkpoint")
        if final:
            # FSDP2 gathers in its param_dtype (bf16 under --dtype bfloat16): LoRA merges from the fp32 values
            # that train, as in one process. Full fine-tuning: the LLM's fp32 gather would not fit beside it
            full = fp32_trainables(pm) if cfg.lora_r else None
            with unsharded(pm, full):
                if self.ranks.rank == 0:
                    pm.vlm.files["train_config.json"] = json.dumps(
                        dataclasses.asdict(cfg), indent=2
                    )
                    if pm.score is not None:  # the reward head, saved beside the LLM's tensors
                        pm.vlm.extra["score.weight"] = pm.score.weight.detach().cpu()
                    pm.vlm.save_pretrained(hf_dir)
        st = dict(
            step=step,
            model=trainable_state(pm),
            optimizer=get_optimizer_state_dict(pm, self.opt, options=STATE),
            config=dataclasses.asdict(cfg),
        )
        if self.ranks.rank == 0:

            def write(tmp):
                try:
                    torch.save(st, tmp)
                except (
                    OSError,
                    RuntimeError,
                ) as e:  # torch says "failed writing file", without the path
                    raise OSError(f"cannot write {tmp}: {e}") from e

            cli.atomic_write(self.state, write)  # a failed write frees its space for a later save
            # an earlier run's checkpoint (--overwrite) goes: out_dir/checkpoint is this run's final
            # model or nothing, never an older model mid-run
            if not final and os.path.isdir(hf_dir):
                shutil.rmtree(hf_dir)


def trainable_state(pm):
    """{name: full tensor on the host} of the parameters that train (LoRA A/B, the projector when it trains,
    a head), in their own dtype. FSDP2: each one gathered alone from its shards; a frozen one never is."""
    out = {}
    for name, p in pm.named_parameters():
        if p.requires_grad:
            t = p.detach()
            out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()
    return out


def fp32_trainables(pm):
    """FSDP2: {name: full tensor on the device} of the parameters that train, gathered from their fp32
    shards; {} unsharded."""
    return {
        n: p.detach().full_tensor()
        for n, p in pm.named_parameters()
        if p.requires_grad and hasattr(p, "full_tensor")
    }


@contextlib.contextmanager
def unsharded(pm, full=None):
    """FSDP2: every unit's full parameters within (sampling, saving): no collectives there. `full`:
    {name: tensor} in place of those gathered (fp32_trainables), within only."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in pm.modules() if isinstance(m, FSDPModule)]
    # the root's first forward sets FSDP2 up; sampling before it would run a layer's hooks first,
    # which makes that layer a root
    if isinstance(pm, FSDPModule):
        pm._get_fsdp_state()._lazy_init()
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    for name, t in (full or {}).items():  # reshard() registers FSDP2's own parameters again
        mod, _, attr = name.rpartition(".")
        pm.get_submodule(mod)._parameters[attr] = nn.Parameter(t, requires_grad=False)
    try:
        yield
    finally:
        for m in units:
            m.set_reshard_after_forward(m is not pm, recurse=False)
            m.reshard()


class Metrics:
    """out_dir/metrics.jsonl: per step, its micro-steps' and ranks' [sum, count] pairs, averaged."""

    def __init__(self, cfg, start, ranks):
        self.ranks, self.sums, self.t0, self.f = ranks, {}, time.time(), None
        if ranks.rank == 0:
            path = os.path.join(cfg.out_dir, "metrics.jsonl")
            old = open(path).readlines() if cfg.resume and os.path.exists(path) else []

            def write(tmp):  # the lines before `start`: the steps to come are written again
                with open(tmp, "w") as f:
                    f.writelines(line for line in old if json.loads(line).get("step", -1) < start)
                    f.flush()
                    os.fsync(f.fileno())

            cli.atomic_write(path, write)
            self.f = open(path, "a")

    def add(self, stats):
        accumulate(self.sums, stats)

    def write(self, step, prefix="", **extra):
        """One line: the averages since the last write, then `extra` (prefixed like them)."""
        sums, extra = to_host(self.sums, extra)
        tot = self.ranks.gather_sums(sums)
        self.sums = {}
        rec = {prefix + k: round(s / max(n, 1), 5) for k, (s, n) in sorted(tot.items())}
        rec |= {prefix + k: round(v, 6) if isinstance(v, float) else v for k, v in extra.items()}
        if self.f:
            self.f.write(
                json.dumps(dict(step=step, **rec, elapsed=round(time.time() - self.t0, 1))) + "\n"
            )
            self.f.flush()
        return rec

    def close(self):
        if self.f:
            self.f.close()


def bar_postfix(rec):
    """What the progress bar shows of a step's metrics: its loss, and its reward accuracy or score."""
    out = {"loss": f"{rec['loss']:.4f}"}
    if "rewards/accuracies" in rec:
        out["acc"] = f"{rec['rewards/accuracies']:.2f}"
    if "objective/scores" in rec:  # PPO, RLOO: the annotator's mean score of the samples
        out["score"] = f"{rec['objective/scores']:.3f}"
    return out


def summary(steps, rec, out_dir, held=None):
    """A run's closing line: its steps, the last step's loss and reward accuracy, the checkpoint."""
    parts = [f"{steps} steps", f"final loss {rec['loss']:.4f}"]
    if "rewards/accuracies" in rec:
        parts.append(f"reward accuracy {100 * rec['rewards/accuracies']:.1f}%")
    if "objective/scores" in rec:
        parts.append(f"mean score {rec['objective/scores']:.3f}")
    if held:
        parts.append(f"held-out reward accuracy {100 * held['eval/rewards/accuracies']:.1f}%")
    return "done: " + ", ".join(parts) + f"; checkpoint in {os.path.join(out_dir, 'checkpoint')}"


# -----------------------------------------------------------------------------
# torchrun: the process group from its environment variables; the same code path with one process


class Ranks:
    """This process's rank, the world size W and device, and the calls the loops make across ranks."""

    def __init__(self):
        self.W = int(os.environ.get("WORLD_SIZE", 1))
        cuda = torch.cuda.is_available()
        self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
        if cuda:
            # before any collective: FSDP2's shards and all_gather_object's staging go to the current
            # device, which is otherwise cuda:0 on every rank
            torch.cuda.set_device(self.device)
            # TF32 for the fp32 matmuls left on the GPU; the CPU's fp32 stays exact
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.W > 1:
            # NCCL: bound to this rank's GPU
            device_id = torch.device(self.device) if cuda else None
            dist.init_process_group("nccl" if cuda else "gloo", device_id=device_id)
        self.rank = dist.get_rank() if self.W > 1 else 0
        self.host = socket.gethostname()

    def print(self, *a, **k):
        if self.rank == 0:
            print(*a, **k, flush=True)

    def sync_grads(self, model, last):
        """Gradients are all-reduced on a step's last micro-step only; the others accumulate."""
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(last)
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        return model.no_sync() if ddp and not last else contextlib.nullcontext()

    def gather_sums(self, sums):
        """{key: [sum, count]} summed over ranks (whatever keys each rank has)."""
        if self.W == 1:
            return sums
        parts, out = [None] * self.W, {}
        dist.all_gather_object(parts, sums)
        for p in parts:
            accumulate(out, p)
        return out

    def broadcast(self, obj):
        """Rank 0's obj on every rank: what rank 0 sees on disk decides for all (nodes' disks may differ)."""
        if self.W == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_shared(self, folder, flag):
        """Rank 0 writes a token into `folder`; a rank that does not see it stops every rank, naming `flag`."""
        if self.W == 1:
            return
        token = os.path.join(folder, f".shared-{self.broadcast(uuid.uuid4().hex)}")
        if self.rank == 0:
            open(token, "w").close()
        self.barrier()
        for _ in range(10):  # a network filesystem may show a new file a little later
            if os.path.exists(token):
                break
            time.sleep(0.5)
        seen = os.path.exists(token)
        blind = sorted(self.gather_dict({self.rank: self.host} if not seen else {}).items())
        if self.rank == 0:
            os.remove(token)
        if blind:
            raise cli.UserFileError(
                f"{flag} {folder}: rank 0 (host {self.host}) wrote a file there that "
                f"{', '.join(f'rank {r} (host {h})' for r, h in blind)} cannot see: {flag} must be a "
                f"folder shared by every node (a shared filesystem), not a path on each node's own disk"
            )

    def gather_dict(self, d):
        if self.W == 1:
            return d
        parts = [None] * self.W
        dist.all_gather_object(parts, d)
        return {k: v for p in parts for k, v in p.items()}

    def barrier(self):
        if self.W > 1:
            dist.barrier()

    def end(self):
        """A barrier, then an exit without the teardown, where gloo's threads could abort; DDP goes first."""
        if self.W > 1:
            dist.barrier()
            dist.destroy_process_group()
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(0)


def setup(cfg, cache_dir=""):
    """Before any compute: the process group, the non-default settings, the cache folder ("":
    model.cache_home()), the checks of flags both trainers have and of out_dir. A script's own flags
    are its own to check, before this."""
    ranks = Ranks()
    ranks.print(f"settings other than the defaults: {json.dumps(non_defaults(cfg))}")
    ranks.print(f"cache: {cache_dir or hub.cache_home()} (--cache_dir, ${hub.CACHE_ENV})")
    if cfg.batch_size % (ranks.W * cfg.grad_accum):
        raise cli.UserError(
            f"--batch_size {cfg.batch_size} must divide by ranks x grad_accum = "
            f"{ranks.W * cfg.grad_accum}"
        )
    hub.check_template(cfg.template)
    # float16 would need a GradScaler: small LoRA gradients underflow
    if cfg.dtype not in ("float32", "bfloat16"):
        raise cli.UserError(
            f"--dtype {cfg.dtype!r}: expected float32 or bfloat16 (float16 is not supported: its "
            f"gradients would underflow without loss scaling; bfloat16 has float32's range)"
        )
    state = os.path.join(cfg.out_dir, "state.pt")
    has_state = ranks.broadcast(os.path.exists(state))  # rank 0's view decides for all
    if not cfg.resume and not cfg.overwrite and has_state:
        raise cli.UserError(
            f"--out_dir {cfg.out_dir} already holds a run ({state}): pass --resume true to continue "
            f"it, --overwrite true to replace it, or another --out_dir"
        )
    # the host and rank in the name: processes of two nodes may share a pid
    probe = os.path.join(cfg.out_dir, f".write-test-{ranks.host}-{ranks.rank}-{os.getpid()}")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise cli.UserFileError(f"--out_dir {cfg.out_dir}: cannot write there ({e})") from None
    # rank 0 writes the checkpoint, every rank resumes from it
    ranks.check_shared(cfg.out_dir, "--out_dir")
    if ranks.rank == 0:
        hub.recover_checkpoint(os.path.join(cfg.out_dir, "checkpoint"))
    return ranks
