"""A user's workflow end to end on a llava-hf-shaped folder (tests/tiny.py's build_llava_hf: a logit head padded past
the tokenizer, its padded rows, <image> and <pad> the likeliest logits; chat_template.jinja; processor_config.json;
a bf16 Mistral variant): model.py answers, bdhs.py builds pairs from a native prompts file, train_offline trains
LoRA on them (killed and resumed), eval.py scores the checkpoint on POPE and MMHal-Bench with a fake judge, and
train_online runs Online-DPO against a fake OpenAI-compatible annotator. Each step goes through the script's own
main(argv) (a subprocess where it is killed). Every sampling path (greedy, temperature, top-k, top-p, BDHS, online)
runs with several seeds, and no sampled id is past the tokenizer, the image token or the pad token.

At 13205e0 the first BDHS batch crashed (IndexError in StopStrings: a sampled padded row indexed a table sized by
the tokenizer), the saved checkpoint had no chat_template.jinja and was written in fp32."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import bdhs
import cli
import data
import eval as ev
import model as M
import train_offline as to
import train_online as on
from model import VLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_eval import fake_server  # noqa: E402
from test_offline import run_metrics, same  # noqa: E402
from tiny import JINJA, build_llava_hf, random_image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "tests", "fixtures", "bench")
QUESTION = "What is in the image?"
TRUTHS = [
    "A red cup is on the table. It is small.",
    "Yes, there is a dog.",
    "There are three objects.",
    "No.",
    "A green tree is at the top left.",
    "No, there is no dog. A cup is there.",
    "A blue ball.",
    "Yes. The ball is red.",
    "There are two cups on the table.",
    "A tree and a house.",
]

# train_offline in a subprocess that SIGKILLs itself within step AT, after step AT - 1's checkpoint and state are
# on disk: a kill mid-run at a step known in advance, however fast or slow the machine is
KILLED = """import os, signal, sys
sys.path.insert(0, {root!r})
import train
import train_offline as to
real_step = train.optimizer_step
def step_or_die(cfg, pm, opt, step, steps):
    if step == {at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(cfg, pm, opt, step, steps)
train.optimizer_step = step_or_die
to.main(sys.argv[1:])
"""


class Sampled:
    """Every id model.sample returns (each decode step, every row, finished rows too), with the sampling
    settings of its call, under the label of the workflow step that sampled it."""

    def __init__(self, monkeypatch):
        self.label, self.ids, self.modes = "", {}, {}
        real = M.sample

        def spy(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
            tok = real(logits, temperature, top_k, top_p, generator)
            self.ids.setdefault(self.label, []).extend(tok.tolist())
            self.modes.setdefault(self.label, set()).add((temperature, top_k, top_p))
            return tok

        # decode looks `sample` up in model's namespace at each step
        monkeypatch.setattr(M, "sample", spy)

    def check(self, label, info, modes=None):
        """The ids sampled under `label`: some, none banned; `modes`: the (temperature, top_k, top_p) seen."""
        ids = self.ids.get(label, [])
        banned = [t for t in ids if t >= info["tokens"] or t in (info["image"], info["pad"])]
        assert ids and not banned, (label, len(ids), banned[:10])
        if modes is not None:
            assert self.modes[label] == modes, (label, self.modes[label])


def prompts_file(folder):
    """A native prompts file (conversation, chosen; no rejected) with its images in images/ beside it, named by
    relative paths: the file's folder is what they resolve against."""
    os.makedirs(folder / "images")
    with open(folder / "prompts.jsonl", "w") as f:
        for i, truth in enumerate(TRUTHS):
            random_image(40 + 7 * i, 60 - 3 * i, seed=i).save(folder / "images" / f"{i}.png")
            f.write(
                json.dumps(
                    dict(
                        id=f"p{i}",
                        image=f"images/{i}.png",
                        chosen=truth,
                        conversation=[dict(role="user", content=f"<image>\n{QUESTION}")],
                    )
                )
                + "\n"
            )
    return str(folder / "prompts.jsonl")


def check_checkpoint(src, ckpt, dtype, text, cls_name):
    """The saved folder replaces its source: every file the source's tokenizer and processor read, as bytes
    (chat_template.jinja included), weights in the source's dtype with every config dtype agreeing, and
    transformers loads it, every key used, and applies its chat template."""
    import transformers

    for fn in (
        "chat_template.jinja",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (
            open(os.path.join(ckpt, fn), "rb").read() == open(os.path.join(src, fn), "rb").read()
        ), fn
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    name = str(dtype).removeprefix("torch.")
    said = [
        c[k]
        for c in (cfg, cfg["text_config"], cfg["vision_config"])
        for k in ("dtype", "torch_dtype")
        if k in c
    ]
    assert cfg["dtype"] == name and set(said) == {name}, said
    stored = {t.dtype for t in load_file(os.path.join(ckpt, "model.safetensors")).values()}
    assert stored == {dtype}
    hf, info = getattr(transformers, cls_name).from_pretrained(ckpt, output_loading_info=True)
    # no key missing, unexpected or mismatched
    assert hf.dtype == dtype and not any(info.values()), info
    proc = transformers.AutoProcessor.from_pretrained(ckpt)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    want = {
        "llama": f"USER: <image>\n{QUESTION} ASSISTANT:",
        "mistral": f"[INST] <image>\n{QUESTION} [/INST]",
    }
    assert proc.apply_chat_template(msgs, add_generation_prompt=True) == want[text]
    assert proc.chat_template == JINJA[text]


def test_a_users_workflow_on_a_llava_hf_folder(tmp_path, monkeypatch, capsys):
    base = str(tmp_path / "llava-next-llama")  # fp32, LLaVA-1.6's layout (anyres)
    info = build_llava_hf(base)[2]
    base_bf16 = str(tmp_path / "llava-mistral-bf16")  # bf16, LLaVA-1.5's layout, Mistral's template
    info_bf16 = build_llava_hf(
        base_bf16, text="mistral", dtype=torch.bfloat16, model_type="llava", seed=1
    )[2]
    prompts = prompts_file(tmp_path / "data")
    image = str(tmp_path / "data" / "images" / "0.png")
    spy = Sampled(monkeypatch)

    # 1. model.py answers a question about an image, greedy and at temperature 1, on both folders
    for folder, inf, template in ((base, info, "llava"), (base_bf16, info_bf16, "mistral")):
        argv = ["--model", folder, "--image", image, "--prompt", QUESTION, "--max_new_tokens", "8"]
        spy.label = f"greedy {template}"
        assert isinstance(M.main(argv), str)
        spy.check(spy.label, inf, {(0.0, None, None)})
        spy.label = f"temperature {template}"
        for seed in ("0", "1", "2"):
            assert isinstance(M.main(argv + ["--temperature", "1.0", "--seed", seed]), str)
        spy.check(spy.label, inf, {(1.0, None, None)})
        assert (
            f"chat template: {template} (from {os.path.join(folder, 'chat_template.jinja')})"
            in capsys.readouterr().out
        )

    # 2. bdhs.py on the native prompts file: BDHS's rejected for every prompt, two seeds
    spy.label = "bdhs"
    for seed in ("0", "1"):
        out = str(tmp_path / f"bdhs{seed}" / "pairs.jsonl")
        bdhs.main(
            [
                "--model",
                base,
                "--source",
                prompts,
                "--out",
                out,
                "--n_bdhs",
                "2",
                "--sentence_tokens",
                "6",
                "--max_new_tokens",
                "8",
                "--batch_size",
                "4",
                "--seed",
                seed,
            ]
        )
        pairs = data.read_pairs(out)  # relative image paths, resolved against the file's folder
        assert [r["id"] for r in pairs] == [f"p{i}" for i in range(len(TRUTHS))]
        assert [r["chosen"] for r in pairs] == TRUTHS and all(
            isinstance(r["rejected"], str) for r in pairs
        )
        assert all(
            os.path.samefile(r["image"], tmp_path / "data" / "images" / f"{i}.png")
            for i, r in enumerate(pairs)
        )
    spy.check("bdhs", info)
    pairs = str(tmp_path / "bdhs0" / "pairs.jsonl")
    # POVID-style distortion: each position's argmax, the image under noise; one attempt, never compared to the
    # truth, so its bar shows no non-similar share (it showed 0%)
    capsys.readouterr()
    distort = str(tmp_path / "distort" / "pairs.jsonl")
    bdhs.main(["--model", base, "--source", prompts, "--out", distort, "--variant", "distort"])
    bar = capsys.readouterr().err
    assert "BDHS distort: 100%" in bar and "non_similar" not in bar
    assert all(r["rejected"] and "<image>" not in r["rejected"] for r in data.read_pairs(distort))

    # 3. train_offline with LoRA on those pairs: killed mid-run and resumed with --resume alone, it ends with the
    # uninterrupted run's metrics; its checkpoint replaces the fp32 source
    common = [
        "--model",
        base,
        "--data",
        pairs,
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--steps",
        "5",
        "--batch_size",
        "3",
        "--warmup",
        "2",
        "--save_every",
        "1",
        "--eval_n",
        "0",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    to.main(common + ["--out_dir", str(whole)])
    run = subprocess.run(
        [sys.executable, "-c", KILLED.format(root=ROOT, at=3)]
        + common
        + ["--out_dir", str(killed)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    # killed within step 3 of 0-4
    assert torch.load(killed / "state.pt", weights_only=True)["step"] == 2
    # the run's settings come from its state
    to.main(["--out_dir", str(killed), "--resume", "true"])
    assert "resuming at step 3" in capsys.readouterr().out
    same(
        run_metrics(str(whole / "metrics.jsonl")),
        run_metrics(str(killed / "metrics.jsonl")),
        tol=1e-6,
    )
    ckpt = str(killed / "checkpoint")
    check_checkpoint(base, ckpt, torch.float32, "llama", "LlavaNextForConditionalGeneration")

    # the trained checkpoint through the library: LoRA merged into the LLM's linears (the vision tower untouched);
    # top-k and top-p sampling on a left-padded batch, three seeds
    vlm = VLM.from_pretrained(ckpt).eval()
    src = VLM.from_pretrained(base).state_dict()
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(vlm.state_dict()[q], src[q])
    assert all(torch.equal(v, src[k]) for k, v in vlm.state_dict().items() if ".vision_tower." in k)
    batch = vlm.prepare(
        [QUESTION, "Describe the picture in detail, please."],
        [data.open_image(image), data.open_image(str(tmp_path / "data" / "images" / "5.png"))],
    )
    for label, kw in (("top-k", dict(top_k=5)), ("top-p", dict(top_p=0.9))):
        spy.label = label
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            out = vlm.generate(**batch, max_new_tokens=8, temperature=1.0, generator=gen, **kw)
            assert len(out) == 2
        spy.check(label, info, {(1.0, kw.get("top_k"), kw.get("top_p"))})

    # 4. eval.py on the base and the trained checkpoint: POPE, and MMHal-Bench judged by a fake endpoint
    state, httpd = fake_server()
    try:
        state["reply"] = lambda body: "The answer is fine.\nRating: 5"
        monkeypatch.setenv("JUDGE_BASE_URL", state["url"])
        monkeypatch.setenv("JUDGE_API_KEY", "sk-test")
        spy.label = "eval"
        out = tmp_path / "eval" / "results.json"
        rows = ev.main(
            [
                "--model",
                f"base={base},aligned={ckpt}",
                "--bench",
                "pope,mmhal",
                "--bench_dir",
                BENCH,
                "--out",
                str(out),
                "--max_new_tokens",
                "8",
            ]
        )
        spy.check("eval", info, {(0.0, None, None)})
        assert set(rows) == {"base", "aligned"}
        for r in rows.values():
            assert r["mmhal"] == 5 and all(
                0 <= r[f"pope_{k}_f1"] <= 100 for k in ("random", "popular", "adversarial")
            )
        answers = [json.loads(line) for line in open(tmp_path / "eval" / "answers.jsonl")]
        assert len(answers) == 2 * (6 + 2)  # per model: POPE's 6 fixture questions, MMHal's 2
        assert all(isinstance(a["answer"], str) and "<image>" not in a["answer"] for a in answers)
        asked = {(a["id"], a["answer"]) for a in answers if a["bench"] == "mmhal"}
        # MMHal's answers judged, an answer two models share once
        assert len(state["bodies"]) == len(asked)

        # 5. train_online: Online-DPO on the bf16 Mistral folder and 4 of the native prompts (data.py --convert
        # draws them; a prompts file has no rejected, which --convert required), judged by an OpenAI-compatible
        # endpoint that always prefers Response 1; two seeds
        few = str(tmp_path / "few" / "prompts.jsonl")
        assert (
            len(data.main(["--convert", prompts, "--out", few, "--limit", "4", "--seed", "1"])) == 4
        )
        assert f"wrote 4 prompts to {few}" in capsys.readouterr().out
        mixed = tmp_path / "data" / "mixed.jsonl"  # a pair (its image path absolute), then a prompt
        # (line 0 of a bdhs.py file: the settings that made its pairs)
        mixed.write_text(open(pairs).readlines()[1] + open(prompts).readlines()[1])
        with pytest.raises(
            cli.UserError, match="record 'p1' has no 'rejected' though others have one"
        ):
            data.main(["--convert", str(mixed), "--out", str(tmp_path / "x.jsonl")])
        state["reply"] = lambda body: "Response 1 is better: it names what is in the image."
        state["bodies"].clear()
        spy.label = "online"
        for seed in ("0", "1"):
            out_dir = tmp_path / f"online{seed}"
            on.main(
                [
                    "--model",
                    base_bf16,
                    "--data",
                    few,
                    "--algo",
                    "online-dpo",
                    "--annotator",
                    "api:judge-x",
                    "--steps",
                    "2",
                    "--batch_size",
                    "2",
                    "--max_new_tokens",
                    "8",
                    "--eval_n",
                    "0",
                    "--seed",
                    seed,
                    "--out_dir",
                    str(out_dir),
                ]
            )
            recs = run_metrics(str(out_dir / "metrics.jsonl"))
            assert [r["step"] for r in recs] == [0, 1] and all(
                r["online/unparsed"] == 0 for r in recs
            )
        spy.check("online", info_bf16, {(1.0, None, None)})
        assert len(state["bodies"]) == 2 * 2 * 2 and {b["model"] for b in state["bodies"]} == {
            "judge-x"
        }
    finally:
        httpd.shutdown()
    check_checkpoint(
        base_bf16,
        str(tmp_path / "online0" / "checkpoint"),
        torch.bfloat16,
        "mistral",
        "LlavaForConditionalGeneration",
    )
