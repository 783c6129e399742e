"""Online alignment: PPO / GAE / RLOO against hand-computed values, the annotators (rule verifier, judge parsing,
reward model), a 2-step run of every algorithm, FSDP2 sampling under torchrun, and kill + resume."""

import contextlib
import functools
import importlib
import json
import math
import os
import re
import sys
import threading
import time

import pytest
import torch

import benchmarks as bm
import data
import losses
import model as M
import train
import train_online as on
import world
from cli import UserError, config_from_argv
from model import VLM, format_chat

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_offline import kill_midway, run_metrics, same, torchrun  # noqa: E402
from tiny import build_llava_hf, random_image  # noqa: E402

SMALL = ["--pairs", "64", "--batch_size", "4", "--max_new_tokens", "24", "--eval_n", "0"]


@pytest.fixture(autouse=True)
def few_norm_prompts(monkeypatch):
    """RL's reward statistics from 8 prompts, not 256 (in this process; torchrun runs use the 64 of SMALL)."""
    monkeypatch.setattr(on, "NORM_PROMPTS", 8)


# -----------------------------------------------------------------------------
# Closed forms


def test_gae_by_hand():
    """γ = 1, λ = 0.5. Row 0: δ = [1 + 1 - .5, 0 + .5 - 1, 2 - .5] = [1.5, -.5, 1.5], A_2 = 1.5, A_1 = -.5 + .5 x 1.5
    = .25, A_0 = 1.5 + .5 x .25 = 1.625. Row 1 has one real token: A_0 = 3 - 1, and the padded value 9 is ignored."""
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, 7.0, 7.0]])
    values = torch.tensor([[0.5, 1.0, 0.5], [1.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    adv, ret = losses.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[1.625, 0.25, 1.5], [2.0, 0.0, 0.0]]))
    assert torch.allclose(ret[0], torch.tensor([2.125, 1.25, 2.0])) and ret[1, 0] == 3.0
    # λ = 1, γ = 1: the advantage is the reward-to-go minus the value
    adv, _ = losses.gae(rewards[:1], values[:1], mask[:1], 1.0, 1.0)
    assert torch.allclose(adv, torch.tensor([[3.0, 2.0, 2.0]]) - values[:1])


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]]).bool()
    w = losses.whiten(x, mask)
    assert torch.allclose(w, torch.tensor([[-math.sqrt(1.5), 0.0, math.sqrt(1.5), 0.0]]), atol=1e-5)
    assert (
        abs(losses.masked_mean(w, mask).item()) < 1e-6
        and abs(losses.masked_mean(w**2, mask).item() - 1) < 1e-5
    )


def test_ppo_loss_by_hand():
    """Three tokens: A = 2 with ratio 1.5 (clipped to 1.2: -2.4), A = -1 with ratio .5 (clipped to .8: .8), A = 1
    with ratio 1 (-1). Values 1 against returns 2, old values 0: clipped to .2, so ½ x 1.8² = 1.62 per token."""
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.0]])).requires_grad_()
    adv = torch.tensor([[2.0, -1.0, 1.0]])
    values = torch.ones(1, 3, requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, clipfrac = losses.ppo_loss(
        lp,
        old,
        adv,
        values,
        torch.zeros(1, 3),
        torch.full((1, 3), 2.0),
        mask,
        clip=0.2,
        clip_value=0.2,
        vf_coef=0.1,
    )
    assert torch.allclose(loss, torch.tensor([(-2.4 + 0.8 - 1.0) / 3 + 0.1 * 1.62]))
    assert torch.allclose(clipfrac, torch.tensor([2 / 3]))
    loss.sum().backward()
    # clipped tokens get no gradient; the third gets d(-A r)/d lp = -A r / 3
    assert torch.allclose(lp.grad, torch.tensor([[0.0, 0.0, -1 / 3]]))
    # the clipped value term is the larger: constant in V
    assert torch.allclose(values.grad, torch.zeros(1, 3))


def test_rloo_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    adv = losses.rloo_advantages(r)
    assert torch.allclose(adv, torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0]]))
    assert abs(adv.sum().item()) < 1e-6
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], requires_grad=True)
    loss = losses.rloo_loss(lp, adv)
    assert torch.allclose(loss, -adv * lp.detach())
    loss.sum().backward()
    assert torch.allclose(lp.grad, -adv)  # raises the log-prob of better-than-the-others samples


# -----------------------------------------------------------------------------
# Annotators


