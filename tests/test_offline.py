"""Offline alignment: the losses, preference data (native files, converters, the world's corruption set), packed pair
scoring, and train_offline.py end to end (DDP equals one process, kill + resume equals an uninterrupted run)."""

import dataclasses
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import types

import pytest
import torch

import cli
import data
import hub
import losses
import model as M
import train
import train_offline as to
import world
from cli import UserError, UserFileError
from model import VLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "prefs")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny import bomb_png, build_hf  # noqa: E402

# -----------------------------------------------------------------------------
# Losses: closed forms and gradient signs


def logps(*xs):
    return [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in xs]


def test_closed_forms():
    pc, pr, rc, rr = logps([-3.0, -1.0], [-5.0, -1.0], [-4.0, -2.0], [-4.0, -1.0])  # h = [2, 1]
    beta = 0.5
    l, c, r = losses.dpo_loss(pc, pr, rc, rr, beta)
    assert torch.allclose(
        l, torch.tensor([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(-0.5))], dtype=l.dtype)
    )
    assert torch.allclose(c, torch.tensor([0.5, 0.5], dtype=c.dtype)) and torch.allclose(
        r, torch.tensor([-0.5, 0.0], dtype=r.dtype)
    )
    l, _, _ = losses.ipo_loss(pc, pr, rc, rr, beta)  # (h - 1/(2β))² with 1/(2β) = 1
    assert torch.allclose(l, torch.tensor([1.0, 0.0], dtype=l.dtype))
    l, _, _ = losses.slic_loss(pc, pr, rc, rr, beta)  # max(0, 1 - βh)
    assert torch.allclose(l, torch.tensor([0.0, 0.5], dtype=l.dtype))
    zero = torch.zeros(3)
    assert torch.allclose(losses.dpo_loss(zero, zero, zero, zero)[0], torch.full((3,), math.log(2)))
    l, sc, sr = losses.rm_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert torch.allclose(l, torch.tensor([math.log(1 + math.exp(-2.0)), math.log(2)]))
    # the whole step loss on (B, K) log-probs: Eq. 5's γ L(y+, y-) + (1-γ) L(y+, ỹ-) with a second rejected
    pr2, rr2 = logps([-2.0, -6.0], [-1.0, -1.0])
    lp, ref, n = (
        torch.stack([pc, pr, pr2], 1),
        torch.stack([rc, rr, rr2], 1),
        torch.tensor([[2.0, 4.0, 5.0]] * 2),
    )
    l, _, r = losses.preference_loss("dpo", lp, ref, n, beta, gamma=0.25)
    want = (
        0.25 * losses.dpo_loss(pc, pr, rc, rr, beta)[0]
        + 0.75 * losses.dpo_loss(pc, pr2, rc, rr2, beta)[0]
    )
    assert torch.allclose(l, want)
    # IPO on per-token means; rpo_alpha adds α x the chosen response's per-token NLL
    l2, _, _ = losses.preference_loss("ipo", lp[:, :2], ref[:, :2], n[:, :2], beta, rpo_alpha=0.5)
    want = losses.ipo_loss(pc / 2, pr / 4, rc / 2, rr / 4, beta)[0] - 0.5 * pc / 2
    assert torch.allclose(l2, want)


@pytest.mark.parametrize("name", list(losses.LOSSES))
def test_gradient_signs(name):
    """Lowering the loss raises the chosen log-prob and lowers the rejected one; the reference gets no gradient."""
    pc, pr = logps([-4.0, -2.0], [-4.0, -3.0])
    rc, rr = torch.tensor([-4.0, -2.5]), torch.tensor([-4.0, -2.5])
    l, c, r = losses.LOSSES[name](pc, pr, rc, rr, 0.1)
    l.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    assert not c.requires_grad and not r.requires_grad
    sc, sr = logps([0.3], [0.1])
    losses.rm_loss(sc, sr)[0].sum().backward()
    assert sc.grad < 0 < sr.grad


def trl_loss(pc, pr, rc, rr, beta, loss_type, nc, nr):
    """trl 1.16's DPOTrainer loss on given log-probs. trl has no standalone loss function: its `_compute_loss` runs
    the model itself, so we call it with a stub trainer and a stand-in model whose per-token log-probs sum to ours."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import DPOTrainer

    lens = torch.cat([nc, nr])
    T = 1 + int(lens.max())
    # one prompt token, then the response
    mask = ((torch.arange(T) >= 1) & (torch.arange(T) <= lens[:, None])).long()
    logps = torch.cat([pc, pr])

    def model(**kw):
        per_tok = mask[:, 1:] * (logps[:, None] / lens[:, None])
        z = torch.zeros_like(per_tok)
        return SimpleNamespace(
            log_probs=per_tok, entropy=z, mean_logits=z, is_top1=z.bool(), aux_loss=None
        )

    model.training = True
    acc = SimpleNamespace(
        device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    stub = SimpleNamespace(
        model=model,
        accelerator=acc,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        ref_model=None,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = dict(
        input_ids=torch.zeros(len(lens), T, dtype=torch.long),
        attention_mask=torch.ones_like(mask),
        completion_mask=mask,
        ref_chosen_logps=rc,
        ref_rejected_logps=rr,
    )
    return DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False), stub._metrics[
        "train"
    ]


@pytest.mark.parametrize("ours,theirs", [("dpo", "sigmoid"), ("ipo", "ipo"), ("slic", "hinge")])
def test_equal_to_trl(ours, theirs):
    """The same log-probs give trl's loss (its batch mean), its gradients, and its reward metrics."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-40 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    nc, nr = torch.randint(1, 20, (6,), generator=g), torch.randint(1, 20, (6,), generator=g)
    beta = 0.1
    a = [pc.clone().requires_grad_(), pr.clone().requires_grad_()]
    theirs_loss, m = trl_loss(*a, rc, rr, beta, theirs, nc, nr)
    b = [pc.clone().requires_grad_(), pr.clone().requires_grad_()]
    norm = ours in losses.LENGTH_NORM
    l, c, r = losses.LOSSES[ours](
        b[0] / nc if norm else b[0],
        b[1] / nr if norm else b[1],
        rc / nc if norm else rc,
        rr / nr if norm else rr,
        beta,
    )
    assert torch.allclose(l.mean(), theirs_loss, rtol=1e-9)
    ga = torch.autograd.grad(theirs_loss, a)
    gb = torch.autograd.grad(l.mean(), b)
    assert all(torch.allclose(x, y, rtol=1e-9) for x, y in zip(ga, gb))
    if not norm:
        assert abs(m["rewards/chosen"][-1] - c.mean().item()) < 1e-6
        assert abs(m["rewards/margins"][-1] - (c - r).mean().item()) < 1e-6


def test_token_logps_mask_and_shift():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 6]])
    lp = losses.token_logps(logits, labels)
    ref = logits.log_softmax(-1)
    assert (
        lp[0, 0] == 0
        and torch.isclose(lp[0, 1], ref[0, 1, 3])
        and torch.isclose(lp[1, 3], ref[1, 3, 6])
    )
    assert torch.isclose(losses.sequence_logps(logits, labels)[0], ref[0, 1, 3] + ref[0, 2, 4])


# -----------------------------------------------------------------------------
# Preference data


def write_jsonl(path, recs):
    with open(path, "w") as f:
        for r in recs:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def pair(i, image="images/COCO_train2014_000000000001.jpg", **kw):
    return (
        dict(
            id=str(i),
            image=image,
            conversation=[{"role": "user", "content": "<image>\nWhat is it?"}],
            chosen="A red square.",
            rejected="A red kite.",
        )
        | kw
    )


def test_native_jsonl_errors_name_file_and_line(tmp_path):
    path = str(tmp_path / "pairs.jsonl")
    os.symlink(os.path.join(FIX, "images"), tmp_path / "images")
    write_jsonl(path, [pair(0), pair(1), "{not json"])
    with pytest.raises(ValueError, match=r"pairs\.jsonl:3: malformed JSON"):
        data.read_pairs(path)
    write_jsonl(path, [pair(0), pair(1, image="images/missing.jpg")])
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: image not found: .*missing\.jpg"):
        data.read_pairs(path)
    bad = pair(2)
    del bad["rejected"]
    write_jsonl(path, [pair(0), bad])
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: missing key 'rejected'"):
        data.read_pairs(path)
    write_jsonl(path, [pair(0, conversation=[{"role": "user", "content": "no placeholder"}])])
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: .*exactly one '<image>'"):
        data.read_pairs(path)
    write_jsonl(path, [pair(0), pair(1)])
    recs = data.read_pairs(path)
    assert [r["id"] for r in recs] == ["0", "1"] and os.path.isfile(recs[0]["image"])


