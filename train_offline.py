"""train_offline.py: supervised fine-tuning and offline alignment of a LLaVA-style model (paper §2.2, §3.1, §3.2, §3.5).

`--loss dpo|ipo|slic` trains on preference pairs (Eq. 3 and its variants; Avg-DPO, Eq. 5, when every pair has a
second rejected response), `--loss rm` a Bradley–Terry reward model (Eq. 1; a scalar head on each response's last
token), `--loss sft` on ground-truth conversations (and `--model scratch --loss sft` builds the world's base model).
The paper's setup is the default: LoRA on every LLM linear, the projector trained at its own learning rate, the vision
tower frozen (`--lora_r 0` trains the whole LLM instead).

Two things make a step cheap. Each pair is one packed row, [prompt | chosen | rejected], where every response sees
the prompt and itself only: the image and prompt go through the tower and the LLM once for all responses, and the
LM head runs only on response positions. The reference log-probs are computed once, before training, and cached on
disk keyed by model and data (`--ref lora_off` instead recomputes them each step with the adapters switched off).

    torchrun train_offline.py --data bdhs                     # the main job: BDHS pairs from the shipped base, then DPO
    python train_offline.py                                   # DPO on the world's corruption set, from the shipped base
    python train_offline.py --data bdhs --external true       # Avg-DPO: the corruption set's rejected and BDHS's (Eq. 5)
    torchrun --nproc_per_node 2 train_offline.py --loss ipo --beta 1.0
    python train_offline.py --data pairs.jsonl --model llava-hf/llava-v1.6-vicuna-7b-hf --dtype bfloat16 --fsdp true
    python train_offline.py --data povid:/data/povid --loss rm --out_dir runs/rm
    python train_offline.py --resume true                     # continues a killed run from its last saved step
    python train_offline.py --loss sft --model scratch --lora_r 0 --steps 1000 ...  # the shipped base's first
                                                              # SFT phase (the README has all three)
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pickle
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from tqdm import tqdm

import data
import losses
from model import VLM, config_from_argv, recover_checkpoint

WORLD = ("world", "bdhs")  # --data values that build pairs from the embedded world


@dataclass
class Config:
    model: str = data.BASE_MODEL  # HF folder or hub id; "scratch" builds the world's tiny architecture
    data: str = "world"           # "world" (sft: its sft split; else its corruption set), "bdhs" (BDHS pairs, below),
                                  # a native .jsonl, or povid|vlfeedback|rlhfv|llava-rlhf, optionally :PATH
    image_root: str = ""          # the release's image folder (COCO for POVID...); default: images/ beside the data
    loss: str = "dpo"             # dpo | ipo | slic | rm | sft
    out_dir: str = "runs/offline"
    beta: float = 1.0             # on the world, 1.0 kept recall where 0.5 lost it (README); the paper searched 0.05-0.5
    gamma: float = 0.5            # Avg-DPO's weight on the external rejected response (Eq. 5)
    rpo_alpha: float = 1.0        # + alpha x the chosen response's per-token NLL (TRL's rpo_alpha; not in the paper,
                                  # whose DPO is 0): on the world it keeps recall (README)
    world_seed: int = 0
    prior: float = 0.9            # the world's language prior: how often an object comes with its usual partner
    color_prior: float = 0.6      # ... and how often it has its typical colour
    hallucinate: float = 0.0      # SFT: how often its annotations name an absent usual partner (as text-only
                                  # annotators writing from captions do); see the README's world section
    pairs: int = 2000             # world preference pairs to build
    val_pairs: int = 200          # pairs held out to report pairwise accuracy (Table 7 for the reward model)
    steps: int = 0                # optimizer steps; 0 means `epochs` passes over the training pairs
    epochs: float = 3.0
    batch_size: int = 32          # global batch: micro-batches x grad_accum x ranks
    grad_accum: int = 1
    lr: float = 2e-3              # LoRA adapters (or the whole LLM with --lora_r 0) and the reward head
    lr_projector: float = 5e-5    # the projector's own learning rate (paper §2.2)
    lr_vision: float = 0.0        # the vision tower's; 0 freezes it (LLaVA's recipe)
    lora_r: int = 16              # 0: full fine-tuning of the LLM
    lora_alpha: float = 32.0
    warmup: int = 10              # linear warm-up steps, then cosine decay to 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int = 2048        # per response: prompt + response tokens; responses are cut, image tokens never
    ref: str = "cache"            # cache: reference log-probs computed once and kept on disk; lora_off: every step
    cache_dir: str = "runs/ref_cache"
    dtype: str = "float32"        # autocast dtype for the forward; master weights and log-probs stay fp32
    grad_ckpt: bool = False       # recompute each decoder layer in the backward pass
    fsdp: bool = False            # shard parameters, gradients and optimizer state with FSDP2 (else DDP)
    save_every: int = 50          # steps between checkpoints (model + training state); the last step always saves
    resume: bool = False          # continue from out_dir's training state
    overwrite: bool = False       # a fresh run may replace the run already in out_dir
    eval_n: int = 500             # world scenes to evaluate before and after (data "world"); 0 skips
    seed: int = 0
    log_every: int = 10
    vision_pretrain: int = 130    # --model scratch: steps of per-cell supervised tower pretraining (stands in for CLIP's)
    sft_kinds: str = ""           # SFT: question kinds and weights, e.g. "exist=1" (default: data.KINDS)
    sft_turns: int = 0            # SFT: turns per conversation (0: 1-3 at random)
    # --data bdhs: rejected responses sampled by the model itself (bdhs.py), then --loss on them
    bdhs_source: str = "world"    # world (the align prompts and ground truth) or a bdhs.py --source
    bdhs_variant: str = "attn"    # attn | noise | distort (POVID-style) | unguided (masking without guidance)
    rho: float = 0.99             # share of image tokens hidden (BDHS_attn)
    noise_steps: int = 500        # diffusion steps N (BDHS_noise, distort)
    external: bool = False        # Avg-DPO (Eq. 5) with the source's own rejected too (world: its corruption set)
    embedder: str = ""            # sentence embedder for the similarity check (bdhs.py --embedder)
    text_only: float = 0.0        # SFT: share of conversations with every image token hidden (the LLM's text-only
                                  # pretraining, in which it learns the world's language prior from text alone)


# -----------------------------------------------------------------------------
# The world's base architecture, for --model scratch (about 2.6M parameters)


def world_of(cfg: Config) -> data.World:
    return data.World(cfg.world_seed, cfg.prior, cfg.color_prior, cfg.hallucinate)


def scratch_model(cfg: Config) -> VLM:
    world = world_of(cfg)
    tok = data.build_tokenizer(world)
    raw = dict(model_type="llava", image_token_index=data.SPECIALS.index("<image>"), vision_feature_layer=-1,
               vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False,
               vision_config=dict(model_type="clip_vision_model", hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=3, num_attention_heads=4, image_size=data.SIZE, patch_size=32,
                                  projection_dim=128, hidden_act="quick_gelu"),
               text_config=dict(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=192,
                                intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                                num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
                                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                pad_token_id=3))
    vlm = VLM.from_config(raw, seed=cfg.seed)
    vlm.tokenizer, vlm.template = tok, data.TEMPLATE
    vlm.files["tokenizer_config.json"] = json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", chat_template=data.CHAT_TEMPLATE), indent=2)
    return vlm


def pretrain_vision(vlm: VLM, cfg: Config, print0=print):
    """LLaVA starts from a pretrained CLIP tower; from scratch, we pretrain ours for a hundred-odd steps to name the
    category and colour in each grid cell (a linear head per cell, thrown away afterwards). The scenes have uniformly
    random colours, so the tower learns shapes that do not lean on colour; the language prior is left to SFT."""
    tower, v = vlm.model.vision_tower, vlm.cfg.vision
    g = v.image_size // v.patch_size  # patches per side; each grid cell is (g/3)^2 of them
    assert g % 3 == 0, "vision pretraining pools patches per grid cell: patches per side must divide by 3"
    heads = torch.nn.Linear(v.hidden_size * len(vlm.cfg.feature_layers), len(data.CATEGORIES) + len(data.COLORS) + 2)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=2e-3, weight_decay=0.0)
    colors, K = list(data.COLORS), len(data.CATEGORIES)
    for step in range(cfg.vision_pretrain):
        rngs = [random.Random(f"pretrain-{cfg.world_seed}-{step}-{k}") for k in range(cfg.batch_size)]
        scenes = [data.sample_scene(r, cfg.prior, color_prior=1 / len(colors)) for r in rngs]
        cat = torch.full((len(scenes), 9), K)  # K / len(colors) = empty cell
        col = torch.full((len(scenes), 9), len(colors))
        for b, s in enumerate(scenes):
            for o in s.objects:
                cat[b, o.cell], col[b, o.cell] = data.CATEGORIES.index(o.category), colors.index(o.color)
        px = vlm.image_processor([data.render(s) for s in scenes])["pixel_values"]
        x = torch.cat(tower(px, vlm.cfg.feature_layers), -1)[:, 1:]  # (B, g*g, C) without the class token
        x = x.view(len(scenes), 3, g // 3, 3, g // 3, -1).mean((2, 4)).flatten(1, 2)  # (B, 9, C): one per cell
        out = heads(x)
        loss = F.cross_entropy(out[..., :K + 1].flatten(0, 1), cat.flatten()) + \
            F.cross_entropy(out[..., K + 1:].flatten(0, 1), col.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.vision_pretrain - 1:
            acc = (out[..., :K + 1].argmax(-1) == cat)[cat < K].float().mean().item()
            print0(f"vision pretrain step {step}: loss {loss.item():.3f}, category accuracy {acc:.3f}")

# -----------------------------------------------------------------------------
# Scoring packed pairs: one forward gives every response's log-prob (and reward-head score)


class PairModel(nn.Module):
    """What DDP / FSDP wrap: the VLM plus, for the reward model, a scalar head on each response's last token."""

    def __init__(self, vlm: VLM, reward_head=False):
        super().__init__()
        self.vlm = vlm
        self.score = nn.Linear(vlm.cfg.text.hidden_size, 1, bias=False) if reward_head else None
        self.value = None  # PPO's value head (train_online.py)

    def forward(self, input_ids, pixel_values, image_sizes=None, segment=None, position_ids=None, pred_idx=None,
                targets=None, last_idx=None, labels=None, key_mask=None, tokens=False):
        """A batch from `data.collate_pairs` -> per-response log-probs (B, K) summed over tokens in fp32, token counts
        (B, K), and reward scores (B, K) or None; with `tokens`, per-token log-probs (B, K, L) and the value head's
        values (B, K, L) or None. A batch from `data.collate` (SFT) -> logits (B, T, V)."""
        if segment is None:
            return self.vlm(input_ids, pixel_values, image_sizes, key_mask=key_mask)
        # each response sees the prompt and itself only: the image and prompt are encoded once for all of them
        h = self.vlm.hidden(input_ids, pixel_values, image_sizes, segment >= 0, position_ids, segment=segment)
        B, K, L = targets.shape
        pick = lambda idx: h.gather(1, idx.reshape(B, -1, 1).expand(-1, -1, h.shape[-1]))  # noqa: E731
        if self.score is not None:
            return None, None, self.score(pick(last_idx)).squeeze(-1).float()  # (B, K)
        hp = pick(pred_idx)
        lp = losses.gathered_logps(self.vlm.lm_head(hp).view(B, K, L, -1), targets)  # LM head on responses only
        if tokens:
            return lp, None if self.value is None else self.value(hp).view(B, K, L).float()
        return lp.sum(-1), (targets != -100).sum(-1), None


