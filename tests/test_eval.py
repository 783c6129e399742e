"""The paper's benchmarks: the rule-scored ones (POPE, TextVQA, GQA) on fixtures in their releases' layouts against
hand-computed values, and the judge client of the open-ended ones against a fake chat-completions server on
127.0.0.1 (retries on 429 / 500, cached judgments reused, a judge that stays down gives a clear error and keeps what
was finished)."""
import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

import eval as ev

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "bench")

# -----------------------------------------------------------------------------
# Rule-scored benchmarks


@pytest.mark.parametrize("text,want", [
    ("Two.", "2"), ("none", "0"), ("the coca-cola", "coca cola"), ("dont stop", "don't stop"), ("Yes, sir!", "yes sir"),
    ("3.5", "3.5"), ("Joe's Diner", "joe 's diner"), ("(a) b", "b"), ("An apple", "apple"), ("well", "well"),
])
def test_vqa_normalize(text, want):
    assert ev.vqa_normalize(text) == want


def test_vqa_accuracy_by_hand():
    answers = ["two", "two", "2", "yes", "yes", "yes", "yes", "yes", "yes", "yes"]  # "2" x 3, "yes" x 7
    # "2": the 3 subsets without a "2" keep 2 matches (2/3), the 7 others keep 3 (1): (3 x 2/3 + 7) / 10
    assert abs(ev.vqa_accuracy("2", answers) - 0.9) < 1e-12
    assert ev.vqa_accuracy("Yes.", answers) == 1.0 and ev.vqa_accuracy("no", answers) == 0.0
    assert abs(ev.vqa_accuracy("3", ["2"] * 9 + ["3"]) - 0.3) < 1e-12  # 9 subsets keep one "3": 9 x 1/3 / 10


def test_benchmark_scores_on_fixtures():
    pope = ev.load_bench("pope", FIX)
    assert [(it["kind"], it["gold"]) for it in pope] == [(k, g) for k in ("random", "popular", "adversarial")
                                                         for g in (True, False)]
    assert all(os.path.exists(it["image"]) for it in pope)
    # random: right twice (F1 100); popular: yes to both (precision .5, recall 1: F1 66.7); adversarial: no to both
    r = ev.score_bench("pope", pope, ["Yes, there is.", "No.", "yes", "yes", "No, there is not.", "no"])
    assert r["pope_random_f1"] == 100.0 and abs(r["pope_popular_f1"] - 200 / 3) < 1e-9
    assert r["pope_adversarial_f1"] == 0.0 and r["pope_popular_yes_ratio"] == 100.0
    assert abs(r["pope"] - (100 + 200 / 3) / 3) < 1e-9
    tv = ev.load_bench("textvqa", FIX)
    assert len(tv) == 2 and len(tv[0]["gold"]) == 10 and tv[0]["question"].endswith(ev.SHORT)
    assert abs(ev.score_bench("textvqa", tv, ["3", "Blue."])["textvqa"] - 65.0) < 1e-9  # (0.3 + 1.0) / 2
    gqa = ev.load_bench("gqa", FIX)
    assert ev.score_bench("gqa", gqa, ["Yes.", "green"])["gqa"] == 50.0


def test_missing_or_malformed_benchmark_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"textvqa: .*TextVQA_0.5.1_val.json not found. Put .*textvqa.org"):
        ev.load_bench("textvqa", str(tmp_path))
    shutil.copytree(os.path.join(FIX, "pope"), tmp_path / "pope")
    with open(tmp_path / "pope" / "coco_pope_popular.json", "a") as f:
        f.write('{"question_id": 3, "image": "x.jpg"\n')
    with pytest.raises(ValueError, match=r"coco_pope_popular.json:3: not a POPE record"):
        ev.load_bench("pope", str(tmp_path))
    with pytest.raises(ValueError, match="expected one of"):
        ev.load_bench("mmbench", FIX)


def test_end_to_end_on_the_fixtures(tmp_path):
    rows = ev.main(["--bench", "pope,textvqa,gqa", "--bench_dir", FIX, "--out", str(tmp_path / "r.json")])
    r = rows["world-base"]
    assert (r["pope_n"], r["textvqa_n"], r["gqa_n"]) == (6, 2, 2)
    assert all(0 <= r[k] <= 100 for k in ("pope", "textvqa", "gqa"))
    assert json.load(open(tmp_path / "r.json"))["world-base"]["pope"] == r["pope"]

# -----------------------------------------------------------------------------
# The judge client


@pytest.fixture
def server():
    """A fake endpoint that answers with the scripted status codes first, then 200 with a reply naming the
    request's last message; it records every request body and header."""
    state = dict(script=[], bodies=[], auth=[])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["bodies"].append(body)
            state["auth"].append(self.headers.get("Authorization"))
            code = state["script"].pop(0) if state["script"] else 200
            reply = {"choices": [{"message": {"role": "assistant", "content": f"rated: {body['messages'][-1]['content']}"}}]}
            payload = json.dumps(reply if code == 200 else {"error": {"message": "try later"}}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()


def client(server, tmp_path, **kw):
    return ev.JudgeClient(str(tmp_path / "judgments.jsonl"), base_url=server["url"], model="judge-x", api_key="k1",
                          backoff=0.01, **kw)


def msg(text):
    return [{"role": "user", "content": text}]


def test_retries_on_429_and_500(server, tmp_path):
    server["script"] = [429, 500]
    c = client(server, tmp_path)
    assert c(msg("a")) == "rated: a"
    assert c.asked == 3 and len(server["bodies"]) == 3
    assert server["bodies"][0]["model"] == "judge-x" and server["bodies"][0]["temperature"] == 0.0
    assert server["auth"][0] == "Bearer k1"


def test_cached_judgments_are_reused(server, tmp_path):
    c = client(server, tmp_path)
    assert [c(msg(t)) for t in "abc"] == ["rated: a", "rated: b", "rated: c"]
    with open(tmp_path / "judgments.jsonl", "a") as f:
        f.write('{"key": "cut by a ki')  # a line cut by a kill is ignored
    again = client(server, tmp_path)
    assert [again(msg(t)) for t in "abc"] == ["rated: a", "rated: b", "rated: c"]
    assert again.asked == 0 and len(server["bodies"]) == 3
    assert again(msg("d")) == "rated: d" and again.asked == 1  # only what is missing is asked
    other = ev.JudgeClient(str(tmp_path / "judgments.jsonl"), base_url=server["url"], model="judge-y", backoff=0.01)
    other(msg("a"))  # another judge model is another judgment
    assert other.asked == 1


def test_a_judge_that_stays_down_errors_and_keeps_finished_items(server, tmp_path):
    c = client(server, tmp_path, retries=2)
    c(msg("done"))
    server["script"] = [503] * 10
    with pytest.raises(RuntimeError, match=r"failed after 3 request\(s\): HTTP 503.*1 judgments made so far are kept"):
        c(msg("next"))
    server["script"] = [400]  # a client error is not retried
    with pytest.raises(RuntimeError, match="after 1 request"):
        c(msg("bad"))
    server["script"] = []
    again = client(server, tmp_path)
    assert again(msg("done")) == "rated: done" and again.asked == 0
    assert again(msg("next")) == "rated: next"


def test_unreachable_judge_and_image_parts(tmp_path):
    c = ev.JudgeClient(str(tmp_path / "j.jsonl"), base_url="http://127.0.0.1:9", retries=1, backoff=0.01)
    with pytest.raises(RuntimeError, match="127.0.0.1:9.*failed after 2"):
        c(msg("x"))
    part = ev.image_part(Image.new("RGB", (4, 4), (255, 0, 0)))
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
