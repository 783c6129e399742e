"""The paper's benchmarks: the rule-scored ones (POPE, TextVQA, GQA) on fixtures in their releases' layouts against
hand-computed values, and the judge client of the open-ended ones against a fake chat-completions server on
127.0.0.1 (retries on 429 / 500 and malformed replies, cached judgments reused, a judge that stays down gives a clear
error and keeps what was finished, redirects refused, HTTPS_PROXY's tunnel, a deadline per request, threads), and
the zip caps."""

import base64
import contextlib
import json
import math
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

import benchmarks as bm
import eval as ev
from cli import UserError

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "bench")

# -----------------------------------------------------------------------------
# Rule-scored benchmarks


@pytest.mark.parametrize(
    "text,want",
    [
        ("Two.", "2"),
        ("none", "0"),
        ("the coca-cola", "coca cola"),
        ("dont stop", "don't stop"),
        ("Yes, sir!", "yes sir"),
        ("3.5", "3.5"),
        ("Joe's Diner", "joe 's diner"),
        ("(a) b", "b"),
        ("An apple", "apple"),
        ("well", "well"),
        # EvalAI's contractions: forms that are words stay, its others are there, one is backwards
        ("im", "im"),
        ("ive", "ive"),
        ("shed", "shed"),
        ("shell", "shell"),
        ("shes", "shes"),
        ("were", "were"),
        ("Im", "im"),
        ("aint", "ain't"),
        ("twas", "'twas"),
        ("maam", "ma'am"),
        ("hows", "how's"),
        ("whens", "when's"),
        ("whys", "why's"),
        ("someones", "someone's"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("'ows'at", "'ow's'at"),
        ("somebody'd", "somebodyd"),
        ("." * 32, ""),
        ("." * 33, "."),  # EvalAI strips the first 32 periods only
    ],
)
def test_vqa_normalize(text, want):
    """Each answer is what EvalAI's processor (LLaVA's m4c_evaluator.py) gives."""
    assert bm.vqa_normalize(text) == want


def test_vqa_accuracy_by_hand():
    # "2" x 3, "yes" x 7
    answers = [
        "two",
        "two",
        "2",
        "yes",
        "yes",
        "yes",
        "yes",
        "yes",
        "yes",
        "yes",
    ]
    # "2": the 3 subsets without a "2" keep 2 matches (2/3), the 7 others keep 3 (1): (3 x 2/3 + 7) / 10
    assert abs(bm.vqa_accuracy("2", answers) - 0.9) < 1e-12
    assert bm.vqa_accuracy("Yes.", answers) == 1.0 and bm.vqa_accuracy("no", answers) == 0.0
    # 9 subsets keep one "3": 9 x 1/3 / 10
    assert abs(bm.vqa_accuracy("3", ["2"] * 9 + ["3"]) - 0.3) < 1e-12
    assert bm.vqa_accuracy("we're", ["were"] * 10) == 0.0
    assert bm.vqa_accuracy("ain't", ["aint"] * 10) == 1.0


@pytest.mark.parametrize(
    "reply,yes",
    [
        ("Yes", True),
        ("No", False),
        ("No.", False),
        ("Yes, there is no cat.", False),
        ("not sure", False),
        ("NO", True),
        ("Not sure", True),  # only "No", "not", "no" count
        ("Yes\nNo", True),
        ("No\nThe image shows a cat.", True),
        ("No\n", True),  # " " splits only
        ("Yes. No.", True),
        ("There is a dog, no cat", False),
    ],
)
def test_pope_answer_rule(reply, yes):
    """POPE's evaluate.py (and LLaVA's eval_pope.py) gives the same yes / no."""
    assert ev.yes_no(reply) is yes


def test_pope_where_the_reference_script_crashes():
    """POPE's script divides by zero without a "yes" answer (precision) or with precision and
    recall 0 (F1); we report 0 there."""
    r = ev.pope_metrics([False, False], [True, False])
    assert r == dict(acc=50.0, precision=0.0, recall=0.0, f1=0.0, yes_ratio=0.0)
    assert ev.pope_metrics([True, False], [False, True])["f1"] == 0.0


def test_short_answer_prompt_is_the_default(monkeypatch):
    """POPE, TextVQA and GQA questions end with LLaVA's short-answer suffix, or go bare."""
    asked = []
    monkeypatch.setattr(
        ev, "answer", lambda vlm, ims, qs, *a, **k: asked.extend(qs) or ["y"] * len(qs)
    )
    bm.evaluate_bench(None, ["pope", "textvqa", "gqa"], FIX)
    assert len(asked) == 10 and all(q.endswith(bm.SHORT) and q.count("?") == 1 for q in asked)
    asked.clear()
    bm.evaluate_bench(None, ["pope", "textvqa", "gqa"], FIX, short_prompt=False)
    assert len(asked) == 10 and not any(bm.SHORT in q for q in asked) and asked[0].endswith("?")
    asked.clear()
    stub = types.SimpleNamespace(eval=lambda: stub, template="llava", template_source="a stub")
    monkeypatch.setattr(ev.VLM, "from_pretrained", lambda path, **kw: stub)
    ev.main(["--bench", "pope", "--bench_dir", FIX, "--short_prompt", "false"])  # the switch
    assert len(asked) == 6 and not any(bm.SHORT in q for q in asked)


def test_benchmark_scores_on_fixtures():
    pope = bm.load_bench("pope", FIX)
    assert [(it["kind"], it["gold"]) for it in pope] == [
        (k, g) for k in ("random", "popular", "adversarial") for g in (True, False)
    ]
    assert all(os.path.exists(it["image"]) for it in pope)
    # random: right twice (F1 100); popular: yes to both (precision .5, recall 1: F1 66.7); adversarial: no to both
    r = bm.score_bench(
        "pope", pope, ["Yes, there is.", "No.", "yes", "yes", "No, there is not.", "no"]
    )
    assert r["pope_random_f1"] == 100.0 and abs(r["pope_popular_f1"] - 200 / 3) < 1e-9
    assert r["pope_adversarial_f1"] == 0.0 and r["pope_popular_yes_ratio"] == 100.0
    assert abs(r["pope"] - (100 + 200 / 3) / 3) < 1e-9
    # LLaVA strips the generated answer before eval_pope.py's parse: "No\n" is no, "Yes\n" yes
    r = bm.score_bench("pope", pope, ["Yes\n", "No\n", "yes", "No \n", "\nNo.\n", "no"])
    assert r["pope_random_f1"] == 100.0 and r["pope_popular_yes_ratio"] == 50.0
    assert r["pope_adversarial_yes_ratio"] == 0.0
    # the world's reader (and the rule) stay as they were
    assert ev.yes_no("No\n") and not ev.yes_no("No")
    tv = bm.load_bench("textvqa", FIX)
    assert len(tv) == 2 and len(tv[0]["gold"]) == 10 and tv[0]["question"].endswith("?")
    # (0.3 + 1.0) / 2
    assert abs(bm.score_bench("textvqa", tv, ["3", "Blue."])["textvqa"] - 65.0) < 1e-9
    gqa = bm.load_bench("gqa", FIX)
    assert bm.score_bench("gqa", gqa, ["Yes.", "green"])["gqa"] == 50.0


def test_missing_or_malformed_benchmark_files(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"textvqa: .*TextVQA_0.5.1_val.json not found. Put .*textvqa.org"
    ):
        bm.load_bench("textvqa", str(tmp_path))
    shutil.copytree(os.path.join(FIX, "pope"), tmp_path / "pope")
    with open(tmp_path / "pope" / "coco_pope_popular.json", "a") as f:
        f.write('{"question_id": 3, "image": "x.jpg"\n')
    with pytest.raises(ValueError, match=r"coco_pope_popular.json:3: malformed JSON"):
        bm.load_bench("pope", str(tmp_path))
    with pytest.raises(ValueError, match="expected one of"):
        bm.load_bench("mmbench", FIX)
    shutil.copytree(os.path.join(FIX, "objhal"), tmp_path / "objhal")
    os.remove(tmp_path / "objhal" / "annotations" / "captions_val2014.json")
    with pytest.raises(
        FileNotFoundError, match=r"objhal: .*captions_val2014.json not found. .*cocodataset.org"
    ):
        bm.load_bench("objhal", str(tmp_path))
    (tmp_path / "objhal" / "annotations" / "captions_val2014.json").write_text(
        '{"annotations": []}'
    )
    with pytest.raises(
        ValueError, match=r"captions_val2014.json has no caption of image ids \[391895, 391896\]"
    ):
        bm.load_bench("objhal", str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match=r"mmhal: .*response_template.json not found.*--download true"
    ):
        bm.load_bench("mmhal_v", str(tmp_path))
    shutil.copytree(os.path.join(FIX, "llavaw"), tmp_path / "llavaw")
    with open(tmp_path / "llavaw" / "questions.jsonl", "a") as f:
        f.write('{"question_id": 9, "image": "001.jpg", "text": "Why?"}\n')
    with pytest.raises(ValueError, match=r"questions.jsonl:3: no field 'category'"):
        bm.load_bench("llavaw", str(tmp_path))
    shutil.copy(os.path.join(FIX, "llavaw", "questions.jsonl"), tmp_path / "llavaw")
    (tmp_path / "llavaw" / "answers_gpt4.jsonl").write_text('{"question_id": 0, "text": "x"}\n')
    # question 1 has no answer
    with pytest.raises(ValueError, match=r"llavaw: .*llavaw: no field or record 1"):
        bm.load_bench("llavaw", str(tmp_path))


# -----------------------------------------------------------------------------
# The judge client


def fake_server(tls=None):
    """A fake endpoint (over TLS with an ssl server context `tls`) that answers with the scripted
    answers first, then 200 with a reply naming the request's last message (state["reply"](body): a
    text, or a status code to answer with); it records every request's body and Authorization
    header. A scripted answer is a status code or a dict(code, headers, body (bytes), trickle:
    seconds between the bytes of the reply). -> (state, server)."""
    state = dict(
        script=[],
        bodies=[],
        auth=[],
        reply=lambda body: f"rated: {body['messages'][-1]['content']}",
    )

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["bodies"].append(body)
            state["auth"].append(self.headers.get("Authorization"))
            item = state["script"].pop(0) if state["script"] else 200
            item = item if isinstance(item, dict) else dict(code=item)
            answer = state["reply"](body)
            item = dict(code=answer) if isinstance(answer, int) else item  # a reply may be a status
            code = item.get("code", 200)
            reply = {"choices": [{"message": {"role": "assistant", "content": answer}}]}
            error = {"error": {"message": "later"}}
            payload = item.get("body", json.dumps(reply if code == 200 else error).encode())
            head = (
                f"HTTP/1.1 {code} X\r\nContent-Length: {len(payload)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in item.get("headers", {}).items())
                + "\r\n"
            )
            whole = head.encode() + payload
            n = len(head) if item.get("prompt_head") else 0  # sent at once before the trickle
            chunks = [whole[:n]] * (n > 0) + [bytes([x]) for x in whole[n:]]
            try:
                for b in [whole] if "trickle" not in item else chunks:
                    self.wfile.write(b)
                    self.wfile.flush()
                    time.sleep(item.get("trickle", 0))
            except OSError:  # the client gave up
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["url"] = f"{'https' if tls else 'http'}://127.0.0.1:{httpd.server_address[1]}/v1"
    return state, httpd


@pytest.fixture
def server():
    state, httpd = fake_server()
    yield state
    httpd.shutdown()


def client(server, tmp_path, **kw):
    return bm.JudgeClient(
        str(tmp_path / "judgments.jsonl"),
        base_url=server["url"],
        model="judge-x",
        api_key="k1",
        **{"backoff": 0.01} | kw,
    )


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
    other = bm.JudgeClient(
        str(tmp_path / "judgments.jsonl"), base_url=server["url"], model="judge-y", backoff=0.01
    )
    other(msg("a"))  # another judge model is another judgment
    assert other.asked == 1


def test_a_judge_that_stays_down_errors_and_keeps_finished_items(server, tmp_path):
    c = client(server, tmp_path, retries=2)
    c(msg("done"))
    server["script"] = [503] * 10
    with pytest.raises(
        RuntimeError,
        match=r"failed after 3 request\(s\): HTTP 503.*1 judgments made so far are kept",
    ):
        c(msg("next"))
    server["script"] = [400]  # a client error is not retried
    with pytest.raises(RuntimeError, match="after 1 request"):
        c(msg("bad"))
    server["script"] = []
    again = client(server, tmp_path)
    assert again(msg("done")) == "rated: done" and again.asked == 0
    assert again(msg("next")) == "rated: next"


def test_a_redirect_is_refused_and_the_key_stays_home(server, tmp_path):
    """A 302 (or 307) to another host: no request reaches that host, nothing is cached, and the
    error says why."""
    other, httpd = fake_server()
    there = other["url"] + "/chat/completions"
    try:
        for code in (302, 307):
            server["script"] = [dict(code=code, headers={"Location": there})]
            c = client(server, tmp_path)
            with pytest.raises(
                RuntimeError,
                match=rf"judge {server['url']}/chat/completions "
                rf"answered HTTP {code}, a redirect to '{there}': redirects are "
                "refused, so that the API key never leaves the configured host",
            ):
                c(msg("a"))
            assert c.asked == 1 and not c.cache and not os.path.exists(tmp_path / "judgments.jsonl")
        assert other["bodies"] == [] and other["auth"] == [] and server["auth"] == ["Bearer k1"] * 2
    finally:
        httpd.shutdown()


def connect_proxy():
    """A CONNECT proxy on 127.0.0.1 that records each request's head, then pipes bytes both ways.
    -> (heads, url, its listening socket)."""
    heads, srv = [], socket.create_server(("127.0.0.1", 0))

    def pipe(a, b):
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def serve():
        with contextlib.suppress(OSError):  # the listening socket closed: the test is over
            while True:
                c, _ = srv.accept()
                head = b""
                while b"\r\n\r\n" not in head:
                    head += c.recv(1)
                heads.append(head.decode())
                host, port = head.split()[1].decode().rsplit(":", 1)
                up = socket.create_connection((host, int(port)))
                c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                threading.Thread(target=pipe, args=(c, up), daemon=True).start()
                threading.Thread(target=pipe, args=(up, c), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return heads, f"http://127.0.0.1:{srv.getsockname()[1]}", srv


def test_https_proxy_tunnels_and_the_key_stays_inside_tls(tmp_path, monkeypatch):
    """HTTPS_PROXY: the request goes through a CONNECT tunnel, so the proxy sees the target's name and
    its own credentials, never the key; NO_PROXY skips it; a plain-http endpoint never uses it."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=t",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
    )
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    secure, httpd = fake_server(tls)
    plain, httpd2 = fake_server()
    heads, proxy, srv = connect_proxy()
    for var in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client trusts the test certificate
    monkeypatch.setenv("https_proxy", proxy.replace("://", "://u:p%40ss@"))
    try:
        assert client(secure, tmp_path)(msg("a")) == "rated: a"
        target = secure["url"].split("/")[2]
        assert heads[0].startswith(f"CONNECT {target} HTTP/1.")
        assert "Bearer" not in heads[0] and "k1" not in heads[0]  # the key went inside the tunnel
        assert f"Proxy-Authorization: Basic {base64.b64encode(b'u:p@ss').decode()}" in heads[0]
        assert secure["auth"] == ["Bearer k1"]
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        assert client(secure, tmp_path)(msg("b")) == "rated: b" and len(heads) == 1  # direct
        monkeypatch.delenv("no_proxy")
        # plain http: direct
        assert client(plain, tmp_path)(msg("c")) == "rated: c" and len(heads) == 1
        assert plain["auth"] == ["Bearer k1"]
    finally:
        httpd.shutdown(), httpd2.shutdown(), srv.close()


def test_malformed_replies_are_retried_and_never_cached(server, tmp_path):
    null = json.dumps({"choices": [{"message": {"role": "assistant", "content": None}}]}).encode()
    server["script"] = [dict(body=null), dict(body=b"<html>busy</html>"), dict(body=b'{"x": 1}')]
    c = client(server, tmp_path)
    assert c(msg("a")) == "rated: a" and c.asked == 4
    server["script"] = [dict(body=null)] * 2
    with pytest.raises(RuntimeError, match=r"after 2 request\(s\): a malformed reply .*null"):
        client(server, tmp_path, retries=1)(msg("b"))
    lines = [json.loads(x) for x in open(tmp_path / "judgments.jsonl")]
    assert [x["content"] for x in lines] == ["rated: a"]
    # a cache poisoned by an older version (null content) is asked again, not a crash on every rerun
    poisoned = dict(key=lines[0]["key"], content=None)
    (tmp_path / "judgments.jsonl").write_text(json.dumps(poisoned) + "\n")
    again = client(server, tmp_path)
    assert again(msg("a")) == "rated: a" and again.asked == 1


def test_retry_after_forms_and_the_cap_on_waits(server, tmp_path, monkeypatch):
    from email.utils import formatdate

    assert bm.retry_after("120") == 120.0 and bm.retry_after(None) == bm.retry_after("soon") == 0.0
    assert bm.retry_after(formatdate(0, usegmt=True)) < 0  # in the past: the back-off alone
    assert 3000 < bm.retry_after(formatdate(time.time() + 3600, usegmt=True)) <= 3600
    waits = []
    monkeypatch.setattr(time, "sleep", lambda s: waits.append(s))
    tomorrow = formatdate(time.time() + 86400, usegmt=True)
    server["script"] = [
        dict(code=429, headers={"Retry-After": "86400"}),
        dict(code=503, headers={"Retry-After": tomorrow}),
    ]
    assert client(server, tmp_path, max_wait=7.0)(msg("a")) == "rated: a"
    assert [w for w in waits if w > 0] == [7.0, 7.0]  # a day asked for, the cap obeyed


def test_a_trickling_server_cannot_outlast_the_deadline(server, tmp_path):
    """One byte every 0.1 s: the socket timeout (0.5 s per read) never fires, the deadline of each
    request does."""
    server["script"] = [dict(trickle=0.1)] * 2
    c = client(server, tmp_path, timeout=0.5, retries=1)
    with pytest.raises(RuntimeError, match=r"after 2 request\(s\): no complete reply within 0.5 s"):
        c(msg("a"))
    assert c(msg("a")) == "rated: a"  # then a prompt server is read as usual


def test_the_deadline_holds_while_the_body_trickles(server, tmp_path):
    """The reply's head at once, then its body a byte every 0.1 s: urllib has let go of the
    connection's socket once the head is read, and the deadline still cuts the read."""
    server["script"] = [dict(trickle=0.1, prompt_head=True)]
    c, t = client(server, tmp_path, timeout=0.5, retries=0), time.monotonic()
    with pytest.raises(RuntimeError, match=r"after 1 request\(s\): no complete reply within 0.5 s"):
        c(msg("a"))
    assert time.monotonic() - t < 3  # the whole body would take 7 s


def test_a_line_cut_by_a_kill_loses_nothing_appended_after_it(server, tmp_path):
    c = client(server, tmp_path)
    c(msg("a"))
    with open(tmp_path / "judgments.jsonl", "a") as f:
        f.write('{"key": "cut by a ki')
    client(server, tmp_path)(msg("b"))  # appended on a new line, after the cut one
    again = client(server, tmp_path)
    assert [again(msg(t)) for t in "ab"] == ["rated: a", "rated: b"] and again.asked == 0


def test_threads_share_the_cache_and_the_spacing(server, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    c = client(server, tmp_path)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda t: c(msg(t)), "abcdefgh"))
    assert got == [f"rated: {t}" for t in "abcdefgh"]
    lines = open(tmp_path / "judgments.jsonl").read().splitlines()
    # one whole line per judgment
    assert (
        c.asked == 8
        and len(lines) == 8
        and {json.loads(x)["content"] for x in lines} == {f"rated: {t}" for t in "abcdefgh"}
    )
    waits = []
    monkeypatch.setattr(time, "sleep", lambda s: waits.append(s))  # time stands still
    spaced = client(server, tmp_path / "x", min_interval=10.0)
    os.makedirs(tmp_path / "x")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda t: spaced(msg(t)), "wxyz"))
    # each thread waits for its own slot, 10 s after the one before
    assert sorted(round(w / 10) for w in waits if w > 1) == [1, 2, 3]


