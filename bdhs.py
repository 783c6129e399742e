"""bdhs.py: Bias-Driven Hallucination Sampling (paper §3.4, Algorithm 1, App. E): rejected responses
made by the policy itself with its image hidden, so they carry its language-prior hallucinations.

Per prompt with ground truth y+: hide the image tokens through the key mask (Eq. 6), cut each
sentence of y+ at a random word (a leading yes/no swapped with probability 0.5) and let the model
finish it; retry while the sentence embedding's cosine similarity to y+ is >= eps_s, up to
n_bdhs attempts, the last one unguided. Variants: BDHS_noise (POVID's diffusion noise, N = 500,
rho_th = 0), the POVID-style teacher-forced distortion (App. E.1), and a guidance ablation the paper
does not have: `--guidance none` (Table 15's "masking only") or `token` (each position's argmax of
the masked, teacher-forced y+).

    python bdhs.py --out runs/bdhs/pairs.jsonl   # the world's align prompts, the shipped base model
    python bdhs.py --model M --source povid:/data/povid --out pairs.jsonl \
        --embedder sentence-transformers/all-mpnet-base-v2   # BDHS's rejected replaces POVID's
    python bdhs.py --source povid:/data/povid --external true  # both: Avg-DPO (Eq. 5), 3 responses
"""

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
from tqdm import tqdm

import data
import world
from cli import DTYPES, UserError, atomic_write, config_from_argv, run_main
from embedder import SentenceEmbedder
from hub import check_template, template_line
from model import (
    TEMPLATES,
    VLM,
    device_generator,
    left_pad,
    max_prompt_tokens,
    rows_that_fit,
)

# -----------------------------------------------------------------------------
# The pieces of Algorithm 1


def split_sentences(text):
    """Sentences with the whitespace after each kept on it: "".join(split_sentences(t)) == t."""
    return [s for s in re.findall(r".*?(?:[.!?]+(?=\s|$)|$)\s*", text, flags=re.S) if s]


def swap_yes_no(s):
    """Swaps a leading Yes/yes/No/no, keeping case: "No, there is..." -> "Yes, there is..."."""
    swap = {"Yes": "No", "yes": "no", "No": "Yes", "no": "yes"}
    return re.sub(r"^(\s*)(Yes|yes|No|no)\b", lambda m: m[1] + swap[m[2]], s, count=1)


def cut_points(body):
    """Where a stripped sentence may be cut: its start, before inner spaces and end punctuation."""
    end = len(body.rstrip(".!?"))
    return sorted({0, end} | {i for i, ch in enumerate(body[:end]) if ch.isspace() and i > 0})


def plan_sentences(truth, rng: random.Random):
    """Per sentence of the truth: (the truth before it, its kept prefix, its trailing space)."""
    sents, plan = split_sentences(truth), []
    for k, s in enumerate(sents):
        if re.match(r"^\s*(Yes|yes|No|no)\b", s) and rng.random() < 0.5:
            s = swap_yes_no(s)
        body = s.rstrip()
        plan.append(("".join(sents[:k]), body[: rng.choice(cut_points(body))], s[len(body) :]))
    return plan


def sentence_prefix(vlm: VLM, ctx, p1):
    """Forced tokens of a guided sentence: the reply's lead, the truth before it, its kept prefix.
    A trailing space (an empty cut) is left to the model: BPE merges it into the next word, so
    forcing it alone would be a token sequence the model never saw."""
    lead = TEMPLATES[vlm.template]["reply"].split("{}")[0]  # the template's text before the reply
    return vlm.encode_prompt((lead + ctx + p1).rstrip(), add_special_tokens=False)


def join_sentence(p1, cont, ws):
    """A guided sentence: prefix, continuation (stripped after an empty cut), the truth's gap."""
    return p1 + (cont if p1 else cont.lstrip()) + ws


def image_key_mask(input_ids, attention_mask, image_token_id, rho, generator):
    """(B, T) key mask: False on padding and on image tokens with rho_i < rho_th (Eq. 6), and each
    row's visible share of its image tokens."""
    img = input_ids == image_token_id
    visible = torch.rand(input_ids.shape, generator=generator) >= rho
    keep = attention_mask.bool() & ~(img & ~visible)
    return keep, ((img & visible).sum(1) / img.sum(1).clamp(min=1)).tolist()


