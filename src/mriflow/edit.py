"""This brain at 75: a real scan edited by inverting the flow (issue 28).

A rectified flow's ODE is invertible: integrating dx/dt = v(x, t, c) backwards from a subject's own data end x1
(its latent, or its Haar bands) to t = 0 under the covariates c it was scanned with gives a noise x0 that holds
what is particular to that person; integrating forwards again from that x0 under other covariates c' draws the
same person as they would look with c' (older, the other sex). Several targets share one inversion. The round
trip under unchanged covariates comes back to the scan up to the solver's error (and, for a latent model, the
autoencoder's reconstruction), which `edit_volume` returns beside the edits.

What an edit returns keeps the scan's own detail. The model's round trip is only as sharp as its representation (a
latent model's autoencoder blurs: SSIM 0.93 against the scan at 2 mm), and that loss is the same in the round trip and
the edit, so it cancels in their difference. Three ways to deliver an edit (`detail`, DETAILS):
  "moved" (the default)  the deformation that carries the round trip onto the edit (demons registration of two drawings
                         of one person) applied to the scan, plus the intensity change it does not explain: the scan's
                         own edges move with widening ventricles and a shrinking brain;
  "scan"                 scan + (edited − round trip), inside the scan's outline as the edit moved it: the change added
                         where it happens, so the scan's old edges stay beside the new ones (ghost walls at 70-80 y);
  "model"                the model's own drawing (what an image-space model gives up to its solver's error).
Under unchanged covariates "moved" and "scan" return the scan itself. Measured at 2 mm (benchmarks/counterfactuals.py,
val split, where the default and its cubic warp were chosen): total brain −19.4 ml per decade moved, −17.3 added, −19.7
drawn (population −21.6 [−24.7, −18.7]); predicted-age slope 0.53 / 0.51 / 0.61; +20 y edit against the scan SSIM
0.88 / 0.91 / 0.84, sharpness 1.05 / 1.05 / 0.62 x the scan's.

    >>> generator = load_generator("2mm")
    >>> result = edit_volume(generator, volume, {"age": 52, "sex": "F"}, [{"age": 75}], steps=16)
    >>> result.edited[0], result.round_trip, result.difference[0]       # (D, H, W) each; the edit, in [0, 1]

Only families whose sampler is the flow's ODE can be inverted (mriflow.families.flow and its image-space use).
`guidance` w ≠ 1 runs both ways on the guided field v_u + w·(v_c − v_u) (under the source covariates back, the
target's forth): still an ODE, so still invertible in the limit of small steps, but its larger curvature costs
round-trip fidelity at a given number of steps (DDIM inversion's known trade, null-text inversion); w > 1 strengthens
what the covariates change (the age effect), at 1 the conditional velocity alone (the default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mriflow.flow.guidance import guided_prediction
from mriflow.flow.path import LinearPath
from mriflow.flow.sampling import evaluating
from mriflow.flow.solvers import FIXED_STEP
from mriflow.generator import Generator
from mriflow.models.conditioning import resolve_request

INVERTIBLE_SOLVERS = ("euler", "heun", "midpoint", "rk4")
WARP_ORDER = 3  # cubic splines for the moved output's intensities: chosen on val over linear, which softened the
# scan (sharpness 1.05 vs 0.89 x the scan's, volumes alike; docs/benchmarks.md "counterfactuals: 2mm-val")
DEFAULT_DETAIL = "moved"  # what `mriflow edit` delivers unless --detail says otherwise (docs/benchmarks.md "counterfactuals")
DETAILS = {"scan": "the scan plus the edit's change (edited − round trip), clipped to [0, 1]; exactly 0 outside the "
                   "scan's brain as the edit moved its outline (less the voxels it emptied, plus those it filled): the "
                   "scan's own detail kept (mriflow.edit.transfer_detail)",
           "moved": "the scan's detail moved with the edit: the deformation carrying the round trip onto the edit "
                    "(symmetric demons) applied to the scan with cubic splines, plus what it does not explain "
                    "(edited − moved round trip), clipped to [0, 1]; 0 outside the moved brain (mriflow.edit.move_detail)",
           "model": "the model's own drawing of the edited brain (its representation's detail)"}
SCAN_BACKGROUND = ("exactly 0 outside the scan's brain as the edit moved its outline (the scan's zero background, less "
                   "the voxels the edit emptied, plus those it filled)")


@dataclass
class EditResult:
    """The volumes of one edit, each (D, H, W) float32 in [0, 1] with the generator's affine: the scan as the model
    represents it, its round trip under the source covariates, one edited volume per target (with the scan's detail
    or the model's, `settings["detail"]`), the model's own drawings of them, and what each edit changed: edited − the
    scan (details "moved" and "scan"; 0 where nothing changed) or edited − round trip (detail "model")."""

    source: np.ndarray
    round_trip: np.ndarray
    edited: list[np.ndarray]
    difference: list[np.ndarray]
    targets: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    latents: torch.Tensor | None = None  # (T, C, d, h, w): each edit's data end, what a label decoder reads
    drawn: list[np.ndarray] = field(default_factory=list)  # the model's own edited volumes (= edited for "model")
    nfe: int = 0  # network evaluations per edited volume (its share of the inversion included)


def check_invertible(generator: Generator, solver: str) -> LinearPath:
    """The generator's linear path, refusing a family that is not a flow (diffusion, GAN, slices) or a solver without a
    fixed grid to run backwards, in one line."""
    path = generator.family.path
    if not isinstance(path, LinearPath) or generator.family.space != "latent":
        raise ValueError(f"the {generator.stage} model {generator.path} cannot be inverted: only a rectified flow "
                         "(`mriflow train flow`, on latents or a representation) has an ODE to run backwards")
    if solver not in INVERTIBLE_SOLVERS:
        raise ValueError(f"--solver {solver}: an edit runs the ODE backwards on a fixed grid; choose one of "
                         f"{', '.join(INVERTIBLE_SOLVERS)}")
    return path


def encode_volume(generator: Generator, volume: np.ndarray) -> torch.Tensor:
    """A volume (D, H, W) in [0, 1] on the model's grid -> its data end x1 (1, C, d, h, w): the Haar bands of an
    image-space model, or the autoencoder's posterior mean (scaled) of a latent one."""
    if tuple(volume.shape) != generator.image_shape:
        raise ValueError(f"the scan's grid {tuple(volume.shape)} is not the model's {generator.image_shape}; prepare it "
                         "with `mriflow prepare` at the model's preset")
    image = torch.as_tensor(np.asarray(volume, np.float32)).clamp(0, 1)[None, None].to(generator.device)
    with torch.no_grad():
        if generator.representation is not None:
            return generator.representation.encode(image)
        if generator.autoencoder is None:
            raise ValueError(f"the {generator.stage} model {generator.path} has nothing to encode a scan with")
        return generator.autoencoder.encode(image).mean * generator.latent_scale


def integrate(generator: Generator, x: torch.Tensor, covariates: tuple[torch.Tensor, torch.Tensor] | None,
              t_steps: torch.Tensor, solver: str, guidance: float = 1.0) -> torch.Tensor:
    """Integrate the flow's ODE from x at t_steps[0] to t_steps[-1] (either direction) under `covariates`
    (the conditional velocity; with `guidance` ≠ 1 the guided one)."""
    path = check_invertible(generator, solver)
    values, present = (None, None) if covariates is None else (covariates[0][None], covariates[1][None])
    with evaluating(generator.velocity_net):
        predict = guided_prediction(generator.velocity_net, values, present, guidance)

        def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return path.convert(predict(x_t, t), x_t, t, path.prediction, "velocity")

        x_end, _ = FIXED_STEP[solver](velocity, x, t_steps.to(x.device))
    return x_end


def transfer_detail(scan: np.ndarray, round_trip: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """scan + (edited − round trip) in [0, 1] inside the scan's brain as the edit moved its outline (less the voxels
    the edit emptied, plus those it filled: the model's volumes are exactly 0 outside their brains), exactly 0
    elsewhere: the scan's detail with the edit's change, and the scan itself where nothing changed."""
    scan = np.asarray(scan, np.float32)
    removed = (round_trip > 0) & (edited == 0)
    added = (edited > 0) & (round_trip == 0)
    inside = ((scan > 0) & ~removed) | added
    return np.where(inside, np.clip(scan + (edited - round_trip), 0.0, 1.0), 0.0).astype(np.float32)


def edit_deformation(round_trip: np.ndarray, edited: np.ndarray, iterations: int = 60,
                     smoothing: float = 1.5) -> np.ndarray:
    """The displacement (D, H, W, 3) in voxels, along the array's axes, that carries the model's round trip onto its
    edit: round_trip(x + u(x)) ≈ edited(x), by SimpleITK's symmetric-forces demons (both are the model's own drawings
    of one person, so intensities match and a demons force is the right one); the field is smoothed by a Gaussian of
    `smoothing` voxels each iteration, which keeps it smooth and invertible at these sizes."""
    import SimpleITK as sitk

    fixed = sitk.GetImageFromArray(np.ascontiguousarray(edited, np.float32))
    moving = sitk.GetImageFromArray(np.ascontiguousarray(round_trip, np.float32))
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(smoothing)
    field = demons.Execute(fixed, moving)  # vectors in (x, y, z) = the array's (W, H, D) axes
    return sitk.GetArrayFromImage(field)[..., ::-1].astype(np.float32)


def warp(volume: np.ndarray, coordinates: np.ndarray, order: int = 1) -> np.ndarray:
    """volume sampled at `coordinates` (3, D, H, W: x + u(x), from sample_points) with splines of `order` (1: linear),
    0 outside the grid."""
    from scipy import ndimage

    return ndimage.map_coordinates(np.asarray(volume, np.float32), coordinates, order=order, mode="constant", cval=0.0)


def sample_points(displacement: np.ndarray) -> np.ndarray:
    """x + u(x) for a displacement (D, H, W, 3) in voxels: where warp samples, made once for every volume it moves."""
    return np.indices(displacement.shape[:3], dtype=np.float32) + np.moveaxis(displacement, -1, 0)


def move_detail(scan: np.ndarray, round_trip: np.ndarray, edited: np.ndarray, order: int = WARP_ORDER) -> np.ndarray:
    """The scan's detail moved with the edit: the deformation that carries the model's round trip onto its edit
    (edit_deformation) applied to the scan and to the round trip (intensities with splines of `order`, their brain
    masks linearly), then transfer_detail on the moved pair. Where the edit moves anatomy (ventricles widening, cortex
    thinning) the scan's own edges move with it instead of staying where they were; what no deformation explains (a
    change of contrast) is added as the intensity change. An unchanged target returns the scan itself."""
    scan = np.asarray(scan, np.float32)
    if np.array_equal(edited, round_trip):
        return transfer_detail(scan, round_trip, edited)
    points = sample_points(edit_deformation(round_trip, edited))
    moved = [np.where(warp((v > 0).astype(np.float32), points) >= 0.5, warp(v, points, order), 0.0)
             for v in (scan, round_trip)]
    return transfer_detail(*moved, edited)


def deliver(detail: str, scan: np.ndarray, round_trip: np.ndarray, edited: np.ndarray, **options: Any) -> np.ndarray:
    """One edit as `detail` (DETAILS) asks: the model's drawing, or the scan's detail added or moved with the change
    (`options` go to move_detail)."""
    if detail == "model":
        return np.asarray(edited, np.float32)
    if detail == "scan":
        return transfer_detail(scan, round_trip, edited)
    return move_detail(scan, round_trip, edited, **options)


def edit_volume(generator: Generator, volume: np.ndarray, source: Mapping[str, Any],
                targets: Sequence[Mapping[str, Any]], steps: int = 16, solver: str = "heun",
                guidance: float = 1.0, detail: str = DEFAULT_DETAIL) -> EditResult:
    """Invert `volume` under the covariates `source` and draw it again under each of `targets` (a covariate left out of
    a target keeps its source value), both ways at `guidance`; `detail` says whose detail the edits carry (DETAILS).
    See the module docstring."""
    if steps < 1:
        raise ValueError(f"--steps {steps}: at least 1")
    if detail not in DETAILS:
        raise ValueError(f"--detail {detail}: choose one of {', '.join(DETAILS)}")
    path = check_invertible(generator, solver)
    settings = generator.sampling_settings(solver, steps, guidance)  # refuses a guidance the model has no use for
    # the whole grid both ways (a data prediction's velocity is read through its clipped divisor up to t = 1 too)
    grid = path.time_grid(steps, settings.get("time_shift", 1.0), dtype=torch.float32)
    x1 = encode_volume(generator, volume)
    wanted = [{**dict(source), **dict(target)} for target in targets]
    conditions = [resolve_request(generator.schema, request) for request in (source, *wanted)]
    x0 = integrate(generator, x1, conditions[0], grid.flip(0), solver, guidance)
    drawn = [integrate(generator, x0, condition, grid, solver, guidance) for condition in conditions]
    volumes = generator.decode(torch.cat([x1, *drawn]))  # (2 + T, D, H, W): the scan, the round trip, the edits
    model_edits = list(volumes[2:])
    scan = np.asarray(volume, np.float32).clip(0.0, 1.0)
    edited = [deliver(detail, scan, volumes[1], edit) for edit in model_edits]
    per_solve = steps * {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4}[solver]
    return EditResult(source=volumes[0], round_trip=volumes[1], edited=edited,
                      difference=[edit - (volumes[1] if detail == "model" else scan) for edit in edited], targets=wanted,
                      settings={"solver": solver, "steps": steps, "guidance": float(guidance), "detail": detail,
                                "time_shift": settings.get("time_shift", 1.0), "source_covariates": dict(source)},
                      latents=torch.cat(drawn[1:]), drawn=model_edits,
                      nfe=per_solve * (1 + len(drawn)) // max(1, len(targets)))


def edit_scan(model: str | Path | Generator, scan: str | Path, out: str | Path, targets: Sequence[Mapping[str, Any]],
              source: Mapping[str, Any] | None = None, steps: int = 16, solver: str = "heun", device: str = "auto",
              labels: bool = True, trust_paths: bool = False, overwrite: bool = False,
              guidance: float = 1.0, detail: str = DEFAULT_DETAIL) -> list[Path]:
    """Edit one scan into files: OUT/<scan>_<target>.nii.gz per target with its tissue map (_labels) and difference map
    (_diff: edit − scan, or edit − round trip with detail "model"), OUT/<scan>_roundtrip.nii.gz, and a JSON sidecar
    per edit that says where it came from (the scan's path and SHA-256, the inversion's covariates, solver and steps)
    and that it derives from a real person, so the privacy filter does not apply; `detail` as in `edit_volume`.
    `source` defaults to the scan's row of the prepared folder it lies in (DATA/images/SUBJECT.nii.gz with
    DATA/manifest.csv). `model` may be a loaded Generator (a batch of scans loads
    it once). Returns the edited volumes' paths."""
    from mriflow import __version__
    from mriflow.data.background import BACKGROUND_RULE
    from mriflow.data.io import load_volume, save_volume
    from mriflow.generate import load_generator
    from mriflow.generate_io import labels_name, write_labels, write_sample
    from mriflow.utils.files import sha256

    scan, out = Path(scan), Path(out)
    if not scan.is_file():
        raise FileNotFoundError(f"--scan {scan}: no such file; give a prepared volume on the model's grid")
    generator = model if isinstance(model, Generator) else load_generator(model, device, trust_paths,
                                                                            labels=None if labels else False)
    source = dict(source) if source else recorded_covariates(scan, generator.schema.names)
    volume, affine = load_volume(scan)
    if not np.allclose(affine, generator.affine, atol=1e-3):
        raise ValueError(f"--scan {scan}: its affine is not the model's template grid; prepare it with `mriflow prepare` "
                         "at the model's preset")
    result = edit_volume(generator, volume, source, targets, steps, solver, guidance, detail)
    stem = scan.name.removesuffix(".gz").removesuffix(".nii")
    names = [f"{stem}_{target_label(target, source)}" for target in result.targets]
    clashes = [str(out / f"{n}{s}") for n in [*names, f"{stem}_roundtrip"] for s in (".nii.gz", ".json")
               if (out / f"{n}{s}").exists()]
    if clashes and not overwrite:
        raise FileExistsError(f"{clashes[0]} already exists; choose another --out (edits are never overwritten)")
    maps = generator.decode_labels(result.latents, np.stack(result.edited)) if generator.labels is not None else None
    common = {"seed": None, "solver": solver, "steps": steps, "guidance": float(guidance), "nfe": result.nfe,
              "detail": {"kept": detail, "how": DETAILS[detail]},
              "background": BACKGROUND_RULE if detail == "model" else SCAN_BACKGROUND,
              "model_id": generator.model_id, "model_checksum": generator.model_checksum,
              "representation": generator.representation_name,
              "source": {"scan": str(scan.resolve()), "sha256": sha256(scan), "covariates": source},
              "derived_from_real_person": True,
              "privacy_filter": "does not apply: the volume is this person's scan, edited", "mriflow_version": __version__}
    paths = []
    for k, (name, target) in enumerate(zip(names, result.targets)):
        sidecar = {**common, "covariates": target, "edit": {"from": source, "to": target}}
        if maps is not None:
            sidecar["labels"] = labels_name(name)
        paths.append(write_sample(out, k, result.edited[k], generator.affine, sidecar, overwrite=overwrite, name=name))
        save_volume(edit_files(paths[-1], scan)["difference"], result.difference[k], generator.affine)
        if maps is not None:
            write_labels(out, name, maps[k], generator.affine, overwrite=overwrite)
    write_sample(out, len(names), result.round_trip, generator.affine,
                 {**common, "covariates": source, "edit": {"from": source, "to": source},
                  "detail": {"kept": "model", "how": "the model's own round trip, what the difference maps subtract"}},
                 overwrite=overwrite,
                 name=f"{stem}_roundtrip")
    return paths


def edit_files(edited: Path, scan: Path) -> dict[str, Path]:
    """The files `edit_scan` writes beside an edited volume OUT/<scan>_<target>.nii.gz: "image" (itself), "difference"
    (its _diff map), "sidecar" (its JSON) and "round_trip" (the scan's round trip, shared by every target)."""
    name = edited.name.removesuffix(".nii.gz")
    stem = Path(scan).name.removesuffix(".gz").removesuffix(".nii")
    return {"image": edited, "difference": edited.with_name(f"{name}_diff.nii.gz"),
            "round_trip": edited.with_name(f"{stem}_roundtrip.nii.gz"), "sidecar": edited.with_name(f"{name}.json")}


def recorded_covariates(scan: Path, names: Sequence[str]) -> dict[str, Any]:
    """The covariates the prepared folder holding `scan` recorded for it (DATA/images/SUBJECT.nii.gz)."""
    from mriflow.data.dataset import read_manifest

    root = scan.resolve().parent.parent
    if not (root / "manifest.csv").is_file():
        raise ValueError(f"--scan {scan}: not in a prepared folder whose manifest.csv records its covariates; give "
                         f"them with --from (e.g. --from age=52,sex=F)")
    manifest = read_manifest(root)
    rows = manifest[manifest["image"].map(lambda p: (root / p).resolve() == scan.resolve())]
    if rows.empty:
        raise ValueError(f"--scan {scan}: {root / 'manifest.csv'} has no row for it; give its covariates with --from")
    row = rows.iloc[0]
    return {name: (None if pd_missing(row.get(name)) else row.get(name)) for name in names}


def pd_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def target_label(target: Mapping[str, Any], source: Mapping[str, Any]) -> str:
    """A file-name part for what an edit changes, e.g. "age-75" or "age-75_sex-F" ("same" when nothing)."""
    changed = [f"{k}-{format(v, 'g') if isinstance(v, float) else v}" for k, v in target.items()
               if source.get(k) != v]
    return "_".join(changed) or "same"


def read_batch(path: str | Path) -> list[tuple[Path, dict[str, Any] | None, list[dict[str, Any]]]]:
    """A batch of edits from a CSV/TSV: a `scan` column (paths relative to the table's folder, or absolute), target
    covariates in the other columns (age, sex, ...), the scan's own covariates in optional `from_<name>` columns
    (default: its prepared manifest's row); an empty cell leaves that covariate out. Rows of one scan share its
    inversion: [(scan, source or None, [target, ...])] in the table's order."""
    from mriflow.data.inputs import read_text_table
    from mriflow.models.conditioning import parse_value

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--batch {path}: no such file; give a CSV with a scan column and target columns")
    try:
        table = read_text_table(path)
    except Exception as error:  # pandas raises several types for malformed text
        raise ValueError(f"--batch {path}: cannot be read as CSV/TSV ({str(error).splitlines()[0]})") from None
    if "scan" not in table.columns or table.empty:
        raise ValueError(f"--batch {path}: needs a 'scan' column and at least one row (columns: {', '.join(table.columns)})")
    targets = [c for c in table.columns if c != "scan" and not c.startswith("from_")]
    if not targets:
        raise ValueError(f"--batch {path}: no target column; add e.g. age or sex beside scan")
    batch: dict[Path, tuple[dict[str, Any] | None, list[dict[str, Any]]]] = {}
    for number, row in enumerate(table.to_dict("records"), start=2):  # line numbers as a spreadsheet shows them
        if not row["scan"].strip():
            raise ValueError(f"--batch {path}, line {number}: the scan cell is empty")
        scan = Path(row["scan"].strip())
        scan = scan if scan.is_absolute() else path.parent / scan
        if not scan.is_file():
            raise FileNotFoundError(f"--batch {path}, line {number}: {scan}: no such file (scan paths are relative to "
                                    "the table's folder)")
        target = {c: parse_value(row[c].strip()) for c in targets if row[c].strip()}
        if not target:
            raise ValueError(f"--batch {path}, line {number}: no target value; fill in at least one of {', '.join(targets)}")
        source = {c.removeprefix("from_"): parse_value(row[c].strip()) for c in table.columns
                  if c.startswith("from_") and row[c].strip()} or None
        known, edits = batch.setdefault(scan, (source, []))
        if known != source:
            raise ValueError(f"--batch {path}, line {number}: {scan} has other from_ covariates than on an earlier line")
        edits.append(target)
    return [(scan, source, edits) for scan, (source, edits) in batch.items()]