def model_hash(cfg: Config):
    """The model's name and dtype, and the bytes of its files when it is a local folder."""
    h = hashlib.sha256(json.dumps([cfg.model, cfg.dtype]).encode())
    if os.path.isdir(cfg.model):
        for fn in sorted(os.listdir(cfg.model)):
            if fn.endswith((".json", ".safetensors")):
                with open(os.path.join(cfg.model, fn), "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 24), b""):
                        h.update(chunk)
    return h.hexdigest()


def fingerprint(cfg: Config, items):
    """Cache key of the reference log-probs: the model's files, and every pair's tokens and image bytes."""
    h = hashlib.sha256(model_hash(cfg).encode())
    for it in items:
        h.update(json.dumps([it["prompt"], it["responses"]]).encode())
        im = it["image"]
        if isinstance(im, str):  # the file's bytes, streamed: a same-size replacement is a new key
            with open(im, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        else:
            h.update(im if isinstance(im, bytes) else im.tobytes())
    return h.hexdigest()[:20]


@torch.no_grad()
def reference_logps(pm: PairModel, items, cfg: Config, B, device, rank, W):
    """(N, K) reference log-probs of every response, computed before training (the policy starts at the reference)
    and cached on disk: a rerun, a resume or another loss on the same model and data reads them back."""
    path = os.path.join(cfg.cache_dir, f"ref-{fingerprint(cfg, items)}.pt")
    if not os.path.exists(path):
        N = len(items)
        mine = list(range(rank, N, W))
        mine += mine[:1] * (math.ceil(N / W) - len(mine))  # equal batch counts on every rank (FSDP needs it)
        out = {}
        pm.eval()
        for i in tqdm(range(0, len(mine), B), desc="reference log-probs", disable=rank != 0):
            idx = mine[i:i + B]
            lp, _, _ = pm(**to(data.collate_pairs(pm.vlm, [items[j] for j in idx]), device))
            out.update(zip(idx, lp.cpu()))
        pm.train()
        if W > 1:
            parts = [None] * W
            dist.all_gather_object(parts, out)
            out = {k: v for p in parts for k, v in p.items()}
        if rank == 0:
            os.makedirs(cfg.cache_dir, exist_ok=True)
            torch.save(torch.stack([out[j] for j in range(N)]), path + ".tmp")
            os.replace(path + ".tmp", path)
        if W > 1:
            dist.barrier()
    return torch.load(path, weights_only=True)


def to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}

# -----------------------------------------------------------------------------
# Setup: data, model, optimizer


def load_data(cfg: Config, vlm: VLM, print0=print):
    """Training and held-out items, the preference records tokenized once (SFT reads the world's sft split live)."""
    world = world_of(cfg)
    if cfg.data == "world":
        recs = data.world_pairs(world, cfg.pairs + cfg.val_pairs)
    elif cfg.data == "bdhs":
        recs = bdhs_pairs(cfg, vlm, print0)
    else:
        recs = data.load_pairs(cfg.data, cfg.image_root)
    items, stats = data.prepare_pairs(vlm, recs, cfg.max_length)
    print0(f"pairs: {json.dumps(stats)}")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    nval = cfg.val_pairs if cfg.data in WORLD else min(cfg.val_pairs, len(items) // 10)  # files: at most 10%
    if len(items) - nval < cfg.batch_size:
        raise ValueError(f"--data {cfg.data}: {len(items) - nval} training pairs, fewer than one "
                         f"batch of {cfg.batch_size} (of {stats['pairs']} records, {stats['ties']} "
                         f"have chosen == rejected, {stats['too_long']} do not fit --max_length "
                         f"{cfg.max_length}; {nval} held out)")
    return items, order[nval:], order[:nval]


def bdhs_pairs(cfg: Config, vlm: VLM, print0=print):
    """BDHS pairs from the reference model (the starting weights: the adapters are still the identity), built once
    and kept under cache_dir keyed by the model files and the settings; a killed build resumes where it stopped.
    Under torchrun each rank samples its share, and every rank then reads all of them."""
    import bdhs
    rank, W = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    source = "world+corrupt" if cfg.bdhs_source == "world" and cfg.external else cfg.bdhs_source
    bc = bdhs.Config(model=cfg.model, source=source, image_root=cfg.image_root, n=cfg.pairs + cfg.val_pairs,
                     world_seed=cfg.world_seed, prior=cfg.prior, color_prior=cfg.color_prior,
                     variant="attn" if cfg.bdhs_variant == "unguided" else cfg.bdhs_variant,
                     rho=cfg.rho, noise_steps=cfg.noise_steps, guided=cfg.bdhs_variant != "unguided",
                     embedder=cfg.embedder, external=cfg.external, seed=cfg.seed)
    if bc.variant not in ("attn", "noise", "distort"):
        raise ValueError(f"--bdhs_variant {cfg.bdhs_variant!r}: expected attn, noise, distort or unguided")
    code = b"".join(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f), "rb").read()
                    for f in ("bdhs.py", "data.py", "model.py"))  # the code that makes the pairs is part of the key
    key = hashlib.sha256((model_hash(cfg) + json.dumps(dataclasses.asdict(bc))).encode() + code).hexdigest()[:16]
    bc.out = os.path.join(cfg.cache_dir, f"bdhs-{key}", "pairs.jsonl")
    print0(f"BDHS pairs: {bc.out}")
    parts = [bc.out] if W == 1 else [f"{bc.out}.rank{r}" for r in range(W)]
    if not all(os.path.exists(p + ".done") for p in parts):
        with vlm.lora_disabled():  # the adapters start as the identity: skip their matmuls while sampling
            bdhs.build_pairs(bc, vlm, rank=rank, world_size=W, log=print0)
        open(parts[rank] + ".done", "w").close()
    if W > 1:
        dist.barrier()
    return sorted((r for p in parts for r in data.read_pairs(p)), key=lambda r: r["id"])


