"""Peak host memory of loading a bf16 checkpoint, ours against transformers, as multiples of the file size.

    python bench/bench_load.py            # ~1.3 GB random Llama-decoder LLaVA checkpoint in bf16

Each load runs in a fresh process; peak = VmHWM (the resident-set high-water mark) minus the resident set after
imports, with every weight page touched once after loading (a memory-mapped loader has read nothing until then).
"""

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(
    model_type="llava",
    image_token_index=32000,
    dtype="bfloat16",
    vision_config=dict(
        model_type="clip_vision_model",
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
    ),
    text_config=dict(
        model_type="llama",
        vocab_size=32064,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=12,
        num_attention_heads=16,
        max_position_embeddings=4096,
    ),
)

CHILD = r"""
import sys, torch
sys.path.insert(0, {root!r})
import model, transformers
hwm = lambda: int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])  # kB, reset at exec
base = hwm()
if {which!r} == "ours":
    m = model.VLM.from_pretrained({path!r}, dtype=torch.bfloat16)
else:
    m = transformers.LlavaForConditionalGeneration.from_pretrained({path!r}, dtype=torch.bfloat16)
for p in m.parameters():  # touch every page, so lazily mapped weights count as loaded too
    p.detach().reshape(-1)[::1024].float().sum()
peak = hwm()
print((peak - base) * 1024)
"""


def child(which, path):
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=ROOT, which=which, path=path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def main():
    sys.path.insert(0, ROOT)
    import torch
    from model import VLM

    with tempfile.TemporaryDirectory() as d:
        VLM.from_config(CONFIG, dtype=torch.bfloat16).save_pretrained(d)
        size = os.path.getsize(os.path.join(d, "model.safetensors"))
        ours, theirs = child("ours", d), child("transformers", d)
    print(
        f"checkpoint {size / 1e9:.2f} GB (bf16)\n\n| loader | peak extra RSS GB | x file size |\n|---|---|---|"
    )
    print(
        f"| ours | {ours / 1e9:.2f} | {ours / size:.2f} |\n| transformers | {theirs / 1e9:.2f} | {theirs / size:.2f} |"
    )
    print(f"\nours / transformers peak: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
