// FeatureInspector: the feature list (search, orderings, dead/ultralow flags, dictionary selector)
// and the selected feature's panels. State is in the URL hash so a view can be shared:
// #sae=sae0&feature=12&order=density&q=regex&mode=regex&seed=1
"use strict";
(function () {
  var M = window.monojax, el = M.el;
  var PAGE = 200;
  var S = { unit: null, feature: null, order: "index", q: "", mode: "text", seed: "1", shown: PAGE };
  var index = null, order = null, matches = null, renderSeq = 0;

  function $(id) { return document.getElementById(id); }

  function orderings(unit) {   // from site.js alone, so the controls show before the list loads
    var o = [["index", "index"], ["random", "random"], ["density", "density (high first)"], ["max", "max activation"]];
    if (M.site.proxies.length) o.push(["proxy", "proxy specificity"]);
    if (M.unitInfo(unit).explanations) o.push(["score", "autointerp score"]);
    return o;
  }

  // A seeded shuffle, so "random" is the same list for everyone with the same link.
  function shuffled(n, seed) {
    var a = [], s = (parseInt(seed, 10) || 1) >>> 0;
    for (var i = 0; i < n; i++) a.push(i);
    function rnd() { s = (s + 0x6D2B79F5) >>> 0; var t = s; t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61); return ((t ^ (t >>> 14)) >>> 0) / 4294967296; }
    for (var j = n - 1; j > 0; j--) { var k = Math.floor(rnd() * (j + 1)), x = a[j]; a[j] = a[k]; a[k] = x; }
    return a;
  }

  function sortBy(key) {
    var v = index[key];
    return order.slice().sort(function (a, b) {
      var x = v[a], y = v[b];
      x = x === null || x === undefined ? -Infinity : x; y = y === null || y === undefined ? -Infinity : y;
      return y - x || a - b;
    });
  }

  function computeOrder() {
    var n = index.n, base = [];
    for (var i = 0; i < n; i++) base.push(i);
    order = base;
    if (S.order === "random") order = shuffled(n, S.seed);
    else if (S.order === "density") order = sortBy("density");
    else if (S.order === "max") order = sortBy("max");
    else if (S.order === "proxy" && index.proxy) order = sortBy("proxy_precision");
    else if (S.order === "score" && index.score) order = sortBy("score");
  }

  // What a search looks at for feature i: its index, top tokens, top logit tokens, explanation, proxy.
  function haystack(i) {
    var parts = ["#" + i];
    (index.top_tokens[i] || []).forEach(function (t) { parts.push(M.tok(t)); });
    (index.logit_top[i] || []).forEach(function (t) { parts.push(M.tok(t)); });
    if (index.explanation && index.explanation[i]) parts.push(index.explanation[i]);
    if (index.proxy && index.proxy_corr[i] !== null) parts.push(M.site.proxies[index.proxy[i]].name);
    return parts.join("\n");
  }

  function computeMatches() {
    var err = $("search-error"), q = S.q;
    err.hidden = true;
    if (!q) { matches = order; return; }
    var num = /^#?(\d+)$/.exec(q.trim()), test;
    if (S.mode === "regex") {
      var re;
      try { re = new RegExp(q); } catch (e) { err.hidden = false; err.textContent = "not a valid regex: " + e.message; matches = []; return; }
      test = function (i) { return re.test(haystack(i)); };
    } else {
      var lq = q.toLowerCase();
      test = function (i) { return haystack(i).toLowerCase().indexOf(lq) >= 0; };
    }
    matches = order.filter(function (i) { return (num && i === +num[1]) || test(i); });
    if (num && +num[1] < index.n) {   // an index query lists that feature first
      matches = [+num[1]].concat(matches.filter(function (i) { return i !== +num[1]; }));
    }
  }

  function flagOf(fired, d) {
    if (fired === 0) return "dead";
    if (d < M.site.ultralow) return "ultralow";
    if (d > M.site.dense) return "dense";
    return "";
  }
  function rowFlags(i) { return flagOf(index.fired[i], index.density[i]); }

  function renderList() {
    var list = M.clear($("feature-list"));
    var n = Math.min(S.shown, matches.length);
    for (var k = 0; k < n; k++) {
      var i = matches[k], flag = rowFlags(i);
      var li = el("li", { class: "frow" + (flag ? " " + flag : "") + (i === S.feature ? " current" : ""), "data-feature": i },
        [el("a", { href: "#" + M.hashOf(stateFor(S.unit, i)) }, [
          el("span", { class: "fidx" }, [String(i)]),
          el("span", { class: "flabel" }, [M.label(index, i) || (flag === "dead" ? "never fired" : "")]),
          flag ? el("span", { class: "badge " + flag }, [flag]) : null,
          el("span", { class: "fdens", title: "activation density" }, [M.pct(index.density[i])])])]);
      list.appendChild(li);
    }
    var u = M.unitInfo(S.unit);
    $("list-count").textContent = M.fmtInt(matches.length) + (S.q ? " matching of " : " of ") + M.fmtInt(index.n) +
      (u.kind === "neurons" ? " neurons" : " features") + " · " + M.fmtInt(u.dead) + " dead · " + M.fmtInt(u.ultralow) + " ultralow";
    $("more").hidden = matches.length <= S.shown;
    document.body.setAttribute("data-list", [S.unit, S.order, S.mode, S.q].join("|"));   // tests wait on it
  }

  function markCurrent() {
    var rows = $("feature-list").querySelectorAll("li.current");
    for (var k = 0; k < rows.length; k++) rows[k].classList.remove("current");
    var row = $("feature-list").querySelector('li[data-feature="' + S.feature + '"]');
    if (row) row.classList.add("current");
  }

  function stateFor(unit, i) {
    return { sae: unit, feature: i, order: S.order === "index" ? "" : S.order, seed: S.order === "random" ? S.seed : "",
      q: S.q, mode: S.mode === "text" ? "" : S.mode };
  }

  function go(unit, i) {
    S.feature = i;
    if (unit !== S.unit) { S.unit = unit; S.q = ""; }
    M.setHash(stateFor(S.unit, i));
    route();
  }

  // The feature's own file holds what its panels show, so a linked feature is drawn without waiting
  // for the unit's list.
  function renderFeature(i) {
    var box = $("feature"), seq = ++renderSeq, unit = S.unit, u = M.unitInfo(unit);
    var got = i >= 0 && i < u.width ? M.load(unit + "/f/" + i) : Promise.resolve(undefined);
    return got.then(function (f) {
      if (seq !== renderSeq) return;   // a newer selection won
      if (f === undefined) {
        M.clear(box).appendChild(el("p", { class: "empty" }, ["No feature " + i + " in " + unit + " (0–" + (u.width - 1) + ")."]));
        return M.ready(unit + "/none");
      }
      var dead = !!f.dead;
      if (dead) f = null;
      var ctx = { site: M.site, unit: u, i: i, f: f, go: go };
      M.clear(box);
      var flag = dead ? "dead" : flagOf(f.fired, f.density);
      box.appendChild(el("div", { class: "fhead" }, [
        el("h1", {}, [(u.kind === "neurons" ? "Neuron " : "Feature ") + unit + "/" + i]),
        flag ? el("span", { class: "badge " + flag }, [flag === "dead" ? "dead: never fired on the analysed tokens" :
          flag === "ultralow" ? "ultralow density" : "dense (> " + M.pct(M.site.dense) + ")"]) : null,
        el("span", { class: "nav-buttons" }, [
          el("button", { type: "button", title: "previous in this list (k)", onclick: function () { step(-1); } }, ["◀"]),
          el("button", { type: "button", title: "next in this list (j)", onclick: function () { step(1); } }, ["▶"])]),
        el("p", { class: "flabel-big" }, [dead ? "" : M.featureLabel(f)])]));
      if (dead) {
        box.appendChild(el("p", { class: "empty dead-note" }, ["This " + (u.kind === "neurons" ? "neuron" : "feature") +
          " never fired on the " + M.fmtInt(M.site.n_tokens) + " analysed tokens: there are no examples, histograms or logit effects to show."]));
      }
      var grid = el("div", { class: "panels" }), later = [];
      function fill(P, section) {
        var body;
        try { body = P.render(ctx); } catch (e) { body = el("p", { class: "empty" }, ["This panel failed: " + e.message]); console.error(e); }
        if (body) section.appendChild(body); else section.remove();
      }
      M.PANELS.forEach(function (P) {
        if (P.when && !P.when(ctx)) return;
        if (dead && P.id !== "stats") return;
        var section = el("section", { class: "panel" + (P.wide ? " wide" : ""), "data-panel": P.id }, [el("h3", {}, [P.title])]);
        grid.appendChild(section);
        if (P.below) later.push([P, section]); else fill(P, section);
      });
      box.appendChild(grid);
      document.title = unit + "/" + i + " · FeatureInspector";
      // Panels marked `below` (the example lists, under the fold) are drawn right after the first
      // paint, so a feature shows at once and its examples a frame later.
      return M.ready(unit + "/" + i).then(function () {
        if (seq !== renderSeq) return;
        later.forEach(function (p) { fill(p[0], p[1]); });
        return M.ready(unit + "/" + i, "data-complete");
      });
    }).catch(function (e) { if (seq === renderSeq) { M.clear(box).appendChild(el("p", { class: "load-error" }, [e.message])); } });
  }

  function step(d) {
    if (!matches || !matches.length) return;
    var k = matches.indexOf(S.feature);
    var j = matches[Math.max(0, Math.min(matches.length - 1, (k < 0 ? 0 : k + d)))];
    if (j !== undefined) go(S.unit, j);
  }

  var listKey = null;
  function route() {
    var h = M.getHash();
    var unit = h.sae && M.unitInfo(h.sae) ? h.sae : (S.unit || M.defaultUnit());
    S.order = h.order || "index"; S.q = h.q || ""; S.mode = h.mode === "regex" ? "regex" : "text"; S.seed = h.seed || "1";
    var fi = h.feature !== undefined && /^\d+$/.test(h.feature) ? parseInt(h.feature, 10) : null;
    if (unit !== S.unit || !index) { index = null; listKey = null; }
    S.unit = unit;
    var loadIndex = function () {
      return index ? Promise.resolve() : M.load(unit + "/index").then(function (idx) { if (S.unit === unit) index = idx; });
    };
    fillControls();
    var drawn = null, idxReady;
    if (fi !== null) {   // the feature first (its own file has all its panels need), then the list
      S.feature = fi;
      drawn = renderFeature(fi);
      idxReady = drawn.then(loadIndex);
    } else idxReady = loadIndex();
    return idxReady.then(function () {
      if (S.unit !== unit) return;
      var key = [S.unit, S.order, S.seed, S.q, S.mode].join("\u0000");
      var same = key === listKey;
      if (!same) { listKey = key; S.shown = PAGE; computeOrder(); computeMatches(); }
      if (fi === null) { S.feature = matches.length ? matches[0] : null; drawn = S.feature === null ?
        renderNone() : renderFeature(S.feature); }
      return drawn.then(same ? markCurrent : renderList);   // the same list: only its highlight moves
    }).catch(M.fail);
  }

  function renderNone() {
    M.clear($("feature")).appendChild(el("p", { class: "empty" }, ["No feature matches."]));
    return M.ready(S.unit + "/none");
  }

  function fillControls() {
    M.fillUnits($("unit"), S.unit);
    var sel = M.clear($("ordering"));
    orderings(S.unit).forEach(function (o) { sel.appendChild(el("option", { value: o[0], selected: o[0] === S.order }, [o[1]])); });
    if ($("search").value !== S.q) $("search").value = S.q;
    $("search-mode").value = S.mode;
  }

  function listState() { return { sae: S.unit, feature: S.feature, order: S.order === "index" ? "" : S.order,
    seed: S.order === "random" ? S.seed : "", q: S.q, mode: S.mode === "text" ? "" : S.mode }; }

  var typing = null;
  function wire() {
    $("unit").addEventListener("change", function (e) { S.unit = e.target.value; S.q = ""; index = null;
      M.setHash({ sae: S.unit }); route(); });
    $("ordering").addEventListener("change", function (e) { S.order = e.target.value;
      var st = listState(); st.feature = null; M.setHash(st); route(); });
    $("search-mode").addEventListener("change", function (e) { S.mode = e.target.value;
      var st = listState(); st.feature = null; M.setHash(st, true); route(); });
    $("search").addEventListener("input", function (e) {
      clearTimeout(typing);
      typing = setTimeout(function () { S.q = e.target.value; var st = listState(); st.feature = null; M.setHash(st, true); route(); }, 150);
    });
    $("more").addEventListener("click", function () { S.shown += PAGE; renderList(); });
    $("feature-list").addEventListener("click", function (e) {
      var a = e.target.closest("a"), li = e.target.closest("li[data-feature]");
      if (!a || !li) return;
      e.preventDefault();
      go(S.unit, parseInt(li.getAttribute("data-feature"), 10));
    });
    window.addEventListener("hashchange", route);   // back/forward between our entries fire it too
    document.addEventListener("keydown", function (e) {
      if (e.target.closest("input, select, textarea")) return;
      if (e.key === "j" || e.key === "ArrowDown") step(1);
      if (e.key === "k" || e.key === "ArrowUp") step(-1);
    });
  }

  // Ask for the linked feature's files now, in parallel with site.js and vocab.js (before the DOM is
  // even parsed): a shared link draws its feature after one round of loads, not three.
  (function prefetch() {
    var h = M.getHash();
    if (!h.sae || !/^[A-Za-z0-9_]+$/.test(h.sae)) return;
    if (h.feature !== undefined && /^\d+$/.test(h.feature)) M.load(h.sae + "/f/" + h.feature).catch(function () {});
    else M.load(h.sae + "/index").catch(function () {});   // with a feature, the list loads after it is drawn
  })();

  document.addEventListener("DOMContentLoaded", function () {
    M.start(function () { wire(); return route(); });
  });
})();
