"""model.py: a LLaVA-family vision-language model in plain PyTorch (paper §2.1).

One file holds the whole model the study aligns: a CLIP or SigLIP vision tower, the LLaVA MLP projector, a Llama /
Mistral / Qwen2 decoder, LLaVA-1.6 AnyRes tiling, HF-exact image preprocessing, chat templates, a static KV cache with
batched sampling and LoRA. Module names follow the checkpoint keys of transformers'
`LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration`, so loading is a rename (hub.py loads and saves
checkpoints in the Hugging Face layout; cli.py holds the scripts' command line).

    vlm = VLM.from_pretrained("llava-hf/llava-v1.6-vicuna-7b-hf", dtype=torch.bfloat16, device="cuda")
    batch = vlm.prepare(["Describe the image."], [Image.open("cat.png")])
    out = vlm.generate(**batch, max_new_tokens=64)          # list of token-id lists
    print(vlm.tokenizer.decode(out[0]))

The forward takes a `key_mask` that hides chosen keys (e.g. image tokens) from every query in every layer while the
positions stay unchanged: this is how BDHS (paper §3.4) blinds the model to most of the image.
"""

import contextlib
import functools
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import DTYPES, UserError, arg_parser, require, run_main

# -----------------------------------------------------------------------------
# Configs: filled from the checkpoint's own config.json, with transformers' class defaults for absent keys

CLIP_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
SIGLIP_DEFAULTS = CLIP_DEFAULTS | dict(
    patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True
)
# what LlavaConfig builds when config.json has no vision_config / text_config at all
LLAVA_VISION = dict(
    model_type="clip_vision_model",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
)
TEXT_DEFAULTS = {
    "llama": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        rms_norm_eps=1e-6,
        sliding_window=None,
    ),
    "mistral": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-6,
        sliding_window=4096,
    ),
    "qwen2": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        rms_norm_eps=1e-6,
        sliding_window=None,
    ),
}
GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@dataclass
class VisionConfig:
    kind: str  # "clip" (class token, pre_layrnorm, no patch bias) or "siglip"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    use_head: bool = False  # SigLIP's pooling head: loaded and saved, never used by LLaVA


@dataclass
class TextConfig:
    kind: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scale: float  # "linear" RoPE scaling factor, 1.0 for the default rope
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    hidden_act: str


@dataclass
class VLMConfig:
    model_type: str  # "llava" | "llava_next"
    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    # vision hidden states fed to the projector (0 = embeddings, -1 = last layer)
    feature_layers: list
    select_strategy: str  # "default" drops CLIP's class token, "full" keeps every token
    projector_act: str
    projector_bias: bool
    tie_word_embeddings: bool
    # llava_next AnyRes resolutions, (height, width)
    grid_pinpoints: list = field(default_factory=list)
    # the config.json we were built from, written back on save
    raw: dict = field(default_factory=dict)


def parse_config(raw: dict, path="config.json") -> VLMConfig:
    """Builds a VLMConfig from a transformers config.json dict; unknown architectures fail naming the key."""
    mt = raw.get("model_type")
    if mt not in ("llava", "llava_next"):
        raise UserError(
            f"{path}: model_type {mt!r} is not supported (expected 'llava' or 'llava_next')"
        )
    t = raw.get("text_config") or {"model_type": "llama"}
    layer = raw.get("vision_feature_layer", -2)
    return VLMConfig(
        model_type=mt,
        vision=parse_vision(raw.get("vision_config") or LLAVA_VISION, path),
        text=parse_text(t, path),
        image_token_id=raw.get("image_token_index", raw.get("image_token_id", 32000)),
        feature_layers=[layer] if isinstance(layer, int) else list(layer),
        select_strategy=raw.get("vision_feature_select_strategy", "default"),
        projector_act=raw.get("projector_hidden_act", "gelu"),
        projector_bias=raw.get("multimodal_projector_bias", True),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings") or t.get("tie_word_embeddings")),
        grid_pinpoints=raw.get("image_grid_pinpoints", GRID_PINPOINTS)
        if mt == "llava_next"
        else [],
        raw=raw,
    )


def parse_vision(v: dict, path) -> VisionConfig:
    """config.json's vision_config, with the defaults of its CLIP or SigLIP class for absent keys."""
    vkind = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}.get(v.get("model_type"))
    require(vkind, f"{path}: vision_config.model_type {v.get('model_type')!r} is not supported")
    v = {**(CLIP_DEFAULTS if vkind == "clip" else SIGLIP_DEFAULTS), **v}
    return VisionConfig(
        vkind,
        v["hidden_size"],
        v["intermediate_size"],
        v["num_hidden_layers"],
        v["num_attention_heads"],
        v["image_size"],
        v["patch_size"],
        v["hidden_act"],
        v["layer_norm_eps"],
        use_head=vkind == "siglip" and bool(v.get("vision_use_head", True)),
    )


def parse_text(t: dict, path) -> TextConfig:
    """config.json's text_config, with the defaults of its Llama, Mistral or Qwen2 class for absent keys."""
    tkind = t.get("model_type")
    if tkind not in TEXT_DEFAULTS:
        raise UserError(
            f"{path}: text_config.model_type {tkind!r} is not supported (llama, mistral, qwen2)"
        )
    t = {**TEXT_DEFAULTS[tkind], **t}
    # RoPE: transformers 5 writes rope_parameters, 4.x wrote rope_theta + rope_scaling
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    theta = rope.get("rope_theta", t.get("rope_theta", 10000.0))
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in ("default", "linear"):
        raise UserError(
            f"{path}: text_config rope_type {rtype!r} is not supported (default, linear)"
        )
    if tkind == "qwen2" and t.get("use_sliding_window"):
        raise UserError(f"{path}: text_config.use_sliding_window=true is not supported for qwen2")
    heads = t["num_attention_heads"]
    return TextConfig(
        tkind,
        t["vocab_size"],
        t["hidden_size"],
        t["intermediate_size"],
        t["num_hidden_layers"],
        heads,
        t.get("num_key_value_heads") or heads,
        t.get("head_dim") or t["hidden_size"] // heads,
        t["rms_norm_eps"],
        float(theta),
        float(rope.get("factor", 1.0)) if rtype == "linear" else 1.0,
        qkv_bias=tkind == "qwen2" or bool(t.get("attention_bias", False)),
        o_bias=bool(t.get("attention_bias", False)),
        mlp_bias=bool(t.get("mlp_bias", False)),
        sliding_window=t.get("sliding_window") if tkind == "mistral" else None,
        hidden_act=t.get("hidden_act", "silu"),
    )


