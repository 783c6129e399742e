"""train_online.py: online alignment of a LLaVA-style model (paper §2.3, §3.1, §3.3, §3.4, §6.4).

Every step samples responses from the current policy for a batch of prompts, has them judged, and trains on them:

    online-dpo   2 samples per prompt at temperature 1; the annotator's preferred one is chosen; DPO (§3.3). With
                 --samples k > 2 and a scoring annotator, the best of k against the worst
    mixed-dpo    per prompt, the offline pair with probability --mix_p, else an online pair (Eq. 4); only the
                 prompts that need an online pair are sampled
    online-bdhs  the ground truth as chosen, a BDHS response of the current policy as rejected (§6.4); with
                 --external true, Avg-DPO with the source's own rejected response too (Eq. 5)
    ppo          1 sample per prompt; its reward at the last token, a per-token KL penalty to the reference, a value
                 head, GAE and the clipped surrogate, --ppo_epochs passes per batch (§3.1)
    rloo         4 samples per prompt; rewards normalised by statistics measured before training, R = r̂ - β·KL,
                 the leave-one-out baseline (§3.1)

Annotators (--annotator): `rule` checks a response against the embedded world's ground truth (objects, colours and
counts right or invented); `rm:PATH` is a reward model from `train_offline.py --loss rm`; `judge:PATH` is any VLM
asked the paper's pairwise question (Table 14), its answer parsed for "Response 1" / "Response 2" (pairwise, so for
the DPO algorithms only; answers that name neither are dropped and counted); `api:MODEL` is a VLM
served by an inference engine behind an OpenAI-compatible endpoint ($JUDGE_BASE_URL,
$JUDGE_API_KEY), asked the same question for a pair, or for a 1-10 rating of each sample for PPO,
RLOO and best-of-k. The samples of one prompt share its
image encoding and prompt prefill, and are scored packed after one copy of the prompt, as offline pairs are.

The reference is the starting model, i.e. the policy with its LoRA adapters switched off, so only the adapters (and
PPO's value head) train. The rest is train_offline.py's: DDP / FSDP2, --dtype, the metrics JSONL, tqdm, atomic
checkpoints in the HF layout and --resume (sampling is seeded by the step, so a resumed run continues exactly).

    python train_online.py --algo online-dpo                  # the rule annotator on the world's align prompts
    python train_online.py --algo mixed-dpo
    python train_online.py --algo online-bdhs --external true
    python train_offline.py --loss rm --out_dir runs/rm && python train_online.py --algo ppo --annotator rm:runs/rm/checkpoint
    torchrun --nproc_per_node 2 train_online.py --algo rloo
    JUDGE_BASE_URL=http://host:8000/v1 python train_online.py --annotator api:llava-v1.6-34b
"""
import contextlib
import hashlib
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import bdhs
import data
import eval as ev
import losses
import train_offline as off
from model import TEMPLATES, VLM, config_from_argv, left_pad

ALGOS = ("online-dpo", "mixed-dpo", "online-bdhs", "ppo", "rloo")
SAMPLES = {"online-dpo": 2, "mixed-dpo": 2, "ppo": 1, "rloo": 4}


