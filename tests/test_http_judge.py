"""The HTTP judge against a real local server: good answers, timeouts, 429/500 then OK, garbage, invalid JSON,
fatal 401, the concurrency limit, the response cache (a second run pays nothing) and key hygiene."""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_annotate import write_generations
from typer.testing import CliRunner

from alignpipe.cli import app
from alignpipe.core.errors import UserError
from alignpipe.data.io import read_input
from alignpipe.feedback.annotators import Query, Runtime, build, parse_spec
from alignpipe.feedback.annotators.http_judge import Abstain, parse_verdict

SECRET = "sk-test-0123456789abcdef"
TEMPLATE = "Request: {prompt}\nA: {response_a}\nB: {response_b}\nWhich is shorter? {label_a} or {label_b}?"


class Handler(BaseHTTPRequestHandler):
    """Answers like a judge that prefers the shorter response, misbehaving as `server.mode` says."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        s = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with s.lock:
            s.requests += 1
            s.auth.add(self.headers.get("Authorization"))
            s.paths.add(self.path)
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
            s.seen[body] = s.seen.get(body, 0) + 1
            first_time = s.seen[body] == 1
        try:
            self._answer(s, body, first_time)
        finally:
            with s.lock:
                s.in_flight -= 1

    def _answer(self, s, body, first_time):
        mode = s.mode
        if mode == "slow":
            time.sleep(0.5)
        if mode == "delay":
            time.sleep(0.05)
        if mode in ("429-then-ok", "500-then-ok") and first_time:
            code = int(mode[:3])
            self.send_response(code)
            if code == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            return
        if mode == "401":
            self.send_response(401)
            self.end_headers()
            return
        content = json.loads(body)["messages"][0]["content"]
        a, b = re.search(r"\nA: (.*)\nB: (.*)\nWhich", content).groups()
        verdict = "1" if len(a) < len(b) else "2"
        if mode == "garbage":
            verdict = f"I think response {verdict} is shorter."
        reply = b"not json{" if mode == "badjson" else json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        try:
            self.wfile.write(reply)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out already
            pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.mode, srv.lock, srv.requests, srv.auth, srv.paths = "good", threading.Lock(), 0, set(), set()
    srv.in_flight, srv.max_in_flight, srv.seen = 0, 0, {}
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def template(tmp_path):
    path = tmp_path / "shorter.txt"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", SECRET)


PAIRS = [("Yes.", "A long and winding answer."), ("Quite a long answer indeed.", "No."), ("Ok", "Okay then")]


def judge(server, template, tmp_path, **options):
    opts = {"model": "judge-1", "key_env": "JUDGE_KEY", "template": str(template), "backoff": 0.001,
            **options}
    spec = f"http:{server.base}," + ",".join(f"{k}={v}" for k, v in opts.items())
    return build(parse_spec(spec), Runtime(cache_dir=tmp_path / "cache"))


def compare(j):
    return j.compare([Query("Say it.", [], a, b) for a, b in PAIRS])


def test_good_answers_in_both_orders(server, template, tmp_path):
    verdicts = compare(judge(server, template, tmp_path))
    assert [v.preference for v in verdicts] == [1.0, 0.0, 1.0]
    assert [(v.p12, v.p21) for v in verdicts] == [(1.0, 0.0), (0.0, 1.0), (1.0, 0.0)]
    assert server.requests == 6 and server.auth == {f"Bearer {SECRET}"}
    assert server.paths == {"/v1/chat/completions"}


@pytest.mark.parametrize("mode", ["429-then-ok", "500-then-ok"])
def test_retry_then_ok(server, template, tmp_path, mode):
    server.mode = mode
    j = judge(server, template, tmp_path)
    assert [v.preference for v in compare(j)] == [1.0, 0.0, 1.0]
    assert server.requests == 12 and j.stats == {"requests": 12, "cache_hits": 0, "retries": 6}


@pytest.mark.parametrize("mode,options,reason", [
    ("slow", {"timeout": 0.1, "retries": 1}, "timed out after 2 attempts"),
    ("garbage", {}, "unparseable verdict 'I think response 1 is shorter.'"),
    ("badjson", {}, "invalid response body b'not json{'"),
])
def test_faults_are_abstentions(server, template, tmp_path, mode, options, reason):
    server.mode = mode
    verdicts = compare(judge(server, template, tmp_path, **options))
    assert all(v.abstained and v.preference is None for v in verdicts)
    assert reason in verdicts[0].reason
    assert server.requests == 6 * (1 + options.get("retries", 0))


def test_fatal_status_stops_with_one_line_without_the_key(server, template, tmp_path):
    server.mode = "401"
    expected = r"HTTP 401 Unauthorized \(check the URL, model 'judge-1' and the key in \$JUDGE_KEY\)"
    with pytest.raises(UserError, match=expected) as e:
        compare(judge(server, template, tmp_path))
    assert SECRET not in str(e.value)


def test_concurrency_limit(server, template, tmp_path):
    server.mode = "delay"
    compare(judge(server, template, tmp_path, concurrency=2))
    assert server.max_in_flight == 2


def test_one_order_abstaining_leaves_the_other(server, template, tmp_path):
    j = judge(server, template, tmp_path)
    v = j._verdict((0, None), (None, "unparseable verdict 'x'"))
    assert (v.preference, v.p12, v.p21, v.abstained) == (1.0, 1.0, None, False)
    assert v.reason == "unparseable verdict 'x'"
    assert j._verdict((None, "t"), (0, None)).preference == 0.0


@pytest.mark.parametrize("reply,winner", [("1", 0), (" 2\n", 1), ('{"winner": 1}', 0), ('{"winner": "2"}', 1),
                                          ("1.", None), ("Response 1", None), ("12", None), ("", None),
                                          ('{"winner": 3}', None), ("[1]", None)])
def test_strict_verdict_parser(reply, winner):
    if winner is None:
        with pytest.raises(Abstain):
            parse_verdict(reply, ("1", "2"))
    else:
        assert parse_verdict(reply, ("1", "2")) == winner


def test_command_caches_so_a_second_run_pays_nothing(server, template, tmp_path):
    gens = write_generations(tmp_path / "gens", {"p1": ["Yes.", "A long answer here.", "Medium one."],
                                                 "p2": ["Short.", "Much much longer answer."]})
    spec = f"http:{server.base},model=judge-1,key_env=JUDGE_KEY,template={template}"
    args = ["annotate", str(gens), "-a", spec, "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "ann")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ds, _ = read_input(tmp_path / "ann", "annotations", stage="test")
    assert len(ds) == 4 and server.requests == 8
    for row in ds:
        assert row["preference"] == (1.0 if len(row["response1"]) < len(row["response2"]) else 0.0)
    manifest = (tmp_path / "ann" / "manifest.json").read_text()
    assert SECRET not in manifest and "JUDGE_KEY" in manifest
    report = json.loads(manifest)["report"]
    assert report["abstentions"] == {ds[0]["annotator"][2:]: 0}
    assert report["annotators"][0]["template"] == TEMPLATE
    result = CliRunner().invoke(app, args + ["--force"])
    assert result.exit_code == 0 and server.requests == 8  # every answer came from the cache
    assert read_input(tmp_path / "ann", "annotations", stage="test")[0]["preference"] == ds["preference"]


def test_command_counts_abstentions_and_never_crashes(server, template, tmp_path):
    server.mode = "garbage"
    gens = write_generations(tmp_path / "gens", {"p1": ["Yes.", "A long answer here."]})
    spec = f"http:{server.base},model=m,key_env=,template={template}"
    result = CliRunner().invoke(app, ["annotate", str(gens), "-a", spec, "--cache-dir", str(tmp_path / "c"),
                                      "--out", str(tmp_path / "ann")])
    assert result.exit_code == 0, result.output
    ds, _ = read_input(tmp_path / "ann", "annotations", stage="test")
    assert ds[0]["preference"] is None and ds[0]["raw"][0]["abstained"] is True
    report = json.loads((tmp_path / "ann" / "manifest.json").read_text())["report"]
    assert list(report["abstentions"].values()) == [1] and server.auth == {None}