ACT = {
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # SigLIP
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}

# -----------------------------------------------------------------------------
# Vision towers: CLIP ViT and SigLIP (one module; the differences are a class token, a pre-norm and the activation)
# https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/modeling_clip.py


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        clip = cfg.kind == "clip"
        self.patch_embedding = nn.Conv2d(
            3, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=not clip
        )
        n = (cfg.image_size // cfg.patch_size) ** 2 + clip
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size)) if clip else None
        self.position_embedding = nn.Embedding(n, cfg.hidden_size)

    def forward(self, pixels):  # (N, 3, H, W) -> (N, P(+1), C)
        x = (
            self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
            .flatten(2)
            .transpose(1, 2)
        )
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C, self.H = cfg.hidden_size, cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(C, C) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (
            p(x).view(B, T, self.H, -1).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D), every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACT[cfg.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.embeddings = VisionEmbeddings(cfg)
        # sic: HF's key
        self.pre_layrnorm = nn.LayerNorm(C, eps=cfg.layer_norm_eps) if cfg.kind == "clip" else None
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))
        # in the checkpoint; LLaVA never applies it
        self.post_layernorm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)

    def forward(self, pixels, layers: list):
        """Returns the hidden states listed in `layers` (0 = embeddings, i = after layer i, negatives from the end)."""
        L = len(self.encoder.layers)
        want = [i % (L + 1) for i in layers]
        x = self.embeddings(pixels)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        states = {0: x}
        # layers past the last one used are skipped
        for i, layer in enumerate(self.encoder.layers[: max(want)], start=1):
            x = states[i] = layer(x)
        return [states[i] for i in want]


