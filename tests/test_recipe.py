"""The paper's recipe, in the command shape the README gives for 8 GPUs and for 2 nodes x 8:
torchrun, FSDP2, LoRA r 128 / alpha 256, bf16, DPO at β 0.1 with the paper's learning rates, here
on 2 gloo ranks, a tiny random LLaVA-1.6-shaped (llava_next, AnyRes) model and 12 pairs, for 2 steps
instead of 3 epochs."""

import json
import os
import sys

import torch
from safetensors.torch import load_file

import data
from model import VLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_offline import ROOT, torchrun  # noqa: E402
from tiny import build_hf, random_image  # noqa: E402

# every flag of the paper's run but --model, --data and the run's folders (the README's recipe)
RECIPE = [
    "--loss",
    "dpo",
    "--beta",
    "0.1",
    "--rpo_alpha",
    "0",
    "--lora_r",
    "128",
    "--lora_alpha",
    "256",
    "--lr",
    "1e-6",
    "--lr_projector",
    "2e-5",
    "--batch_size",
    "32",
    "--grad_accum",
    "1",
    "--epochs",
    "3",
    "--warmup",
    "14",
    "--max_length",
    "4096",
    "--dtype",
    "bfloat16",
    "--grad_ckpt",
    "true",
    "--fsdp",
    "true",
    "--ref",
    "cache",
    "--eval_n",
    "0",
]


def flags(**over):
    """RECIPE with some values replaced (names without the dashes)."""
    out = list(RECIPE)
    for k, v in over.items():
        if f"--{k}" in out:
            out[out.index(f"--{k}") + 1] = v
        else:
            out += [f"--{k}", v]
    return out


# train_offline.py with hub.read_tensor counting the checkpoint bytes each rank reads, into $OUT/read-<rank>.json
COUNT_READS = """import json, os, runpy, sys
sys.path.insert(0, os.environ["ROOT"])
import hub
real, read = hub.read_tensor, []


def read_tensor(*args, **kwargs):
    t = real(*args, **kwargs)
    read.append(t.numel() * t.element_size())
    with open(os.path.join(os.environ["OUT"], f"read-{os.environ['RANK']}.json"), "w") as out:
        json.dump(read, out)
    return t


hub.read_tensor = read_tensor
sys.argv[0] = os.path.join(os.environ["ROOT"], "train_offline.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_recipe_runs_on_two_ranks(tmp_path, monkeypatch):
    """... and FSDP2 builds on the meta device: each rank reads its half of every tensor from the checkpoint,
    never the whole model."""
    build_hf(str(tmp_path / "model"), model_type="llava_next")
    os.makedirs(tmp_path / "images")
    recs, ask = [], [{"role": "user", "content": "<image>\nWhat is in the image?"}]
    for i in range(12):
        random_image(40 + 4 * i, 56, seed=i).save(tmp_path / "images" / f"{i}.png")
        recs.append(
            dict(
                id=str(i),
                image=str(tmp_path / "images" / f"{i}.png"),
                chosen="A red cup and a blue ball are on the table.",
                rejected="A green tree is at the top left.",
                conversation=ask,
            )
        )
    data.write_pairs(str(tmp_path / "pairs.jsonl"), recs)
    out = tmp_path / "run"
    paths = [
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(tmp_path / "pairs.jsonl"),
        "--out_dir",
        str(out),
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    (tmp_path / "count.py").write_text(COUNT_READS)
    monkeypatch.setenv("ROOT", ROOT)
    monkeypatch.setenv("OUT", str(tmp_path))
    torchrun(2, paths + flags(batch_size="4", steps="2"), script=str(tmp_path / "count.py"))
    tensors = load_file(str(tmp_path / "model" / "model.safetensors"))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    read = [sum(json.load(open(tmp_path / f"read-{r}.json"))) for r in range(2)]
    assert sum(read) == total  # every byte once, by one rank or the other
    # about half each (rows cut in ceil-sized chunks)
    assert max(read) < 0.55 * total, (
        read,
        total,
    )
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [x["step"] for x in lines if "loss" in x] == [0, 1]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines if "loss" in x)
    cfg = json.load(open(out / "checkpoint" / "train_config.json"))
    got = (cfg["lora_r"], cfg["lora_alpha"], cfg["dtype"], cfg["fsdp"], cfg["grad_ckpt"])
    assert got == (128, 256.0, "bfloat16", True, True)
    assert VLM.from_pretrained(str(out / "checkpoint")).cfg.model_type == "llava_next"


# on each rank: the FSDP2 policy (read in shards) against the one a process builds whole, for the same seed
CHECK_SHARDS = """import dataclasses, json, os, sys
sys.path.insert(0, os.environ["ROOT"])
import torch
from torch.distributed.fsdp import FSDPModule
import train
import train_offline as to