def build_model(cfg: Config, device, print0=print):
    vlm = scratch_model(cfg) if cfg.model == "scratch" else VLM.from_pretrained(cfg.model)
    if cfg.model == "scratch":
        pretrain_vision(vlm, cfg, print0)
    if cfg.model == "scratch" and cfg.lora_r:
        raise ValueError("--model scratch trains every weight: pass --lora_r 0")
    if cfg.lora_r:
        vlm.requires_grad_(False)
        vlm.add_lora(cfg.lora_r, cfg.lora_alpha)
        vlm.model.multi_modal_projector.requires_grad_(cfg.lr_projector > 0)
    vlm.model.vision_tower.requires_grad_(cfg.lr_vision > 0)
    vlm.model.language_model.checkpointing = cfg.grad_ckpt
    if cfg.loss == "rm":
        vlm.lm_head.requires_grad_(False)  # unused by the reward model (and an unused trainable tensor stalls DDP)
    pm = PairModel(vlm, reward_head=cfg.loss == "rm").to(device)
    if cfg.ref == "lora_off" and (not cfg.lora_r or any(p.requires_grad for n, p in pm.named_parameters()
                                                        if "lora_" not in n)):
        raise ValueError("--ref lora_off needs --lora_r > 0 and nothing but the adapters trained (--lr_projector 0): "
                         "otherwise switching the adapters off does not give back the reference model")
    return vlm, pm