class Projector(nn.Module):
    """LLaVA's 2-layer MLP from vision features to LLM embeddings (`multi_modal_projector`)."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        Cv, Ct = cfg.vision.hidden_size * len(cfg.feature_layers), cfg.text.hidden_size
        self.linear_1 = nn.Linear(Cv, Ct, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(Ct, Ct, bias=cfg.projector_bias)
        self.act = ACT[cfg.projector_act]

    # x in the tower's dtype; the projector may train in fp32 beside a bf16 tower
    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x.to(self.linear_1.weight.dtype))))


# -----------------------------------------------------------------------------
# The language model: Llama / Mistral / Qwen2 decoder with RMSNorm, RoPE (HF rotate_half convention) and GQA
# https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        h = x.float()  # the variance in fp32, as in the reference implementation
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(cfg: TextConfig, positions, dtype):
    """cos/sin tables (B, 1, T, D) for explicit integer positions (B, T), computed in fp32."""
    D = cfg.head_dim
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, D, 2, device=positions.device, dtype=torch.float) / D)
    )
    freqs = (positions.float() / cfg.rope_scale)[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        C, D = cfg.hidden_size, cfg.head_dim
        H, Hk = cfg.num_attention_heads, cfg.num_key_value_heads
        self.H, self.Hk, self.D = H, Hk, D
        self.q_proj = nn.Linear(C, H * D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, Hk * D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, Hk * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.Hk, self.D).transpose(1, 2)  # (B, Hk, T, D)
        v = self.v_proj(x).view(B, T, self.Hk, self.D).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:  # write this chunk at its slots, attend over every filled slot
            k, v = cache.write(layer, k, v)
        if mask is None or torch.is_tensor(mask):
            # mask None = plain causal attention (nothing padded or hidden), which lets SDPA pick its fastest kernel
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.Hk != self.H
            )
        else:  # a BlockMask (packed rows on CUDA, see `block_mask`). Autocast casts SDPA's inputs to one dtype
            # but not FlexAttention's, and RoPE's fp32 tables may have promoted q and k: v's dtype is autocast's
            y = flex_kernel(x.device.type)(
                q.to(v.dtype), k.to(v.dtype), v, block_mask=mask, enable_gqa=self.Hk != self.H
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.D))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        C, I, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(C, I, b)
        self.up_proj = nn.Linear(C, I, b)
        self.down_proj = nn.Linear(I, C, b)
        self.act = ACT[cfg.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.checkpointing = False  # gradient checkpointing, one layer at a time

    def forward(self, x, positions, mask, cache=None):
        """x (B, T, C) input embeddings, positions (B, T), mask (B, 1, T, S) bool over keys, a BlockMask
        (FlexAttention) or None (causal)."""
        cos, sin = rope_cos_sin(self.cfg, positions, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, cos, sin, mask, None, i, use_reentrant=False
                )
            else:
                x = layer(x, cos, sin, mask, cache, i)
        return self.norm(x)


# -----------------------------------------------------------------------------
# KV cache: preallocated, written by slot; per-row key masks (padding, hidden image keys) and per-row RoPE positions


class KVCache:
    """Static cache (layers, B, Hk, S, D). All rows share the slot counter `pos` (prompts are left-padded, so their
    ends line up); `key_mask` (B, S) says which slots each row may attend to and `next_pos` (B,) is each row's next
    RoPE position, i.e. its real length so far."""

    def __init__(self, cfg: TextConfig, B, S, dtype, device):
        shape = (cfg.num_hidden_layers, B, cfg.num_key_value_heads, S, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask = torch.zeros(B, S, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(B, dtype=torch.long, device=device)
        self.pos = 0  # slots filled so far (shared by all rows)

    def write(self, layer, k, v):
        """Stores a (B, Hk, T, D) chunk at slots [pos, pos+T) and returns keys/values of slots [0, pos+T)."""
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos : end], self.v[layer, :, :, self.pos : end] = k, v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def share(self, reps, S):
        """The rows of `reps` samples per prompt (an int or a count per prompt), over this prompt cache
        without copying it, with S slots in all (prompt slots included): see SharedKVCache."""
        return SharedKVCache(self, reps, S)


class SharedKVCache:
    """R sample rows over B prompts' caches, the prompts stored once. Shapes: the prompts' keys/values
    (layers, B, Hk, Tp, D), each row's own (layers, R, Hk, S - Tp, D), `prompt` (R,) each row's prompt.
    A layer's attention reads [its prompt's keys, gathered for that layer only | its own keys]: the
    same slots, in the same order, as a KVCache copied per row, which would hold R x S slots instead
    of B x Tp + R x (S - Tp). `key_mask` (R, S) and `next_pos` (R,) are per row, as in KVCache."""

    def __init__(self, cache: KVCache, reps, S):
        B, Tp, dev = cache.k.shape[1], cache.pos, cache.k.device
        self.prompt = torch.arange(B, device=dev).repeat_interleave(reps)  # (R,)
        R = self.prompt.shape[0]
        self.pk, self.pv = cache.k[:, :, :, :Tp], cache.v[:, :, :, :Tp]  # views: no copy
        L, _, Hk, _, D = cache.k.shape
        self.k = torch.zeros(L, R, Hk, S - Tp, D, dtype=cache.k.dtype, device=dev)
        self.v = torch.zeros_like(self.k)
        self.key_mask = torch.zeros(R, S, dtype=torch.bool, device=dev)
        self.key_mask[:, :Tp] = cache.key_mask[self.prompt, :Tp]
        self.next_pos = cache.next_pos[self.prompt]
        self.start = Tp  # the first slot a row owns
        self.pos = Tp

    def write(self, layer, k, v):
        """Stores a (R, Hk, T, D) chunk at slots [pos, pos+T) and returns keys/values of slots [0, pos+T)."""
        a, b = self.pos - self.start, self.pos - self.start + k.shape[2]
        self.k[layer, :, :, a:b], self.v[layer, :, :, a:b] = k, v
        # (R, Hk, pos+T, D), built for this layer and freed after it: one layer's worth, never L of them
        keys = torch.cat([self.pk[layer].index_select(0, self.prompt), self.k[layer, :, :, :b]], 2)
        values = torch.cat(
            [self.pv[layer].index_select(0, self.prompt), self.v[layer, :, :, :b]], 2
        )
        return keys, values


def attention_mask_4d(key_mask, q_slots, sliding_window=None, segment=None):
    """Bool mask (B, 1, Tq, S): a query at slot q sees key slot s if s <= q, the key is visible, and s is inside the
    sliding window; with `segment` (B, S) (packed rows: 0 the shared prompt, k the k-th response), only if s is in
    the prompt or in q's own segment. Every query also sees itself, so no row is all -inf (padding's outputs are
    unused)."""
    s = torch.arange(key_mask.shape[1], device=key_mask.device)  # (S,)
    q = q_slots[..., None]  # (B, Tq, 1)
    allowed = (s <= q) & key_mask[:, None, :]  # (B, Tq, S)
    if sliding_window is not None:
        allowed &= s > q - sliding_window
    if segment is not None:
        own = segment.gather(1, q_slots)[..., None]  # (B, Tq, 1): each query's segment
        allowed &= (segment[:, None, :] == 0) | (segment[:, None, :] == own)
    return (allowed | (s == q))[:, None]


# device types whose packed rows attend through FlexAttention (a test adds "cpu")
FLEX_DEVICES = ("cuda",)


def block_mask(key_mask, segment, sliding_window=None):
    """`attention_mask_4d`'s mask for a packed forward without a cache (B, T), as a FlexAttention BlockMask:
    its kernel skips the (128 x 128) blocks no query sees (above the diagonal, one response's queries against
    another's keys) instead of computing all T x T scores as SDPA does under a dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    def seen(b, h, q, s):  # one (query, key) pair; the same rule as attention_mask_4d
        same = (segment[b, s] == 0) | (segment[b, s] == segment[b, q])
        ok = (s <= q) & key_mask[b, s] & same
        if sliding_window is not None:
            ok = ok & (s > q - sliding_window)
        return ok | (s == q)

    B, T = segment.shape
    return create_block_mask(seen, B, None, T, T, device=segment.device)


@functools.cache
def flex_kernel(device_type):
    """FlexAttention compiled into a fused kernel on CUDA; elsewhere eager (a reference that materializes the
    scores, forward only: what the CPU test compares with SDPA)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention


# -----------------------------------------------------------------------------
# LoRA (paper §2.2: r 128, alpha 256 on every LLM linear). Base weights keep their checkpoint names.


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with B = 0 at start so training begins at the base model."""

    def __init__(self, base: nn.Linear, r, alpha, dropout, dtype=torch.float32):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        # the same Parameters: frozen, checkpoint keys unchanged
        self.weight, self.bias = base.weight, base.bias
        # A and B in fp32 whatever the base's dtype, and so AdamW's moments: in bf16, an update at LR 1e-6
        # would round away
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=dev))
        init_lora_A(self.lora_A)
        self.scale, self.dropout, self.enabled = alpha / r, nn.Dropout(dropout), True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        # under autocast both go to its dtype; without, x joins the adapters' dtype and back
        if self.enabled:
            a = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.dtype)
            delta = F.linear(F.linear(self.dropout(a), self.lora_A), self.lora_B) * self.scale
            y = y + delta.to(y.dtype)
        return y

    def merged_weight(self, dtype=None):
        """W + scale * B A, summed in fp32 and then cast once to `dtype` (default: the weight's): a bf16 base
        keeps the small update that a sum in bf16 would round away. In fp32 the same ops as the forward."""
        w = self.weight.float() + (self.lora_B.float() @ self.lora_A.float() * self.scale)
        return w.to(dtype or self.weight.dtype)