@pytest.mark.parametrize(
    "text,want",
    [
        (
            "Based on the image content, Response 2 is better, because it names the objects correctly.",
            1,
        ),
        ("Response 1 mentions a saucer that is not there, so Response 2 is better.", 1),
        ("Response 1 is more accurate than Response 2.", 0),
        ("I prefer Response 1.", 0),
        ("The better response is Response 2: it does not invent a star.", 1),
        ("Response 1", 0),
        ("Both responses are equally good.", None),
        ("Neither Response 1 nor Response 2 is right.", None),
        ("Response 1 is not better than Response 2.", None),
        ("Response 2 is not correct.", None),
        ("Response 1 is better. No, Response 2 is better.", None),
        ("The answer is 1.", None),
        ("", None),
    ],
)
def test_parse_judgment(text, want):
    assert on.parse_judgment(text) == want


DESC = "There are two objects. A blue cup is at the top left. A white saucer is in the center."


@pytest.mark.parametrize(
    "truth,kind,text,want",
    [
        (DESC, "describe", DESC, 1.0),
        # cup +1, saucer +1, invented star -2; cup's colour wrong -1, saucer's right +1; count wrong -1; top 2 + 2 + 1
        (
            DESC,
            "describe",
            "There are three objects. A red cup is at the top left. A white saucer is in the center. "
            "A yellow star is at the top.",
            -1 / 5,
        ),
        (DESC, "describe", "There are two objects. A blue cup is at the top left.", 3 / 5),
        ("No, there is no star.", "exist", "Yes, there is a star.", -1.0),
        ("No, there is no star.", "exist", "No.", 1.0),
        ("There are three objects.", "count", "There are three objects.", 1.0),
        ("There are three objects.", "count", "There are two objects.", -1.0),
        ("The cup is red.", "color", "The cup is red.", 1.0),
        ("The cup is red.", "color", "The cup is blue.", 0.0),
        ("The cup is at the top left.", "position", "The cup is in the center.", 0.0),
    ],
)
def test_rule_score(truth, kind, text, want):
    assert abs(world.rule_score(text, dict(chosen=truth, meta=dict(kind=kind))) - want) < 1e-9


def test_reward_model_annotator(tmp_path):
    vlm = VLM.from_pretrained(world.BASE_MODEL)
    with pytest.raises(ValueError, match="no score.weight"):
        vlm.save_pretrained(str(tmp_path / "plain"))
        on.RewardModel(str(tmp_path / "plain"), "cpu")
    w = torch.randn(1, vlm.cfg.text.hidden_size, generator=torch.Generator().manual_seed(0))
    vlm.extra["score.weight"] = w
    vlm.save_pretrained(str(tmp_path / "rm"))
    rm = on.RewardModel(str(tmp_path / "rm"), "cpu")
    recs = world.world_pairs(world.World(0), 3)
    texts = [[r["chosen"], r["rejected"]] for r in recs]
    got = rm(recs, texts)
    # by hand: the last hidden state of prompt + reply (EOS included), through the head
    full = vlm.encode_prompt(
        format_chat(
            recs[1]["conversation"] + [{"role": "assistant", "content": texts[1][1]}],
            vlm.template,
            False,
        )
    )
    px = vlm.image_processor([recs[1]["image"]])["pixel_values"]
    with torch.no_grad():
        h = vlm.hidden(torch.tensor([full]), px)[0, -1]
    assert abs(got[1][1] - (w[0] @ h).item()) < 1e-4


def test_annotator_flag_errors(monkeypatch):
    with pytest.raises(ValueError, match="expected rule"):
        on.annotator(on.Config(annotator="gpt"), "cpu")
    with pytest.raises(ValueError, match="needs the checkpoint"):
        on.annotator(on.Config(annotator="rm"), "cpu")
    with pytest.raises(ValueError, match="api:MODEL needs the served model's name"):
        on.annotator(on.Config(annotator="api"), "cpu")
    monkeypatch.delenv("JUDGE_BASE_URL", raising=False)  # no silent default host for training data
    with pytest.raises(ValueError, match="api:llava: set JUDGE_BASE_URL to the endpoint serving"):
        on.annotator(on.Config(annotator="api:llava"), "cpu")
    with pytest.raises(ValueError, match="PPO and RLOO need"):
        on.annotator(on.Config(annotator=f"judge:{world.BASE_MODEL}", algo="rloo"), "cpu")


def test_its_own_flags(capsys):
    """train_online.py has a flat Config of its own: no offline-only flag, about thirty in all."""
    import dataclasses

    with pytest.raises(SystemExit):
        config_from_argv(on.Config, ["--help"])
    out = capsys.readouterr().out
    assert "--kl_coef" in out and "--val_pairs" not in out and "--rpo_alpha" not in out
    assert len(dataclasses.fields(on.Config)) <= 35
    with pytest.raises(UserError, match="unrecognized arguments: --lr_projector"):
        config_from_argv(on.Config, ["--lr_projector", "0.5"])  # fixed: only the adapters may train


def squared_hinge(pc, pr, rc, rr, beta=0.1):
    """A fork's loss: max(0, 1 - β h)², 1 where the policy is the reference (h = 0)."""
    h = (pc - rc) - (pr - rr)
    return (
        (1 - beta * h).clamp(min=0) ** 2,
        losses.rewards(pc, rc, beta),
        losses.rewards(pr, rr, beta),
    )


