"""Rollout speed: sampling k responses per prompt, as train_online.py does, against transformers' `generate` with
`num_return_sequences=k`, on the same weights and prompts, in one run.

    python bench/bench_rollout.py                  # CPU, fp32
    python bench/bench_rollout.py --device cuda --dtype bfloat16

Two models: the shipped world base (train_online.py's real rollouts: 32 prompts x 2 samples) and the LLaVA-1.5-shaped
random model of bench_model.py (576 image tokens per prompt; 4 prompts x 4 samples, RLOO's k). Temperature 1, EOS
disabled, so both sides produce exactly B x k x new_tokens tokens. Ours prefills each prompt (image included) once
and copies its KV cache into the k sample rows; transformers repeats the inputs k times and prefills every row.
"""

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa: E402
from bench_model import CONFIG, inputs, timed  # noqa: E402
from model import VLM  # noqa: E402


def world_inputs(vlm, B):
    recs = world.world_pairs(world.World(0), B)
    batch = vlm.prepare(
        [r["conversation"][0]["content"].replace("<image>\n", "") for r in recs],
        [r["image"] for r in recs],
    )
    return batch["input_ids"], batch["attention_mask"], batch["pixel_values"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    from transformers import AutoConfig, LlavaForConditionalGeneration

    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for name, B, k, K in (("world base", 32, 2, 48), ("LLaVA-1.5-shaped", 4, 4, 32)):
        with tempfile.TemporaryDirectory() as d:
            if name == "world base":
                path = world.BASE_MODEL
            else:
                torch.manual_seed(0)
                LlavaForConditionalGeneration(AutoConfig.for_model(**CONFIG)).save_pretrained(d)
                path = d
            ours = VLM.from_pretrained(path, dtype=dtype, device=dev).eval()
            hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(dev).eval()
        hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
        ids, am, px = (
            world_inputs(ours, B) if name == "world base" else inputs(B, 576, "cpu", torch.float32)
        )
        ids, am, px = ids.to(dev), am.to(dev), px.to(dev, dtype)
        g = torch.Generator(dev).manual_seed(0)
        with torch.inference_mode():
            t_hf, out_hf = timed(
                lambda: hf.generate(
                    input_ids=ids,
                    pixel_values=px,
                    attention_mask=am,
                    max_new_tokens=K,
                    min_new_tokens=K,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    num_return_sequences=k,
                ),
                a.reps,
                sync,
            )
            t_us, out_us = timed(
                lambda: ours.generate(
                    ids,
                    am,
                    px,
                    max_new_tokens=K,
                    temperature=1.0,
                    generator=g,
                    num_samples=k,
                    eos_token_id=[],
                ),
                a.reps,
                sync,
            )
        n = B * k * K
        assert out_hf.shape == (B * k, ids.shape[1] + K) and sum(map(len, out_us)) == n
        rows.append(
            (
                f"{name}: {B} prompts x {k} samples x {K} tokens ({ids.shape[1]}-token prompts)",
                n / t_hf,
                n / t_us,
            )
        )
    print(f"device {dev}, dtype {a.dtype}, threads {torch.get_num_threads()}, median of {a.reps}\n")
    print("| rollout | transformers tok/s | ours tok/s | ratio |\n|---|---|---|---|")
    for name, h, u in rows:
        print(f"| {name} | {h:.1f} | {u:.1f} | {u / h:.2f}x |")


if __name__ == "__main__":
    main()
