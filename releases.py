"""releases.py: the public preference releases (POVID, VLFeedback, RLHF-V, LLaVA-RLHF; paper Table 1) -> our
native records (data.py), and `python data.py --convert NAME[:PATH] --out F`, which writes them as a native file."""

import json
import os
import random

from cli import UserError, UserFileError, arg_parser, require, run_main
from data import check_pair, load_pairs, write_pairs

# -----------------------------------------------------------------------------
# Converters (paper Table 1). Images: RLHF-V's parquet holds them; the others name files in
# `image_root` (COCO train2014 for POVID, COCO train2017 for LLaVA-RLHF), by default a folder
# images/ beside the data file; VLFeedback's, in the folder merged_images.zip was unzipped in (see
# load_release), by default the data file's own.


def llava_turns(turns):
    """LLaVA's [{from: human|gpt, value}] -> messages, "<image>" moved to the first turn's start."""
    role = {"human": "user", "gpt": "assistant"}
    msgs = [
        {"role": role[t["from"]], "content": t["value"].replace("<image>", "").strip()}
        for t in turns
    ]
    msgs[0]["content"] = "<image>\n" + msgs[0]["content"]
    return msgs


def from_povid(r, n, root):
    """POVID: a JSON array of {id, image, conversations, rejected_conversations}; the last gpt turn
    of each is the chosen / rejected answer (a GPT-4V corruption)."""
    return dict(
        id=f"povid-{n}",
        image=os.path.join(root, os.path.basename(r["image"])),
        conversation=llava_turns(r["conversations"][:-1]),
        chosen=r["conversations"][-1]["value"],
        rejected=r["rejected_conversations"][-1]["value"],
        meta=dict(source_id=r["id"]),
    )


def from_llava_rlhf(r, n, root):
    """LLaVA-RLHF's human preferences: a JSON array of {id, image, conversations, output_1,
    output_2, preference: 1|2, hallucination}; the last gpt turn is a reference answer."""
    require(r["preference"] in (1, 2), f"preference must be 1 or 2, got {r['preference']!r}")
    win, lose = (r["output_1"], r["output_2"])[:: 1 if r["preference"] == 1 else -1]
    return dict(
        id=f"llava-rlhf-{n}",
        image=os.path.join(root, r["image"]),
        conversation=llava_turns(r["conversations"][:-1]),
        chosen=win["value"],
        rejected=lose["value"],
        meta=dict(source_id=str(r["id"]), hallucination=r.get("hallucination")),
    )


def from_vlfeedback(r, n, root):
    """VLFeedback: JSONL of {id, prompt, models, completions: [{model, response, annotations:
    {aspect: {Rating, Rationale}}}]} rated 1-5 by GPT-4V. Chosen: the best mean rating, rejected:
    the worst; ties and unrated completions ("N/A") are left out."""
    comps = r["completions"]
    # the `datasets` library turns the list of dicts into a dict of lists
    if isinstance(comps, dict):
        comps = [dict(zip(comps, v)) for v in zip(*comps.values())]
    rated = []
    for c in comps:
        try:
            rated.append(
                (
                    sum(float(a["Rating"]) for a in c["annotations"].values())
                    / len(c["annotations"]),
                    c,
                )
            )
        except (ValueError, ZeroDivisionError):
            pass
    rated.sort(key=lambda x: -x[0])
    if len(rated) < 2 or rated[0][0] == rated[-1][0]:
        return None
    (hi, best), (lo, worst) = rated[0], rated[-1]
    return dict(
        id=f"vlfeedback-{n}",
        image=os.path.join(root, r.get("img_path") or f"merged_images/{r['id']}.jpg"),
        conversation=[{"role": "user", "content": "<image>\n" + r["prompt"]}],
        chosen=best["response"],
        rejected=worst["response"],
        meta=dict(source_id=r["id"], models=[best["model"], worst["model"]], ratings=[hi, lo]),
    )


def from_rlhfv(r, n, root):
    """RLHF-V: parquet rows {ds_name, image: {bytes, path}, text: JSON of {question, chosen,
    rejected}, origin_dataset, origin_split, idx, image_path}; chosen: the human-corrected one."""
    t = json.loads(r["text"])
    return dict(
        id=f"rlhfv-{r['idx']}",
        image=r["image"]["bytes"],
        conversation=[
            {"role": "user", "content": "<image>\n" + t["question"].replace("<image>", "").strip()}
        ],
        chosen=t["chosen"],
        rejected=t["rejected"],
        meta=dict(ds_name=r["ds_name"], origin_dataset=r["origin_dataset"]),
    )