def init_lora_A(t):
    """LoRA's A as nn.Linear's weight starts (kaiming-uniform, from torch's global generator): a model built
    on the meta device draws the same values in the same order as one built in memory."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(vlm, r=128, alpha=256, dropout=0.0, targets=LORA_TARGETS, dtype=torch.float32):
    """Wraps the LLM's linears in LoRA adapters (in `dtype`), their base weights frozen; other parameters keep
    requires_grad."""
    for mod in list(vlm.model.language_model.modules()):
        for name, child in list(mod.named_children()):
            if name in targets and type(child) is nn.Linear:
                setattr(mod, name, LoRALinear(child, r, alpha, dropout, dtype))
                child.requires_grad_(False)
    return vlm


@contextlib.contextmanager
def lora_disabled(vlm):
    """The reference model: the same weights with every adapter switched off."""
    mods = [m for m in vlm.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.enabled = False
    try:
        yield vlm
    finally:
        for m in mods:
            m.enabled = True


# -----------------------------------------------------------------------------
# The VLM: images in, hidden states and logits out; generation and prompting as thin methods


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.vision_tower = VisionTransformer(cfg.vision)
        self.model.multi_modal_projector = Projector(cfg)
        if cfg.model_type == "llava_next":
            self.model.image_newline = nn.Parameter(torch.empty(cfg.text.hidden_size))
        self.model.language_model = LanguageModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight
        self.extra = {}  # tensors outside LLaVA's forward (SigLIP's pooling head, a reward head), kept to be saved
        self.tokenizer, self.image_processor, self.files = None, None, {}
        self.template = "vicuna"
        self.template_source = "the default"  # where self.template came from (hub.template_line)
        # the dtype the source checkpoint's weights were stored in, which a save writes back (None: save
        # the tensors as they are in memory, as for a model built by from_config)
        self.source_dtype = None
        self.folder = None  # from_pretrained's local folder

    # -- images ---------------------------------------------------------------

    def image_token_counts(self, image_sizes=None, n=1):
        """Number of image tokens each image becomes, computed as transformers does (AnyRes included)."""
        v = self.cfg.vision
        p = v.image_size // v.patch_size  # patches per side of one view
        base = p * p + (self.cfg.select_strategy == "full" and v.kind == "clip")
        if self.cfg.model_type == "llava":
            return [base] * n
        return [base + self._unpadded_grid(hw, p)[0] for hw in image_sizes]

    def _unpadded_grid(self, size, p):
        """AnyRes: the image tokens of the tile grid without its padding, and (gh, gw, (ph, pw)):
        the grid of tiles and the feature rows / columns of padding at each side."""
        h, w = (int(s) for s in size)
        best = select_best_resolution((h, w), self.cfg.grid_pinpoints)
        gh, gw = (x // self.cfg.vision.image_size for x in best)
        H, W = gh * p, gw * p
        if w / h > W / H:  # padding was added top and bottom
            ph, pw = (H - int(round(h * (W / w), 7))) // 2, 0
        else:
            ph, pw = 0, (W - int(round(w * (H / h), 7))) // 2
        # +1: an image_newline feature closes each row
        return (H - 2 * ph) * (W - 2 * pw + 1), (gh, gw, (ph, pw))

    def encode_images(self, pixel_values, image_sizes=None):
        """pixel_values -> projected image features (N_tokens, C), in the order their placeholders appear."""
        cfg = self.cfg
        if cfg.model_type == "llava":
            feats = self._vision_features(pixel_values)  # (N, P, C)
            return feats.flatten(0, 1)
        # AnyRes: drop padded views, encode all views at once, then per image: base view + unpadded grid + newlines
        p = cfg.vision.image_size // cfg.vision.patch_size
        grids = [self._unpadded_grid(hw, p)[1] for hw in image_sizes]
        counts = [1 + gh * gw for gh, gw, _ in grids]  # views per image: the base view + the tiles
        views = (
            torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])
            if pixel_values.dim() == 5
            else pixel_values
        )
        feats = self._vision_features(views).split(counts)
        out = []
        for f, (gh, gw, (ph, pw)) in zip(feats, grids):
            grid = (
                f[1:]
                .view(gh, gw, p, p, -1)
                .permute(4, 0, 2, 1, 3)
                .reshape(f.shape[-1], gh * p, gw * p)
            )
            # cut the padding AnyRes's resize added
            grid = grid[:, ph : gh * p - ph, pw : gw * p - pw]
            nl = self.model.image_newline[:, None, None].expand(-1, grid.shape[1], 1).to(grid.dtype)
            # (rows * (cols + 1), C)
            grid = torch.cat([grid, nl], dim=-1).flatten(1).transpose(0, 1)
            out += [f[0], grid]
        return torch.cat(out)

    def _vision_features(self, pixels):  # (N, 3, H, W) -> (N, P, C_text)
        x = torch.cat(self.model.vision_tower(pixels, self.cfg.feature_layers), dim=-1)
        if self.cfg.select_strategy == "default":
            x = x[:, 1:]  # drop CLIP's class token
        return self.model.multi_modal_projector(x)

    # -- forward --------------------------------------------------------------

    def embed(self, input_ids, pixel_values=None, image_sizes=None, image_features=None):
        """Token embeddings with image features scattered into the image-token positions. (B, T) -> (B, T, C)."""
        embed = self.model.language_model.embed_tokens
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values, image_sizes)
        # text only (or decoding): image-token ids are embedded like any other token
        if image_features is None:
            return embed(input_ids)
        is_img = input_ids == self.cfg.image_token_id
        if int(is_img.sum()) != image_features.shape[0]:
            raise ValueError(
                f"input_ids hold {int(is_img.sum())} image tokens but the images give "
                f"{image_features.shape[0]} features"
            )
        x = embed(input_ids.masked_fill(is_img, 0))
        return x.masked_scatter(is_img[..., None], image_features.to(x.dtype))

    def hidden(
        self,
        input_ids,
        pixel_values=None,
        image_sizes=None,
        attention_mask=None,
        position_ids=None,
        key_mask=None,
        kv_cache=None,
        image_features=None,
        segment=None,
    ):
        """The decoder's final hidden states (B, T, C); `forward` applies the LM head on top."""
        B, T = input_ids.shape
        dev = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        real = attention_mask.bool()
        visible = real if key_mask is None else real & key_mask.bool()
        if position_ids is None:  # count only real tokens, so left padding does not shift RoPE
            start = kv_cache.next_pos[:, None] if kv_cache is not None else 0
            position_ids = (start + real.long().cumsum(-1) - 1).clamp(min=0)
        x = self.embed(input_ids, pixel_values, image_sizes, image_features)
        c = kv_cache
        if c is not None:
            c.key_mask[:, c.pos : c.pos + T] = visible
            keys = c.key_mask[:, : c.pos + T]
            q_slots = torch.arange(c.pos, c.pos + T, device=dev)
        else:
            keys, q_slots = visible, torch.arange(T, device=dev)
        window = self.cfg.text.sliding_window
        plain = c is None and segment is None and window is None and bool(visible.all())
        # packed rows: skip the masked blocks
        if c is None and segment is not None and dev.type in FLEX_DEVICES:
            mask = block_mask(keys, segment, window)
        else:
            mask = None if plain else attention_mask_4d(keys, q_slots.expand(B, T), window, segment)
        h = self.model.language_model(x, position_ids, mask, c)
        if c is not None:
            c.pos += T
            c.next_pos = c.next_pos + attention_mask.long().sum(-1)
        return h

    def forward(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, **kw):
        """Logits (B, T, V). Keyword args: position_ids, key_mask (B, T; False hides a key from every query in
        every layer, positions unchanged), kv_cache, image_features (precomputed `encode_images` output), segment
        (B, T; packed responses that share one prompt, see `attention_mask_4d`)."""
        return self.lm_head(self.hidden(input_ids, pixel_values, image_sizes, attention_mask, **kw))

    # -- generation -----------------------------------------------------------

    def generate(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_sizes=None,
        key_mask=None,
        max_new_tokens=64,
        temperature=0.0,
        top_k=None,
        top_p=None,
        generator=None,
        eos_token_id=None,
        stop_strings=(),
        num_samples=1,
        prefix_ids=None,
    ):
        """Samples continuations of left-padded prompts (B, T): B * num_samples lists of new token ids (rows
        b*n .. b*n+n-1 belong to prompt b); EOS is dropped, a stop string's last token is kept. `prefix_ids` (one
        list per output row) are forced tokens that continue the prompt; `key_mask` (B, T) hides prompt keys."""
        cache, logits = prefill(
            self,
            input_ids,
            attention_mask,
            pixel_values,
            image_sizes,
            key_mask,
            num_samples,
            prefix_ids,
            max_new_tokens,
        )
        eos = self.eos_ids() if eos_token_id is None else eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos)
        rows = self.lm_head.weight.shape[0]  # V: a sampled id can be any logit row
        stop = StopStrings(self.tokenizer, stop_strings, rows) if stop_strings else None
        return decode(
            self,
            cache,
            logits,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            generator,
            eos,
            stop,
            self.never_sampled(),
        )

    def eos_ids(self):
        names = ("</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>")
        return {self.tokenizer.token_to_id(n) for n in names} - {None} if self.tokenizer else set()

    def pad_ids(self):
        """The pad token's ids, wherever the checkpoint names one: config.json's pad_token_id (top
        level or text_config), tokenizer_config.json's pad_token, a "<pad>" token."""
        raw = self.cfg.raw
        ids = {raw.get("pad_token_id"), (raw.get("text_config") or {}).get("pad_token_id")}
        if self.tokenizer:
            pad = json.loads(self.files.get("tokenizer_config.json", "{}")).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad  # older files: a dict
            ids |= {self.tokenizer.token_to_id(t) for t in ("<pad>", pad) if t}
        return {i for i in ids if isinstance(i, int)}

    def never_sampled(self):
        """(V,) bool on the LM head's device: the logit rows sampling skips. Rows past the tokenizer
        decode to nothing (heads are rounded up: llava-hf's 7B models have 32,064 rows for about
        32,002 tokens); the next forward reads an image token as an image feature's slot; the pad
        token ends no reply. An EOS id stays (Qwen's pad token is its <|endoftext|>)."""
        V, dev = self.lm_head.weight.shape[0], self.lm_head.weight.device
        banned = torch.zeros(V, dtype=torch.bool, device=dev)
        if self.tokenizer:
            banned[self.tokenizer.get_vocab_size() :] = True
        ids = ({self.cfg.image_token_id} | self.pad_ids()) - self.eos_ids()
        banned[[i for i in ids if 0 <= i < V]] = True
        return banned

    # -- prompting ------------------------------------------------------------

    def encode_prompt(self, text, image_sizes=None, add_special_tokens=True):
        """Prompt text with "<image>" placeholders -> ids with each placeholder repeated once per image feature."""
        k = text.count("<image>")
        counts = self.image_token_counts(image_sizes, k) if k else []
        parts = text.split("<image>")
        text = parts[0] + "".join("<image>" * c + rest for c, rest in zip(counts, parts[1:]))
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def prepare(self, questions, images=None, template=None, device=None):
        """User questions (+ one PIL image each) -> left-padded model inputs for `forward` / `generate`."""
        images = images or [None] * len(questions)
        shown = [im for im in images if im is not None]
        pix = self.image_processor(shown) if shown else {}
        sizes = pix.get("image_sizes")
        ids, i = [], 0
        for q, im in zip(questions, images):
            content = ("<image>\n" + q) if im is not None else q
            text = format_chat([{"role": "user", "content": content}], template or self.template)
            ids.append(self.encode_prompt(text, None if sizes is None else sizes[i : i + 1]))
            i += im is not None
        input_ids, attention_mask = left_pad(ids)
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, **pix)
        return {k: v.to(device or self.lm_head.weight.device) for k, v in batch.items()}

    def encode_reply(self, text):
        """An assistant reply in the chat template, its end tokens included and no BOS: the tokens training scores."""
        return self.encode_prompt(
            TEMPLATES[self.template]["reply"].format(text), add_special_tokens=False
        )

    # -- checkpoints (the work is done in hub.py) ----------------------------------------------

    @classmethod
    def from_config(cls, raw: dict, dtype=torch.float32, device="cpu", seed=0):
        """A randomly initialised model from a config.json dict."""
        vlm = init_weights(cls(parse_config(raw)).to(dtype=dtype, device=device), seed=seed)
        vlm.image_processor = ImageProcessor.default_for(vlm.cfg)
        return vlm

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", template=""):
        """A local HF-layout folder or a hub id (hub.load). `template`: one of TEMPLATES, or "" to detect it.
        device "meta": no weight is read, so that FSDP2 ranks fill their own shards later (hub.load_weights)."""
        import hub  # hub imports this file

        return hub.load(path, dtype, device, template, cls)

    def save_pretrained(self, out_dir):
        """config.json, model.safetensors (adapters merged, in the source's dtype), and the source's tokenizer and
        processor files as they were, atomically (hub.save_checkpoint)."""
        import hub

        hub.save_checkpoint(self, out_dir)