def noise_alphas_bar(steps=1000):
    """cumprod(1 - beta), POVID's beta = sigmoid(linspace(-6, 6)) * (5e-3 - 1e-5) + 1e-5."""
    betas = (
        torch.sigmoid(torch.linspace(-6, 6, steps, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    )
    return torch.cumprod(1 - betas, 0)


def add_diffusion_noise(pixels, N, generator):
    """x(N) = sqrt(abar_N) x(0) + sqrt(1 - abar_N) eps on the normalised pixels (Eq. 8-9; abar
    includes step N, as POVID's code indexes it)."""
    if N <= 0:
        return pixels
    ab = noise_alphas_bar()[N]
    eps = torch.randn(pixels.shape, generator=generator, dtype=pixels.dtype)
    return (ab.sqrt() * pixels + (1 - ab).sqrt() * eps).to(pixels.dtype)


# -----------------------------------------------------------------------------
# Algorithm 1, batched


# BDHS's variants (--variant): attn hides the image tokens (BDHS_attn), noise noises the pixels
# (BDHS_noise), distort is POVID's teacher-forced distortion (App. E.1); each reader takes them from here
VARIANTS = ("attn", "noise", "distort")
GUIDANCES = ("sentence", "token", "none")  # --guidance: Algorithm 1's, per token, none


# A Config is a table, a flag a row, its help the comment beside it: kept as written
# fmt: off
@dataclass
class Config:
    model: str = world.BASE_MODEL  # an HF-layout folder or a hub id: the policy that hallucinates
    template: str = ""            # chat template: vicuna | llava | mistral | chatml; "": the model's own
    source: str = "world"         # world (align prompts, ground truth), world+corrupt (also its rule-made rejected),
                                  # a native .jsonl (rejected optional) or povid|vlfeedback|rlhfv|llava-rlhf[:PATH]
    image_root: str = ""          # a release's images (COCO for POVID...); default: images/ by it
    out: str = "runs/bdhs/pairs.jsonl"  # native JSONL, its first line the settings that made it
    n: int = 2000                 # world prompts (ignored for files: all of them)
    world_seed: int = 0           # the world's scenes: 0-2 dev seeds, 3-5 test seeds
    world_half: Literal["", "a", "b"] = ""  # a or b: prompts about half of the world's pairs (world.py)
    variant: Literal[VARIANTS] = "attn"  # BDHS_attn, BDHS_noise, or POVID-style
    rho: float = 0.99             # rho_th: share of image tokens hidden (0.99: ~1% stay visible)
    noise_steps: int = 500        # N of the diffusion noise (noise, distort)
    guidance: Literal[GUIDANCES] = "sentence"  # sentence: Algorithm 1; token: masked, teacher-forced;
                                               # none: unguided
    n_bdhs: int = 5               # attempts; the last one unguided
    eps_s: float = 0.97           # similarity at or above which an attempt is rejected
    embedder: str = ""            # a sentence-transformers folder or hub id; "": the MiniLM package
    temperature: float = 1.0      # of the sampled responses; 0: greedy
    sentence_tokens: int = 64     # new tokens per guided sentence
    max_new_tokens: int = 256     # new tokens of an unguided response
    external: bool = False        # also keep a source's rejected, BDHS's then as rejected2 (Avg-DPO, Eq. 5);
                                  # false: BDHS's rejected replaces the source's (plain DPO on BDHS pairs)
    batch_size: int = 0           # prompts per batch; 0: 32 on CPU, on a GPU as many as half the memory the
                                  # weights leave holds the KV cache of (batch_rows): LLaVA-1.6-7B in bf16 on
                                  # 80 GB gets 10 (a prompt of up to 3,184 tokens shared by its rows, plus 8 rows
                                  # of 256 + sentence_tokens; 0.5 MiB a cached token)
    seed: int = 0                 # the sampling generator's
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # where the model runs and samples
    dtype: Literal[DTYPES] = "float32"  # the weights' (and so the KV cache's) dtype; bfloat16 at 7B
    BOUNDS = dict(n=">= 1", rho=">= 0, <= 1", noise_steps=">= 0, <= 999", n_bdhs=">= 1", eps_s="<= 1",
                  temperature=">= 0", sentence_tokens=">= 1", max_new_tokens=">= 1", batch_size=">= 0")
# fmt: on


SENTENCES = 8  # sample rows a prompt is budgeted for (the sentences of its y+) when batch_size is 0


def batch_rows(vlm: VLM, cfg: Config):
    """--batch_size, or with 0 the prompts whose caches fit (model.rows_that_fit): each prompt's own
    tokens once, its SENTENCES guided rows' forced context (up to 256 tokens) and new tokens."""
    if cfg.batch_size:
        return cfg.batch_size
    rows = SENTENCES * (256 + cfg.sentence_tokens)
    return rows_that_fit(vlm, max_prompt_tokens(vlm) + max(rows, cfg.max_new_tokens), 32)


def source_records(cfg):
    if cfg.source in ("world", "world+corrupt"):
        w = world.World(cfg.world_seed, half=cfg.world_half)
        return world.world_pairs(w, cfg.n, rejected=cfg.source == "world+corrupt")
    # --external true: every record needs the rejected it keeps
    return data.load_pairs(cfg.source, cfg.image_root, need_rejected=cfg.external, flag="--source")


@torch.no_grad()
def bdhs_batch(
    vlm: VLM, embedder, recs, cfg: Config, gen: torch.Generator, rng: random.Random, stats=None
):
    """Algorithm 1 on a batch of records (conversation, chosen) -> (rejected, meta) per record."""
    if cfg.variant == "distort":  # one teacher-forced attempt under noise, as POVID
        texts = teacher_forced(vlm, recs, 0.0, cfg.noise_steps, gen)
        return [
            (t, dict(attempts=1, similarity=None, visible=1.0, guidance="token")) for t in texts
        ]
    ids, am = left_pad([data.prompt_ids(vlm, r) for r in recs])
    pix = vlm.image_processor(data.open_image(r["image"]) for r in recs)
    dev = vlm.lm_head.weight.device
    # masks and noise are drawn on the host from `gen`; sampling from a stream on the model's device
    # (gen itself on CPU, so the host's draws interleave as they always did)
    sample_gen = device_generator(gen, dev)
    gt_emb = embedder([r["chosen"] for r in recs])
    result, todo = [None] * len(recs), list(range(len(recs)))
    rho, noise = (0.0, cfg.noise_steps) if cfg.variant == "noise" else (cfg.rho, 0)
    for attempt in range(1, cfg.n_bdhs + 1):
        keep, vis = image_key_mask(ids[todo], am[todo], vlm.cfg.image_token_id, rho, gen)
        pv = add_diffusion_noise(pix["pixel_values"][todo], noise, gen)
        sizes = pix["image_sizes"][todo].to(dev) if "image_sizes" in pix else None
        kw = dict(
            input_ids=ids[todo].to(dev),
            attention_mask=am[todo].to(dev),
            key_mask=keep.to(dev),
            pixel_values=pv.to(dev),
            image_sizes=sizes,
            temperature=cfg.temperature,
            generator=sample_gen,
        )
        last = cfg.n_bdhs > 1 and attempt == cfg.n_bdhs  # the last attempt is unguided
        guidance = "none" if last else cfg.guidance
        open_recs = [recs[i] for i in todo]
        texts = attempt_texts(vlm, open_recs, cfg, guidance, kw, rng, gen, rho, noise)
        sim = similarities(embedder, texts, [r["chosen"] for r in open_recs], gt_emb[todo])
        for i, text, s, v in zip(todo, texts, sim, vis):
            meta = dict(attempts=attempt, similarity=round(s, 4), visible=round(v, 4))
            result[i] = (text, meta | dict(guidance=guidance))
        still = [i for i, s in zip(todo, sim) if s >= cfg.eps_s]
        if stats is not None:
            stats[attempt - 1] += len(todo) - len(still)
        todo = still
        if not todo:
            break
    return result


def attempt_texts(vlm: VLM, recs, cfg: Config, guidance, kw, rng, gen, rho, noise):
    """One attempt's texts for the records still open: `kw` holds their masked, noised inputs."""
    if guidance == "sentence":
        plans = [plan_sentences(r["chosen"], rng) for r in recs]  # rows share a prefill
        prefix = [sentence_prefix(vlm, ctx, p1) for pl in plans for ctx, p1, _ in pl]
        out = iter(
            vlm.generate(
                **kw,
                max_new_tokens=cfg.sentence_tokens,
                prefix_ids=prefix,
                num_samples=[len(pl) for pl in plans],
                stop_strings=(".",),
            )
        )
        return [
            "".join(join_sentence(p1, vlm.tokenizer.decode(next(out)), ws) for _, p1, ws in pl)
            for pl in plans
        ]
    if guidance == "token":
        return teacher_forced(vlm, recs, rho, noise, gen)
    out = vlm.generate(**kw, max_new_tokens=cfg.max_new_tokens)
    return [vlm.tokenizer.decode(o).strip() for o in out]


def similarities(embedder, texts, truths, truth_emb):
    """Each text's cosine similarity to its truth (embedded as `truth_emb`)."""
    new = [j for j, (t, y) in enumerate(zip(texts, truths)) if not identical(t, y)]
    sim = [1.0] * len(texts)
    if new:
        cos = (embedder([texts[j] for j in new]) * truth_emb[new]).sum(-1)
        for j, s in zip(new, cos):
            sim[j] = s.item()
    return sim


def identical(text, truth):
    """An attempt that gives back the truth is as similar as can be (similarity 1): not embedded."""
    return text == truth


@torch.no_grad()
def teacher_forced(vlm: VLM, recs, rho, noise, gen):
    """Each position's argmax with the truth teacher-forced, image tokens hidden (rho), pixels
    noised (noise steps). With rho 0: POVID's distortion (App. E.1), here a plain rejected text."""
    items = [
        dict(
            image=r["image"],
            prompt=data.prompt_ids(vlm, r),
            responses=[vlm.encode_reply(r["chosen"])],
        )
        for r in recs
    ]
    b = data.collate_pairs(vlm, items)
    keep, _ = image_key_mask(b["input_ids"], b["segment"] >= 0, vlm.cfg.image_token_id, rho, gen)
    dev = vlm.lm_head.weight.device
    sizes = b["image_sizes"].to(dev) if "image_sizes" in b else None
    pv = add_diffusion_noise(b["pixel_values"], noise, gen).to(dev)
    h = vlm.hidden(
        b["input_ids"].to(dev),
        pv,
        sizes,
        position_ids=b["position_ids"].to(dev),
        key_mask=keep.to(dev),
    )
    rows = h[torch.arange(len(items))[:, None], b["pred_idx"][:, 0].to(dev)]
    logits = vlm.lm_head(rows)  # (B, T, V)
    # the ids generate never samples are never predicted either (a padded head, <image>, <pad>)
    pred = logits.masked_fill(vlm.never_sampled(), float("-inf")).argmax(-1).cpu()
    eos = vlm.eos_ids()
    return [
        vlm.tokenizer.decode(
            [t for t in p[: len(it["responses"][0])].tolist() if t not in eos]
        ).strip()
        for it, p in zip(items, pred)
    ]


# -----------------------------------------------------------------------------
# Pairs on disk: resumable, one batch appended at a time


def pairs_settings(cfg: Config, world_size):
    """What a pairs file's first line keeps: the settings that made it (world_size: which records a
    rank shard holds), all but --out, the file's own name."""
    return {k: v for k, v in asdict(cfg).items() if k != "out"} | {"world_size": world_size}


def check_settings(out, mine, theirs):
    """Refuses to append to a pairs file made with other settings, naming each and both values."""
    if theirs is None:
        raise UserError(
            f"{out}: its first line holds no settings, so how its pairs were made is unknown: "
            f"pass another --out or delete it"
        )
    if changed := sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)):
        flags = {f.name for f in fields(Config)}  # world_size is not one
        diff = ", ".join(
            f"{'--' + k if k in flags else k} {mine.get(k)} (the file's: {theirs.get(k)})"
            for k in changed
        )
        raise UserError(
            f"{out} was made with other settings: {diff}: pass another --out, or delete it to "
            f"start over"
        )


