"""data.py: preference data (paper §4, Table 1): the native format, converters from the public releases, and
batches in which each pair is one packed row.

The native format is JSONL, one pair per line:

    {"id": "42", "image": "images/42.jpg", "conversation": [{"role": "user", "content": "<image>\nWhat is this?"}],
     "chosen": "...", "rejected": "...", "rejected2": "...", "meta": {...}}

`image` is relative to the file (or absolute); `conversation` ends with the user turn the responses answer, and
earlier turns may hold assistant replies; `rejected2` is optional, a second rejected response for Avg-DPO (Eq. 5);
`meta` is free-form (BDHS records its attempts there). Converters from the public releases (POVID, VLFeedback,
RLHF-V, LLaVA-RLHF) yield the same records, `image` then also allowed to be bytes (parquet releases keep images
inline). Every record and every image is checked when a file is read, so bad data stops a run before any compute,
with the file and line that hold it.

Batches: a pair's prompt and image are tokenized and encoded once, its responses packed after them in one row
(`collate_pairs`); image tokens are never cut to fit `max_length`, responses are.
"""
import hashlib
import io
import json
import os
import sys

import torch

from model import TEMPLATES, load_image, open_image_header, to_rgb

# -----------------------------------------------------------------------------
# The native format: checked records, JSONL files, images


def check_pair(rec, where, base="", need_rejected=True):
    """Raises ValueError naming `where` (file:line) unless `rec` is a well-formed pair (without `need_rejected`, a
    prompt and its ground truth, as BDHS starts from); resolves its image path."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for k in ("id", "image", "conversation", "chosen") + ("rejected",) * need_rejected:
        if k not in rec:
            raise ValueError(f"{where}: missing key {k!r}")
    for k in ("chosen", "rejected", "rejected2"):
        if k in rec and not isinstance(rec[k], str):
            raise ValueError(f"{where}: {k!r} must be a string, got {type(rec[k]).__name__}")
        if k in rec and "<image>" in rec[k]:
            raise ValueError(f"{where}: {k!r} holds an '<image>' placeholder (only the prompt may)")
    if not isinstance(rec["image"], (str, bytes)):
        raise ValueError(f"{where}: 'image' must be a path (a string), got "
                         f"{type(rec['image']).__name__}")
    conv = rec["conversation"]
    if not (isinstance(conv, list) and conv and all(isinstance(m, dict) and m.get("role") in ("user", "assistant")
                                                    and isinstance(m.get("content"), str) for m in conv)
            and conv[-1]["role"] == "user"):
        raise ValueError(f"{where}: 'conversation' must be a list of {{role: user|assistant, content: str}} "
                         f"messages that ends with a user turn")
    if sum(m["content"].count("<image>") for m in conv) != 1:
        raise ValueError(f"{where}: the conversation must hold exactly one '<image>' placeholder")
    if isinstance(rec["image"], str):
        rec["image"] = os.path.join(base, rec["image"])
        if not os.path.isfile(rec["image"]):
            raise ValueError(f"{where}: image not found: {rec['image']}")
    check_image(rec["image"], where)
    return rec


def check_image(image, where):
    """Reads a path's or bytes' image header (size limit included) and checks its data without a
    full decode (PNG: chunk checksums; JPEG: a 1/8-scale decode; others: a decode), so a bad image
    stops the run before any compute, with its file:line."""
    src, name = image_source(image)
    try:
        with open_image_header(src, name) as im:
            if im.format == "PNG":
                im.verify()
            else:
                im.draft("RGB", (1, 1))  # JPEG decodes at 1/8 scale; a no-op for other formats
                im.load()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    except Exception as e:
        raise ValueError(f"{where}: cannot read image {name}: {e}") from None


def read_jsonl(path, *keys):
    """(line number, record) for each non-blank line of a JSONL file; a line that is not JSON, or lacks one of the
    keys, is an error naming file:line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: malformed JSON ({e.msg}, column {e.colno})") from None
                if missing := [k for k in keys if k not in rec]:
                    raise ValueError(f"{path}:{n}: no field {missing[0]!r}")
                out.append((n, rec))
    return out


def read_pairs(path, need_rejected=True):
    """A native JSONL file -> checked records; a malformed line or a missing image is an error naming file:line."""
    return [check_pair(rec, f"{path}:{n}", os.path.dirname(path), need_rejected) for n, rec in read_jsonl(path)]


