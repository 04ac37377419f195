// The rater's side of the visual Turing test: one volume at a time, real or synthetic, and how sure.
"use strict";
(async function () {
  const $ = (id) => document.getElementById(id);
  const V = window.mriflowViewer;
  let session = null, shownAt = 0, nv = null;
  window.mriflow = { viewer: null, loaded: 0 };

  async function post(url, body) {
    const response = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const data = await response.json();
    if (!response.ok) throw new Error(data.detail || response.statusText);
    return data;
  }

  async function show() {
    $("who").textContent = "rater: " + session.rater;
    if (!session.next) { $("rate").hidden = true; $("start").hidden = true; $("done").hidden = false; document.body.dataset.done = "1"; return; }
    $("start").hidden = true; $("rate").hidden = false;
    if (!nv) nv = window.mriflow.viewer = await V.make("canvas-T", null);  // once visible: NiiVue sizes to its canvas
    $("counter").textContent = `Item ${session.answered + 1} of ${session.total}`;
    for (const input of document.querySelectorAll("#rate input[type=radio]")) input.checked = false;
    $("submit").disabled = true;
    $("win-low").value = 0; $("win-high").value = 1; $("zoom").value = 1;   // every item starts with the same display
    await V.load(nv, `/api/turing/item/${session.next}/volume.nii.gz`, { name: "volume.nii.gz" });
    V.setZoom(nv, 1);
    shownAt = performance.now();
    window.mriflow.loaded += 1;
    document.body.dataset.item = session.next;
  }

  function ready() {
    const a = document.querySelector("input[name=answer]:checked"), c = document.querySelector("input[name=confidence]:checked");
    $("submit").disabled = !(a && c);
  }
  for (const input of document.querySelectorAll("#rate input[type=radio]")) input.addEventListener("change", ready);
  $("win-low").addEventListener("input", () => nv && V.setWindow(nv, +$("win-low").value, Math.max(+$("win-high").value, +$("win-low").value + 0.01)));
  $("win-high").addEventListener("input", () => nv && V.setWindow(nv, +$("win-low").value, Math.max(+$("win-high").value, +$("win-low").value + 0.01)));
  $("zoom").addEventListener("input", () => nv && V.setZoom(nv, +$("zoom").value));

  $("submit").addEventListener("click", async () => {
    $("submit").disabled = true;
    try {
      const body = { rater: session.rater, item: session.next,
                     answer: document.querySelector("input[name=answer]:checked").value,
                     confidence: +document.querySelector("input[name=confidence]:checked").value,
                     seconds: (performance.now() - shownAt) / 1000 };
      session = await post("/api/turing/answer", body);
      $("rate-status").textContent = "";
      await show();
    } catch (error) { $("rate-status").textContent = String(error.message || error); $("submit").disabled = false; }
  });

  async function begin(name) {
    try {
      session = await post("/api/turing/session", { rater: name });
      localStorage.setItem("mriflow-rater", name);
      await show();
    } catch (error) { $("start-status").textContent = String(error.message || error); }
  }
  $("begin").addEventListener("click", () => begin($("rater").value.trim()));
  $("rater").addEventListener("keydown", (e) => { if (e.key === "Enter") begin($("rater").value.trim()); });
  $("rater").value = localStorage.getItem("mriflow-rater") || "";
  document.body.dataset.ready = "1";
})();
