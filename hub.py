"""hub.py: checkpoints in the Hugging Face layout, in a local folder or on the hub: loading (every key and shape
checked), saving (adapters merged, atomically), the tokenizer and processor files they carry, and the cache folder."""

import copy
import functools
import hashlib
import json
import math
import os
import pathlib
import re
import shutil

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from cli import UserError, UserFileError, UserKeyError, atomic_write
from model import TEMPLATES, VLM, ImageProcessor, LoRALinear, VLMConfig, parse_config

# -----------------------------------------------------------------------------
# Loading: config.json, then the weights one tensor at a time, then the small files


def load(path, dtype=torch.float32, device="cpu", template="", cls=VLM):
    """VLM.from_pretrained's work: a local HF-layout folder or a hub id, loaded into `dtype` on `device`."""
    check_template(template)
    path = local_folder(path)
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {cfg_path}: {e}") from e
    with torch.device("meta"):
        vlm = cls(parse_config(raw, cfg_path))
    vlm.folder = path  # the local folder the weights are read from
    if str(device) != "meta":
        load_weights(vlm, path, raw, dtype, device)
    vlm.source_dtype = stored_dtype(path, raw)
    load_processors(vlm, path, template)
    return vlm


def hf_name(key):
    """A checkpoint key in any layout in the wild -> our name. Hub checkpoints use `language_model.model.*` (older)
    or `model.language_model.*` + `lm_head` (newer), with or without `vision_model.` inside the vision tower."""
    for old, new in (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("image_newline", "model.image_newline"),
        ("model.vision_tower.vision_model.", "model.vision_tower."),
    ):
        if key.startswith(old):
            key = new + key[len(old) :]
    return key


def local_folder(path):
    """A model folder on this machine: a local path as it is, a hub id fetched (or found in the hub cache)."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return path
    if looks_local(path):
        raise UserFileError(f"{path}: no such model folder (and not a hub id, which is owner/name)")
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.jinja", *CARRIED])


def weight_files(path):
    """The safetensors files of a checkpoint folder: the shards its index names, or model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        return sorted(set(json.loads(pathlib.Path(index).read_text())["weight_map"].values()))
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    raise UserFileError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_weights(vlm, path, raw, dtype, device):
    """Fills a meta-device model from single or sharded safetensors: each parameter exactly once, each shape equal,
    every checkpoint key used (or kept in vlm.extra: SigLIP's pooling head, a reward head); errors name the key."""
    cfg, cfg_path = vlm.cfg, os.path.join(path, "config.json")
    params = dict(vlm.named_parameters())  # tied weights appear once, under the embedding's name
    filled = set()
    for fn in weight_files(path):
        with open_weights(os.path.join(path, fn)) as f:
            for key in f.keys():
                name = hf_name(key)
                if name.endswith("embeddings.position_ids") or (
                    cfg.tie_word_embeddings and name == "lm_head.weight"
                ):
                    continue  # a buffer older exports saved, and a tied copy
                if (
                    name.startswith("model.vision_tower.head.") and cfg.vision.use_head
                ) or name == "score.weight":
                    vlm.extra[name] = read_tensor(f, key)
                    continue
                if name not in params:
                    raise UserKeyError(
                        f"{fn}: unexpected key {key!r} (not a parameter of this {cfg.model_type} model)"
                    )
                shape, want = tuple(f.get_slice(key).get_shape()), tuple(params[name].shape)
                if shape != want:
                    raise UserError(
                        f"{fn}: {key!r} has shape {shape}, expected {want}{defaulted_keys(raw, cfg_path)}"
                    )
                fill(vlm, name, params[name], f, key, dtype, device)
                filled.add(name)
    adapters = {n for n in params if n.rpartition(".")[2] in ("lora_A", "lora_B")}  # never saved
    if missing := sorted(set(params) - filled - adapters):
        raise UserKeyError(
            f"{path}: checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:5])}"
        )
    if (
        cfg.tie_word_embeddings
        and vlm.lm_head.weight is not vlm.model.language_model.embed_tokens.weight
    ):
        vlm.lm_head.weight = vlm.model.language_model.embed_tokens.weight


