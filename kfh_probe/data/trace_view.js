/* kfh-probe view: shade each step by the selected head's score (the trace's lowest to its highest),
   explain a step on hover or focus, count the essential-redundant pairs the head ranks right and wrong,
   filter the trace list by id. The data is the JSON block of this view; the URL fragment
   #trace=ID&head=L.H&step=K (head=ens: the ensemble; each part optional) picks a trace and a head and
   explains step K (1-based). */
(function () {
  "use strict";
  var root = document.getElementById("__KFH_ROOT__");
  try {
    var data = JSON.parse(root.querySelector("script.kfh-data").textContent);
    var select = root.querySelector("select.kfh-head");
    var search = root.querySelector("input.kfh-search");
    var inspect = root.querySelector(".kfh-inspect-body");
    var articles = Array.prototype.slice.call(root.querySelectorAll("article.kfh-trace"));
    var buttons = Array.prototype.slice.call(root.querySelectorAll(".kfh-list button"));
    var headIndex = -1; /* -1: the top-N ensemble; else the head's place in the manifest's ranking */
    var current = 0;
    var linkedStep = 0; /* the step the fragment explains (1-based; 0: none) */

    function headName(i) { return i < 0 ? "ensemble of the top " + data.top_n : "L" + data.heads[i][0] + ".H" + data.heads[i][1]; }
    function scoresOf(t, i) { return i < 0 ? data.traces[t].ensemble : data.traces[t].heads[i]; }
    function fmt(x) { return Number(x).toPrecision(3); }
    function rankOf(scores, k) {
      var r = 1;
      for (var j = 0; j < scores.length; j++) { if (scores[j] > scores[k]) { r++; } }
      return r;
    }
    function shade(t) {
      var lo = data.shade_low, hi = data.shade_high;
      return "rgb(" + [0, 1, 2].map(function (c) { return Math.round(lo[c] + (hi[c] - lo[c]) * t); }).join(",") + ")";
    }
    function pairs(t, scores) {
      var labels = data.traces[t].labels, right = 0, wrong = [], ties = 0;
      for (var e = 0; e < labels.length; e++) {
        if (labels[e] !== "essential") { continue; }
        for (var r = 0; r < labels.length; r++) {
          if (labels[r] !== "redundant") { continue; }
          if (scores[e] > scores[r]) { right++; } else if (scores[e] < scores[r]) { wrong.push([e, r]); } else { ties++; }
        }
      }
      return { right: right, wrong: wrong, ties: ties, total: right + wrong.length + ties };
    }
    function summarize(t, scores) {
      var p = pairs(t, scores), box = articles[t].querySelector(".kfh-summary");
      if (p.total === 0) { box.textContent = headName(headIndex) + ": this trace has no essential-redundant pair."; return; }
      var text = headName(headIndex) + " ranks " + p.right + " of " + p.total + " essential-redundant pairs right, " +
        p.wrong.length + " wrong" + (p.ties ? ", " + p.ties + " tied" : "") + " (pair accuracy " +
        fmt((p.right + p.ties / 2) / p.total) + ").";
      if (p.wrong.length) {
        text += " Wrong: " + p.wrong.slice(0, 12).map(function (w) {
          return "step " + (w[0] + 1) + " (essential) < step " + (w[1] + 1) + " (redundant)";
        }).join("; ") + (p.wrong.length > 12 ? "; and " + (p.wrong.length - 12) + " more" : "") + ".";
      }
      box.textContent = text;
    }
    function apply() {
      articles.forEach(function (article, t) {
        var scores = scoresOf(t, headIndex), low = Math.min.apply(null, scores), span = Math.max.apply(null, scores) - low;
        var steps = article.querySelectorAll(".kfh-step");
        for (var k = 0; k < steps.length; k++) {
          steps[k].style.backgroundColor = shade(span > 0 ? (scores[k] - low) / span : 0);
          steps[k].setAttribute("data-score", String(scores[k]));
          steps[k].setAttribute("data-rank", String(rankOf(scores, k)));
        }
        summarize(t, scores);
      });
      select.value = headIndex < 0 ? "ens" : data.heads[headIndex].join(".");
    }
    function show(t) {
      current = t;
      articles.forEach(function (a, i) { a.hidden = i !== t; });
      buttons.forEach(function (b, i) { b.setAttribute("aria-current", i === t ? "true" : "false"); });
    }
    function writeHash() {
      var hash = "#trace=" + encodeURIComponent(data.traces[current].id) + "&head=" + select.value;
      if (history.replaceState) { history.replaceState(null, "", hash); }
    }
    function readHash() {
      linkedStep = 0;
      location.hash.replace(/^#/, "").split("&").forEach(function (part) {
        var kv = part.split("="), value = decodeURIComponent(kv.slice(1).join("="));
        if (kv[0] === "head") {
          headIndex = -1;
          data.heads.forEach(function (h, i) { if (h.join(".") === value) { headIndex = i; } });
        } else if (kv[0] === "step") {
          linkedStep = parseInt(value, 10) || 0;
        } else if (kv[0] === "trace") {
          data.traces.forEach(function (tr, i) { if (tr.id === value) { current = i; } });
        }
      });
    }
    function row(cells, tag) {
      var tr = document.createElement("tr");
      cells.forEach(function (c) { var td = document.createElement(tag); td.textContent = c; tr.appendChild(td); });
      return tr;
    }
    function explain(step) {
      var t = Number(step.closest("article").getAttribute("data-trace")), k = Number(step.getAttribute("data-k"));
      var tr = data.traces[t], K = tr.labels.length, ens = tr.ensemble[k];
      var before = root.querySelector(".kfh-explained");
      if (before) { before.classList.remove("kfh-explained"); }
      step.classList.add("kfh-explained");
      var lines = [
        "Trace " + tr.id + ", step " + (k + 1) + " of " + K + ": " + (tr.labels[k] || "unlabeled"),
        headName(headIndex) + ": score " + fmt(scoresOf(t, headIndex)[k]) + ", rank " + rankOf(scoresOf(t, headIndex), k) + " of " + K,
        "S_base = p^" + data.alpha + " |F|/|o| = " + fmt(tr.baseline) + " (p = " + data.p + ", |F| = " + tr.answer_tokens +
          ", |o| = " + tr.total_tokens + "); the ensemble's " + fmt(ens) + " is " + (ens < tr.baseline ? "below" : "at or above") + " it"
      ];
      inspect.textContent = "";
      lines.forEach(function (line) { var p = document.createElement("p"); p.textContent = line; inspect.appendChild(p); });
      var table = document.createElement("table"), shown = [];
      for (var i = 0; i < data.top_n; i++) { shown.push(i); }
      if (headIndex >= data.top_n) { shown.push(headIndex); }
      table.appendChild(row(["head", "score", "rank"], "th"));
      shown.forEach(function (i) {
        table.appendChild(row([headName(i) + (i === headIndex ? " (selected)" : ""), fmt(tr.heads[i][k]), rankOf(tr.heads[i], k) + " of " + K], "td"));
      });
      inspect.appendChild(table);
    }

    select.addEventListener("change", function () {
      headIndex = -1;
      data.heads.forEach(function (h, i) { if (h.join(".") === select.value) { headIndex = i; } });
      apply();
      writeHash();
    });
    buttons.forEach(function (b, i) { b.addEventListener("click", function () { show(i); writeHash(); }); });
    search.addEventListener("input", function () {
      var q = search.value.toLowerCase();
      buttons.forEach(function (b) { b.parentNode.hidden = b.textContent.toLowerCase().indexOf(q) < 0; });
    });
    root.addEventListener("mouseover", function (ev) { var s = ev.target.closest(".kfh-step"); if (s) { explain(s); } });
    root.addEventListener("focusin", function (ev) { var s = ev.target.closest(".kfh-step"); if (s) { explain(s); } });
    function load() {
      readHash();
      show(current);
      apply();
      var step = articles[current].querySelectorAll(".kfh-step")[linkedStep - 1];
      if (step) { explain(step); }
    }
    window.addEventListener("hashchange", load);

    load();
    root.setAttribute("data-script-ms", performance.now().toFixed(1));
    root.setAttribute("data-ready", "1");
  } catch (err) {
    root.setAttribute("data-error", String(err));
    throw err;
  }
})();