def test_eval_flag_errors(monkeypatch):
    for k in ("JUDGE_BASE_URL", "JUDGE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(UserError, match="--bench foo: no such benchmark; expected any of pope,"):
        ev.main(["--bench", "pope,foo,mmvet"])
    for flag, value, bound in (
        ("n", "-5", ">= 1"),
        ("n", "0", ">= 1"),
        ("batch_size", "-1", ">= 0"),
        ("limit", "-1", ">= 0"),
        ("judge_retries", "-1", ">= 0"),
    ):
        with pytest.raises(UserError, match=f"--{flag} {value}: must be {bound}"):
            ev.main([f"--{flag}", value])
    with pytest.raises(UserError, match="--judge_timeout 0.0: must be > 0"):
        ev.main(["--judge_timeout", "0"])
    with pytest.raises(
        UserError, match=r"--world_half: invalid choice: 'c' \(choose from '', 'a', 'b'\)"
    ):
        ev.main(["--world_half", "c"])


def test_judge_timeout_and_retries_flags(server, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_BASE_URL", server["url"])
    server["script"] = [500, 500]
    with pytest.raises(RuntimeError, match=r"failed after 2 request\(s\): HTTP 500"):
        ev.main(
            [
                "--bench",
                "mmvet",
                "--bench_dir",
                FIX,
                "--limit",
                "1",
                "--max_new_tokens",
                "4",
                "--judge_retries",
                "1",
                "--judge_timeout",
                "5",
                "--judge_cache",
                str(tmp_path / "j.jsonl"),
            ]
        )


def test_unreachable_judge_and_image_parts(tmp_path):
    c = bm.JudgeClient(
        str(tmp_path / "j.jsonl"), base_url="http://127.0.0.1:9", retries=1, backoff=0.01
    )
    with pytest.raises(RuntimeError, match="127.0.0.1:9.*failed after 2"):
        c(msg("x"))
    part = bm.image_part(Image.new("RGB", (4, 4), (255, 0, 0)))
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )
    jpeg = os.path.join(FIX, "mmhal", "images", "0000_o.jpg")  # a JPEG file goes as its own bytes
    assert (
        bm.image_part(jpeg)["image_url"]["url"]
        == "data:image/jpeg;base64," + base64.b64encode(open(jpeg, "rb").read()).decode()
    )
    Image.new("RGB", (4, 4)).save(tmp_path / "x.bmp")
    assert bm.image_part(str(tmp_path / "x.bmp"))["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )


# -----------------------------------------------------------------------------
# Object HalBench (CHAIR with COCO synonyms) and the judge-scored benchmarks


# Texts and the objects RLAIF-V's eval_gpt_obj_halbench.py (rule path: NLTK's word_tokenize,
# WordNet's lemmatiser, CHAIR's pairs) finds in them with its synonym list; ours gives the same
OBJHAL_CASES = [
    # tokens: hyphens, slashes, digits and inner periods stay in the word; punctuation blocks a pair
    ("a hot-dog", []),
    ("a cell-phone", []),
    ("a teddy-bear", []),
    ("cat/dog", []),
    ("2dogs", []),
    ("a dog.The cat", ["cat"]),
    ("a dog-shaped kite", ["kite"]),
    ("cake-style doughnut", ["donut"]),
    ("**Dog**: a dog.", ["dog", "dog"]),
    ("a hot. Dog", ["dog"]),
    ("a dog's bowl", ["dog", "bowl"]),
    # WordNet's lemmas: "men" is a word there, "persons" a plural, "vases" is "vas"
    ("two men", []),
    ("three persons", ["person"]),
    ("mice and knives", ["mouse", "knife"]),
    ("vases", []),
    ("bikers", []),
    ("a biker", ["person"]),  # WordNet lacks "biker": no plural
    # CHAIR's pairs and special cases
    ("a toilet seat", ["toilet"]),
    ("the seat of the toilet", ["toilet"]),
    ("a seat", ["chair"]),
    ("a baby animal", []),
    ("a baby cub", []),
    ("baby animals", []),
    ("baby bears", ["bear"]),
    ("an adult giraffe", ["giraffe"]),
    ("a passenger bus", ["person", "bus"]),
    ("a passenger jet", ["airplane"]),
    ("a passenger train", ["train"]),
    ("train tracks; home plate", []),
    ("a stove top oven", ["oven", "oven"]),
    ("bow tie", ["tie"]),
    ("sports balls", ["sports ball"]),
    ("a wine glass", ["wine glass"]),
    # the list's facts
    ("a notebook", ["laptop"]),
    ("a dirt bike", ["bicycle"]),
    ("baseball players", ["person"]),
    ("a bow", ["tie"]),
    ("a goat", ["sheep"]),
    ("a panda", ["bear"]),
    ("a monitor", ["tv"]),
    ("street lights", ["traffic light"]),
    ("an iPhone", []),
    ("a phone", ["cell phone"]),
    (
        "Two men, three women and children ride buses past hot dogs, a teddy bear, knives and mice.",
        ["person", "person", "bus", "hot dog", "teddy bear", "knife", "mouse"],
    ),
]


@pytest.mark.parametrize("text,want", OBJHAL_CASES)
def test_coco_mentions_as_object_halbench_finds_them(text, want):
    assert bm.coco_mentions(text, bm.coco_vocab()) == want


def test_coco_synonym_lists(tmp_path):
    v = bm.coco_vocab()
    assert len(set(v.values())) == 80 and all(v[c] == c for c in set(v.values()))
    # another list in the standard format: ", "-separated, a word's last category wins, case kept
    (tmp_path / "syn.txt").write_text(
        "person, sailor, pooch\ndog, pooch\ndining table, table\ncell phone, iPhone\n"
    )
    other = bm.coco_vocab(str(tmp_path / "syn.txt"))
    assert other["pooch"] == "dog" and "iphone" not in other
    said = bm.coco_mentions("Sailors, a pooch, an iPhone and a man at a table.", other)
    assert said == ["person", "dog", "dining table"]


def test_object_halbench_chair_by_hand():
    """Object HalBench counts every mention for CHAIR_i (repeats too) and distinct present objects for recall."""
    v = bm.coco_vocab()
    preds = [
        "A man with two dogs and a dog bed. The man holds a cup.",
        "Nothing here.",
        "A cat on a couch.",
    ]
    said = [bm.coco_mentions(p, v) for p in preds]
    assert said[0] == ["person", "dog", "dog", "bed", "person", "cup"] and said[1] == []
    r = ev.chair(said, [{"person", "dog"}, {"cup"}, {"cat"}])
    # mentions 6 + 0 + 2, absent: bed, cup, couch; descriptions with one: 2 of 3; recall (2 + 0 + 1) / (2 + 1 + 1)
    assert r == dict(chair_i=100 * 3 / 8, chair_s=2 / 3 * 100, recall=75.0)
    assert 2 / 3 * 100 != 100 * 2 / 3  # the ratio first, then x 100, as the script: equal floats
    # Object HalBench's response-level rate
    its = [dict(gold=t) for t in ({"person", "dog"}, {"cup"}, {"cat"})]
    # counts the 2 that name objects
    assert bm.score_bench("objhal", its, preds)["objhal_response_hall"] == 100.0
    items = bm.load_bench("objhal", FIX)
    # instances, plus the captions' dog
    assert [it["gold"] for it in items] == [
        {"cup", "apple"},
        {"apple", "dog"},
    ]
    assert all(isinstance(it["image"], bytes) for it in items)


class Scripted:
    """A judge with scripted replies, recording what it was asked."""

    def __init__(self, replies):
        self.replies, self.asked = list(replies), []

    def __call__(self, messages, max_tokens, temperature):
        self.asked.append((messages, max_tokens, temperature))
        return self.replies.pop(0)


def items(kinds, **kw):
    return [
        dict(
            id=i,
            image=os.path.join(FIX, "mmhal", "images", "0000_o.jpg"),
            question=f"q{i}",
            gold=f"g{i}",
            kind=k,
            **kw,
        )
        for i, k in enumerate(kinds)
    ]


def test_mmhal_scores_by_hand():
    its = items(["attribute", "counting", "attribute", "counting"], objects=["Cup", "Tree"])
    judge = Scripted(["Fine.\nRating: 6", "rating: 2? No. Rating: 5", "no verdict", "Rating: 3"])
    r = bm.judge_bench("mmhal", its, ["a0", "a1", "a2", "a3"], judge)
    # ratings 6, 0 (two found), 0 (none), 3: mean 2.25; below 3: half; informativeness (3 + 0 + 0 + 0) / 4 / 3
    assert r == {
        "mmhal": 2.25,
        "mmhal_hallucination_rate": 50.0,
        "mmhal_informativeness": 25.0,
        "mmhal/attribute": 3.0,
        "mmhal/counting": 1.5,
    }
    text = judge.asked[0][0][0]["content"]
    assert "Image contents: Cup, Tree" in text and "q0" in text and "g0" in text and "a0" in text
    judge = Scripted(["Rating: 4"])
    r = bm.judge_bench("mmhal_v", its[:1], ["a0"], judge)  # MMHal-V: the same prompt, and the image
    content = judge.asked[0][0][0]["content"]
    assert r["mmhal_v"] == 4.0 and content[0]["text"] == text and content[1]["type"] == "image_url"


def test_llava_bench_relative_score_by_hand():
    its = items(["conv", "detail", "conv"], context=["A cat.", "A mat."])
    judge = Scripted(["8 6\nAssistant 1 is better.", "7,7\nTied.", "I would give 9 and 5."])
    r = bm.judge_bench("llavaw", its, ["a0", "a1", "a2"], judge)
    # pairs (8, 6), (7, 7), (-1, -1): the means 4.667 and 4.0 (a failed parse counts, as in LLaVA's
    # summary), 4.0 / 4.667 * 100 = 85.708... to 1 place
    assert r["llavaw"] == 85.7 and r["llavaw/conv"] == 71.4 and r["llavaw/detail"] == 100.0
    messages, _, temperature = judge.asked[0]
    assert messages[0]["role"] == "system" and temperature == 0.2
    text = messages[1]["content"]
    # the GPT-4 answer is Assistant 1
    assert "A cat.\nA mat." in text and text.index("g0") < text.index("a0")


def test_llava_bench_order_of_operations():
    """summarize_gpt_review.py: means rounded to 3 places, ratio x 100 rounded to 1: (1,1), (7,1),
    (10,8) give 3.333 / 6.0 * 100 = 55.55 -> 55.5 there (100 x 3.333 / 6.0 would round to 55.6); a
    zero mean is NaN here."""
    judge = Scripted(["1 1", "7 1", "10 8"])
    r = bm.judge_bench("llavaw", items(["conv"] * 3, context="c"), ["a"] * 3, judge)
    assert r["llavaw"] == 55.5 and round(100 * 3.333 / 6.0, 1) == 55.6
    r = bm.judge_bench("llavaw", items(["conv"], context="c"), ["a"], Scripted(["0 5"]))
    assert math.isnan(r["llavaw"])  # the reference script divides by zero there


@pytest.mark.parametrize(
    "reply,want",
    [
        ("8 6\nwhy", [8.0, 6.0]),
        ("7,7", [7.0, 7.0]),
        ("9.5 3", [9.5, 3.0]),
        ("7, 7", [-1, -1]),
        ("8  6", [-1, -1]),
        ("Scores: 8 6", [-1, -1]),
        ("a b", [-1, -1]),
        ("", [-1, -1]),
    ],
)
def test_llava_bench_score_parsing(reply, want):
    """LLaVA's parse_score: the first line, commas made spaces, split on single spaces, exactly two numbers."""
    assert bm.score_pair(reply) == want


def test_mm_vet_scores_and_retries_by_hand():
    its = [
        dict(id=i, image="", question=f"q{i}", gold=g, kind=k)
        for i, (g, k) in enumerate(
            [("3", ("math",)), ("cat<AND>dog", ("rec", "spat")), ("x<OR>y", ("rec",))]
        )
    ]
    judge = Scripted(["0.7", "high", "1.5", "0.4 because"] + ["?"] * 5)
    r = bm.judge_bench("mmvet", its, ["a0", "a1", "a2"], judge)
    # 0.7, 0.4 (third ask), 0 (five unreadable asks): 1.1 / 3 * 100 to 1 place
    assert [r[k] for k in ("mmvet", "mmvet/math", "mmvet/rec", "mmvet/spat")] == [36.7, 70, 20, 40]
    assert [t for _, _, t in judge.asked] == [0.0, 0.0, 0.0, 0.5] + [0.0, 0.0, 0.5, 1.0, 1.5]
    assert all(n == 3 for _, n, _ in judge.asked)
    assert "cat <AND> dog" in judge.asked[1][0][0]["content"]
    again = judge.asked[1][0][0]["content"] + bm.PROMPTS["mmvet_retry"]
    assert judge.asked[2][0][0]["content"] == again


@pytest.mark.parametrize(
    "reply,want",
    [
        ("0.7", 0.7),
        ("0.7 because", 0.7),
        ("\n0.7", 0.7),
        ("1", 1.0),
        (" 0.7", None),
        ("0.7\nwhy", None),
        ("1.5", None),
        ("-0.1", None),
        ("nan", None),
        ("", None),
        ("So 1", None),
    ],
)
def test_mm_vet_score_parsing(reply, want):
    """MM-Vet's evaluator: the first piece split on single spaces, stripped, a float in [0, 1]
    (" 0.7" starts with an empty piece: asked again there too). It takes "nan" (its total becomes
    NaN); we ask again."""
    assert bm.correctness(reply) == want


def test_every_benchmark_end_to_end_with_a_judge(server, tmp_path, monkeypatch, capsys):
    """The shipped base over every fixture, judged by the fake server: the Table 2 columns, the MMHal-V judge sees
    the image, a rerun asks nothing, and --judge_prompts replaces a wording."""

    def reply(body):
        m = body["messages"][-1]["content"]
        m = m if isinstance(m, str) else m[0]["text"]
        return (
            "Good.\nRating: 5"
            if "Rating: N" in m or "OWN" in m
            else "8 6\nfine"
            if "[Assistant 1]" in m
            else "0.5"
        )

    server["reply"] = reply
    monkeypatch.setenv("JUDGE_BASE_URL", server["url"])
    monkeypatch.setenv("JUDGE_MODEL", "judge-x")
    argv = [
        "--bench",
        "pope,objhal,mmhal,mmhal_v,llavaw,mmvet,textvqa,gqa",
        "--bench_dir",
        FIX,
        "--out",
        str(tmp_path / "out" / "r.json"),
        "--max_new_tokens",
        "48",
    ]
    r = ev.main(argv)["world-base"]
    assert set(bm.TABLE2.values()) <= set(r) and (
        r["mmhal"],
        r["mmhal_v"],
        r["llavaw"],
        r["mmvet"],
    ) == (5, 5, 75, 50)
    cap = capsys.readouterr()
    said, head = cap.out.splitlines()[:2]
    # the world's template, printed per model
    found = os.path.join(ev.W.BASE_MODEL, "tokenizer_config.json")
    assert said == f"world-base: chat template: llava (from {found})"
    assert (
        head == "| model | " + " | ".join(bm.TABLE2) + " |"
        and "| Rec_coco | CHAIR_s | CHAIR_i |" in head
    )
    row = cap.out.splitlines()[3].split(" | ")  # Object HalBench's CHAIR beside its recall
    assert row[-2:] == [f"{r['objhal_chair_s']:.1f}", f"{r['objhal_chair_i']:.1f} |"]
    # progress bars
    assert all(f"{b}: " in cap.err for b in ("pope", "objhal", "mmhal", "llavaw", "mmvet"))
    # judgments cached beside --out; each question's answer and score in answers.jsonl beside it
    assert cap.out.splitlines()[-2:] == [
        f"answers: {tmp_path / 'out' / 'answers.jsonl'}",
        f"judgments: {tmp_path / 'out' / 'judgments.jsonl'}",
    ]
    lines = [json.loads(x) for x in open(tmp_path / "out" / "answers.jsonl")]
    items = {
        b: bm.load_bench(b, FIX)
        for b in ("pope", "objhal", "mmhal", "llavaw", "mmvet", "textvqa", "gqa")
    }
    # mmhal_v judges mmhal's answers
    assert len(lines) == sum(map(len, items.values())) + len(items["mmhal"])
    by = {b: [a for a in lines if a["bench"] == b] for b in items}
    assert all(a["model"] == "world-base" and isinstance(a["answer"], str) for a in lines)
    assert [(a["id"], a["question"]) for a in by["pope"]] == [
        (it["id"], it["question"]) for it in items["pope"]
    ]
    # the per-question yes / no give POPE's scores
    for kind in (
        "random",
        "popular",
        "adversarial",
    ):
        sel = [(a["yes"], a["correct"]) for a in by["pope"] if a["kind"] == kind]
        assert (
            ev.pope_metrics([y for y, _ in sel], [y == c for y, c in sel])["f1"]
            == r[f"pope_{kind}_f1"]
        )
    hall = [a for a in by["objhal"] if a["hallucinated"]]
    assert abs(100 * len(hall) / len(by["objhal"]) - r["objhal_chair_s"]) < 1e-9
    assert {a["rating"] for a in by["mmhal"]} == {5} and {
        a["correctness"] for a in by["mmvet"]
    } == {0.5}
    assert {(a["reference_score"], a["score"]) for a in by["llavaw"]} == {(8.0, 6.0)}
    assert (
        abs(100 * sum(a["accuracy"] for a in by["textvqa"]) / len(by["textvqa"]) - r["textvqa"])
        < 1e-9
    )
    assert abs(100 * sum(a["correct"] for a in by["gqa"]) / len(by["gqa"]) - r["gqa"]) < 1e-9
    n = len(server["bodies"])
    assert (
        n == 2 + 2 + 2 + 2
        and json.load(open(tmp_path / "out" / "r.json"))["world-base"]["mmvet"] == 50
    )
    vision = [b for b in server["bodies"] if not isinstance(b["messages"][-1]["content"], str)]
    assert len(vision) == 2 and all(b["model"] == "gpt-4o" for b in vision)
    assert {b["model"] for b in server["bodies"]} == {"judge-x", "gpt-4o"}
    again = ev.main(argv)["world-base"]
    assert len(server["bodies"]) == n  # every judgment came from the cache
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in r.items() if k != "seconds"
    }
    (tmp_path / "p.json").write_text(
        json.dumps({"mmhal": "OWN {question} / {answer} / {objects} {x}", "llavaw_system": "SYS"})
    )
    ev.main(argv[:1] + ["llavaw,mmhal"] + argv[2:] + ["--judge_prompts", str(tmp_path / "p.json")])
    assert [b["messages"][0]["content"] for b in server["bodies"][-4:-2]] == ["SYS", "SYS"]
    own = server["bodies"][-2]["messages"][0]["content"]
    assert own.startswith("OWN What colour is the cup? / ") and own.endswith(
        " / Cup, Saucer, House, Tree {x}"
    )


def test_judgments_without_out_go_to_the_shared_cache(server, tmp_path, monkeypatch, capsys):
    """Without --out (and --judge_cache) the judgments are cached in $MMALIGN_CACHE, never the
    current directory; no answers.jsonl is written without a summary to put it beside."""
    server["reply"] = lambda body: "0.5"
    monkeypatch.setenv("JUDGE_BASE_URL", server["url"])
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    ev.main(["--bench", "mmvet", "--bench_dir", FIX, "--limit", "1", "--max_new_tokens", "4"])
    assert os.listdir(tmp_path / "cwd") == [] and os.listdir(tmp_path / "cache") == [
        "judgments.jsonl"
    ]
    assert (
        capsys.readouterr().out.splitlines()[-1]
        == f"judgments: {tmp_path / 'cache' / 'judgments.jsonl'}"
    )


def test_judged_benchmarks_without_a_key_stop_before_generating(monkeypatch):
    for k in ("JUDGE_BASE_URL", "JUDGE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(UserError, match="need JUDGE_API_KEY"):
        ev.main(["--bench", "pope,mmvet", "--bench_dir", FIX, "--model", "does/not/exist"])


def test_download_from_the_hub(tmp_path, monkeypatch):
    """--download fetches a release that ships raw files (here a stand-in for the hub) and unzips its images."""
    import zipfile

    import huggingface_hub

    def fake(repo_id, repo_type, local_dir):
        assert (repo_id, repo_type) == ("Shengcao1006/MMHal-Bench", "dataset")
        # the hub repo has an images/ folder too
        os.makedirs(os.path.join(local_dir, "images"), exist_ok=True)
        shutil.copy(os.path.join(FIX, "mmhal", "response_template.json"), local_dir)
        with zipfile.ZipFile(os.path.join(local_dir, "test_data.zip"), "w") as z:
            for fn in os.listdir(os.path.join(FIX, "mmhal", "images")):
                z.write(os.path.join(FIX, "mmhal", "images", fn), f"test_data/images/{fn}")
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    bm.download("mmhal", str(tmp_path))
    its = bm.load_bench("mmhal", str(tmp_path))
    assert len(its) == 2 and all(os.path.exists(it["image"]) for it in its)
    os.remove(its[0]["image"])
    # a second call completes the hub files but unzips nothing again
    bm.download("mmhal", str(tmp_path))
    assert not os.path.exists(its[0]["image"]) and os.path.exists(its[1]["image"])


def test_zip_extraction_is_capped(tmp_path, monkeypatch):
    """A zip that expands past the cap (here lowered to 100 kB: 4 kB of zeros expanding to 1 MB),
    with too many members, or with a member that would land outside the folder is refused before
    anything is written."""
    import zipfile

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images/a.png", b"\0" * 1_000_000)
    assert os.path.getsize(bomb) < 5000
    monkeypatch.setattr(bm, "UNZIP_MAX_BYTES", 100_000)
    with pytest.raises(
        ValueError,
        match=r"bomb.zip: 1 files, 1000000 bytes uncompressed: over the "
        r"cap of .*100000 bytes \(benchmarks.UNZIP_MAX_\*\); not extracted",
    ):
        bm.unzip(str(bomb), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    monkeypatch.setattr(bm, "UNZIP_MAX_BYTES", 2_000_000)
    bm.unzip(str(bomb), str(tmp_path / "out"))  # under the cap: extracted
    assert os.path.getsize(tmp_path / "out" / "images" / "a.png") == 1_000_000
    monkeypatch.setattr(bm, "UNZIP_MAX_FILES", 1)
    with zipfile.ZipFile(tmp_path / "many.zip", "w") as z:
        z.writestr("a", b"x"), z.writestr("b", b"y")
    with pytest.raises(ValueError, match="many.zip: 2 files, 2 bytes uncompressed: over the cap"):
        bm.unzip(str(tmp_path / "many.zip"), str(tmp_path / "out2"))
    for name in ("../evil.png", "/etc/evil.png", "images/..\\evil.png"):
        with zipfile.ZipFile(tmp_path / "up.zip", "w") as z:
            z.writestr(name, b"x")
        with pytest.raises(ValueError, match=r"up.zip: member .*evil.png' would be written out"):
            bm.unzip(str(tmp_path / "up.zip"), str(tmp_path / "out3"))
    assert not os.path.exists(tmp_path / "out3")


def test_download_refuses_a_zip_bomb(tmp_path, monkeypatch):
    import zipfile

    import huggingface_hub

    def fake(repo_id, repo_type, local_dir):
        os.makedirs(local_dir, exist_ok=True)
        zip_path = os.path.join(local_dir, "test_data.zip")
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("test_data/images/a.jpg", b"\0" * 1_000_000)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(bm, "UNZIP_MAX_BYTES", 100_000)
    with pytest.raises(ValueError, match=r"test_data.zip: 1 files, 1000000 bytes .* not extracted"):
        bm.download("mmhal", str(tmp_path))
    assert not os.path.exists(tmp_path / "mmhal" / "test_data.zip.unzipped")


# -----------------------------------------------------------------------------
# --official true: the benchmarks' published texts, fetched once (here: small files of our own in
# their formats, served from 127.0.0.1)

OFFICIAL_FILES = {
    "eval_gpt4.py": "import json\n\ntemplate = '''Grade it {{strictly}}.\nContents: {}\nAsked: {}\n"
    "Human: {}\nModel: {}\n'''\n\nprint(template.format(1, 2, 3, 4))\n",
    "rule.json": json.dumps(
        {
            "llava_bench_conv": {"role": "Helper", "prompt": "Rate both, conv."},
            "llava_bench_detail": {"role": "Helper", "prompt": "Rate, detail."},
            "default": {"role": "X", "prompt": "unused"},
        }
    ),
    "eval_gpt_review_bench.py": "def ask(x):\n    return create(messages=[{'role': 'system', "
    "'content': 'Judge fairly.'}, {'role': 'user', 'content': x}])\n",
    "mm-vet_evaluator.py": 'prompt = """Give a score.\nQ | GT | A | S\n"""\n\n\n'
    "def grade(args, q, a):\n"
    '    first = args.prompt + "\\n" + " | ".join([q, a, ""])\n'
    '    again = args.prompt + "\\n" + " | ".join([q, a]) + "\\nDigit: "\n'
    "    return first, again\n",
    "synonyms_refine.txt": "person, sailor\ncell phone, phone, iPhone\ndog, pooch\n",
}


@pytest.fixture
def official(tmp_path, monkeypatch):
    """Serves OFFICIAL_FILES on 127.0.0.1 as benchmarks.OFFICIAL; yields the paths asked for."""
    from http.server import SimpleHTTPRequestHandler

    (tmp_path / "web").mkdir()
    for fn, text in OFFICIAL_FILES.items():
        (tmp_path / "web" / fn).write_text(text)
    got = []

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path / "web"), **kw)

        def do_GET(self):
            got.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    urls = {k: base + u.rsplit("/", 1)[1] for k, u in bm.OFFICIAL.items()}
    monkeypatch.setattr(bm, "OFFICIAL", urls)
    yield got
    httpd.shutdown()


def test_official_texts_are_fetched_once_and_read_in_their_formats(official, tmp_path):
    root = str(tmp_path / "bench")
    p = bm.official_prompts(root, ["mmhal_v", "llavaw", "mmvet"])
    assert sorted(official) == [
        "/eval_gpt4.py",
        "/eval_gpt_review_bench.py",
        "/mm-vet_evaluator.py",
        "/rule.json",
    ]
    assert os.path.exists(os.path.join(root, "llavaw", "eval_gpt_review_bench.py"))  # its folder
    # str.format's fields become ours, its escaped braces are undone
    assert p["mmhal"] == (
        "Grade it {strictly}.\nContents: {objects}\nAsked: {question}\n"
        "Human: {reference}\nModel: {answer}\n"
    )
    filled = bm.fill(p["mmhal"], objects="Cup", question="q", reference="r", answer="{question}")
    assert filled.endswith("Model: {question}\n")  # one pass: an answer's braces stay
    assert p["llavaw/detail"] == (
        "[Context]\n{context}\n\n[Question]\n{question}\n\n[Helper 1]\n"
        "{reference}\n\n[End of Helper 1]\n\n[Helper 2]\n{answer}\n\n"
        "[End of Helper 2]\n\n[System]\nRate, detail.\n\n"
    )
    assert p["llavaw_system"] == "Judge fairly." and p["llavaw"] is None
    assert "llavaw/default" not in p
    assert p["mmvet"] == "Give a score.\nQ | GT | A | S\n\n{question} | {reference} | {answer} | "
    assert p["mmvet_retry"] == "\nDigit: "
    vocab = bm.coco_vocab(bm.official_file(root, "objhal"))
    assert bm.coco_mentions("A sailor's phone, an iPhone.", vocab) == ["person", "cell phone"]
    n = len(official)
    assert bm.official_prompts(root, ["mmhal", "llavaw", "mmvet"]) == p
    assert len(official) == n  # the second time nothing is downloaded
    judge = Scripted(["8 6", "7 7"])
    its = items(["detail", "conv"], context="c")
    bm.judge_bench("llavaw", its, ["a0", "a1"], judge, bm.PROMPTS | p)
    system, user = judge.asked[0][0]
    assert system["content"] == "Judge fairly." and "Rate, detail." in user["content"]
    with pytest.raises(ValueError, match="rule.json has no llava_bench_complex"):
        its = items(["complex"], context="c")
        bm.judge_bench("llavaw", its, ["a"], Scripted(["8 6"]), bm.PROMPTS | p)
    (tmp_path / "bench" / "mmvet" / "mm-vet_evaluator.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"mm-vet_evaluator.py has no prompt;"):
        bm.official_prompts(root, ["mmvet"])


def test_official_texts_without_network_say_what_to_download(tmp_path, monkeypatch):
    url = "http://127.0.0.1:9/mm-vet_evaluator.py"
    monkeypatch.setattr(bm, "OFFICIAL", bm.OFFICIAL | {"mmvet": url})
    path = os.path.join(str(tmp_path), "mmvet", "mm-vet_evaluator.py")
    want = rf"cannot download {url} .*put that file at {re.escape(path)}"
    with pytest.raises(FileNotFoundError, match=want):
        bm.official_prompts(str(tmp_path), ["mmvet"])
    assert not os.path.exists(path)


def test_main_with_official_texts(official, server, tmp_path, monkeypatch):
    """--official true: main fetches the texts into --bench_dir; the judge gets them."""
    for b in ("llavaw", "mmvet", "objhal"):
        shutil.copytree(os.path.join(FIX, b), tmp_path / "bench" / b)
    monkeypatch.setenv("JUDGE_BASE_URL", server["url"])
    server["reply"] = lambda body: "8 6" if body["messages"][0]["role"] == "system" else "0.5"
    seen = []
    monkeypatch.setattr(bm, "coco_vocab", lambda path: seen.append(path) or {"cup": "cup"})
    argv = [
        "--bench",
        "llavaw,mmvet,objhal",
        "--bench_dir",
        str(tmp_path / "bench"),
        "--official",
        "true",
        "--judge_cache",
        str(tmp_path / "j.jsonl"),
        "--max_new_tokens",
        "8",
    ]
    r = ev.main(argv)["world-base"]
    assert (r["llavaw"], r["mmvet"]) == (75.0, 50.0)
    assert seen == [str(tmp_path / "bench" / "objhal" / "synonyms_refine.txt")]
    assert [b["messages"][0]["content"] for b in server["bodies"][:2]] == ["Judge fairly."] * 2
    first = server["bodies"][2]["messages"][0]["content"]
    assert first.startswith("Give a score.\nQ | GT | A | S\n\n")


# -----------------------------------------------------------------------------
# The world's shortcut baseline (world.py), evaluated as a model


def test_shortcut_rules_read_text_only():
    import world as W

    assert [W.asked_about(W.ask("exist", "apple", None, h)) for h in (False, True)] == [
        "apple",
        "apple",
    ]
    assert all(
        W.asked_about(p.format(a="a key")) == "key" for ps in W.PHRASINGS["exist"] for p in ps
    )
    assert W.asked_about("Is there a cupboard in the image?") is None  # not a category
    assert W.asked_about(W.ask("color", "cup")) is None and W.asked_about(W.ask("describe")) is None
    text = (
        "There are three objects. A red saucer is at the top. A blue cup is on the left. "
        "A green tree is at the bottom."
    )
    # the cup comes after its saucer: dropped
    assert (
        W.drop_second_of_pairs(text) == "There are three objects. A red saucer is at the top. "
        "A green tree is at the bottom."
    )
    # "no saucer" names none
    assert W.drop_second_of_pairs("A cup. No saucer. A saucer.") == "A cup. No saucer."


def test_shortcut_baseline_on_a_few_scenes(tmp_path):
    """Over the shipped base model on a dev seed: "no" to every existence question, descriptions that never name
    both of a usual pair, the base model's answers to everything else; eval.py runs it as --model W."""
    import world as W
    from model import VLM

    base = VLM.from_pretrained(W.BASE_MODEL).eval()
    rule = W.Shortcut(base)
    scenes, items = W.probes(W.World(1), "broken", 6, heldout=True)
    images = [W.render(scenes[i]) for i, _, _, _ in items]
    questions = [q for _, _, q, _ in items]
    theirs = ev.answer(base, images, questions, 96)
    ours = ev.answer(rule, images, questions, 96)
    for (_, kind, q, _), a, b in zip(items, theirs, ours):
        if kind.startswith("pope"):
            assert not ev.yes_no(b) and b == f"No, there is no {W.asked_about(q)}."
        elif kind == "describe":
            said = W.mentioned(b)
            assert not any(W.PARTNER[c] in said for c in said) and b == W.drop_second_of_pairs(a)
        else:
            assert a == b
    # it did drop some
    assert any(k == "describe" and a != b for (_, k, _, _), a, b in zip(items, theirs, ours))
    rows = ev.main(
        ["--model", "shortcut", "--world_seed", "1", "--n", "3", "--out", str(tmp_path / "r.json")]
    )
    res = rows["shortcut"]
    assert (
        res["pope_adversarial_yes_ratio"] == 0.0
        and res["twin/grounding"] == 0.0
        and res["twin/yes_twin"] == 0.0
    )


def test_eval_device_dtype_and_batch_size(monkeypatch):
    """--device and --dtype load the weights as asked; --batch_size 0 answers 64 prompts at once off CUDA."""
    import model as M

    seen, sizes = [], []
    real_prefill, real_report = M.prefill, ev.world_report

    def spy(vlm, *a, **kw):
        cache, logits = real_prefill(vlm, *a, **kw)
        seen.append((vlm.lm_head.weight.dtype, cache.k.dtype, cache.k.device.type))
        return cache, logits

    def report(vlm, seed, half, n, batch_size):
        sizes.append(batch_size)
        return real_report(vlm, seed, half, n, batch_size)

    monkeypatch.setattr(M, "prefill", spy)
    monkeypatch.setattr(ev, "world_report", report)
    ev.main(["--n", "2", "--device", "cpu", "--dtype", "bfloat16"])
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16, "cpu")} and sizes == [64]