@pytest.fixture
def forked_loss(monkeypatch):
    """ "sqhinge" registered in losses.LOSSES, then both trainers imported anew, as a fork that adds a loss to
    losses.py has them. -> (train_offline, train_online); the modules of before come back after the test."""
    monkeypatch.setitem(losses.LOSSES, "sqhinge", squared_hinge)
    for name in ("train_offline", "train_online"):
        monkeypatch.setitem(sys.modules, name, None)  # undone after the test
        del sys.modules[name]
    return importlib.import_module("train_offline"), importlib.import_module("train_online")


def test_a_loss_added_to_losses_trains_offline_and_online(forked_loss, tmp_path, capsys):
    """A loss in losses.LOSSES is a --loss of both trainers (nothing else to edit): a step of each trains on it."""
    off, onl = forked_loss
    args = ["--loss", "sqhinge", "--steps", "1", "--eval_n", "0", "--batch_size", "8"]
    off.main(
        args + ["--pairs", "64", "--out_dir", str(tmp_path / "off"), "--cache_dir", str(tmp_path)]
    )
    onl.main(args + ["--pairs", "16", "--max_new_tokens", "24", "--out_dir", str(tmp_path / "on")])
    out = capsys.readouterr().out
    assert "objective: sqhinge (β 1.0) + 1.0 × NLL, 1 rejected;" in out
    assert "objective: Online-DPO (sqhinge, β 0.5), 2 samples per prompt" in out
    (rec,) = run_metrics(str(tmp_path / "off" / "metrics.jsonl"))
    assert rec["loss"] > 1  # 1 at the reference, plus the chosen's NLL (--rpo_alpha 1)
    (rec,) = run_metrics(str(tmp_path / "on" / "metrics.jsonl"))
    assert rec["loss"] == 1 or rec["online/ties_or_dropped"] == 1  # the policy is the reference
    with pytest.raises(UserError, match=r"^--loss sqhinge: --algo ppo trains on rewards"):
        onl.main(["--loss", "sqhinge", "--algo", "ppo", "--out_dir", str(tmp_path / "x")])


def test_flags_are_checked_before_anything_loads(tmp_path, monkeypatch):
    """Choices and ranges fail at parse time, naming the flag; --resume takes the run's settings."""
    import dataclasses

    monkeypatch.setattr(on, "build_policy", lambda *a, **kw: pytest.fail("built the model"))
    for args, want in (
        (["--algo", "dpo"], r"--algo: invalid choice: 'dpo' \(choose from 'online-dpo', "),
        (["--dtype", "bf16"], r"--dtype: invalid choice: 'bf16'"),
        (["--mix_p", "1.5"], r"--mix_p 1.5: must be >= 0, <= 1"),
        (["--lora_r", "0"], r"--lora_r 0: must be >= 1"),
        (["--data", "nope.jsonl"], r"--data 'nope\.jsonl': not a file"),
    ):
        with pytest.raises(UserError, match=want):
            on.main(args + ["--out_dir", str(tmp_path / "x")])
    run = tmp_path / "run"
    run.mkdir()
    saved = on.Config(out_dir=str(run), algo="rloo", samples=4, kl_coef=0.1)
    torch.save(
        dict(step=0, model={}, optimizer={}, config=dataclasses.asdict(saved)), run / "state.pt"
    )
    assert (
        on.resumable_config(on.Config, ["--resume", "true", "--out_dir", str(run)])[0].kl_coef
        == 0.1
    )
    with pytest.raises(UserError, match=r"--algo ppo \(the run's: rloo\)"):
        on.main(["--resume", "true", "--out_dir", str(run), "--algo", "ppo"])


