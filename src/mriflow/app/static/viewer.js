// The three-plane viewer every page uses: NiiVue (served by the app from node_modules, never a CDN).
"use strict";
window.mriflowViewer = (function () {
  const opts = { backColor: [0, 0, 0, 1], crosshairColor: [1, 0.25, 0.25, 0.9], crosshairWidth: 0.4, crosshairGap: 8,
                 show3Dcrosshair: true, isColorbar: false, multiplanarForceRender: false, dragAndDropEnabled: false,
                 isOrientCube: false, loadingText: "",
                 multiplanarShowRender: 0 /* SHOW_RENDER.NEVER: three planes, no 3D render */ };

  async function make(canvasId, onLocation) {
    const nv = new niivue.Niivue({ ...opts });
    await nv.attachTo(canvasId);
    nv.setSliceType(nv.sliceTypeMultiplanar);
    nv.setMultiplanarLayout(3); // MULTIPLANAR_TYPE.ROW: axial, coronal, sagittal side by side
    if (onLocation) nv.onLocationChange = onLocation;
    return nv;
  }

  // A volume in [0, 1] shown in grey with the fixed window [0, 1] (every volume looks the same way), optionally
  // under an overlay (e.g. a signed difference: warm where positive, cool where negative, faint values hidden).
  async function load(nv, url, options, overlay) {
    const o = Object.assign({ name: "volume.nii.gz" }, options || {});
    const layers = [{ url: url, name: o.name, colormap: "gray", cal_min: 0, cal_max: 1, trustCalMinMax: true }];
    if (overlay) layers.push(Object.assign({ trustCalMinMax: true, opacity: 1 }, overlay));
    await nv.loadVolumes(layers);
    nv.setSliceType(nv.sliceTypeMultiplanar);
    nv.drawScene();
  }

  function setWindow(nv, low, high) {
    if (!nv.volumes.length) return;
    nv.volumes[0].cal_min = low;
    nv.volumes[0].cal_max = high;
    nv.updateGLVolume();
  }

  function setZoom(nv, zoom) {
    const p = nv.scene.pan2Dxyzmm;
    nv.setPan2Dxyzmm([p[0], p[1], p[2], zoom]);
  }

  // Move the crosshair by `delta` voxels along one axis (0 = x/sagittal, 1 = y/coronal, 2 = z/axial).
  function scroll(nv, axis, delta) {
    const v = [0, 0, 0];
    v[axis] = delta;
    nv.moveCrosshairInVox(v[0], v[1], v[2]);
  }

  function voxel(nv) {
    if (!nv.volumes.length) return null;
    return Array.from(nv.frac2vox(nv.scene.crosshairPos)).map(Math.round);
  }

  // Linked cursors: wherever the crosshair of one viewer goes (click, wheel, keys, buttons), the others follow
  // to the same point in millimetres. (NiiVue's own broadcastTo only follows a viewer that has the keyboard focus.)
  function link(viewers, onLocation) {
    let following = false;
    for (const nv of viewers) {
      nv.onLocationChange = (data) => {
        if (onLocation) onLocation(nv, data);
        if (following || !nv.volumes.length) return;
        following = true;
        try {
          const mm = nv.frac2mm(nv.scene.crosshairPos);
          for (const other of viewers) {
            if (other === nv || !other.volumes.length) continue;
            other.scene.crosshairPos = other.mm2frac(mm);
            other.scene.pan2Dxyzmm = Float32Array.from(nv.scene.pan2Dxyzmm);
            other.drawScene();
          }
        } finally { following = false; }
      };
    }
  }

  // A viewer that has just loaded a volume takes the crosshair, zoom and pan of one already showing one.
  function follow(nv, viewers) {
    const leader = viewers.find((other) => other !== nv && other.volumes.length);
    if (!leader || !nv.volumes.length) return;
    nv.scene.crosshairPos = nv.mm2frac(leader.frac2mm(leader.scene.crosshairPos));
    nv.scene.pan2Dxyzmm = Float32Array.from(leader.scene.pan2Dxyzmm);
    nv.drawScene();
  }

  // A queued job (/api/generate, /api/edit, /api/scans) polled until it ends, its progress shown in `bar` and
  // `doing(job)` in `status` while it runs; the finished job (state done or error).
  async function waitFor(job, status, bar, doing) {
    while (job.state === "queued" || job.state === "running") {
      await new Promise((r) => setTimeout(r, 200));
      job = await (await fetch("/api/jobs/" + job.id)).json();
      bar.style.width = (100 * job.progress).toFixed(0) + "%";
      status.textContent = job.state === "running" ? doing(job) : job.state + "…";
    }
    return job;
  }

  return { make, load, setWindow, setZoom, scroll, voxel, link, follow, waitFor };
})();