def fill(vlm, name, p, f, key, dtype, device):
    """Parameter `name` from checkpoint tensor `key`: a plain one is replaced by the tensor in `dtype` on `device`;
    an FSDP2 DTensor keeps its storage and gets this rank's rows only, read from the file."""
    if hasattr(p, "to_local"):
        rows = shard_rows(p, name)
        # in `dtype` first, as a whole load: what trains is then fp32
        with torch.no_grad():
            p.to_local().copy_(read_tensor(f, key, rows).to(dtype).to(p.dtype))
        return
    mod, _, attr = name.rpartition(".")
    tensor = read_tensor(f, key).to(device=device, dtype=dtype)
    vlm.get_submodule(mod)._parameters[attr] = nn.Parameter(tensor, requires_grad=p.requires_grad)


def open_weights(path):
    """A .safetensors file opened for reading tensors by name (safetensors checks that its header is JSON and that
    its tensors exactly cover the file); a truncated or malformed one is a one-line error naming it."""
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors' SafetensorError, or an OSError
        raise UserFileError(f"{path}: not a safetensors file, or truncated ({e})") from None


def read_tensor(f, key, rows=None):
    """One tensor of an open safetensors file as a CPU tensor; `rows` (start, stop): those of its first dimension
    only (a rank's shard), the only bytes read."""
    if rows is None:
        return f.get_tensor(key)
    return f.get_slice(key)[rows[0] : rows[1]]


def shard_rows(p, name="a parameter"):
    """The rows [start, stop) of dim 0 that an FSDP2 DTensor parameter keeps on this rank: Shard(0) cuts
    as torch.chunk does (ceil(rows / shards) each, the last ones shorter or empty), on the mesh's shard
    dimension; Replicate() dimensions (HSDP's nodes) hold the same rows."""
    rows = p.shape[0]
    start, stop = 0, rows
    for dim, place in enumerate(p.placements):
        if not place.is_shard():
            continue
        if place.dim != 0:
            raise ValueError(
                f"{name}: sharded on dim {place.dim}; only dim-0 shards are read in slices"
            )
        chunk = math.ceil(rows / p.device_mesh.size(dim))
        start = min(rows, chunk * p.device_mesh.get_local_rank(dim))
        stop = min(rows, start + chunk)
    # FSDP2 cut otherwise than assumed: stop, not load wrong rows
    if p.to_local().shape[0] != stop - start:
        raise RuntimeError(
            f"{name}: this rank holds {p.to_local().shape[0]} of its {rows} rows, expected "
            f"rows {start}..{stop}"
        )
    return start, stop


# the floating dtypes of safetensors' headers, by name
FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtype(path, raw):
    """The dtype a checkpoint's weights are stored in (the floating dtype holding the most elements), which a
    save writes back; config.json's `dtype` (`torch_dtype` in older files) only where no tensor is floating."""
    counts = {}
    for fn in weight_files(path):
        with open_weights(os.path.join(path, fn)) as f:
            for key in f.keys():
                info = f.get_slice(key)
                if dt := FLOATS.get(info.get_dtype()):
                    counts[dt] = counts.get(dt, 0) + math.prod(info.get_shape())
    if counts:
        return max(counts, key=counts.get)
    return getattr(torch, raw.get("dtype") or raw.get("torch_dtype") or "float32")


# -----------------------------------------------------------------------------
# The files a checkpoint carries besides its weights


CARRIED = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "generation_config.json",
)
# where a chat template is looked up, first found first: the processor's files (a VLM's apply_chat_template
# is the processor's), then the tokenizer's
TEMPLATE_FILES = (
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "tokenizer_config.json",
)


