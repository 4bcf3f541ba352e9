/* SAE feature browser: the index page (index.html) and the latent page (latent.html?id=N).
 *
 * Plain script, no build step, no network: the data are script files (data/index.js sets
 * window.LOS_INDEX, data/latents/<id>.js sets window.LOS_LATENT), so the pages work from file://
 * as well as over HTTP. The format is described in sae/evaluation/browse_features.py. */
(function () {
  "use strict";

  var TYPE_LABELS = {image: "image", text_in_context: "text in context", text_only: "text alone"};
  var TYPE_COLORS = {image: "#d9480f", text_in_context: "#1971c2", text_only: "#2f9e44"};

  function $(id) { return document.getElementById(id); }

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
    });
  }

  /* A vocabulary token as text: SentencePiece's word marker is a space, byte tokens are spelled out. */
  function tokenText(tok) {
    if (tok === "<0x0A>") return "\u21b5";
    if (tok === "<0x09>") return "\u21e5";
    return String(tok).replace(/\u2581/g, " ");
  }

  function fmt(x) {
    if (x === null || x === undefined) return "";
    if (x === 0) return "0";
    var a = Math.abs(x);
    if (a >= 1e4 || a < 1e-3) return x.toExponential(2);
    return String(parseFloat(x.toPrecision(3)));
  }

  function message(text) {
    var el = $("message");
    el.textContent = text;
    el.hidden = false;
  }

  function decode(b64) {
    var bin = atob(b64 || ""), out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  function typeLabel(t) { return TYPE_LABELS[t] || t.replace(/_/g, " "); }

  /* ------------------------------------------------------------------ index page */

  function indexPage() {
    var D = window.LOS_INDEX;
    if (!D) {
      message("data/index.js is missing or did not load: this folder is not a feature-browser site.");
      return;
    }
    var meta = D.meta, C = D.columns, n = C.id.length;
    var types = meta.token_types || ["image", "text_in_context", "text_only"];
    var th = meta.thresholds || {image_only: 0.9, text_only: 0.1};

    document.title = meta.title || "SAE feature browser";
    $("title").textContent = meta.title || "SAE feature browser";
    var counts = types.map(function (t) { return (meta.n_tokens || {})[t] + " " + typeLabel(t); }).join(", ");
    $("meta").textContent = "model " + meta.model + ", layer " + meta.layer + ", " + meta.d_sae + " latents (" +
      meta.activation + "), " + n + " live, " + (D.dead || []).length + " dead; " + meta.n_records +
      " records" + (meta.n_skipped ? " (" + meta.n_skipped + " skipped)" : "") + "; tokens: " + counts;

    // Per-latent search text: its top tokens, lower case, word markers as spaces.
    var vocab = D.vocab || [];
    var topText = new Array(n), topHtml = new Array(n);
    for (var i = 0; i < n; i++) {
      var toks = (C.top_tokens[i] || []).map(function (v) { return tokenText(vocab[v]); });
      topText[i] = toks.join("\u0000").toLowerCase();
      topHtml[i] = toks.map(function (t) { return '<span class="tok">' + esc(t) + "</span>"; }).join(" ");
    }
    var rowOf = {};
    for (i = 0; i < n; i++) rowOf[C.id[i]] = i;

    // Classes (steering pairs, probe classes) -> the rows of their top latents.
    var classes = {};
    var groups = D.classes || {};
    Object.keys(groups).forEach(function (group) {
      Object.keys(groups[group]).forEach(function (name) {
        var rows = (classes[name.toLowerCase()] = classes[name.toLowerCase()] || []);
        groups[group][name].forEach(function (pair) {
          if (pair[0] in rowOf && rows.indexOf(rowOf[pair[0]]) < 0) rows.push(rowOf[pair[0]]);
        });
      });
    });
    var classNames = Object.keys(groups).reduce(function (acc, g) { return acc.concat(Object.keys(groups[g])); }, []);
    $("class-names").innerHTML = classNames.map(function (c) { return '<option value="' + esc(c) + '">'; }).join("");
    if (classNames.length) {
      var box = $("classes");
      box.innerHTML = "classes: " + classNames.map(function (c) {
        return '<button type="button" class="chip" data-class="' + esc(c) + '">' + esc(c) + "</button>";
      }).join(" ");
      box.hidden = false;
      box.addEventListener("click", function (ev) {
        var c = ev.target.getAttribute("data-class");
        if (c !== null) { $("search").value = c; state.page = 0; update(); }
      });
    }

    drawModalityHistogram($("modality-hist"), C.modality, th);

    // Columns of the table: [key in columns (also data-sort), header, numeric].
    var cols = [["id", "id"], ["freq", "freq"]];
    types.forEach(function (t) { cols.push(["freq_" + t, "freq " + typeLabel(t)]); });
    cols.push(["max", "max"], ["mean", "mean"], ["modality", "modality"]);
    $("latents-head").innerHTML = cols.map(function (c) {
      return '<th data-sort="' + c[0] + '" title="sort by ' + esc(c[1]) + '">' + esc(c[1]) + "</th>";
    }).join("") + "<th>top tokens</th>";

    var state = {key: "id", desc: false, page: 0};
    var order = [];

    function matches(q) {
      var trimmed = q.trim();
      if (!trimmed) return null;
      if (/^\d+$/.test(trimmed)) return trimmed in rowOf ? [rowOf[trimmed]] : [];
      var cls = classes[trimmed.toLowerCase()];
      if (cls) return cls.slice();
      var needle = q.replace(/\u2581/g, " ").toLowerCase(), out = [];
      for (var r = 0; r < n; r++) if (topText[r].indexOf(needle) >= 0) out.push(r);
      return out;
    }

    function keep(r, filter) {
      var m = C.modality[r];
      if (filter === "image_only") return m >= th.image_only;
      if (filter === "text_only") return m <= th.text_only;
      if (filter === "shared") return m > th.text_only && m < th.image_only;
      return true;
    }

    function update() {
      var filter = $("filter").value;
      var found = matches($("search").value), rows = [];
      if (found === null) { for (var r = 0; r < n; r++) if (keep(r, filter)) rows.push(r); }
      else rows = found.filter(function (r) { return keep(r, filter); });
      var v = C[state.key], sign = state.desc ? -1 : 1;
      rows.sort(function (a, b) { return (v[a] - v[b]) * sign || C.id[a] - C.id[b]; });
      order = rows;
      render();
    }

    function render() {
      var size = $("page-size").value === "all" ? order.length || 1 : parseInt($("page-size").value, 10);
      var pages = Math.max(1, Math.ceil(order.length / size));
      state.page = Math.min(Math.max(state.page, 0), pages - 1);
      var start = state.page * size, stop = Math.min(order.length, start + size);
      var html = [];
      for (var k = start; k < stop; k++) {
        var r = order[k], id = C.id[r], cells = ['<td><a href="latent.html?id=' + id + '">' + id + "</a></td>"];
        for (var c = 1; c < cols.length; c++) cells.push("<td>" + fmt(C[cols[c][0]][r]) + "</td>");
        cells.push('<td class="tokens">' + topHtml[r] + "</td>");
        html.push('<tr class="latent-row" data-id="' + id + '">' + cells.join("") + "</tr>");
      }
      $("latents").tBodies[0].innerHTML = html.join("");
      $("count").textContent = order.length + " of " + n + " live latents";
      $("page").textContent = "page " + (state.page + 1) + " of " + pages;
      $("prev").disabled = state.page === 0;
      $("next").disabled = state.page >= pages - 1;
      var heads = $("latents-head").querySelectorAll("th[data-sort]");
      for (var h = 0; h < heads.length; h++) {
        var key = heads[h].getAttribute("data-sort");
        heads[h].className = key === state.key ? (state.desc ? "sorted desc" : "sorted asc") : "";
      }
      var hash = "q=" + encodeURIComponent($("search").value) + "&filter=" + $("filter").value + "&sort=" + state.key +
        "&desc=" + (state.desc ? 1 : 0) + "&size=" + $("page-size").value + "&page=" + state.page;
      if (window.history && history.replaceState) history.replaceState(null, "", "#" + hash);
    }

    // Restore the view from the URL hash (coming back from a latent page).
    var saved = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var p = kv.split("=");
      if (p.length === 2) saved[p[0]] = decodeURIComponent(p[1]);
    });
    if (saved.q) $("search").value = saved.q;
    if (saved.filter && $("filter").querySelector('option[value="' + saved.filter + '"]')) $("filter").value = saved.filter;
    if (saved.size && $("page-size").querySelector('option[value="' + saved.size + '"]')) $("page-size").value = saved.size;
    if (saved.sort && C[saved.sort] && cols.some(function (c) { return c[0] === saved.sort; })) state.key = saved.sort;
    state.desc = saved.desc === "1";
    state.page = parseInt(saved.page || "0", 10) || 0;

    $("latents-head").addEventListener("click", function (ev) {
      var key = ev.target.getAttribute("data-sort");
      if (!key) return;
      // A new column starts descending for the statistics (largest first), ascending for the id.
      if (key === state.key) state.desc = !state.desc;
      else { state.key = key; state.desc = key !== "id"; }
      state.page = 0;
      update();
    });
    $("search").addEventListener("input", function () { state.page = 0; update(); });
    $("filter").addEventListener("change", function () { state.page = 0; update(); });
    $("page-size").addEventListener("change", function () { state.page = 0; render(); });
    $("prev").addEventListener("click", function () { state.page--; render(); });
    $("next").addEventListener("click", function () { state.page++; render(); });

    idList($("dense"), "dense latents", "fire on more than " + fmt(100 * (th.dense || 0)) + "% of tokens",
      D.dense || [], true);
    idList($("dead"), "dead latents", "never fired on the harvested tokens", D.dead || [], false);

    $("overview").hidden = false;
    $("controls").hidden = false;
    $("latents").hidden = false;
    update();
  }

  /* A <details> listing latent ids (links when they have pages), filled when first opened if long. */
  function idList(section, title, note, ids, links) {
    section.hidden = false;
    var many = ids.length > 100;
    var details = document.createElement("details");
    details.innerHTML = "<summary>" + ids.length + " " + esc(title) + " <span class=\"note\">(" + esc(note) +
      ")</span></summary><p class=\"ids\"></p>";
    section.appendChild(details);
    function fill() {
      var p = details.querySelector(".ids");
      if (p.childNodes.length) return;
      p.innerHTML = ids.map(function (id) {
        return links ? '<a href="latent.html?id=' + id + '">' + id + "</a>" : String(id);
      }).join(" ");
    }
    details.addEventListener("toggle", function () { if (details.open) fill(); });
    if (!many && ids.length) { details.open = true; fill(); }
  }

  var SVG = "http://www.w3.org/2000/svg";

  function svgEl(name, attrs, text) {
    var el = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { el.setAttribute(k, attrs[k]); });
    if (text !== undefined) el.textContent = text;
    return el;
  }

  /* 20 bins over [0, 1], coloured by the text-only / shared / image-only regions. */
  function drawModalityHistogram(box, values, th) {
    var bins = 20, counts = new Array(bins).fill(0);
    values.forEach(function (m) { counts[Math.min(bins - 1, Math.max(0, Math.floor(m * bins)))]++; });
    var W = 420, H = 110, pad = 18, bw = (W - 2 * pad) / bins, top = Math.max.apply(null, counts) || 1;
    var svg = svgEl("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H, "class": "hist", id: "modality-svg"});
    counts.forEach(function (c, b) {
      var lo = b / bins, h = (H - 2 * pad) * c / top;
      var fill = lo + 1 / bins <= th.text_only + 1e-9 ? TYPE_COLORS.text_only
        : lo >= th.image_only - 1e-9 ? TYPE_COLORS.image : "#868e96";
      var rect = svgEl("rect", {x: pad + b * bw + 0.5, y: H - pad - h, width: Math.max(bw - 1, 1), height: h,
        fill: fill, "class": "bar", "data-count": c});
      rect.appendChild(svgEl("title", {}, "[" + lo.toFixed(2) + ", " + (lo + 1 / bins).toFixed(2) + "): " + c));
      svg.appendChild(rect);
    });
    svg.appendChild(svgEl("line", {x1: pad, x2: W - pad, y1: H - pad, y2: H - pad, stroke: "#495057"}));
    [[0, "start"], [0.5, "middle"], [1, "end"]].forEach(function (t) {
      svg.appendChild(svgEl("text", {x: pad + t[0] * (W - 2 * pad), y: H - 4, "text-anchor": t[1]}, String(t[0])));
    });
    svg.appendChild(svgEl("text", {x: pad, y: 12}, "max " + top));
    box.appendChild(svg);
  }

  /* ------------------------------------------------------------------ latent page */

  function latentPage() {
    var m = /[?&]id=([^&#]*)/.exec(location.search);
    var raw = m ? decodeURIComponent(m[1]) : "";
    $("goto").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var v = $("goto-id").value.trim();
      if (/^\d+$/.test(v)) location.href = "latent.html?id=" + v;
    });
    if (!/^\d+$/.test(raw)) {
      message(raw ? "\"" + raw + "\" is not a latent id" : "no latent id given: open latent.html?id=N");
      return;
    }
    var id = String(parseInt(raw, 10));
    $("title").textContent = "latent " + id;
    document.title = "latent " + id;
    var script = document.createElement("script");
    script.src = "data/latents/" + id + ".js";
    script.onload = function () {
      if (!window.LOS_LATENT) { message("data/latents/" + id + ".js did not define the latent"); return; }
      renderLatent(window.LOS_LATENT);
    };
    script.onerror = function () { message("latent " + id + " has no page (dead latent?)"); };
    document.head.appendChild(script);
  }

  /* Images name a token layout shared within the page (L.layouts[i]: the grids' name, box, shape) and carry
     one heat string per grid of it; expand them to im.grids = [{name, box, shape, heat}]. */
  function expandGrids(L) {
    (L.images || []).forEach(function (im) {
      im.grids = ((L.layouts || [])[im.layout] || []).map(function (g, i) {
        return {name: g.name, box: g.box, shape: g.shape, heat: (im.heat || [])[i] || ""};
      });
    });
  }

  function renderLatent(L) {
    expandGrids(L);
    var S = L.stats || {};
    $("title").textContent = "latent " + L.id + (L.layer !== undefined ? " (layer " + L.layer + ")" : "");
    var types = Object.keys((L.histogram || {}).counts || {});
    if (!types.length) types = ["image", "text_in_context", "text_only"];
    var rows = [["modality score", S.modality], ["max activation", S.max], ["mean when firing", S.mean],
      ["firing frequency", S.freq]];
    types.forEach(function (t) { if (("freq_" + t) in S) rows.push(["frequency on " + typeLabel(t), S["freq_" + t]]); });
    $("stats").innerHTML = rows.map(function (r) {
      return "<tr><th>" + esc(r[0]) + "</th><td>" + fmt(r[1]) + "</td></tr>";
    }).join("");

    renderImages(L.images || []);
    renderTexts(L.texts || [], S.max);
    renderHistograms(L.histogram, types);
    renderVocab($("promoted"), (L.logits || {}).promoted || []);
    renderVocab($("suppressed"), (L.logits || {}).suppressed || []);
    var cos = L.cosines || {}, anyCos = false;
    ["steering", "probes"].forEach(function (k) {
      var list = cos[k] || [];
      $(k + "-box").hidden = !list.length;
      anyCos = anyCos || list.length > 0;
      $(k).innerHTML = list.map(function (p) {
        return "<tr><td>" + esc(p[0]) + "</td><td>" + fmt(p[1]) + "</td></tr>";
      }).join("");
    });
    $("cosines-section").hidden = !anyCos;
    $("latent").hidden = false;
  }

  function renderVocab(list, pairs) {
    list.innerHTML = pairs.map(function (p) {
      return '<li><span class="tok">' + esc(tokenText(p[0])) + "</span> <span class=\"val\">" + fmt(p[1]) +
        "</span></li>";
    }).join("") || "<li class=\"note\">none</li>";
  }

  /* Top images: thumbnail + the selected grids' heat, one canvas each. */
  function renderImages(images) {
    var box = $("images");
    if (!images.length) { box.innerHTML = '<p class="note">no image token activates this latent</p>'; return; }
    var names = [];
    images.forEach(function (im) {
      (im.grids || []).forEach(function (g) { if (names.indexOf(g.name) < 0) names.push(g.name); });
    });
    var current = names.indexOf("crops") >= 0 ? "crops" : names[0];
    var toggle = $("grid-toggle");
    if (names.length > 1) {
      toggle.innerHTML = "grid: " + names.map(function (nm) {
        return '<label><input type="radio" name="grid" value="' + esc(nm) + '"' + (nm === current ? " checked" : "") +
          "> " + esc(nm) + "</label>";
      }).join(" ");
      toggle.hidden = false;
      toggle.addEventListener("change", function (ev) {
        current = ev.target.value;
        items.forEach(draw);
      });
    }
    var items = images.map(function (im) {
      var fig = document.createElement("figure");
      fig.className = "image";
      var canvas = document.createElement("canvas");
      canvas.className = "heatmap";
      canvas.title = "click to enlarge";
      canvas.addEventListener("click", function () { fig.classList.toggle("large"); });
      var cap = document.createElement("figcaption");
      cap.innerHTML = '<span class="val">' + fmt(im.value) + "</span> <span class=\"rec\">#" + esc(im.record) +
        "</span> " + esc(im.caption || "");
      fig.appendChild(canvas);
      fig.appendChild(cap);
      box.appendChild(fig);
      var item = {im: im, canvas: canvas, img: null};
      var img = new Image();
      img.onload = function () { item.img = img; draw(item); };
      img.onerror = function () { item.img = null; draw(item); };
      img.src = im.thumb;
      return item;
    });

    function draw(item) {
      var c = item.canvas, ctx = c.getContext("2d"), img = item.img;
      c.width = img ? img.naturalWidth : 224;
      c.height = img ? img.naturalHeight : 224;
      if (img) ctx.drawImage(img, 0, 0);
      else { ctx.fillStyle = "#dee2e6"; ctx.fillRect(0, 0, c.width, c.height); }
      // Every grid of the selected name: one per tile where a family's tiles are cut apart (Idefics3, OneVision).
      var grids = (item.im.grids || []).filter(function (g) { return g.name === current; });
      var cells = 0;
      grids.forEach(function (grid) {
        var heat = decode(grid.heat), rows = grid.shape[0], ncol = grid.shape[1], box = grid.box;
        var x0 = box[0] * c.width, y0 = box[1] * c.height;
        var cw = (box[2] - box[0]) * c.width / ncol, ch = (box[3] - box[1]) * c.height / rows;
        for (var r = 0; r < rows; r++) {
          for (var q = 0; q < ncol; q++) {
            var h = heat[r * ncol + q];
            if (!h) continue;
            ctx.fillStyle = "rgba(255, 80, 0, " + (0.15 + 0.65 * h / 255).toFixed(3) + ")";
            ctx.fillRect(x0 + q * cw, y0 + r * ch, cw, ch);
            cells++;
          }
        }
        ctx.strokeStyle = "rgba(255, 255, 255, 0.6)";
        ctx.strokeRect(x0 + 0.5, y0 + 0.5, (box[2] - box[0]) * c.width - 1, (box[3] - box[1]) * c.height - 1);
      });
      c.setAttribute("data-grid", grids.length ? current : "");
      c.setAttribute("data-heat-cells", String(cells));
    }
  }

  /* Top text contexts: every token shaded by its activation, the peak outlined. */
  function renderTexts(texts, max) {
    var box = $("texts");
    if (!texts.length) { box.innerHTML = '<p class="note">no text token activates this latent</p>'; return; }
    box.innerHTML = texts.map(function (t) {
      var acts = decode(t.acts), label = t.type === "text_only" ? "alone" : "in context";
      var spans = (t.tokens || []).map(function (tok, k) {
        var a = acts[k] || 0, cls = k === t.peak ? "t peak" : "t";
        var style = a ? ' style="background: rgba(255, 80, 0, ' + (a / 255).toFixed(3) + ')"' : "";
        return '<span class="' + cls + '"' + style + ' title="' + fmt(a / 255 * (max || 1)) + '">' +
          esc(tokenText(tok)) + "</span>";
      }).join("");
      return '<div class="context ' + esc(t.type) + '"><div class="ctx-head"><span class="label">' + label +
        '</span> <span class="val">' + fmt(t.value) + '</span> <span class="rec">#' + esc(t.record) +
        '</span></div><div class="tokens">' + spans + "</div></div>";
    }).join("");
  }

  /* One small bar chart per token type over the shared log-spaced edges; bar height ~ log(1 + count). */
  function renderHistograms(hist, types) {
    var box = $("histograms");
    if (!hist || !hist.edges || hist.edges.length < 2) { box.innerHTML = '<p class="note">no histogram</p>'; return; }
    var edges = hist.edges, B = edges.length - 1, W = 260, H = 90, pad = 16, bw = (W - 2 * pad) / B;
    var top = 1;
    types.forEach(function (t) { (hist.counts[t] || []).forEach(function (c) { top = Math.max(top, c); }); });
    types.forEach(function (t) {
      var counts = hist.counts[t] || [], total = counts.reduce(function (a, b) { return a + b; }, 0);
      var fig = document.createElement("figure");
      fig.className = "histogram";
      var svg = svgEl("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H, "class": "hist",
        "data-type": t});
      counts.forEach(function (c, b) {
        var h = (H - 2 * pad) * Math.log1p(c) / Math.log1p(top);
        var rect = svgEl("rect", {x: pad + b * bw + 0.25, y: H - pad - h, width: Math.max(bw - 0.5, 0.5), height: h,
          fill: TYPE_COLORS[t] || "#495057", "class": "bar"});
        rect.appendChild(svgEl("title", {}, "[" + fmt(edges[b]) + ", " + fmt(edges[b + 1]) + "): " + c));
        svg.appendChild(rect);
      });
      svg.appendChild(svgEl("line", {x1: pad, x2: W - pad, y1: H - pad, y2: H - pad, stroke: "#495057"}));
      svg.appendChild(svgEl("text", {x: pad, y: H - 3, "text-anchor": "start"}, fmt(edges[0])));
      svg.appendChild(svgEl("text", {x: W - pad, y: H - 3, "text-anchor": "end"}, fmt(edges[B])));
      fig.appendChild(svg);
      var cap = document.createElement("figcaption");
      cap.textContent = typeLabel(t) + ": " + total + " firing tokens (log count, log-spaced activations)";
      fig.appendChild(cap);
      box.appendChild(fig);
    });
  }

  var page = document.body.getAttribute("data-page");
  if (page === "index") indexPage();
  else if (page === "latent") latentPage();
})();
