"""data.py: preference data (paper §4, Table 1): the native format (releases.py converts the public
releases into it) and batches in which each pair is one packed row. The native format: JSONL, a
pair a line,

    {"id": "42", "image": "images/42.jpg", "chosen": "...", "rejected": "...", "rejected2": "...",
     "conversation": [{"role": "user", "content": "<image>\nWhat is this?"}], "meta": {...}}

`image` is a path relative to `--image_root` when given, else to the file's folder (or absolute;
converters may give bytes); `conversation` ends with the user turn the responses answer;
`rejected2` (optional) is a second rejected response for Avg-DPO (Eq. 5); `meta` is free-form
(BDHS records its attempts there). Every record and image is checked when a file is read, so bad
data stops a run before any compute, naming its file and line. A pair's prompt and image are
encoded once, its responses packed after them (`collate_pairs`); image tokens are never cut.
"""

import hashlib
import io
import json
import os
import sys

import torch

from cli import UserError, UserFileError, atomic_write, require, run_main
from model import TEMPLATES, load_image, open_image_header, to_rgb

# -----------------------------------------------------------------------------
# The native format: checked records, JSONL files, images


def check_pair(rec, where, base="", need_rejected=True, hint="--image_root"):
    """ValueError naming `where` (file:line) unless `rec` is a well-formed pair (without
    `need_rejected`: a prompt and its ground truth, BDHS's start); resolves its image path against
    `base` (an absolute path stays); `hint` says where a missing image was looked for."""
    require(isinstance(rec, dict), f"{where}: expected a JSON object, got {type(rec).__name__}")
    for k in ("id", "image", "conversation", "chosen") + ("rejected",) * need_rejected:
        require(k in rec, f"{where}: missing key {k!r}")
    for k in ("chosen", "rejected", "rejected2"):
        if k in rec and not isinstance(rec[k], str):
            raise UserError(f"{where}: {k!r} must be a string, got {type(rec[k]).__name__}")
        if k in rec and "<image>" in rec[k]:
            raise UserError(f"{where}: {k!r} holds an '<image>' placeholder (only the prompt may)")
    if not isinstance(rec["image"], (str, bytes)):
        raise UserError(
            f"{where}: 'image' must be a path (a string), got {type(rec['image']).__name__}"
        )
    conv = rec["conversation"]
    ok = isinstance(conv, list) and all(
        isinstance(m, dict)
        and isinstance(m.get("content"), str)
        and m.get("role") in ("user", "assistant")
        for m in conv
    )
    if not (ok and conv and conv[-1]["role"] == "user"):
        raise UserError(
            f"{where}: 'conversation' must be a list of {{role: user|assistant, "
            f"content: str}} messages that ends with a user turn"
        )
    if sum(m["content"].count("<image>") for m in conv) != 1:
        raise UserError(f"{where}: the conversation must hold exactly one '<image>' placeholder")
    if isinstance(rec["image"], str):
        rec["image"] = os.path.join(base, rec["image"])
        require(os.path.isfile(rec["image"]), f"{where}: image not found: {rec['image']} ({hint})")
    check_image(rec["image"], where)
    return rec


def check_image(image, where):
    """Checks an image's header (size limit included) and data without a full decode (PNG: chunk
    checksums; JPEG: a 1/8-scale decode; others: a decode); errors name `where`."""
    src, name = image_source(image)
    try:
        with open_image_header(src, name) as im:
            if im.format == "PNG":
                im.verify()
            else:
                im.draft("RGB", (1, 1))  # JPEG decodes at 1/8 scale; a no-op for other formats
                im.load()
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    except Exception as e:
        raise UserError(f"{where}: cannot read image {name}: {e}") from None


