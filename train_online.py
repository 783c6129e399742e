"""train_online.py: online alignment of a LLaVA-style model (paper §2.3, §3.1, §3.3, §3.4, §6.4).

Every step samples responses of the current policy for a batch of prompts, judged, and trains on them:

    online-dpo   2 samples at temperature 1, the annotator's pick chosen (§3.3); k > 2: best vs worst
    mixed-dpo    per prompt, the offline pair with probability --mix_p, else an online one (Eq. 4)
    online-bdhs  the ground truth chosen, a BDHS response rejected (§6.4); --external: Avg-DPO (Eq. 5)
    ppo          1 sample; its reward at the last token, a per-token KL penalty, a value head, GAE (§3.1)
    rloo         4 samples; rewards normalised before training, R = r̂ - β·KL, leave-one-out (§3.1)

Annotators (--annotator): `rule`, the world's verifier (world data only); `rm:PATH`, a reward model from
`train_offline.py --loss rm`; `judge:PATH`, a VLM asked the paper's pairwise question (Table 14);
`api:MODEL`, a VLM behind an OpenAI-compatible endpoint ($JUDGE_BASE_URL, $JUDGE_API_KEY), asked
for a pair or a 1-10 rating per sample (PPO, RLOO, best-of-k). Unreadable answers are dropped;
5 steps in a row with nothing to train on (all ties or unreadable) stop the run with an error.

The reference is the policy with its LoRA adapters off: only the adapters (and PPO's value head)
train. The machinery (setup, build_policy, PairModel, Checkpoint, Metrics) is train.py's. `--loss`
picks the DPO algorithms' preference loss among losses.LOSSES.

    python train_online.py --algo online-dpo     # the rule annotator on the world's align prompts
    python train_online.py --algo online-bdhs --external true
    python train_offline.py --loss rm --out_dir runs/rm && \\
        python train_online.py --algo ppo --annotator rm:runs/rm/checkpoint
    torchrun --nproc_per_node 2 train_online.py --algo rloo
    JUDGE_BASE_URL=http://host:8000/v1 torchrun --nproc_per_node 8 train_online.py \\
        --annotator api:llava-v1.6-34b-hf --model llava-hf/llava-v1.6-vicuna-7b-hf \\
        --data povid:/data/povid --dtype bfloat16 --fsdp true
"""

import hashlib
import json
import math
import os
import pathlib
import random
import re
import time
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
from embedder import SentenceEmbedder
from model import TEMPLATES, VLM, left_pad
from train import (
    Checkpoint,
    Metrics,
    PairModel,
    accumulate,
    autocast,
    bar_postfix,
    batch_rows,
    build_policy,
    counts,
    loss_name,
    optimizer_step,
    pair_stats,
    resumable_config,
    setup,
    summary,
    to,
    unsharded,
)

SAMPLES = {"online-dpo": 2, "mixed-dpo": 2, "online-bdhs": 1, "ppo": 1, "rloo": 4}
CLIP, VF_COEF, GAE_LAMBDA = 0.2, 0.1, 0.95  # PPO: ratio/value clipping, value-loss weight, GAE's λ
NORM_PROMPTS, JUDGE_TOKENS = 256, 64  # prompts for RL's reward statistics; a judge's reply tokens
STALL = 5  # steps in a row with every pair a tie or unparsed (no training signal) that stop a run