def make_optimizer(cfg: Config, pm: PairModel, print0=print):
    """AdamW with one learning rate per part (LLM / projector / tower); made after FSDP swaps in sharded parameters."""
    groups = {}  # (learning rate, decays) -> params: matrices decay, gains and biases do not
    for n, p in pm.named_parameters():
        if p.requires_grad:
            lr = cfg.lr_vision if ".vision_tower." in n else cfg.lr_projector if ".multi_modal_projector." in n \
                else cfg.lr
            groups.setdefault((lr, p.dim() >= 2), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": cfg.weight_decay if dec else 0.0, "base_lr": lr}
                             for (lr, dec), ps in groups.items()], betas=(0.9, 0.95))
    n_train = sum(p.numel() for ps in groups.values() for p in ps)
    print0(f"trainable parameters: {n_train:,} of {sum(p.numel() for p in pm.parameters()):,}")
    return opt


def shard(pm: PairModel):
    """FSDP2: each decoder layer, then the rest (embeddings, tower, projector, head) as the root unit."""
    from torch.distributed.fsdp import fully_shard
    for layer in pm.vlm.model.language_model.layers:
        fully_shard(layer)
    return fully_shard(pm)

# -----------------------------------------------------------------------------
# Checkpoints: the model in HF layout (adapters merged) for users, and a training state for --resume


