"""Latent-flow backbones side by side: MONAI's diffusion U-Net against mriflow's 3D DiT (issue 15, deliverable 3).

Each model (a shipped model's name or a generator run) draws the same requests (ages swept over
the training range, sex alternating, seed 7, as benchmarks/default_model.py does) with its default
sampler; `mriflow evaluate generation` compares them with the real test split (Real vs Real and
Real vs Reconstruction columns, anatomy backbone, the same bootstrap). The table: parameters,
training steps x batch (the training compute, matched when equal), training wall time where the
run's log has it, seconds per volume here, FD / precision / recall / density / coverage, MS-SSIM
diversity and the samples flagged as copies. Writes "## backbones: U-Net vs DiT (<grid>)" in
docs/benchmarks.md and benchmarks/results/backbones-<grid>.json.

    python benchmarks/backbones.py --data /tmp/ixi4 --out /tmp/backbones --model unet=4mm --model dit=runs/flow-dit
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from common import DOCUMENT, command_line, link, machine, replace_section, sample_requests, write_result  # noqa: E402  (benchmarks/ is on sys.path)
from mriflow import checkpoint as ckpt
from mriflow.data.dataset import read_preparation
from mriflow.evaluate.generation import evaluate_generation
from mriflow.generate import load_generator
from mriflow.models.velocity import num_parameters

ROWS = ("fd", "precision", "recall", "density", "coverage")


def training_seconds(generator) -> float | None:
    """Wall time of the training run from its log.csv (None for an exported model without its run)."""
    source = generator.meta.get("exported_from", {}).get("path")
    run = ckpt.run_folder(Path(source) if source else generator.path)
    log = run / "log.csv"
    if not log.is_file():
        return None
    with open(log, newline="") as stream:
        rows = list(csv.DictReader(stream))
    return float(rows[-1]["elapsed_seconds"]) if rows and "elapsed_seconds" in rows[-1] else None


def measure(label: str, model: str, data: Path, out: Path, n: int, seed: int) -> dict:
    generator = load_generator(model, "cpu", labels=False)
    samples = out / label / "samples"
    drawn = sample_requests(generator, samples, n, seed)
    result = evaluate_generation(data, samples, out / label / "report", split="test", reconstruct=generator.reconstruct,
                                 autoencoder=generator.meta["autoencoder"]["path"], progress=False)
    config = generator.velocity_net.config
    return {
        "model": model, "model_id": generator.model_id, "backbone": config.backbone,
        "parameters": num_parameters(generator.velocity_net), "steps": generator.meta.get("step"),
        "batch_size": generator.meta.get("batch_size"), "training_seconds": training_seconds(generator),
        "seconds_per_volume": drawn["seconds_per_volume"], "nfe": drawn["nfe"], "settings": drawn["settings"],
        "columns": {c: {m: {k: v[m][k] for k in ("mean", "sd")} for m in ROWS} for c, v in result["columns"].items()},
        "diversity": {k: result["diversity"][k]["mean"] for k in ("real", "generated")},
        "flagged_voxel": result["memorization"]["flagged_voxel"], "age": result["conditional_fidelity"].get("age"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="the prepared dataset the models were trained on")
    parser.add_argument("--out", required=True, type=Path, help="new folder for the samples and the reports")
    parser.add_argument("--model", action="append", required=True, metavar="LABEL=MODEL",
                        help="a model to compare (shipped name or run folder), repeatable")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line(__file__, argv)
    grid = read_preparation(args.data).get("preset", "grid")
    models = dict(item.split("=", 1) for item in args.model)
    results = {label: measure(label, model, args.data, args.out, args.n, args.seed) for label, model in models.items()}
    record = {"command": command, "n": args.n, "results": results, "machine": machine()}
    path = write_result(f"backbones-{grid}", record)

    def cell(entry: dict) -> str:
        return f"{entry['mean']:.3g} ± {entry['sd']:.2g}"

    lines = ["| | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    rows = [("backbone", lambda r: r["backbone"]), ("parameters", lambda r: f"{r['parameters'] / 1e6:.2f} M"),
            ("training: steps x batch", lambda r: f"{r['steps']} x {r['batch_size']}"),
            ("training wall time", lambda r: "not recorded" if r["training_seconds"] is None
             else f"{r['training_seconds'] / 60:.0f} min"),
            ("seconds per volume (batch 1, NFE)", lambda r: f"{r['seconds_per_volume']:.2f} ({r['nfe']})")]
    rows += [(f"{m}, real vs generated", lambda r, m=m: cell(r["columns"]["real_vs_generated"][m])) for m in ROWS]
    rows += [("MS-SSIM diversity (real {:.3f})".format(next(iter(results.values()))["diversity"]["real"]),
              lambda r: f"{r['diversity']['generated']:.3f}"),
             ("flagged as copies (voxel space)", lambda r: f"{r['flagged_voxel']} of {args.n}"),
             ("age MAE, generated vs requested", lambda r: "n/a" if not r["age"] else f"{r['age']['generated']['mae']:.1f} y")]
    for name, value in rows:
        lines.append(f"| {name} | " + " | ".join(value(r) for r in results.values()) + " |")
    first = next(iter(results.values()))
    yardstick = ", ".join(f"{m} {cell(first['columns']['real_vs_real'][m])}" for m in ROWS)
    body = (f"{args.n} requests sweeping age and sex per model, each model's default sampler, against the real test split "
            f"(anatomy backbone; bootstrap mean ± sd). Real vs Real yardstick: {yardstick}. Machine: "
            f"{record['machine']['cpus']} CPUs, {record['machine']['torch_threads']} torch thread(s), load average "
            f"{record['machine']['load_average'][0]}.\n\n    {command}\n\n" + "\n".join(lines) + f"\n\nResult: {link(path, DOCUMENT)}.")
    replace_section(DOCUMENT, f"## backbones: U-Net vs DiT ({grid})", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
