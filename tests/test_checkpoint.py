"""A saved checkpoint replaces its source: every tokenizer and processor file, the source's dtype, a config whose
dtype keys agree, transformers loading it with equal logits and a working apply_chat_template, and the chat
template detected from where transformers keeps it (issue 28, "What to build" 3)."""

import fnmatch
import json
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hub  # noqa: E402
import model as M  # noqa: E402
from model import VLM, format_chat  # noqa: E402
from tiny import build_hf, random_image  # noqa: E402

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "assets", "world-base")

# A vicuna-style template without a system line, in our own words: "USER" and "ASSISTANT" come from the role
# names, as in llava-hf's checkpoints; the generation prompt is the one literal "ASSISTANT:".
ROLE_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% else %}{{ ' ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# files a real checkpoint may carry beside what transformers' save writes: each must come back byte for byte
EXTRA = {
    "added_tokens.json": b'{"<image>": 4}\n',
    "special_tokens_map.json": b'{"bos_token": "<s>"}\r\n',
    "tokenizer.model": bytes(range(256)) * 3,
    "additional_chat_templates/terse.jinja": b"{{ 'x' }}",
}
TURNS = [
    {"role": "user", "content": "<image>\nWhat is shown?"},
    {"role": "assistant", "content": "A cup."},
    {"role": "user", "content": "Colour?"},
]


def build(path, model_type="llava_next", dtype=None, template=ROLE_TEMPLATE):
    """build_hf's folder with a chat_template.jinja (and weights in `dtype`, as transformers saves them)."""
    hf, proc = build_hf(path, model_type=model_type)
    proc.chat_template = template
    proc.save_pretrained(path)
    if dtype is not None:
        hf = hf.to(dtype)
        hf.save_pretrained(path)
    return hf, proc


@pytest.fixture(scope="module", params=["llava_next", "llava"])
def source(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf, proc = build(str(path), request.param)
    for fn, b in EXTRA.items():
        (path / fn).parent.mkdir(exist_ok=True)
        (path / fn).write_bytes(b)
    return hf, proc, str(path)


def inputs(proc):
    ims = [random_image(40, 70, seed=0), random_image(90, 30, seed=1)]
    text = [
        format_chat([{"role": "user", "content": "<image>\nWhat is this?"}], "llava"),
        format_chat(TURNS[:1], "llava"),
    ]
    return proc(text=text, images=ims, return_tensors="pt", padding=True, padding_side="left")


def logits(model, inp):
    am = inp["attention_mask"]
    with torch.no_grad():
        out = model(**inp, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    return out[am.bool()]


def test_every_tokenizer_and_processor_file_is_copied(source, tmp_path):
    _, _, path = source
    assert os.path.exists(os.path.join(path, "chat_template.jinja"))
    VLM.from_pretrained(path).save_pretrained(str(tmp_path / "out"))
    carried = [
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "generation_config.json",
        *EXTRA,
    ]
    for fn in carried:
        with open(os.path.join(path, fn), "rb") as a, open(tmp_path / "out" / fn, "rb") as b:
            assert a.read() == b.read(), fn


def test_transformers_loads_the_saved_folder_and_its_chat_template_works(source, tmp_path):
    hf, proc, path = source
    vlm = VLM.from_pretrained(path)
    assert vlm.template == "llava"  # no system line: the template builds USER from the role name
    out = str(tmp_path / "out")
    vlm.save_pretrained(out)
    theirs = type(hf).from_pretrained(out).eval()
    inp = inputs(proc)
    assert (logits(theirs, inp) - logits(hf, inp)).abs().max() <= 1e-5
    saved = transformers.AutoProcessor.from_pretrained(out)
    for n in (1, 3):  # the prompt we build is the one transformers renders
        text = saved.apply_chat_template(TURNS[:n], add_generation_prompt=True, tokenize=False)
        assert text == format_chat(TURNS[:n], vlm.template)
    parts = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}
    ]
    assert saved.apply_chat_template(
        parts, add_generation_prompt=True, tokenize=False
    ) == format_chat(TURNS[:1], vlm.template)


@pytest.mark.parametrize("dtype_key", ["dtype", "torch_dtype"])
def test_a_bf16_source_is_saved_in_bf16_with_lora_merged_in_fp32(tmp_path, dtype_key):
    src = tmp_path / "src"
    hf, proc = build(str(src), dtype=torch.bfloat16)
    raw = json.loads((src / "config.json").read_text())
    raw["text_config"]["dtype"] = raw["vision_config"]["dtype"] = (
        "bfloat16"  # as the folder had
    )
    if dtype_key == "torch_dtype":  # a config in the older spelling only
        raw["torch_dtype"] = raw.pop("dtype")
    (src / "config.json").write_text(json.dumps(raw, indent=2))
    vlm = VLM.from_pretrained(str(src))  # computes in fp32, remembers bf16 in vlm.source_dtype
    assert vlm.lm_head.weight.dtype == torch.float32
    vlm.save_pretrained(str(tmp_path / "plain"))
    M.add_lora(vlm, r=4, alpha=8)
    with torch.no_grad():
        for n, p in vlm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    vlm.save_pretrained(str(tmp_path / "lora"))
    before = {hub.hf_name(k): v for k, v in load_file(str(src / "model.safetensors")).items()}
    plain = {
        hub.hf_name(k): v
        for k, v in load_file(str(tmp_path / "plain" / "model.safetensors")).items()
    }
    assert {v.dtype for v in plain.values()} == {torch.bfloat16}
    # the same tensors, only the header differs
    assert (
        abs(
            os.path.getsize(tmp_path / "plain" / "model.safetensors")
            - os.path.getsize(src / "model.safetensors")
        )
        < 4096
    )
    assert sorted(plain) == sorted(before) and all(torch.equal(plain[k], before[k]) for k in before)
    for d in ("plain", "lora"):
        cfg = json.loads((tmp_path / d / "config.json").read_text())
        assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
        assert cfg["text_config"]["dtype"] == cfg["vision_config"]["dtype"] == "bfloat16"
    # the merged weight: W + s B A summed in fp32, then rounded once to bf16
    lin = vlm.model.language_model.layers[0].self_attn.q_proj
    want = (lin.weight + lin.lora_B @ lin.lora_A * lin.scale).to(torch.bfloat16)
    merged = load_file(str(tmp_path / "lora" / "model.safetensors"))
    assert torch.equal(merged["model.language_model.layers.0.self_attn.q_proj.weight"], want)
    # transformers reads the saved folder in bf16 and gives the source folder's logits exactly
    theirs = type(hf).from_pretrained(str(tmp_path / "plain"), dtype="auto").eval()
    orig = type(hf).from_pretrained(str(src), dtype="auto").eval()
    assert theirs.lm_head.weight.dtype == torch.bfloat16
    inp = inputs(proc)
    inp["pixel_values"] = inp["pixel_values"].to(torch.bfloat16)
    assert torch.equal(logits(theirs, inp), logits(orig, inp))
    assert vlm.source_dtype == torch.bfloat16


def test_the_fp32_world_model_and_a_from_config_model_save_as_today(tmp_path):
    """Guards, true before and after: the shipped model saves byte for byte (its tensors bit for bit: safetensors'
    writer orders the header its own way), from_config keeps fp32."""
    vlm = VLM.from_pretrained(BASE)
    assert vlm.source_dtype == torch.float32
    vlm.save_pretrained(str(tmp_path / "w"))
    assert sorted(os.listdir(tmp_path / "w")) == sorted(os.listdir(BASE))
    for fn in os.listdir(BASE):
        if fn == "model.safetensors":
            a, b = load_file(os.path.join(BASE, fn)), load_file(str(tmp_path / "w" / fn))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            with safe_open(str(tmp_path / "w" / fn), "pt") as f:
                assert f.metadata() == {"format": "pt"}
            continue
        with open(os.path.join(BASE, fn), "rb") as a, open(tmp_path / "w" / fn, "rb") as b:
            assert a.read() == b.read(), fn
    raw = json.loads(open(os.path.join(BASE, "config.json")).read())
    fresh = VLM.from_config(raw)
    assert fresh.source_dtype is None
    fresh.save_pretrained(str(tmp_path / "f"))
    assert json.loads((tmp_path / "f" / "config.json").read_text())["dtype"] == "float32"
    with safe_open(str(tmp_path / "f" / "model.safetensors"), "pt") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "F32"


def test_chat_templates_are_matched_without_jinja():
    # a rendered text matches too
    ours = {name: json.dumps(format_chat(TURNS, name)) for name in M.TEMPLATES}
    assert {name: hub.match_template(text) for name, text in ours.items()} == {
        n: n for n in M.TEMPLATES
    }
    assert hub.match_template(ROLE_TEMPLATE) == "llava"
    assert hub.match_template("{{ m.role | upper }}: {{ m.content }}") == "llava"
    assert hub.match_template("A chat between a person and a model. " + ROLE_TEMPLATE) == "vicuna"
    assert (
        hub.match_template("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
        == "mistral"
    )
    assert hub.match_template("<|start_header_id|>{{ m['role'] }}<|end_header_id|>") is None
    # a role name without .upper() is not USER
    assert hub.match_template("User: {{ m['content'] }}") is None


def test_the_template_is_looked_up_where_transformers_looks(tmp_path):
    path = str(tmp_path / "m")
    build_hf(path, text="mistral")  # no chat template anywhere: by architecture
    folder = tmp_path / "m"
    (folder / "tokenizer.json").unlink()  # its <|im_start|> token would say chatml
    vlm = VLM.from_pretrained(path)
    assert vlm.template == "mistral" and "architecture" in vlm.template_source
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["chat_template"] = [
        {"name": "default", "template": "<|im_start|>{{ m }}"},
        {"name": "x", "template": ""},
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    # the tokenizer's, as a list of named templates
    assert VLM.from_pretrained(path).template == "chatml"
    proc = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").write_text(
        json.dumps(proc | {"chat_template": "[INST] {{ m }}"})
    )
    assert VLM.from_pretrained(path).template == "mistral"  # the processor's before the tokenizer's
    (folder / "chat_template.json").write_text(
        json.dumps({"chat_template": "A chat between. USER: ASSISTANT:"})
    )
    assert VLM.from_pretrained(path).template == "vicuna"
    (folder / "chat_template.jinja").write_text(ROLE_TEMPLATE)
    vlm = VLM.from_pretrained(path)
    assert vlm.template == "llava" and vlm.template_source == os.path.join(
        path, "chat_template.jinja"
    )
    assert (
        hub.template_line(vlm)
        == f"chat template: llava (from {os.path.join(path, 'chat_template.jinja')})"
    )
    (folder / "chat_template.jinja").write_text("<|start_header_id|>{{ m }}")
    with pytest.raises(ValueError, match="chat_template.jinja.*--template"):
        VLM.from_pretrained(path)
    vlm = VLM.from_pretrained(path, template="chatml")  # the flag overrides what matches nothing
    assert (
        vlm.template == "chatml"
        and hub.template_line(vlm) == "chat template: chatml (from --template)"
    )


@pytest.mark.parametrize("template", list(M.TEMPLATES))
def test_a_template_chosen_by_the_flag_is_the_saved_ones(source, tmp_path, template):
    """--template overrides the source's chat template: the saved checkpoint carries ours as chat_template.jinja,
    so that transformers (tokenizer and processor) and our loader prompt it as it was trained."""
    _, _, path = source
    out = str(tmp_path / "out")
    VLM.from_pretrained(path, template=template).save_pretrained(out)
    vlm = VLM.from_pretrained(out)
    assert vlm.template == template and vlm.template_source == os.path.join(
        out, "chat_template.jinja"
    )
    tok = transformers.AutoTokenizer.from_pretrained(out)
    proc = transformers.AutoProcessor.from_pretrained(out)
    parts = [{"type": "image"}, {"type": "text", "text": "What is shown?"}]
    for n in (1, 2, 3):
        for gen in (True, False):
            want = format_chat(TURNS[:n], template, add_generation_prompt=gen)
            kw = dict(add_generation_prompt=gen, tokenize=False)
            assert tok.apply_chat_template(TURNS[:n], **kw) == want
            as_parts = [dict(TURNS[0], content=parts)] + TURNS[1:n]
            assert proc.apply_chat_template(as_parts, **kw) == want


def test_the_template_flag(source, tmp_path, capsys, monkeypatch):
    import bdhs
    import eval as ev
    import huggingface_hub
    import train_offline
    import train_online

    _, _, path = source
    for script in (train_offline, train_online, bdhs, ev):
        assert script.Config().template == ""
    with pytest.raises(ValueError, match="--template 'alpaca'"):
        VLM.from_pretrained(path, template="alpaca")
    outs = {train_offline: "--out_dir", train_online: "--out_dir", bdhs: "--out", ev: "--out"}
    for script, out in outs.items():  # refused before anything loads
        with pytest.raises(ValueError, match="--template 'alpaca'"):
            script.main(["--template", "alpaca", out, str(tmp_path / "x")])
    img = tmp_path / "x.png"
    random_image(40, 50).save(img)
    capsys.readouterr()
    M.main(["--model", path, "--image", str(img), "--max_new_tokens", "2", "--template", "mistral"])
    assert capsys.readouterr().out.splitlines()[0] == "chat template: mistral (from --template)"
    # a hub download fetches every file a save carries
    calls = []
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append(kw) or path
    )
    M.main(["--model", "someone/tiny-llava", "--max_new_tokens", "1"])
    assert (
        f"chat template: llava (from {os.path.join(path, 'chat_template.jinja')})"
        in capsys.readouterr().out
    )
    for fn in hub.CARRIED + (
        "chat_template.jinja",
        "additional_chat_templates/terse.jinja",
        "config.json",
    ):
        assert any(fnmatch.fnmatch(fn, pat) for pat in calls[0]["allow_patterns"]), fn