def test_bad_responses_and_images_are_named_with_their_line(tmp_path):
    """Every image is opened (header, size limit, data checked without a full decode) when the file
    is read, before any compute; the error names the JSONL line and the image."""
    path = str(tmp_path / "pairs.jsonl")
    os.symlink(os.path.join(FIX, "images"), tmp_path / "images")
    write_jsonl(path, [pair(0), pair(1, rejected="A red <image> kite.")])
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: 'rejected' holds an '<image>'"):
        data.read_pairs(path)
    write_jsonl(path, [pair(0, image=123)])
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: 'image' must be a path .*, got int"):
        data.read_pairs(path)
    jpg = open(os.path.join(FIX, "images", "COCO_train2014_000000000001.jpg"), "rb").read()
    (tmp_path / "bad").mkdir()
    world.World(0).example("sft", 0)["image"].save(tmp_path / "bad" / "ok.png")
    png = (tmp_path / "bad" / "ok.png").read_bytes()
    bomb_png(str(tmp_path / "bad" / "bomb.png"), 10000, 9000)
    for name, raw in (
        ("empty.jpg", b""),
        ("cut.jpg", jpg[: len(jpg) // 2]),
        ("cut.png", png[:-30]),
        ("text.png", b"not an image"),
        ("bomb.png", None),
    ):
        if raw is not None:
            (tmp_path / "bad" / name).write_bytes(raw)
        write_jsonl(path, [pair(0), pair(1, image=f"bad/{name}")])
        with pytest.raises(ValueError, match=rf"pairs\.jsonl:2: .*bad/{name}"):
            data.read_pairs(path)
    bomb = (tmp_path / "bad" / "bomb.png").read_bytes()
    # over PIL's own limit (89 M pixels): its refusal, naming the size, before our lower one
    size = r"over the limit of 40,000,000 pixels \(Image size \(90000000 pixels\)"
    with pytest.raises(ValueError, match=rf"x\.parquet: row 3: image of \d+ bytes: {size}"):
        data.check_pair(pair(0, image=bomb), "x.parquet: row 3")


def test_a_planted_state_file_runs_no_code(tmp_path):
    """--resume loads state.pt with weights_only=True: a pickle whose payload makes a file is
    refused."""

    class Payload:
        def __init__(self, marker):
            self.marker = marker

        def __reduce__(self):
            return open, (self.marker, "w")

    torch.save(Payload(str(tmp_path / "proof")), tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False).close()
    assert (tmp_path / "proof").exists()  # the payload is real: an unrestricted load runs it
    (tmp_path / "run").mkdir()
    evil = dict(step=3, model={}, optimizer={}, config={}, extra=Payload(str(tmp_path / "ran")))
    torch.save(evil, tmp_path / "run" / "state.pt")
    with pytest.raises(ValueError, match=r"refused to load .*run/state\.pt"):
        train.resumable_config(to.Config, ["--resume", "true", "--out_dir", str(tmp_path / "run")])
    assert not (tmp_path / "ran").exists()


def test_reference_cache_key_reads_image_bytes(tmp_path):
    """An image replaced by another of the same size (and mtime) is another cache key."""
    img = tmp_path / "a.png"
    img.write_bytes(b"x" * 100)
    items = [dict(prompt=[1, 2], responses=[[3], [4]], image=str(img))]
    cfg = to.Config(model="someone/model")
    key = to.fingerprint(cfg, items)
    st = os.stat(img)
    img.write_bytes(b"y" * 100)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert to.fingerprint(cfg, items) != key


def test_resume_writes_the_kept_metrics_at_once(tmp_path):
    """A kill right after a resumed run opens metrics.jsonl (before its next logged step) leaves the
    kept lines."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(dict(step=s, loss=1.0)) + "\n" for s in range(5)))
    log = train.Metrics(to.Config(out_dir=str(tmp_path), resume=True), 3, train.Ranks())
    assert [json.loads(line)["step"] for line in open(path)] == [0, 1, 2]  # on disk, not buffered
    log.add({"loss": [1.0, 2]})
    log.add({"loss": [2.0, 2]})
    log.write(3)
    log.close()
    assert [json.loads(line)["step"] for line in open(path)] == [0, 1, 2, 3]
    # sums over micro-steps, then the mean
    assert json.loads(open(path).readlines()[-1])["loss"] == 0.75


def test_yes_no_flags_reject_typos(capsys):
    from cli import config_from_argv

    cfg = config_from_argv(
        to.Config, ["--resume", "YES", "--fsdp", "0", "--grad_ckpt", "True", "--overwrite", "no"]
    )
    assert (cfg.resume, cfg.fsdp, cfg.grad_ckpt, cfg.overwrite) == (True, False, True, False)
    with pytest.raises(UserError, match="argument --resume: 'ture' is not a yes/no value"):
        config_from_argv(to.Config, ["--resume", "ture"])


def test_resume_takes_the_runs_settings_before_anything_loads(tmp_path, monkeypatch):
    """--resume true --out_dir D: the flags not given are the run's, read from D's training state;
    a flag given with another value is an error naming both values; nothing is loaded first."""
    import dataclasses

    monkeypatch.setattr(to, "build_policy", lambda *a, **kw: pytest.fail("built the model"))
    run = tmp_path / "run"
    run.mkdir()
    saved = to.Config(
        out_dir=str(run), beta=0.3, lora_r=4, data="bdhs", steps=7, save_every=2, seed=5
    )
    torch.save(
        dict(step=1, model={}, optimizer={}, config=dataclasses.asdict(saved)), run / "state.pt"
    )
    cfg, st = train.resumable_config(to.Config, ["--resume", "true", "--out_dir", str(run)])
    assert cfg == dataclasses.replace(saved, resume=True) and st["step"] == 1
    # the same value; a free one
    cfg, _ = train.resumable_config(
        to.Config, ["--resume", "true", "--out_dir", str(run), "--beta", "0.3", "--save_every", "3"]
    )
    assert (cfg.beta, cfg.save_every, cfg.lora_r) == (0.3, 3, 4)
    with pytest.raises(
        UserError,
        match=r"other settings: --beta 0.5 \(the run's: 0.3\), --data world "
        r"\(the run's: bdhs\)",
    ):
        to.main(["--resume", "true", "--out_dir", str(run), "--beta", "0.5", "--data", "world"])
    with pytest.raises(UserError, match=r"--lora_r -1: must be >= 0"):
        to.main(["--resume", "true", "--out_dir", str(run), "--lora_r", "-1"])


def test_bad_runs_stop_before_any_compute(tmp_path, monkeypatch):
    """Flags out of range, an out_dir that cannot be written or holds another run: errors before the
    model is built. An empty preference file, or one of ties only: an error before the reference
    pass."""

    def run(*args):
        to.main(
            [
                "--out_dir",
                str(tmp_path / "run"),
                "--cache_dir",
                str(tmp_path / "c"),
                "--eval_n",
                "0",
                "--batch_size",
                "2",
            ]
            + list(args)
        )

    real_build = train.build_policy
    monkeypatch.setattr(to, "build_policy", lambda *a, **kw: pytest.fail("built the model"))
    for flag, v, bound in (
        ("--pairs", "0", ">= 1"),
        ("--batch_size", "0", ">= 1"),
        ("--steps", "-1", ">= 0"),
        ("--grad_accum", "0", ">= 1"),
        ("--lora_r", "-4", ">= 0"),
        ("--beta", "0.0", "> 0"),
    ):
        with pytest.raises(UserError, match=rf"{flag} {v}: must be {bound}"):
            run(flag, v)
    choices = ", ".join(repr(name) for name in [*losses.LOSSES, "rm"])
    with pytest.raises(
        UserError, match=rf"--loss: invalid choice: 'kto' \(choose from {choices}\)"
    ):
        run("--loss", "kto")
    with pytest.raises(
        UserError, match=r"--dtype: invalid choice: 'bf16' \(choose from 'float32', 'bfloat16'"
    ):
        run("--dtype", "bf16")
    with pytest.raises(UserError, match=r"--ref: invalid choice: 'none'"):
        run("--ref", "none")
    with pytest.raises(UserError, match=r"--data 'nope\.jsonl': not a file, and not one of povid"):
        run("--data", "nope.jsonl")
    with pytest.raises(UserFileError, match=r"--data 'povid:/nowhere': /nowhere not found"):
        run("--data", "povid:/nowhere")
    with pytest.raises(UserError, match=r"unrecognized arguments: --lora_rank"):
        run("--lora_rank", "4")
    with pytest.raises(
        UserError, match=r"--dtype 'float16': expected float32 or bfloat16 .*loss scaling"
    ):
        run("--dtype", "float16")  # no GradScaler: small LoRA gradients would underflow
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"--out_dir .*file/run: cannot write there"):
        to.main(["--out_dir", str(tmp_path / "file" / "run")])
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--resume: no training state at .*run/state\.pt"):
        run("--resume", "true")
    torch.save(dict(step=1), tmp_path / "run" / "state.pt")
    with pytest.raises(ValueError, match=r"holds a run .*--resume true .*--overwrite true .*--out"):
        run()
    train.setup(to.Config(out_dir=str(tmp_path / "run"), overwrite=True))  # allowed
    os.remove(tmp_path / "run" / "state.pt")
    monkeypatch.setattr(to, "build_policy", real_build)
    monkeypatch.setattr(to, "reference_logps", lambda *a, **kw: pytest.fail("ran the reference"))
    path = str(tmp_path / "p.jsonl")
    os.symlink(os.path.join(FIX, "images"), tmp_path / "images")
    write_jsonl(path, [])
    with pytest.raises(ValueError, match=r"p\.jsonl: 0 training pairs, fewer than one batch of 2"):
        run("--data", path)
    write_jsonl(path, [pair(i, rejected="A red square.") for i in range(4)])
    with pytest.raises(ValueError, match=r"0 training pairs, .*4 have chosen == rejected"):
        run("--data", path)


def test_a_full_disk_names_the_state_file(tmp_path, monkeypatch):
    pm = train.PairModel(VLM.from_pretrained(world.BASE_MODEL))
    opt = torch.optim.AdamW(pm.parameters())

    def full(*a, **kw):
        raise RuntimeError(
            "[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file"
        )

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"cannot write .*state\.pt\.tmp\d+: .*failed writing file"):
        train.Checkpoint(to.Config(out_dir=str(tmp_path)), pm, opt, train.Ranks()).save(0)
    assert sorted(os.listdir(tmp_path)) == []  # a save mid-run writes the state only
    with pytest.raises(OSError, match=r"cannot write .*state\.pt\.tmp\d+: .*failed writing file"):
        train.Checkpoint(to.Config(out_dir=str(tmp_path)), pm, opt, train.Ranks()).save(
            0, final=True
        )
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_resume_names_a_state_of_other_trainable_tensors(tmp_path):
    """The trainable tensors load with strict=False (the frozen ones are not saved): a state whose names differ
    from what this model trains is an error, not a run that silently continues from the base."""
    cfg = to.Config(out_dir=str(tmp_path), resume=True)
    pm = train.PairModel(VLM.from_pretrained(world.BASE_MODEL))
    pm.requires_grad_(False)
    pm.vlm.lm_head.requires_grad_(True)
    torch.save(
        dict(
            step=0,
            model={"vlm.lm_head.bias": torch.zeros(1)},
            optimizer={},
            config=dataclasses.asdict(cfg),
        ),
        tmp_path / "state.pt",
    )
    with pytest.raises(
        UserError, match=r"state\.pt does not hold this model's trainable tensors: 2 differ"
    ):
        train.Checkpoint(cfg, pm, None, train.Ranks()).resume(
            10, train.load_state(tmp_path / "state.pt")
        )


def test_ties_are_counted_and_skipped(tmp_path, capsys):
    vlm = VLM.from_pretrained(world.BASE_MODEL)
    img = os.path.join(FIX, "images", "COCO_train2014_000000000001.jpg")
    recs = [pair(0, image=img), pair(1, image=img, rejected="A red square."), pair(2, image=img)]
    items, stats = data.prepare_pairs(vlm, recs)
    assert stats["ties"] == 1 and [it["id"] for it in items] == ["0", "2"]
    assert "1 have chosen == rejected (skipped)" in capsys.readouterr().err


def test_truncation_never_cuts_image_tokens():
    vlm = VLM.from_pretrained(world.BASE_MODEL)
    rec = world.world_pairs(world.World(0), 1)[0] | dict(
        chosen="word " * 80, rejected="other " * 60
    )
    prompt, _ = data.encode_conversation(vlm, rec["conversation"])
    items, stats = data.prepare_pairs(vlm, [rec], max_length=len(prompt) + 10, warn=False)
    assert stats["truncated"] == 1 and items[0]["prompt"] == prompt
    assert [len(r) for r in items[0]["responses"]] == [10, 10]
    # inside the image tokens
    items, stats = data.prepare_pairs(vlm, [rec], max_length=len(prompt) - 3, warn=False)
    assert items == [] and stats["too_long"] == 1


@pytest.mark.parametrize(
    "name,sub,n",
    [
        ("povid", "povid", 3),
        ("vlfeedback", "vlfeedback", 2),
        ("rlhfv", "rlhf_v", 2),
        ("llava-rlhf", "llava_rlhf", 3),
    ],
)
def test_converters_on_fixtures(name, sub, n):
    recs = data.load_pairs(f"{name}:{os.path.join(FIX, sub)}", os.path.join(FIX, "images"))
    assert len(recs) == n
    for r in recs:
        assert (
            r["conversation"][0]["content"].startswith("<image>\n")
            and r["conversation"][-1]["role"] == "user"
        )
        assert r["chosen"] != r["rejected"] and data.open_image(r["image"]).mode == "RGB"
    by = {r["id"]: r for r in recs}
    if name == "povid":  # the last gpt turn of conversations / rejected_conversations
        assert by["povid-1"]["chosen"].startswith("The whole picture is a flat red square")
        assert by["povid-1"]["meta"]["source_id"] == "COCO_train2014_000000000001"
    if name == "llava-rlhf":  # preference 2 -> output_2 is chosen; earlier turns stay as context
        assert by["llava-rlhf-1"]["chosen"] == "The image shows nothing but a flat blue square."
        assert [m["role"] for m in by["llava-rlhf-2"]["conversation"]] == [
            "user",
            "assistant",
            "user",
        ]
    if name == "vlfeedback":  # best and worst mean rating
        assert by["vlfeedback-1"]["meta"]["models"] == ["gpt4v", "fuyu-8b"]
    if name == "rlhfv":
        assert isinstance(recs[0]["image"], bytes) and recs[0]["meta"]["ds_name"] == "RLHF-V"


def test_converter_errors_name_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="POVID_preference_data_for_VLLMs_version_1.json"):
        data.load_pairs(f"povid:{tmp_path}")
    f = tmp_path / "llava_7b_v1_preference.json"
    f.write_text(json.dumps([{"id": 1, "image": "x.jpg", "conversations": []}]))
    with pytest.raises(ValueError, match=r"llava_7b_v1_preference\.json: item 1"):
        data.load_pairs(f"llava-rlhf:{f}")
    with pytest.raises(ValueError, match="not a file"):
        data.load_pairs(str(tmp_path / "nope.jsonl"))


def test_native_image_paths_resolve_against_image_root(tmp_path):
    """A native file's relative image path resolves against --image_root when it is given (the
    train scripts pass it through load_pairs), else against the file's folder; an absolute path is
    used as given; a missing image's error names --image_root."""
    (tmp_path / "data").mkdir()
    path = str(tmp_path / "data" / "pairs.jsonl")
    jpg = os.path.join(FIX, "images", "COCO_train2014_000000000001.jpg")
    write_jsonl(path, [pair(0, image="COCO_train2014_000000000001.jpg"), pair(1, image=jpg)])
    recs = data.load_pairs(path, os.path.join(FIX, "images"))
    assert [r["image"] for r in recs] == [jpg, jpg]
    with pytest.raises(
        ValueError,
        match=r"pairs\.jsonl:1: image not found: .*data/COCO_train2014_000000000001\.jpg "
        r"\(relative image paths resolve against the data file's folder; "
        r"--image_root sets another\)",
    ):
        data.load_pairs(path)
    with pytest.raises(
        ValueError,
        match=rf"pairs\.jsonl:1: image not found: .*resolve against --image_root "
        rf"{tmp_path}",
    ):
        data.load_pairs(path, str(tmp_path))
    os.symlink(os.path.join(FIX, "images"), tmp_path / "data" / "images")
    write_jsonl(path, [pair(0), pair(1, image=jpg)])  # images/... beside the file, no --image_root
    assert [r["image"] for r in data.load_pairs(path)] == [
        str(tmp_path / "data" / pair(0)["image"]),
        jpg,
    ]


def test_vlfeedback_images_unzipped_beside_its_jsonl(tmp_path):
    """VLFeedback's merged_images.zip unzipped beside vlfeedback_80k.jsonl gives merged_images/<id>.jpg
    there (the dataset repo's VLFeedback.py reads that layout): found without --image_root."""
    import shutil

    shutil.copy(os.path.join(FIX, "vlfeedback", "vlfeedback_80k.jsonl"), tmp_path)
    shutil.copytree(os.path.join(FIX, "images", "merged_images"), tmp_path / "merged_images")
    recs = data.load_pairs(f"vlfeedback:{tmp_path}")
    assert len(recs) == 2
    assert recs[0]["image"] == os.path.join(
        str(tmp_path), "merged_images", "fixture-detail-0001.jpg"
    )
    shutil.rmtree(tmp_path / "merged_images")
    with pytest.raises(
        ValueError,
        match=r"vlfeedback_80k\.jsonl: line 1: image not found: .*merged_images/"
        r"fixture-detail-0001\.jpg \(.*--image_root",
    ):
        data.load_pairs(f"vlfeedback:{tmp_path}")


def test_write_then_read_pairs(tmp_path):
    recs = world.world_pairs(world.World(0), 3)
    data.write_pairs(str(tmp_path / "p.jsonl"), recs)
    back = data.read_pairs(str(tmp_path / "p.jsonl"))
    assert [r["chosen"] for r in back] == [r["chosen"] for r in recs]
    assert data.open_image(back[0]["image"]).tobytes() == recs[0]["image"].tobytes()


# -----------------------------------------------------------------------------
# Packed scoring: one forward per pair equals one forward per response


def separate_logps(vlm, item, k):
    ids = torch.tensor([item["prompt"] + item["responses"][k]])
    labels = torch.tensor([[-100] * len(item["prompt"]) + item["responses"][k]])
    px = vlm.image_processor([data.open_image(item["image"])])
    with torch.no_grad():
        h = vlm.hidden(ids, **px)
        return losses.sequence_logps(vlm.lm_head(h), labels).item(), h[0, -1]


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def scored_model(request, tmp_path_factory):
    if request.param == "llava":
        return VLM.from_pretrained(world.BASE_MODEL)
    path = str(tmp_path_factory.mktemp("next"))
    build_hf(path, model_type="llava_next")
    return VLM.from_pretrained(path)


def test_packed_pairs_equal_separate_forwards(scored_model):
    vlm = scored_model.eval()
    recs = world.world_pairs(world.World(0), 6)
    recs[1]["rejected2"] = "There is one object."
    recs = [r | dict(rejected2=r.get("rejected2", r["rejected"] + " Yes.")) for r in recs]
    if vlm.cfg.model_type == "llava_next":  # AnyRes: images of other shapes
        recs[0]["image"] = recs[0]["image"].resize((40, 70))
        recs[2]["image"] = recs[2]["image"].resize((90, 30))
    items, _ = data.prepare_pairs(vlm, recs)
    pm = train.PairModel(vlm)
    rm = train.PairModel(vlm, head="reward")
    batch = data.collate_pairs(vlm, items)
    with torch.no_grad():
        lp, n = pm(**batch)[0].sum(-1), train.counts(batch)
        _, sc = rm(**batch)
    assert lp.shape == (6, 3)
    for b, it in enumerate(items):
        for k in range(3):
            want, last_h = separate_logps(vlm, it, k)
            assert abs(lp[b, k].item() - want) < 1e-4 * max(1, abs(want)), (b, k)
            assert n[b, k] == len(it["responses"][k])
            assert torch.allclose(sc[b, k], rm.score(last_h).squeeze(), atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_packed_pairs_through_flex_attention(monkeypatch):
    """CUDA's path for packed pairs (FlexAttention, here eager: forward only) gives the dense mask's log-probs on
    the world's image pairs of unequal lengths, as the reference pass and evaluation run them."""
    vlm = VLM.from_pretrained(world.BASE_MODEL).eval()
    items, _ = data.prepare_pairs(vlm, world.world_pairs(world.World(0), 4))
    batch = data.collate_pairs(vlm, items)
    assert (batch["segment"] == -1).any()  # some rows padded
    pm = train.PairModel(vlm)
    with torch.no_grad():
        dense = pm(**batch)[0]
        monkeypatch.setattr(M, "FLEX_DEVICES", ("cuda", "cpu"))
        flex = pm(**batch)[0]
    assert (flex - dense).abs().max() <= 1e-5


# -----------------------------------------------------------------------------
# train_offline.py end to end


SMALL = ["--pairs", "64", "--batch_size", "8", "--eval_n", "0"]  # 58 training pairs, 6 held out


def run_metrics(path):
    return [json.loads(line) for line in open(path) if '"eval/' not in line]


def same(
    a, b, keys=("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "grad_norm"), tol=1e-5
):
    """Equal metrics up to tol (relative above 1), plus one step of the 5-decimal rounding they are logged with."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in keys:
            assert abs(x[k] - y[k]) <= tol * max(1.0, abs(x[k])) + 1.01e-5, (
                x["step"],
                k,
                x[k],
                y[k],
            )


def test_dpo_trains_saves_and_caches_reference(tmp_path):
    out, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    # plain DPO
    to.main(SMALL + ["--steps", "3", "--rpo_alpha", "0", "--out_dir", out, "--cache_dir", cache])
    recs = run_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in recs] == [0, 1, 2]
    # the policy starts at ref
    assert abs(recs[0]["loss"] - math.log(2)) < 1e-4 and recs[0]["rewards/margins"] == 0
    for k in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "lr",
        "grad_norm",
        "epoch",
    ):
        assert k in recs[-1]
    ev = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"eval/' in line]
    assert 0 <= ev[0]["eval/rewards/accuracies"] <= 1
    assert len(os.listdir(cache)) == 1
    vlm = VLM.from_pretrained(os.path.join(out, "checkpoint"))  # adapters merged, HF layout
    assert not any("lora" in n for n, _ in vlm.named_parameters())
    # the cached reference equals the adapters-off reference: same first step with --ref lora_off
    out2 = str(tmp_path / "run2")
    to.main(
        SMALL
        + [
            "--steps",
            "1",
            "--out_dir",
            out2,
            "--cache_dir",
            cache,
            "--ref",
            "lora_off",
            "--lr_projector",
            "0",
        ]
    )
    with pytest.raises(ValueError, match="--ref lora_off needs"):  # checked before the model loads
        to.main(
            SMALL
            + [
                "--steps",
                "1",
                "--out_dir",
                str(tmp_path / "x"),
                "--ref",
                "lora_off",
                "--model",
                str(tmp_path / "no-such-model"),
            ]
        )
    to.main(
        SMALL
        + [
            "--steps",
            "1",
            "--out_dir",
            str(tmp_path / "run3"),
            "--cache_dir",
            cache,
            "--lr_projector",
            "0",
        ]
    )
    assert len(os.listdir(cache)) == 1  # read back, not recomputed
    same(
        run_metrics(os.path.join(out2, "metrics.jsonl")),
        run_metrics(str(tmp_path / "run3" / "metrics.jsonl")),
    )


def test_world_partners_data_trains(tmp_path, capsys):
    """--data world+partners (opt-in) builds its pairs from the world, as --data world does, and trains."""
    out = str(tmp_path / "run")
    to.main(
        SMALL
        + [
            "--data",
            "world+partners",
            "--steps",
            "1",
            "--out_dir",
            out,
            "--cache_dir",
            str(tmp_path / "c"),
        ]
    )
    assert (
        '"pairs": 64' in capsys.readouterr().out
        and len(run_metrics(os.path.join(out, "metrics.jsonl"))) == 1
    )


def test_caches_default_to_the_shared_folder_and_a_run_ends_with_a_summary(
    tmp_path, monkeypatch, capsys
):
    """Without --cache_dir the reference log-probs go to $MMALIGN_CACHE (printed at the start), never
    the current directory; the bar shows each step's loss; the run closes with its steps, final loss
    and reward accuracy, and where the checkpoint is."""
    cache, cwd, out = tmp_path / "cache", tmp_path / "cwd", str(tmp_path / "run")
    cwd.mkdir()
    monkeypatch.setenv(hub.CACHE_ENV, str(cache))
    monkeypatch.chdir(cwd)
    to.main(SMALL + ["--steps", "2", "--out_dir", out])
    cap = capsys.readouterr()
    assert f"cache: {cache} (--cache_dir, $MMALIGN_CACHE)" in cap.out
    assert (
        len([f for f in os.listdir(cache) if f.startswith("ref-")]) == 1 and os.listdir(cwd) == []
    )
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    last, held = lines[-2], lines[-1]
    # the bar's postfix
    assert f"loss={last['loss']:.4f}, acc={last['rewards/accuracies']:.2f}" in cap.err
    assert (
        f"done: 2 steps, final loss {last['loss']:.4f}, reward accuracy {100 * last['rewards/accuracies']:.1f}%, "
        f"held-out reward accuracy {100 * held['eval/rewards/accuracies']:.1f}%; checkpoint in "
        f"{os.path.join(out, 'checkpoint')}\n"
    ) in cap.out


def test_cache_home(monkeypatch, tmp_path):
    """$MMALIGN_CACHE, else $XDG_CACHE_HOME/mmalign (an absolute one), else ~/.cache/mmalign."""
    # conftest.py: the tests never write into the home
    assert os.environ[hub.CACHE_ENV] == hub.cache_home()
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "c"))
    assert hub.cache_home() == str(tmp_path / "c")
    monkeypatch.delenv(hub.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_home() == str(tmp_path / "xdg" / "mmalign")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for xdg in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        assert hub.cache_home() == str(tmp_path / "home" / ".cache" / "mmalign")


@pytest.mark.parametrize("loss", ["ipo", "slic", "rm", "rpo"])
def test_other_losses_run(tmp_path, capsys, loss):
    extra = ["--loss", "dpo", "--rpo_alpha", "1.0"] if loss == "rpo" else ["--loss", loss]
    extra += ["--rpo_alpha", "0"] if loss == "slic" else []
    to.main(
        SMALL
        + ["--steps", "2", "--out_dir", str(tmp_path), "--cache_dir", str(tmp_path / "c")]
        + extra
    )
    said = {
        "ipo": "IPO (β 1.0) + 1.0 × NLL, 1 rejected",
        "slic": "SLiC (β 1.0), 1 rejected",
        "rm": "Bradley–Terry reward model",
        "rpo": "DPO (β 1.0) + 1.0 × NLL, 1 rejected",
    }[loss]
    out = capsys.readouterr().out
    assert (
        out.count("objective: ") == 1
        and f"objective: {said}; 6 pairs held out, 58 to train on" in out
    )
    recs = run_metrics(str(tmp_path / "metrics.jsonl"))
    assert len(recs) == 2 and all(math.isfinite(r["loss"]) for r in recs)
    if loss == "rpo":  # log 2 plus the chosen responses' mean per-token NLL at the start
        assert recs[0]["loss"] > math.log(2) + 1e-3
    if loss == "rm":  # the head is saved with the model and loads back
        vlm = VLM.from_pretrained(str(tmp_path / "checkpoint"))
        assert vlm.extra["score.weight"].shape == (1, vlm.cfg.text.hidden_size)


def torchrun(n, args, timeout=300, script="train_offline.py"):
    """Runs a training script on n gloo ranks; a failure shows the output's tail. The free port is found by binding
    and releasing it, so another process can take it in between: a rendezvous that finds it taken is retried."""
    for _attempt in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(n),
            "--master_port",
            str(port),
            os.path.join(ROOT, script),
        ] + args
        p = subprocess.run(
            cmd,
            timeout=timeout,
            cwd=ROOT,
            env=os.environ | {"OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if p.returncode == 0:
            return
        if "address already in use" not in p.stdout.lower():
            break
    raise AssertionError(f"torchrun exited with {p.returncode}:\n{p.stdout[-4000:]}")


def test_two_ranks_equal_one(tmp_path):
    """Same global batch: DDP over 2 gloo ranks (and FSDP2) gives one process's losses and gradient norms."""
    common = SMALL + ["--steps", "3", "--grad_accum", "2", "--cache_dir", str(tmp_path / "c")]
    to.main(common + ["--out_dir", str(tmp_path / "one")])
    torchrun(2, common + ["--out_dir", str(tmp_path / "ddp")])
    torchrun(2, common + ["--out_dir", str(tmp_path / "fsdp"), "--fsdp", "true"])
    one = run_metrics(str(tmp_path / "one" / "metrics.jsonl"))
    same(one, run_metrics(str(tmp_path / "ddp" / "metrics.jsonl")))
    same(one, run_metrics(str(tmp_path / "fsdp" / "metrics.jsonl")), tol=1e-4)
    a, b = (
        VLM.from_pretrained(str(tmp_path / "one" / "checkpoint")),
        VLM.from_pretrained(str(tmp_path / "fsdp" / "checkpoint")),
    )
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_two_nodes_equal_one_rank(tmp_path):
    """Two torchrun agents of 2 ranks each (--nnodes 2 on this host): FSDP2 as HSDP, sharded within a node and
    replicated across the two, gives one process's losses, and those of FSDP2 on 2 ranks."""
    common = SMALL + [
        "--steps",
        "2",
        "--grad_accum",
        "2",
        "--fsdp",
        "true",
        "--cache_dir",
        str(tmp_path / "c"),
    ]
    to.main(common + ["--out_dir", str(tmp_path / "one")])
    torchrun(2, common + ["--out_dir", str(tmp_path / "two")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(node),
                "--nproc_per_node",
                "2",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                os.path.join(ROOT, "train_offline.py"),
            ]
            + common
            + ["--out_dir", str(tmp_path / "nodes")],
            cwd=ROOT,
            env=os.environ | {"OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    outs = [a.communicate(timeout=240)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "FSDP2: sharded over 2 ranks, replicated across 2 nodes (HSDP)" in outs[0]
    one = run_metrics(str(tmp_path / "one" / "metrics.jsonl"))
    same(one, run_metrics(str(tmp_path / "two" / "metrics.jsonl")), tol=1e-4)
    same(one, run_metrics(str(tmp_path / "nodes" / "metrics.jsonl")), tol=1e-4)


# rank 1 stands for a node that does not see some files: os.path.exists says no for the prefixes in $HIDE
HIDE = """import os, runpy, sys
hidden = os.environ["HIDE"].split(",")
real = os.path.exists


def exists(p):
    return real(p) and not (os.environ["RANK"] == "1" and any(os.path.abspath(p).startswith(h) for h in hidden))


os.path.exists = exists
sys.path.insert(0, os.environ["ROOT"])
sys.argv[0] = os.path.join(os.environ["ROOT"], "train_offline.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_rank_0_decides_what_is_on_disk(tmp_path, monkeypatch):
    """Nodes that see different files: rank 0's view of the reference cache and of the training state decides for
    every rank, and its reference tensor reaches the others; an out_dir a rank cannot see stops the run, saying
    that it must be shared."""
    (tmp_path / "hide.py").write_text(HIDE)
    common = SMALL + ["--steps", "2", "--cache_dir", str(tmp_path / "c")]
    to.main(common + ["--out_dir", str(tmp_path / "one")])  # writes the reference cache
    monkeypatch.setenv("ROOT", ROOT)
    monkeypatch.setenv("HIDE", f"{tmp_path / 'c'},{tmp_path / 'two' / 'state.pt'}")
    # the old code hangs: rank 1 alone recomputes
    run = dict(script=str(tmp_path / "hide.py"), timeout=180)
    torchrun(2, common + ["--out_dir", str(tmp_path / "two")], **run)
    same(
        run_metrics(str(tmp_path / "one" / "metrics.jsonl")),
        run_metrics(str(tmp_path / "two" / "metrics.jsonl")),
    )
    # complete: a no-op
    torchrun(2, common + ["--out_dir", str(tmp_path / "two"), "--resume", "true"], **run)
    monkeypatch.setenv("HIDE", str(tmp_path / "three" / ".shared-"))
    with pytest.raises(
        AssertionError,
        match=r"rank 1 \(host .*\) cannot see: --out_dir must be a folder shared "
        r"by every node",
    ):
        torchrun(2, common + ["--out_dir", str(tmp_path / "three")], **run)


def test_a_folder_a_rank_cannot_see_is_a_one_line_user_error(tmp_path):
    """Ranks.check_shared: a rank that does not see rank 0's token stops the run with a UserFileError (run_main's
    one line, no traceback) naming the flag, the folder and the ranks that cannot see it."""
    ranks = train.Ranks.__new__(train.Ranks)  # rank 0 of 2, without a process group
    ranks.W, ranks.rank, ranks.host = 2, 0, "node-a"
    ranks.broadcast, ranks.barrier = (lambda obj: obj), (lambda: None)
    ranks.gather_dict = lambda d: d | {1: "node-b"}  # rank 1 saw nothing
    with pytest.raises(UserFileError) as e:
        ranks.check_shared(str(tmp_path), "--cache_dir")
    said = str(e.value)
    assert said.startswith(f"--cache_dir {tmp_path}: rank 0 (host node-a) wrote a file there that ")
    assert "rank 1 (host node-b) cannot see" in said and "\n" not in said
    assert os.listdir(tmp_path) == []  # rank 0's token is gone


def test_rank_0_decides_whether_the_bdhs_pairs_exist(tmp_path, monkeypatch):
    """BDHS pairs built on 2 ranks, then a run where rank 1 does not see them: it reads them, not rebuilds."""
    (tmp_path / "hide.py").write_text(HIDE)
    common = [
        "--data",
        "bdhs",
        "--pairs",
        "32",
        "--batch_size",
        "8",
        "--steps",
        "1",
        "--eval_n",
        "0",
        "--cache_dir",
        str(tmp_path / "c"),
    ]
    monkeypatch.setenv("ROOT", ROOT)
    monkeypatch.setenv("HIDE", str(tmp_path / "nothing"))
    run = dict(script=str(tmp_path / "hide.py"), timeout=180)
    torchrun(2, common + ["--out_dir", str(tmp_path / "one")], **run)
    parts = sorted((tmp_path / "c").glob("bdhs-*/pairs.jsonl.rank*"))
    assert len(parts) == 4  # each rank's pairs (their settings inside) and .done
    built = [p.stat().st_mtime_ns for p in parts]
    monkeypatch.setenv("HIDE", str(tmp_path / "c" / "bdhs-"))
    torchrun(2, common + ["--out_dir", str(tmp_path / "two")], **run)
    assert [p.stat().st_mtime_ns for p in parts] == built


def kill_midway(script, args, out, at=2, timeout=120):
    """Runs a training script into `out` and SIGKILLs it once its saved training state reaches step `at`; -> the
    step of the state it left behind."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, script)] + args + ["--out_dir", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = out / "state.pt"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and torch.load(state, weights_only=True)["step"] >= at:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return torch.load(state, weights_only=True)["step"]


def test_kill_and_resume_gives_the_uninterrupted_metrics(tmp_path, capsys):
    common = SMALL + ["--steps", "12", "--save_every", "1", "--cache_dir", str(tmp_path / "c")]
    to.main(common + ["--out_dir", str(tmp_path / "whole")])
    done = open(tmp_path / "whole" / "metrics.jsonl").read()
    capsys.readouterr()
    to.main(common + ["--out_dir", str(tmp_path / "whole"), "--resume", "true"])  # done: a no-op
    assert "the run is complete" in capsys.readouterr().out
    assert open(tmp_path / "whole" / "metrics.jsonl").read() == done
    out = tmp_path / "killed"
    killed_at = kill_midway("train_offline.py", common, out)
    assert 2 <= killed_at < 11, killed_at  # really killed mid-way
    (out / "checkpoint.tmp999999").mkdir()  # a killed save's leftover: removed at start
    to.main(common + ["--out_dir", str(out), "--resume", "true"])
    assert not (out / "checkpoint.tmp999999").exists()
    same(
        run_metrics(str(tmp_path / "whole" / "metrics.jsonl")),
        run_metrics(str(out / "metrics.jsonl")),
        tol=1e-6,
    )
    with pytest.raises(UserError, match=r"other settings: --beta 0.2 \(the run's: 1.0\)"):
        to.main(common + ["--out_dir", str(out), "--resume", "true", "--beta", "0.2"])


def test_bf16_stores_the_base_in_bf16_and_the_reference_runs_as_the_policy(tmp_path):
    """--dtype bfloat16: the frozen base in bf16, what trains and AdamW's moments in fp32, and the reference
    pass under the policy's autocast, so that at step 0 policy and reference agree exactly."""
    cache = str(tmp_path / "c")
    # --batch_size 4 is cut in PARTS = 4 parts of one pair each: step 0's own batches are single pairs
    args = SMALL + [
        "--batch_size",
        "4",
        "--dtype",
        "bfloat16",
        "--lr_projector",
        "0",
        "--cache_dir",
        cache,
    ]
    cfg = cli.config_from_argv(
        to.Config, args + ["--lr_projector", "1e-4", "--out_dir", str(tmp_path / "x")]
    )
    ranks = train.Ranks()
    # TF32 on CUDA only: the CPU's fp32 stays exact
    assert not torch.backends.cuda.matmul.allow_tf32
    torch.manual_seed(0)
    pm, _, opt = train.build_policy(cfg, ranks, lr_projector=cfg.lr_projector)
    lm = pm.vlm.model.language_model
    for frozen in (
        pm.vlm.model.vision_tower.embeddings.patch_embedding.weight,
        lm.embed_tokens.weight,
        lm.layers[0].self_attn.q_proj.weight,
        lm.norm.weight,
        pm.vlm.lm_head.weight,
    ):
        assert frozen.dtype == torch.bfloat16 and not frozen.requires_grad
    trained = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trained) and any(
        "multi_modal_projector" in n for n in trained
    )
    assert all(p.dtype == torch.float32 for p in trained.values()), {
        n: p.dtype for n, p in trained.items()
    }
    items, train_idx, _ = to.load_pairs(cfg, pm.vlm, ranks)
    batch = train.to(data.collate_pairs(pm.vlm, [items[i] for i in train_idx[:2]]), "cpu")
    with train.autocast(cfg, "cpu"):
        lp = pm(**batch)[0]
    assert lp.dtype == torch.float32  # log-probs in fp32, from bf16 logits
    lp.sum().backward()
    opt.step()
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    # the cache built in single pairs, step 0's own batches (above); then step 0 from it, and with lora_off
    torch.manual_seed(0)
    pm = train.build_policy(cfg, ranks, lr_projector=0.0)[0]
    ref = to.reference_logps(cfg, pm, items, 1, ranks)
    for idx in train.by_length(
        [train_idx[i] for i in train.batch_rows(len(train_idx), cfg, 0, 0, 4, ranks)], items
    ):
        batch = train.to(data.collate_pairs(pm.vlm, [items[i] for i in idx]), "cpu")
        with train.autocast(cfg, "cpu"):
            assert torch.equal(pm(**batch)[0].sum(-1), ref[idx])
            # --ref lora_off's reference
            assert (train.reference(pm, batch) - ref[idx]).abs().max() <= 1e-6
    to.main(args + ["--steps", "1", "--out_dir", str(tmp_path / "cache")])
    to.main(args + ["--steps", "1", "--out_dir", str(tmp_path / "off"), "--ref", "lora_off"])
    got = run_metrics(str(tmp_path / "cache" / "metrics.jsonl"))[0]
    # exactly: no c > r
    assert got["rewards/chosen"] == got["rewards/rejected"] == got["rewards/accuracies"] == 0
    same([got], run_metrics(str(tmp_path / "off" / "metrics.jsonl")), tol=1e-6)


def record_saves(monkeypatch, out, stop_at=None):
    """Wraps Checkpoint.save: after each save, what out_dir holds (a list of dicts, one a save); a save at step
    `stop_at` then raises Stopped, as a kill right after it would."""
    seen, real = [], train.Checkpoint.save

    def save(self, step, final=False):
        real(self, step, final)
        seen.append(
            dict(
                step=step,
                final=final,
                bytes=os.path.getsize(out / "state.pt"),
                hf=os.path.exists(out / "checkpoint"),
                st=torch.load(out / "state.pt", weights_only=True),
            )
        )
        if step == stop_at:
            raise Stopped

    monkeypatch.setattr(train.Checkpoint, "save", save)
    return seen


class Stopped(Exception):
    pass


def test_saves_mid_run_hold_only_what_trains(tmp_path, monkeypatch):
    """Issue 29 item 4: a save mid-run is state.pt alone: the trainable tensors and their AdamW moments, at most
    3.1x the trainable parameters' fp32 bytes, no frozen tensor and no merged checkpoint. The last step writes the
    merged checkpoint, which transformers loads with the logits of the base plus state.pt's trainable tensors; a
    run resumed from a save mid-run ends with the uninterrupted run's tensors, bit for bit."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    # an older run's (as under --overwrite): gone at the first save
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "config.json").write_text("{}")
    seen = record_saves(monkeypatch, out)
    argv = SMALL + [
        "--steps",
        "3",
        "--save_every",
        "1",
        "--out_dir",
        str(out),
        "--cache_dir",
        str(tmp_path / "c"),
    ]
    to.main(argv)
    assert [(s["step"], s["final"], s["hf"]) for s in seen] == [
        (0, False, False),
        (1, False, False),
        (2, True, True),
    ]
    # the same model: the base, adapters, projector
    pm, _, _ = train.build_policy(to.Config(), train.Ranks(), lr_projector=to.Config.lr_projector)
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    n_train = sum(p.numel() for p in trainable.values())
    assert any("lora_A" in n for n in trainable) and any(
        "multi_modal_projector" in n for n in trainable
    )
    for s in seen:
        st = s["st"]
        assert s["bytes"] <= 3.1 * 4 * n_train, (s["bytes"], 4 * n_train)
        assert set(st["model"]) == set(trainable) == set(st["optimizer"]["state"])
        tensors = list(st["model"].values()) + [
            t for v in st["optimizer"]["state"].values() for t in v.values()
        ]
        assert all(t.dtype == torch.float32 for t in tensors)
        # weights, 2 moments, AdamW's steps
        assert sum(t.numel() for t in tensors) == 3 * n_train + len(trainable)
    # the final checkpoint: transformers' logits equal the base's with state.pt's trainable tensors put in
    pm.load_state_dict(seen[-1]["st"]["model"], strict=False)
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(
        str(out / "checkpoint")
    ).eval()
    ex = [world.World(0).example("broken", i) for i in range(2)]
    batch = pm.vlm.prepare(
        [e["messages"][0]["content"].removeprefix("<image>\n") for e in ex],
        [e["image"] for e in ex],
    )
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = pm.vlm(
            batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"]
        )
        b = theirs(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
            position_ids=pos,
        ).logits
    m = batch["attention_mask"].bool()
    assert (a[m] - b[m]).abs().max().item() < 1e-4
    # exact resume from the save of step 1: the same final tensors and moments
    torch.save(seen[1]["st"], out / "state.pt")
    to.main(argv + ["--resume", "true"])
    assert (seen[-1]["step"], seen[-1]["hf"]) == (2, True)
    for k, v in seen[2]["st"]["model"].items():
        assert torch.equal(seen[-1]["st"]["model"][k], v), k
        for name, t in seen[2]["st"]["optimizer"]["state"][k].items():
            assert torch.equal(seen[-1]["st"]["optimizer"]["state"][k][name], t), (k, name)


def test_fsdp_resumes_a_save_mid_run_and_saves_what_trains(tmp_path, monkeypatch):
    """FSDP2 on 2 gloo ranks resumes a one-process run's save of step 0 (the trainable tensors, full, onto each
    rank's shards) and continues it: the same losses, and its saves (each trainable tensor gathered alone) equal
    the one-process run's."""
    common = SMALL + [
        "--steps",
        "3",
        "--save_every",
        "1",
        "--fsdp",
        "true",
        "--cache_dir",
        str(tmp_path / "c"),
    ]
    to.main(common + ["--out_dir", str(tmp_path / "one")])  # one process: --fsdp has no effect
    record_saves(monkeypatch, tmp_path / "two", stop_at=0)
    with pytest.raises(Stopped):
        to.main(common + ["--out_dir", str(tmp_path / "two")])
    torchrun(2, common + ["--out_dir", str(tmp_path / "two"), "--resume", "true"])
    same(
        run_metrics(str(tmp_path / "one" / "metrics.jsonl")),
        run_metrics(str(tmp_path / "two" / "metrics.jsonl")),
        tol=1e-4,
    )
    a, b = (torch.load(tmp_path / d / "state.pt", weights_only=True) for d in ("one", "two"))
    assert a["step"] == b["step"] == 2 and set(a["model"]) == set(b["model"])
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-5), k
        for name, t in a["optimizer"]["state"][k].items():
            assert torch.allclose(t, b["optimizer"]["state"][k][name], atol=1e-6), (k, name)
    VLM.from_pretrained(str(tmp_path / "two" / "checkpoint"))


# Under torchrun, 2 ranks: FSDP2's model and one optimizer step, then a save mid-run that counts what it gathers
SAVE_UNDER_FSDP = """
import json, sys
sys.path.insert(0, {root!r})
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
import train
import train_offline as to
gathered, unshards = [], []
full_tensor = DTensor.full_tensor
unshard = FSDPModule.unshard


def counted_full_tensor(self, *a, **k):
    gathered.append(self.shape.numel())
    return full_tensor(self, *a, **k)


def counted_unshard(self, *a, **k):
    unshards.append(1)
    return unshard(self, *a, **k)


DTensor.full_tensor = counted_full_tensor
FSDPModule.unshard = counted_unshard
cfg = to.Config(out_dir=sys.argv[1], fsdp=True)
ranks = train.Ranks()
pm, model, opt = train.build_policy(cfg, ranks, lr_projector=cfg.lr_projector)
for p in pm.parameters():
    if p.requires_grad:
        p.grad = torch.ones_like(p)
opt.step()
train.Checkpoint(cfg, pm, opt, ranks).save(0)
if ranks.rank == 0:
    trains = [p for p in pm.parameters() if p.requires_grad]
    with open(sys.argv[1] + "/counts.json", "w") as f:
        json.dump(dict(gathered=sorted(gathered), unshards=len(unshards), trainable=sorted(p.numel() for p in trains),
                       sharded=all(isinstance(p, DTensor) for p in trains)), f)
ranks.end()
"""


def test_a_save_under_fsdp_gathers_only_what_trains(tmp_path):
    """FSDP2 on 2 ranks: a save mid-run gathers each trainable tensor once (DTensor.full_tensor) and unshards no
    unit: the frozen model is never gathered."""
    script = tmp_path / "save.py"
    script.write_text(SAVE_UNDER_FSDP.format(root=ROOT))
    torchrun(2, [str(tmp_path)], script=str(script))
    got = json.loads((tmp_path / "counts.json").read_text())
    assert got["sharded"] and got["unshards"] == 0 and got["gathered"] == got["trainable"]
    assert sorted(os.listdir(tmp_path)) == ["counts.json", "save.py", "state.pt"]


# Under torchrun, 2 ranks: FSDP2 in bf16 with LoRA's B set to fp32 values that bf16 rounds, then the final save
FINAL_UNDER_FSDP_BF16 = """
import sys
sys.path.insert(0, {root!r})
import torch
import train
import train_offline as to
cfg = to.Config(out_dir=sys.argv[1], fsdp=True, dtype="bfloat16")
ranks = train.Ranks()
pm, model, opt = train.build_policy(cfg, ranks)
torch.manual_seed(ranks.rank)
with torch.no_grad():
    for n, p in pm.named_parameters():
        if n.endswith("lora_B"):
            p.to_local().normal_(0, 0.01)
train.Checkpoint(cfg, pm, opt, ranks).save(0, final=True)
ranks.end()
"""


def test_the_final_save_under_fsdp_bf16_merges_the_fp32_adapters(tmp_path):
    """FSDP2 all-gathers in bf16 under --dtype bfloat16: the merged checkpoint is computed from the fp32 factors
    that train (state.pt's), as in one process, not from their bf16 gather."""
    script = tmp_path / "save.py"
    script.write_text(FINAL_UNDER_FSDP_BF16.format(root=ROOT))
    torchrun(2, [str(tmp_path)], script=str(script))
    factors = torch.load(tmp_path / "state.pt", weights_only=True)["model"]
    base = VLM.from_pretrained(world.BASE_MODEL, dtype=torch.bfloat16)
    M.add_lora(base, 16, 32.0)
    got = dict(VLM.from_pretrained(str(tmp_path / "checkpoint")).named_parameters())
    merged = 0
    for name, mod in base.named_modules():
        if isinstance(mod, M.LoRALinear):
            mod.lora_A.data, mod.lora_B.data = (factors[f"vlm.{name}.lora_{x}"] for x in "AB")
            assert mod.lora_B.abs().sum() > 0 and mod.lora_B.dtype == torch.float32
            want = mod.merged_weight(torch.float32)  # the world's checkpoint is fp32
            assert torch.equal(got[f"{name}.weight"], want), name
            merged += 1
    assert merged > 0


def test_workers_decode_ahead_and_resume_exactly(tmp_path, monkeypatch):
    """--workers 2 (CUDA's default path, forced here on the host): a DataLoader's processes collate the same
    micro-batches as the loop does, so a run killed mid-way and resumed with them gives the uninterrupted in-loop
    run's metrics."""
    loaders = []

    class Spy(torch.utils.data.DataLoader):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            loaders.append(self.num_workers)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Spy)
    common = SMALL + ["--steps", "12", "--save_every", "1", "--cache_dir", str(tmp_path / "c")]
    to.main(common + ["--out_dir", str(tmp_path / "whole")])  # on the host: in the loop
    assert loaders == []
    out = tmp_path / "killed"
    killed_at = kill_midway("train_offline.py", common + ["--workers", "2"], out)
    assert 2 <= killed_at < 11, killed_at
    to.main(common + ["--out_dir", str(out), "--resume", "true", "--workers", "2"])
    assert loaders == [2]
    same(
        run_metrics(str(tmp_path / "whole" / "metrics.jsonl")),
        run_metrics(str(out / "metrics.jsonl")),
        tol=1e-6,
    )


def test_one_forward_per_micro_batch_on_a_gpu():
    """PARTS forwards of like lengths on the host, where they were tuned; one on CUDA (padding is cheaper there
    than PARTS forwards and FSDP gathers). The micro-step's data pickle (DataLoader workers may be spawned)."""
    items = [dict(prompt=[1] * n, responses=[[2], [3]]) for n in (5, 1, 4, 2, 8, 3, 7, 6)]
    rows = list(range(8))
    assert train.by_length(rows, items) == [[1, 3], [5, 2], [0, 7], [6, 4]]
    assert train.by_length(rows, items, "cuda") == [[1, 3, 5, 2, 0, 7, 6, 4]]
    vlm = VLM.from_pretrained(world.BASE_MODEL)
    cfg = to.Config(batch_size=4, grad_accum=2)
    recs = world.world_pairs(world.World(0), 8)
    items, _ = data.prepare_pairs(vlm, recs)
    ranks = types.SimpleNamespace(W=1, rank=0, device="cuda:0")
    ds = pickle.loads(
        pickle.dumps(train.MicroBatches(cfg, vlm, items, list(range(8)), 2, ranks, start=3))
    )
    ((idx, batch),) = ds[1]  # step 3, micro-step 1: one forward of both rows
    assert sorted(idx) == sorted(train.batch_rows(8, cfg, 3, 1, 2, ranks))
    want = data.collate_pairs(vlm, [items[i] for i in idx])
    assert all(torch.equal(batch[k], want[k]) for k in want)


def test_metrics_stay_on_the_device_until_one_read_per_step(tmp_path, monkeypatch):
    """pair_stats and accumulate read nothing back (no .item()); Metrics.write reads the step's sums and the
    grad norm in one tolist(). The sums are fp64 adds of the same fp32 sums, so equal to the old Python floats."""
    g = torch.Generator().manual_seed(0)
    parts = [
        [torch.randn(n, generator=g) for _ in range(3)] + [torch.randn(n, 2, 5, generator=g)]
        for n in (3, 5, 2)
    ]
    want = {}  # the old way: a Python float per part and key
    for loss, c, r, lp in parts:
        old = {
            "loss": loss,
            "rewards/chosen": c,
            "rewards/margins": c - r,
            "logps/rejected": lp.sum(-1)[:, 1],
        }
        for k, v in old.items():
            want[k] = want.get(k, 0.0) + v.sum().item()
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("a host sync per value"))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.numel()) or tolist(t))
    log = train.Metrics(to.Config(out_dir=str(tmp_path)), 0, train.Ranks())
    sums = {}
    for loss, c, r, lp in parts:
        train.accumulate(sums, train.pair_stats(loss, c, r, lp))
    assert all(torch.is_tensor(s) for s, _ in sums.values())
    log.sums = sums
    rec = log.write(0, grad_norm=torch.tensor(0.25), lr=1e-3)
    log.close()
    assert reads == [8]  # 7 metrics and the grad norm, in one read
    assert rec["grad_norm"] == 0.25 and rec["lr"] == 1e-3
    assert json.loads(open(tmp_path / "metrics.jsonl").read())["grad_norm"] == 0.25
    for k, v in want.items():
        assert train.to_host(sums)[0][k] == [v, 10], k  # exactly equal, not close
        assert rec[k] == round(v / 10, 5)


