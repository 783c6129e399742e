"""train_offline.py: supervised fine-tuning and offline alignment of a LLaVA-style model (paper §2.2, §3.2).

`--loss sft` trains on ground-truth conversations; it also builds the embedded world's base model from scratch
(`--model scratch`: a tiny CLIP-style tower, MLP projector and Llama decoder, with a BPE tokenizer trained on the
world's text). The preference losses (DPO, IPO, SLiC, reward model) arrive with the offline-alignment work.

    python train_offline.py --loss sft --model scratch --out_dir runs/world-base   # rebuild the shipped base into
                                                                                   # runs/world-base/checkpoint
    torchrun --nproc_per_node 2 train_offline.py --loss sft --steps 200             # fine-tune it further
"""
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import losses
from model import VLM, config_from_argv


@dataclass
class Config:
    model: str = data.BASE_MODEL  # HF folder or hub id; "scratch" builds the world's tiny architecture
    data: str = "world"           # the embedded world's sft split
    loss: str = "sft"
    out_dir: str = "runs/sft"
    world_seed: int = 0
    prior: float = 0.9            # the world's language prior: how often an object comes with its usual partner
    color_prior: float = 0.6      # ... and how often it has its typical colour
    steps: int = 1000
    batch_size: int = 32          # global batch, split across ranks
    lr: float = 2e-3
    lr_vision: float = 0.0        # vision tower learning rate; 0 freezes the tower (LLaVA's recipe)
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    dtype: str = "float32"        # autocast dtype for the forward; master weights stay fp32
    seed: int = 0
    log_every: int = 25
    vision_pretrain: int = 130    # --model scratch: steps of per-cell supervised tower pretraining (stands in for CLIP's)


# -----------------------------------------------------------------------------
# The world's base architecture, for --model scratch (about 2M parameters)


def scratch_model(cfg: Config) -> VLM:
    world = data.World(cfg.world_seed, cfg.prior, cfg.color_prior)
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
    opt = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=cfg.lr, weight_decay=0.0)
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
# Training


def main(argv=None):
    cfg = config_from_argv(Config, argv, __doc__)
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    print0 = print if rank == 0 else (lambda *a, **k: None)
    print0(json.dumps(dataclasses.asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed + rank)

    vlm = scratch_model(cfg) if cfg.model == "scratch" else VLM.from_pretrained(cfg.model)
    if cfg.model == "scratch":
        pretrain_vision(vlm, cfg, print0)
    vlm.model.vision_tower.requires_grad_(cfg.lr_vision > 0)
    vlm.to(device).train()
    model = torch.nn.parallel.DistributedDataParallel(vlm) if ddp else vlm
    world = data.World(cfg.world_seed, cfg.prior, cfg.color_prior)
    groups = {}  # (is vision, decays) -> params: matrices decay, gains and biases do not
    for n, p in vlm.named_parameters():
        if p.requires_grad:
            groups.setdefault((n.startswith("model.vision_tower."), p.dim() >= 2), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": cfg.weight_decay if dec else 0.0,
                              "base_lr": cfg.lr_vision if vis else cfg.lr}
                             for (vis, dec), ps in groups.items()], betas=(0.9, 0.95))
    amp = torch.autocast(device.split(":")[0], dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32")
    B = cfg.batch_size // world_size
    os.makedirs(cfg.out_dir, exist_ok=True)
    log = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if rank == 0 else None
    t0 = time.time()
    for step in range(cfg.steps):
        scale = min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        lr = cfg.lr * scale
        # rank r takes examples r, r + W, ... of each global batch: the same data for any number of ranks
        batch = data.collate(vlm, [world.example("sft", step * cfg.batch_size + rank + k * world_size)
                                   for k in range(B)])
        batch = {k: v.to(device) for k, v in batch.items()}
        with amp:
            logits = model(batch["input_ids"], batch["pixel_values"])
        loss = losses.sft_loss(logits, batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(vlm.parameters(), cfg.grad_clip)
        opt.step()
        if ddp:
            dist.all_reduce(loss := loss.detach(), op=dist.ReduceOp.AVG)
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            rec = dict(step=step, loss=round(loss.item(), 4), lr=lr, grad_norm=round(norm.item(), 3),
                       elapsed=round(time.time() - t0, 1))
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print0(rec)
    if rank == 0:
        vlm.files["train_config.json"] = json.dumps(dataclasses.asdict(cfg), indent=2)
        vlm.save_pretrained(os.path.join(cfg.out_dir, "checkpoint"))
        print0(f"saved {cfg.out_dir}/checkpoint")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