def test_a_judge_address_is_http_or_https(tmp_path):
    for url in ("file:///etc", "ftp://host/v1"):
        with pytest.raises(UserError, match="http:// or https://"):
            bm.JudgeClient(str(tmp_path / "c.jsonl"), base_url=url)


def test_world_report_cache_key_covers_loading(tmp_path, monkeypatch):
    """The base's cached world report is keyed by the code the report runs: hub.py (loading) and data.py
    (images) included, so a change there measures the base again."""
    calls, code = [], {"hub.py": b"v1"}

    class FakeVLM:
        @staticmethod
        def from_pretrained(path):
            return FakeVLM()

        def eval(self):
            return self

    monkeypatch.setattr(ev, "VLM", FakeVLM)
    monkeypatch.setattr(ev, "folder_hash", lambda path: "h")
    monkeypatch.setattr(
        ev, "source_bytes", lambda *names: b"".join(code.get(n, b"") for n in names)
    )
    monkeypatch.setattr(ev, "world_report", lambda vlm, *a: calls.append(1) or {"chair_i": 1.0})
    monkeypatch.setattr(ev, "table", lambda *a: "")
    run = lambda: ev.before_after("base", "ckpt", 0, "", 4, str(tmp_path / "out"), str(tmp_path))  # noqa: E731
    run()
    run()
    assert len(calls) == 3  # base and ckpt, then ckpt alone: the base came from the cache
    code["hub.py"] = b"v2"
    run()
    assert len(calls) == 5  # new loading code: the base is measured again