STATE_OPTS = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save(cfg: Config, pm: PairModel, opt, step, rank):
    """Both written atomically; the HF checkpoint first, so a kill between the two resumes from the older state."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in pm.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()  # FSDP: every rank holds full parameters until reshard()
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    if rank == 0:
        vlm = pm.vlm
        vlm.files["train_config.json"] = json.dumps(dataclasses.asdict(cfg), indent=2)
        if pm.score is not None:
            vlm.extra["score.weight"] = pm.score.weight.detach().cpu()  # the reward head, saved beside the LLM's
        vlm.save_pretrained(os.path.join(cfg.out_dir, "checkpoint"))
    for m in units:
        m.reshard()
    model_sd = {k: v for k, v in get_model_state_dict(pm, options=STATE_OPTS).items() if k in trainable}
    opt_sd = get_optimizer_state_dict(pm, opt, options=STATE_OPTS)
    if rank == 0:
        path = os.path.join(cfg.out_dir, "state.pt")
        st = dict(step=step, model=model_sd, optimizer=opt_sd, config=dataclasses.asdict(cfg))
        try:
            torch.save(st, path + ".tmp")
        except (OSError, RuntimeError) as e:  # torch says "failed writing file", without the path
            with contextlib.suppress(OSError):
                os.remove(path + ".tmp")  # its space back, so that a later save can fit
            raise OSError(f"cannot write {path}.tmp: {e}") from e
        os.replace(path + ".tmp", path)


def restore(cfg: Config, pm: PairModel, opt):
    """-> the step to continue from. Parameters and optimizer moments come back exactly; the data order is a function
    of the step, so the next batch is the one the killed run would have taken."""
    path = os.path.join(cfg.out_dir, "state.pt")
    try:
        st = torch.load(path, weights_only=True)  # tensors and plain values: a pickle runs no code
    except pickle.UnpicklingError as e:
        raise ValueError(f"--resume: refused to load {path}: it holds more than tensors and plain "
                         f"values, which a training state never does ({str(e).splitlines()[0]})"
                         ) from None
    # the rest shapes the trajectory
    volatile = ("resume", "overwrite", "save_every", "log_every", "eval_n", "cache_dir")
    changed = {k for k, v in st["config"].items() if k not in volatile and getattr(cfg, k) != v}
    if changed:
        raise ValueError(f"--resume: {path} was written with different settings: {sorted(changed)}")
    set_model_state_dict(pm, st["model"], options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(pm, opt, st["optimizer"], options=StateDictOptions(full_state_dict=True))
    return st["step"] + 1

# -----------------------------------------------------------------------------
# Training


def setup(cfg):
    """torchrun's environment -> (ddp, rank, world size, device, print0); prints the settings once."""
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, W = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    print0 = print if rank == 0 else (lambda *a, **k: None)
    print0(json.dumps(dataclasses.asdict(cfg), indent=2))
    for k, least in (("pairs", 1), ("batch_size", 1), ("grad_accum", 1), ("steps", 0),
                     ("log_every", 1), ("save_every", 0)):
        if getattr(cfg, k) < least:
            raise ValueError(f"--{k} {getattr(cfg, k)}: must be at least {least}")
    if cfg.batch_size % (W * cfg.grad_accum):
        raise ValueError(f"--batch_size {cfg.batch_size} must divide by ranks x grad_accum = {W * cfg.grad_accum}")
    return ddp, rank, W, device, print0


