"""How ``kfh-probe view`` copes with a long trace: one synthetic trace of about ``--tokens`` tokens, made by
concatenating the organism's labeled steps (its scores come from the organism's real capture, although the
organism was trained on traces of at most 1024 positions), written as a view page and opened in headless
Chromium. Reports the trace's tokens and steps, the scoring time, the page's size and the time from the
start of navigation to the end of the page's script (``data-script-ms``, read from Chromium's dumped DOM),
and both as ratios to the view of one shipped organism trace measured in the same run.

    python benchmarks/view_long_trace.py --tokens 16000 --out long_view.html
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from kfh_probe import load_tokenizer, read_traces, view_traces
from kfh_probe.organism import default_manifest_path, default_model_dir, default_traces_path

THINK = "<think>\n"


def long_trace(tokens: int) -> dict:
    """A labeled trace record whose reasoning repeats the organism's traces' steps until it has ``tokens`` tokens."""
    traces = read_traces(default_traces_path())[0]
    tokenizer = load_tokenizer(default_model_dir())
    first = traces[0]
    steps, length = [], len(tokenizer(first.prompt)["input_ids"])
    while length < tokens:
        for trace in traces:
            for step in trace.steps:
                text = step.text.removeprefix(THINK)
                steps.append({"text": (THINK if not steps else "") + text, "label": step.label})
                length += len(tokenizer(text)["input_ids"])
            if length >= tokens:
                break
    answer = first.response.split("</think>")[1]
    response = "".join(s["text"] for s in steps) + "</think>" + answer
    return {"id": f"long-{tokens}", "prompt": first.prompt, "response": response, "steps": steps}


def script_milliseconds(page: Path) -> float:
    """Navigation start to the end of the page's script, as the page writes it into its DOM in Chromium."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium found")
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                              "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, check=True).stdout
    found = re.search(r'data-script-ms="([0-9.]+)"', dom)
    if found is None or 'data-ready="1"' not in dom:
        raise SystemExit("the page's script did not finish")
    return float(found.group(1))


def measure(records: list[dict], out: Path) -> tuple[object, float, float]:
    """The view of ``records`` written to ``out``: the view, its scoring seconds and its script milliseconds."""
    with tempfile.TemporaryDirectory() as folder:
        traces = Path(folder) / "traces.jsonl"
        traces.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        start = time.perf_counter()
        view = view_traces(default_model_dir(), traces, default_manifest_path(), batch_size=1)
        scored = time.perf_counter() - start
    view.save(out)
    return view, scored, script_milliseconds(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16000, help="tokens of the synthetic trace (default 16000)")
    parser.add_argument("--out", type=Path, required=True, help="the view page")
    args = parser.parse_args()
    shipped = json.loads(default_traces_path().read_text(encoding="utf-8").splitlines()[0])
    with tempfile.TemporaryDirectory() as folder:
        _, base_scored, base_ms = measure([shipped], Path(folder) / "baseline.html")
    view, scored, script_ms = measure([long_trace(args.tokens)], args.out)
    trace = view.traces[0]
    print(f"{trace.total_tokens} tokens, {len(trace.steps)} steps; scored in {scored:.1f} s; page "
          f"{args.out.stat().st_size / 1e6:.2f} MB; navigation to script end {script_ms:.0f} ms")
    print(f"against one shipped organism trace in the same run: scoring {scored / base_scored:.1f}x, "
          f"script {script_ms / base_ms:.1f}x")


if __name__ == "__main__":
    main()