def chat_template_text(files, path):
    """The checkpoint's chat template text and the file holding it, or ("", "") when it has none."""
    for fn in TEMPLATE_FILES:
        if fn not in files:
            continue
        if fn.endswith(".jinja"):
            return files[fn].decode(), os.path.join(path, fn)
        try:
            t = json.loads(files[fn]).get("chat_template")
        except (ValueError, AttributeError) as e:
            raise UserError(f"{os.path.join(path, fn)}: not a JSON object ({e})") from None
        # named templates, [{"name": ..., "template": ...}]: the default one
        if isinstance(t, list):
            t = {d.get("name"): d.get("template") for d in t}
        if isinstance(t, dict):
            t = t.get("default")
        if t:
            return t, os.path.join(path, fn)
    return "", ""


def load_processors(vlm, path, template=""):
    """The tokenizer, image processor, chat template and the other small files a checkpoint carries."""
    from tokenizers import Tokenizer

    folder = pathlib.Path(path)
    paths = [folder / fn for fn in CARRIED] + sorted(
        folder.glob("additional_chat_templates/*.jinja")
    )
    vlm.files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in paths if p.is_file()}
    tok = os.path.join(path, "tokenizer.json")
    vlm.tokenizer = Tokenizer.from_file(tok) if os.path.exists(tok) else MissingTokenizer(path)
    pp = json.loads(vlm.files.get("preprocessor_config.json", "null")) or json.loads(
        vlm.files.get("processor_config.json", "{}")
    ).get("image_processor")  # transformers 5 nests it
    vlm.image_processor = (
        ImageProcessor(pp, vlm.cfg.grid_pinpoints) if pp else ImageProcessor.default_for(vlm.cfg)
    )
    text, source = chat_template_text(vlm.files, path)
    if template:
        vlm.template, vlm.template_source = template, "--template"
    else:
        vlm.template = guess_template(vlm.cfg, vlm.tokenizer, text, source)
        vlm.template_source = (
            source or f"its {vlm.cfg.text.kind} architecture: no chat template in {path}"
        )


# -----------------------------------------------------------------------------
# Saving: the tensors as transformers names them, the small files as they were, all or nothing


