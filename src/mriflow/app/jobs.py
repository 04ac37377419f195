"""Generation in the app: one sample per request, queued, with progress counted in network evaluations.

The generator is loaded once (the shipped default model, or --model) and kept. Each request becomes a
job that a single worker thread runs in turn (the CPU is shared; one job at a time is also what keeps the
counting of calls per job exact): its sample is written with `write_sample`, exactly as `mriflow generate`
writes it (float32 NIfTI with the model's affine, JSON sidecar), into a new folder of its own under the
output folder, `<out>/<YYYYmmdd-HHMMSS>-<job>/sample_00000.nii.gz`, so no existing file is ever touched.
Progress is the number of velocity-network evaluations so far against the number the solver needs
(steps x its stages; learnt from the first run of an adaptive solver).

The work one client can ask for is bounded: a request needs at most MAX_EVALUATIONS network evaluations
(steps x stages: rk4 up to 250 steps, euler up to 1000; the adaptive dopri5 is stopped when it reaches them), and at most MAX_PENDING jobs wait or run at once; one
more is refused (`QueueFull`, 429) until one finishes. Of finished jobs the newest MAX_KEPT are remembered.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mriflow.app.bodies import finite, shown
from mriflow.app.paths import OutsideRootError, existing_file, inside
from mriflow.app.scans import UploadFolder, check_kind, read_upload, scan_index
from mriflow.data.io import load_volume
from mriflow.utils.seeding import sample_seed
from mriflow.generate import Generator, load_generator, requested_covariates
from mriflow.generate_io import labels_name, sample_name, write_labels, write_sample
from mriflow.models.conditioning import resolve_request

STAGES_PER_STEP = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4, "ddim": 1, "ddpm": 1}
MAX_STEPS = 1000
MAX_EVALUATIONS = 1000  # network evaluations of one request (steps x the solver's stages)
MAX_PENDING = 8  # jobs queued or running at once
MAX_KEPT = 1000  # finished jobs remembered for /api/jobs/<id>
MAX_SEED = 2**31 - 1
EDIT_STEPS = 16  # Heun steps each way of an edit (mriflow edit's default)
EDIT_EVALUATIONS_PER_STEP = 6  # Heun: 2 evaluations a step, for the inversion, the round trip and the edit
LABELS_SUFFIX = "_labels.nii.gz"  # a synthetic label map beside its sample: sample_XXXXX_labels.nii.gz


class EvaluationLimit(RuntimeError):
    """A job reached MAX_EVALUATIONS network evaluations (an adaptive solver that would not settle)."""


class QueueFull(RuntimeError):
    """MAX_PENDING jobs are already waiting or running."""


@dataclass
class Job:
    id: str
    request: dict[str, Any]
    state: str = "queued"  # queued | running | done | error
    calls: int = 0
    expected: int | None = None
    error: str | None = None
    folder: str | None = None  # relative to the output folder
    seconds: float | None = None
    warnings: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    edit: dict[str, str] | None = None  # an edit's files (image, difference, round_trip, sidecar), relative to out

    def view(self) -> dict[str, Any]:
        progress = 1.0 if self.state == "done" else (min(self.calls / self.expected, 0.99) if self.expected else 0.0)
        return {"id": self.id, "state": self.state, "calls": self.calls, "expected": self.expected,
                "progress": progress, "error": self.error, "folder": self.folder, "seconds": self.seconds,
                "request": self.request, "warnings": self.warnings, **({"edit": self.edit} if self.edit else {})}


class GenerationService:
    """Loads the model once and runs generation jobs on one worker thread."""

    def __init__(self, model: str, out: str | Path, device: str = "cpu", trust_paths: bool = False,
                 scans: str | Path | None = None, uploads: bool = False):
        self.model = model
        self.out = Path(out)
        self.generator: Generator = load_generator(model, device, trust_paths)
        self.scans: dict[str, dict[str, Any]] = {}  # subject -> {"path", "covariates", "split"}: what edits start from
        self.uploads: UploadFolder | None = None  # where uploaded scans are prepared (app.scans)
        if scans is not None or uploads:
            from mriflow.edit import check_invertible

            option = "--scans" if scans is not None else "--uploads"
            try:
                check_invertible(self.generator, "heun")
                if uploads and not self.generator.meta.get("grid"):
                    raise ValueError(f"the model {self.generator.path} does not name its grid, so an upload cannot be "
                                     "prepared onto it")
            except ValueError as error:
                raise ValueError(f"{option}: {error}") from None
            if scans is not None:
                self.scans = scan_index(scans, self.generator.schema.names)
            self.uploads = UploadFolder() if uploads else None
        self.jobs: dict[str, Job] = {}
        self.learnt: dict[tuple[str, int], int] = {}  # (solver, steps) -> calls, for adaptive solvers
        self.lock = threading.Lock()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mriflow-generate")
        self.current: Job | None = None
        self.generator.velocity_net.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        job = self.current
        if job is not None:
            job.calls += 1
            if job.calls > MAX_EVALUATIONS:  # an adaptive solver (dopri5) is bounded here: its steps are not known
                raise EvaluationLimit(f"stopped after {MAX_EVALUATIONS} network evaluations, the most the app spends "
                                      f"on one request ({job.request.get('solver')} needed more); use a fixed-step "
                                      "solver (heun, rk4) or `mriflow generate` for this")

    # ------------------------------------------------------------------ what the model knows

    def model_info(self) -> dict[str, Any]:
        g = self.generator
        covariates = []
        for c in g.schema.covariates:
            entry: dict[str, Any] = {"name": c.name, "kind": c.kind}
            if c.kind == "continuous":
                entry.update(minimum=_finite(c.minimum), maximum=_finite(c.maximum), mean=_finite(c.mean))
            else:
                entry["categories"] = list(c.categories)
            covariates.append(entry)
        edit = {"scans": [{"id": k, "split": v["split"], "covariates": v["covariates"]} for k, v in self.scans.items()],
                "steps": EDIT_STEPS, "max_steps": MAX_EVALUATIONS // EDIT_EVALUATIONS_PER_STEP,
                "uploads": self.uploads is not None} if self.scans or self.uploads else None
        defaults = g.sampling_settings()
        try:  # a model that takes no other guidance (a GAN, a few-step student): the page greys the field out
            g.family.check_sampling({**defaults, "guidance": defaults["guidance"] + 1.0})
            guidance_fixed = False
        except ValueError:
            guidance_fixed = True
        return {"model": str(self.model), "model_id": g.model_id, "stage": g.stage, "covariates": covariates,
                "solvers": list(g.solvers), "defaults": defaults, "guidance_fixed": guidance_fixed,
                "image_shape": list(g.image_shape), "affine": np.asarray(g.affine).tolist(), "edit": edit}

    # ------------------------------------------------------------------ jobs

    def check(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The request as it will run: covariates checked against the schema, sampling settings complete.
        ValueError names what is wrong."""
        covariates = _covariates(request.get("covariates"))
        seed = request.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
        steps = request.get("steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS):
            raise ValueError(f"steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
        solver, guidance = request.get("solver"), request.get("guidance")
        if solver is not None and not isinstance(solver, str):
            raise ValueError(f"solver must be a string (one of {', '.join(self.generator.solvers)}), got {shown(solver)}")
        guidance = None if guidance is None else finite(guidance, "guidance", minimum=0.0)
        settings = self.generator.sampling_settings(solver or None, steps, guidance)
        stages = STAGES_PER_STEP.get(settings["solver"])  # None: adaptive (dopri5), stopped at the limit in _count
        if stages is not None and settings["steps"] * stages > MAX_EVALUATIONS:
            raise ValueError(f"steps: {settings['steps']} steps of {settings['solver']} ({stages} network evaluations "
                             f"each) is over the app's {MAX_EVALUATIONS} evaluations a request; use at most "
                             f"{MAX_EVALUATIONS // stages} steps (or `mriflow generate` for more)")
        values, present = resolve_request(self.generator.schema, covariates)
        return {"covariates": covariates, "seed": seed, "settings": settings,
                "requested": requested_covariates(self.generator.schema, covariates, values, present),
                "condition": (values[None], present[None]) if len(self.generator.schema) else None}

    def submit(self, request: Mapping[str, Any]) -> Job:
        with warnings.catch_warnings(record=True) as caught:  # e.g. a value outside the training range
            warnings.simplefilter("always")
            checked = self.check(request)
        job = Job(id=secrets.token_hex(6), request={"covariates": checked["requested"], "seed": checked["seed"],
                                                   **checked["settings"]},
                  warnings=[str(w.message) for w in caught])
        settings = checked["settings"]
        stages = STAGES_PER_STEP.get(settings["solver"])
        job.expected = self.learnt.get((settings["solver"], settings["steps"]),
                                       settings["steps"] * stages if stages else None)
        return self._enqueue(job, self._run, checked)

    def _enqueue(self, job: Job, run, checked: dict[str, Any]) -> Job:
        with self.lock:
            pending = sum(j.state in ("queued", "running") for j in self.jobs.values())
            if pending >= MAX_PENDING:
                raise QueueFull(f"{pending} generation jobs are waiting or running, the most this app queues "
                                f"({MAX_PENDING}); try again when one has finished")
            finished = [key for key, j in self.jobs.items() if j.state in ("done", "error")]
            for key in finished[:max(0, len(finished) - MAX_KEPT + 1)]:  # oldest first: dicts keep insertion order
                del self.jobs[key]
            self.jobs[job.id] = job
        self.worker.submit(run, job, checked)
        return job

    # ------------------------------------------------------------------ edits of real scans (mriflow.edit)

    def submit_edit(self, request: Mapping[str, Any]) -> Job:
        """{"scan": a subject of --scans, "covariates": the targets, "steps"?}: that scan inverted under its recorded
        covariates and drawn again under these (Heun, `steps` each way). ValueError names what is wrong."""
        if not self.scans and self.uploads is None:
            raise ValueError("editing is off: start the app with --scans DATA (a prepared folder) to edit its scans, or "
                             "--uploads to edit uploaded ones")
        scan = request.get("scan")
        if not isinstance(scan, str) or scan not in self.scans:
            raise ValueError(f"scan {shown(scan)}: not one of the app's {len(self.scans)} scans (--scans, uploads)")
        steps = request.get("steps", EDIT_STEPS)
        most = MAX_EVALUATIONS // EDIT_EVALUATIONS_PER_STEP
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= most:
            raise ValueError(f"steps must be an integer from 1 to {most} for an edit, got {shown(steps)}")
        target = {k: v for k, v in _covariates(request.get("covariates")).items() if v is not None}
        if not target:
            raise ValueError("covariates: say what to change, e.g. {\"age\": 75}")
        with warnings.catch_warnings(record=True) as caught:  # e.g. an age outside the training range
            warnings.simplefilter("always")
            resolve_request(self.generator.schema, target)  # ValueError for an unknown name or category
        job = Job(id=secrets.token_hex(6), request={"kind": "edit", "scan": scan, "covariates": target, "steps": steps,
                                                    "solver": "heun", "from": self.scans[scan]["covariates"]},
                  warnings=[str(w.message) for w in caught], expected=EDIT_EVALUATIONS_PER_STEP * steps)
        return self._enqueue(job, self._run_edit, {"scan": scan, "target": target, "steps": steps})

    def _run_edit(self, job: Job, checked: dict[str, Any]) -> None:
        from mriflow.edit import edit_files, edit_scan

        with self._running(job):
            folder = f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{job.id}"
            scan = self.scans[checked["scan"]]
            (edited,) = edit_scan(self.generator, scan["path"], self.out / folder, [checked["target"]],
                                  source=scan["covariates"], steps=checked["steps"], solver="heun",
                                  labels=self.generator.labels is not None)
            job.edit = {k: path.relative_to(self.out).as_posix() for k, path in edit_files(edited, scan["path"]).items()
                        if path.is_file()}
            job.folder = folder

    def submit_upload(self, data: bytes, covariates: Mapping[str, Any], kind: Any) -> Job:
        """A T1 uploaded as NIfTI bytes (app.scans), with its own covariates: prepared onto the model's grid by the
        worker, then one of the scans `submit_edit` takes (its id in the job's request). ValueError names the fault."""
        if self.uploads is None:
            raise ValueError("uploads are off: start the app with --uploads to edit scans of your own")
        kind = check_kind(kind)
        given = {k: v for k, v in _covariates(dict(covariates)).items() if v is not None}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resolve_request(self.generator.schema, given)  # ValueError for an unknown name or category
        missing = [name for name in self.generator.schema.names if name not in given]
        if missing:
            raise ValueError(f"give the scan's own {', '.join(missing)}: the flow is inverted under them")
        image = read_upload(data)
        scan_id = f"upload-{secrets.token_hex(4)}"
        path = self.uploads.save(scan_id, image)
        job = Job(id=secrets.token_hex(6), request={"kind": "upload", "scan": scan_id, "covariates": given,
                                                    "prepare": kind}, warnings=[str(w.message) for w in caught])
        return self._enqueue(job, self._run_upload, {"path": path, "scan": scan_id, "covariates": given, "kind": kind})

    def _run_upload(self, job: Job, checked: dict[str, Any]) -> None:
        from mriflow.data.outside import prepare_outside

        with self._running(job):
            prepared = prepare_outside([checked["path"]], checked["path"].parent.parent, self.generator.meta["grid"],
                                       checked["kind"], "upload", progress=False)[checked["path"]]
            self.scans[checked["scan"]] = {"path": prepared, "split": "uploaded", "covariates": checked["covariates"]}

    @contextlib.contextmanager
    def _running(self, job: Job):
        """The job's life on the worker: running, counted, then done or failed with its message (the worker goes on
        with the next job either way), and its seconds."""
        job.state, start = "running", time.perf_counter()
        self.current = job
        try:
            yield
            job.state = "done"
        except Exception as error:  # reported to the page
            job.state, job.error = "error", str(error) or type(error).__name__
        finally:
            self.current = None
            job.seconds = round(time.perf_counter() - start, 3)

    def _run(self, job: Job, checked: dict[str, Any]) -> None:
        g, settings = self.generator, checked["settings"]
        with self._running(job):
            stream = sample_seed(checked["seed"], 0)
            # a model with a label decoder (mriflow train labels) also gives the sample's tissue map
            volumes, label_maps, nfe = g.sample_pairs([stream], checked["condition"], settings)
            folder = f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{job.id}"
            sidecar = {"covariates": checked["requested"], "seed": checked["seed"], **settings,
                       "model_id": g.model_id, "model_checksum": g.model_checksum,
                       "autoencoder_checksum": g.autoencoder_checksum, "stage": g.stage, "device": str(g.device),
                       "nfe": nfe, "index": 0, "sample_seed": stream, "attempt": 0, "written_by": "mriflow app"}
            (self.out / folder).mkdir(parents=True, exist_ok=False)
            if label_maps is not None:
                sidecar.update(labels=labels_name(sample_name(0)), label_classes=list(g.label_classes),
                               labels_source=g.labels_meta["source"])
                write_labels(self.out / folder, sample_name(0), label_maps[0], g.affine)
            write_sample(self.out / folder, 0, volumes[0], g.affine, sidecar)
            self.learnt[(settings["solver"], settings["steps"])] = job.calls
            job.folder = folder

    def job(self, job_id: str) -> Job:
        with self.lock:
            if job_id not in self.jobs:
                raise KeyError(f"no job {job_id!r}")
            return self.jobs[job_id]

    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)
        if self.uploads is not None:
            self.uploads.close()


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _covariates(given: Any) -> dict[str, Any]:
    """A request's covariates {name: value} with values a string or a finite number; null or "" is left out."""
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise ValueError(f"covariates must be a JSON object of name: value (e.g. {{\"age\": 30}}), got {shown(given)}")
    covariates = {}
    for name, value in given.items():
        if value is None or value == "":
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"covariate {name!r} must be a string or a number, got {shown(value)}")
        if not isinstance(value, str):
            value = finite(value, f"covariate {name!r}")
        covariates[name] = value
    return covariates