# -----------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize(
    "algo,extra",
    [
        ("online-dpo", []),
        ("online-dpo", ["--grad_accum", "2", "--samples", "3"]),
        ("mixed-dpo", ["--dtype", "bfloat16"]),
        ("online-bdhs", ["--external", "true"]),
        ("ppo", []),
        ("rloo", []),
    ],
)
def test_two_steps_of_every_algorithm(tmp_path, capsys, algo, extra):
    on.main(SMALL + ["--algo", algo, "--steps", "2", "--out_dir", str(tmp_path)] + extra)
    said = {
        "online-dpo": "Online-DPO (DPO, β 0.5), 2 samples per prompt, annotator: rule",
        "mixed-dpo": "Mixed-DPO (DPO, β 0.5; the offline pair with p 0.5), 2 samples per prompt",
        "online-bdhs": "Online-BDHS (DPO, β 0.5), the ground truth chosen, 2 rejected (Avg-DPO",
        "ppo": "PPO (clip 0.2, KL β 0.4 per token, GAE λ 0.95, 4 epochs), 1 sample per prompt, annotator: rule",
        "rloo": "RLOO (KL β 0.4), 4 samples per prompt, annotator: rule",
    }[algo]
    if "--samples" in extra:
        said = "Online-DPO (DPO, β 0.5), 3 samples per prompt (best vs worst), annotator: rule"
    cap = capsys.readouterr()
    out = cap.out
    assert (
        out.count("objective: ") == 1 and f"objective: {said}" in out and "no pairs held out" in out
    )
    recs = run_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in recs] == [0, 1] and all(math.isfinite(r["loss"]) for r in recs)
    # the shared cache folder printed at the start, each step's loss on the bar, a closing summary
    last = recs[-1]
    assert (
        f"cache: {os.environ['MMALIGN_CACHE']} " in cap.out
        and f"loss={last['loss']:.4f}" in cap.err
    )
    done = f"done: 2 steps, final loss {last['loss']:.4f}, "
    if "rewards/accuracies" in last:
        done += f"reward accuracy {100 * last['rewards/accuracies']:.1f}%"
    else:
        done += f"mean score {last['objective/scores']:.3f}"
    assert done + f"; checkpoint in {tmp_path / 'checkpoint'}\n" in cap.out
    want = {
        "ppo": ["objective/scores", "objective/kl", "policy/clipfrac", "val/values"],
        "rloo": ["objective/scores", "objective/kl", "objective/rlhf_reward"],
        "online-bdhs": ["rewards/margins", "bdhs/attempts"],
        "mixed-dpo": ["online/offline_share"],
    }
    assert all(
        k in recs[0]
        for k in want.get(algo, ["rewards/accuracies", "online/score", "online/ties_or_dropped"])
    )
    if algo in ("ppo", "rloo"):  # the policy starts at the reference: no KL at the first step
        assert abs(recs[0]["objective/kl"]) < 1e-4
        assert len(json.load(open(tmp_path / "reward_norm.json"))) == 2
    if algo.endswith("dpo") or algo == "online-bdhs":
        assert abs(recs[0]["rewards/margins"]) < 1e-5
    vlm = VLM.from_pretrained(str(tmp_path / "checkpoint"))
    assert not any("lora" in n for n, _ in vlm.named_parameters())


def test_rollouts_on_a_llava_hf_folder_sample_only_ids_the_tokenizer_holds(tmp_path, monkeypatch):
    """Online-DPO, RLOO and PPO on a llava-hf-shaped folder (its padded logit rows, <image> and <pad> the likeliest)
    with a native prompts file, two seeds each: no rollout samples an id past the tokenizer, the image token or the
    pad token. Unmasked, a sampled <image> id crashed the next forward ("input_ids hold N image tokens but the
    images give N - 1 features")."""
    model_dir = str(tmp_path / "model")
    info = build_llava_hf(model_dir, model_type="llava")[2]
    # the same folder with a score head: a reward model for every algorithm
    rm = VLM.from_pretrained(model_dir)
    rm.extra["score.weight"] = torch.randn(1, rm.cfg.text.hidden_size) * 0.01
    rm.save_pretrained(str(tmp_path / "rm"))
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(4):
            random_image(40, 50 + 10 * i, seed=i).save(tmp_path / f"{i}.png")
            f.write(
                json.dumps(
                    dict(
                        id=str(i),
                        image=f"{i}.png",
                        chosen="A red cup.",
                        conversation=[dict(role="user", content="<image>\nWhat is in the image?")],
                    )
                )
                + "\n"
            )
    sampled = []
    real_decode = M.decode

    def spy(*a, **kw):  # every id any generate call samples
        out = real_decode(*a, **kw)
        sampled.extend(t for o in out for t in o)
        return out

    monkeypatch.setattr(M, "decode", spy)
    for algo in ("online-dpo", "rloo", "ppo"):
        for seed in ("0", "1"):
            out = tmp_path / f"{algo}-{seed}"
            on.main(
                [
                    "--model",
                    model_dir,
                    "--data",
                    str(tmp_path / "prompts.jsonl"),
                    "--algo",
                    algo,
                    "--annotator",
                    f"rm:{tmp_path / 'rm'}",
                    "--steps",
                    "1",
                    "--batch_size",
                    "2",
                    "--max_new_tokens",
                    "8",
                    "--eval_n",
                    "0",
                    "--seed",
                    seed,
                    "--out_dir",
                    str(out),
                ]
            )
            assert math.isfinite(run_metrics(str(out / "metrics.jsonl"))[0]["loss"])
    assert sampled and not [
        t for t in sampled if t >= info["tokens"] or t in (info["image"], info["pad"])
    ]