def check_out_dir(cfg, rank):
    """Before any compute: out_dir can be written, holds no other run unless --resume or --overwrite
    says so, and what a killed save left in it is tidied (model.recover_checkpoint)."""
    state = os.path.join(cfg.out_dir, "state.pt")
    if cfg.resume and not os.path.exists(state):
        raise FileNotFoundError(f"--resume: no training state at {state}")
    if not cfg.resume and not cfg.overwrite and os.path.exists(state):
        raise ValueError(f"--out_dir {cfg.out_dir} already holds a run ({state}): pass --resume "
                         f"true to continue it, --overwrite true to replace it, or another "
                         f"--out_dir")
    probe = os.path.join(cfg.out_dir, f".write-test{os.getpid()}")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise OSError(f"--out_dir {cfg.out_dir}: cannot write there ({e})") from None
    if rank == 0:
        recover_checkpoint(os.path.join(cfg.out_dir, "checkpoint"))


def open_metrics(cfg, start):
    """out_dir/metrics.jsonl: a resumed run keeps the lines before its state's step, written to disk
    at once (atomically), so a kill before its next logged step loses none; the rest are redone."""
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    old = open(path).readlines() if cfg.resume and os.path.exists(path) else []
    with open(path + ".tmp", "w") as f:
        f.writelines(line for line in old if json.loads(line).get("step", -1) < start)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return open(path, "a")


def finished(cfg, start, steps, print0):
    """--resume on a run whose state is at its last step: nothing to do (no second eval line)."""
    if start >= steps:
        print0(f"{cfg.out_dir}: the run is complete ({steps} steps); nothing to resume")
    return start >= steps