@dataclass
class Config(off.Config):
    HIDDEN = ("val_pairs", "text_only", "vision_pretrain", "bdhs_source", "cache_dir")  # offline flags with no use here
    algo: str = "online-dpo"
    annotator: str = "rule"       # rule | rm:PATH | judge:PATH | api:MODEL (served; see Endpoint)
    annotator_threads: int = 16   # api: requests in flight per rank
    out_dir: str = "runs/online"
    data: str = "world"           # prompts: the world's align split, or a native .jsonl / converter (with chosen)
    ref: str = "lora_off"         # the reference is the policy with its adapters off (online: nothing to cache)
    lr_projector: float = 0.0     # so only adapters train (the reference must stay the starting model)
    lr: float = 1e-3              # online defaults, measured on the world (README): LR, plain DPO's β, no NLL term
    beta: float = 0.5
    rpo_alpha: float = 0.0
    epochs: float = 1.0
    samples: int = 0              # per prompt; 0: 2 for the DPO algorithms (more: best vs worst), 1 PPO, 4 RLOO
    temperature: float = 1.0
    max_new_tokens: int = 96
    mix_p: float = 0.5            # Mixed-DPO: probability of the offline pair (Eq. 4)
    kl_coef: float = 0.4          # PPO / RLOO: β of the KL penalty (the paper's RLOO value)
    ppo_epochs: int = 4           # PPO: optimisation passes over each batch of samples
    clip: float = 0.2             # PPO: ratio and value clipping
    vf_coef: float = 0.1
    gae_lambda: float = 0.95      # GAE's λ (γ is 1)
    norm_prompts: int = 256       # PPO / RLOO: prompts whose samples give the reward normalisation, before training
    judge_tokens: int = 64

# -----------------------------------------------------------------------------
# Annotators: a score per response (rule, reward model) or a pairwise choice (judge VLM)


def rule_score(text, rec):
    """The world's verifier: +1 per object named that is there, +1 / -1 per colour stated right / wrong, -2 per
    object invented, ±1 for the count, the yes / no, the colour or the position asked about; divided by the most
    a perfect answer gets, so it lies in [-1, 1] for answers that invent nothing."""
    truth, kind = rec["chosen"], rec.get("meta", {}).get("kind")
    if truth.split(",")[0].lower() in ("yes", "no"):
        return 1.0 if ev.yes_no(text) == ev.yes_no(truth) else -1.0
    want = {m["category"]: m["color"] for m in ev.parse_objects(truth) if not m["negated"]}
    said = [m for m in ev.parse_objects(text) if not m["negated"]]
    got, top = 0.0, len(want) + sum(c is not None for c in want.values())
    for c in {m["category"] for m in said}:
        got += 1 if c in want else -2
    for m in said:
        if m["category"] in want and m["color"] and want[m["category"]]:
            got += 1 if m["color"] == want[m["category"]] else -1
    checks = [(ev.first_word(truth, data.NUMBERS), ev.first_word(text, data.NUMBERS))]
    if kind == "color":
        checks.append((ev.first_word(truth, data.COLORS), ev.first_word(text, data.COLORS)))
    if kind == "position":
        checks.append(([p for p in data.POSITIONS if p in truth], [p for p in data.POSITIONS if p in text]))
    for g, t in checks:
        if g:
            got, top = got + (1 if g == t else -1), top + 1
    return got / max(top, 1)


class RewardModel:
    """A Bradley–Terry reward model saved by `train_offline.py --loss rm`: the scalar head on the last token."""

    def __init__(self, path, device):
        vlm = VLM.from_pretrained(path, device=device)
        if "score.weight" not in vlm.extra:
            raise ValueError(f"{path}: no score.weight (reward head); train one with train_offline.py --loss rm")
        self.pm = off.PairModel(vlm, reward_head=True).to(device).eval()
        self.pm.score.weight.data.copy_(vlm.extra["score.weight"])

    @torch.no_grad()
    def __call__(self, recs, texts):
        vlm = self.pm.vlm
        items = [dict(image=r["image"], prompt=bdhs.prompt_ids(vlm, r), responses=[vlm.encode_reply(t) for t in ts])
                 for r, ts in zip(recs, texts)]
        return self.pm(**off.to(data.collate_pairs(vlm, items), vlm.lm_head.weight.device))[2].tolist()


# The annotator prompt of paper Table 14, in our words: less hallucination, image-grounded help, say which and why.
JUDGE = ("Here are a question about the image and two responses to it, Response 1 and Response 2. Decide which "
         "response is better. The better response hallucinates less: every object, attribute, colour and relation "
         "it states is in the image, and it avoids ambiguous details. It also gives more helpful information that is "
         "grounded in the image; for a practical question, a concise and helpful answer beats irrelevant remarks. "
         "Say which response is better, then explain why.\n\nQuestion: {question}\n\nResponse 1: {r1}\n\n"
         "Response 2: {r2}")