def test_judge_answers_that_name_neither_are_dropped(tmp_path, monkeypatch):
    """The world's base model cannot judge: its answers name no response, so every pair is dropped and counted, and
    the step still runs (a zero-weight stand-in keeps the update well defined)."""
    monkeypatch.setattr(on, "JUDGE_TOKENS", 8)
    on.main(
        SMALL
        + [
            "--algo",
            "online-dpo",
            "--steps",
            "1",
            "--annotator",
            f"judge:{world.BASE_MODEL}",
            "--out_dir",
            str(tmp_path),
        ]
    )
    rec = run_metrics(str(tmp_path / "metrics.jsonl"))[0]
    assert (
        rec["online/unparsed"] == 1.0
        and rec["online/ties_or_dropped"] == 1.0
        and rec["loss"] == 0.0
    )


def test_rule_annotator_only_on_the_world(tmp_path, monkeypatch):
    """--annotator rule (the default) checks answers against the world's scenes: with other --data it is refused
    before anything loads, naming the flag. Online-BDHS asks no annotator, so it keeps the default."""
    path = str(tmp_path / "mine.jsonl")
    data.write_pairs(path, world.world_pairs(world.World(0), 8))
    monkeypatch.setattr(
        on, "build_policy", lambda *a, **k: pytest.fail("the model loaded before the check")
    )
    for algo in ("online-dpo", "mixed-dpo", "ppo", "rloo"):
        with pytest.raises(
            ValueError,
            match=r"--annotator rule \(the default\) is the world's verifier.*--data "
            r".*mine\.jsonl; pass --annotator rm:PATH",
        ):
            on.main(SMALL + ["--algo", algo, "--data", path, "--out_dir", str(tmp_path / "run")])
    on.check(on.Config(algo="online-bdhs", data=path))
    on.check(on.Config(data=path, annotator="api:m"))


def test_online_bdhs_external_needs_every_rejected(tmp_path):
    """--external true (Avg-DPO) on prompts without a rejected response is an error naming the record, not a run
    that trains one rejected per pair while its settings say two."""
    path = str(tmp_path / "prompts.jsonl")
    data.write_pairs(path, world.world_pairs(world.World(0), 8, rejected=False))
    with pytest.raises(ValueError, match=r"prompts\.jsonl:1: missing key 'rejected'"):
        on.main(
            SMALL
            + [
                "--algo",
                "online-bdhs",
                "--external",
                "true",
                "--data",
                path,
                "--steps",
                "1",
                "--out_dir",
                str(tmp_path / "run"),
            ]
        )


class Unhelpful:
    """An annotator with no signal until call `signal` (a step's call; 0: never): a judge whose replies never
    parse, or a scorer (RL: after `readable` calls for the reward statistics) that ties or cannot read."""

    def __init__(self, kind, signal=0, readable=0):
        self.kind, self.signal, self.readable, self.calls = kind, signal, readable, 0

    def judge(self, recs, pairs):
        self.calls += 1
        return [0 if self.calls == self.signal else None for _ in recs]

    def score(self, recs, texts):
        self.calls += 1
        if self.calls <= self.readable or self.calls - self.readable == self.signal:
            return [[float(i) for i in range(len(ts))] for ts in texts]
        return [[None if self.kind == "unparsed" else 0.5 for _ in ts] for ts in texts]


@pytest.mark.parametrize(
    "algo,kind", [("online-dpo", "unparsed"), ("online-dpo", "ties"), ("rloo", "unparsed")]
)
def test_a_run_without_signal_stops(tmp_path, monkeypatch, capsys, algo, kind):
    """Every pair a tie or an unreadable reply: loss and gradient 0. The progress bar shows the shares, and after
    5 such steps in a row the run stops with an error that says why, before any checkpoint claims success."""
    # RLOO: 8 readable prompts for the reward statistics
    fake = Unhelpful(kind, readable=2 * (algo == "rloo"))
    pairwise = algo == "online-dpo" and kind == "unparsed"
    monkeypatch.setattr(
        on, "annotator", lambda cfg, device: (None, fake.judge) if pairwise else (fake.score, None)
    )
    with pytest.raises(
        ValueError, match=r"--annotator rule: no training signal for 5 steps in a row \(to step 4\)"
    ):
        on.main(SMALL + ["--algo", algo, "--steps", "8", "--out_dir", str(tmp_path)])
    recs = run_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4] and not os.path.exists(
        tmp_path / "checkpoint"
    )
    assert all(r["online/unparsed"] == (kind == "unparsed") for r in recs)
    bar = capsys.readouterr().err
    assert (f"{kind}=100%" in bar) and (algo == "rloo" or "ties=" in bar)
    if algo == "online-dpo":
        assert all(
            r["loss"] == 0.0 and r["grad_norm"] == 0.0 and r["online/ties_or_dropped"] == 1
            for r in recs
        )


