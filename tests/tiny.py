"""Tiny random-weight checkpoints that transformers builds and saves, for parity tests (no network needed)."""

import os

import numpy as np
import torch

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "USER: What is in the image? ASSISTANT: A red cup and a blue ball are on the table.",
    "[INST] Describe the picture. [/INST] There are three objects. A green tree is at the top left.",
    "system You are a helpful assistant. user Is there a dog? assistant Yes, there is a dog.",
    "A chat between a curious human and an artificial intelligence assistant.",
] * 20
VOCAB = 320

# (vision, text, model_type) triples the parity tests cover: LLaVA-1.5, llava-interleave-qwen, LLaVA-1.6 shapes
VISION = {
    "clip": dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        projection_dim=16,
    ),
    "siglip": dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        vision_use_head=False,
    ),
}
TEXT = {
    "llama": dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
    ),
    "mistral": dict(
        model_type="mistral",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        max_position_embeddings=512,
    ),
    "qwen2": dict(
        model_type="qwen2",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    ),
}
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


def build_tokenizer(path, specials=SPECIALS):
    """A byte-level BPE tokenizer.json with the chat specials and a BOS post-processor; returns the HF wrapper."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 20,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    return PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(path, "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def hf_config(vision="clip", text="llama", model_type="llava", layer=-2, strategy=None):
    cfg = dict(
        model_type=model_type,
        vision_config=dict(VISION[vision]),
        text_config=dict(TEXT[text]),
        image_token_index=SPECIALS.index("<image>"),
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy or ("default" if vision == "clip" else "full"),
    )
    if model_type == "llava_next":
        cfg["image_grid_pinpoints"] = PINPOINTS
    return cfg


def hf_processor(cfg, hf_tok):
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    S, clip = (
        cfg["vision_config"]["image_size"],
        cfg["vision_config"]["model_type"] == "clip_vision_model",
    )
    kw = dict(
        tokenizer=hf_tok,
        patch_size=cfg["vision_config"]["patch_size"],
        vision_feature_select_strategy=cfg["vision_feature_select_strategy"],
        num_additional_image_tokens=int(clip),
    )
    if cfg["model_type"] == "llava_next":
        ip = LlavaNextImageProcessorPil(
            size={"shortest_edge": S},
            crop_size={"height": S, "width": S},
            image_grid_pinpoints=cfg["image_grid_pinpoints"],
        )
        return LlavaNextProcessor(image_processor=ip, **kw)
    if clip:
        ip = CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    else:
        ip = SiglipImageProcessorPil(size={"height": S, "width": S})
    return LlavaProcessor(image_processor=ip, **kw)


def build_hf(path, seed=0, **kw):
    """Saves a random-weight transformers LLaVA model, its tokenizer and processor to `path`;
    returns (model, processor)."""
    from transformers import (
        AutoConfig,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
    )

    cfg = hf_config(**kw)
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    cls = (
        LlavaNextForConditionalGeneration
        if cfg["model_type"] == "llava_next"
        else LlavaForConditionalGeneration
    )
    model = cls(config).eval()
    with (
        torch.no_grad()
    ):  # transformers inits some tensors to exact constants; randomise all for a real test
        for _name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    proc = hf_processor(cfg, build_tokenizer(path))
    proc.save_pretrained(path)
    return model, proc


def random_image(h, w, mode="RGB", seed=0):
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    im = Image.fromarray(a, "RGBA")
    return im if mode == "RGBA" else im.convert(mode)


def bomb_png(path, w, h):
    """A real decompression bomb: a w x h 1-bit PNG of zeros, a few KB on disk, w * h bytes open."""
    import struct
    import zlib

    def chunk(kind, d):
        return struct.pack(">I", len(d)) + kind + d + struct.pack(">I", zlib.crc32(kind + d))

    raw = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(bytes(h * (1 + (w + 7) // 8)), 9))
        + chunk(b"IEND", b"")
    )
    with open(path, "wb") as f:
        f.write(raw)
    return raw


# Chat templates in the style of llava-hf's: the role name upper-cased ("USER: "), a message's
# images before its text, content a plain string or a list of {"type": "image"} and
# {"type": "text", "text": ...} parts. They write what model.py's "llava" and "mistral" write.
PARTS = (
    "{%- if m['content'] is string -%}{{- m['content'] -}}{%- else -%}"
    "{%- for p in m['content'] if p['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for p in m['content'] if p['type'] == 'text' -%}{{- p['text'] -}}{%- endfor -%}{%- endif -%}"
)
JINJA = {
    "llama": (
        "{%- for m in messages -%}{{- m['role'].upper() + ': ' -}}"
        + PARTS
        + "{{- '</s>' if m['role'] == 'assistant' else ' ' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    ),
    "mistral": (
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{- '[INST] ' -}}"
        + PARTS
        + "{{- ' [/INST]' -}}{%- else -%}{{- ' ' -}}"
        + PARTS
        + "{{- '</s>' -}}{%- endif -%}{%- endfor -%}"
    ),
}


def build_llava_hf(
    path, text="llama", dtype=torch.float32, model_type="llava_next", seed=0, pad_rows=64
):
    """A tiny llava-hf-shaped folder saved by transformers, whose likeliest ids are the ones sampling
    must never emit. As in llava-hf's 7B models (32,064 logit rows for about 32,002 tokens),
    `text_config.vocab_size` exceeds the tokenizer by `pad_rows` or more; the folder holds
    `chat_template.jinja` (llama: "USER: ... ASSISTANT:", mistral: "[INST] ... [/INST]") and
    `processor_config.json`, weights in `dtype`. Every embedding carries a large constant in hidden
    dimension 0, and only the LM head rows of the padded ids, <image> and <pad> read it, so those
    are the likeliest logits at every text position. Returns (model, processor, info), info =
    dict(tokens=tokenizer size, rows=logit rows, image=<image> id, pad=<pad> id)."""
    from transformers import (
        AutoConfig,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
    )

    hf_tok = build_tokenizer(path, SPECIALS[:5])  # llava-hf's specials: no ChatML tokens
    n_tok = len(hf_tok)
    rows = -(-(n_tok + pad_rows) // 64) * 64  # padded up to a multiple of 64, as llava-hf's 32,064
    cfg = hf_config("clip", text, model_type)
    cfg["text_config"]["vocab_size"] = rows
    cfg["pad_token_id"] = SPECIALS.index("<pad>")  # llava-hf's configs name it at both levels
    cfg["text_config"]["pad_token_id"] = SPECIALS.index("<pad>")
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    cls = (
        LlavaNextForConditionalGeneration
        if model_type == "llava_next"
        else LlavaForConditionalGeneration
    )
    model = cls(config).eval()
    image, pad = SPECIALS.index("<image>"), SPECIALS.index("<pad>")
    with torch.no_grad():
        for _name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.get_input_embeddings().weight[:, 0] = 1.0  # the residual stream's constant direction
        head = model.get_output_embeddings().weight  # (rows, C)
        head[:, 0] = 0.0
        head[n_tok:, 0] = 2.0  # the padded rows
        head[[image, pad], 0] = 2.5  # above the padded rows: if only those were masked, these win
    model.to(dtype).save_pretrained(path)
    proc = hf_processor(cfg, hf_tok)
    proc.chat_template = JINJA[text]
    proc.save_pretrained(path)
    return model, proc, dict(tokens=n_tok, rows=rows, image=image, pad=pad)
