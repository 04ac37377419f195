"use strict";
(async function () {
  const $ = (id) => document.getElementById(id);
  // the owner's token, from the link `mriflow app` printed; without it the server answers 403 and says why
  const token = new URLSearchParams(location.search).get("token") || "";
  const query = "?token=" + encodeURIComponent(token);
  const response = await fetch("/api/turing/results" + query);
  const r = await response.json();
  if (!response.ok) {
    $("headline").textContent = r.detail || response.statusText;
    $("csv").hidden = true;
    document.body.dataset.ready = "1";
    return;
  }
  $("csv").href = "/api/turing/answers.csv" + query;
  const pct = (x) => (x === null || x === undefined) ? "–" : (100 * x).toFixed(1) + " %";
  const o = r.overall;
  $("headline").innerHTML = o.n
    ? `<div class="big-number" id="accuracy">${pct(o.accuracy)}</div>` +
      `<div>accuracy over <span id="n">${o.n}</span> answers, 95 % interval <span id="ci">${pct(o.ci_low)} – ${pct(o.ci_high)}</span>` +
      ` (binomial test against chance: p = ${o.p_chance.toPrecision(2)})</div>` +
      `<div class="hint" id="anchor">${r.anchor.text}; chance is 50 %.</div>`
    : `<div id="accuracy">no answers yet</div><div class="hint" id="anchor">${r.anchor.text}</div>`;
  $("method").textContent = `Interval: ${r.interval}. Items per class: ${r.items.real} real, ${r.items.synthetic} synthetic.` +
    (r.mean_confidence ? ` Mean confidence ${r.mean_confidence.toFixed(2)} of 5.` : "");
  function track(s) {
    if (!s.n) return "";
    return `<div class="track"><div class="mark" style="left:50%"></div><div class="anchor" style="left:${100 * r.anchor.accuracy}%"></div>` +
      `<div class="ci" style="left:${100 * s.ci_low}%;width:${100 * (s.ci_high - s.ci_low)}%"></div>` +
      `<div class="dot" style="left:calc(${100 * s.accuracy}% - 2px)"></div></div>`;
  }
  const rows = [["all answers", o], ["real volumes", r.per_class.real], ["synthetic volumes", r.per_class.synthetic],
                ...Object.entries(r.per_rater).map(([name, s]) => ["rater " + name, s])];
  $("table").innerHTML = "<tr><th></th><th>answers</th><th>correct</th><th>accuracy</th><th>95 % interval</th><th>0 – 100 %</th></tr>" +
    rows.map(([name, s]) => `<tr><td>${name.replace(/</g, "&lt;")}</td><td class="num">${s.n}</td><td class="num">${s.correct}</td>` +
      `<td class="num">${pct(s.accuracy)}</td><td class="num">${s.n ? pct(s.ci_low) + " – " + pct(s.ci_high) : "–"}</td><td>${track(s)}</td></tr>`).join("");
  document.body.dataset.ready = "1";
})();
