// This brain at another age (mriflow app --scans DATA): a real scan inverted to its noise under its recorded
// covariates and drawn again under new ones; the scan in viewer A, the edit in B, edit − scan in the
// difference view.
"use strict";
(async function () {
  const $ = (id) => document.getElementById(id);
  const V = window.mriflowViewer;
  const config = await (await fetch("/api/config")).json();
  const edit = config.generate && config.generate.edit;
  if (!edit) return;
  while (!window.mriflow || document.body.dataset.ready !== "1") await new Promise((r) => setTimeout(r, 50));
  const viewers = window.mriflow.viewers, all = Object.values(viewers);
  window.mriflow.edited = 0;
  $("edit-panel").hidden = false;
  const age = config.generate.covariates.find((c) => c.name === "age" && c.kind === "continuous");
  const sex = config.generate.covariates.find((c) => c.name === "sex" && c.kind === "categorical");
  const shown = (covariates) => Object.entries(covariates).filter(([, v]) => v !== null)
    .map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(1) : v}`).join(", ");
  for (const scan of edit.scans) $("edit-scan").add(new Option(`${scan.id} (${shown(scan.covariates)}; ${scan.split})`, scan.id));
  if (age) {
    // the slider spans the ages the model was trained on
    $("edit-age").min = Math.floor(age.minimum); $("edit-age").max = Math.ceil(age.maximum);
    $("edit-age").value = Math.min(75, Math.ceil(age.maximum));
    const show = () => { $("edit-age-v").textContent = $("edit-age").value; };
    $("edit-age").addEventListener("input", show); show();
  } else $("edit-age-box").hidden = true;
  if (sex) for (const k of sex.categories) $("edit-sex").add(new Option(k, k));
  else $("edit-sex-box").hidden = true;
  $("edit-steps").value = edit.steps; $("edit-steps").max = edit.max_steps;
  if (edit.uploads) {
    // a scan of the user's own: prepared onto the model's grid by the app, then one of the scans above
    $("upload-box").hidden = false;
    if (age) $("upload-age").value = Math.round(age.mean); else $("upload-age-box").hidden = true;
    if (sex) for (const k of sex.categories) $("upload-sex").add(new Option(k, k)); else $("upload-sex-box").hidden = true;
  }

  async function upload() {
    const status = $("status-E"), bar = $("progress-E"), file = $("upload-file").files[0];
    status.classList.remove("error");
    if (!file) { status.classList.add("error"); status.textContent = "choose a NIfTI file (.nii or .nii.gz) first"; return; }
    const query = new URLSearchParams({ kind: $("upload-kind").value });
    if (age) query.set("age", $("upload-age").value);
    if (sex) query.set("sex", $("upload-sex").value);
    status.textContent = "uploading…"; bar.style.width = "0";
    const response = await fetch("/api/scans?" + query, { method: "POST",
      headers: { "Content-Type": "application/octet-stream" }, body: file });
    let job = await response.json();
    if (!response.ok) { status.classList.add("error"); status.textContent = job.detail; return; }
    job = await V.waitFor(job, status, bar, () => "preparing: registration to MNI152 and resampling onto the model's grid…");
    if (job.state === "error") { status.classList.add("error"); status.textContent = "failed: " + job.error; return; }
    const id = job.request.scan;
    $("edit-scan").add(new Option(`${id}: ${file.name} (${shown(job.request.covariates)}; uploaded)`, id));
    $("edit-scan").value = id;
    bar.style.width = "100%";
    status.textContent = `prepared ${file.name} as ${id} in ${job.seconds.toFixed(1)} s: choose an age and draw it`;
    window.mriflow.uploaded = id;
  }

  async function run() {
    const status = $("status-E"), bar = $("progress-E");
    status.classList.remove("error"); status.textContent = "queued…"; bar.style.width = "0";
    const covariates = {};
    if (age) covariates.age = +$("edit-age").value;
    if (sex && $("edit-sex").value) covariates.sex = $("edit-sex").value;
    const response = await fetch("/api/edit", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ scan: $("edit-scan").value, covariates, steps: +$("edit-steps").value }) });
    let job = await response.json();
    if (!response.ok) { status.classList.add("error"); status.textContent = job.detail; return; }
    job = await V.waitFor(job, status, bar, (j) => `inverting and drawing: network evaluation ${j.calls} of ${j.expected}`);
    if (job.state === "error") { status.classList.add("error"); status.textContent = "failed: " + job.error; return; }
    bar.style.width = "100%";
    const files = job.edit;
    const scanUrl = `/api/scans/${encodeURIComponent(job.request.scan)}/volume.nii.gz`;
    await V.load(viewers.A, scanUrl, { name: "scan.nii.gz" });
    await V.load(viewers.B, "/files/" + files.image, { name: "edit.nii.gz" });
    await V.load(viewers.D, scanUrl, { name: "scan.nii.gz" },
                 { url: "/files/" + files.difference, name: "difference.nii.gz", colormap: "warm", cal_min: 0.05, cal_max: 0.4,
                   colormapNegative: "winter", cal_minNeg: -0.4, cal_maxNeg: -0.05 });
    for (const nv of all) V.follow(nv, all);
    $("status-A").textContent = `${job.request.scan} as scanned (${shown(job.request.from)})`;
    $("status-B").textContent = `${job.request.scan} edited to ${shown(job.request.covariates)}: ${job.seconds.toFixed(1)} s` +
      (job.warnings.length ? " — note: " + job.warnings.join("; ") : "");
    $("status-D").textContent = "edit − scan over the scan (warm: brighter in the edit, cool: darker)";
    for (const [side, path, what] of [["A", files.round_trip, "the model's round trip"], ["B", files.image, "edit"], ["D", files.difference, "difference"]])
      $("downloads-" + side).innerHTML = `<a href="/files/${path}?download=true" download>${what} (NIfTI)</a>` +
        (side === "B" && files.sidecar ? `<a href="/files/${files.sidecar}?download=true" download>sidecar (JSON)</a>` : "");
    status.textContent = `done: ${job.request.scan} at ${shown(job.request.covariates)} (${job.request.steps} Heun steps each way)`;
    window.mriflow.edited += 1;
  }
  let busy = false;
  $("edit-run").addEventListener("click", async () => {
    if (busy) return;
    busy = true; $("edit-run").disabled = true;
    try { await run(); } finally { busy = false; $("edit-run").disabled = false; }
  });
  $("upload-run").addEventListener("click", async () => {
    if (busy) return;
    busy = true; $("upload-run").disabled = true; $("edit-run").disabled = true;
    try { await upload(); } finally { busy = false; $("upload-run").disabled = false; $("edit-run").disabled = false; }
  });
  document.body.dataset.edit = "1";
})().catch((error) => {
  const box = document.createElement("div"); box.className = "status error"; box.textContent = "edit: " + String(error);
  document.querySelector("main").prepend(box);
});
