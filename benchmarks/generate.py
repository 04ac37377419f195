"""Generation speed and straightness of the learned flow, for one generator (default: the shipped model).

Speed: seconds per generated volume (noise -> solver -> decode), the median of `--repeats`
timed runs after one warm-up, at batch 1 and batch 8 (--batch-sizes), in float32 and with --bf16 also under
bfloat16 autocast, with the model's default solver settings unless given (Heun, 8 steps), and the peak memory.

Straightness: for fixed seeds, samples drawn with Euler and Heun at 1, 2, 4, 8, 16, 32 steps
are compared voxel by voxel with the adaptive dopri5 reference (rtol = atol = 1e-5):
mean |x_solver - x_dopri5| over the volume, in [0, 1] intensity units. A perfectly straight
flow gives the reference in one Euler step.

End to end: `mriflow generate --n 4` timed as its own process beside the time its imports take (issue 27.3).

Also draws a picture of the model's conditioning (ages 25, 50, 75 x sex F, M; same seed) to
docs/default_model_samples.png. Writes benchmarks/results/generate-<model>-<device>.json and
the "## generate" section of docs/benchmarks.md.

    python benchmarks/generate.py --model default --device cpu
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from common import DOCUMENT, RESULTS, command_line, link, machine, replace_section, write_result  # noqa: E402  (benchmarks/ is on sys.path)
from mriflow.utils.seeding import sample_seed
from mriflow.generate import load_generator
from mriflow.generate_io import batch_montage
from mriflow.models.conditioning import resolve_request

SECTION = "## generate"
STEPS = (1, 2, 4, 8, 16, 32)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def request(generator, covariates: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    known = {k: v for k, v in covariates.items() if k in generator.schema.names}
    return resolve_request(generator.schema, known) if generator.schema.names else None


def end_to_end(model: str, device: str, n: int = 4) -> dict:
    """What a new user waits for (issue 27.3): `mriflow generate --n N` as its own process, wall time from the command
    to the last file (tissue maps included), beside the time to import what it imports (torch, MONAI, mriflow), the
    floor of any command's start-up. One thread, as the README's first command on a laptop."""
    import subprocess
    import tempfile

    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, monai.networks.nets, mriflow.generate"], check=True, env=env)
    imports = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mriflow", "generate", "--model", model, "--out", f"{out}/samples",
                        "--n", str(n), "--device", device, "--threads", "1"], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
    return {"n": n, "wall_seconds": round(wall, 2), "import_seconds": round(imports, 2)}


def time_sampling(generator, settings, condition, batch_size: int, repeats: int, bf16: bool = False) -> dict:
    """Median seconds of `repeats` batches after a warm-up; `bf16`: under bfloat16 autocast (the networks' matrix
    products and convolutions in bf16, on a GPU; the sampler's state stays float32). A batch that does not fit
    the GPU's memory is recorded as such."""
    seeds = [sample_seed(0, i) for i in range(batch_size)]
    cuda = generator.device.type == "cuda"
    autocast = torch.autocast(generator.device.type, dtype=torch.bfloat16, enabled=bf16)
    if cuda:
        torch.cuda.reset_peak_memory_stats(generator.device)
    times = []
    try:
        with autocast:
            generator.sample(seeds, condition, settings)  # warm-up
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize()
                started = time.perf_counter()
                _, nfe = generator.sample(seeds, condition, settings)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"batch_size": batch_size, "bf16": bf16, "out_of_memory": True}
    seconds = statistics.median(times)
    return {"batch_size": batch_size, "bf16": bf16, "nfe": nfe, "seconds_per_batch": round(seconds, 3),
            "seconds_per_volume": round(seconds / batch_size, 4), "volumes_per_second": round(batch_size / seconds, 2),
            "repeats": repeats, "peak_memory_mb": round(peak_memory_mb(generator.device), 1)}


def straightness(generator, condition, samples: int) -> dict:
    seeds = [sample_seed(1, i) for i in range(samples)]
    base = generator.sampling_settings()
    reference, reference_nfe = generator.sample(seeds, condition, {**base, "solver": "dopri5"})
    rows = []
    for solver in ("euler", "heun"):
        for steps in STEPS:
            volumes, nfe = generator.sample(seeds, condition, {**base, "solver": solver, "steps": steps})
            rows.append({"solver": solver, "steps": steps, "nfe": nfe,
                         "mean_abs_difference": float(np.abs(volumes - reference).mean())})
    return {"samples": samples, "dopri5_nfe": reference_nfe, "rows": rows}


def conditioning_picture(generator, path: Path) -> Path | None:
    if not {"age", "sex"} <= set(generator.schema.names):
        return None
    settings = generator.sampling_settings()
    volumes, titles = [], []
    for sex in ("F", "M"):
        for age in (25, 50, 75):
            volume, _ = generator.sample([sample_seed(2, 0)], request(generator, {"age": age, "sex": sex}), settings)
            volumes.append(volume[0])
            titles.append(f"{sex}, {age} y")
    return batch_montage(volumes, path, titles)