def resume_pairs(cfg: Config, out, world_size):
    """Starts `out` with its settings line; where it holds pairs already, checks its settings and
    keeps its whole lines (a run killed mid-write leaves one partial line) -> the ids it holds."""
    mine, theirs, good = pairs_settings(cfg, world_size), None, []
    lines = open(out).read().split("\n") if os.path.exists(out) else []
    for n, ln in enumerate(lines):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if n == 0 and data.is_settings(rec):
            theirs = rec["settings"]
        else:
            good.append(ln)
    if good:  # pairs already there must have been made with these settings
        check_settings(out, mine, theirs)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    atomic_write(out, "".join(ln + "\n" for ln in [json.dumps({"settings": mine})] + good))
    return {json.loads(ln)["id"] for ln in good}


def build_pairs(cfg: Config, vlm=None, embedder=None, rank=0, world_size=1, log=print):
    """Writes BDHS pairs to cfg.out (or its rank shard), skipping ids already there -> per-attempt
    counts of accepted non-similar responses. Batches are cut from the source's records alone, each
    seeded by (seed, its first id) and written in one piece: a resumed run writes the same file."""
    out = cfg.out if world_size == 1 else f"{cfg.out}.rank{rank}"
    done = resume_pairs(cfg, out, world_size)
    recs = source_records(cfg)[rank::world_size]
    if vlm is None:
        vlm = VLM.from_pretrained(
            cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device, template=cfg.template
        ).eval()
        if rank == 0:
            log(template_line(vlm))
    if not embedder and cfg.variant != "distort":
        embedder = SentenceEmbedder.from_pretrained(cfg.embedder)
    size = batch_rows(vlm, cfg)
    batches = [recs[b : b + size] for b in range(0, len(recs), size)]
    todo = [bt for bt in batches if any(r["id"] not in done for r in bt)]  # half-written: redone
    left = sum(r["id"] not in done for bt in todo for r in bt)
    stats = [0] * cfg.n_bdhs
    bar = tqdm(
        total=len(recs), initial=len(recs) - left, desc=f"BDHS {cfg.variant}", disable=rank != 0
    )
    with open(out, "a") as f:
        for b, batch in enumerate(todo):
            key = f"{cfg.seed}-{batch[0]['id']}"
            gen = torch.Generator().manual_seed(
                int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)
            )
            res = bdhs_batch(vlm, embedder, batch, cfg, gen, random.Random(key), stats)
            lines = [
                record_line(cfg, r, text, meta, out)
                for r, (text, meta) in zip(batch, res)
                if r["id"] not in done
            ]
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(lines))
            seen = sum(map(len, todo[: b + 1]))  # records sampled so far (stats counts them all)
            if cfg.variant != "distort":  # one attempt, never compared: its stats stay 0
                shares = (f"{sum(stats[: k + 1]) / seen:.0%}" for k in range(cfg.n_bdhs))
                bar.set_postfix(non_similar=" ".join(shares), refresh=False)
    bar.close()
    if todo and cfg.variant != "distort":
        log(shares_line(stats, sum(map(len, todo))))
    return stats


