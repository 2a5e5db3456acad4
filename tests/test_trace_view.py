"""``kfh-probe view`` and :func:`kfh_probe.view_traces` without a browser: every step of every trace is in the
page with its label and its score (the sweep's capture), the page fetches nothing, 50 organism traces stay
under 2 MB, and its colours pass WCAG AA."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from kfh_probe import StepScorer, TraceView, load_manifest, read_traces, top_heads, view_traces
from kfh_probe.alignment import tokenize_trace
from kfh_probe.cli import main
from kfh_probe.html_view import INK, SHADE_HIGH, SHADE_LOW, render_fragment
from kfh_probe.loading import pad_token_id
from kfh_probe.organism import default_manifest_path, default_model_dir, default_traces_path
from kfh_probe.trace_view import TraceScores, step_baseline

FETCHING = {"script": "src", "img": "src", "link": "href", "iframe": "src", "source": "src", "audio": "src",
            "video": "src", "embed": "src", "object": "data"}


class Page(HTMLParser):
    """The parts of a view page the tests read: steps per trace (their attributes and text), the elements that
    could fetch something, the script texts and the style texts."""

    def __init__(self, text: str):
        super().__init__()
        self.steps: dict[str, list[dict]] = {}
        self.fetching: list[tuple[str, str]] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self._trace: str | None = None
        self._step: dict | None = None
        self._depth = 0
        self._in: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in FETCHING and FETCHING[tag] in attrs:
            self.fetching.append((tag, attrs[FETCHING[tag]]))
        if tag in ("script", "style"):
            self._in = tag
            (self.scripts if tag == "script" else self.styles).append("")
        if tag == "article":
            self._trace = attrs["data-id"]
            self.steps[self._trace] = []
        if self._step is not None and tag == "span":
            self._depth += 1
        elif self._trace is not None and "kfh-step" in attrs.get("class", "").split():
            self._step = {**attrs, "text": ""}
            self._depth = 0

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._in = None
        if tag == "article":
            self._trace = None
        if self._step is not None and tag == "span":
            if self._depth == 0:
                self.steps[self._trace].append(self._step)
                self._step = None
            else:
                self._depth -= 1

    def handle_data(self, data):
        if self._in == "script":
            self.scripts[-1] += data
        elif self._in == "style":
            self.styles[-1] += data
        if self._step is not None and self._depth == 0:
            self._step["text"] += data


@pytest.fixture(scope="module")
def organism_page(tmp_path_factory) -> tuple[Path, Page]:
    out = tmp_path_factory.mktemp("view") / "view.html"
    assert main(["view", "--max-traces", "50", "--out", str(out), "--quiet"]) == 0
    return out, Page(out.read_text(encoding="utf-8"))


def _data(page: Page) -> dict:
    return json.loads(next(s for s in page.scripts if s.lstrip().startswith("{")))


def test_every_step_of_every_trace_is_in_the_page_with_its_label_and_score(organism_page):
    _, page = organism_page
    traces = read_traces(default_traces_path())[0][:50]
    data = _data(page)
    assert list(page.steps) == [t.id for t in traces] == [t["id"] for t in data["traces"]]
    for trace, shown in zip(traces, data["traces"]):
        steps = page.steps[trace.id]
        assert [s["text"] for s in steps] == [s.text for s in trace.steps]
        assert [s["data-label"] for s in steps] == [s.label or "unlabeled" for s in trace.steps]
        assert [float(s["data-score"]) for s in steps] == shown["ensemble"]
        assert [int(s["data-k"]) for s in steps] == list(range(len(trace.steps)))
        assert all(s["tabindex"] == "0" for s in steps)
        assert len(shown["heads"]) == 32 and all(len(h) == len(steps) for h in shown["heads"])


def test_scores_are_the_sweeps_step_scores_and_the_ensemble_their_top_n_mean(organism_page, organism):
    _, page = organism_page
    model, tokenizer = organism
    manifest = load_manifest(default_manifest_path())
    data = _data(page)
    traces = read_traces(default_traces_path())[0][:3]
    tokenized = [tokenize_trace(tokenizer, t.prompt, t.response, [s.text for s in t.steps]) for t in traces]
    scorer = StepScorer(model, pad_token_id(tokenizer))
    ensemble = scorer.head_scores(tokenized, top_heads(manifest), batch_size=2)
    every_head = scorer.score_batch(tokenized)  # [layer, head, step] per trace
    for t, shown in enumerate(data["traces"][:3]):
        torch.testing.assert_close(torch.tensor(shown["ensemble"]), ensemble[t], rtol=1e-3, atol=1e-7)
        for rank, (layer, head) in enumerate(data["heads"]):
            torch.testing.assert_close(torch.tensor(shown["heads"][rank]), every_head[t][layer, head], rtol=1e-3, atol=1e-7)
        assert shown["baseline"] == pytest.approx(
            (tokenized[t].answer_span[1] - tokenized[t].answer_span[0]) / tokenized[t].length, rel=1e-3)
    assert data["heads"] == [[h["layer"], h["head"]] for h in manifest["heads"]] and data["top_n"] == manifest["top_n"]


def test_the_page_fetches_nothing_from_the_network(organism_page):
    path, page = organism_page
    text = path.read_text(encoding="utf-8")
    assert page.fetching == []  # no script src, link, img, iframe, media or object at all
    assert len(page.scripts) == 2 and len(page.styles) == 1
    for code in page.scripts + page.styles:
        assert not re.search(r"https?://|@import|url\(|fetch\(|XMLHttpRequest|import\(", code)
    assert not re.search(r"https?://", text)


def test_fifty_organism_traces_make_a_page_under_two_megabytes(organism_page):
    path, page = organism_page
    assert len(page.steps) == 50
    assert path.stat().st_size < 2_000_000


def _luminance(hex_colour: str) -> float:
    channels = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def _contrast(a: str, b: str) -> float:
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_text_on_every_shade_and_the_pages_greys_passes_wcag_aa(organism_page):
    _, page = organism_page
    # shades mix the two ends channel by channel, so luminance (and contrast) is monotone between them
    assert min(_contrast(INK, SHADE_LOW), _contrast(INK, SHADE_HIGH)) >= 4.5
    greys = set(re.findall(r"color: (#[0-9a-f]{6})", "".join(page.styles)))
    assert greys and all(_contrast(grey, "#f2f2f2") >= 4.5 for grey in greys if grey != "#ffffff")


def test_ids_pick_the_traces_in_the_given_order_and_an_unknown_id_is_refused(tmp_path, capsys):
    out = tmp_path / "view.html"
    ids = ["organism-model-0-3", "organism-model-0-1"]
    assert main(["view", "--ids", *ids, "--out", str(out), "--quiet"]) == 0
    assert list(Page(out.read_text(encoding="utf-8")).steps) == ids
    capsys.readouterr()
    assert main(["view", "--ids", "no-such-trace", "--out", str(tmp_path / "other.html"), "--quiet"]) == 2
    assert "--ids names traces" in capsys.readouterr().err and not (tmp_path / "other.html").exists()


def test_the_python_view_shows_inline_in_a_notebook_and_saves_the_same_page(tmp_path):
    view = view_traces(default_model_dir(), default_traces_path(), default_manifest_path(), max_traces=2)
    assert isinstance(view, TraceView) and len(view.traces) == 2
    fragment = view._repr_html_()
    assert fragment.startswith('<div class="kfh-view"') and fragment in view.to_html()
    view.save(tmp_path / "v.html")
    assert (tmp_path / "v.html").read_text(encoding="utf-8") == view.to_html()


def test_step_baseline_is_p_to_the_alpha_times_the_answer_share_of_the_tokens():
    assert step_baseline(1.0, 10, 100) == pytest.approx(0.1)
    assert step_baseline(0.5, 10, 100) == pytest.approx(0.025)
    assert step_baseline(0.5, 10, 100, alpha=1.0) == pytest.approx(0.05)


def test_text_that_looks_like_markup_stays_text():
    hostile = '</script><script>alert(1)</script><!-- "&'
    trace = TraceScores(
        id=hostile, prompt=hostile, steps=[hostile, "b"], labels=["essential", None], marker="</think>", answer=hostile,
        head_scores=torch.tensor([[0.5, 0.25]]), ensemble=torch.tensor([0.5, 0.25]), answer_tokens=1, total_tokens=10,
        baseline=0.1,
    )
    page = Page(render_fragment(TraceView(model=hostile, heads=[(0, 0)], sra=[0.9], top_n=1, traces=[trace])))
    assert len(page.scripts) == 2 and page.fetching == []
    assert [s["text"] for s in page.steps[hostile]] == [hostile, "b"]
    assert _data(page)["traces"][0]["id"] == hostile