_NAMED = re.compile(r"response\s*#?\s*([12])\b")
_VERDICTS = [re.compile(r"response\s*#?\s*([12])\s+(?:is|was|seems|appears)\s+(?:\w+\s+){0,2}?"
                        r"(?:better|preferred|superior|more accurate|the best)"),
             re.compile(r"(?:better|preferred|prefer|choose|winner)(?: one)?(?: response)?(?: is| would be|:)?\s+"
                        r"(?:the\s+)?response\s*#?\s*([12])\b")]


def parse_judgment(text):
    """The judge's free text -> 0 (Response 1), 1 (Response 2), or None when it names neither or cannot be read. A
    verdict phrase decides ("Response 2 is better", "I prefer Response 1"; negated ones do not count, conflicting
    ones make it unreadable); without one, a text that names one response only, and hedges nothing, picks it."""
    t = text.lower()
    picks = {m.group(1) for rx in _VERDICTS for m in rx.finditer(t) if not re.search(r"\bnot\b|n't", m.group(0))}
    if picks:
        return int(picks.pop()) - 1 if len(picks) == 1 else None
    named = set(_NAMED.findall(t))
    hedged = re.search(r"\b(?:not|neither|both|equal|equally|tie)\b|n't", t)
    return int(named.pop()) - 1 if len(named) == 1 and not hedged else None


def question(rec):
    return rec["conversation"][-1]["content"].replace("<image>", "").strip()


class Judge:
    """Any VLM asked the pairwise question with the image; greedy answer, parsed by `parse_judgment`."""

    def __init__(self, path, device, max_new_tokens=64):
        self.vlm, self.max_new_tokens = VLM.from_pretrained(path, device=device).eval(), max_new_tokens

    @torch.no_grad()
    def __call__(self, recs, pairs):
        qs = [JUDGE.format(question=question(r), r1=a, r2=b) for r, (a, b) in zip(recs, pairs)]
        batch = self.vlm.prepare(qs, [data.open_image(r["image"]) for r in recs])
        out = self.vlm.generate(**batch, max_new_tokens=self.max_new_tokens, temperature=0.0)
        return [parse_judgment(self.vlm.tokenizer.decode(o)) for o in out]


# A 1-10 rating of one response, in our words, for PPO / RLOO and best-of-k; the rating comes
# first, so that a few reply tokens hold it.
RATE = ("Rate the response to this question about the image from 1 (worst) to 10 (best). A "
        "good response hallucinates nothing: every object, attribute, colour and relation it "
        "states is in the image, and it is helpful and grounded in the image. First write "
        "\"Rating: N\" on its own line, then explain briefly.\n\nQuestion: {question}\n\n"
        "Response: {r}")


def parse_rating(text):
    """The N of "Rating: N" (1 to 10), or None when there is none or several differ."""
    found = set(re.findall(r"rating:\s*(10|[1-9])\b", text.lower()))
    return float(found.pop()) if len(found) == 1 else None