def read_records(f):
    """(where, raw record) of a JSON array, a JSONL file or a parquet file."""
    if f.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {f} needs pyarrow: pip install pyarrow") from None
        return ((f"row {n}", r) for n, r in enumerate(pq.read_table(f).to_pylist(), 1))
    with open(f) as fh:
        if not f.endswith(".jsonl"):
            return ((f"item {n}", r) for n, r in enumerate(json.load(fh), 1))
        lines = fh.readlines()
    return ((f"line {n}", json.loads(line)) for n, line in enumerate(lines, 1) if line.strip())


# name -> (converter, hub dataset, its data file)
CONVERTERS = {
    "povid": (
        from_povid,
        "YiyangAiLab/POVID_preference_data_for_VLLMs",
        "POVID_preference_data_for_VLLMs_version_1.json",
    ),
    "vlfeedback": (from_vlfeedback, "MMInstruction/VLFeedback", "vlfeedback_80k.jsonl"),
    "rlhfv": (from_rlhfv, "openbmb/RLHF-V-Dataset", "RLHF-V-Dataset.parquet"),
    "llava-rlhf": (
        from_llava_rlhf,
        "zhiqings/LLaVA-Human-Preference-10K",
        "llava_7b_v1_preference.json",
    ),
}


def load_release(name, path="", image_root=""):
    """The release NAME (in CONVERTERS) from PATH, its file or folder (without it, fetched from the
    hub) -> checked native records; errors name file and item."""
    convert, repo, fn = CONVERTERS[name]
    if not path:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo, fn, repo_type="dataset")
    f = os.path.join(path, fn) if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise UserFileError(f"{f}: not found; {name} is {fn} from the hub dataset {repo}")
    # VLFeedback's images: merged_images.zip unzipped beside its JSONL. The dataset repo's loading
    # script (VLFeedback.py) reads <where the zip was extracted>/merged_images/<id>.jpg, so that
    # folder, the JSONL's, is the root; the other releases' default is a folder images/ beside it
    folder = os.path.dirname(f)
    root = image_root or (folder if name == "vlfeedback" else os.path.join(folder, "images"))
    if image_root:
        hint = f"--image_root {image_root}: the release's images"
    else:
        hint = f"the default image folder of {name}; --image_root sets another"
    recs, where = [], "start"
    try:
        for n, (where, raw) in enumerate(read_records(f), 1):
            rec = convert(raw, n, root)
            if rec is not None:
                recs.append(check_pair(rec, f"{f}: {where}", hint=hint))
    except (KeyError, TypeError, IndexError, ValueError) as e:
        if str(e).startswith(f"{f}:"):
            raise
        raise UserError(f"{f}: {where}: not in {name}'s layout ({type(e).__name__}: {e})") from None
    return recs


# -----------------------------------------------------------------------------
# Command line: a release (or a native file) into a native file, checked, optionally subsampled


def main(argv=None):
    ap = arg_parser(
        description="Write a native preference JSONL from a release or another native file; every "
        "record and image is checked on the way."
    )
    ap.add_argument(
        "--convert",
        required=True,
        help=f"a native .jsonl, or NAME[:PATH] with NAME one of {'|'.join(CONVERTERS)} (no PATH: "
        f"from the hub)",
    )
    ap.add_argument(
        "--image_root", default="", help="the release's images (default: images/ beside its file)"
    )
    ap.add_argument(
        "--out",
        required=True,
        help="the native .jsonl to write (in-memory images go to images/ by it)",
    )
    ap.add_argument(
        "--limit",
        type=int,
        default=0,
        help="keep N pairs drawn at random (default: 0, all of them)",
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="the draw of --limit (default: %(default)s)"
    )
    a = ap.parse_args(argv)
    require(a.limit >= 0, f"--limit {a.limit}: must be >= 0")
    # a native file of prompts (bdhs.py --source, train_online.py --data) has no rejected: one or
    # the other, never a mix, which would fail only later, in training
    recs = load_pairs(a.convert, a.image_root, need_rejected=False, flag="--convert")
    if missing := [r["id"] for r in recs if "rejected" not in r]:
        if len(missing) < len(recs):
            raise UserError(
                f"--convert {a.convert}: record {missing[0]!r} has no 'rejected' though others have one: "
                f"a file holds pairs (each with a rejected) or prompts (none)"
            )
    if a.limit and a.limit < len(recs):
        # the release's order kept
        keep = sorted(random.Random(a.seed).sample(range(len(recs)), a.limit))
        recs = [recs[i] for i in keep]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    write_pairs(a.out, recs)
    print(f"wrote {len(recs)} {'prompts' if missing else 'pairs'} to {a.out}")
    return recs


if __name__ == "__main__":
    run_main(main)