# A Config is a table, a flag a row, its help the comment beside it: kept as written
# fmt: off
@dataclass
class Config:
    model: str = world.BASE_MODEL  # an HF-layout folder or a hub id
    algo: Literal[tuple(SAMPLES)] = "online-dpo"  # the objective (the docstring above says each)
    template: str = ""            # chat template: vicuna | llava | mistral | chatml; "": the model's own
    annotator: str = "rule"       # rule | rm:PATH | judge:PATH | api:MODEL
    annotator_threads: int = 16   # api: requests in flight per rank
    data: str = "world"           # world (its align split), a native .jsonl,
                                  # or povid|vlfeedback|rlhfv|llava-rlhf[:PATH]
    image_root: str = ""          # a release's images (COCO for POVID...); default: images/ by it
    out_dir: str = "runs/online"  # the checkpoint, training state and metrics
    world_seed: int = 0           # the world's scenes: 0-2 dev seeds, 3-5 test seeds (study.py)
    world_half: Literal["", "a", "b"] = ""  # the world's prompts about half of the usual pairs only
    pairs: int = 2000             # world prompts
    samples: int = 0              # per prompt; 0: 2 for DPO (more: best vs worst), 1 PPO, 4 RLOO
    temperature: float = 1.0      # of the policy's samples; 0: greedy
    max_new_tokens: int = 96
    loss: Literal[tuple(losses.LOSSES)] = "dpo"  # the DPO algorithms' preference loss (losses.py)
    beta: float = 0.5             # DPO's β (the world's, dev seed 0)
    mix_p: float = 0.5            # Mixed-DPO: the probability of the offline pair (Eq. 4)
    external: bool = False        # Online-BDHS: Avg-DPO with the source's rejected too (Eq. 5)
    kl_coef: float = 0.4          # PPO / RLOO: β of the KL penalty (the paper's RLOO value)
    ppo_epochs: int = 4           # PPO: optimisation passes over each batch of samples
    steps: int = 0                # optimizer steps; 0: `epochs` passes over the prompts
    epochs: float = 1.0
    batch_size: int = 32          # prompts, global; a rank samples its micro-batch's prompts at once: at 7B in
                                  # bf16 on 8 GPUs, 4 prompts' shared caches (<= 3,184 tokens each, 0.5 MiB a
                                  # token: 6.2 GiB) + their samples' fit 80 GB beside the model; one GPU: --grad_accum
    grad_accum: int = 1           # micro-steps per optimizer step
    lr: float = 1e-3              # the LoRA adapters' (and PPO's value head's)
    lora_r: int = 16              # LoRA rank on every LLM linear (the reference: the adapters off)
    lora_alpha: float = 32.0      # LoRA's scale is lora_alpha / lora_r
    warmup: int = 10              # linear warm-up steps, then cosine decay to 0
    dtype: Literal[cli.DTYPES] = "float32"  # autocast dtype of the forward; weights and log-probs stay fp32
    fsdp: bool = False            # shard parameters, gradients and optimizer state (FSDP2); else DDP
    save_every: int = 50          # steps between saves of the training state; the last step saves it and the
                                  # merged checkpoint
    resume: bool = False          # continue from out_dir's training state, with its settings
    overwrite: bool = False       # a fresh run may replace the run already in out_dir
    eval_n: int = 500             # world data: scenes of the world report before and after; 0: none
    seed: int = 0                 # LoRA's initialisation, the order of the prompts, sampling
    BOUNDS = dict(annotator_threads=">= 1", pairs=">= 1", samples=">= 0", temperature=">= 0", max_new_tokens=">= 1",
                  beta="> 0", mix_p=">= 0, <= 1", kl_coef=">= 0", ppo_epochs=">= 1", steps=">= 0", epochs="> 0",
                  batch_size=">= 1", grad_accum=">= 1", lr=">= 0", lora_r=">= 1", lora_alpha="> 0", warmup=">= 0",
                  save_every=">= 0", eval_n=">= 0")  # checked at parse
# fmt: on


