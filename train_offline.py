"""train_offline.py: offline alignment of a LLaVA-style model (paper §2.2, §3.1, §3.2, §3.5).

`--loss dpo|ipo|slic` trains on preference pairs (Eq. 3 and variants; Avg-DPO, Eq. 5, with a second
rejected response), `--loss rm` a Bradley–Terry reward model (Eq. 1: a scalar head on a response's
last token). LoRA on every LLM linear, the projector at its own learning rate, the tower frozen.

Read main() first: batch -> packed forward -> loss -> backward -> step (train.train_step). A pair is
one packed row, [prompt | chosen | rejected], each response seeing the prompt and itself only: the
image and prompt are encoded once. The reference log-probs are computed once and cached (`--ref
lora_off`: each step, adapters off). The machinery both trainers share is train.py's.

    torchrun train_offline.py --data bdhs            # the main job: the base's BDHS pairs, then DPO
    python train_offline.py                          # DPO on the world's corruption set
    python train_offline.py --data bdhs+world        # Avg-DPO: the world's rejected and BDHS's
    python train_offline.py --data bdhs --bdhs_variant noise  # BDHS_noise's rejected (bdhs.py)
    python train_offline.py --rpo_alpha 0 --lr 1e-3  # the paper's plain DPO (no NLL term)
    torchrun --nproc_per_node 8 train_offline.py --model llava-hf/llava-v1.6-vicuna-7b-hf \\
        --data pairs.jsonl --dtype bfloat16 --fsdp true --lora_r 128 --lora_alpha 256  # (README)
    python train_offline.py --data povid:/data/povid --loss rm --out_dir runs/rm
    python train_offline.py --resume true            # continues a killed run from its last step
"""

import dataclasses
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm import tqdm

import bdhs
import cli
import data
import eval as ev
import hub
import losses
import model as M
import world
from model import VLM
from train import (
    Checkpoint,
    Metrics,
    PairModel,
    accumulate,
    autocast,
    bar_postfix,
    build_policy,
    length,
    loss_name,
    micro_batches,
    pair_loss,
    pair_stats,
    resumable_config,
    setup,
    summary,
    to,
    to_host,
    train_step,
    unsharded,
)

# --data built from the world, not read
WORLD_DATA = ("world", "bdhs", "bdhs+world", "world+partners")
BDHS_DATA = ("bdhs", "bdhs+world")  # the pairs' rejected responses built by bdhs.py


