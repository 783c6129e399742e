"""The GPU check at a tiny geometry on CPU (each of its rows, their independence, the FSDP2 path,
the sync counter), the FLOPs' attention term, and the memory model's activations against the
tensors autograd saves."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import model as M
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_gpu  # noqa: E402
import bench_memory  # noqa: E402

TINY = ["--tiny", "true", "--device", "cpu", "--new_tokens", "4", "--reps", "1", "--steps", "2"]


def table_rows(text, first):
    """The cells of the markdown rows that start with `first`."""
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first}")
    ]


def test_gpu_bench_runs_tiny_on_cpu(capsys, tmp_path):
    """Every row of the GPU check at tiny shapes: the markdown table and the JSON agree, no row fails."""
    out = str(tmp_path / "gpu.json")
    bench_gpu.main(
        TINY + ["--fsdp_ranks", "0", "--peak_tflops", "1", "--bandwidth", "10", "--out", out]
    )
    text = capsys.readouterr().out
    with open(out) as f:
        rows = json.load(f)["rows"]
    assert list(rows) == list(bench_gpu.PARTS)
    assert not [k for k, r in rows.items() if "error" in r], rows
    assert len(table_rows(text, "")) == 1 + len(rows)  # the header, then a line per row
    p = rows["parity"]  # bf16 on both sides: a few units in the last place of logits near 1
    assert p["max_abs_delta"] <= 0.02 and isinstance(p["greedy_equal"], bool)
    d = rows["dpo"]
    assert d["s_per_step"] > 0 and d["tflop_per_step"] > 0 and d["mfu_4nt"] < d["mfu_6nt"]
    assert math.isfinite(d["ref_delta"])
    k = rows["kernel"]
    assert k["accepted"]["math"] and any("scaled_dot_product" in o for o in k["ops"])
    s = rows["syncs"]
    assert s["counts"][1] > 0 and 0 <= s["per_token"] <= 1  # at most one sync a token
    dec = rows["decode"]
    assert dec["tok_s"] > 0 and 0 < dec["share"] and f"| {dec['title']} |" in text


def test_gpu_bench_step0_reference_is_the_policy_in_fp32(tmp_path):
    """In fp32 the cached reference (train_offline.reference_logps) is the policy at step 0."""
    out = str(tmp_path / "gpu.json")
    rows = bench_gpu.main(TINY + ["--part", "dpo", "--autocast", "false", "--out", out])
    assert rows["dpo"]["ref_delta"] == 0.0 and rows["dpo"]["rewards_chosen"] == 0.0


def test_gpu_bench_rows_fail_alone(monkeypatch, capsys):
    """A failing row prints its error in its cells; the rows after it still run. Without
    transformers, or without its LLaVA-NeXT class, the parity row says n/a and why."""

    def broken(*args):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(bench_gpu, "kernel_row", broken)
    monkeypatch.setitem(bench_gpu.HF_CLASSES, "llava_next", "NoSuchModelClass")
    rows = bench_gpu.main(TINY + ["--part", "parity,kernel,syncs"])
    text = capsys.readouterr().out
    assert rows["kernel"]["error"] == "RuntimeError: no kernel today"
    assert "| error | RuntimeError: no kernel today |" in text
    assert rows["syncs"]["per_token"] >= 0
    assert rows["parity"]["result"] == "n/a" and "NoSuchModelClass" in rows["parity"]["detail"]
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers: ImportError
    rows = bench_gpu.main(TINY + ["--part", "parity"])
    assert rows["parity"]["result"] == "n/a" and "transformers" in rows["parity"]["detail"]


def test_sync_count_counts_host_reads_and_restores_tensor():
    x = torch.ones(3)
    before = {n: vars(torch.Tensor).get(n) for n in bench_gpu.SyncCount.CALLS}
    with bench_gpu.SyncCount(torch.device("cpu")) as c:
        x.sum().item(), bool(x[0]), x.tolist(), int(x[1]), float(x[2])
        y = x * 2  # no host read
    assert c.n == 5 and y.sum() == 6
    assert {n: vars(torch.Tensor).get(n) for n in bench_gpu.SyncCount.CALLS} == before
    x[0].item()
    assert c.n == 5  # the counter is gone after the block


def test_gpu_bench_fsdp_on_two_ranks(tmp_path):
    """The dpo row under torchrun on 2 gloo ranks (FSDP2 through build_policy), its own JSON file."""
    out = str(tmp_path / "gpu.json")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "bench", "bench_gpu.py"),
        *TINY,
        "--part",
        "dpo",
        "--fsdp_ranks",
        "2",
        "--out",
        out,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "failed" not in p.stdout
    with open(str(tmp_path / "gpu-fsdp2.json")) as f:
        dpo = json.load(f)["rows"]["dpo"]
    assert "error" not in dpo, dpo
    assert "2 cpu device(s), FSDP2" in dpo["detail"] and dpo["s_per_step"] > 0
    assert re.search(
        r"^\| LoRA DPO step, train_offline \(tiny, 2 device\(s\)\) \| [0-9.]+ s/step",
        p.stdout,
        re.M,
    )


def test_flops_count_the_pairs_the_packed_mask_allows():
    """step_flops's attention term counts the query-key pairs that attention_mask_4d allows."""
    vlm = bench_gpu.build(bench_gpu.llava16(tiny=True), torch.float32, (8, 16))
    batch, n_img = bench_gpu.pair_batch(vlm, 2, (40, 53), 8, 12)
    seg = batch["segment"]
    B, T = seg.shape
    mask = M.attention_mask_4d(seg >= 0, torch.arange(T).expand(B, T), segment=seg)[:, 0]  # B T T
    real = (seg >= 0)[:, :, None] & (seg >= 0)[:, None, :]
    assert bench_gpu.attention_pairs(batch).tolist() == (mask & real).sum((1, 2)).tolist()
    assert bench_gpu.step_flops(vlm, batch, n_img) > 0


