"""One DPO step, ours against trl's DPOTrainer, on the same random LLaVA-shaped model and the same batch.

    python bench/bench_dpo.py                 # 576 image tokens per image (CLIP 336/14), batch 8 pairs, fp32 CPU
    python bench/bench_dpo.py --hidden 1024 --layers 8 --steps 4

Both sides do full fine-tuning (every weight trainable, AdamW, β = 0.1, loss "sigmoid") on identical weights, images
and texts, and each runs in its own process. trl concatenates [chosen; rejected] along the batch, so the image and
prompt go through the tower and the LLM twice, and the reference model's forward runs every step (trl refuses
`precompute_ref_log_probs` for vision data). Ours packs [prompt | chosen | rejected] into one row and reads the
reference log-probs from a cache computed once; the script prints that one-off cost too, and the ratio with it
charged to a single step (the worst case: a one-epoch run that never reuses the cache).

Time: median of the steps after the first (trl's is taken from on_step_begin to on_step_end, so data collation is
excluded on both sides). Memory: peak resident memory of the process minus its size before any model was loaded
(on CPU, where torch has no allocator statistics), so it counts weights, optimizer state and activations.
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
CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER: {% if m['content'] is string %}"
        "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endif %} {% else %}ASSISTANT: {% if m['content'] is string %}"
        "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
WORDS = ("red green blue yellow cube ball cup tree dog cat table left right top bottom two three small large there is "
         "are a the on of in near next to image picture shows object objects color count").split()


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(a, path):
    """A random-weight LLaVA checkpoint (transformers' own save) with tokenizer, processor and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    r = random.Random(0)
    tok.train_from_iterator([" ".join(r.choices(WORDS, k=24)) for _ in range(500)], trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"), bos_token="<s>",
                                     eos_token="</s>", unk_token="<unk>", pad_token="<pad>", chat_template=CHAT)
    cfg = dict(model_type="llava", image_token_index=4, vision_feature_layer=-2, vision_feature_select_strategy="default",
               tie_word_embeddings=False,
               vision_config=dict(model_type="clip_vision_model", hidden_size=a.vision_hidden, num_hidden_layers=2,
                                  intermediate_size=4 * a.vision_hidden, num_attention_heads=4, image_size=336,
                                  patch_size=14, projection_dim=a.vision_hidden),
               text_config=dict(model_type="llama", vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                                intermediate_size=a.hidden * 8 // 3, num_attention_heads=a.hidden // 64,
                                num_key_value_heads=a.hidden // 64, max_position_embeddings=4096, bos_token_id=1,
                                eos_token_id=2, pad_token_id=3, tie_word_embeddings=False))
    torch.manual_seed(0)
    LlavaForConditionalGeneration(AutoConfig.for_model(**cfg)).save_pretrained(path)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaProcessor(image_processor=ip, tokenizer=hf_tok, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=CHAT).save_pretrained(path)


def examples(n):
    """The batch: random images, a question and two 20-40 word answers each."""
    from PIL import Image
    rng, r = np.random.default_rng(0), random.Random(0)
    return [dict(image=Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)),
                 question="Describe the image. " + " ".join(r.choices(WORDS, k=8)),
                 chosen=" ".join(r.choices(WORDS, k=r.randint(20, 40))),
                 rejected=" ".join(r.choices(WORDS, k=r.randint(20, 40)))) for _ in range(n)]


def run_trl(a, path):
    from datasets import Dataset
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    base = rss_mb()
    model, ref = (LlavaForConditionalGeneration.from_pretrained(path) for _ in range(2))
    rows = [{"images": [e["image"]], "prompt": [{"role": "user", "content": e["question"]}],
             "chosen": [{"role": "assistant", "content": e["chosen"]}],
             "rejected": [{"role": "assistant", "content": e["rejected"]}]} for e in examples(a.batch)] * a.steps
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, *args, **kw):
            times.append(time.perf_counter() - self.t)
    args = DPOConfig(output_dir=os.path.join(path, "trl"), per_device_train_batch_size=a.batch, max_steps=a.steps,
                     loss_type=["sigmoid"], beta=0.1, max_length=None, learning_rate=1e-6, bf16=False,
                     activation_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
                     dataloader_num_workers=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoProcessor.from_pretrained(path), callbacks=[Timer()])
    trainer.train()
    return dict(step_s=statistics.median(times[1:]), peak_mb=peak_mb() - base)


def run_ours(a, path):
    import data
    import losses
    import train_offline as to
    from model import VLM
    base = rss_mb()
    vlm = VLM.from_pretrained(path)
    recs = [dict(id=str(i), image=e["image"], conversation=[{"role": "user", "content": "<image>\n" + e["question"]}],
                 chosen=e["chosen"], rejected=e["rejected"]) for i, e in enumerate(examples(a.batch))]
    items, _ = data.prepare_pairs(vlm, recs, warn=False)
    pm = to.PairModel(vlm)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-6)
    batch = data.collate_pairs(vlm, items)
    t = time.perf_counter()
    with torch.no_grad():
        ref = pm(**batch)[0]  # the reference pass train_offline caches: once per pair per run
    ref_s = time.perf_counter() - t
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        lp, _, _ = pm(**batch)
        loss = losses.dpo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], 0.1)[0].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return dict(step_s=statistics.median(times[1:]), ref_s=ref_s, peak_mb=peak_mb() - base,
                tokens=int((batch["input_ids"] != 0).sum()))


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vision_hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--side", default="")  # internal: run one side in this process
    ap.add_argument("--path", default="")
    a = ap.parse_args()
    if a.side:
        print(json.dumps((run_trl if a.side == "trl" else run_ours)(a, a.path)))
        return
    with tempfile.TemporaryDirectory() as path:
        build(a, path)
        res = {}
        for side in ("ours", "trl"):
            out = subprocess.run([sys.executable, __file__, "--side", side, "--path", path] + sys.argv[1:],
                                 capture_output=True, text=True, check=True).stdout
            res[side] = json.loads(out.strip().splitlines()[-1])
    o, t = res["ours"], res["trl"]
    print(f"LLaVA-shaped model, 576 image tokens, hidden {a.hidden} x {a.layers} layers, vocab {a.vocab}, "
          f"batch {a.batch} pairs, fp32, {torch.get_num_threads()} threads")
    print(f"ours: {o['step_s']:.2f} s/step ({o['tokens']} packed tokens), reference cache {o['ref_s']:.2f} s once, "
          f"peak +{o['peak_mb']:.0f} MB")
    print(f"trl DPOTrainer: {t['step_s']:.2f} s/step, peak +{t['peak_mb']:.0f} MB")
    print(f"speed-up {t['step_s'] / o['step_s']:.2f}x (with the reference pass charged to one step: "
          f"{t['step_s'] / (o['step_s'] + o['ref_s']):.2f}x); memory ratio trl/ours {t['peak_mb'] / o['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