def read_jsonl(path, *keys):
    """(line number, record) per non-blank line; bad JSON or a missing key is an error."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(
                        f"{path}:{n}: malformed JSON ({e.msg}, column {e.colno})"
                    ) from None
                if missing := [k for k in keys if k not in rec]:
                    raise UserError(f"{path}:{n}: no field {missing[0]!r}")
                out.append((n, rec))
    return out


def is_settings(rec):
    """A pairs file's optional first line, {"settings": {...}}: how its pairs were made (bdhs.py
    writes one); readers of pairs skip it."""
    return isinstance(rec, dict) and list(rec) == ["settings"]


def read_settings(path):
    """The settings line at the start of a pairs file, or None."""
    with open(path) as f:
        try:
            rec = json.loads(f.readline())
        except json.JSONDecodeError:
            return None
    return rec["settings"] if is_settings(rec) else None


def read_pairs(path, need_rejected=True, image_root=""):
    """A native JSONL file -> checked records; errors name file:line. A relative `image` resolves
    against image_root when given, else against the file's folder."""
    base = image_root or os.path.dirname(path)
    if image_root:
        hint = f"relative image paths resolve against --image_root {image_root}"
    else:
        hint = (
            "relative image paths resolve against the data file's folder; --image_root sets another"
        )
    rows = read_jsonl(path)
    if rows and rows[0][0] == 1 and is_settings(rows[0][1]):
        rows = rows[1:]
    return [check_pair(rec, f"{path}:{n}", base, need_rejected, hint) for n, rec in rows]


def pair_line(r, out_dir):
    """A record as a JSONL line of a file in out_dir; in-memory images go to out_dir/images/."""
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
    atomic_write(path, "".join(lines))


def image_source(image):
    """A path or encoded bytes -> (what PIL opens, how an error names it)."""
    if isinstance(image, str):
        return image, image
    return io.BytesIO(image), f"of {len(image)} bytes"


def open_image(image):
    """A path, encoded bytes or a PIL image -> RGB PIL image (files and bytes: model.MAX_PIXELS)."""
    return load_image(*image_source(image)) if isinstance(image, (str, bytes)) else to_rgb(image)


def image_hw(image):
    """(h, w) of a path, encoded bytes or a PIL image; files are read up to their header only."""
    if isinstance(image, (str, bytes)):
        with open_image_header(*image_source(image)) as im:
            return im.size[::-1]
    return image.size[::-1]


# -----------------------------------------------------------------------------
# A data flag: a native file, or a public release that releases.py converts


def check_spec(spec, flag="--data"):
    """UserError naming `flag` unless `spec` is a file, NAME or NAME:PATH of a releases.CONVERTERS
    release whose PATH exists: checked before anything loads."""
    from releases import CONVERTERS

    name, _, path = spec.partition(":")
    if name not in CONVERTERS and not os.path.isfile(spec):
        raise UserError(
            f"{flag} {spec!r}: not a file, and not one of {', '.join(CONVERTERS)} "
            f"(NAME or NAME:PATH)"
        )
    if name in CONVERTERS and path and not os.path.exists(path):
        raise UserFileError(f"{flag} {spec!r}: {path} not found")


def load_pairs(spec, image_root="", need_rejected=True, flag="--data"):
    """`spec`: a native .jsonl, or NAME[:PATH], NAME in releases.CONVERTERS and PATH the release's
    file or folder (without it, fetched from the hub). Errors name file and item."""
    import releases

    check_spec(spec, flag)
    name, _, path = spec.partition(":")
    if name not in releases.CONVERTERS:
        return read_pairs(spec, need_rejected, image_root)
    return releases.load_release(name, path, image_root)


# -----------------------------------------------------------------------------
# Tokens: a conversation in the model's chat template, labels only on the replies


def encode_conversation(vlm, messages, image_sizes=None):
    """(ids, labels) of a conversation in the chat template; labels -100 but on replies (end of turn
    included). Pieces are tokenized one by one, so the split is exact; "<image>" becomes one token
    per image feature (AnyRes counts them from the image's (h, w) in `image_sizes`)."""
    t = TEMPLATES[vlm.template]
    ids, labels = [], []
    for k, m in enumerate(messages):
        if m["role"] == "user":
            text, train = (
                (t["system"] if k == 0 else "") + t["user"].format(m["content"]) + t["assistant"],
                False,
            )
        else:
            text, train = t["reply"].format(m["content"]), True
        piece = vlm.encode_prompt(text, image_sizes, add_special_tokens=k == 0)
        ids += piece
        labels += piece if train else [-100] * len(piece)
    return ids, labels


