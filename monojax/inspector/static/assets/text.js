// TextInspector: a document with every token coloured by the selected feature. Hovering a token
// lists the features active on it; clicking one selects it; hovering a feature in that list
// highlights every token where it fires. Served (python -m monojax.inspect serve), it also runs the
// model on typed text through POST api/text. State: #sae=sae0&doc=3&feature=12
"use strict";
(function () {
  var M = window.monojax, el = M.el, fmt = M.fmt;
  var S = { unit: null, doc: null, feature: null };
  var index = null, doc = null, byFeature = null, live = null, pinned = null;

  function $(id) { return document.getElementById(id); }

  // doc: {tokens, pieces, units: {unit: {features: [[[f, a], ...] per token], active: [n per token]}}}
  function featuresOf() {
    var u = doc && doc.units[S.unit];
    return u ? u.features : [];
  }

  function buildByFeature() {
    byFeature = {};
    featuresOf().forEach(function (fs, k) {
      fs.forEach(function (p) { (byFeature[p[0]] = byFeature[p[0]] || []).push([k, p[1]]); });
    });
  }

  function colour(feature) {
    var spans = $("doc").querySelectorAll(".tok"), acts = {};
    (byFeature[feature] || []).forEach(function (p) { acts[p[0]] = p[1]; });
    var max = feature !== null && index && index.max[feature] > 0 ? index.max[feature] : 1;
    for (var k = 0; k < spans.length; k++) {
      var a = acts[k] || 0;
      spans[k].style.backgroundColor = feature === null ? "" : M.actColor(a, max);
      spans[k].setAttribute("data-act", a);
      spans[k].classList.toggle("firing", a > 0);
    }
  }

  function renderSelected() {
    var box = M.clear($("selected")), f = S.feature;
    if (f === null) { box.appendChild(el("p", { class: "muted" }, ["Hover a token, then click a feature to colour the text by it."])); return; }
    var here = byFeature[f] || [], peak = Math.max.apply(null, here.map(function (p) { return p[1]; }).concat([0]));
    box.appendChild(el("div", { class: "sel-row" }, [
      el("b", {}, [S.unit + "/" + f]), " ", el("span", { class: "flabel" }, [M.label(index, f)]),
      el("span", { class: "muted" }, [" · fires on " + here.length + " of " + doc.tokens.length + " tokens here, peak " + fmt(peak) +
        " (max over the analysis set " + fmt(index.max[f]) + ")"]), " ",
      el("a", { href: "index.html#" + M.hashOf({ sae: S.unit, feature: f }), class: "open-fi" }, ["open in FeatureInspector →"])]));
  }

  function showToken(k) {
    var fs = featuresOf()[k] || [], active = (doc.units[S.unit] || {}).active || [];
    // the token in a bidi-isolated span: an Arabic or Hebrew piece must not reorder the heading
    M.clear($("token-head")).append("Token " + k + ": ", el("span", { class: "tok plain" }, [doc.pieces[k] || ""]),
      " · " + (active[k] || 0) + " active");
    var list = M.clear($("token-features"));
    fs.forEach(function (p) {
      var li = el("li", { class: "tf" + (p[0] === S.feature ? " current" : ""), "data-feature": p[0], tabindex: 0 }, [
        el("span", { class: "fidx" }, [String(p[0])]), el("span", { class: "tf-act" }, [fmt(p[1])]),
        el("span", { class: "flabel" }, [M.label(index, p[0])])]);
      list.appendChild(li);
    });
    if ((active[k] || 0) > fs.length) list.appendChild(el("li", { class: "muted" }, ["+ " + (active[k] - fs.length) + " weaker"]));
    if (!fs.length) list.appendChild(el("li", { class: "muted" }, ["no feature fires on this token"]));
  }

  function select(f) {
    S.feature = f;
    M.setHash({ sae: S.unit, doc: S.doc, feature: f }, true);
    colour(f);
    renderSelected();
    var cur = $("token-features").querySelectorAll("li[data-feature]");
    for (var i = 0; i < cur.length; i++) cur[i].classList.toggle("current", +cur[i].getAttribute("data-feature") === f);
  }

  function renderDoc(title) {
    var box = M.clear($("doc"));
    buildByFeature();
    doc.pieces.forEach(function (s, k) {
      // a newline (shown ⏎) breaks the line inside its token, so the indentation after it shows
      var parts = [];
      s.split("\u23ce").forEach(function (p, j) { if (j) parts.push("\u23ce", el("br")); if (p) parts.push(p); });
      box.appendChild(el("span", { class: "tok" + (s ? "" : " partial"), "data-k": k,
        title: s ? null : "part of a character completed by the next token" }, parts));
    });
    M.clear($("doc-head")).appendChild(el("h1", {}, [title]));
    $("doc-head").appendChild(el("p", { class: "muted" }, [doc.tokens.length + " tokens" + (doc.truncated ? " (cut)" : "") +
      " · contexts of " + doc.seq_len + " tokens, each run from its start"]));
    if (S.feature === null || !byFeature[S.feature]) {   // default: the feature firing most often here
      var best = null, n = 0;
      Object.keys(byFeature).forEach(function (f) { if (byFeature[f].length > n) { n = byFeature[f].length; best = +f; } });
      if (S.feature === null) S.feature = best;
    }
    colour(S.feature);
    renderSelected();
    $("token-head").textContent = "Hover a token";
    M.clear($("token-features"));
    M.ready("doc " + S.doc);
  }

  function loadDoc() {
    var items = $("doc-list").querySelectorAll("li[data-doc]");
    for (var i = 0; i < items.length; i++) items[i].classList.toggle("current", items[i].getAttribute("data-doc") === String(S.doc));
    if (S.doc === "live") {
      if (live) { doc = live; renderDoc("Your text"); }
      return Promise.resolve();
    }
    var meta = M.site.samples.filter(function (s) { return String(s.k) === String(S.doc); })[0];
    if (!meta) { M.clear($("doc")).appendChild(el("p", { class: "empty" }, ["No sample documents in this site."])); return Promise.resolve(); }
    return M.load("samples/" + meta.k).then(function (d) { doc = d; renderDoc(meta.set + " · document " + meta.doc); });
  }

  function renderDocList() {
    var list = M.clear($("doc-list")), lastSet = null;
    M.site.samples.forEach(function (s) {
      if (s.set !== lastSet) { list.appendChild(el("li", { class: "set-name" }, [s.set])); lastSet = s.set; }
      list.appendChild(el("li", { "data-doc": s.k }, [el("a", { href: "#" + M.hashOf({ sae: S.unit, doc: s.k }) },
        [el("span", { class: "doc-preview" }, [s.preview || ("document " + s.doc)])])]));
    });
  }

  function route() {
    var h = M.getHash();
    var unit = h.sae && M.unitInfo(h.sae) ? h.sae : (S.unit || M.defaultUnit());
    var changed = unit !== S.unit;
    S.unit = unit;
    S.doc = h.doc !== undefined ? h.doc : (M.site.samples.length ? String(M.site.samples[0].k) : null);
    S.feature = h.feature !== undefined && /^\d+$/.test(h.feature) ? +h.feature : null;
    M.fillUnits($("unit"), S.unit);
    if (changed) renderDocList();
    var ready = changed || !index ? M.load(unit + "/index").then(function (idx) { index = idx; }) : Promise.resolve();
    return ready.then(loadDoc).catch(M.fail);
  }

  function wireLive() {
    if (!/^https?:$/.test(location.protocol)) {
      $("serve-hint").textContent = "To inspect your own text: python -m monojax.inspect serve --workdir=RUN";
      return;
    }
    fetch("api/status").then(function (r) { return r.ok ? r.json() : null; }).then(function (st) {
      if (!st || !st.live) return;
      $("live-form").hidden = false;
      $("live-status").textContent = "up to " + st.max_tokens + " tokens";
    }).catch(function () { /* a static server: no live panel */ });
    $("live-form").addEventListener("submit", function (e) {
      e.preventDefault();
      var text = $("live-text").value;
      $("live-status").textContent = "running…";
      fetch("api/text", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text: text, unit: S.unit }) })
        .then(function (r) { return r.json().then(function (j) { if (!r.ok) throw new Error(j.error || ("HTTP " + r.status)); return j; }); })
        .then(function (j) {
          var units = {}; units[j.unit] = { features: j.features, active: j.active };
          live = { tokens: j.tokens, pieces: j.pieces, truncated: j.truncated, seq_len: j.seq_len, units: units };
          $("live-status").textContent = j.n_tokens + " tokens" + (j.truncated ? " (cut to the limit)" : "");
          S.doc = "live"; S.feature = null;
          M.setHash({ sae: S.unit, doc: "live" }, true);
          doc = live; renderDoc("Your text");
        })
        .catch(function (err) { $("live-status").textContent = "error: " + err.message; });
    });
  }

  function wire() {
    $("unit").addEventListener("change", function (e) {
      var st = { sae: e.target.value, doc: S.doc === "live" ? "" : S.doc };
      if (S.doc === "live") live = null;
      M.setHash(st); route();
    });
    var d = $("doc");
    d.addEventListener("mouseover", function (e) {
      var t = e.target.closest(".tok");
      if (!t || pinned !== null) return;
      showToken(+t.getAttribute("data-k"));
    });
    d.addEventListener("click", function (e) {   // click a token: pin its list (click again to unpin)
      var t = e.target.closest(".tok");
      if (!t) return;
      var k = +t.getAttribute("data-k");
      pinned = pinned === k ? null : k;
      var all = d.querySelectorAll(".tok.pinned");
      for (var i = 0; i < all.length; i++) all[i].classList.remove("pinned");
      if (pinned !== null) t.classList.add("pinned");
      showToken(k);
    });
    var tf = $("token-features");
    tf.addEventListener("mouseover", function (e) {
      var li = e.target.closest("li[data-feature]");
      if (li) colour(+li.getAttribute("data-feature"));
    });
    tf.addEventListener("mouseleave", function () { colour(S.feature); });
    tf.addEventListener("click", function (e) {
      var li = e.target.closest("li[data-feature]");
      if (li) select(+li.getAttribute("data-feature"));
    });
    window.addEventListener("hashchange", route);
    wireLive();
  }

  document.addEventListener("DOMContentLoaded", function () {
    M.start(function () { wire(); return route(); });
  });
})();