def plot(result: dict, path: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.5))
    axis = figure.subplots()
    for solver in ("euler", "heun"):
        rows = [r for r in result["straightness"]["rows"] if r["solver"] == solver]
        axis.plot([r["nfe"] for r in rows], [r["mean_abs_difference"] for r in rows], "o-", label=solver)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("network evaluations (NFE)")
    axis.set_ylabel("mean |x - x_dopri5| (voxel)")
    axis.set_title("distance to the dopri5 reference")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="generator run or checkpoint folder, or 'default'")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--solver", help="default: the model's own (the shipped default: euler)")
    parser.add_argument("--steps", type=int, help="default: the model's own (the shipped default: 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the timings (default 1: the figures are per thread, as the docs say)")
    parser.add_argument("--samples", type=int, default=8, help="fixed seeds for the straightness figure")
    parser.add_argument("--batch-sizes", type=lambda text: [int(n) for n in text.split(",")], default=[1, 8],
                        help="batch sizes timed (comma-separated; default 1,8)")
    parser.add_argument("--bf16", action="store_true", help="also time each batch size under bfloat16 autocast")
    parser.add_argument("--section", default=SECTION, help="the section of the document to write (default '## generate')")
    parser.add_argument("--document", default=str(DOCUMENT), help="markdown file to write the section into "
                        "(default docs/benchmarks.md; pictures go beside it)")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the result JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    document = Path(args.document)
    command = command_line(__file__, argv)

    torch.set_num_threads(args.threads)
    generator = load_generator(args.model, args.device)
    settings = generator.sampling_settings(args.solver, args.steps)
    condition = request(generator, {"age": 50.0, "sex": "F"})
    speed = [time_sampling(generator, settings, condition, batch, args.repeats, bf16)
             for bf16 in ((False, True) if args.bf16 else (False,)) for batch in args.batch_sizes]
    result = {
        "benchmark": "generate", "command": command, "model": generator.model_id, "model_checksum": generator.model_checksum,
        "stage": generator.stage, "image_shape": list(generator.image_shape), "latent_shape": list(generator.latent_shape),
        "settings": settings, "covariates": {"age": 50.0, "sex": "F"}, "speed": speed,
        "straightness": straightness(generator, condition, args.samples) if generator.stage == "flow" else None,
        "peak_memory_mb": round(peak_memory_mb(generator.device), 1), "machine": machine(),
        "end_to_end": end_to_end(args.model, args.device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    name = "default" if args.model == "default" else Path(args.model).name
    path = write_result(f"generate-{name}-{generator.device.type}", result, Path(args.results))
    docs = document.parent
    picture = conditioning_picture(generator, docs / "default_model_samples.png") if args.model == "default" else None
    speed_rows = "\n".join(f"| {s['batch_size']} | {'bf16' if s['bf16'] else 'fp32'} | out of memory | | | |"
                           if s.get("out_of_memory") else
                           f"| {s['batch_size']} | {'bf16' if s['bf16'] else 'fp32'} | {s['nfe']} | {s['seconds_per_volume']} | "
                           f"{s['volumes_per_second']} | {s['peak_memory_mb']:.0f} |" for s in speed)
    body = f"""Model `{result['model']}` ({result['stage']}, {' x '.join(map(str, result['image_shape']))} voxels), {settings['solver']} with {settings['steps']} steps, guidance {settings['guidance']}, age 50 / F; noise -> ODE -> decode, median of {args.repeats} runs after a warm-up. Machine: {result['machine']['cpus']} CPUs, {result['machine']['gpu'] or 'no GPU'}, {result['machine']['torch_threads']} torch threads, load average {result['machine']['load_average'][0]}; peak memory {result['peak_memory_mb']:.0f} MB.

    {command}

| batch | precision | NFE per sample | seconds per volume | volumes per second | peak memory (MB) |
|---|---|---|---|---|---|
{speed_rows}
"""
    e2e = result["end_to_end"]
    body += (f"\nEnd to end (a new user's first command, one thread): `mriflow generate --model {args.model} --n {e2e['n']}` "
             f"took {e2e['wall_seconds']:.1f} s of wall time, tissue maps included; importing torch, MONAI and mriflow "
             f"alone {e2e['import_seconds']:.1f} s (the floor of any command's start-up).\n")
    if result["straightness"]:
        plot(result, docs / "flow_straightness.png")
        rows = result["straightness"]["rows"]
        table = "\n".join(
            f"| {steps} | " + " | ".join(f"{r['mean_abs_difference']:.4f} ({r['nfe']})" for r in rows if r["steps"] == steps) + " |"
            for steps in STEPS)
        body += f"""
Straightness: mean |x - x_dopri5| over {args.samples} fixed seeds (intensities in [0, 1]; NFE in brackets; dopri5 took {result['straightness']['dopri5_nfe']} evaluations). Plot: `docs/flow_straightness.png`.

| steps | Euler | Heun |
|---|---|---|
{table}
"""
    if picture is not None:
        body += "\nConditioning picture (one seed, one row per request: F and M at ages 25, 50, 75): `docs/default_model_samples.png`.\n"
    body += f"\nResult: {link(path, document)}."
    replace_section(document, args.section, body)
    print(json.dumps({k: result[k] for k in ("speed", "straightness")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
