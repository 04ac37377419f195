// This brain at another age (mriflow app --scans DATA): a real scan inverted to its noise under its recorded
// covariates and drawn again under new ones; the round trip in viewer A, the edit in B, edit − round trip in the
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
    while (job.state === "queued" || job.state === "running") {
      await new Promise((r) => setTimeout(r, 200));
      job = await (await fetch("/api/jobs/" + job.id)).json();
      bar.style.width = (100 * job.progress).toFixed(0) + "%";
      status.textContent = job.state === "running" ? `inverting and drawing: network evaluation ${job.calls} of ${job.expected}` : job.state + "…";
    }
    if (job.state === "error") { status.classList.add("error"); status.textContent = "failed: " + job.error; return; }
    bar.style.width = "100%";
    const files = job.edit;
    await V.load(viewers.A, "/files/" + files.round_trip, { name: "round_trip.nii.gz" });
    await V.load(viewers.B, "/files/" + files.image, { name: "edit.nii.gz" });
    await V.load(viewers.D, "/files/" + files.round_trip, { name: "round_trip.nii.gz" },
                 { url: "/files/" + files.difference, name: "difference.nii.gz", colormap: "warm", cal_min: 0.05, cal_max: 0.4,
                   colormapNegative: "winter", cal_minNeg: -0.4, cal_maxNeg: -0.05 });
    for (const nv of all) V.follow(nv, all);
    $("status-A").textContent = `round trip of ${job.request.scan} (${shown(job.request.from)})`;
    $("status-B").textContent = `${job.request.scan} edited to ${shown(job.request.covariates)}: ${job.seconds.toFixed(1)} s` +
      (job.warnings.length ? " — note: " + job.warnings.join("; ") : "");
    $("status-D").textContent = "edit − round trip over the round trip (warm: brighter in the edit, cool: darker)";
    for (const [side, path, what] of [["A", files.round_trip, "round trip"], ["B", files.image, "edit"], ["D", files.difference, "difference"]])
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
  document.body.dataset.edit = "1";
})().catch((error) => {
  const box = document.createElement("div"); box.className = "status error"; box.textContent = "edit: " + String(error);
  document.querySelector("main").prepend(box);
});