def test_a_signal_between_dead_steps_resets_the_count(tmp_path, monkeypatch, capsys):
    """4 steps of ties, one with pairs, 4 of ties: never 5 in a row, so the run ends and saves."""
    fake = Unhelpful("ties", signal=5)
    monkeypatch.setattr(on, "annotator", lambda cfg, device: (fake.score, None))
    on.main(SMALL + ["--algo", "online-dpo", "--steps", "9", "--out_dir", str(tmp_path)])
    recs = run_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["online/ties_or_dropped"] for r in recs] == [1.0] * 4 + [0.0] + [1.0] * 4
    assert os.path.exists(tmp_path / "checkpoint" / "model.safetensors")
    assert "ties=100%, unparsed=0%" in capsys.readouterr().err


def test_online_bdhs_drops_a_response_that_gives_back_the_ground_truth(tmp_path, monkeypatch):
    """A BDHS response equal to the ground truth (but for spaces) would make a pair of two equal responses:
    it is dropped as a tie, like offline ties; a run where every response is the truth stops with why."""
    real = on.bdhs.bdhs_batch

    def echo_first(vlm, embedder, recs, *args):
        res = real(vlm, embedder, recs, *args)
        return [(f" {recs[0]['chosen']} ", res[0][1])] + res[1:]

    monkeypatch.setattr(on.bdhs, "bdhs_batch", echo_first)
    on.main(SMALL + ["--algo", "online-bdhs", "--steps", "2", "--out_dir", str(tmp_path / "a")])
    recs = run_metrics(str(tmp_path / "a" / "metrics.jsonl"))
    assert [r["online/ties_or_dropped"] for r in recs] == [0.25, 0.25]

    def echo_all(vlm, embedder, recs, *args):
        return [(r["chosen"], m) for r, (_, m) in zip(recs, real(vlm, embedder, recs, *args))]

    monkeypatch.setattr(on.bdhs, "bdhs_batch", echo_all)
    with pytest.raises(ValueError, match="online-bdhs: no training signal for 5 steps in a row"):
        on.main(SMALL + ["--algo", "online-bdhs", "--steps", "6", "--out_dir", str(tmp_path / "b")])
    assert not os.path.exists(tmp_path / "b" / "checkpoint")


def test_ppo_with_the_reward_model(tmp_path):
    vlm = VLM.from_pretrained(world.BASE_MODEL)
    vlm.extra["score.weight"] = torch.randn(1, vlm.cfg.text.hidden_size) * 0.01
    vlm.save_pretrained(str(tmp_path / "rm"))
    on.main(
        SMALL
        + [
            "--algo",
            "ppo",
            "--steps",
            "1",
            "--annotator",
            f"rm:{tmp_path / 'rm'}",
            "--out_dir",
            str(tmp_path / "run"),
        ]
    )
    assert math.isfinite(
        run_metrics(str(tmp_path / "run" / "metrics.jsonl"))[0]["objective/scores"]
    )


def test_fsdp_and_ddp_sampling_under_torchrun(tmp_path):
    """2 gloo ranks: FSDP2 samples with gathered parameters (ranks decode different lengths without a collective in
    the loop) and gives DDP's samples, rewards and losses; both save a checkpoint that loads."""
    for name, flags in (("fsdp", ["--fsdp", "true"]), ("ddp", [])):
        torchrun(
            2,
            SMALL + ["--algo", "rloo", "--steps", "2", "--out_dir", str(tmp_path / name)] + flags,
            script="train_online.py",
        )
        VLM.from_pretrained(str(tmp_path / name / "checkpoint"))
    a, b = (run_metrics(str(tmp_path / name / "metrics.jsonl")) for name in ("fsdp", "ddp"))
    assert [r["step"] for r in a] == [0, 1] and all(math.isfinite(r["loss"]) for r in a)
    same(
        a,
        b,
        keys=("loss", "objective/scores", "objective/kl", "response_length", "grad_norm"),
        tol=1e-4,
    )