# ---------------------------------------------------------------------- what the output folder holds


def sample_files(out: Path, folder: str) -> list[dict[str, Any]]:
    """The samples of one output folder: {name, image, sidecar, labels (or None)}, paths relative to `out`;
    a file that would be refused when asked for (a link out of `out`) is left out."""
    root = inside(out, folder)

    def servable(path: Path) -> str | None:
        relative = path.relative_to(out.resolve()).as_posix()
        try:
            return relative if existing_file(out, relative) else None
        except (OutsideRootError, FileNotFoundError):
            return None

    samples = []
    for image in sorted(root.glob("*.nii.gz")):
        stem = image.name[:-len(".nii.gz")]
        if stem.endswith("_labels") or stem == "difference" or servable(image) is None:
            continue
        samples.append({"name": stem, "image": servable(image), "sidecar": servable(root / f"{stem}.json"),
                        "labels": servable(root / f"{stem}{LABELS_SUFFIX}")})
    return samples


def outputs(out: Path) -> list[dict[str, Any]]:
    """Every folder of the output folder that holds samples, newest first; one that is refused (a link out of
    the output folder) or cannot be read is skipped, never the whole list."""
    if not out.is_dir():
        return []
    found = []
    for folder in sorted((p for p in out.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True):
        try:
            samples = sample_files(out, folder.name)
        except OSError:  # OutsideRootError (a PermissionError) included
            continue
        if samples:
            found.append({"folder": folder.name, "samples": samples})
    return found


def difference(out: Path, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """B - A of two volumes inside the output folder (float32, A's affine); refused unless on one grid. Errors
    name the volumes as the request did, never by their place on the server."""
    first, first_affine = _read(out, a)
    second, second_affine = _read(out, b)
    if first.shape != second.shape or not np.allclose(first_affine, second_affine, atol=1e-3):
        raise ValueError(f"{a} and {b} are on different grids; a difference needs one grid")
    return (second - first).astype(np.float32), first_affine


def _read(out: Path, relative: str) -> tuple[np.ndarray, np.ndarray]:
    path = existing_file(out, relative)
    try:
        return load_volume(path)
    except Exception:  # nibabel's errors name the absolute path
        raise ValueError(f"{relative}: cannot be read as NIfTI (damaged or not an image)") from None