def collate_sft(vlm, examples, pad_id=0):
    """Examples with one image each -> right-padded input_ids, labels (-100 on pads), pixel_values.
    Under the causal mask real tokens never see a right pad, so no attention mask is needed."""
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
    """Records -> tokenized items {id, image, prompt, responses} plus counts. Ties are skipped; a
    response too long after the prompt is cut; a prompt too long by itself (image tokens included)
    drops the pair: truncating inside the image tokens would misalign them."""
    K = 3 if recs and all("rejected2" in r for r in recs) else 2  # Avg-DPO if all have rejected2
    keys = ("chosen", "rejected", "rejected2")[:K]
    items, stats = [], dict(pairs=len(recs), ties=0, too_long=0, truncated=0, rejected2_ignored=0)
    for r in recs:
        stats["rejected2_ignored"] += K == 2 and "rejected2" in r
        if any(r[k].strip() == r["chosen"].strip() for k in keys[1:]):
            stats["ties"] += 1
            continue
        prompt = prompt_ids(vlm, r)
        room = max_length - len(prompt)
        if room < 1:
            stats["too_long"] += 1
            continue
        resp = [vlm.encode_reply(r[k]) for k in keys]
        stats["truncated"] += any(len(x) > room for x in resp)
        items.append(
            dict(id=r["id"], image=r["image"], prompt=prompt, responses=[x[:room] for x in resp])
        )
    if warn and any(stats[k] for k in ("ties", "too_long", "truncated", "rejected2_ignored")):
        print(
            "warning: of {pairs} pairs, {ties} have chosen == rejected (skipped), {too_long} "
            "have a prompt longer than max_length {max_length} (dropped), {truncated} had "
            "responses cut to fit, {rejected2_ignored} second rejected responses were ignored "
            "(not every pair has one)".format(**stats, max_length=max_length),
            file=sys.stderr,
        )
    return items, stats


def collate_pairs(vlm, items, pad_id=0):
    """Items -> one packed row per pair: [prompt | response 1 | response 2 (| response 3)] + pads.
    Each response takes the RoPE positions right after the prompt and (through `segment`) attends
    only to the prompt and itself, so the prompt is encoded once; the logits at `pred_idx` (B, K, L)
    predict `targets` (B, K, L; -100 on pads); `last_idx` (B, K): each response's last token."""
    rows, pred, last = [], [], []
    for it in items:
        P = len(it["prompt"])
        ids, pos, seg, pr, ls = list(it["prompt"]), list(range(P)), [0] * P, [], []
        for k, r in enumerate(it["responses"], 1):
            start = len(ids)
            ids, pos, seg = ids + r, pos + list(range(P, P + len(r))), seg + [k] * len(r)
            pr.append([P - 1] + list(range(start, start + len(r) - 1)))  # P - 1 predicts r[0]
            ls.append(start + len(r) - 1)
        rows.append((ids, pos, seg))
        pred.append(pr)
        last.append(ls)
    T = max(len(ids) for ids, _, _ in rows)
    L = max(len(r) for it in items for r in it["responses"])
    pad = lambda xs, n, v: xs + [v] * (n - len(xs))  # noqa: E731
    return dict(
        input_ids=torch.tensor([pad(i, T, pad_id) for i, _, _ in rows]),
        position_ids=torch.tensor([pad(p, T, 0) for _, p, _ in rows]),
        segment=torch.tensor([pad(s, T, -1) for _, _, s in rows]),
        pred_idx=torch.tensor([[pad(p, L, 0) for p in pr] for pr in pred]),
        targets=torch.tensor([[pad(r, L, -100) for r in it["responses"]] for it in items]),
        last_idx=torch.tensor(last),
        **vlm.image_processor(open_image(it["image"]) for it in items),  # one at a time
    )


# -----------------------------------------------------------------------------
# Command line: `python data.py --convert ...` is releases.py's


def main(argv=None):
    import releases

    return releases.main(argv)


if __name__ == "__main__":
    run_main(main)
