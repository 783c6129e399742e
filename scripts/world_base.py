"""scripts/world_base.py: the recipe of the world's shipped base model (assets/world-base): a scratch LLaVA-1.5-layout
architecture, its vision tower pretrained on the world's cells, then three SFT phases on hallucinating data.

    python scripts/world_base.py --out assets/world-base   # the shipped base model (about 10 minutes on 2 CPUs)
"""

import json
import math
import os
import random
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import losses  # noqa: E402
from cli import config_from_argv, run_main  # noqa: E402
from model import VLM  # noqa: E402
from world import (  # noqa: E402
    CATEGORIES,
    CHAT_TEMPLATE,
    COLORS,
    SIZE,
    SPECIALS,
    TEMPLATE,
    TRAIN_BUCKETS,
    World,
    build_tokenizer,
    render,
    sample_scene,
)

# -----------------------------------------------------------------------------
# The base model: a scratch architecture, a pretrained tower and three SFT phases


def scratch_model(world: World, seed=0) -> VLM:
    """The world's LLaVA-1.5-layout architecture (2.6M parameters), random, own tokenizer."""
    tok = build_tokenizer(world)
    raw = dict(
        model_type="llava",
        image_token_index=SPECIALS.index("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=SIZE,
            patch_size=32,
            projection_dim=128,
            hidden_act="quick_gelu",
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=tok.get_vocab_size(),
            hidden_size=192,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        ),
    )
    vlm = VLM.from_config(raw, seed=seed)
    vlm.tokenizer, vlm.template = tok, TEMPLATE
    vlm.files["tokenizer_config.json"] = json.dumps(
        dict(
            tokenizer_class="PreTrainedTokenizerFast",
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            chat_template=CHAT_TEMPLATE,
        ),
        indent=2,
    )
    return vlm


def pretrain_tower(vlm: VLM, world: World, steps, batch_size=32, log=print):
    """As LLaVA's CLIP tower comes pretrained, ours learns each cell's category and colour (a linear
    head, thrown away); colours are uniform, so it learns shapes and leaves the prior to SFT."""
    tower, v = vlm.model.vision_tower, vlm.cfg.vision
    g = v.image_size // v.patch_size  # patches per side; each grid cell is (g/3)^2 of them
    K, colors = len(CATEGORIES), list(COLORS)
    heads = torch.nn.Linear(v.hidden_size, K + 1 + len(colors) + 1)  # + "empty" for each
    opt = torch.optim.AdamW(
        list(tower.parameters()) + list(heads.parameters()), lr=2e-3, weight_decay=0.0
    )
    for step in range(steps):
        scenes = []
        for k in range(batch_size):  # layouts of the training buckets only, as every training scene
            rng = random.Random(f"pretrain-{world.seed}-{step}-{k}")
            while (
                s := sample_scene(rng, world.prior, 1 / len(colors))
            ).bucket() not in TRAIN_BUCKETS:
                pass
            scenes.append(s)
        cat, col = torch.full((batch_size, 9), K), torch.full((batch_size, 9), len(colors))
        for b, s in enumerate(scenes):
            for o in s.objects:
                cat[b, o.cell], col[b, o.cell] = CATEGORIES.index(o.category), colors.index(o.color)
        px = vlm.image_processor([render(s) for s in scenes])["pixel_values"]
        x = tower(px, vlm.cfg.feature_layers)[0][:, 1:]  # (B, g*g, C) without the class token
        x = x.view(batch_size, 3, g // 3, 3, g // 3, -1).mean((2, 4)).flatten(1, 2)  # (B, 9, C)
        out = heads(x)
        loss = torch.nn.functional.cross_entropy(
            out[..., : K + 1].flatten(0, 1), cat.flatten()
        ) + torch.nn.functional.cross_entropy(out[..., K + 1 :].flatten(0, 1), col.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            acc = (out[..., : K + 1].argmax(-1) == cat)[cat < K].float().mean().item()
            log(
                f"tower pretraining step {step}: loss {loss.item():.3f}, category accuracy {acc:.3f}"
            )


def sft(
    vlm: VLM,
    world: World,
    steps,
    lr,
    warmup,
    kinds=None,
    turns=None,
    text_only=0.0,
    batch_size=32,
    log=print,
):
    """SFT on the sft split, tower frozen; a share `text_only` of rows hide their image tokens
    (text-only training, where the LLM learns the world's language prior from text alone)."""
    vlm.model.vision_tower.requires_grad_(False)
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        betas=(0.9, 0.95),
    )
    for step in range(steps):
        for group in opt.param_groups:  # linear warm-up, then cosine decay to 0
            group["lr"] = (
                lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
            )
        idx = range(step * batch_size, (step + 1) * batch_size)
        batch = data.collate_sft(vlm, [world.example("sft", i, turns, kinds=kinds) for i in idx])
        hide = torch.tensor([random.Random(f"text-only-{i}").random() < text_only for i in idx])
        key_mask = ~(hide[:, None] & (batch["input_ids"] == vlm.cfg.image_token_id))
        loss = losses.sft_loss(
            vlm(batch["input_ids"], batch["pixel_values"], key_mask=key_mask), batch["labels"]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"sft step {step}: loss {loss.item():.4f}")


def build_base(out, seed=0, log=print):
    """The shipped base model: tower pretraining, then SFT in three phases on hallucinating data."""
    torch.manual_seed(seed)
    world = World(seed, hallucinate=0.5)
    vlm = scratch_model(world, seed)
    pretrain_tower(vlm, world, 600, log=log)
    sft(vlm, world, 1000, 2e-3, 100, text_only=0.25, log=log)
    sft(vlm, world, 200, 1e-3, 20, kinds={"exist": 1.0}, turns=1, log=log)  # grounds yes / no
    sft(vlm, world, 200, 5e-4, 20, text_only=0.25, log=log)
    vlm.save_pretrained(out)
    log(f"saved {out}")


# -----------------------------------------------------------------------------
# Command line


# A Config is a table, a flag a row, its help the comment beside it: kept as written
# fmt: off
@dataclass
class Config:
    out: str = "runs/world-base"  # the folder to build the base model in (the shipped one: assets/world-base)
    world_seed: int = 0           # the world whose sft split it learns (and the initialisation's seed)
# fmt: on


def main(argv=None):
    cfg = config_from_argv(Config, argv, __doc__)
    build_base(cfg.out, cfg.world_seed)


if __name__ == "__main__":
    run_main(main)