cfg = train.resumable_config(to.Config, sys.argv[1:])[0]
ranks = train.setup(cfg)
torch.manual_seed(cfg.seed)
pm = train.build_policy(cfg, ranks, "reward", cfg.lr_projector, cfg.grad_ckpt)[0]
torch.manual_seed(cfg.seed)
whole = train.build_policy(dataclasses.replace(cfg, fsdp=False), ranks, "reward", cfg.lr_projector, cfg.grad_ckpt)[0]
whole = dict(whole.named_parameters())
lm = pm.vlm.model.language_model
got = dict(buffers=len(list(pm.buffers())), differ=[], local_rows={}, dtypes={},
           units=all(isinstance(m, FSDPModule) for m in [*lm.layers, pm.vlm.model.multi_modal_projector, pm]))
for n, p in pm.named_parameters():  # full_tensor gathers: every rank in the same order
    full = p.full_tensor()
    if full.dtype != whole[n].dtype or not torch.equal(full, whole[n]):
        got["differ"].append(n)
    got["local_rows"][n] = [p.to_local().shape[0], p.shape[0]]
    got["dtypes"][n] = str(p.dtype)
with train.unsharded(pm):  # gathered in MixedPrecisionPolicy's param_dtype
    got["gathered"] = [str(lm.layers[0].self_attn.q_proj.lora_A.dtype), str(pm.score.weight.dtype)]
with open(os.path.join(os.environ["OUT"], f"shards-{ranks.rank}.json"), "w") as f:
    json.dump(got, f)
ranks.end()
"""


def test_fsdp_shards_equal_the_whole_model(tmp_path, monkeypatch):
    """--fsdp true on 2 ranks: a model built on the meta device and read in slices holds, gathered, exactly
    the values (and dtypes) of one built whole: the base's bf16 rows, LoRA's A and the reward head as a single
    process draws them; units per decoder layer and the projector; bf16 gathers, fp32 shards of what trains."""
    build_hf(str(tmp_path / "model"), model_type="llava_next")
    (tmp_path / "check.py").write_text(CHECK_SHARDS)
    monkeypatch.setenv("ROOT", ROOT)
    monkeypatch.setenv("OUT", str(tmp_path))
    torchrun(
        2,
        ["--model", str(tmp_path / "model"), "--out_dir", str(tmp_path / "run")] + flags(),
        script=str(tmp_path / "check.py"),
    )
    for r in range(2):
        got = json.load(open(tmp_path / f"shards-{r}.json"))
        assert got["differ"] == [] and got["units"] and got["buffers"] == 0
        assert got["gathered"] == ["torch.bfloat16", "torch.bfloat16"]
        rows = got["local_rows"]
        # at most half of each tensor's rows
        assert all(n <= -(-full // 2) for n, full in rows.values())
        dtypes = got["dtypes"]
        assert (
            dtypes["vlm.model.language_model.layers.0.self_attn.q_proj.lora_A"] == "torch.float32"
        )
        assert dtypes["vlm.model.multi_modal_projector.linear_1.weight"] == "torch.float32"
        assert (
            dtypes["vlm.model.language_model.layers.0.self_attn.q_proj.weight"] == "torch.bfloat16"
        )