# -----------------------------------------------------------------------------
# Generation, in gpt-fast's shape: sample (a pure function with an explicit generator), prefill the prompts
# once, decode one token at a time from the cache


# on CUDA, decode steps between host checks (all rows done? a stop string?); on CPU: 1
SYNC_EVERY = 8


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B,). Temperature 0 is greedy. The generator must be on the
    logits' device (`torch.Generator(device)`)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:  # keep the smallest set whose probability reaches top_p
        sorted_logits, idx = torch.sort(logits, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    # compared by type: a torch.Generator("cuda") serves any CUDA index
    if generator is not None and generator.device.type != probs.device.type:
        raise ValueError(
            f"the sampling generator is on {generator.device} and the logits on {probs.device}: "
            f"make it with torch.Generator({str(probs.device)!r})"
        )
    # what torch.multinomial(probs, 1) computes, draw for draw (argmax of p / q with q ~ Exp(1)), without
    # its check that probs hold no inf or negative value: that check reads a value back on the host
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(-1)


def device_generator(gen, device):
    """`gen` itself where it is on `device`, else a new generator there with gen's seed (one stream:
    make it once per run or batch, not once per call, or calls would repeat each other's draws)."""
    if gen is None or gen.device.type == torch.device(device).type:
        return gen
    return torch.Generator(device).manual_seed(gen.initial_seed())


def compute_dtype(vlm, device):
    """The dtype attention computes in: autocast's where autocast is on (the KV cache then holds keys
    already cast, not fp32 ones cast again at every layer and token), else the weights'."""
    kind = torch.device(device).type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return vlm.lm_head.weight.dtype


def kv_bytes_per_token(vlm, device):
    """Bytes one cached token takes: 2 (keys and values) x layers x Hk x D x the compute dtype's size.
    LLaVA-1.6-7B in bf16: 2 x 32 x 32 x 128 x 2 = 524,288 bytes, 0.5 MiB a token."""
    t = vlm.cfg.text
    size = torch.empty(0, dtype=compute_dtype(vlm, device)).element_size()
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * size


def max_prompt_tokens(vlm, text=256):
    """The longest prompt an image can make: its most image tokens (AnyRes: at the largest grid) + `text`."""
    sizes = [tuple(pp) for pp in vlm.cfg.grid_pinpoints]
    image = (
        max(vlm.image_token_counts(sizes, len(sizes))) if sizes else vlm.image_token_counts(None)[0]
    )
    return image + text


def rows_that_fit(vlm, tokens_per_row, default, total=None):
    """Prompts per generation batch: `default` off CUDA; on CUDA, as many as half the memory the weights
    leave can cache `tokens_per_row` tokens for (the other half: the prefill's activations, the vision
    tower's, the allocator's slack). From the card's total memory (or `total` bytes), so a rerun on it
    cuts the same batches. At 7B in bf16 on 80 GB: a 3,000-token prompt is 3,000 x 0.5 MiB = 1.5 GiB,
    and (80 - 14 GB of weights) / 2 / 1.5 GiB is about 20 prompts."""
    w = vlm.lm_head.weight
    if total is None and w.device.type != "cuda":
        return default
    total = total or torch.cuda.get_device_properties(w.device).total_memory
    weights = sum(p.numel() * p.element_size() for p in vlm.parameters())
    fit = (total - weights) / 2 // (kv_bytes_per_token(vlm, w.device) * tokens_per_row)
    return max(1, int(fit))


@torch.no_grad()
def prefill(
    vlm,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_sizes=None,
    key_mask=None,
    num_samples=1,
    prefix_ids=None,
    max_new_tokens=64,
):
    """Left-padded prompts (B, T) -> (a cache sized for the run, logits (R, V) of each row's next
    token). Each prompt fills num_samples rows (an int or a count per prompt); `prefix_ids` (one
    list per row) go in after, as one right-aligned chunk (its padding sits mid-cache, masked)."""
    B, T = input_ids.shape
    dev = input_ids.device
    P = max(map(len, prefix_ids)) if prefix_ids else 0
    S = T + P + max_new_tokens
    # samples of a prompt share its prefill: the cache holds the prompts only, see SharedKVCache
    cache = KVCache(vlm.cfg.text, B, T if num_samples != 1 else S, compute_dtype(vlm, dev), dev)
    h = vlm.hidden(
        input_ids, pixel_values, image_sizes, attention_mask, key_mask=key_mask, kv_cache=cache
    )
    logits = vlm.lm_head(h[:, -1])  # (B, V): only the last position is needed
    if num_samples != 1:
        reps = (
            num_samples if isinstance(num_samples, int) else torch.tensor(num_samples, device=dev)
        )
        cache = cache.share(reps, S)
        logits = logits.repeat_interleave(reps, 0)
    if P:
        ids, am = (x.to(dev) for x in left_pad(prefix_ids))
        h = vlm.hidden(ids, attention_mask=am, kv_cache=cache)
        # rows without a prefix keep theirs
        logits = torch.where(am[:, -1:].bool(), vlm.lm_head(h[:, -1]), logits)
    return cache, logits


def decode_one_token(vlm, tok, cache):
    """The tokens just sampled (R,) through the cache -> logits (R, V) of the next ones."""
    return vlm.lm_head(vlm.hidden(tok[:, None], kv_cache=cache)[:, -1])


@torch.no_grad()
def decode(
    vlm,
    cache,
    logits,
    max_new_tokens,
    temperature=0.0,
    top_k=None,
    top_p=None,
    generator=None,
    eos=(),
    stop=None,
    banned=None,
    sync_every=None,
):
    """Samples up to max_new_tokens per row -> a list of ids per row. A row ends before an EOS token
    or after the token that completes a stop string. EOS is checked on the device; the host looks
    (stop strings, all rows ended?) every `sync_every` steps (default: 1 on CPU, SYNC_EVERY on CUDA).
    Rows that ended keep being decoded until then, their extra tokens cut: the outputs are the same
    for any sync_every. `banned` (V,) bool: ids never sampled (`VLM.never_sampled`); their logits
    become -inf, the others stay as they are."""
    R, dev = logits.shape[0], logits.device
    every = sync_every or (1 if dev.type == "cpu" else SYNC_EVERY)
    toks = torch.zeros(R, max_new_tokens, dtype=torch.long, device=dev)
    # tokens each row keeps; a row is live at step t while length > t (it ended before t otherwise)
    length = torch.full((R,), max_new_tokens, device=dev)
    eos = torch.tensor(list(eos), dtype=torch.long, device=dev)
    checked = 0  # steps whose stop strings the host has looked at
    for t in range(max_new_tokens):
        if banned is not None:
            logits = logits.masked_fill(banned, float("-inf"))  # (R, V): greedy and filters too
        tok = sample(logits, temperature, top_k, top_p, generator)
        toks[:, t] = tok
        # dropped: the row keeps t tokens
        length = torch.where((length > t) & torch.isin(tok, eos), t, length)
        last = t == max_new_tokens - 1
        if (t + 1) % every == 0 or last:
            # kept: the row keeps t' + 1 for the first t' a stop string ends at
            if stop is not None:
                length = stop(toks, checked, t + 1, length)
                checked = t + 1
            if last or bool((length <= t + 1).all()):  # every row ended at a step <= t
                break
        logits = decode_one_token(vlm, tok, cache)
    return [row[:n] for row, n in zip(toks.tolist(), length.tolist())]


class StopStrings:
    """Which rows a stop string has ended. Only the steps whose token holds a stop string's last character
    (a vocabulary table, built once per tokenizer) decode their last few tokens, never a whole output.
    The table has an entry per logit row (V), which may be more than the tokenizer's tokens."""

    def __init__(self, tokenizer, strings, rows):
        self.strings, self.tokenizer = list(strings), tokenizer
        # a host list: the check runs on the host, so nothing is copied to the device per step
        self.table = stop_table(tokenizer, "".join(sorted({s[-1] for s in strings})), rows).tolist()
        # tokens that hold the longest string's bytes, and one more
        self.window = 4 * max(map(len, strings)) + 1

    def __call__(self, toks, lo, hi, length):
        """toks (R, >= hi), length (R,) as in `decode` -> length with the first stop string ending at a
        step in [lo, hi) of each row still live there. One copy to the host."""
        w = self.window
        first = max(0, lo - w + 1)  # the earliest token a window of a step in [lo, hi) holds
        host = torch.cat([length[:, None], toks[:, first:hi]], 1).tolist()
        new = [row[0] for row in host]
        for r, row in enumerate(host):
            ids = row[1:]
            for t in range(lo, min(hi, row[0])):  # steps where the row is live
                if self.table[ids[t - first]]:
                    tail = self.tokenizer.decode(ids[max(first, t - w + 1) - first : t + 1 - first])
                    if any(s in tail for s in self.strings):
                        new[r] = t + 1
                        break
        changed = any(n != row[0] for n, row in zip(new, host))
        return torch.tensor(new, device=length.device) if changed else length


@functools.lru_cache(maxsize=8)
def stop_table(tokenizer, chars, rows):
    """(rows,) bool: the tokens whose text holds one of `chars`, or part of a character (decoded
    as U+FFFD); False for rows past the tokenizer."""
    text = [tokenizer.decode([v]) for v in range(min(rows, tokenizer.get_vocab_size()))]
    hit = [any(c in x for c in chars) or "\ufffd" in x for x in text]
    return torch.tensor(hit + [False] * (rows - len(hit)), dtype=torch.bool)


# -----------------------------------------------------------------------------
# Image preprocessing: the pixel values of transformers' CLIP / SigLIP / LLaVA-NeXT image processors, in PIL + numpy

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# Decompression bombs: a few KB can declare a 20000 x 20000 image, so the size in the header is checked before
# anything decodes: against PIL's own limit (about 89 M pixels; its warning made an error where images are opened)
# and against ours, lower by default, which IMAGE_MAX_PIXELS sets.
MAX_PIXELS = int(os.environ.get("IMAGE_MAX_PIXELS", 40_000_000))


def open_image_header(src, name=None):
    """A PIL image, only its header read; unreadable or over the limit: a ValueError naming it."""
    import warnings

    from PIL import Image

    name = name or src
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(src)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        limit = min(MAX_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_PIXELS)
        raise UserError(f"image {name}: over the limit of {limit:,} pixels ({e})") from None
    except Exception as e:
        raise UserError(f"cannot read image {name}: {e}") from e
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise UserError(
            f"image {name}: {w}x{h} is {w * h:,} pixels, over the limit of "
            f"{MAX_PIXELS:,} pixels (IMAGE_MAX_PIXELS sets it)"
        )
    return im


def load_image(path, name=None):
    """An image file (or file object) as RGB; any failure (missing, truncated...) names the file."""
    name = name or path
    with open_image_header(path, name) as im:
        try:
            im.load()  # decode now, so a truncated file fails here and not later
            return to_rgb(im)
        except Exception as e:
            raise UserError(f"cannot read image {name}: {e}") from e


def to_rgb(im):
    """Any PIL mode to RGB; transparency is composited onto white, as transformers does."""
    from PIL import Image

    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert(
            "RGB"
        )
    return im.convert("RGB")


def select_best_resolution(size, resolutions):
    """AnyRes: the (height, width) that keeps the most of the image at the least waste."""
    h, w = size
    best, best_eff, best_waste = None, 0, float("inf")
    for rh, rw in resolutions:
        s = min(rw / w, rh / h)
        eff = min(int(w * s) * int(h * s), w * h)
        waste = rw * rh - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (rh, rw), eff, waste
    return best


class ImageProcessor:
    """Resize, centre crop, rescale, normalise (CLIP); square resize (SigLIP); AnyRes tiles + base view (LLaVA-NeXT)."""

    def __init__(self, pp: dict, anyres_pinpoints=None):
        self.size, self.crop = pp.get("size", {"shortest_edge": 336}), pp.get("crop_size")
        self.do_crop = pp.get("do_center_crop", self.crop is not None)
        self.mean = pp.get("image_mean", OPENAI_CLIP_MEAN)
        self.std = pp.get("image_std", OPENAI_CLIP_STD)
        self.scale = pp.get("rescale_factor", 1 / 255)
        self.resample = pp.get("resample", 3)  # 3 = bicubic
        self.pinpoints = (
            pp.get("image_grid_pinpoints", anyres_pinpoints) if anyres_pinpoints else None
        )
        self.raw = pp

    @classmethod
    def default_for(cls, cfg: VLMConfig):
        """The processor a checkpoint without preprocessor_config.json implies (also written when we save one)."""
        S = cfg.vision.image_size
        if cfg.vision.kind == "siglip":
            pp = dict(
                image_processor_type="SiglipImageProcessor",
                size={"height": S, "width": S},
                image_mean=[0.5] * 3,
                image_std=[0.5] * 3,
                do_center_crop=False,
            )
        else:
            pp = dict(
                image_processor_type="CLIPImageProcessor",
                size={"shortest_edge": S},
                crop_size={"height": S, "width": S},
            )
        if cfg.model_type == "llava_next":
            pp.update(
                image_processor_type="LlavaNextImageProcessor",
                image_grid_pinpoints=cfg.grid_pinpoints,
            )
        return cls(pp, cfg.grid_pinpoints or None)

    # (H, W, 3) uint8 -> (h, w, 3) uint8 through PIL, as transformers does
    def resize(self, a, size):
        from PIL import Image

        h, w = size
        return np.array(Image.fromarray(a).resize((w, h), resample=self.resample))

    def center_crop(self, a):
        ch, cw = self.crop["height"], self.crop["width"]
        H, W = a.shape[:2]
        if H < ch or W < cw:  # too small: zero-pad to at least the crop size, centred
            nh, nw = max(H, ch), max(W, cw)
            big = np.zeros((nh, nw, a.shape[2]), a.dtype)
            t, l = math.ceil((nh - H) / 2), math.ceil((nw - W) / 2)
            big[t : t + H, l : l + W] = a
            a, H, W = big, nh, nw
        t, l = (H - ch) // 2, (W - cw) // 2
        return a[t : t + ch, l : l + cw]

    def finish(self, a):  # resize, crop, rescale (via float64), normalise -> (3, h, w) float32
        if "shortest_edge" in self.size:  # shortest side to `shortest_edge`, the other truncated
            H, W = a.shape[:2]
            s = self.size["shortest_edge"]
            a = self.resize(a, (int(s * H / W), s) if W <= H else (s, int(s * W / H)))
        else:
            a = self.resize(a, (self.size["height"], self.size["width"]))
        if self.do_crop:
            a = self.center_crop(a)
        x = (a.astype(np.float64) * self.scale).astype(np.float32)
        x = (x - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return x.transpose(2, 0, 1)

    def anyres_views(self, a):
        """The base view (square resize) followed by the tiles of the best grid resolution, row-major."""
        H, W = a.shape[:2]
        th, tw = select_best_resolution((H, W), self.pinpoints)
        # fit inside (th, tw) keeping the aspect ratio, then pad centred with black
        if tw / W < th / H:
            nh, nw = min(math.ceil(H * tw / W), th), tw
        else:
            nh, nw = th, min(math.ceil(W * th / H), tw)
        r = self.resize(a, (nh, nw))
        top, left = (th - nh) // 2, (tw - nw) // 2
        canvas = np.zeros((th, tw, 3), np.uint8)
        canvas[top : top + nh, left : left + nw] = r
        p = (
            self.crop["height"]
            if self.crop
            else self.size.get("height", self.size.get("shortest_edge"))
        )
        base = (
            (self.size["height"], self.size["width"])
            if "height" in self.size
            else (self.size["shortest_edge"],) * 2
        )
        tiles = [canvas[i : i + p, j : j + p] for i in range(0, th, p) for j in range(0, tw, p)]
        return [self.resize(a, base)] + tiles

    def __call__(self, images):
        """PIL images (a list, or an iterable that opens them one by one) -> pixel_values
        (N, 3, h, w) or, for AnyRes, (N, max_views, 3, h, w) zero-padded + image_sizes."""
        views, sizes = [], []
        for im in images:
            a = np.array(to_rgb(im))
            sizes.append(a.shape[:2])
            views.append(
                np.stack([self.finish(v) for v in self.anyres_views(a)])
                if self.pinpoints
                else self.finish(a)
            )
            del im, a  # freed before the iterable opens the next image
        if not self.pinpoints:
            return {"pixel_values": torch.from_numpy(np.stack(views))}
        n = max(len(v) for v in views)
        views = [np.concatenate([v, np.zeros((n - len(v),) + v.shape[1:], v.dtype)]) for v in views]
        return {
            "pixel_values": torch.from_numpy(np.stack(views)),
            "image_sizes": torch.tensor(sizes),
        }


# -----------------------------------------------------------------------------
# Prompting: conversation templates of the LLaVA checkpoints; the image placeholder becomes one token per feature

TEMPLATES = {
    # LLaVA-1.6 Vicuna (conv_vicuna_v1); LLaVA-1.5-hf drops the system line ("llava")
    "vicuna": dict(
        system="A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions. ",
        user="USER: {} ",
        assistant="ASSISTANT:",
        reply=" {}</s>",
    ),
    "llava": dict(system="", user="USER: {} ", assistant="ASSISTANT:", reply=" {}</s>"),
    "mistral": dict(system="", user="[INST] {} [/INST]", assistant="", reply=" {}</s>"),
    "chatml": dict(
        system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        user="<|im_start|>user\n{}<|im_end|>\n",
        assistant="<|im_start|>assistant\n",
        reply="{}<|im_end|>\n",
    ),
}


def format_chat(messages, template, add_generation_prompt=True):
    """[{"role": "user"|"assistant", "content": str}, ...] -> prompt text. The image goes in as "<image>\\n"."""
    t = TEMPLATES[template]
    out = t["system"]
    for m in messages:
        if m["role"] == "user":
            out += t["user"].format(m["content"])
        else:
            out += t["assistant"] + t["reply"].format(m["content"])
    return out + (t["assistant"] if add_generation_prompt else "")


def left_pad(seqs, pad_id=0):
    """Token lists -> left-padded ids (B, T) and their attention mask, so that every row ends on the same slot."""
    T = max(map(len, seqs))
    return (
        torch.tensor([[pad_id] * (T - len(x)) + list(x) for x in seqs]),
        torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in seqs]),
    )