def hf_state_dict(vlm, dtype=None):
    """Tensors as transformers names them, adapters merged (in fp32), tied head left out; floating tensors
    cast to `dtype` (None: as they are)."""

    def host(t):  # cast where the tensor is, then copy: the host holds it once, in the saved dtype
        t = t.detach()
        return (
            (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous().cpu()
        )

    sd = {k: host(v) for k, v in vlm.extra.items()}
    for name, mod in vlm.named_modules():
        for attr, p in mod.named_parameters(recurse=False):
            key = f"{name}.{attr}" if name else attr
            if attr.startswith("lora_") or (
                key == "lm_head.weight" and vlm.cfg.tie_word_embeddings
            ):
                continue
            if attr == "weight" and isinstance(mod, LoRALinear):
                p = mod.merged_weight(dtype)
            sd[key] = host(p)
    # the hub's layout keeps the tower's `vision_model.` level, which our module tree flattens
    return {
        k.replace("model.vision_tower.", "model.vision_tower.vision_model."): v
        for k, v in sd.items()
    }


def save_checkpoint(vlm, out_dir):
    """Writes the checkpoint into a temporary folder, then swaps it in for out_dir (cli.atomic_write;
    recover_checkpoint mends a kill between its renames); a disk error names the file."""
    files = {"config.json": json.dumps(saved_config(vlm), indent=2)} | vlm.files
    text, _ = chat_template_text(files, out_dir)
    if not text or match_template(text) != vlm.template:  # none, or --template overrode it
        files.pop("chat_template.json", None)
        files["chat_template.jinja"] = jinja_template(vlm.template)
    if "processor_config.json" not in files:
        files.setdefault("preprocessor_config.json", json.dumps(vlm.image_processor.raw, indent=2))

    def write(tmp):
        target = tmp
        try:
            os.makedirs(tmp)
            target = os.path.join(tmp, "model.safetensors")
            save_file(hf_state_dict(vlm, vlm.source_dtype), target, metadata={"format": "pt"})
            # a model built here: its tokenizer object
            if vlm.tokenizer and "tokenizer.json" not in files:
                target = os.path.join(tmp, "tokenizer.json")
                vlm.tokenizer.save(target)
            # the source's files as they were (bytes), ours as text
            for fn, content in files.items():
                target = os.path.join(tmp, fn)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb" if isinstance(content, bytes) else "w") as f:
                    f.write(content)
        # e.g. ENOSPC: atomic_write frees what was written, so that a later save can fit
        except OSError as e:
            raise OSError(e.errno, f"cannot write {target}: {e.strerror or e}") from e

    atomic_write(out_dir.rstrip("/"), write)


def saved_config(vlm):
    """config.json as saved: the source's, with the dtype the weights are saved in (the source's: a bf16
    checkpoint stays bf16) under every dtype key: `dtype`, `torch_dtype` for older readers (absent, they read
    float32), and those of the sub-configs."""
    dtype = vlm.source_dtype or vlm.lm_head.weight.dtype
    name = str(dtype).removeprefix("torch.")
    raw = copy.deepcopy(vlm.cfg.raw)
    raw["dtype"] = name
    if "torch_dtype" in raw or dtype != torch.float32:
        raw["torch_dtype"] = name
    for sub in (raw.get("text_config"), raw.get("vision_config")):
        for k in ("dtype", "torch_dtype"):
            if isinstance(sub, dict) and k in sub:
                sub[k] = name
    raw.setdefault(
        "architectures",
        [
            "LlavaNextForConditionalGeneration"
            if vlm.cfg.model_type == "llava_next"
            else "LlavaForConditionalGeneration"
        ],
    )
    return raw


def recover_checkpoint(path):
    """Removes what killed saves left beside `path`; a kill between the renames left the previous
    checkpoint only as path.old<pid>, which is moved back first."""
    path = path.rstrip("/")
    parent, base = os.path.split(path)
    left = [
        os.path.join(parent, d)
        for d in os.listdir(parent or ".")
        if d.startswith((base + ".tmp", base + ".old")) and d[len(base) + 4 :].isdigit()
    ]
    olds = [
        d
        for d in left
        if d[len(path) :].startswith(".old") and os.path.isfile(os.path.join(d, "config.json"))
    ]
    if not os.path.exists(path) and olds:
        os.replace(max(olds, key=os.path.getmtime), path)
    for d in left:
        shutil.rmtree(d, ignore_errors=True)


# -----------------------------------------------------------------------------
# Model names, cache keys and the cache folder


def folder_hash(path):
    """A model's name, and the bytes of its files when it is a local folder: the key of what is cached from it."""
    h = hashlib.sha256(path.encode())
    if os.path.isdir(path):
        for fn in sorted(f for f in os.listdir(path) if f.endswith((".json", ".safetensors"))):
            with open(os.path.join(path, fn), "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def source_bytes(*names):
    """The bytes of this project's files `names`: in a cache key, code changes make new keys."""
    return b"".join(pathlib.Path(__file__).resolve().with_name(name).read_bytes() for name in names)


CACHE_ENV = "MMALIGN_CACHE"  # overrides the cache folder (the tests point it at a temporary one)


def cache_home():
    """The folder every run's caches share (reference log-probs, BDHS pairs, base reports), never
    the current directory: $MMALIGN_CACHE, else $XDG_CACHE_HOME/mmalign, else ~/.cache/mmalign."""
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset, or relative: the XDG spec says to ignore a relative one
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mmalign")


def looks_local(name):
    """A model name that can only mean a local folder: a hub id is `name` or `owner/name`, never
    ./x, /x, ~/x, a deeper path, an existing file or one whose parent folder exists here."""
    parent = os.path.dirname(name)
    return (
        name.startswith((".", "/", "~", "runs" + os.sep))
        or os.path.exists(name)
        or len(name.replace(os.sep, "/").split("/")) > 2
        or (parent != "" and os.path.isdir(parent))
    )


# -----------------------------------------------------------------------------
# Errors that name what is wrong with a checkpoint


def defaulted_keys(raw, path):
    """For a shape error: size keys config.json leaves out, which transformers' defaults filled."""
    keys = ("hidden_size", "intermediate_size", "num_attention_heads")
    miss = [
        f"{part}.{k}"
        for part in ("vision_config", "text_config")
        if isinstance(raw.get(part), dict)
        for k in keys
        if k not in raw[part]
    ]
    return f" ({path} has no {', '.join(miss)}: transformers' defaults were used)" if miss else ""


class MissingTokenizer:
    """Stands in for a missing tokenizer.json: the weights load and run, text fails naming it."""

    def __init__(self, path):
        self.path = path

    def __bool__(self):
        return False

    def __getattr__(self, name):
        if name.startswith("__"):  # copy / pickle probing for optional hooks
            raise AttributeError(name)
        raise UserFileError(
            f"{self.path}: no tokenizer.json, so this model cannot encode or "
            f"decode text; copy the checkpoint's tokenizer.json there"
        )


# -----------------------------------------------------------------------------
# The chat template a checkpoint was trained with, from its files (the templates themselves: model.TEMPLATES)


def check_template(name):
    """A --template value: "" (detect it from the checkpoint) or one of TEMPLATES."""
    if name and name not in TEMPLATES:
        raise UserError(
            f"--template {name!r}: expected one of {', '.join(TEMPLATES)}, or '' to detect it"
        )
    return name


def jinja_template(name):
    """TEMPLATES[name] as a Jinja chat template, written into a checkpoint whose own is missing or was
    overridden by --template, so that transformers' apply_chat_template prompts it as it was trained. A
    message's content is a string or a list of {"type": "image"} ("<image>\\n") and {"type": "text"} parts."""
    t = TEMPLATES[name]
    (u0, u1), (r0, r1) = t["user"].split("{}"), t["reply"].split("{}")
    q = functools.partial(json.dumps, ensure_ascii=False)  # a JSON string is a Jinja string literal
    return (
        f"{{{{- {q(t['system'])} -}}}}"
        "{%- for m in messages -%}"
        f"{{{{- {q(u0)} if m['role'] == 'user' else {q(t['assistant'] + r0)} -}}}}"
        "{%- if m['content'] is string -%}{{- m['content'] -}}{%- else -%}"
        "{%- for p in m['content'] -%}"
        "{{- '<image>\\n' if p['type'] == 'image' else p['text'] -}}"
        "{%- endfor -%}{%- endif -%}"
        f"{{{{- {q(u1)} if m['role'] == 'user' else {q(r1)} -}}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {q(t['assistant'])} -}}}}{{%- endif -%}}"
    )


def match_template(text):
    """Which of TEMPLATES a Jinja chat template renders, from markers its output must hold (no Jinja at run
    time), or None. "USER" / "ASSISTANT" may be literal or built from the role names
    (`message['role'].upper()`, `message.role | upper`); a system line "A chat between..." makes it vicuna."""
    if "<|im_start|>" in text:
        return "chatml"
    if "[INST]" in text:
        return "mistral"
    from_roles = re.search(r"role\W*upper\b", text) is not None
    if ("USER" in text or from_roles) and ("ASSISTANT" in text or from_roles):
        return "vicuna" if "A chat between" in text else "llava"
    return None


def guess_template(cfg: VLMConfig, tokenizer, chat_template: str = "", source="the chat template"):
    """The template a checkpoint was trained with, from its chat template text, else from its architecture."""
    if chat_template:
        name = match_template(chat_template)
        if name is None:
            raise UserError(
                f"{source}: its chat template matches none of ours ({', '.join(TEMPLATES)}); "
                f"pass --template NAME for the one its prompts follow"
            )
        return name
    if tokenizer and tokenizer.token_to_id("<|im_start|>") is not None:
        return "chatml"
    return {"mistral": "mistral", "qwen2": "chatml"}.get(cfg.text.kind, "vicuna")


def template_line(vlm):
    """The one line a run prints about the template its prompts use, and why."""
    return f"chat template: {vlm.template} (from {vlm.template_source})"
