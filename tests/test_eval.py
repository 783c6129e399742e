"""The judge client of the open-ended benchmarks, against a fake chat-completions server on 127.0.0.1: retries on
429 / 500, cached judgments reused, a judge that stays down gives a clear error and keeps what was finished."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

import eval as ev


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