# A Config is a table, a flag a row, its help the comment beside it: kept as written
# fmt: off
@dataclass
class Config:
    model: str = world.BASE_MODEL  # an HF-layout folder or a hub id
    template: str = ""           # chat template: vicuna | llava | mistral | chatml; "": the model's own
    data: str = "world"          # world (its corruption set), bdhs, bdhs+world (Avg-DPO), world+partners
                                 # (opt-in: partner-present pairs too, world.partner_pairs), a .jsonl,
                                 # or povid|vlfeedback|rlhfv|llava-rlhf[:PATH]
    image_root: str = ""         # what a .jsonl's relative image paths resolve against (default: its
                                 # folder); a release's images (COCO for POVID...; default: images/ by it)
    bdhs_variant: Literal[cli.field_choices(bdhs.Config)["variant"]] = bdhs.Config.variant  # --data bdhs,
                                 # bdhs+world: bdhs.py's --variant, which makes the rejected responses
    loss: Literal[(*losses.LOSSES, "rm")] = "dpo"  # a preference loss (losses.py), or rm: a reward model
    out_dir: str = "runs/offline"  # the checkpoint, training state and metrics
    beta: float = 1.0            # the world's (dev seed 0); the paper searched 0.05-0.5 for DPO
    rpo_alpha: float = 1.0       # + α x the chosen's per-token NLL (TRL's RPO; the paper's DPO: 0)
    world_seed: int = 0          # the world's scenes: 0-2 dev seeds, 3-5 test seeds (study.py)
    world_half: Literal["", "a", "b"] = ""  # the world's prompts about half of the usual pairs only
    pairs: int = 2200            # world pairs to build; a tenth (<= 200) held out, of a file too
    steps: int = 0               # optimizer steps; 0: `epochs` passes over the training pairs
    epochs: float = 3.0          # passes over the training pairs (without --steps)
    batch_size: int = 32         # global: micro-batch x grad_accum x ranks
    grad_accum: int = 1          # micro-steps per optimizer step
    lr: float = 2e-3             # adapters and a reward head: the world's, far above a 7B's
    lr_projector: float = 5e-5   # the projector's own learning rate (paper §2.2); 0 freezes it
    lora_r: int = 16             # LoRA rank on every LLM linear; 0: the whole LLM trains
    lora_alpha: float = 32.0     # LoRA's scale is lora_alpha / lora_r
    warmup: int = 10             # linear warm-up steps, then cosine decay to 0
    max_length: int = 4096       # prompt + response tokens; responses are cut, image tokens never
    ref: Literal["cache", "lora_off"] = "cache"  # cache: reference log-probs once, on disk; lora_off:
                                                 # the adapters off, every step
    cache_dir: str = ""          # reference log-probs, BDHS pairs, base reports, shared by runs; "":
                                 # $MMALIGN_CACHE, else $XDG_CACHE_HOME/mmalign, else ~/.cache/mmalign
    dtype: Literal[cli.DTYPES] = "float32"  # the frozen base stored in it and the autocast dtype; what
                                          # trains, AdamW's moments and log-probs stay fp32 (float16: refused)
    grad_ckpt: bool = False      # recompute each decoder layer in the backward pass
    fsdp: bool = False           # shard parameters, gradients and optimizer state (FSDP2); else DDP
    save_every: int = 50         # steps between saves of the training state; the last step saves it and the
                                 # merged checkpoint
    resume: bool = False         # continue from out_dir's training state, with its settings
    overwrite: bool = False      # a fresh run may replace the run already in out_dir
    eval_n: int = 500            # world data: scenes of the world report before and after; 0: none
    seed: int = 0                # LoRA's initialisation and the order of the pairs
    workers: int = -1            # processes decoding the images ahead of the step, into pinned memory;
                                 # -1: 4 on CUDA, 0 on the host (in the loop)
    BOUNDS = dict(beta="> 0", rpo_alpha=">= 0", pairs=">= 1", steps=">= 0", epochs="> 0", batch_size=">= 1",
                  grad_accum=">= 1", lr=">= 0", lr_projector=">= 0", lora_r=">= 0", lora_alpha="> 0",
                  warmup=">= 0", max_length=">= 1", save_every=">= 0", eval_n=">= 0",
                  workers=">= -1")  # checked at parse
# fmt: on