def batch_rows(n, cfg, step, micro, B, rank, W):
    """The rows of `step` out of n: a per-epoch shuffle (a function of the step, so resume is exact), of which rank r
    takes r, r + W, ... of the micro-step's slice: the same data for any number of ranks."""
    G = cfg.batch_size
    per_epoch = max(1, n // G)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + step // per_epoch))
    base = (step % per_epoch) * G + micro * B * W
    return [perm[base + rank + k * W].item() for k in range(B)]


def set_lr(cfg, opt, step, steps):
    """Linear warm-up, then cosine decay to 0."""
    scale = min(1.0, (step + 1) / max(1, cfg.warmup)) * 0.5 * (1 + math.cos(math.pi * step / steps))
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * scale


def grad_sync(model, last):
    """Gradients are all-reduced only on a step's last micro-step; the others just accumulate locally."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    return model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not last \
        else contextlib.nullcontext()


def finish():
    """Ends a torchrun process: the ranks wait for each other (rank 0 may still be saving or evaluating), the process
    group goes, and the process exits without the interpreter's teardown, in which gloo's threads and the tensors
    they still reference could abort it ("terminate called without an active exception") after all was saved."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def optimizer_step(cfg, pm, opt):
    """Clip, step, clear; -> the gradient norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(pm.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor


def main(argv=None):
    cfg = config_from_argv(Config, argv, __doc__)
    ddp, rank, W, device, print0 = setup(cfg)
    if cfg.loss not in (*losses.LOSSES, "rm", "sft"):
        raise ValueError(f"--loss {cfg.loss!r}: expected one of {', '.join([*losses.LOSSES, 'rm', 'sft'])}")
    check_out_dir(cfg, rank)
    torch.manual_seed(cfg.seed)  # the same on every rank: LoRA's initial A must agree (DDP also broadcasts it)
    vlm, pm = build_model(cfg, device, print0)
    world = world_of(cfg)
    B = cfg.batch_size // (W * cfg.grad_accum)  # micro-batch per rank
    sft = cfg.loss == "sft"
    model = shard(pm) if cfg.fsdp and ddp else nn.parallel.DistributedDataParallel(pm) if ddp else pm
    opt = make_optimizer(cfg, pm, print0)
    items, ref = None, None
    if not sft:
        items, train_idx, val_idx = load_data(cfg, vlm, print0)
        if cfg.ref == "cache" and cfg.loss != "rm":
            ref = reference_logps(pm, items, cfg, B, device, rank, W)
    steps = cfg.steps or (1000 if sft else max(1, int(cfg.epochs * len(train_idx) // cfg.batch_size)))
    amp = torch.autocast(device.split(":")[0], dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32")
    start = restore(cfg, pm, opt) if cfg.resume else 0
    if finished(cfg, start, steps, print0):
        del model  # DDP's reducer goes before its process group
        return finish() if ddp else None
    log = open_metrics(cfg, start) if rank == 0 else None
    print0(f"{steps} steps of {cfg.batch_size} ({B} per micro-step per rank, {cfg.grad_accum} micro-steps, {W} ranks)"
           + (f", resuming at step {start}" if start else ""))

    def batch_indices(step, micro):  # SFT reads the world's sft split in order; pairs come from batch_rows
        if sft:
            return [step * cfg.batch_size + micro * B * W + rank + k * W for k in range(B)]
        return [train_idx[i] for i in batch_rows(len(train_idx), cfg, step, micro, B, rank, W)]

    bar = tqdm(range(start, steps), initial=start, total=steps, disable=rank != 0, desc=cfg.loss)
    t0 = time.time()
    for step in bar:
        set_lr(cfg, opt, step, steps)
        sums = torch.zeros(7)  # loss, rewards chosen/rejected/accuracies, logps chosen/rejected, examples
        for micro in range(cfg.grad_accum):
            with grad_sync(model, micro == cfg.grad_accum - 1), amp:
                loss, stats = micro_step(cfg, model, pm, world, items, batch_indices(step, micro), device, ref)
                # each rank averages over its share of the global batch; the mean over ranks completes it
                (loss.sum() / (B * cfg.grad_accum)).backward()
            sums += stats
        norm = optimizer_step(cfg, pm, opt)
        if ddp:
            dist.all_reduce(sums)  # metrics over the whole global batch
        if rank == 0 and (step % cfg.log_every == 0 or step == steps - 1):
            rec = metrics(sums, sft) | dict(step=step, lr=opt.param_groups[0]["lr"], grad_norm=round(norm, 4),
                                            elapsed=round(time.time() - t0, 1))
            if not sft:
                rec["epoch"] = round((step + 1) * cfg.batch_size / len(train_idx), 3)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=rec["loss"], **({} if sft else {"acc": rec["rewards/accuracies"]}))
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step == steps - 1:
            save(cfg, pm, opt, step, rank)
    if not sft and val_idx:
        ev = evaluate_pairs(cfg, pm, items, val_idx, B, device, ref, rank, W)
        print0(f"held-out pairs ({len(val_idx)}): {json.dumps(ev)}")
        if rank == 0:
            log.write(json.dumps(dict(step=steps - 1, **ev)) + "\n")
    if rank == 0:
        log.close()
        print0(f"saved {cfg.out_dir}/checkpoint")
        if cfg.data in WORLD and cfg.bdhs_source == "world" and cfg.loss in losses.LOSSES and cfg.eval_n:
            world_results(cfg, print0)
    if ddp:
        del model  # DDP's reducer must go before its process group: freed after it, gloo can hang on exit
        finish()


def micro_step(cfg: Config, model, pm: PairModel, world, items, idx, device, ref):
    """Per-example losses of one micro-batch and the metric sums it contributes."""
    if items is None:  # SFT: ground-truth conversations, every reply token scored
        kinds = {k: float(v) for k, v in (a.split("=") for a in cfg.sft_kinds.split(","))} if cfg.sft_kinds else None
        convs = [world.example("sft", i, cfg.sft_turns or None, kinds=kinds) for i in idx]
        batch = to(data.collate(pm.vlm, convs), device)
        hide = torch.tensor([random.Random(f"text-only-{i}").random() < cfg.text_only for i in idx], device=device)
        if hide.any():
            batch["key_mask"] = ~(hide[:, None] & (batch["input_ids"] == pm.vlm.cfg.image_token_id))
        logits = model(**batch)
        loss = losses.sft_loss(logits, batch["labels"])
        return loss * len(idx), torch.tensor([loss.item() * len(idx), 0, 0, 0, 0, 0, len(idx)])
    batch = to(data.collate_pairs(pm.vlm, [items[i] for i in idx]), device)
    lp, n, sc = model(**batch)
    if cfg.loss == "rm":
        loss, c, r = losses.rm_loss(sc[:, 0], sc[:, 1])
        lp = torch.zeros_like(sc)
    else:
        if ref is None:  # the same weights with the adapters off are the reference
            with torch.no_grad(), pm.vlm.lora_disabled():
                rlp = pm(**batch)[0]
        else:
            rlp = ref[idx].to(device)
        loss, c, r = pair_loss(cfg, lp, n, rlp)
    d = lp.detach()
    stats = torch.stack([loss.detach().sum(), c.sum(), r.sum(), (c > r).float().sum(), d[:, 0].sum(), d[:, 1].sum(),
                         torch.tensor(float(len(idx)))]).cpu()
    return loss, stats


def pair_loss(cfg: Config, lp, n, rlp):
    return losses.preference_loss(cfg.loss, lp, rlp, n, cfg.beta, cfg.gamma, cfg.rpo_alpha)


def metrics(sums, sft):
    """TRL's metric names, averaged over the global batch."""
    n = sums[6].item()
    out = dict(loss=round(sums[0].item() / n, 5))
    if not sft:
        c, r = sums[1].item() / n, sums[2].item() / n
        out |= {"rewards/chosen": round(c, 5), "rewards/rejected": round(r, 5), "rewards/margins": round(c - r, 5),
                "rewards/accuracies": round(sums[3].item() / n, 4), "logps/chosen": round(sums[4].item() / n, 4),
                "logps/rejected": round(sums[5].item() / n, 4)}
    return out


@torch.no_grad()
def evaluate_pairs(cfg: Config, pm, items, val_idx, B, device, ref, rank, W):
    """Pairwise accuracy on held-out pairs: the reward model's (paper Table 7), or the implicit reward's for DPO."""
    pm.eval()
    sums = torch.zeros(7)
    mine = val_idx[rank::W]
    for k in range(math.ceil(math.ceil(len(val_idx) / W) / B)):  # the same number of forwards on every rank (FSDP)
        idx = mine[k * B:(k + 1) * B]
        stats = micro_step(cfg, pm, pm, None, items, idx or val_idx[:1], device, ref)[1]
        sums += stats if idx else 0  # a rank with nothing left runs a forward for the others and counts nothing
    pm.train()
    if W > 1:
        dist.all_reduce(sums)
    m = metrics(sums, False)
    return {"eval/loss": m["loss"], "eval/rewards/accuracies": m["rewards/accuracies"],
            "eval/rewards/margins": m["rewards/margins"]}


def world_results(cfg: Config, print0=print):
    """The world's hallucination metrics before and after, in eval.py's keys, into <out_dir>/results.json."""
    import eval as ev
    res = {}
    for name, path in (("before", cfg.model), ("after", os.path.join(cfg.out_dir, "checkpoint"))):
        r = ev.evaluate_world(VLM.from_pretrained(path), cfg.world_seed, "broken", cfg.eval_n)
        res[name] = {k: v for k, v in r.items() if k != "samples"}
    print0(ev.table(res))
    path = os.path.join(cfg.out_dir, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=2)
    os.replace(path + ".tmp", path)
    return res


if __name__ == "__main__":
    main()