def small(ckpt):
    """The design's model at a small width: bf16 base, fp32 LoRA and projector."""
    raw = bench_gpu.llava16(tiny=True)
    raw["text_config"].update(
        hidden_size=192,
        intermediate_size=520,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=6,
    )
    meta = bench_memory.build(raw, (24, 48.0))
    vlm = bench_memory.build(raw, (24, 48.0), device="cpu")
    vlm.model.language_model.checkpointing = ckpt
    return bench_memory.geometry(meta), train.PairModel(vlm).train()


@pytest.mark.parametrize("ckpt", [False, True])
def test_memory_model_matches_saved_tensors(ckpt):
    """bench_memory's activation terms equal what autograd saves in the forward, within 2%, at two
    lengths: a bf16 base under bf16 autocast, fp32 adapters (their bf16 copies are autocast's) and
    projector (linear_2's bf16 copy is saved: linear_1 trains too)."""
    g, pm = small(ckpt)
    for resp in (100, 400):
        batch, _ = bench_gpu.pair_batch(pm.vlm, 1, (40, 53), 8, resp)
        T = int((batch["segment"] >= 0).sum())
        n_feat = batch["pixel_values"].shape[1] * 4
        model = bench_memory.activations(g, [T], 2 * resp, n_feat, ckpt)
        if ckpt:  # the recomputed layer saves in the backward, not in the forward
            model -= bench_memory.layer_saved(g, T)
        else:  # every adapter's bf16 copy
            model += 2 * g["lora"]
        model += 2 * g["d"] ** 2
        assert bench_memory.saved_bytes(pm, batch) == pytest.approx(model, rel=0.02)


def test_memory_model_matches_measured_rss():
    """The load and the peak of a LoRA DPO micro-step (bf16 base, fp32 adapters, projector, their
    gradients and AdamW moments; checkpointing; one 3,489-token pair) at width 1024, 2 layers:
    RSS growth over an in-process baseline, in a fresh process, within 10% of bench_memory's model.
    (Its working-set coefficient WORK was fit on this shape; the 7B-width --check is out of sample.)"""
    r = bench_memory.measure_child(1024, 2, False, 60, 250)
    assert r["load"] == pytest.approx(r["load_model"], rel=0.10)
    assert r["step"] == pytest.approx(r["step_model"], rel=0.10)


def test_trl_fused_head_memory_matches_measured_rss():
    """trl's fused LM head as DPOTrainer runs it on CPU (the fold in torch): the peaks of its forward
    and backward over 2,048 tokens x vocab 8,192, RSS growth in a fresh process, within 10% of
    bench_memory.trl_head; the head is most of trl + peft's peak at bench_dpo.py --mode lora."""
    r = bench_memory.measure_head_child(2048, 256, 8192)
    assert r["forward"] == pytest.approx(r["forward_model"], rel=0.10)
    assert r["backward"] == pytest.approx(r["backward_model"], rel=0.10)


def test_trl_model_at_bench_dpo_shape():
    """trl + peft's model at bench_dpo.py --mode lora's CPU shape is within 15% of that side's peak
    measured with freed memory returned to the system (bench_memory.TRL_LIVE_MB; the README's
    figure with glibc's defaults also counts what the allocator keeps)."""
    modelled, _, _ = bench_memory.trl_at_bench_dpo()
    assert modelled == pytest.approx(bench_memory.TRL_LIVE_MB, rel=0.15)