def pair_line(r, out_dir):
    """One record as a JSONL line for a file in out_dir; an in-memory image is saved as a PNG in out_dir/images/."""
    r = dict(r)
    if not isinstance(r["image"], str):
        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
        name = os.path.join("images", f"{hashlib.sha1(str(r['id']).encode()).hexdigest()[:16]}.png")
        open_image(r["image"]).save(os.path.join(out_dir, name))
        r["image"] = name
    elif not os.path.isabs(r["image"]):
        r["image"] = os.path.relpath(r["image"], out_dir)
    return json.dumps(r)


def write_pairs(path, recs):
    """Writes records as native JSONL, atomically (images as in pair_line)."""
    lines = [pair_line(r, os.path.dirname(path) or ".") + "\n" for r in recs]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def image_source(image):
    """A path or encoded bytes -> (what PIL opens, how an error names it)."""
    if isinstance(image, str):
        return image, image
    return io.BytesIO(image), f"of {len(image)} bytes"


def open_image(image):
    """A path, encoded bytes or a PIL image -> RGB PIL image (files and bytes: model.MAX_PIXELS)."""
    return load_image(*image_source(image)) if isinstance(image, (str, bytes)) else to_rgb(image)

# -----------------------------------------------------------------------------
# Converters from the public releases (paper Table 1) to native records. Images: RLHF-V's parquet holds them; the
# others name files that `image_root` must hold (COCO train2014 for POVID, COCO train2017 for LLaVA-RLHF, the
# unzipped merged_images/ for VLFeedback); by default a folder images/ beside the data file.


def llava_turns(turns):
    """LLaVA's [{from: human|gpt, value}] -> our messages, the "<image>" placeholder moved to the first turn's start."""
    msgs = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"].replace("<image>", "").strip()}
            for t in turns]
    msgs[0]["content"] = "<image>\n" + msgs[0]["content"]
    return msgs


def from_povid(r, n, root):
    """POVID (YiyangAiLab/POVID_preference_data_for_VLLMs): a JSON array of {id, image, conversations,
    rejected_conversations}; the last gpt turn of each is the chosen / rejected answer (a GPT-4V corruption)."""
    return dict(id=f"povid-{n}", image=os.path.join(root, os.path.basename(r["image"])),
                conversation=llava_turns(r["conversations"][:-1]), chosen=r["conversations"][-1]["value"],
                rejected=r["rejected_conversations"][-1]["value"], meta=dict(source_id=r["id"]))


def from_llava_rlhf(r, n, root):
    """LLaVA-RLHF's human preferences (zhiqings/LLaVA-Human-Preference-10K): a JSON array of {id, image,
    conversations, output_1, output_2, preference: 1|2, hallucination}; the last gpt turn is a reference answer."""
    if r["preference"] not in (1, 2):
        raise ValueError(f"preference must be 1 or 2, got {r['preference']!r}")
    win, lose = (r["output_1"], r["output_2"])[::1 if r["preference"] == 1 else -1]
    return dict(id=f"llava-rlhf-{n}", image=os.path.join(root, r["image"]), conversation=llava_turns(
        r["conversations"][:-1]), chosen=win["value"], rejected=lose["value"],
        meta=dict(source_id=str(r["id"]), hallucination=r.get("hallucination")))


def from_vlfeedback(r, n, root):
    """VLFeedback (MMInstruction/VLFeedback): JSONL of {id, prompt, models, completions: [{model, response,
    annotations: {aspect: {Rating, Rationale}}}]}, four completions rated 1-5 by GPT-4V on three aspects. Chosen: the
    best mean rating, rejected: the worst; ties and unrated completions ("N/A") are left out."""
    comps = r["completions"]
    if isinstance(comps, dict):  # the `datasets` library turns the list of dicts into a dict of lists
        comps = [dict(zip(comps, v)) for v in zip(*comps.values())]
    rated = []
    for c in comps:
        try:
            rated.append((sum(float(a["Rating"]) for a in c["annotations"].values()) / len(c["annotations"]), c))
        except (ValueError, ZeroDivisionError):
            pass
    rated.sort(key=lambda x: -x[0])
    if len(rated) < 2 or rated[0][0] == rated[-1][0]:
        return None
    (hi, best), (lo, worst) = rated[0], rated[-1]
    return dict(id=f"vlfeedback-{n}", image=os.path.join(root, r.get("img_path") or f"merged_images/{r['id']}.jpg"),
                conversation=[{"role": "user", "content": "<image>\n" + r["prompt"]}], chosen=best["response"],
                rejected=worst["response"], meta=dict(source_id=r["id"], models=[best["model"], worst["model"]],
                                                      ratings=[hi, lo]))


