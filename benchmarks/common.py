"""What the benchmark scripts share: writing their section of docs/benchmarks.md and their JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"


def replace_section(document: Path, header: str, body: str) -> None:
    """Replace (or append) the section starting at the line `header`, up to the next '## ' header.

    A hand-written paragraph of the old section that starts with "Reading:" (what the figures
    mean) is kept at the end unless the new body brings its own."""
    text = document.read_text() if document.is_file() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == header), None)
    reading: list[str] = []
    if start is None:
        lines += ["", header]
        start, end = len(lines) - 1, len(lines)
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        first = next((i for i in range(start + 1, end) if lines[i].startswith("Reading:")), None)
        if first is not None and "\nReading:" not in "\n" + body:
            reading = [""] + "\n".join(lines[first:end]).strip("\n").splitlines()
    following = lines[end:]
    new = lines[:start] + [header, ""] + body.strip("\n").splitlines() + reading + ([""] if following else []) + following
    document.parent.mkdir(parents=True, exist_ok=True)
    document.write_text("\n".join(new).rstrip("\n") + "\n")


def write_result(name: str, result: dict, folder: Path = RESULTS) -> Path:
    """<folder>/<name>.json, by default benchmarks/results/<name>.json"""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def link(path: Path, document: Path) -> str:
    """A markdown link to `path` from `document`: [path relative to the repository](path relative to the document)."""
    path = Path(path).resolve()
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return f"[{shown}]({os.path.relpath(path, Path(document).resolve().parent)})"


def machine() -> dict:
    """Where a figure was measured: CPU count, load average, torch threads, GPU if any."""
    import torch

    return {
        "cpus": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that produced a figure, to record beside it: `python benchmarks/<script> <arguments>`."""
    import shlex
    import sys

    arguments = argv or sys.argv[1:]
    return " ".join(["python", f"benchmarks/{Path(script).name}", *(shlex.quote(a) for a in arguments)])


def sample_requests(generator, out: Path, n: int, seed: int, settings: dict | None = None) -> dict:
    """Draw `n` samples of a loaded generator into `out` as `generate` writes them, at requests that sweep the
    training range of age (evenly over [min + 2, max - 2] years) with sex alternating, one volume at a time
    from the noise stream sample_seed(seed, i); the conditional-fidelity rows of an evaluation then have
    something to measure. Returns {"ages", "seconds_per_volume", "nfe", "settings"}."""
    import time

    import numpy as np

    from mriflow.generate_io import write_sample
    from mriflow.models.conditioning import resolve_request
    from mriflow.utils.seeding import sample_seed

    settings = settings or generator.sampling_settings()
    age = generator.schema["age"]
    ages = np.linspace(age.minimum + 2, age.maximum - 2, n)
    seconds, nfe = 0.0, 0
    for index, requested_age in enumerate(ages):
        request = {"age": round(float(requested_age), 1), "sex": "FM"[index % 2]}
        stream = sample_seed(seed, index)
        started = time.perf_counter()
        volumes, nfe = generator.sample([stream], resolve_request(generator.schema, request), settings)
        seconds += time.perf_counter() - started
        write_sample(out, index, volumes[0], generator.affine,
                     {"covariates": request, "seed": seed, "sample_seed": stream, **settings, "nfe": nfe,
                      "model_id": generator.model_id, "model_checksum": generator.model_checksum})
    return {"ages": ages.tolist(), "seconds_per_volume": seconds / n, "nfe": nfe, "settings": settings}


def within(row: dict, reference: dict, key: str, lower_is_better: bool) -> bool:
    """`row`'s mean of `key` no worse than `reference`'s by more than the reference's bootstrap sd."""
    value, ref, sd = row[key]["mean"], reference[key]["mean"], reference[key]["sd"]
    return value <= ref + sd if lower_is_better else value >= ref - sd


def quality_checks(row: dict, reference: dict, seconds: float) -> dict[str, bool]:
    """Issue 27's targets for one sampler or decoder against its reference: FD within the reference's bootstrap sd,
    recall, coverage and sharpness no lower by more than one sd, and under `seconds` per volume at batch 8."""
    return {"fd": within(row, reference, "fd", True), "recall": within(row, reference, "recall", False),
            "coverage": within(row, reference, "coverage", False), "hf": within(row, reference, "hf_ratio", False),
            "seconds": row["seconds_per_volume_batch8"] < seconds}


def verdict(checks_by_label: dict[str, dict[str, bool]]) -> dict:
    """{"status": met when one row meets every check, "rows", "met_by"}."""
    met = [label for label, checks in checks_by_label.items() if all(checks.values())]
    return {"status": "met" if met else "missed", "rows": checks_by_label, "met_by": met}


def verdict_lines(record_verdict: dict, what: str) -> list[str]:
    """The markdown lines that state a `verdict`: "Targets (what): **status** by ...", then one line per row."""
    met_by = record_verdict.get("met_by")
    lines = [f"Targets ({what}): **{record_verdict['status']}**" + (f" by {', '.join(met_by)}" if met_by else "") + "."]
    for label, checks in (record_verdict.get("rows") or {}).items():
        lines.append(f"- {label}: " + ", ".join(f"{k} {'met' if v else 'missed'}" for k, v in checks.items()))
    return lines
