"""One DPO step, ours against trl's DPOTrainer, on the same random LLaVA-shaped model and the same
batch.

    python bench/bench_dpo.py               # full fine-tuning; 576 image tokens, 8 pairs, fp32 CPU
    python bench/bench_dpo.py --mode lora   # LoRA r 128 / alpha 256: ours against trl + peft
    python bench/bench_dpo.py --hidden 1024 --layers 8 --steps 4

`--mode full`: both sides fine-tune every weight (AdamW, β = 0.1, loss "sigmoid") on identical
weights, images and texts, and each runs in its own process. trl concatenates [chosen; rejected]
along the batch, so the image and prompt go through the tower and the LLM twice, and the reference
model's forward runs every step (trl refuses `precompute_ref_log_probs` for vision data). Ours packs
[prompt | chosen | rejected] into one row and reads the reference log-probs from a cache computed
once; the script prints that one-off cost too, and the ratio with it charged to a single step (the
worst case: a one-epoch run that never reuses the cache).

`--mode lora`: the paper's setup. Both sides train LoRA adapters (same rank, alpha, no dropout) on
the LLM's seven linears (q, k, v, o, gate, up, down) and nothing else: the tower, projector,
embeddings and LM head stay frozen (train_offline.py also trains the projector at its own rate;
frozen here so both sides train the same tensors). Ours is train.py's path:
`model.add_lora`, packed pairs, `PairModel`, `losses.preference_loss`, with the reference either
cached (`--ref cache`, computed once) or recomputed each step with the adapters switched off (`--ref
lora_off`); both are run and printed. trl 1.16 takes a `peft.LoraConfig` and, with no `ref_model`,
computes the reference with the adapters disabled: one model in memory, as ours.

Time: median of the steps after the first (trl's is taken from on_step_begin to on_step_end, so data
collation is excluded on both sides). Memory: peak resident memory of the process minus its size
before any model was loaded (on CPU, where torch has no allocator statistics), so it counts weights,
optimizer state and activations.
"""

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# LLaVA-1.5's template, also reading trl's structured content; trl tokenizes without special tokens, so BOS is here
CHAT = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER: {% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %} {% else %}ASSISTANT: {% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
WORDS = (
    "red green blue yellow cube ball cup tree dog cat table left right top bottom two three small large there is "
    "are a the on of in near next to image picture shows object objects color count"
).split()


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(a, path):
    """A random-weight LLaVA checkpoint (transformers' own save) with tokenizer, processor and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        AutoConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = (
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
    )
    r = random.Random(0)
    tok.train_from_iterator(
        [" ".join(r.choices(WORDS, k=24)) for _ in range(500)],
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=SPECIALS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(path, "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT,
    )
    cfg = dict(
        model_type="llava",
        image_token_index=4,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=a.vision_hidden,
            num_hidden_layers=2,
            intermediate_size=4 * a.vision_hidden,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
            projection_dim=a.vision_hidden,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=a.vocab,
            hidden_size=a.hidden,
            num_hidden_layers=a.layers,
            intermediate_size=a.hidden * 8 // 3,
            num_attention_heads=a.hidden // 64,
            num_key_value_heads=a.hidden // 64,
            max_position_embeddings=4096,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
            tie_word_embeddings=False,
        ),
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(AutoConfig.for_model(**cfg)).save_pretrained(path)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaProcessor(
        image_processor=ip,
        tokenizer=hf_tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT,
    ).save_pretrained(path)


def examples(n):
    """The batch: random images, a question and two 20-40 word answers each."""
    from PIL import Image

    rng, r = np.random.default_rng(0), random.Random(0)
    return [
        dict(
            image=Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)),
            question="Describe the image. " + " ".join(r.choices(WORDS, k=8)),
            chosen=" ".join(r.choices(WORDS, k=r.randint(20, 40))),
            rejected=" ".join(r.choices(WORDS, k=r.randint(20, 40))),
        )
        for _ in range(n)
    ]


def run_trl(a, path):
    from datasets import Dataset
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    base = rss_mb()
    model = LlavaForConditionalGeneration.from_pretrained(path)
    if a.mode == "lora":  # the reference is this model with its adapters disabled
        from peft import LoraConfig
        from model import LORA_TARGETS

        targets = rf".*language_model.*\.({'|'.join(LORA_TARGETS)})"  # the LLM's, not the tower's
        ref, peft = (
            None,
            LoraConfig(
                r=a.lora_r,
                lora_alpha=a.lora_alpha,
                lora_dropout=0.0,
                bias="none",
                target_modules=targets,
            ),
        )
    else:
        ref, peft = LlavaForConditionalGeneration.from_pretrained(path), None
    rows = [
        {
            "images": [e["image"]],
            "prompt": [{"role": "user", "content": e["question"]}],
            "chosen": [{"role": "assistant", "content": e["chosen"]}],
            "rejected": [{"role": "assistant", "content": e["rejected"]}],
        }
        for e in examples(a.batch)
    ] * a.steps
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, *args, **kw):
            times.append(time.perf_counter() - self.t)

    args = DPOConfig(
        output_dir=os.path.join(path, "trl"),
        per_device_train_batch_size=a.batch,
        max_steps=a.steps,
        loss_type=["sigmoid"],
        beta=0.1,
        max_length=None,
        learning_rate=1e-6,
        bf16=False,
        activation_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoProcessor.from_pretrained(path),
        callbacks=[Timer()],
        peft_config=peft,
    )
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return dict(step_s=statistics.median(times[1:]), peak_mb=peak_mb() - base, trainable=trainable)


def run_ours(a, path):
    import data
    import losses
    import model as M
    import train

    base = rss_mb()
    vlm = M.VLM.from_pretrained(path)
    if a.mode == "lora":  # build_policy's steps, the projector frozen (see the docstring)
        vlm.requires_grad_(False)
        M.add_lora(vlm, a.lora_r, a.lora_alpha)
    recs = [
        dict(
            id=str(i),
            image=e["image"],
            conversation=[{"role": "user", "content": "<image>\n" + e["question"]}],
            chosen=e["chosen"],
            rejected=e["rejected"],
        )
        for i, e in enumerate(examples(a.batch))
    ]
    items, _ = data.prepare_pairs(vlm, recs, warn=False)
    pm = train.PairModel(vlm)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    batch = data.collate_pairs(vlm, items)
    t = time.perf_counter()
    with torch.no_grad():
        ref = pm(**batch)[0].sum(-1)  # the reference train_offline caches: once per pair per run
    ref_s = time.perf_counter() - t
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        lp, _ = pm(**batch)
        # lora_off: the reference every step, the adapters switched off
        ref_lp = train.reference(pm, batch) if a.ref == "lora_off" else ref
        loss = losses.preference_loss("dpo", lp.sum(-1), ref_lp, train.counts(batch), 0.1)[0].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return dict(
        step_s=statistics.median(times[1:]),
        ref_s=ref_s if a.ref == "cache" else 0.0,
        peak_mb=peak_mb() - base,
        tokens=int((batch["segment"] >= 0).sum()),
        trainable=sum(p.numel() for p in params),
    )


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="full", choices=["full", "lora"])
    ap.add_argument("--lora_r", type=int, default=128)
    ap.add_argument("--lora_alpha", type=float, default=256.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vision_hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--side", default="")  # internal: run one side in this process
    ap.add_argument("--ref", default="cache")  # internal: our side's reference
    ap.add_argument("--path", default="")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.side:
        print(json.dumps((run_trl if a.side == "trl" else run_ours)(a, a.path)))
        return
    sides = {"ours": ["--ref", "cache"]}
    if a.mode == "lora":
        sides["ours, lora_off"] = ["--ref", "lora_off"]
    res = {}
    with tempfile.TemporaryDirectory() as path:
        build(a, path)
        for name, extra in [*sides.items(), ("trl", [])]:
            cmd = [sys.executable, __file__, "--side", name.split(",")[0], "--path", path]
            out = subprocess.run(cmd + extra + sys.argv[1:], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"the {name} side failed:\n{out.stderr[-3000:]}")
            res[name] = json.loads(out.stdout.strip().splitlines()[-1])
    t = res["trl"]
    what = (
        "full fine-tuning"
        if a.mode == "full"
        else f"LoRA r {a.lora_r} / alpha {a.lora_alpha:g} on the LLM's linears"
    )
    print(
        f"LLaVA-shaped model, 576 image tokens, hidden {a.hidden} x {a.layers} layers, vocab "
        f"{a.vocab}, batch {a.batch} pairs, fp32, {a.threads or torch.get_num_threads()} "
        f"threads, {what}"
    )
    print(f"trainable parameters: ours {res['ours']['trainable']:,}, trl {t['trainable']:,}")
    print(
        "| side | s/step | peak extra RSS (MB) | speed-up (trl/ours) | memory (ours/trl) |\n"
        "|---|---|---|---|---|"
    )
    peft = " + peft" if a.mode == "lora" else ""
    print(f"| trl DPOTrainer{peft} | {t['step_s']:.2f} | {t['peak_mb']:.0f} | | |")
    for name in sides:
        o = res[name]
        label = name + (" (cache)" if name == "ours" else "")
        print(
            f"| {label} | {o['step_s']:.2f} | {o['peak_mb']:.0f} "
            f"| {t['step_s'] / o['step_s']:.2f}x | {o['peak_mb'] / t['peak_mb']:.2f}x |"
        )
    o = res["ours"]
    print(
        f"ours: {o['tokens']} packed tokens per step; reference cache {o['ref_s']:.2f} s once; "
        f"with it charged to one step: {t['step_s'] / (o['step_s'] + o['ref_s']):.2f}x"
    )


if __name__ == "__main__":
    main()