def test_grad_checkpointing_is_exact_and_bf16_runs(tmp_path):
    common = SMALL + ["--steps", "2", "--cache_dir", str(tmp_path / "c")]
    to.main(common + ["--out_dir", str(tmp_path / "plain")])
    to.main(common + ["--out_dir", str(tmp_path / "ckpt"), "--grad_ckpt", "true"])
    same(
        run_metrics(str(tmp_path / "plain" / "metrics.jsonl")),
        run_metrics(str(tmp_path / "ckpt" / "metrics.jsonl")),
    )
    to.main(common + ["--out_dir", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert all(
        math.isfinite(r["loss"]) for r in run_metrics(str(tmp_path / "bf16" / "metrics.jsonl"))
    )


def test_data_convert_writes_a_native_file(tmp_path):
    """`data.py --convert NAME:PATH --out F [--limit N --seed S]`: a native file that reads back as the
    release's records (in-memory images saved beside it), subsampled in the release's order."""
    for name, sub in (("povid", "povid"), ("rlhfv", "rlhf_v")):
        spec = f"{name}:{os.path.join(FIX, sub)}"
        out = str(tmp_path / name / "pairs.jsonl")
        data.main(["--convert", spec, "--image_root", os.path.join(FIX, "images"), "--out", out])
        want = data.load_pairs(spec, os.path.join(FIX, "images"))
        back = data.read_pairs(out)
        assert [(r["id"], r["chosen"], r["rejected"]) for r in back] == [
            (r["id"], r["chosen"], r["rejected"]) for r in want
        ]
        assert [data.open_image(r["image"]).tobytes() for r in back] == [
            data.open_image(r["image"]).tobytes() for r in want
        ]
    out = str(tmp_path / "two.jsonl")
    data.main(
        [
            "--convert",
            str(tmp_path / "povid" / "pairs.jsonl"),
            "--out",
            out,
            "--limit",
            "2",
            "--seed",
            "1",
        ]
    )
    ids = [r["id"] for r in data.read_pairs(out)]
    all_ids = [r["id"] for r in data.read_pairs(str(tmp_path / "povid" / "pairs.jsonl"))]
    assert len(ids) == 2 and ids == [i for i in all_ids if i in ids]
    with pytest.raises(UserError, match="--convert 'nope': not a file"):
        data.main(["--convert", "nope", "--out", out])
