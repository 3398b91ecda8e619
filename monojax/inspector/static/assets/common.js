// monojax inspector: what both pages share. No library, no network: data files are scripts that
// call monojax.data(key, payload) (file:// pages may not fetch()), payload = base64(gzip(JSON)).
// Corpus text is untrusted: it only ever reaches the page through textContent or setAttribute,
// never innerHTML.
"use strict";
(function () {
  var waiting = {};   // key -> [resolve, reject] of a load in flight
  var cache = {};     // key -> Promise of the decoded object
  var recent = [];    // feature keys, oldest first: at most KEEP stay cached (a long session's memory)
  var KEEP = 64;

  function unpack(b64) {
    var bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Response(stream).text().then(JSON.parse);
  }

  var M = window.monojax = {
    site: null, vocab: null,

    // Called by each data file.
    data: function (key, payload) {
      var w = waiting[key];
      if (!w) return;
      delete waiting[key];
      unpack(payload).then(w[0], w[1]);
    },

    // The object of data/<key>.js, loaded once.
    load: function (key) {
      if (cache[key]) return cache[key];
      cache[key] = new Promise(function (resolve, reject) {
        waiting[key] = [resolve, reject];
        var s = document.createElement("script");
        s.src = "data/" + key + ".js";
        s.onerror = function () {
          delete waiting[key]; delete cache[key];
          reject(new Error("missing data file data/" + key + ".js (rebuild: python -m monojax.inspect build)"));
        };
        s.onload = function () { s.remove(); };
        document.head.appendChild(s);
      });
      if (key.indexOf("/f/") >= 0 || key.indexOf("samples/") === 0) {
        recent.push(key);
        if (recent.length > KEEP) delete cache[recent.shift()];
      }
      return cache[key];
    },

    // site.js and vocab.js, then the page's own start.
    start: function (main) {
      Promise.all([M.load("site"), M.load("vocab")]).then(function (r) {
        M.site = r[0]; M.vocab = r[1];
        var info = document.getElementById("run-info");
        if (info) info.textContent = M.site.run + " · step " + M.site.step + " · " +
          M.fmtInt(M.site.n_tokens) + " tokens of the " + (M.site.source.split || "?") + " split";
        return main();
      }).catch(M.fail);
    },

    // Marks the page drawn: body[data-ready] (tests wait on it) and window.monojaxReadyAt (ms since
    // navigation, benchmarks/inspector.py) once the browser has painted the frame with the change.
    // Resolves then, so work below the fold can follow without delaying the first paint.
    // attr "data-complete" (window.monojaxCompleteAt): the feature's last panels are drawn too.
    ready: function (what, attr) {
      return new Promise(function (resolve) {
        requestAnimationFrame(function () {
          setTimeout(function () {
            window[attr === "data-complete" ? "monojaxCompleteAt" : "monojaxReadyAt"] = performance.now();
            document.body.setAttribute(attr || "data-ready", what);
            resolve();
          }, 0);
        });
      });
    },

    fail: function (err) {
      var box = document.getElementById("load-error");
      if (box) { box.hidden = false; box.textContent = String(err && err.message || err); }
      if (window.console) console.error(err);
    },

    // DOM: el("div", {class: "x", title: t}, [children or strings]). Strings become text nodes.
    el: function (tag, attrs, children) {
      var e = document.createElement(tag);
      for (var k in attrs || {}) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) continue;
        if (k === "text") e.textContent = v;
        else if (k.slice(0, 2) === "on") e.addEventListener(k.slice(2), v);
        else e.setAttribute(k, v === true ? "" : String(v));
      }
      (children || []).forEach(function (c) {
        if (c === null || c === undefined || c === false) return;
        e.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
      });
      return e;
    },
    svg: function (tag, attrs) {
      var e = document.createElementNS("http://www.w3.org/2000/svg", tag);
      for (var k in attrs || {}) if (attrs[k] !== null && attrs[k] !== undefined) e.setAttribute(k, String(attrs[k]));
      return e;
    },
    clear: function (e) { while (e.firstChild) e.removeChild(e.firstChild); return e; },

    // Numbers: 3 significant digits, exponent form outside [1e-3, 1e5).
    fmt: function (x, digits) {
      if (x === null || x === undefined || !isFinite(x)) return "—";
      digits = digits || 3;
      if (x === 0) return "0";
      var a = Math.abs(x);
      if (a < 1e-3 || a >= 1e5) return x.toExponential(digits - 1);
      return String(Number(x.toPrecision(digits)));
    },
    fmtInt: function (n) { return n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"); },
    pct: function (d) {
      if (d === null || d === undefined || !isFinite(d)) return "—";
      return d === 0 ? "0 %" : M.fmt(d * 100) + " %";
    },
    oneIn: function (d) { return d > 0 ? "1 in " + M.fmtInt(Math.round(1 / d)) + " tokens" : "never"; },

    // A token's display string (control characters already shown as escapes by the build).
    tok: function (id) { return id >= 0 && M.vocab && id < M.vocab.length ? M.vocab[id] : ""; },

    // The paper's activation colour: orange, opacity by activation / max.
    actColor: function (a, max) {
      if (!(a > 0) || !(max > 0)) return "";
      var t = Math.min(1, a / max);
      return "rgba(255, 140, 0, " + (0.12 + 0.78 * t).toFixed(3) + ")";
    },
    POS: "#2b6cb0", NEG: "#c53030",

    // URL state lives in the hash (works on file://): #sae=sae0&feature=12&order=density&q=...
    getHash: function () {
      var h = location.hash.replace(/^#/, ""), out = {};
      var legacy = /^feature-(\d+)$/.exec(h);   // the paper's #feature-N
      if (legacy) return { feature: legacy[1] };
      h.split("&").forEach(function (kv) {
        if (!kv) return;
        var i = kv.indexOf("=");
        try {
          out[decodeURIComponent(i < 0 ? kv : kv.slice(0, i))] = i < 0 ? "" : decodeURIComponent(kv.slice(i + 1).replace(/\+/g, " "));
        } catch (e) { /* a malformed escape: ignore that pair */ }
      });
      return out;
    },
    hashOf: function (state) {
      return Object.keys(state).filter(function (k) {
        return state[k] !== null && state[k] !== undefined && state[k] !== "";
      }).map(function (k) { return encodeURIComponent(k) + "=" + encodeURIComponent(state[k]); }).join("&");
    },
    setHash: function (state, replace) {
      var h = "#" + M.hashOf(state);
      if (h === location.hash || (h === "#" && !location.hash)) return;
      if (replace) history.replaceState(null, "", h); else history.pushState(null, "", h);
    },

    unitInfo: function (name) {
      var us = M.site.units;
      for (var i = 0; i < us.length; i++) if (us[i].name === name) return us[i];
      return null;
    },
    defaultUnit: function () {
      var us = M.site.units;
      for (var i = 0; i < us.length; i++) if (us[i].kind === "sae") return us[i].name;
      return us[0].name;
    },
    unitLabel: function (u) {
      return u.kind === "neurons" ? "MLP neurons (" + u.width + ")" : u.name + " · " + u.label;
    },
    fillUnits: function (select, current) {
      M.clear(select);
      M.site.units.forEach(function (u) {
        select.appendChild(M.el("option", { value: u.name, selected: u.name === current }, [M.unitLabel(u)]));
      });
    },

    // The same label from a feature's own file (its top examples' tokens, as the build lists them).
    featureLabel: function (f) {
      // (the offline baseline's sentence is a token list: the top tokens say it better)
      if (f.autointerp && f.autointerp.explanation && !f.autointerp.baseline) return String(f.autointerp.explanation);
      var C = M.site.window[0], seen = [];
      var top = f.groups.filter(function (g) { return g.name === "top"; })[0];
      (top ? top.ex : []).forEach(function (e) { var t = e[4][C]; if (t >= 0 && seen.indexOf(t) < 0 && seen.length < 3) seen.push(t); });
      return seen.map(function (id) { return "\u201c" + M.tok(id) + "\u201d"; }).join(" ");
    },

    // A feature's one-line label: its explanation when a model explained it, else its top tokens.
    label: function (index, i) {
      if (index.explanation && index.explanation[i] && !(index.explanation_baseline || [])[i]) return index.explanation[i];
      var t = (index.top_tokens[i] || []).map(function (id) { return "\u201c" + M.tok(id) + "\u201d"; });
      return t.length ? t.join(" ") : "";
    },
  };
  // Every page needs these two: ask for them as soon as this script runs.
  M.load("site").catch(function () {});
  M.load("vocab").catch(function () {});
})();
