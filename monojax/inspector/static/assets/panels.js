// FeatureInspector panels. Each is {id, title, wide, below, when(ctx), render(ctx) -> Node | null}
// (below: below the fold at 1280×800, drawn just after the first paint; when: whether the panel
// applies); a panel is one
// <section data-panel="id">, so adding one is adding an entry to monojax.PANELS.
// ctx: {site, unit (site.units entry), index (the unit's feature list), i, f (the feature's data
// file, null for a dead feature), go(unit, i) (select a feature)}.
"use strict";
(function () {
  var M = window.monojax, el = M.el, fmt = M.fmt;

  function kv(rows) {
    return el("dl", { class: "kv" }, [].concat.apply([], rows.map(function (r) {
      return [el("dt", {}, [r[0]]), el("dd", { "data-key": r[2] || null }, [r[1]])];
    })));
  }

  function featureLink(ctx, unit, j, text) {
    return el("a", { href: "#" + M.hashOf({ sae: unit, feature: j }), class: "flink",
      onclick: function (e) { e.preventDefault(); ctx.go(unit, j); } }, [text || (unit + "/" + j)]);
  }

  // Bars: [{x0, x1, y, color}], drawn in an SVG with a log-free linear y axis.
  function histogram(bars, opts) {
    var W = opts.width || 560, H = opts.height || 150, padL = 28, padB = 30, padT = 8;
    var s = M.svg("svg", { viewBox: "0 0 " + W + " " + H, class: "hist", role: "img", "aria-label": opts.label });
    var ymax = Math.max.apply(null, bars.map(function (b) { return b.y; }).concat([1]));
    var xmin = opts.xmin, xmax = opts.xmax, sx = function (x) { return padL + (x - xmin) / (xmax - xmin) * (W - 2 * padL); };
    var sy = function (y) { return H - padB - (opts.logY ? Math.log10(1 + y) / Math.log10(1 + ymax) : y / ymax) * (H - padB - padT); };
    bars.forEach(function (b) {
      if (!(b.y > 0)) return;
      var r = M.svg("rect", { x: sx(b.x0) + 0.5, y: sy(b.y), width: Math.max(1, sx(b.x1) - sx(b.x0) - 1),
        height: H - padB - sy(b.y), fill: b.color, class: "bar" });
      r.appendChild(M.svg("title")).textContent = b.title || "";
      s.appendChild(r);
    });
    s.appendChild(M.svg("line", { x1: padL, x2: W - padL, y1: H - padB, y2: H - padB, class: "axis" }));
    (opts.ticks || []).forEach(function (t) {
      var x = sx(t.x);
      s.appendChild(M.svg("line", { x1: x, x2: x, y1: H - padB, y2: H - padB + 4, class: "axis" }));
      var tx = M.svg("text", { x: x, y: H - padB + 16, "text-anchor": "middle", class: "tick" });
      tx.textContent = t.label;
      s.appendChild(tx);
    });
    if (opts.xlabel) {
      var xl = M.svg("text", { x: W / 2, y: H - 2, "text-anchor": "middle", class: "axis-label" });
      xl.textContent = opts.xlabel;
      s.appendChild(xl);
    }
    return s;
  }

  // One example: value, then the window with each token shaded by the feature's activation.
  function example(ctx, ex) {
    var value = ex[0], ids = ex[4], acts = {}, shown = {}, C = ctx.site.window[0];
    ex[5].forEach(function (p) { acts[p[0]] = p[1]; });
    (ex[6] || []).forEach(function (p) { shown[p[0]] = p[1]; });   // characters split over tokens, shown whole
    var abl = {};   // ablation effects at this example's positions (analysis/ablation.py)
    ((ctx.f.ablation || {})[ex[1] + ":" + ex[2]] || []).forEach(function (d) { abl[d[0]] = d; });
    var max = ctx.f.max, row = el("div", { class: "ex" + (ex[3] ? " repeated" : ""), "data-value": value });
    row.appendChild(el("span", { class: "ex-val", title: "activation on the marked token" }, [fmt(value)]));
    // Keyword in context: the marked token in a column of its own, so the examples line up.
    var left = el("span", { class: "ex-left" }), mid = el("span", { class: "ex-mid" }), right = el("span", { class: "ex-right" });
    ids.forEach(function (id, k) {
      if (id < 0) return;
      var a = acts[k] || 0;
      var piece = k in shown ? shown[k] : M.tok(id);
      var t = el("span", { class: "tok" + (k === C ? " center" : "") + (piece ? "" : " partial"),
        title: (piece ? "" : "part of a character completed by the next token · ") + "activation " + fmt(a) }, [piece]);
      if (a > 0) t.style.backgroundColor = M.actColor(a, max);
      if (k in abl) {
        var d = abl[k];
        t.classList.add("abl", d[1] > 0 ? "abl-helps" : "abl-hurts");
        t.setAttribute("data-dloss", String(d[1]));
        t.title += ablationText(d);
      }
      (k < C ? left : k === C ? mid : right).appendChild(t);
    });
    row.appendChild(el("span", { class: "ex-text" }, [left, mid, right]));
    if (ex[3]) row.appendChild(el("span", { class: "badge", title: "this window repeats text seen earlier in its context" }, ["repeated"]));
    return row;
  }

  // The hover text of an ablated position: [offset, Δloss, up ids, up Δ, down ids, down Δ].
  function ablationText(d) {
    var list = function (ids, vals) {
      return ids.map(function (id, j) { return "\u201c" + M.tok(id) + "\u201d " + (vals[j] > 0 ? "+" : "") + fmt(vals[j]); }).join(", ");
    };
    return "\nablating the feature here: next-token loss " + (d[1] === null ? "— (end of sequence)" :
      (d[1] > 0 ? "+" : "") + fmt(d[1])) + "\n  log-prob rises most: " + list(d[2], d[3]) +
      "\n  log-prob falls most: " + list(d[4], d[5]);
  }

  function exampleGroup(ctx, g, note) {
    var box = el("div", { class: "ex-group", "data-group": g.name });
    var vals = g.ex.map(function (e) { return e[0]; });
    box.appendChild(el("h4", {}, [g.name === "top" ? "Top activations" : g.name === "bottom" ? "Bottom activations" :
      "Subsample " + g.name, el("span", { class: "muted" }, [" · " + g.ex.length + " example" + (g.ex.length === 1 ? "" : "s") +
      (vals.length ? ", " + fmt(Math.min.apply(null, vals)) + " to " + fmt(Math.max.apply(null, vals)) : "") + (note || "")])]));
    g.ex.forEach(function (e) { box.appendChild(example(ctx, e)); });
    return box;
  }

  function groups(ctx, pred) { return ctx.f ? ctx.f.groups.filter(function (g) { return pred(g.name); }) : []; }

  function tokenBars(ctx, ids, vals, color, cls) {
    var vmax = Math.max.apply(null, vals.map(function (v) { return Math.abs(v || 0); }).concat([1e-9]));
    return el("ol", { class: "logit-list " + cls }, ids.map(function (id, k) {
      var bar = el("span", { class: "lbar" });
      bar.style.width = (100 * Math.abs(vals[k] || 0) / vmax).toFixed(1) + "%";
      bar.style.backgroundColor = color;
      return el("li", { "data-token": id }, [el("span", { class: "tok plain" }, [M.tok(id)]),
        el("span", { class: "lbar-wrap" }, [bar]), el("span", { class: "lval" }, [fmt(vals[k])])]);
    }));
  }

  M.PANELS = [
    { id: "stats", title: "Statistics", render: function (ctx) {
      var f = ctx.f, fired = f ? f.fired : 0, d = f ? f.density : 0;   // no file: a dead feature
      var rows = [["activation density", M.pct(d) + " (" + M.oneIn(d) + ")", "density"],
        ["tokens fired on", M.fmtInt(fired) + " of " + M.fmtInt(ctx.site.n_tokens), "fired"],
        ["max activation", f ? fmt(f.max) : "—", "max"]];
      if (f) rows.push(["mean when firing", fmt(f.mean * ctx.site.n_tokens / Math.max(1, f.fired)), "mean_firing"]);
      return kv(rows);
    } },
    { id: "autointerp", title: "Explanation", render: function (ctx) {
      var a = ctx.f && ctx.f.autointerp, src = ctx.unit.autointerp;
      if (!a) return el("p", { class: "empty" }, [src ? "Not explained by " + src.label + " (not in the features it was run on)."
        : "No automated explanation for this run yet: python -m monojax.autointerp --workdir=RUN"]);
      var who = [el("p", { class: "note", "data-key": "autointerp_source" }, [a.baseline
        ? "Offline baseline: a token-statistics explanation, no language model; the floor a model's score must beat."
        : "By " + (src && src.label === a.label ? src.backend + " " + src.model + " (prompts " + src.prompt_version + ")"
          : String(a.label)) + "."])];
      if (a.excluded) return el("div", {}, who.concat([el("p", { class: "empty" }, ["Not scored: " + a.excluded + "."])]));
      var s = a.scores || {}, rows = [];
      var sim = s.simulation;
      rows.push(["simulation (Spearman)", sim ? fmt(sim.spearman) + "  ·  Pearson " + fmt(sim.pearson) +
        "  ·  " + M.fmtInt(sim.tokens) + " tokens" : "—", "score"]);
      [["detection", "balanced_accuracy", "detection (balanced acc.)"], ["fuzzing", "balanced_accuracy", "fuzzing (balanced acc.)"],
       ["logits", "accuracy", "logits (accuracy, chance 0.5)"]].forEach(function (d) {
        if (d[0] in s) rows.push([d[2], s[d[0]] ? fmt(s[d[0]][d[1]]) : "—", d[0]]);
      });
      if (a.single_token) rows.push(["single-token", "yes: every top example peaks on the same token", "single_token"]);
      var errs = Object.keys(a.errors || {}).map(function (k) { return k + ": " + a.errors[k]; });
      if (errs.length) rows.push(["not scored", errs.join("; "), "errors"]);
      return el("div", {}, [el("p", { class: "explanation" }, [String(a.explanation || "(no explanation: " +
        ((a.errors || {}).explain || "none") + ")")])].concat(who, [kv(rows)]));
    } },
    { id: "neurons", title: "Neuron alignment", when: function (ctx) { return ctx.unit.kind !== "neurons"; },
      render: function (ctx) {
        var f = ctx.f;
        if (!f || !f.neurons) return el("p", { class: "empty" }, ["No neuron data."]);
        var table = el("table", { class: "nums" }, [el("tr", {}, [el("th", {}, ["neuron"]), el("th", {}, ["decoder weight"])])]);
        f.neurons.forEach(function (n) {
          table.appendChild(el("tr", {}, [el("td", {}, [featureLink(ctx, "neurons", n[0], "neuron " + n[0])]),
            el("td", { class: n[1] < 0 ? "neg" : "pos" }, [fmt(n[1])])]));
        });
        var out = el("div", {}, [el("p", { class: "muted" }, ["largest |decoder weight|"]), table]);
        if (f.corr_neuron && f.corr_neuron[0] >= 0)
          out.appendChild(el("p", { class: "corr-neuron" }, ["most correlated neuron: ",
            featureLink(ctx, "neurons", f.corr_neuron[0], "neuron " + f.corr_neuron[0]), " (r = " + fmt(f.corr_neuron[1]) + ")"]));
        return out;
      } },
    { id: "logits", title: "Logit effects", wide: true, render: function (ctx) {
      var f = ctx.f;
      if (!f) return null;
      var L = f.logit, e = L.edges, bars = [];
      for (var k = 0; k < L.hist.length; k++) {
        var mid = (e[k] + e[k + 1]) / 2;
        bars.push({ x0: e[k], x1: e[k + 1], y: L.hist[k], color: mid < 0 ? M.NEG : M.POS,
          title: L.hist[k] + " tokens with effect in [" + fmt(e[k]) + ", " + fmt(e[k + 1]) + ")" });
      }
      var lo = e[0], hi = e[e.length - 1];
      var hist = histogram(bars, { xmin: lo, xmax: hi, logY: true, label: "histogram of logit effects over the vocabulary",
        ticks: [{ x: lo, label: fmt(lo) }, { x: 0, label: "0" }, { x: hi, label: fmt(hi) }].filter(function (t) { return t.x >= lo && t.x <= hi; }),
        xlabel: "effect on each token's logit (median-shifted; counts on a log scale)" });
      return el("div", { class: "logits" }, [hist, el("div", { class: "logit-cols" }, [
        el("div", {}, [el("h4", {}, ["Positive logits"]), tokenBars(ctx, L.top, L.top_v, M.POS, "positive")]),
        el("div", {}, [el("h4", {}, ["Negative logits"]), tokenBars(ctx, L.bottom, L.bottom_v, M.NEG, "negative")])])]);
    } },
    { id: "acthist", title: "Activation histogram", render: function (ctx) {
      var f = ctx.f;
      if (!f) return null;
      var e = ctx.site.hist_edges.map(Math.log10), bars = [], first = -1, last = -1;
      f.hist.forEach(function (c, k) { if (c > 0) { if (first < 0) first = k; last = k; } });
      if (first < 0) return el("p", { class: "empty" }, ["No activations."]);
      first = Math.max(0, first - 1); last = Math.min(f.hist.length - 1, last + 1);
      for (var k = first; k <= last; k++) bars.push({ x0: e[k], x1: e[k + 1], y: f.hist[k], color: "#dd8a1c",
        title: M.fmtInt(f.hist[k]) + " tokens with activation in [" + fmt(Math.pow(10, e[k])) + ", " + fmt(Math.pow(10, e[k + 1])) + ")" });
      var ticks = [];
      for (var p = Math.ceil(e[first]); p <= Math.floor(e[last + 1]); p++) ticks.push({ x: p, label: "1e" + p });
      return histogram(bars, { width: 320, height: 170, xmin: e[first], xmax: e[last + 1], label: "histogram of non-zero activations", ticks: ticks,
        xlabel: "activation (log scale) · " + M.fmtInt(f.fired) + " non-zero" });
    } },
    { id: "proxies", title: "Proxies", when: function (ctx) { return ctx.site.proxies.length > 0; }, render: function (ctx) {
      var f = ctx.f;
      if (!f || !f.proxies) return el("p", { class: "empty" }, ["No proxy data."]);
      var t = el("table", { class: "nums" }, [el("tr", {}, ["proxy", "precision", "recall", "corr"].map(function (h) {
        return el("th", {}, [h]); }))]);
      f.proxies.forEach(function (p) {
        var info = ctx.site.proxies[p[0]] || { name: "?" };
        t.appendChild(el("tr", {}, [el("td", { title: info.description }, [info.name]), el("td", {}, [fmt(p[1])]),
          el("td", {}, [fmt(p[2])]), el("td", {}, [fmt(p[3])])]));
      });
      return el("div", {}, [t, el("p", { class: "muted" }, ["precision: share of the feature's activation on the proxy's tokens; recall: share of the proxy's tokens where it fires"])]);
    } },
    { id: "ablation", title: "Ablation effects", render: function (ctx) {
      var a = ctx.f && ctx.f.ablation;
      if (!a) return el("p", { class: "empty" }, [ctx.unit.kind === "neurons" ? "Ablation effects are computed for SAE features."
        : "No ablation effects for this feature (the analysis computes them for SAEs on the model's last layer)."]);
      // Over every ablated position of the shown examples: the loss change and the tokens it moves most often.
      var n = 0, sum = 0, helps = 0, up = {}, down = {};
      Object.keys(a).forEach(function (key) {
        a[key].forEach(function (d) {
          if (d[1] !== null) { n += 1; sum += d[1]; if (d[1] > 0) helps += 1; }
          d[4].forEach(function (id) { down[id] = (down[id] || 0) + 1; });
          d[2].forEach(function (id) { up[id] = (up[id] || 0) + 1; });
        });
      });
      var top = function (c) {
        return Object.keys(c).sort(function (x, y) { return c[y] - c[x] || x - y; }).slice(0, 8).map(function (id) {
          return el("li", {}, [el("span", { class: "tok plain" }, [M.tok(+id)]), " \u00d7" + c[id]]); });
      };
      return el("div", {}, [kv([["positions ablated", M.fmtInt(n), "abl_positions"],
          ["mean Δ next-token loss", n ? fmt(sum / n) : "—", "abl_mean"],
          ["feature helps the prediction", n ? M.pct(helps / n) + " of positions" : "—", "abl_helps"]]),
        el("p", { class: "muted" }, ["Ablating the feature lowers most often:"]), el("ul", { class: "abl-tokens" }, top(down)),
        el("p", { class: "muted" }, ["and raises most often:"]), el("ul", { class: "abl-tokens" }, top(up)),
        el("p", { class: "muted" }, ["Underlined tokens in the examples below: hover for the effect there (red: the feature lowers the actual next token's loss)."])]);
    } },
    { id: "steer", title: "Steering (served)", wide: true, below: true,
      when: function (ctx) { return /^https?:$/.test(location.protocol) && ctx.unit.kind !== "neurons" && !!ctx.f; },
      render: function (ctx) {
        // Clamp this feature to a value at every position and sample with and without (POST api/generate).
        var f = ctx.f, C = ctx.site.window[0], top = (f.groups.filter(function (g) { return g.name === "top"; })[0] || { ex: [] }).ex[0];
        var start = top ? top[4].slice(0, C + 1).filter(function (id) { return id >= 0; }).map(function (id) { return M.tok(id); })
          .join("").replace(/\u23ce/g, "\n").replace(/\u21e5/g, "\t") : "The";
        var prompt = el("textarea", { class: "steer-prompt", rows: 3, "aria-label": "prompt" }, [start]);
        var maxv = Math.max(f.max || 1, 1e-6), value = el("input", { type: "range", min: String(-2 * maxv), max: String(10 * maxv),
          step: String(maxv / 20), value: String(5 * maxv), class: "steer-value", "aria-label": "clamp value" });
        var shown = el("span", { class: "steer-shown" }, [fmt(5 * maxv)]);
        value.addEventListener("input", function () { shown.textContent = fmt(+value.value); });
        var out = el("div", { class: "steer-out" }), status = el("span", { class: "muted steer-status" });
        var go = el("button", { type: "button", class: "steer-go" }, ["Generate"]);
        go.addEventListener("click", function () {
          status.textContent = "running…";
          fetch("api/generate", { method: "POST", headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ unit: ctx.unit.name, feature: ctx.i, value: +value.value, prompt: prompt.value,
              max_new_tokens: 24, seed: 0 }) })
            .then(function (r) { return r.json().then(function (j) { if (!r.ok) throw new Error(j.error || ("HTTP " + r.status)); return j; }); })
            .then(function (j) {
              M.clear(out);
              var col = function (title, text, cls) {
                return el("div", { class: "steer-col " + cls }, [el("p", { class: "muted" }, [title]), el("pre", { class: "steer-text" }, [text])]);
              };
              var moved = function (rows) {
                return el("ul", { class: "abl-tokens" }, rows.map(function (r) {
                  return el("li", {}, [el("span", { class: "tok plain" }, [r[0]]), " " + fmt(r[1]) + " \u2192 " + fmt(r[2])]); }));
              };
              out.appendChild(el("div", { class: "steer-cols" }, [col("without", j.clean, "steer-clean"),
                col("feature " + ctx.i + " clamped to " + fmt(j.value), j.edited, "steer-edited")]));
              out.appendChild(el("p", { class: "muted" }, ["next token after the prompt: KL " + fmt(j.kl) + " nats; raised most:"]));
              out.appendChild(moved(j.up));
              out.appendChild(el("p", { class: "muted" }, ["lowered most:"]));
              out.appendChild(moved(j.down));
              status.textContent = (j.prompt_cut ? "the prompt's last " : "") + j.prompt_tokens + " prompt tokens; " + j.new_tokens +
                " sampled (temperature 1, top-p 0.9, the same draws in both)";
            })
            .catch(function (err) { status.textContent = "error: " + err.message; });
        });
        return el("div", {}, [prompt, el("div", { class: "steer-row" }, ["clamp value ", value, " ", shown, " ", go, " ", status]), out]);
      } },
    { id: "links", title: "Related features", render: function (ctx) {
      var L = (ctx.f && ctx.f.links) || {}, out = el("div", {});
      Object.keys(L.family || {}).forEach(function (b) {
        out.appendChild(el("p", {}, ["nearest in " + b + " (decoder cosine): "].concat([].concat.apply([], L.family[b].map(function (p, k) {
          return [k ? ", " : "", featureLink(ctx, b, p[0]), " (" + fmt(p[1]) + ")"]; })))));
      });
      var u = L.universality, uinfo = ctx.unit.universality;
      if (u && uinfo) {
        var label = "run B " + uinfo.unit_b + "/" + u.feature;
        // run B's site is a file beside this one: linked from disk, named when served (the server
        // serves this run's site only)
        out.appendChild(el("p", {}, ["universality: best match ", uinfo.site_b && location.protocol === "file:" ?
          el("a", { href: uinfo.site_b + "#" + M.hashOf({ sae: uinfo.unit_b, feature: u.feature }) }, [label]) : el("b", {}, [label]),
          " (activation correlation " + fmt(u.corr) + ")"]));
      }
      if (!out.firstChild) out.appendChild(el("p", { class: "empty" }, ["No family across widths (the run has one dictionary) and no universality match (python -m monojax.analyze --compare)."]));
      return out;
    } },
    { id: "top", title: "Top activations", wide: true, below: true, render: function (ctx) {
      var g = groups(ctx, function (n) { return n === "top"; });
      return g.length ? exampleGroup(ctx, g[0]) : null;
    } },
    { id: "intervals", title: "Subsample intervals", wide: true, below: true, render: function (ctx) {
      var gs = groups(ctx, function (n) { return n.indexOf("interval") === 0; });
      if (!gs.length) return el("p", { class: "empty" }, ["Too few activations to sample intervals."]);
      var box = el("div", {}, [el("p", { class: "muted" }, ["interval k holds activations in ((10 − k)/10, (11 − k)/10] × the max"])]);
      gs.forEach(function (g) { box.appendChild(exampleGroup(ctx, g)); });
      return box;
    } },
    { id: "bottom", title: "Bottom activations", wide: true, below: true, render: function (ctx) {
      var g = groups(ctx, function (n) { return n === "bottom"; });
      return g.length ? exampleGroup(ctx, g[0]) : el("p", { class: "empty" }, ["No bottom examples."]);
    } },
  ];
})();