def from_rlhfv(r, n, root):
    """RLHF-V (openbmb/RLHF-V-Dataset): parquet rows {ds_name, image: {bytes, path}, text: JSON string of {question,
    chosen, rejected}, origin_dataset, origin_split, idx, image_path}; chosen is the human-corrected answer."""
    t = json.loads(r["text"])
    return dict(id=f"rlhfv-{r['idx']}", image=r["image"]["bytes"], conversation=[
        {"role": "user", "content": "<image>\n" + t["question"].replace("<image>", "").strip()}],
        chosen=t["chosen"], rejected=t["rejected"], meta=dict(ds_name=r["ds_name"], origin_dataset=r["origin_dataset"]))


def read_records(f):
    """(where, raw record) of a JSON array, a JSONL file or a parquet file."""
    if f.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {f} needs pyarrow: pip install pyarrow") from None
        return ((f"row {n}", r) for n, r in enumerate(pq.read_table(f).to_pylist(), 1))
    if f.endswith(".jsonl"):
        return ((f"line {n}", json.loads(line)) for n, line in enumerate(open(f), 1) if line.strip())
    return ((f"item {n}", r) for n, r in enumerate(json.load(open(f)), 1))


# name -> (converter, hub dataset, its data file)
CONVERTERS = {"povid": (from_povid, "YiyangAiLab/POVID_preference_data_for_VLLMs",
                        "POVID_preference_data_for_VLLMs_version_1.json"),
              "vlfeedback": (from_vlfeedback, "MMInstruction/VLFeedback", "vlfeedback_80k.jsonl"),
              "rlhfv": (from_rlhfv, "openbmb/RLHF-V-Dataset", "RLHF-V-Dataset.parquet"),
              "llava-rlhf": (from_llava_rlhf, "zhiqings/LLaVA-Human-Preference-10K", "llava_7b_v1_preference.json")}


def load_pairs(spec, image_root="", need_rejected=True, flag="--data"):
    """`spec`: a native .jsonl, or NAME[:PATH] with NAME in CONVERTERS and PATH the release's file or folder (without
    it, the file is fetched from the hub through huggingface_hub). Every record is checked; errors name file and item."""
    name, _, path = spec.partition(":")
    if name not in CONVERTERS:
        if not os.path.isfile(spec):
            raise ValueError(f"{flag} {spec!r}: not a file, and not one of {', '.join(CONVERTERS)} "
                             f"(NAME or NAME:PATH)")
        return read_pairs(spec, need_rejected)
    convert, repo, fn = CONVERTERS[name]
    if not path:
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(repo, fn, repo_type="dataset")
    f = os.path.join(path, fn) if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{f}: not found; {name} is {fn} from the hub dataset {repo}")
    root = image_root or os.path.join(os.path.dirname(f), "images")
    recs, where = [], "start"
    try:
        for n, (where, raw) in enumerate(read_records(f), 1):
            rec = convert(raw, n, root)
            if rec is not None:
                recs.append(check_pair(rec, f"{f}: {where}"))
    except (KeyError, TypeError, IndexError, ValueError) as e:
        if str(e).startswith(f"{f}:"):
            raise
        raise ValueError(f"{f}: {where}: not in {name}'s layout ({type(e).__name__}: {e})") from None
    return recs

def image_hw(image):
    """(h, w) of a path, encoded bytes or a PIL image; files are read up to their header, not decoded."""
    if isinstance(image, (str, bytes)):
        with open_image_header(*image_source(image)) as im:
            return im.size[::-1]
    return image.size[::-1]

# -----------------------------------------------------------------------------
# Tokens: a conversation in the model's chat template, labels only on the replies


def encode_conversation(vlm, messages, image_sizes=None):
    """(ids, labels) of a whole conversation in the model's chat template; labels are -100 except on the replies
    (their end-of-turn token included). Pieces are tokenized one by one, so the split is exact; each "<image>" becomes
    one placeholder per image feature (AnyRes models need the image's (h, w) in `image_sizes` to count them)."""
    t = TEMPLATES[vlm.template]
    ids, labels = [], []
    for k, m in enumerate(messages):
        if m["role"] == "user":
            text, train = (t["system"] if k == 0 else "") + t["user"].format(m["content"]) + t["assistant"], False
        else:
            text, train = t["reply"].format(m["content"]), True
        piece = vlm.encode_prompt(text, image_sizes, add_special_tokens=k == 0)
        ids += piece
        labels += piece if train else [-100] * len(piece)
    return ids, labels