def main(argv=None):
    cfg, state = resumable_config(Config, argv, __doc__)
    check(cfg)
    cache_dir = hub.cache_home()  # the base's world report, shared by runs
    ranks = setup(cfg, cache_dir)
    torch.manual_seed(cfg.seed)
    # the reference is the policy with its adapters off: only the adapters (and a value head) train
    pm, model, opt = build_policy(cfg, ranks, head="value" if cfg.algo == "ppo" else None)
    annotate = annotator(cfg, ranks.device)
    embedder = SentenceEmbedder.from_pretrained() if cfg.algo == "online-bdhs" else None
    recs = load_prompts(cfg)
    if ranks.W > 1 and cfg.fsdp:  # FSDP2 initialises on the root's first forward: before sampling
        first_forward(pm, recs[0], ranks.device)
    steps = cfg.steps or max(1, int(cfg.epochs * len(recs) // cfg.batch_size))
    ckpt = Checkpoint(cfg, pm, opt, ranks)
    start = ckpt.resume(steps, state)
    if start is None:
        del model  # DDP's reducer goes before its process group
        return ranks.end()
    amp = autocast(cfg, ranks.device)
    rl = cfg.algo in ("ppo", "rloo")
    norm = reward_norm(cfg, pm, recs, annotate[0], ranks, amp) if rl else (0.0, 1.0)
    log = Metrics(cfg, start, ranks)
    announce(cfg, recs, ranks, steps, start)
    bar = tqdm(
        range(start, steps), initial=start, total=steps, disable=ranks.rank != 0, desc=cfg.algo
    )
    stalled = 0  # steps in a row without a training signal
    for step in bar:
        rolls = rollouts(cfg, pm, recs, annotate, embedder, norm, ranks, step, amp)
        weight, lr, grad_norm = train_on(cfg, pm, model, opt, rolls, ranks, log, step, steps, amp)
        rec = log.write(
            step, lr=lr, grad_norm=grad_norm, epoch=(step + 1) * cfg.batch_size / len(recs)
        )
        # the step's metrics, already on the host
        bar.set_postfix(bar_postfix(rec) | drop_shares(rec))
        stalled = stalled + 1 if no_signal(cfg, rec, weight) else 0
        if stalled == STALL:  # rec and weight are summed over ranks: every rank stops here
            bar.close()
            log.close()
            raise stall_error(cfg, rec, step)
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step == steps - 1:
            ckpt.save(step, final=step == steps - 1)
    log.close()
    ranks.print(summary(steps, rec, cfg.out_dir))
    if ranks.rank == 0 and cfg.data == "world" and cfg.eval_n:
        checkpoint = os.path.join(cfg.out_dir, "checkpoint")
        ev.before_after(
            cfg.model,
            checkpoint,
            cfg.world_seed,
            cfg.world_half,
            cfg.eval_n,
            cfg.out_dir,
            cache_dir,
        )
    del model
    ranks.end()


def load_prompts(cfg: Config):
    """The records whose prompts the policy answers: the world's, or a file's (with their rejected
    where the algorithm trains on them too)."""
    if cfg.data == "world":
        recs = world.world_pairs(world.World(cfg.world_seed, half=cfg.world_half), cfg.pairs)
    else:
        # Mixed-DPO's offline pairs and Online-BDHS's --external (Avg-DPO) need every record's rejected
        need = cfg.algo == "mixed-dpo" or (cfg.algo == "online-bdhs" and cfg.external)
        recs = data.load_pairs(cfg.data, cfg.image_root, need_rejected=need)
    if len(recs) < cfg.batch_size:
        raise cli.UserError(
            f"--data {cfg.data}: {len(recs)} prompts, fewer than one batch of {cfg.batch_size}"
        )
    return recs


@torch.no_grad()
def first_forward(pm, rec, device):
    """One forward of a one-token response to rec's prompt: FSDP2's lazy initialisation, done."""
    pm(**to(data.collate_pairs(pm.vlm, [packed(pm.vlm, rec, [[0]])]), device))


def announce(cfg: Config, recs, ranks, steps, start):
    """The run's objective, and its steps, batch and ranks."""
    ranks.print(
        f"objective: {objective_line(cfg, recs)}; no pairs held out (online: each step samples anew)"
    )
    B = cfg.batch_size // (ranks.W * cfg.grad_accum)
    ranks.print(
        f"{cfg.algo}: {steps} steps of {cfg.batch_size} prompts x {cfg.samples} samples ({B} per "
        f"micro-step per rank, {cfg.grad_accum} micro-steps, {ranks.W} ranks)"
        + (f", resuming at step {start}" if start else "")
    )


def rollouts(cfg: Config, pm, recs, annotate, embedder, norm, ranks, step, amp):
    """A step's rollouts, one per micro-step: every sample drawn and judged before any training. Each
    draws from its own generator, seeded by the seed, step, micro-step and rank."""
    B = cfg.batch_size // (ranks.W * cfg.grad_accum)  # prompts per micro-step and rank
    rolls = []
    for micro in range(cfg.grad_accum):
        key = f"{cfg.seed}-{step}-{micro}-{ranks.rank}".encode()
        gen = torch.Generator().manual_seed(int(hashlib.sha256(key).hexdigest()[:15], 16))
        idx = batch_rows(len(recs), cfg, step, micro, B, ranks)
        with amp:
            rolls.append(
                rollout(cfg, pm, [recs[i] for i in idx], annotate, gen, step, norm, embedder)
            )
    return rolls


def train_on(cfg: Config, pm, model, opt, rolls, ranks, log, step, steps, amp):
    """A step's training on its rollouts (PPO: --ppo_epochs passes, an optimizer step each), every
    item's loss weighted by w over the global weight. -> (the global weight, lr, grad norm)."""
    items = sum(r["w"].sum().item() for r in rolls)
    weight = ranks.gather_sums({"w": [items, 0]})["w"][0]  # items, global
    for epoch in range(cfg.ppo_epochs if cfg.algo == "ppo" else 1):
        for micro, roll in enumerate(rolls):
            with ranks.sync_grads(model, micro == cfg.grad_accum - 1), amp:
                loss, stats = objective(cfg, model, roll)
                # DDP averages over ranks: x W / (the global weight) gives the mean over all items
                ((loss * roll["w"].to(loss)).sum() * ranks.W / max(weight, 1)).backward()
            log.add(stats | (roll["stats"] if epoch == 0 else {}))
        lr, grad_norm = optimizer_step(cfg, pm, opt, step, steps)
    return weight, lr, grad_norm


def stall_error(cfg: Config, rec, step):
    """The error that stops a run STALL steps in a row without a training signal."""
    shares = drop_shares(rec)
    if cfg.algo == "online-bdhs":
        return cli.UserError(
            f"--algo online-bdhs: no training signal for {STALL} steps in a row (to step {step}): "
            "every BDHS response gave back the ground truth, a tie, so the loss and its gradient are 0"
        )
    return cli.UserError(
        f"--annotator {cfg.annotator}: no training signal for {STALL} steps in a row (to step {step}): "
        f"every pair was a tie or an unparsed reply (ties {shares.get('ties', '-')}, "
        f"unparsed {shares.get('unparsed', '-')}), so the loss and its gradient are 0. "
        f"Check that the annotator fits --data {cfg.data} and read its replies"
        + (f" in {cfg.out_dir}/annotator.jsonl" if cfg.annotator.startswith("api:") else "")
    )


def check(cfg: Config):
    """Flags that do not go together, named before any compute."""
    if cfg.data != "world":
        data.check_spec(cfg.data)
    cfg.samples = cfg.samples or SAMPLES[cfg.algo]
    if cfg.samples < 2 and cfg.algo in ("rloo", "online-dpo", "mixed-dpo"):
        raise cli.UserError(f"--algo {cfg.algo} needs --samples >= 2")
    if cfg.loss != "dpo" and cfg.algo in ("ppo", "rloo"):
        raise cli.UserError(
            f"--loss {cfg.loss}: --algo {cfg.algo} trains on rewards, not on a preference loss"
        )
    if cfg.samples != 2 and cfg.annotator.startswith("judge:"):
        raise cli.UserError("--annotator judge compares two responses: --samples must be 2")
    # BDHS asks no annotator
    if cfg.annotator == "rule" and cfg.data != "world" and cfg.algo != "online-bdhs":
        raise cli.UserError(
            f"--annotator rule (the default) is the world's verifier: it scores the world's scenes "
            f"only, not --data {cfg.data}; pass --annotator rm:PATH, judge:PATH or api:MODEL"
        )


def objective_line(cfg: Config, recs):
    """What a run trains, in words: the algorithm, its loss and settings, samples and annotator."""
    dpo = f"{loss_name(cfg.loss)}, β {cfg.beta}"
    per = f"{cfg.samples} sample{'s' * (cfg.samples != 1)} per prompt"
    by = f"annotator: {cfg.annotator}"
    if cfg.algo == "online-dpo":
        pick = " (best vs worst)" if cfg.samples > 2 else ""
        return f"Online-DPO ({dpo}), {per}{pick}, {by}"
    if cfg.algo == "mixed-dpo":
        return f"Mixed-DPO ({dpo}; the offline pair with p {cfg.mix_p}), {per}, {by}"
    if cfg.algo == "online-bdhs":  # main() loaded every record with its rejected under --external
        ext = cfg.external and all("rejected" in r for r in recs)
        rejected = "2 rejected (Avg-DPO: the data's and BDHS's)" if ext else "1 rejected (BDHS's)"
        return f"Online-BDHS ({dpo}), the ground truth chosen, {rejected}"
    if cfg.algo == "ppo":
        ppo = f"clip {CLIP}, KL β {cfg.kl_coef} per token, GAE λ {GAE_LAMBDA}, {cfg.ppo_epochs} epochs"
        return f"PPO ({ppo}), {per}, {by}"
    return f"RLOO (KL β {cfg.kl_coef}), {per}, {by}"


def drop_shares(rec):
    """A step's metrics -> the progress bar's shares of ties and unparsed replies, e.g. {"ties": "25%"}."""
    out = {}
    if "online/ties_or_dropped" in rec:  # a pair with no pick: a tie, or a reply unparsed
        out["ties"] = f"{rec['online/ties_or_dropped'] - rec.get('online/unparsed', 0.0):.0%}"
    if "online/unparsed" in rec:
        out["unparsed"] = f"{rec['online/unparsed']:.0%}"
    return out


def no_signal(cfg: Config, rec, weight):
    """True when a step trained on nothing: every pair dropped (weight 0: only stand-ins), or every RL
    score unreadable (each then gets the mean: no advantage from the annotator)."""
    if cfg.algo in ("ppo", "rloo"):
        return rec.get("online/unparsed", 0.0) == 1.0
    return weight == 0


# -----------------------------------------------------------------------------
# Annotators: a score per response (rule, reward model, endpoint) or a pairwise choice (judge, endpoint)


class RewardModel:
    """A Bradley–Terry reward model from `train_offline.py --loss rm`: a scalar head on the last token."""

    def __init__(self, path, device):
        vlm = VLM.from_pretrained(path, device=device)
        if "score.weight" not in vlm.extra:
            raise cli.UserError(
                f"{path}: no score.weight (reward head); train one with train_offline.py --loss rm"
            )
        self.pm = PairModel(vlm, head="reward").to(device).eval()
        self.pm.score.weight.data.copy_(vlm.extra["score.weight"])

    @torch.no_grad()
    def __call__(self, recs, texts):
        vlm = self.pm.vlm
        items = [packed(vlm, r, [vlm.encode_reply(t) for t in ts]) for r, ts in zip(recs, texts)]
        return self.pm(**to(data.collate_pairs(vlm, items), vlm.lm_head.weight.device))[1].tolist()


# Paper Table 14's annotator prompt, in our words: less hallucination, grounded help, which and why.
JUDGE = (
    "Here are a question about the image and two responses to it, Response 1 and Response 2. Decide which "
    "response is better. The better response hallucinates less: every object, attribute, colour and relation "
    "it states is in the image, and it avoids ambiguous details. It also gives more helpful information that is "
    "grounded in the image; for a practical question, a concise and helpful answer beats irrelevant remarks. "
    "Say which response is better, then explain why.\n\nQuestion: {question}\n\nResponse 1: {r1}\n\n"
    "Response 2: {r2}"
)
# A 1-10 rating of one response, in our words; the rating first, so that a few reply tokens hold it.
RATE = (
    "Rate the response to this question about the image from 1 (worst) to 10 (best). A good response "
    "hallucinates nothing: every object, attribute, colour and relation it states is in the image, and it is "
    'helpful and grounded in the image. First write "Rating: N" on its own line, then explain briefly.\n\n'
    "Question: {question}\n\nResponse: {r}"
)
_NAMED = re.compile(r"response\s*#?\s*([12])\b")
_VERDICTS = [
    re.compile(
        r"response\s*#?\s*([12])\s+(?:is|was|seems|appears)\s+(?:\w+\s+){0,2}?"
        r"(?:better|preferred|superior|more accurate|the best)"
    ),
    re.compile(
        r"(?:better|preferred|prefer|choose|winner)(?: one)?(?: response)?(?: is| would be|:)?\s+"
        r"(?:the\s+)?response\s*#?\s*([12])\b"
    ),
]


def parse_judgment(text):
    """The judge's text -> 0 (Response 1), 1 (Response 2) or None. A verdict phrase decides (unless
    negated; conflicting ones: None); else naming only one response, with no hedge, picks it."""
    t = text.lower()
    picks = {
        m.group(1)
        for rx in _VERDICTS
        for m in rx.finditer(t)
        if not re.search(r"\bnot\b|n't", m.group(0))
    }
    if picks:
        return int(picks.pop()) - 1 if len(picks) == 1 else None
    named = set(_NAMED.findall(t))
    hedged = re.search(r"\b(?:not|neither|both|equal|equally|tie)\b|n't", t)
    return int(named.pop()) - 1 if len(named) == 1 and not hedged else None


def parse_rating(text):
    """The N of "Rating: N" (1 to 10), or None when there is none or several differ."""
    found = set(re.findall(r"rating:\s*(10|[1-9])\b", text.lower()))
    return float(found.pop()) if len(found) == 1 else None


def question(rec):
    return rec["conversation"][-1]["content"].replace("<image>", "").strip()


class Judge:
    """Any VLM in this process asked the pairwise question with the image; greedy."""

    def __init__(self, path, device):
        self.vlm = VLM.from_pretrained(path, device=device).eval()

    @torch.no_grad()
    def __call__(self, recs, pairs):
        qs = [JUDGE.format(question=question(r), r1=a, r2=b) for r, (a, b) in zip(recs, pairs)]
        batch = self.vlm.prepare(qs, [data.open_image(r["image"]) for r in recs])
        out = self.vlm.generate(**batch, max_new_tokens=JUDGE_TOKENS, temperature=0.0)
        return [parse_judgment(self.vlm.tokenizer.decode(o)) for o in out]


class Endpoint:
    """An OpenAI-compatible endpoint ($JUDGE_BASE_URL; the key only from $JUDGE_API_KEY, not saved):
    a request per pair (JUDGE) or response (RATE), through benchmarks.JudgeClient's retries and cache."""

    def __init__(self, model, cache, threads):
        from concurrent.futures import ThreadPoolExecutor

        from benchmarks import JudgeClient, image_part  # the LLM-judge client

        self.client = JudgeClient(cache, model=model)
        self.pool, self.image_part = ThreadPoolExecutor(threads), image_part

    def ask(self, recs, texts):
        """texts[i] with recs[i]'s image -> the replies, in order; a repeated request goes once."""

        def one(key):
            content = [{"type": "text", "text": key[1]}, self.image_part(jobs[key]["image"])]
            return self.client([{"role": "user", "content": content}], JUDGE_TOKENS, 0.0)

        jobs = {(id(r), t): r for r, t in zip(recs, texts)}
        got = dict(zip(jobs, self.pool.map(one, jobs)))
        return [got[id(r), t] for r, t in zip(recs, texts)]

    def judge(self, recs, pairs):
        qs = [JUDGE.format(question=question(r), r1=a, r2=b) for r, (a, b) in zip(recs, pairs)]
        return [parse_judgment(t) for t in self.ask(recs, qs)]

    def score(self, recs, texts):
        flat = [
            (r, RATE.format(question=question(r), r=t)) for r, ts in zip(recs, texts) for t in ts
        ]
        out = iter(map(parse_rating, self.ask(*zip(*flat))))
        return [[next(out) for _ in ts] for ts in texts]  # None where the rating is unreadable


def annotator(cfg: Config, device):
    """-> (scorer, judge): scorer(recs, texts per rec) -> scores per rec; judge(recs, pairs) -> 0/1/None."""
    kind, _, path = cfg.annotator.partition(":")
    if kind == "rule":
        return (
            lambda recs, texts: [[world.rule_score(t, r) for t in ts] for r, ts in zip(recs, texts)]
        ), None
    if kind in ("rm", "judge", "api") and not path:
        need = (
            "MODEL needs the served model's name"
            if kind == "api"
            else "PATH needs the checkpoint's path"
        )
        raise cli.UserError(f"--annotator {kind}:{need}")
    if kind == "api":
        if not os.environ.get("JUDGE_BASE_URL"):  # never a silent default host for training images
            raise cli.UserError(
                f"--annotator {cfg.annotator}: set JUDGE_BASE_URL to the endpoint serving {path} "
                "(and JUDGE_API_KEY if it needs a key)"
            )
        api = Endpoint(path, os.path.join(cfg.out_dir, "annotator.jsonl"), cfg.annotator_threads)
        # else ratings (RL, best-of-k)
        pairwise = cfg.samples == 2 and cfg.algo not in ("ppo", "rloo")
        return api.score, api.judge if pairwise else None
    if kind == "rm":
        return RewardModel(path, device), None
    if kind == "judge":
        if cfg.algo in ("ppo", "rloo"):
            raise cli.UserError(
                "--annotator judge gives pairwise choices, not rewards: PPO and RLOO need rule, "
                "rm:PATH or api:MODEL"
            )
        return None, Judge(path, device)
    raise cli.UserError(
        f"--annotator {cfg.annotator!r}: expected rule, rm:PATH, judge:PATH or api:MODEL"
    )


# -----------------------------------------------------------------------------
# Rollouts: the policy's samples, judged, packed with the reference's (and PPO's old) log-probs


@torch.no_grad()
def sample(pm, recs, n, cfg: Config, gen):
    """n responses per record: token ids (the template's end tokens after an ended one) and texts. The
    samples draw from `gen` where it is on the model's device, else from a device stream with its seed
    (one call per host generator: a second call would repeat the draws). Run under the step's autocast,
    the KV cache is in its dtype (model.compute_dtype)."""
    vlm = pm.vlm
    dev = vlm.lm_head.weight.device
    ids, am = left_pad([data.prompt_ids(vlm, r) for r in recs])
    pix = vlm.image_processor(data.open_image(r["image"]) for r in recs)
    with unsharded(pm):
        out = vlm.generate(
            ids.to(dev),
            am.to(dev),
            pix["pixel_values"].to(dev),
            pix["image_sizes"].to(dev) if "image_sizes" in pix else None,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            generator=M.device_generator(gen, dev),
            num_samples=n,
        )
    end = vlm.encode_prompt(
        TEMPLATES[vlm.template]["reply"].split("{}")[1], add_special_tokens=False
    )
    ids = [o + end * (len(o) < cfg.max_new_tokens) for o in out]
    texts = [vlm.tokenizer.decode(o).strip() for o in out]
    return [ids[i * n : (i + 1) * n] for i in range(len(recs))], [
        texts[i * n : (i + 1) * n] for i in range(len(recs))
    ]


def rollout(cfg: Config, pm, recs, annotate, gen, step, reward_norm=(0.0, 1.0), embedder=None):
    """A micro-batch's packed items, weights (0: a stand-in), the objective's tensors, metrics."""
    vlm, (scorer, judge) = pm.vlm, annotate
    st, roll = {}, {}
    if cfg.algo in ("ppo", "rloo"):
        items = scored_samples(cfg, pm, recs, scorer, gen, reward_norm, st, roll)
    elif cfg.algo == "online-bdhs":
        items = bdhs_items(cfg, pm, recs, embedder, gen, step, st)
    else:  # online-dpo, mixed-dpo
        items = judged_pairs(cfg, pm, recs, scorer, judge, gen, step, st)
    w = [1.0] * len(items)
    if not items:  # every pair dropped: a stand-in keeps the collectives in step, with weight 0
        items, w = [packed(vlm, recs[0], [vlm.encode_reply(recs[0]["chosen"])] * 2)], [0.0]
    roll |= dict(
        batch=to(data.collate_pairs(vlm, items), vlm.lm_head.weight.device),
        w=torch.tensor(w),
        stats=st,
    )
    with torch.no_grad():
        with M.lora_disabled(vlm):
            roll["ref"] = pm(**roll["batch"])[0]  # (B, K, L) the reference's per-token log-probs
        if cfg.algo in ("ppo", "rloo"):
            advantages(cfg, pm, roll, st)
    return roll


def packed(vlm, r, resps):
    """A packed item of collate_pairs: record r's image and prompt, and the responses' token ids."""
    return dict(id=r["id"], image=r["image"], prompt=data.prompt_ids(vlm, r), responses=resps)


def add(st, k, s, n=1):
    """Adds a metric's sum and count to a rollout's metrics st."""
    accumulate(st, {k: [s, n]})


def scored_samples(cfg: Config, pm, recs, scorer, gen, reward_norm, st, roll):
    """PPO, RLOO: k samples per prompt, each scored; roll["scores"]: the normalised scores (P, k)."""
    ids, texts = sample(pm, recs, cfg.samples, cfg, gen)
    t0 = time.perf_counter()
    sc = scorer(recs, texts)
    add(st, "online/annotator_s", time.perf_counter() - t0, 1 / cfg.grad_accum)  # per step and rank
    add(st, "online/unparsed", sum(x is None for s in sc for x in s), cfg.samples * len(recs))
    # (P, k); an unreadable rating gets the mean, so about no advantage
    scores = torch.tensor([[reward_norm[0] if x is None else x for x in s] for s in sc])
    items = [packed(pm.vlm, r, x) for r, x in zip(recs, ids)]
    roll["scores"] = (scores - reward_norm[0]) / reward_norm[1]
    add(st, "objective/scores", scores.sum().item(), scores.numel())
    add(st, "response_length", sum(len(x) for xs in ids for x in xs), scores.numel())
    return items


def bdhs_items(cfg: Config, pm, recs, embedder, gen, step, st):
    """Online-BDHS: the ground truth chosen, the policy's BDHS response rejected (--external: after the
    record's own rejected, Avg-DPO); a response equal to the ground truth is dropped."""
    vlm, enc = pm.vlm, pm.vlm.encode_reply
    with unsharded(pm):
        res = bdhs.bdhs_batch(
            vlm,
            embedder,
            recs,
            bdhs.Config(seed=cfg.seed),
            gen,
            random.Random(f"{cfg.seed}-{step}-{recs[0]['id']}"),
        )
    ext = cfg.external and all("rejected" in r for r in recs)
    # a response that gives back the ground truth is a tie, dropped as offline pairs' ties are
    kept = [(r, t) for r, (t, _) in zip(recs, res) if t.strip() != r["chosen"].strip()]
    add(st, "online/ties_or_dropped", len(recs) - len(kept), len(recs))
    items = [
        packed(vlm, r, [enc(r["chosen"])] + [enc(r["rejected"])] * ext + [enc(t)]) for r, t in kept
    ]
    for _, meta in res:
        add(st, "bdhs/attempts", meta["attempts"])
        add(st, "bdhs/similarity", meta["similarity"] or 0.0)
    return items


def judged_pairs(cfg: Config, pm, recs, scorer, judge, gen, step, st):
    """Online-DPO: per prompt, k samples; the judge picks between two, a scorer pairs the best with the
    worst (a tie or an unreadable reply: dropped). Mixed-DPO: the offline pair with probability mix_p."""
    vlm, enc = pm.vlm, pm.vlm.encode_reply
    offline = [
        cfg.algo == "mixed-dpo"
        and random.Random(f"mix-{cfg.seed}-{step}-{r['id']}").random() < cfg.mix_p
        for r in recs
    ]
    need = [r for r, o in zip(recs, offline) if not o]
    items = [
        packed(vlm, r, [enc(r["chosen"]), enc(r["rejected"])]) for r, o in zip(recs, offline) if o
    ]
    add(st, "online/offline_share", sum(offline), len(recs))
    if not need:
        return items
    ids, texts = sample(pm, need, cfg.samples, cfg, gen)
    t0 = time.perf_counter()
    if judge is not None:
        pick = [None if p is None else (p, 1 - p) for p in judge(need, texts)]
        add(st, "online/unparsed", sum(p is None for p in pick), len(need))
    else:  # a prompt with an unreadable rating is dropped
        sc = [None if None in s else s for s in scorer(need, texts)]
        pick = [
            None if not s or max(s) == min(s) else (s.index(max(s)), s.index(min(s))) for s in sc
        ]
        add(st, "online/score", sum(sum(s) for s in sc if s), cfg.samples * sum(map(bool, sc)))
        add(st, "online/unparsed", sum(s is None for s in sc), len(need))
    add(st, "online/annotator_s", time.perf_counter() - t0, 1 / cfg.grad_accum)
    add(st, "online/ties_or_dropped", sum(p is None for p in pick), len(need))
    add(st, "response_length", sum(len(x) for xs in ids for x in xs), cfg.samples * len(need))
    return items + [
        packed(vlm, r, [x[p[0]], x[p[1]]]) for r, x, p in zip(need, ids, pick) if p is not None
    ]


def advantages(cfg: Config, pm, roll, st):
    """PPO, RLOO, after the reference's pass: the samples' KL to the reference and rewards; RLOO's
    leave-one-out advantages, or PPO's per-token rewards (-β·KL_t, the score at the last token), GAE
    and the old log-probs and values. Into roll."""
    old, values = pm(**roll["batch"])
    mask = roll["batch"]["targets"] != -100
    kl = ((old - roll["ref"]) * mask).sum(-1)  # (B, K) per-sequence KL estimates
    reward = roll["scores"].to(kl) - cfg.kl_coef * kl
    add(st, "objective/kl", kl.sum().item(), kl.numel())
    add(st, "objective/rlhf_reward", reward.sum().item(), kl.numel())
    if cfg.algo == "rloo":
        roll["adv"] = losses.rloo_advantages(reward)
        return
    old, values, mask, ref = old[:, 0], values[:, 0], mask[:, 0], roll["ref"][:, 0]
    rew = -cfg.kl_coef * (old - ref) * mask
    rew[torch.arange(len(rew)), mask.sum(-1) - 1] += roll["scores"][:, 0].to(rew)
    adv, ret = losses.gae(rew, values * mask, mask, 1.0, GAE_LAMBDA)
    roll |= dict(old=old, values=values, adv=losses.whiten(adv, mask), returns=ret, mask=mask)


def objective(cfg: Config, model, roll):
    """Per-item losses (B,) of one rollout and their metrics."""
    b, st = roll["batch"], {}
    w = roll["w"].to(b["input_ids"].device)
    n = w.sum().item()
    lp, values = model(**b)  # (B, K, L) per-token log-probs; PPO's values
    if cfg.algo == "ppo":
        loss, clipped = losses.ppo_loss(
            lp[:, 0],
            roll["old"],
            roll["adv"],
            values[:, 0],
            roll["values"],
            roll["returns"],
            roll["mask"],
            CLIP,
            CLIP,
            VF_COEF,
        )
        st["policy/clipfrac"] = [clipped.sum().item(), n]
        v = losses.masked_mean(values[:, 0].detach(), roll["mask"], -1).sum().item()
        st["val/values"] = [v, n]
    elif cfg.algo == "rloo":
        loss = losses.rloo_loss(lp.sum(-1), roll["adv"]).mean(1)
    else:
        ref = roll["ref"].sum(-1)
        loss, c, rj = losses.preference_loss(cfg.loss, lp.sum(-1), ref, counts(b), cfg.beta)
        st = pair_stats(loss, c, rj, lp, w)
    st["loss"] = [(loss.detach() * w).sum().item(), n]
    return loss, st


@torch.no_grad()
def reward_norm(cfg: Config, pm, recs, scorer, ranks, amp):
    """Mean and std of the annotator's scores on the starting policy's samples (§2.3), kept for resume."""
    path = os.path.join(cfg.out_dir, "reward_norm.json")
    if cfg.resume and os.path.exists(path):
        return tuple(json.loads(pathlib.Path(path).read_text()))
    mine, b = recs[:NORM_PROMPTS][ranks.rank :: ranks.W], cfg.batch_size // ranks.W
    # on the device: every batch's samples continue one stream
    gen, xs = torch.Generator(ranks.device).manual_seed(cfg.seed + 7919 * ranks.rank), []
    for i in tqdm(range(0, len(mine), b), desc="reward statistics", disable=ranks.rank != 0):
        with amp:
            got = scorer(
                mine[i : i + b], sample(pm, mine[i : i + b], max(cfg.samples, 2), cfg, gen)[1]
            )
        xs += [v for s in got for v in s if v is not None]  # unreadable ratings are left out
    s = ranks.gather_sums({"s": [sum(xs), len(xs)], "s2": [sum(x * x for x in xs), 0]})
    if not s["s"][1]:
        raise cli.UserError(
            f"--annotator {cfg.annotator}: no readable rating among the starting policy's samples, so "
            "the rewards cannot be normalised; check the annotator's replies"
        )
    mean = s["s"][0] / s["s"][1]
    std = max(math.sqrt(max(s["s2"][0] / s["s"][1] - mean**2, 0.0)), 1e-6)
    ranks.print(
        f"reward normalisation from {s['s'][1]} samples of the starting policy: mean {mean:.4f}, "
        f"std {std:.4f}"
    )
    if ranks.rank == 0:
        ev.atomic_json(path, [mean, std])
    return mean, std


if __name__ == "__main__":
    cli.run_main(main)