class Endpoint:
    """An annotator served by an inference engine behind an OpenAI-compatible endpoint
    ($JUDGE_BASE_URL; the key only from $JUDGE_API_KEY, so it is never saved with the config). Each
    pair (JUDGE) or response (RATE) is one request with the image; a batch's requests go out
    together, `threads` in flight, through eval.JudgeClient (retries, and the on-disk cache that
    lets a resumed run ask only for what is missing)."""

    def __init__(self, model, cache, threads, max_tokens):
        from concurrent.futures import ThreadPoolExecutor
        self.client, self.max_tokens = ev.JudgeClient(cache, model=model), max_tokens
        self.pool = ThreadPoolExecutor(threads)

    def ask(self, recs, texts):
        """texts[i] with recs[i]'s image -> the replies, in order; a request is sent once per batch
        however many samples repeat it."""
        def one(key):
            rec, text = jobs[key], key[1]
            content = [{"type": "text", "text": text}, ev.image_part(rec["image"])]
            return self.client([{"role": "user", "content": content}], self.max_tokens, 0.0)
        jobs = {(id(r), t): r for r, t in zip(recs, texts)}
        got = dict(zip(jobs, self.pool.map(one, jobs)))
        return [got[id(r), t] for r, t in zip(recs, texts)]

    def judge(self, recs, pairs):
        qs = [JUDGE.format(question=question(r), r1=a, r2=b) for r, (a, b) in zip(recs, pairs)]
        return [parse_judgment(t) for t in self.ask(recs, qs)]

    def score(self, recs, texts):
        flat = [(r, RATE.format(question=question(r), r=t))
                for r, ts in zip(recs, texts) for t in ts]
        out = iter(map(parse_rating, self.ask(*zip(*flat))))
        return [[next(out) for _ in ts] for ts in texts]  # None where the rating is unreadable


def make_annotator(cfg: Config, device):
    """-> (scorer, judge): scorer(recs, texts per rec) -> scores per rec; judge(recs, pairs) -> 0 / 1 / None."""
    kind, _, path = cfg.annotator.partition(":")
    if kind == "rule":
        return (lambda recs, texts: [[rule_score(t, r) for t in ts] for r, ts in zip(recs, texts)]), None
    if kind in ("rm", "judge", "api") and not path:
        what = "MODEL needs the served model's name" if kind == "api" else \
            "PATH needs the checkpoint's path"
        raise ValueError(f"--annotator {kind}:{what}")
    if kind == "api" and not os.environ.get("JUDGE_BASE_URL"):  # never a silent default host
        raise ValueError(f"--annotator {cfg.annotator}: set JUDGE_BASE_URL to the endpoint serving "
                         f"{path} (and JUDGE_API_KEY if it needs a key)")
    if kind == "api":  # a DPO pair: the pairwise question; RL and best-of-k: ratings
        api = Endpoint(path, os.path.join(cfg.out_dir, "annotator.jsonl"), cfg.annotator_threads,
                       cfg.judge_tokens)
        pairwise = cfg.samples == 2 and cfg.algo not in ("ppo", "rloo")
        return api.score, api.judge if pairwise else None
    if kind == "rm":
        return RewardModel(path, device), None
    if kind == "judge":
        if cfg.algo in ("ppo", "rloo"):
            raise ValueError("--annotator judge gives pairwise choices, not rewards: PPO and RLOO need rule or rm:PATH")
        return None, Judge(path, device, cfg.judge_tokens)
    raise ValueError(f"--annotator {cfg.annotator!r}: expected rule, rm:PATH, judge:PATH or "
                     "api:MODEL")

# -----------------------------------------------------------------------------
# Rollouts: samples from the current policy, judged, packed with the reference's (and PPO's old) log-probs


