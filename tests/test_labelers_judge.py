"""The judge labeller against a scripted OpenAI-protocol server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import R1_TRACES
from kfh_probe.cli import main
from kfh_probe.labelers.base import run_labeler
from kfh_probe.labelers.judge import JudgeLabeler, consensus, load_template, parse_verdict
from kfh_probe.labelers.judge_client import AnswerCache, ChatJudge, JudgeUnavailable
from kfh_probe.traces import TraceFileError, parse_record, read_traces


def verdict(labels: list[str]) -> str:
    return json.dumps({"steps": [{"step": k, "label": lab} for k, lab in enumerate(labels, start=1)]})


class FakeServer:
    """Answers ``POST /v1/chat/completions``; ``script(model, prompt, n)`` gives ``(status, content)``
    for the n-th request (0-based) and the server checks the request's shape."""

    def __init__(self):
        self.requests: list[dict] = []
        self.problems: list[str] = []
        self.script = lambda model, prompt, n: (200, verdict(["essential"] * len(re.findall(r"^\[\d+\] ", prompt, re.M))))
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                n = len(server.requests)
                server.requests.append(body)
                if self.path != "/v1/chat/completions":
                    server.problems.append(f"path {self.path}")
                if not isinstance(body.get("model"), str) or not isinstance(body.get("messages"), list):
                    server.problems.append(f"bad body {body}")
                prompt = body["messages"][-1]["content"]
                status, content = server.script(body["model"], prompt, n)
                payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
                data = json.dumps(payload if status == 200 else {"error": "scripted"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


@pytest.fixture
def traces():
    return [parse_record(r, i + 1) for i, r in enumerate(R1_TRACES)]


def labeler(url: str, models: list[str], mode: str = "all", cache=None, retries: int = 3) -> JudgeLabeler:
    judges = [ChatJudge(url, m, timeout=5, retries=retries, backoff=0.01, cache=cache) for m in models]
    return JudgeLabeler(judges, load_template(), mode, workers=3, malformed_retries=2, progress=False)


def test_request_carries_model_messages_and_numbered_steps(server, traces):
    run = run_labeler(traces, labeler(server.url, ["judge-a"]))
    assert not server.problems
    assert len(server.requests) == 2 and {r["model"] for r in server.requests} == {"judge-a"}
    prompts = sorted(r["messages"][-1]["content"] for r in server.requests)
    assert "[1] <think>" in prompts[1] and "[3] Hmm, alternatively" in prompts[1]
    assert "What is the sum of the first 10 positive integers?" in prompts[1] and "\\boxed{55}" in prompts[1]
    assert [[s.label for s in t.steps] for t in run.traces] == [["essential"] * 3, ["essential"] * 4]


def test_retries_429_and_500_then_succeeds(server, traces):
    statuses = iter([429, 500])
    ok = server.script
    server.script = lambda model, prompt, n: (next(statuses, 200), ok(model, prompt, n)[1])
    run = run_labeler(traces[:1], labeler(server.url, ["judge-a"]))
    assert len(server.requests) == 3
    assert [s.label for s in run.traces[0].steps] == ["essential"] * 3


def test_cached_answers_mean_a_second_run_makes_no_request(server, traces, tmp_path):
    cache = AnswerCache(tmp_path / "cache")
    first = run_labeler(traces, labeler(server.url, ["judge-a", "judge-b"], cache=cache))
    assert len(server.requests) == 4
    second = run_labeler(traces, labeler(server.url, ["judge-a", "judge-b"], cache=cache))
    assert len(server.requests) == 4 and second.counts["judge_requests"] == 0
    assert [t.to_record() for t in second.traces] == [t.to_record() for t in first.traces]
    assert len(list((tmp_path / "cache").glob("*/*.json"))) == 4  # one file per (judge, prompt)


def _split_votes(model: str, prompt: str, n: int):
    k = len(re.findall(r"^\[\d+\] ", prompt, re.M))
    first = {"a": "essential", "b": "essential", "c": "redundant"}[model]
    return 200, verdict([first] + ["redundant"] * (k - 1))


def test_consensus_all_gives_null_to_disputed_steps_and_counts_them(server, traces):
    server.script = _split_votes
    run = run_labeler(traces, labeler(server.url, ["a", "b", "c"], mode="all"))
    assert [[s.label for s in t.steps] for t in run.traces] == [[None, "redundant", "redundant"], [None] + ["redundant"] * 3]
    assert run.counts["disputed_steps"] == 2 and run.counts["unlabelled"] == 2


def test_consensus_majority_keeps_the_label_of_most_judges(server, traces):
    server.script = _split_votes
    run = run_labeler(traces, labeler(server.url, ["a", "b", "c"], mode="majority"))
    assert [s.label for s in run.traces[0].steps] == ["essential", "redundant", "redundant"]
    assert run.counts["disputed_steps"] == 0


def test_consensus_majority_tie_is_disputed():
    assert consensus([["essential", "redundant"], ["redundant", "redundant"]], "majority") == ([None, "redundant"], 1)


def test_malformed_reply_is_retried_then_succeeds(server, traces):
    ok = server.script
    server.script = lambda model, prompt, n: (200, "I think they are all fine.") if n == 0 else ok(model, prompt, n)
    run = run_labeler(traces[:1], labeler(server.url, ["judge-a"]))
    assert len(server.requests) == 2 and run.counts["malformed_replies"] == 1
    assert [s.label for s in run.traces[0].steps] == ["essential"] * 3


def test_malformed_reply_after_retries_is_reported_with_line_and_id(server, traces, tmp_path):
    server.script = lambda model, prompt, n: (200, '{"steps": [{"step": 1, "label": "maybe"}]}')
    cache = AnswerCache(tmp_path / "cache")
    with pytest.raises(TraceFileError) as err:
        run_labeler(traces, labeler(server.url, ["judge-a"], cache=cache))
    assert "(id 'sum-1-10')" in str(err.value) and "label 'maybe'" in str(err.value)
    assert len(server.requests) == 2 * 3  # 1 + 2 malformed retries per trace
    assert not list((tmp_path / "cache").glob("*/*.json"))  # malformed replies are never cached
    run = run_labeler(traces, labeler(server.url, ["judge-a"]), skip_invalid=True)
    assert run.traces == [] and [s.id for s in run.skipped] == ["sum-1-10", "rect-area"]


def test_unauthorised_is_not_retried(server, traces):
    server.script = lambda model, prompt, n: (401, "")
    with pytest.raises(JudgeUnavailable, match="HTTP 401"):
        run_labeler(traces[:1], labeler(server.url, ["judge-a"]))
    assert len(server.requests) == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_judge_fails_quickly_with_a_clear_message(labeled_trace_file, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    start = time.monotonic()
    code = main(["label", "--traces", str(labeled_trace_file), "--labeler", "judge", "--judge", f"{url}=m",
                 "--out", str(out), "--retries", "1", "--timeout", "1", "--no-cache", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 10
    assert url in err and "connection failed" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_judge_writes_labels_and_caches(server, labeled_trace_file, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    args = ["label", "--traces", str(labeled_trace_file), "--labeler", "judge", "--judge", f"{server.url}=a",
            "--judge", f"{server.url}=b", "--out", str(out), "--cache", str(tmp_path / "c"), "--quiet"]
    assert main(args) == 0
    traces, _ = read_traces(out)
    assert [s.label for s in traces[1].steps] == ["essential"] * 4
    assert main(args) == 0 and len(server.requests) == 4
    assert "judge requests 0" in capsys.readouterr().err


def test_parse_verdict_accepts_code_fences_and_rejects_missing_steps():
    assert parse_verdict("```json\n" + verdict(["Essential", "redundant"]) + "\n```", 2) == ["essential", "redundant"]
    with pytest.raises(ValueError, match="expected each of 1..3 once"):
        parse_verdict(verdict(["essential", "redundant"]), 3)


def test_template_with_unknown_placeholder_is_refused(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("Steps: $steps, cost $price", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\$price"):
        load_template(bad)


def test_local_judge_goes_through_the_same_prompt_and_reports_gibberish(tiny_model_dir, labeled_trace_file, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    code = main(["label", "--traces", str(labeled_trace_file), "--labeler", "judge", "--judge-local", str(tiny_model_dir),
                 "--local-max-new-tokens", "4", "--malformed-retries", "0", "--no-cache", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "gave no usable verdict" in err and "(id 'sum-1-10')" in err and not out.exists()