def test_kill_and_resume_gives_the_uninterrupted_metrics(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(on, "NORM_PROMPTS", 256)  # as in the killed run's own process
    common = SMALL + ["--algo", "ppo", "--steps", "8", "--save_every", "1"]
    on.main(common + ["--out_dir", str(tmp_path / "whole")])
    done = open(tmp_path / "whole" / "metrics.jsonl").read()
    capsys.readouterr()
    on.main(common + ["--out_dir", str(tmp_path / "whole"), "--resume", "true"])  # done: a no-op
    assert "the run is complete" in capsys.readouterr().out
    assert open(tmp_path / "whole" / "metrics.jsonl").read() == done
    with pytest.raises(ValueError, match="already holds a run"):  # a fresh run into it: refused
        on.main(common + ["--out_dir", str(tmp_path / "whole")])
    out = tmp_path / "killed"
    killed_at = kill_midway("train_online.py", common, out)
    assert 2 <= killed_at < 7, killed_at
    on.main(common + ["--out_dir", str(out), "--resume", "true"])
    same(
        run_metrics(str(tmp_path / "whole" / "metrics.jsonl")),
        run_metrics(str(out / "metrics.jsonl")),
        keys=("loss", "objective/scores", "objective/kl", "val/values", "grad_norm"),
        tol=1e-5,
    )


# -----------------------------------------------------------------------------
# The endpoint annotator (api:MODEL) against a fake OpenAI-compatible server on 127.0.0.1


@pytest.mark.parametrize(
    "text,want",
    [
        ("Rating: 7\nIt names the cup.", 7.0),
        ("rating:10", 10.0),
        ("Rating: 3. Rating: 3", 3.0),
        ("Rating: 0", None),
        ("Rating: 2, no, Rating: 8", None),
        ("seven", None),
    ],
)
def test_parse_rating(text, want):
    assert on.parse_rating(text) == want


def world_server(argv, full=4):
    """A fake endpoint that answers as the world's rule verifier would: the pairwise question with
    the response of higher rule_score (a tie: an answer that names neither), a rating with 1 + 4.5 x
    (score + 1), clamped. Until `full` requests have been in flight at once, each waits (up to 5 s)
    for the others. -> (state, server); state["peak"]: the most requests in flight at once."""
    from test_eval import fake_server

    cfg = config_from_argv(on.Config, argv)
    recs = world.world_pairs(world.World(cfg.world_seed, half=cfg.world_half), cfg.pairs)
    by = {(on.question(r), bm.image_part(r["image"])["image_url"]["url"]): r for r in recs}
    state, httpd = fake_server()
    cond, live = threading.Condition(), dict(now=0)
    state["peak"] = 0

    def reply(body):
        text, image = body["messages"][-1]["content"]
        text = text["text"]
        with cond:
            live["now"] += 1
            state["peak"] = max(state["peak"], live["now"])
            cond.notify_all()
            cond.wait_for(lambda: state["peak"] >= full, timeout=5)
            live["now"] -= 1
        q = text.split("\n\nQuestion: ")[1].split("\n\nResponse")[0]
        rec = by[(q, image["image_url"]["url"])]
        if "\n\nResponse 1: " in text:
            pair = text.split("\n\nResponse 1: ")[1].split("\n\nResponse 2: ")
            s1, s2 = (world.rule_score(r, rec) for r in pair)
            if s1 == s2:
                return "Both are equally good."  # names neither: unparsed, as a rule tie is dropped
            return f"Response {1 if s1 > s2 else 2} is better."
        s = world.rule_score(text.split("\n\nResponse: ")[1], rec)
        return f"Rating: {round(1 + 4.5 * (min(max(s, -1), 1) + 1))}\nBecause."

    state["reply"] = reply
    return state, httpd


@pytest.fixture
def endpoint(monkeypatch):
    """Env for api:MODEL, a JudgeClient with short back-off, and the fake world server's starter."""
    monkeypatch.setattr(bm, "JudgeClient", functools.partial(bm.JudgeClient, backoff=0.01))
    servers = []

    def start(argv, **kw):
        state, httpd = world_server(argv, **kw)
        servers.append(httpd)
        monkeypatch.setenv("JUDGE_BASE_URL", state["url"])
        monkeypatch.setenv("JUDGE_API_KEY", "sk-test-never-on-disk")
        return state

    yield start
    for s in servers:
        s.shutdown()


def test_endpoint_annotator_gives_the_rule_pairs(tmp_path, endpoint):
    """Online-DPO with the served annotator, answering by the rule verifier through 429, 5xx,
    malformed and slow replies, trains on the same pairs as --annotator rule: the same metrics,
    step for step. A batch's requests are in flight together, and the key is never written."""
    base = SMALL + ["--algo", "online-dpo", "--steps", "2"]
    null = json.dumps({"choices": [{"message": {"content": None}}]}).encode()
    api = base + [
        "--annotator",
        "api:llava-34b",
        "--annotator_threads",
        "4",
        "--out_dir",
        str(tmp_path / "api"),
    ]
    server = endpoint(api)
    slow = dict(code=503, trickle=0.001)  # a 503, one byte at a time
    server["script"] = [429, dict(body=b"<html>"), 500, dict(body=null), slow]
    on.main(api)
    on.main(base + ["--out_dir", str(tmp_path / "rule")])
    a, r = (run_metrics(str(tmp_path / d / "metrics.jsonl")) for d in ("api", "rule"))
    same(
        a,
        r,
        keys=(
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "logps/chosen",
            "logps/rejected",
            "online/ties_or_dropped",
            "grad_norm",
        ),
        tol=0,
    )
    assert 0 < a[0]["online/ties_or_dropped"] == a[0]["online/unparsed"] < 1
    assert all(x["online/annotator_s"] > 0 for x in a) and server["peak"] == 4  # 4 pairs at once
    assert len(server["bodies"]) == 8 + 5  # 2 steps x 4 pairs, and 5 retries
    assert set(server["auth"]) == {"Bearer sk-test-never-on-disk"}
    assert {b["model"] for b in server["bodies"]} == {"llava-34b"}
    for root, _, files in os.walk(tmp_path / "api"):
        for fn in files:
            assert b"sk-test-never-on-disk" not in open(os.path.join(root, fn), "rb").read(), fn
    assert len(open(tmp_path / "api" / "annotator.jsonl").readlines()) == 8  # every judgment kept


def test_endpoint_annotator_resumes_without_asking_twice(tmp_path, endpoint):
    """The endpoint fails (400) two of step 2's four requests: the run stops after step 1's
    checkpoint with the other two judgments cached. The resumed run asks only the two missing
    ones."""
    argv = SMALL + [
        "--algo",
        "online-dpo",
        "--steps",
        "3",
        "--save_every",
        "1",
        "--annotator",
        "api:m",
        "--annotator_threads",
        "4",
        "--out_dir",
        str(tmp_path),
    ]
    server = endpoint(argv)
    answer = server["reply"]
    ok = []

    def reply(body):  # after 8 requests (steps 0 and 1), answer two more, then refuse
        if server["bodies"].index(body) >= 10:
            return 400
        ok.append(json.dumps(body, sort_keys=True))
        return answer(body)

    server["reply"] = reply
    with pytest.raises(RuntimeError, match="judge .* failed after 1 request"):
        on.main(argv)
    cache = tmp_path / "annotator.jsonl"
    for _ in range(500):  # step 2's two answers may still be on their way to the cache
        if len(server["bodies"]) == 12 and len(open(cache).readlines()) == 10:
            break
        time.sleep(0.01)
    assert len(server["bodies"]) == 12 and len(open(cache).readlines()) == 10
    server["reply"] = lambda body: ok.append(json.dumps(body, sort_keys=True)) or answer(body)
    on.main(argv[:-2] + ["--out_dir", str(tmp_path), "--resume", "true"])
    assert len(server["bodies"]) == 14 and len(ok) == len(set(ok)) == 12  # none answered twice
    assert [r["step"] for r in run_metrics(str(tmp_path / "metrics.jsonl"))] == [0, 1, 2]


@pytest.mark.parametrize("algo,extra", [("rloo", []), ("online-dpo", ["--samples", "3"])])
def test_endpoint_ratings_for_rl_and_best_of_k(tmp_path, endpoint, capsys, algo, extra):
    """RLOO, and Online-DPO with 3 samples, ask a 1-10 rating per sample (samples that repeat one
    another are asked once); an unreadable rating is counted and left out."""
    argv = (
        SMALL
        + ["--algo", algo, "--steps", "2", "--annotator", "api:m", "--out_dir", str(tmp_path)]
        + extra
    )
    server = endpoint(argv, full=1)
    unreadable = {"choices": [{"message": {"content": "Rating: none"}}]}
    server["script"] = [dict(body=json.dumps(unreadable).encode())]
    on.main(argv)
    recs = run_metrics(str(tmp_path / "metrics.jsonl"))
    assert all(math.isfinite(r["loss"]) and "online/unparsed" in r for r in recs)
    texts = [b["messages"][-1]["content"][0]["text"] for b in server["bodies"]]
    assert all(t.startswith("Rate the response") for t in texts)
    assert len({json.dumps(b) for b in server["bodies"]}) == len(texts)  # each asked once
    if algo == "rloo":  # the unreadable one came first, in the normalisation, and is left out of it
        n = int(re.search(r"reward normalisation from (\d+) samples", capsys.readouterr().out)[1])
        assert n < 8 * 4 and len(texts) <= 8 * 4 + 2 * 4 * 4
        mean, std = json.load(open(tmp_path / "reward_norm.json"))
        assert 1 <= mean <= 10 and std > 0
    else:  # the prompt with the unreadable rating is dropped
        assert len(texts) <= 2 * 4 * 3 and recs[0]["online/unparsed"] == 0.25
        assert recs[0]["online/ties_or_dropped"] >= 0.25 and 1 <= recs[0]["online/score"] <= 10


def test_reward_norm_without_one_readable_rating_is_a_clear_error(tmp_path, monkeypatch):
    """An annotator whose every rating is unreadable stops the run, naming the annotator, before any step."""
    monkeypatch.setattr(
        on, "sample", lambda pm, recs, n, cfg, gen: (None, [["reply"] * n for _ in recs])
    )
    cfg = on.Config(out_dir=str(tmp_path), annotator="api:m", batch_size=4)
    unreadable = lambda recs, samples: [[None] * len(s) for s in samples]  # noqa: E731
    with pytest.raises(ValueError, match=r"--annotator api:m: no readable rating"):
        on.reward_norm(cfg, None, [{}] * 8, unreadable, train.Ranks(), contextlib.nullcontext())
    assert not os.path.exists(tmp_path / "reward_norm.json")