def main(argv=None):
    cfg, state = resumable_config(Config, argv, __doc__)
    check(cfg)
    ranks = setup(cfg, cfg.cache_dir)
    share_cache(cfg, ranks)
    torch.manual_seed(cfg.seed)  # the same on every rank: LoRA's initial A must agree
    head = "reward" if cfg.loss == "rm" else None
    pm, model, opt = build_policy(cfg, ranks, head, cfg.lr_projector, cfg.grad_ckpt)
    B = cfg.batch_size // (ranks.W * cfg.grad_accum)  # pairs per micro-step and rank
    items, train_idx, val_idx = load_pairs(cfg, pm.vlm, ranks, pm)
    ranks.print(
        f"objective: {objective_line(cfg, len(items[0]['responses']))}; {len(val_idx)} pairs held out, "
        f"{len(train_idx)} to train on"
    )
    cached = cfg.ref == "cache" and cfg.loss != "rm"
    ref = reference_logps(cfg, pm, items, B, ranks) if cached else None
    steps = cfg.steps or max(1, int(cfg.epochs * len(train_idx) // cfg.batch_size))
    ckpt = Checkpoint(cfg, pm, opt, ranks)
    start = ckpt.resume(steps, state)
    if start is None:  # a finished run: nothing to do
        del model  # DDP's reducer goes before its process group
        return ranks.end()
    log = Metrics(cfg, start, ranks)
    ranks.print(
        f"{steps} steps of {cfg.batch_size} pairs ({B} per micro-step per rank, {cfg.grad_accum} "
        f"micro-steps, {ranks.W} ranks)" + (f", resuming at step {start}" if start else "")
    )
    batches = micro_batches(cfg, pm.vlm, items, train_idx, B, ranks, start, steps)
    bar = tqdm(
        range(start, steps), initial=start, total=steps, disable=ranks.rank != 0, desc=cfg.loss
    )
    for step in bar:
        micros = itertools.islice(batches, cfg.grad_accum)  # [(rows, batch)]: one per forward
        lr, norm = train_step(cfg, pm, model, opt, micros, ref, ranks, log, step, steps)
        rec = log.write(
            step, lr=lr, grad_norm=norm, epoch=(step + 1) * cfg.batch_size / len(train_idx)
        )
        bar.set_postfix(bar_postfix(rec))  # the step's metrics, already on the host
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step == steps - 1:
            ckpt.save(step, final=step == steps - 1)
    del batches  # a DataLoader's workers end here
    finish(cfg, pm, items, val_idx, B, ref, ranks, log, steps, rec)
    del model
    ranks.end()


def finish(cfg, pm, items, val_idx, B, ref, ranks, log, steps, rec):
    """After the last step: the held-out pairs' metrics, the closing line, the world report."""
    held = {}
    if val_idx:  # held-out pairwise accuracy: the reward model's (Table 7) or the implicit reward's
        held = log.write(
            steps - 1, **evaluate_pairs(cfg, pm, items, val_idx, B, ref, ranks), prefix="eval/"
        )
    log.close()
    ranks.print(summary(steps, rec, cfg.out_dir, held))
    if ranks.rank == 0 and cfg.data in WORLD_DATA and cfg.loss != "rm" and cfg.eval_n:
        checkpoint = os.path.join(cfg.out_dir, "checkpoint")
        ev.before_after(
            cfg.model,
            checkpoint,
            cfg.world_seed,
            cfg.world_half,
            cfg.eval_n,
            cfg.out_dir,
            cfg.cache_dir,
        )


def check(cfg: Config):
    """This script's own flags, named before any compute (setup checks those both trainers have)."""
    if cfg.data not in WORLD_DATA:
        data.check_spec(cfg.data)
    if cfg.ref == "lora_off" and (cfg.lr_projector > 0 or not cfg.lora_r):
        raise cli.UserError(
            "--ref lora_off needs --lora_r > 0 and --lr_projector 0: switching the adapters off "
            "gives back the reference model only if nothing else trains"
        )
    if cfg.bdhs_variant != bdhs.Config.variant and cfg.data not in BDHS_DATA:
        raise cli.UserError(
            f"--bdhs_variant {cfg.bdhs_variant}: BDHS makes the rejected responses of --data bdhs or "
            f"bdhs+world only, not of --data {cfg.data}"
        )


def share_cache(cfg: Config, ranks):
    """The cache folder, "" resolved (model.cache_home()); under BDHS, one that every rank sees: each
    writes its share of the pairs, and reads them all."""
    cfg.cache_dir = cfg.cache_dir or hub.cache_home()
    if cfg.data in BDHS_DATA:
        os.makedirs(cfg.cache_dir, exist_ok=True)
        ranks.check_shared(cfg.cache_dir, "--cache_dir")


def objective_line(cfg: Config, K):
    """What a run trains, in words; K: responses per pair in the data as loaded (3: two rejected)."""
    if cfg.loss == "rm":
        return "Bradley–Terry reward model" + (", the second rejected unused" if K == 3 else "")
    name = loss_name(cfg.loss)
    nll = f" + {cfg.rpo_alpha} × NLL" if cfg.rpo_alpha else ""
    avg = (" (Avg-DPO)" if cfg.loss == "dpo" else " (averaged, as Avg-DPO)") if K == 3 else ""
    return f"{name} (β {cfg.beta}){nll}, {K - 1} rejected{avg}"


@torch.no_grad()
def evaluate_pairs(cfg: Config, pm, items, val_idx, B, ref, ranks):
    """Loss, pairwise accuracy and margin on held-out pairs; every rank runs as many forwards."""
    pm.eval()
    sums, mine = {}, val_idx[ranks.rank :: ranks.W]
    for k in range(math.ceil(math.ceil(len(val_idx) / ranks.W) / B)):
        idx = mine[k * B : (k + 1) * B]
        rows = idx or val_idx[:1]  # a rank with nothing left runs a forward for the others ...
        batch = to(data.collate_pairs(pm.vlm, [items[i] for i in rows]), ranks.device)
        with autocast(cfg, ranks.device):  # as in training: a bf16 base runs under autocast only
            lp, scores = pm(**batch)
            loss, c, r = pair_loss(cfg, pm, batch, lp, scores, ref, rows)
        if idx:  # ... and counts nothing
            accumulate(sums, pair_stats(loss, c, r, lp))
    pm.train()
    tot = ranks.gather_sums(to_host(sums)[0])
    return {
        k: tot[k][0] / max(tot[k][1], 1) for k in ("loss", "rewards/accuracies", "rewards/margins")
    }


# -----------------------------------------------------------------------------
# Data: records -> tokenized items, a held-out tenth; BDHS pairs built once and cached


def load_pairs(cfg: Config, vlm: VLM, ranks, pm=None):
    """-> items (tokenized once), training and held-out indices; pm: the policy around vlm, which BDHS
    samples from with its FSDP2 units gathered."""
    if cfg.data == "world":
        recs = world.world_pairs(world.World(cfg.world_seed, half=cfg.world_half), cfg.pairs)
    # opt-in: a share of partner-present pairs (world.partner_pairs)
    elif cfg.data == "world+partners":
        recs = world.world_partner_pairs(
            world.World(cfg.world_seed, half=cfg.world_half), cfg.pairs
        )
    elif cfg.data in ("bdhs", "bdhs+world"):
        recs = bdhs_pairs(cfg, vlm, ranks, pm)
    else:
        recs = data.load_pairs(cfg.data, cfg.image_root)
    items, stats = data.prepare_pairs(vlm, recs, cfg.max_length)
    ranks.print(f"pairs: {json.dumps(stats)}")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    nval = min(200, len(items) // 10)
    if len(items) - nval < cfg.batch_size:
        raise cli.UserError(
            f"--data {cfg.data}: {len(items) - nval} training pairs, fewer than one batch of "
            f"{cfg.batch_size} (of {stats['pairs']} records, {stats['ties']} have chosen == rejected, "
            f"{stats['too_long']} do not fit --max_length {cfg.max_length}; {nval} held out)"
        )
    return items, order[nval:], order[:nval]


def bdhs_pairs(cfg: Config, vlm: VLM, ranks, pm=None):
    """BDHS pairs of the world's prompts by the starting model, built once (each rank its share)."""
    bc = bdhs_config(cfg)
    ranks.print(f"BDHS pairs: {bc.out}")
    parts = [bc.out] if ranks.W == 1 else [f"{bc.out}.rank{r}" for r in range(ranks.W)]
    # rank 0's view decides
    if not ranks.broadcast(all(os.path.exists(p + ".done") for p in parts)):
        # FSDP2: the whole model gathered on each rank for its share (ranks decode different lengths, so
        # no collective may run while sampling); lora off: the identity anyway, its matmuls skipped
        with unsharded(pm or vlm), M.lora_disabled(vlm):
            bdhs.build_pairs(bc, vlm, rank=ranks.rank, world_size=ranks.W, log=ranks.print)
        open(parts[ranks.rank] + ".done", "w").close()
    ranks.barrier()
    return sorted((r for p in parts for r in data.read_pairs(p)), key=lambda r: r["id"])


def bdhs_config(cfg: Config):
    """bdhs.py's settings for --data bdhs / bdhs+world, its out file in the cache folder named by their
    hash with the model's files and the code's: another variant, model or seed builds its own pairs."""
    source = "world+corrupt" if cfg.data == "bdhs+world" else "world"
    bc = bdhs.Config(
        model=cfg.model,
        source=source,
        n=cfg.pairs,
        world_seed=cfg.world_seed,
        world_half=cfg.world_half,
        seed=cfg.seed,
        batch_size=256,  # wide: a tiny model
        external=cfg.data == "bdhs+world",  # Avg-DPO: the world's rejected and BDHS's
        template=cfg.template,
        variant=cfg.bdhs_variant,
    )
    code = hub.source_bytes(
        "bdhs.py", "data.py", "model.py", "world.py", "embedder.py", "hub.py", "cli.py"
    )
    key = hashlib.sha256(
        (hub.folder_hash(cfg.model) + json.dumps(dataclasses.asdict(bc))).encode() + code
    )
    bc.out = os.path.join(cfg.cache_dir, f"bdhs-{key.hexdigest()[:16]}", "pairs.jsonl")
    return bc


def fingerprint(cfg: Config, items):
    """The reference cache's key: the model's files and dtype, each pair's tokens and images."""
    # "/amp": not the key of an older bf16 cache, whose reference ran outside autocast; fp32 keys unchanged
    h = hashlib.sha256(
        (
            hub.folder_hash(cfg.model) + cfg.dtype + ("/amp" if cfg.dtype != "float32" else "")
        ).encode()
    )
    for it in items:
        h.update(json.dumps([it["prompt"], it["responses"]]).encode())
        im = it["image"]
        if isinstance(im, str):  # the file's bytes: a same-size replacement is a new key
            with open(im, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        else:
            h.update(im if isinstance(im, bytes) else im.tobytes())
    return h.hexdigest()[:20]


@torch.no_grad()
def reference_logps(cfg: Config, pm: PairModel, items, B, ranks):
    """(N, K) reference log-probs of every response: the starting policy's, computed once, packed and
    under autocast as the policy's are. Rank 0 alone reads and writes the file; the others get its tensor."""
    path = os.path.join(cfg.cache_dir, f"ref-{fingerprint(cfg, items)}.pt")
    if ranks.broadcast(os.path.exists(path)):  # rank 0's view decides: a node may not see the file
        return ranks.broadcast(torch.load(path, weights_only=True) if ranks.rank == 0 else None)
    N, out = len(items), {}
    # batches of like lengths
    mine = sorted(range(ranks.rank, N, ranks.W), key=lambda j: length(items[j]))
    # the same batch count on every rank (FSDP)
    mine += mine[:1] * (math.ceil(N / ranks.W) - len(mine))
    pm.eval()
    for i in tqdm(range(0, len(mine), B), desc="reference log-probs", disable=ranks.rank != 0):
        idx = mine[i : i + B]
        # the policy's dtype: at step 0 policy and reference agree
        with autocast(cfg, ranks.device):
            lp = pm(**to(data.collate_pairs(pm.vlm, [items[j] for j in idx]), ranks.device))[0]
        out.update(zip(idx, lp.sum(-1).cpu()))
    pm.train()
    out = ranks.gather_dict(out)
    ref = torch.stack([out[j] for j in range(N)])
    if ranks.rank == 0:
        os.makedirs(cfg.cache_dir, exist_ok=True)
        cli.atomic_write(path, lambda tmp: torch.save(ref, tmp))  # runs side by side may write it
    return ref


if __name__ == "__main__":
    cli.run_main(main)