@contextlib.contextmanager
def unsharded(pm):
    """FSDP2: every unit's full parameters for the length of a sampling call, so that no collective runs inside it
    (ranks may take different numbers of decoding steps). Nothing to do without FSDP."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in pm.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_reshard_after_forward(m is not pm, recurse=False)
            m.reshard()


@torch.no_grad()
def sample(pm, recs, n, cfg: Config, gen):
    """n responses per record: token ids (the template's end tokens appended when the sample ended) and texts."""
    vlm = pm.vlm
    dev = vlm.lm_head.weight.device
    ids, am = left_pad([bdhs.prompt_ids(vlm, r) for r in recs])
    pix = vlm.image_processor(data.open_image(r["image"]) for r in recs)
    with unsharded(pm):
        out = vlm.generate(ids.to(dev), am.to(dev), pix["pixel_values"].to(dev),
                           pix["image_sizes"].to(dev) if "image_sizes" in pix else None,
                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, generator=gen, num_samples=n)
    end = vlm.encode_prompt(TEMPLATES[vlm.template]["reply"].split("{}")[1], add_special_tokens=False)
    ids = [o + end * (len(o) < cfg.max_new_tokens) for o in out]
    texts = [vlm.tokenizer.decode(o).strip() for o in out]
    return [ids[i * n:(i + 1) * n] for i in range(len(recs))], [texts[i * n:(i + 1) * n] for i in range(len(recs))]


def rollout(cfg: Config, pm, recs, annotate, gen, step, reward_norm=(0.0, 1.0), embedder=None):
    """One micro-batch of training material: packed items, per-item weights (0 marks a stand-in when every pair was
    dropped), tensors for the objective, and metric sums {name: [sum, count]}."""
    vlm, (scorer, judge) = pm.vlm, annotate
    enc = vlm.encode_reply
    item = lambda r, resps: dict(id=r["id"], image=r["image"], prompt=bdhs.prompt_ids(vlm, r), responses=resps)  # noqa
    st = {}
    add = lambda k, s, n=1: st.__setitem__(k, [st.get(k, [0, 0])[0] + s, st.get(k, [0, 0])[1] + n])  # noqa
    roll = {}
    if cfg.algo in ("ppo", "rloo"):
        ids, texts = sample(pm, recs, cfg.samples, cfg, gen)
        t0 = time.perf_counter()
        sc = scorer(recs, texts)
        add("online/annotator_s", time.perf_counter() - t0, 1 / cfg.grad_accum)  # per step and rank
        add("online/unparsed", sum(x is None for s in sc for x in s), cfg.samples * len(recs))
        # (P, k); an unreadable rating gets the mean, so about no advantage
        scores = torch.tensor([[reward_norm[0] if x is None else x for x in s] for s in sc])
        items = [item(r, x) for r, x in zip(recs, ids)]
        roll["scores"] = (scores - reward_norm[0]) / reward_norm[1]
        add("objective/scores", scores.sum().item(), scores.numel())
        add("response_length", sum(len(x) for xs in ids for x in xs), scores.numel())
    elif cfg.algo == "online-bdhs":
        bc = bdhs.Config(variant="attn" if cfg.bdhs_variant == "unguided" else cfg.bdhs_variant, rho=cfg.rho,
                         noise_steps=cfg.noise_steps, guided=cfg.bdhs_variant != "unguided", seed=cfg.seed)
        with unsharded(pm):
            res = bdhs.bdhs_batch(vlm, embedder, recs, bc, gen, random.Random(f"{cfg.seed}-{step}-{recs[0]['id']}"))
        ext = cfg.external and all("rejected" in r for r in recs)
        items = [item(r, [enc(r["chosen"])] + [enc(r["rejected"])] * ext + [enc(t)]) for r, (t, _) in zip(recs, res)]
        for _, meta in res:
            add("bdhs/attempts", meta["attempts"])
            add("bdhs/similarity", meta["similarity"] or 0.0)
    else:  # online-dpo, mixed-dpo
        offline = [cfg.algo == "mixed-dpo" and random.Random(f"mix-{cfg.seed}-{step}-{r['id']}").random() < cfg.mix_p
                   for r in recs]
        need = [r for r, o in zip(recs, offline) if not o]
        items = [item(r, [enc(r["chosen"]), enc(r["rejected"])]) for r, o in zip(recs, offline) if o]
        add("online/offline_share", sum(offline), len(recs))
        if need:  # k samples; the judge picks between two, a scorer pairs the best with the worst
            ids, texts = sample(pm, need, cfg.samples, cfg, gen)
            t0 = time.perf_counter()
            if judge is not None:
                pick = [None if p is None else (p, 1 - p) for p in judge(need, texts)]
                add("online/unparsed", sum(p is None for p in pick), len(need))
            else:  # a prompt with an unreadable rating is dropped
                sc = [None if None in s else s for s in scorer(need, texts)]
                pick = [None if not s or max(s) == min(s) else (s.index(max(s)), s.index(min(s)))
                        for s in sc]
                add("online/score", sum(sum(s) for s in sc if s), cfg.samples * sum(map(bool, sc)))
                add("online/unparsed", sum(s is None for s in sc), len(need))
            add("online/annotator_s", time.perf_counter() - t0, 1 / cfg.grad_accum)
            add("online/ties_or_dropped", sum(p is None for p in pick), len(need))
            add("response_length", sum(len(x) for xs in ids for x in xs), cfg.samples * len(need))
            items += [item(r, [x[p[0]], x[p[1]]]) for r, x, p in zip(need, ids, pick) if p is not None]
    w = [1.0] * len(items)
    if not items:  # every pair dropped: a stand-in keeps the collectives in step, with weight 0
        items, w = [item(recs[0], [enc(recs[0]["chosen"])] * 2)], [0.0]
    roll |= dict(batch=off.to(data.collate_pairs(vlm, items), vlm.lm_head.weight.device), w=torch.tensor(w), stats=st)
    with torch.no_grad():
        with vlm.lora_disabled():
            roll["ref"] = pm(**roll["batch"], tokens=True)[0]  # (B, K, L) reference log-probs
        if cfg.algo in ("ppo", "rloo"):
            old, values = pm(**roll["batch"], tokens=True)
            mask = roll["batch"]["targets"] != -100
            kl = ((old - roll["ref"]) * mask).sum(-1)  # (B, K) per-sequence KL estimate on the samples
            add("objective/kl", kl.sum().item(), kl.numel())
            add("objective/rlhf_reward", (roll["scores"].to(kl) - cfg.kl_coef * kl).sum().item(), kl.numel())
            if cfg.algo == "rloo":
                roll["adv"] = losses.rloo_advantages(roll["scores"].to(kl) - cfg.kl_coef * kl)
            else:  # per-token rewards: -β·KL_t, plus the normalised score at the last token; then GAE
                old, values, mask, ref = old[:, 0], values[:, 0], mask[:, 0], roll["ref"][:, 0]
                rew = -cfg.kl_coef * (old - ref) * mask
                rew[torch.arange(len(rew)), mask.sum(-1) - 1] += roll["scores"][:, 0].to(rew)
                adv, ret = losses.gae(rew, values * mask, mask, 1.0, cfg.gae_lambda)
                roll |= dict(old=old, values=values, adv=losses.whiten(adv, mask), returns=ret, mask=mask)
    return roll


def objective(cfg: Config, model, roll):
    """Per-item losses (B,) of one rollout and their metric sums."""
    b, st = roll["batch"], {}
    w = roll["w"].to(b["input_ids"].device)
    n_items = w.sum().item()
    if cfg.algo == "ppo":
        lp, values = model(**b, tokens=True)
        loss, clipped = losses.ppo_loss(lp[:, 0], roll["old"], roll["adv"], values[:, 0], roll["values"],
                                        roll["returns"], roll["mask"], cfg.clip, cfg.clip, cfg.vf_coef)
        st["policy/clipfrac"] = [clipped.sum().item(), n_items]
        st["val/values"] = [losses.masked_mean(values[:, 0].detach(), roll["mask"], -1).sum().item(), n_items]
    elif cfg.algo == "rloo":
        lp, _, _ = model(**b)
        loss = losses.rloo_loss(lp, roll["adv"]).mean(1)
    else:
        lp, n, _ = model(**b)
        loss, c, rj = off.pair_loss(cfg, lp, n, roll["ref"].sum(-1))
        d = lp.detach()
        for k, v in {"rewards/chosen": c, "rewards/rejected": rj, "rewards/margins": c - rj,
                     "rewards/accuracies": (c > rj).float(), "logps/chosen": d[:, 0], "logps/rejected": d[:, 1]}.items():
            st[k] = [(v * w).sum().item(), n_items]
    st["loss"] = [(loss.detach() * w).sum().item(), n_items]
    return loss, st


@torch.no_grad()
def reward_norm(cfg: Config, pm, recs, scorer, rank, W, print0):
    """Mean and std of the annotator's scores on samples of the starting policy (paper §2.3: computed before
    training), kept in out_dir so that a resumed run uses the same."""
    path = os.path.join(cfg.out_dir, "reward_norm.json")
    if cfg.resume and os.path.exists(path):
        return tuple(json.load(open(path)))
    mine = recs[:cfg.norm_prompts][rank::W]
    s = torch.zeros(3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(cfg.seed + 7919 * rank)
    for i in tqdm(range(0, len(mine), cfg.batch_size // W), desc="reward statistics", disable=rank != 0):
        chunk = mine[i:i + cfg.batch_size // W]
        got = scorer(chunk, sample(pm, chunk, max(cfg.samples, 2), cfg, gen)[1])
        # unreadable ratings are left out
        x = torch.tensor([v for s in got for v in s if v is not None], dtype=torch.float64)
        s += torch.stack([x.sum(), (x ** 2).sum(), torch.tensor(float(x.numel()))])
    if W > 1:
        dist.all_reduce(s)
    mean = (s[0] / s[2]).item()
    std = max(math.sqrt(max((s[1] / s[2]).item() - mean ** 2, 0.0)), 1e-6)
    print0(f"reward normalisation from {int(s[2])} samples of the starting policy: mean {mean:.4f}, std {std:.4f}")
    if rank == 0:
        with open(path + ".tmp", "w") as f:
            json.dump([mean, std], f)
        os.replace(path + ".tmp", path)
    return mean, std

# -----------------------------------------------------------------------------
# Training


def main(argv=None):
    cfg = config_from_argv(Config, argv, __doc__)
    if cfg.algo not in ALGOS:
        raise ValueError(f"--algo {cfg.algo!r}: expected one of {', '.join(ALGOS)}")
    if cfg.loss not in losses.LOSSES:
        raise ValueError(f"--loss {cfg.loss!r}: the online DPO algorithms take {', '.join(losses.LOSSES)}")
    if cfg.ref != "lora_off":
        raise ValueError("--ref: online samples have no reference log-probs to cache; the reference is lora_off")
    cfg.samples = cfg.samples or SAMPLES.get(cfg.algo, 1)
    if cfg.samples < 2 and cfg.algo in ("rloo", "online-dpo", "mixed-dpo"):
        raise ValueError(f"--algo {cfg.algo} needs --samples >= 2")
    if cfg.samples != 2 and cfg.annotator.startswith("judge:"):
        raise ValueError("--annotator judge compares two responses: --samples must be 2")
    ddp, rank, W, device, print0 = off.setup(cfg)
    off.check_out_dir(cfg, rank)
    torch.manual_seed(cfg.seed)
    vlm, pm = off.build_model(cfg, device, print0)
    if cfg.algo == "ppo":  # the value head reads the policy's hidden states; it starts at 0
        pm.value = nn.Linear(vlm.cfg.text.hidden_size, 1).to(device)
        nn.init.zeros_(pm.value.weight), nn.init.zeros_(pm.value.bias)
    annotate = make_annotator(cfg, device)
    embedder = bdhs.SentenceEmbedder.from_pretrained(cfg.embedder) if cfg.algo == "online-bdhs" else None
    recs = data.world_pairs(off.world_of(cfg), cfg.pairs) if cfg.data == "world" \
        else data.load_pairs(cfg.data, cfg.image_root, need_rejected=cfg.algo == "mixed-dpo")
    if len(recs) < cfg.batch_size:
        raise ValueError(f"--data {cfg.data}: {len(recs)} prompts, fewer than one batch of {cfg.batch_size}")
    model = off.shard(pm) if cfg.fsdp and ddp else nn.parallel.DistributedDataParallel(pm) if ddp else pm
    if cfg.fsdp and ddp:  # FSDP2 initialises on the root's first forward, which must come before any sampling
        with torch.no_grad():
            r = recs[0]
            pm(**off.to(data.collate_pairs(vlm, [dict(image=r["image"], prompt=bdhs.prompt_ids(vlm, r),
                                                      responses=[[0]])]), device))
    opt = off.make_optimizer(cfg, pm, print0)
    B = cfg.batch_size // (W * cfg.grad_accum)
    steps = cfg.steps or max(1, int(cfg.epochs * len(recs) // cfg.batch_size))
    amp = torch.autocast(device.split(":")[0], dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32")
    start = off.restore(cfg, pm, opt) if cfg.resume else 0
    if off.finished(cfg, start, steps, print0):
        del model  # DDP's reducer goes before its process group
        return off.finish() if ddp else None
    norm = (0.0, 1.0)
    if cfg.algo in ("ppo", "rloo"):
        with amp:
            norm = reward_norm(cfg, pm, recs, annotate[0], rank, W, print0)
    log = off.open_metrics(cfg, start) if rank == 0 else None
    print0(f"{cfg.algo}: {steps} steps of {cfg.batch_size} prompts x {cfg.samples if cfg.algo != 'online-bdhs' else 1}"
           f" samples ({B} per micro-step per rank, {cfg.grad_accum} micro-steps, {W} ranks)"
           + (f", resuming at step {start}" if start else ""))
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=rank != 0, desc=cfg.algo)
    t0 = time.time()
    for step in bar:
        off.set_lr(cfg, opt, step, steps)
        rolls = []
        for micro in range(cfg.grad_accum):  # sample everything first: the optimizer steps come after
            key = f"{cfg.seed}-{step}-{micro}-{rank}".encode()
            gen = torch.Generator().manual_seed(int(hashlib.sha256(key).hexdigest()[:15], 16))
            with amp:
                rolls.append(rollout(cfg, pm, [recs[i] for i in off.batch_rows(len(recs), cfg, step, micro, B, rank, W)],
                                     annotate, gen, step, norm, embedder))
        total = torch.tensor(sum(r["w"].sum() for r in rolls).item())
        if ddp:
            dist.all_reduce(total)
        sums = {}
        for epoch in range(cfg.ppo_epochs if cfg.algo == "ppo" else 1):
            for micro, roll in enumerate(rolls):
                with off.grad_sync(model, micro == cfg.grad_accum - 1), amp:
                    loss, st = objective(cfg, model, roll)
                    # DDP averages gradients over ranks: x W / (global weight) gives the mean over every item
                    ((loss * roll["w"].to(loss)).sum() * W / total.clamp(min=1)).backward()
                for k, v in (st | (roll["stats"] if epoch == 0 else {})).items():
                    sums[k] = [a + b for a, b in zip(sums.get(k, [0, 0]), v)]
            grad_norm = off.optimizer_step(cfg, pm, opt)
        keys = sorted(sums)
        flat = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        if ddp:
            dist.all_reduce(flat)
        if rank == 0 and (step % cfg.log_every == 0 or step == steps - 1):
            rec = {k: round(s / max(n, 1), 5) for k, (s, n) in zip(keys, flat.tolist())}
            rec |= dict(step=step, lr=opt.param_groups[0]["lr"], grad_norm=round(grad_norm, 4),
                        elapsed=round(time.time() - t0, 1), epoch=round((step + 1) * cfg.batch_size / len(recs), 3))
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix({k.split("/")[-1]: rec[k] for k in ("loss", "objective/scores", "online/score",
                                                                   "rewards/accuracies") if k in rec})
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step == steps - 1:
            off.save(cfg, pm, opt, step, rank)
    if rank == 0:
        log.close()
        print0(f"saved {cfg.out_dir}/checkpoint")
        if cfg.data == "world" and cfg.eval_n:
            off.world_results(cfg, print0)
    if ddp:
        del model  # DDP's reducer goes before its process group
        off.finish()


if __name__ == "__main__":
    main()