def record_line(cfg: Config, r, text, meta, out):
    """A source record with BDHS's rejected (and its attempts in meta) as a line of `out`."""
    rec = dict(r, rejected=text, meta=dict(r.get("meta", {}), bdhs=meta))
    if "rejected" in r and cfg.external:  # Eq. 5: y- the external, y~- the policy's own
        rec["rejected"], rec["rejected2"] = r["rejected"], text
    return data.pair_line(rec, os.path.dirname(out) or ".") + "\n"


def shares_line(stats, n):
    """The share of n prompts with a non-similar response after each attempt (paper Fig. 10)."""
    n = max(1, n)
    return (
        "non-similar share after each attempt (paper Fig. 10): "
        + ", ".join(f"{k + 1}: {100 * sum(stats[: k + 1]) / n:.1f}%" for k in range(len(stats)))
        + f" ({n - sum(stats)} similar at the end)" * (sum(stats) < n)
    )


def main(argv=None):
    cfg = config_from_argv(Config, argv, __doc__)
    if cfg.external and cfg.source == "world":
        raise UserError(
            "--external true keeps the source's rejected, and --source world has none: "
            "--source world+corrupt has the world's rule-made ones"
        )
    if cfg.source not in ("world", "world+corrupt"):
        data.check_spec(cfg.source, "--source")
    check_template(cfg.template)
    build_pairs(cfg)
    kept = (
        "the source's rejected kept, BDHS's as rejected2 (Avg-DPO)"
        if cfg.external
        else "BDHS's rejected"
    )
    print(f"wrote {cfg.out}: {kept}")


if __name__ == "__main__":
    run_main(main)