def collate_sft(vlm, examples, pad_id=0):
    """Examples with one image each -> right-padded batch: input_ids, labels (-100 on pads), pixel_values.
    Right padding means real tokens never see a pad under the causal mask, so no attention mask is needed."""
    enc = [encode_conversation(vlm, e["messages"]) for e in examples]
    T = max(len(i) for i, _ in enc)
    ids = torch.tensor([i + [pad_id] * (T - len(i)) for i, _ in enc])
    labels = torch.tensor([l + [-100] * (T - len(l)) for _, l in enc])
    return dict(input_ids=ids, labels=labels, **vlm.image_processor([e["image"] for e in examples]))


def prompt_ids(vlm, rec):
    """The tokens of a record's conversation up to where the responses start."""
    sizes = None if vlm.cfg.model_type == "llava" else torch.tensor([image_hw(rec["image"])])
    return encode_conversation(vlm, rec["conversation"], sizes)[0]

# -----------------------------------------------------------------------------
# Preference batches: tokenized once; image tokens are never cut


def prepare_pairs(vlm, recs, max_length=2048, warn=True):
    """Records -> tokenized items {id, image, prompt, responses} plus counts. Pairs whose chosen equals a rejected
    response are skipped; a response that does not fit after the prompt is cut (text only); a prompt that does not fit
    by itself (its image tokens included) drops the pair: truncating inside the image tokens would misalign them."""
    K = 3 if recs and all("rejected2" in r for r in recs) else 2  # Avg-DPO only when every pair has a second rejected
    keys = ("chosen", "rejected", "rejected2")[:K]
    items, stats = [], dict(pairs=len(recs), ties=0, too_long=0, truncated=0, rejected2_ignored=0)
    for r in recs:
        stats["rejected2_ignored"] += K == 2 and "rejected2" in r
        if any(r[k].strip() == r["chosen"].strip() for k in keys[1:]):
            stats["ties"] += 1
            continue
        sizes = None if vlm.cfg.model_type == "llava" else torch.tensor([image_hw(r["image"])])
        prompt, _ = encode_conversation(vlm, r["conversation"], sizes)
        room = max_length - len(prompt)
        if room < 1:
            stats["too_long"] += 1
            continue
        resp = [vlm.encode_reply(r[k]) for k in keys]
        stats["truncated"] += any(len(x) > room for x in resp)
        items.append(dict(id=r["id"], image=r["image"], prompt=prompt, responses=[x[:room] for x in resp]))
    if warn and (stats["ties"] or stats["too_long"] or stats["truncated"] or stats["rejected2_ignored"]):
        print(f"warning: of {stats['pairs']} pairs, {stats['ties']} have chosen == rejected (skipped), "
              f"{stats['too_long']} have a prompt longer than max_length {max_length} (dropped), {stats['truncated']} "
              f"had responses cut to fit, {stats['rejected2_ignored']} second rejected responses were ignored "
              f"(not every pair has one)", file=sys.stderr)
    return items, stats


def collate_pairs(vlm, items, pad_id=0):
    """Items -> one packed row per pair: [prompt | response 1 | response 2 (| response 3)] + padding. Every response
    takes the RoPE positions right after the prompt and (through `segment`) attends only to the prompt and to
    itself, so the image and prompt are encoded once for all responses; the logits at `pred_idx` (B, K, L) predict
    `targets` (B, K, L; -100 on padding), and `last_idx` (B, K) is each response's last token (the reward head's)."""
    rows, pred, last = [], [], []
    for it in items:
        P = len(it["prompt"])
        ids, pos, seg, pr, ls = list(it["prompt"]), list(range(P)), [0] * P, [], []
        for k, r in enumerate(it["responses"], 1):
            start = len(ids)
            ids, pos, seg = ids + r, pos + list(range(P, P + len(r))), seg + [k] * len(r)
            pr.append([P - 1] + list(range(start, start + len(r) - 1)))  # the prompt's last token predicts r[0]
            ls.append(start + len(r) - 1)
        rows.append((ids, pos, seg))
        pred.append(pr)
        last.append(ls)
    T = max(len(ids) for ids, _, _ in rows)
    L = max(len(r) for it in items for r in it["responses"])
    pad = lambda xs, n, v: xs + [v] * (n - len(xs))  # noqa: E731
    return dict(input_ids=torch.tensor([pad(i, T, pad_id) for i, _, _ in rows]),
                position_ids=torch.tensor([pad(p, T, 0) for _, p, _ in rows]),
                segment=torch.tensor([pad(s, T, -1) for _, _, s in rows]),
                pred_idx=torch.tensor([[pad(p, L, 0) for p in pr] for pr in pred]),
                targets=torch.tensor([[pad(r, L, -100) for r in it["responses"]] for it in items]),
                last_idx=torch.tensor(last),
                **vlm.image_processor(open_image(it["image"]) for it in items))  # one at a time
