// The generate-and-view page: two requests side by side, linked cursors, a difference view, downloads.
"use strict";
(async function () {
  const $ = (id) => document.getElementById(id);
  const V = window.mriflowViewer;
  const state = { A: null, B: null };   // the finished job of each side
  const config = await (await fetch("/api/config")).json();
  if (config.turing) $("turing-link").hidden = false;
  const model = config.generate;
  $("model-line").textContent = `model ${model.model_id} (${model.stage}), grid ${model.image_shape.join("×")}`;

  // ---- controls from the model's covariate schema
  for (const solver of model.solvers) $("solver").add(new Option(solver, solver, false, solver === model.defaults.solver));
  $("steps").value = model.defaults.steps;
  $("guidance").value = model.defaults.guidance;
  if (model.guidance_fixed) {  // a few-step student draws its teacher's guidance; the server refuses another
    $("guidance").disabled = true;
    $("guidance").title = "this model takes no other guidance (a few-step student learned its teacher's)";
  }
  const presets = { A: {}, B: {} };
  for (const c of model.covariates) {
    if (c.name === "age" && c.kind === "continuous") { presets.A.age = Math.max(c.minimum, 30); presets.B.age = Math.min(c.maximum, 80); }
  }
  for (const side of ["A", "B"]) {
    const box = $("covariates-" + side);
    for (const c of model.covariates) {
      const label = document.createElement("label");
      const id = `cov-${side}-${c.name}`;
      if (c.kind === "continuous") {
        // the slider spans the training range; the number box beside it takes an exact value
        const value = presets[side][c.name] ?? c.mean;
        label.innerHTML = `${c.name} <input type="range" id="${id}" min="${c.minimum}" max="${c.maximum}" step="any" value="${value}">` +
          `<input type="number" id="${id}-v" min="${c.minimum}" max="${c.maximum}" step="any">` +
          ` <span class="hint">(trained ${fmt(c.minimum)}–${fmt(c.maximum)})</span>`;
        box.appendChild(label);
        const input = $(id), number = $(id + "-v");
        input.addEventListener("input", () => { number.value = round(c, +input.value); });
        number.addEventListener("input", () => { input.value = number.value; });
        number.value = round(c, value);
      } else {
        label.innerHTML = `${c.name} <select id="${id}"><option value="">(any)</option>` +
          c.categories.map((k) => `<option value="${k}">${k}</option>`).join("") + `</select>`;
        box.appendChild(label);
      }
    }
  }
  function round(c, x) {  // one decimal for ranges like age, three significant digits for small ones
    const digits = (c.maximum - c.minimum) >= 10 ? 1 : Math.max(0, 2 - Math.floor(Math.log10(Math.abs(c.maximum - c.minimum) || 1)));
    return +(+x).toFixed(Math.min(digits, 6));
  }
  function fmt(x) { return Math.abs(x) >= 100 ? x.toFixed(0) : (+x).toFixed(1); }

  function request(side) {
    const covariates = {};
    for (const c of model.covariates) {
      const value = $(c.kind === "continuous" ? `cov-${side}-${c.name}-v` : `cov-${side}-${c.name}`).value;
      if (value !== "") covariates[c.name] = c.kind === "continuous" ? +value : value;
    }
    return { covariates, solver: $("solver").value, steps: +$("steps").value, guidance: +$("guidance").value, seed: +$("seed").value };
  }

  // ---- viewers with linked cursors
  const viewers = { A: await V.make("canvas-A"), B: await V.make("canvas-B"), D: await V.make("canvas-D") };
  const names = new Map([[viewers.A, "A"], [viewers.B, "B"], [viewers.D, "B − A"]]);
  V.link(Object.values(viewers), (nv, d) => { $("location").textContent = names.get(nv) + ": " + d.string; });
  window.mriflow = { viewers, state, loaded: { A: 0, B: 0, D: 0 } };

  function windowAll() {
    const low = +$("win-low").value, high = Math.max(+$("win-high").value, low + 0.01);
    $("win-low-v").textContent = low.toFixed(2); $("win-high-v").textContent = high.toFixed(2);
    for (const nv of Object.values(viewers)) V.setWindow(nv, low, high);  // the grey layer; the difference keeps its own
  }
  $("win-low").addEventListener("input", windowAll);
  $("win-high").addEventListener("input", windowAll);
  $("zoom").addEventListener("input", () => {
    $("zoom-v").textContent = (+$("zoom").value).toFixed(1);
    for (const nv of Object.values(viewers)) V.setZoom(nv, +$("zoom").value);
  });
  for (const button of document.querySelectorAll("button[data-axis]")) {
    button.addEventListener("click", () => V.scroll(viewers.A, +button.dataset.axis, +button.dataset.delta));
  }

  // ---- generation jobs, polled for progress
  async function generate(side) {
    const status = $("status-" + side), bar = $("progress-" + side);
    status.classList.remove("error");
    status.textContent = "queued…"; bar.style.width = "0";
    const response = await fetch("/api/generate", { method: "POST", headers: { "Content-Type": "application/json" },
                                                     body: JSON.stringify(request(side)) });
    let job = await response.json();
    if (!response.ok) { status.classList.add("error"); status.textContent = job.detail; return; }
    job = await V.waitFor(job, status, bar,
                          (j) => `sampling: network evaluation ${j.calls}${j.expected ? " of " + j.expected : ""}`);
    if (job.state === "error") { status.classList.add("error"); status.textContent = "failed: " + job.error; return; }
    bar.style.width = "100%";
    state[side] = job;
    const sample = job.samples[0];
    const covs = Object.entries(job.request.covariates).map(([k, v]) => `${k} ${v === null ? "any" : (typeof v === "number" ? fmt(v) : v)}`).join(", ");
    status.textContent = `${covs}; ${job.request.solver}, ${job.request.steps} steps, seed ${job.request.seed}: ${job.seconds.toFixed(1)} s` +
      (job.warnings.length ? " — note: " + job.warnings.join("; ") : "");
    await V.load(viewers[side], "/files/" + sample.image, { name: sample.name + ".nii.gz" });
    V.follow(viewers[side], Object.values(viewers));
    windowAll();
    downloads($("downloads-" + side), sample, side);
    window.mriflow.loaded[side] += 1;
    await difference();
    await listOutputs();
  }

  function downloads(box, sample, side) {
    const links = [[sample.image, "NIfTI"], [sample.sidecar, "sidecar (JSON)"], [sample.labels, "label map"]];
    box.innerHTML = links.filter(([path]) => path)
      .map(([path, what]) => `<a href="/files/${path}?download=true" download data-kind="${what}">${what}</a>`).join("") +
      (sample.labels ? `<label><input type="checkbox" id="labels-${side}"> show the label map</label>` : "");
    if (sample.labels) $("labels-" + side).addEventListener("change", (e) => showLabels(side, sample, e.target.checked));
  }

  // One colour per tissue class (mriflow's classes: background, CSF, ventricles, grey matter, white matter,
  // brainstem; more classes reuse the list), shown in the overlay and in its legend alike.
  const CLASS_COLOURS = [[0, 0, 0], [66, 133, 244], [0, 200, 220], [255, 152, 0], [250, 240, 180], [220, 60, 200],
                         [120, 200, 80], [230, 60, 60]];
  const DEFAULT_CLASSES = ["background", "CSF", "ventricles", "grey matter", "white matter", "brainstem"];

  function tissueColormap(count) {
    // node k at intensity k / (count - 1) of the window [0, count - 1]: class k gets exactly its colour
    const nodes = Array.from({ length: count }, (_, k) => k);
    const colour = (k) => CLASS_COLOURS[k % CLASS_COLOURS.length];
    return { R: nodes.map((k) => colour(k)[0]), G: nodes.map((k) => colour(k)[1]), B: nodes.map((k) => colour(k)[2]),
             A: nodes.map((k) => (k === 0 ? 0 : 255)), I: nodes.map((k) => Math.round((255 * k) / Math.max(1, count - 1))) };
  }

  function legend(side, classes) {
    let box = $("legend-" + side);
    if (!box) {
      box = document.createElement("div");
      box.className = "legend";
      box.id = "legend-" + side;
      $("downloads-" + side).after(box);
    }
    box.innerHTML = classes ? classes.slice(1).map((name, i) => {
      const [r, g, b] = CLASS_COLOURS[(i + 1) % CLASS_COLOURS.length];
      return `<span class="legend-item"><span class="swatch" style="background:rgb(${r},${g},${b})"></span>${name.replace(/_/g, " ")}</span>`;
    }).join("") : "";
  }

  // A sample's synthetic label map (sample_XXXXX_labels.nii.gz: class indices) over its image, one colour per class,
  // with a legend naming them.
  async function showLabels(side, sample, on) {
    let classes = DEFAULT_CLASSES;
    if (on && sample.sidecar) {
      const record = await (await fetch("/files/" + sample.sidecar)).json();
      if (Array.isArray(record.label_classes) && record.label_classes.length > 1) classes = record.label_classes;
    }
    viewers[side].addColormap("mriflow-tissue-" + classes.length, tissueColormap(classes.length));
    await V.load(viewers[side], "/files/" + sample.image, { name: sample.name + ".nii.gz" }, on ? {
      url: "/files/" + sample.labels, name: sample.name + "_labels.nii.gz", colormap: "mriflow-tissue-" + classes.length,
      opacity: 0.45, cal_min: 0, cal_max: classes.length - 1 } : null);
    legend(side, on ? classes : null);
    V.follow(viewers[side], Object.values(viewers));
    windowAll();
  }

  async function difference() {
    if (!state.A || !state.B) return;
    const url = `/api/difference/${state.A.folder}/${state.B.folder}/difference.nii.gz`;
    const a = state.A.samples[0];
    await V.load(viewers.D, "/files/" + a.image, { name: a.name + ".nii.gz" },
                 { url: url, name: "difference.nii.gz", colormap: "warm", cal_min: 0.05, cal_max: 0.4,
                   colormapNegative: "winter", cal_minNeg: -0.4, cal_maxNeg: -0.05 });
    V.follow(viewers.D, Object.values(viewers));
    $("status-D").textContent = "B − A over A (warm: B brighter, cool: A brighter; |difference| < 0.05 not shown)";
    $("downloads-D").innerHTML = `<a href="${url}?download=true" download>difference (NIfTI)</a>`;
    window.mriflow.loaded.D += 1;
  }

  async function listOutputs() {
    const folders = await (await fetch("/api/outputs")).json();
    if (!folders.length) return;
    $("outputs").innerHTML = "<table><tr><th>folder</th><th>sample</th><th>files</th></tr>" + folders.slice(0, 30).map((f) =>
      f.samples.map((s) => `<tr><td>${f.folder}</td><td>${s.name}</td><td>` +
        [[s.image, "NIfTI"], [s.sidecar, "sidecar"], [s.labels, "labels"]].filter(([p]) => p)
          .map(([p, w]) => `<a href="/files/${p}?download=true" download>${w}</a>`).join(" ") + "</td></tr>").join("")).join("") + "</table>";
  }

  let busy = false;
  async function run(sides) {
    if (busy) return;
    busy = true;
    for (const b of document.querySelectorAll("button[id^=generate]")) b.disabled = true;
    try { for (const side of sides) await generate(side); }
    finally { busy = false; for (const b of document.querySelectorAll("button[id^=generate]")) b.disabled = false; }
  }
  $("generate-both").addEventListener("click", () => run(["A", "B"]));
  $("generate-A").addEventListener("click", () => run(["A"]));
  $("generate-B").addEventListener("click", () => run(["B"]));
  await listOutputs();
  document.body.dataset.ready = "1";
})().catch((error) => {
  document.body.dataset.ready = "error";
  const box = document.createElement("div"); box.className = "status error"; box.textContent = String(error);
  document.querySelector("main").prepend(box);
});
