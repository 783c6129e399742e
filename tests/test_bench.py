"""The GPU bench script at a tiny geometry on CPU (its decode, LoRA DPO step and FSDP2 paths), the
FLOPs' attention term, and the memory model's activations against the tensors autograd saves."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import model as M
import train_offline as to

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_gpu  # noqa: E402
import bench_memory  # noqa: E402

TINY = ["--tiny", "true", "--device", "cpu", "--new_tokens", "4", "--reps", "1", "--steps", "2"]


def table_rows(text, first):
    """The cells of the markdown rows that start with `first`."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first}")]


def test_gpu_bench_runs_tiny_on_cpu(capsys):
    bench_gpu.main(TINY + ["--fsdp_ranks", "0", "--peak_tflops", "1", "--bandwidth_gbs", "10"])
    out = capsys.readouterr().out
    (decode,) = table_rows(out, "tiny")
    assert float(decode[2]) > 0 and decode[5].endswith("%")  # tok/s and the roofline share
    (step,) = table_rows(out, "1 ")
    tokens_s, tflop = float(step[2].replace(",", "")), float(step[3])
    assert tokens_s > 0 and math.isfinite(tflop) and tflop > 0


def test_gpu_bench_fsdp_on_two_ranks():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_gpu.py"), *TINY, "--part", "dpo",
           "--fsdp_ranks", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "FSDP2 on 2 cpu device(s)" in p.stdout
    assert re.search(r"^\| 2 \| [0-9.]+ \| [0-9,]+ \|", p.stdout, re.M)


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
    raw["text_config"].update(hidden_size=192, intermediate_size=520, num_hidden_layers=4,
                              num_attention_heads=6, num_key_value_heads=6)
    meta = bench_memory.build(raw, (24, 48.0))
    vlm = bench_memory.build(raw, (24, 48.0), device="cpu")
    vlm.model.language_model.checkpointing = ckpt
    return bench_memory.geometry(meta), to.PairModel(vlm).train()


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