# -----------------------------------------------------------------------------
# Random weights, for from-scratch training and tests (checkpoints in the Hugging Face layout: hub.py)


def init_weights(vlm, std=0.02, seed=0):
    """Random weights (normal(0, std), norms at 1, biases at 0), for from-scratch training and tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vlm.named_parameters():
            if "lora_" in name:
                continue  # adapters keep their own init
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1 and "norm" in name:  # LayerNorm / RMSNorm gains
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return vlm


# -----------------------------------------------------------------------------
# Try a checkpoint: `python model.py --model NAME --image FILE`


def main(argv=None):
    ap = arg_parser(description="Answer a question about an image with a LLaVA checkpoint.")
    ap.add_argument("--model", required=True, help="a local HF-layout folder or a hub id")
    ap.add_argument(
        "--image", default=None, help="an image file (default: none, a text-only prompt)"
    )
    ap.add_argument(
        "--prompt", default="Describe the image.", help="the question (default: %(default)s)"
    )
    ap.add_argument("--max_new_tokens", type=int, default=64, help="(default: %(default)s)")
    ap.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy (default: %(default)s)"
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="the sampling generator's seed (default: %(default)s)"
    )
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="the weights' dtype (default: %(default)s)",
    )
    ap.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="(default: %(default)s)",
    )
    ap.add_argument(
        "--template", default="", help=f"one of {', '.join(TEMPLATES)}; default: detect it"
    )
    a = ap.parse_args(argv)
    import hub  # hub imports this file

    vlm = VLM.from_pretrained(
        a.model, dtype=getattr(torch, a.dtype), device=a.device, template=a.template
    ).eval()
    print(hub.template_line(vlm))
    batch = vlm.prepare([a.prompt], [load_image(a.image)] if a.image else None)
    g = torch.Generator(a.device).manual_seed(a.seed)
    out = vlm.generate(
        **batch, max_new_tokens=a.max_new_tokens, temperature=a.temperature, generator=g
    )
    text = vlm.tokenizer.decode(out[0])
    print(text)
    return text


if __name__ == "__main__":
    run_main(main)
