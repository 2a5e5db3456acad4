"""The HTML of a :class:`~kfh_probe.trace_view.TraceView`: one self-contained page, its CSS, JavaScript and
data inline and nothing fetched from anywhere, so a saved file opens offline in any browser.

Every step is written as an element with its label, its ensemble score and ``tabindex`` (the page reads
without its script too); the script (``data/trace_view.js``) shades the steps by the selected head's score,
explains a step on hover or focus, and counts the essential-redundant pairs that head ranks right and wrong.
"""

from __future__ import annotations

import hashlib
import json
from html import escape
from pathlib import Path

from .trace_view import TraceScores, TraceView

ASSETS = Path(__file__).resolve().parent / "data"
INK = "#111111"
"""The text colour; on every shade between :data:`SHADE_LOW` and :data:`SHADE_HIGH` it passes WCAG AA."""
SHADE_LOW = "#ffffff"
"""The shade of the trace's lowest-scoring step under the selected head."""
SHADE_HIGH = "#f5a623"
"""The shade of the trace's highest-scoring step under the selected head (shades scale linearly between)."""
BADGES = {"essential": "E", "redundant": "R", None: "?"}
"""The text badge of each label, so that labels read without colour (the outline differs too)."""
SIGNIFICANT_DIGITS = 4


def _rgb(hex_colour: str) -> list[int]:
    return [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]


def _rounded(values) -> list[float]:
    return [float(f"{float(v):.{SIGNIFICANT_DIGITS}g}") for v in values]


def _payload(view: TraceView) -> dict:
    """What the script needs: the ranked heads, the shades, and per trace every head's step scores."""
    return {
        "heads": [list(h) for h in view.heads], "top_n": view.top_n, "p": view.p, "alpha": view.alpha,
        "shade_low": _rgb(SHADE_LOW), "shade_high": _rgb(SHADE_HIGH),
        "traces": [{
            "id": t.id, "labels": t.labels, "ensemble": _rounded(t.ensemble), "heads": [_rounded(h) for h in t.head_scores],
            "baseline": float(f"{t.baseline:.{SIGNIFICANT_DIGITS}g}"), "answer_tokens": t.answer_tokens,
            "total_tokens": t.total_tokens,
        } for t in view.traces],
    }


def _step(k: int, text: str, label: str | None, score: float) -> str:
    kind = label or "unlabeled"
    return (f'<span class="kfh-step kfh-{kind}" tabindex="0" data-k="{k}" data-label="{kind}" data-score="{score}" '
            f'aria-label="step {k + 1}, {kind}"><span class="kfh-badge" aria-hidden="true">{BADGES[label]}</span>'
            f'{escape(text)}</span>')


def _trace(t: int, trace: TraceScores) -> str:
    scores = _rounded(trace.ensemble)
    steps = "".join(_step(k, text, label, scores[k]) for k, (text, label) in enumerate(zip(trace.steps, trace.labels)))
    hidden = " hidden" if t else ""
    return (
        f'<article class="kfh-trace" data-trace="{t}" data-id="{escape(trace.id)}"{hidden}>'
        f'<h2>{escape(trace.id)}</h2>'
        f'<details><summary>Prompt</summary><div class="kfh-prompt">{escape(trace.prompt)}</div></details>'
        f'<p class="kfh-summary" aria-live="polite"></p>'
        f'<div class="kfh-text">{steps}<span class="kfh-marker">{escape(trace.marker)}</span>'
        f'<span class="kfh-answer"><span class="kfh-badge">final answer</span>{escape(trace.answer)}</span></div>'
        f'</article>'
    )


def render_fragment(view: TraceView) -> str:
    """The view as one ``div`` with its style, data and script (a notebook shows it inline)."""
    # "<" as \u003c: no "</script>" or "<!--" inside the data can end or confuse its script element
    payload = json.dumps(_payload(view), separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")
    root = "kfh-view-" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]
    css = (ASSETS / "trace_view.css").read_text(encoding="utf-8")
    script = (ASSETS / "trace_view.js").read_text(encoding="utf-8").replace("__KFH_ROOT__", root)
    options = [f'<option value="ens">ensemble: mean of the top {view.top_n} heads</option>'] + [
        f'<option value="{layer}.{head}">L{layer}.H{head}, rank {i + 1}, SRA {sra:.3f}</option>'
        for i, ((layer, head), sra) in enumerate(zip(view.heads, view.sra))
    ]
    items = "".join(f'<li><button type="button" data-trace="{t}">{escape(trace.id)}</button></li>'
                    for t, trace in enumerate(view.traces))
    return (
        f'<div class="kfh-view" id="{root}">'
        f'<style>.kfh-view {{ --kfh-ink: {INK}; --kfh-low: {SHADE_LOW}; --kfh-high: {SHADE_HIGH}; }}\n{css}</style>'
        f'<header class="kfh-top"><h1>Key-Focus Heads of {escape(view.model)}</h1>'
        f'<label>Head <select class="kfh-head">{"".join(options)}</select></label>'
        f'<p class="kfh-legend">Shade: the step\'s score under the selected head, from the trace\'s lowest '
        f'<span class="kfh-swatch" aria-hidden="true"></span> to its highest. Outline and badge: '
        f'<span class="kfh-step kfh-essential"><span class="kfh-badge">E</span>essential</span> (solid), '
        f'<span class="kfh-step kfh-redundant"><span class="kfh-badge">R</span>redundant</span> (dashed), '
        f'<span class="kfh-step kfh-unlabeled"><span class="kfh-badge">?</span>unlabeled</span> (dotted); '
        f'<span class="kfh-answer"><span class="kfh-badge">final answer</span>F</span>. '
        f'S_base = p^{view.alpha:g} |F|/|o| with p = {view.p:g} (a labeled trace has no sampled group).</p></header>'
        f'<nav class="kfh-list" aria-label="Traces"><label>Search by id '
        f'<input type="search" class="kfh-search" placeholder="trace id"></label><ul>{items}</ul></nav>'
        f'<main class="kfh-main">{"".join(_trace(t, trace) for t, trace in enumerate(view.traces))}</main>'
        f'<aside class="kfh-inspect" aria-label="Step details"><h2>Step</h2><div class="kfh-inspect-body" aria-live="polite">'
        f'<p class="kfh-note">Hover over a step, or focus it with Tab, to see its score under each top head, its '
        f'rank in the trace and S_base.</p></div></aside>'
        f'<script type="application/json" class="kfh-data">{payload}</script>'
        f'<script>{script}</script>'
        f'</div>'
    )


def render_document(view: TraceView) -> str:
    """The view as a whole HTML document (what ``kfh-probe view`` writes)."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>Key-Focus Heads: {escape(view.model)}</title></head>'
        f'<body style="margin:0">{render_fragment(view)}</body></html>\n'
    )
