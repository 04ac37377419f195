"""Run one job of the device queue within a wall-clock budget, writing only what may come back.

On the lent GPU machine (see benchmarks/device/README.md), from the repository root:

    python3 benchmarks/device/run.py J1a --minutes 5 --out $OUT

installs the carried wheels (`pip install --no-index --no-deps --target`), rebuilds the
prepared dataset from `.device/data.npz.xz`, trains with the stage's preset on CUDA (bf16
autocast), and writes to `--out` at most 8 files, each under 16 MiB and at most two folders
down: fp16 weights (a checkpoint folder mriflow loads), log.csv, a montage and result.json
(figures, settings, device, timings, the command). `land.py` puts them in place here.

The budget is kept by measuring first: a short probe run (critics on, the costliest step)
gives steps per second, the schedule (max_steps, warm-up, the adversarial start, EMA) is
fitted to the minutes left, and the loop's own wall-clock stop ends it with a checkpoint if the
estimate was optimistic. `--rehearse` runs the same code path on the CPU with a few steps and
no wheels (CI does, so the first GPU call works).

Jobs: J1a autoencoder-base at 2 mm; J1b flow-base at 2 mm on the committed 2 mm autoencoder;
J2 the anatomy network at 2 mm from scratch (on the carried tissue maps; land.py calibrates and
measures it on the test split); J4 the 1 mm presets' speed and memory and the torchrun/NCCL paths;
J5 generation seconds per volume of the shipped models on the GPU. J3 is in queue.yaml, waiting
for its code here.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KIT = ROOT / ".device"
AUTOENCODER_2MM = ROOT / "src" / "mriflow" / "weights" / "2mm-gpu" / "autoencoder"
MAX_FILES, MAX_FILE_BYTES, MAX_DEPTH = 8, 16 * 2**20, 2  # what the device tool brings back
PROBE_STEPS = 30  # steps of the throughput probe (the first logged interval, with start-up, is not used)
RESERVE_SECONDS = 75  # kept for validation, export and writing after training
ADVERSARIAL_FRACTION = 0.6  # the autoencoder's critics join after this share of the steps


@dataclasses.dataclass
class Job:
    """What a job function gets: where things are, its deadline, and whether this is the CPU rehearsal."""

    data: Path
    work: Path
    out: Path
    deadline: float  # time.monotonic() by which everything must be written
    rehearse: bool
    autoencoder: Path
    command: str = ""  # the run.py command line, for records that travel with the weights

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


# ---- the schedule fitted to the budget ------------------------------------------------------------


def steps_per_second(log_file: Path, volumes_per_step: int) -> float:
    """Median training speed over the log rows after the first (which holds start-up and autotuning)."""
    with open(log_file, newline="") as stream:
        speeds = [float(row["volumes_per_second"]) for row in csv.DictReader(stream)][1:]
    if not speeds:
        raise RuntimeError(f"{log_file}: the probe logged too few rows to measure the speed")
    return statistics.median(speeds) / volumes_per_step


def fit_steps(rate: float, seconds: float, rehearse: bool) -> int:
    """Optimizer steps that fit `seconds` at `rate` steps/s, with a tenth kept back for logging and checkpoints."""
    return 4 if rehearse else max(50, int(0.9 * rate * seconds))


def fitted_loop(loop, steps: int, rehearse: bool):
    """The preset's loop settings rescaled to a run of `steps` steps."""
    return dataclasses.replace(
        loop, max_steps=steps, warmup_steps=max(1, min(loop.warmup_steps, steps // 10)),
        # an EMA horizon (1 / (1 - decay)) of at most a tenth of the run
        ema_decay=min(loop.ema_decay, max(0.0, 1.0 - 10.0 / steps)), log_every=max(1, min(loop.log_every, steps // 20)),
        montage_every=steps, checkpoint_every=steps, **rehearsal_loop(rehearse))


def rehearsal_loop(rehearse: bool) -> dict[str, Any]:
    return {"device": "cpu", "batch_size": 2, "num_workers": 0} if rehearse else {"device": "cuda"}


def probe_loop(loop, rehearse: bool):
    return dataclasses.replace(loop, max_steps=10_000, log_every=1 if rehearse else 5, montage_every=10_000,
                               checkpoint_every=10_000, **rehearsal_loop(rehearse))


def probe_steps(rehearse: bool) -> int:
    return 3 if rehearse else PROBE_STEPS


# ---- jobs ----------------------------------------------------------------------------------------


def autoencoder_job(job: Job) -> dict[str, Any]:
    """J1a: autoencoder-base on the 2 mm training split; validation SSIM/PSNR on the carried val split."""
    from mriflow.evaluate.reconstruction import evaluate_reconstruction
    from mriflow.train.autoencoder import load_config, train_autoencoder

    config = load_config("base")
    probe = dataclasses.replace(config, loss=dataclasses.replace(config.loss, adversarial_start=0),
                                loop=probe_loop(config.loop, job.rehearse))
    started = time.monotonic()
    train_autoencoder(job.data, job.work / "probe", config=probe, stop_at_step=probe_steps(job.rehearse))
    loop = probe.loop
    rate = steps_per_second(job.work / "probe" / "log.csv", loop.batch_size * loop.grad_accumulation)
    probe_seconds = time.monotonic() - started
    seconds = job.seconds_left() - RESERVE_SECONDS * (not job.rehearse)
    steps = fit_steps(rate, seconds, job.rehearse)
    config = dataclasses.replace(
        config, loop=fitted_loop(config.loop, steps, job.rehearse),
        loss=dataclasses.replace(config.loss, adversarial_start=int(ADVERSARIAL_FRACTION * steps)))
    run = job.work / "run"
    result = train_autoencoder(job.data, run, config=config, max_minutes=max(seconds, 1.0) / 60)
    validation = evaluate_reconstruction(job.data, run, split="val", out=job.work / "val",
                                         device="cpu" if job.rehearse else "auto")
    export_checkpoint(run, job.out / "autoencoder")
    shutil.copy(run / "log.csv", job.out / "log.csv")
    shutil.copy(job.work / "val" / "montage.png", job.out / "montage.png")
    return {"stage": "autoencoder", "preset": "base", "probe": {"steps_per_second": round(rate, 3),
                                                                 "seconds": round(probe_seconds, 1)},
            "schedule": {"max_steps": steps, "adversarial_start": config.loss.adversarial_start,
                         "warmup_steps": config.loop.warmup_steps, "ema_decay": config.loop.ema_decay},
            "steps": result["step"], "validation": {k: v["mean"] for k, v in validation["metrics"].items()},
            "validation_subjects": validation["subjects"]}


def flow_job(job: Job) -> dict[str, Any]:
    """J1b: flow-base on the latents of the committed 2 mm autoencoder, conditioned on age and sex."""
    from mriflow.train.generator import load_config, train_flow

    if not (job.autoencoder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{job.autoencoder}: no autoencoder; land J1a first (or pass --autoencoder)")
    config = load_config("flow", "base")
    if job.rehearse:  # the phantoms' latents are small: a narrower network, the same code path
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, channels=(16, 32, 32),
                                                                       num_head_channels=8, norm_num_groups=8))
    probe = dataclasses.replace(config, loop=probe_loop(config.loop, job.rehearse))
    started = time.monotonic()  # the probe also encodes the dataset (cached for the run)
    train_flow(job.data, job.autoencoder, job.work / "probe", condition=["age", "sex"], config=probe,
               stop_at_step=probe_steps(job.rehearse))
    rate = steps_per_second(job.work / "probe" / "log.csv", probe.loop.batch_size * probe.loop.grad_accumulation)
    probe_seconds = time.monotonic() - started
    seconds = job.seconds_left() - RESERVE_SECONDS * (not job.rehearse)
    steps = fit_steps(rate, seconds, job.rehearse)
    config = dataclasses.replace(config, loop=fitted_loop(config.loop, steps, job.rehearse))
    run = job.work / "run"
    result = train_flow(job.data, job.autoencoder, run, condition=["age", "sex"], config=config,
                        max_minutes=max(seconds, 1.0) / 60)
    export_checkpoint(run, job.out / "flow", autoencoder_path="../autoencoder")
    shutil.copy(run / "log.csv", job.out / "log.csv")
    montages = sorted((run / "montages").glob("*.png"))
    if montages:
        shutil.copy(montages[-1], job.out / "montage.png")
    return {"stage": "flow", "preset": "base", "autoencoder": str(job.autoencoder.relative_to(ROOT))
            if job.autoencoder.is_relative_to(ROOT) else str(job.autoencoder),
            "probe": {"steps_per_second": round(rate, 3), "seconds": round(probe_seconds, 1)},
            "schedule": {"max_steps": steps, "warmup_steps": config.loop.warmup_steps, "ema_decay": config.loop.ema_decay},
            "steps": result["step"], "final_metrics": result.get("metrics")}


def anatomy_job(job: Job) -> dict[str, Any]:
    """J2: the anatomy network on the 2 mm training split's tissue maps, from scratch (anatomy-small with the 4 mm
    recipe's learning rate, since nothing is fine-tuned), selected on the carried val split about 20 times in the run.
    Writes the selected EMA weights in the backbone's format (kernels fp16) with a training record that
    `benchmarks/anatomy.py --init FILE --epochs 0` (land.py) accepts: the calibration and the test split are here's."""
    import torch

    from mriflow.data.dataset import read_manifest
    from mriflow.models.anatomy import save_anatomy_encoder
    from mriflow.train.anatomy import anatomy_network, load_config, train_anatomy
    from pack import label_map

    labels = label_map(job.data)
    if labels is None:
        raise FileNotFoundError(f"{job.data}: the kit carries no tissue maps; pack a prepared folder with label maps")
    config = load_config("small")
    # from scratch: the 4 mm recipe's rate; augmentation on the CPU in 4 loader processes beside the GPU (the
    # same draws as in one: they are a function of (seed, epoch, item); rehearsal_loop sets 0 on the CPU)
    config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, lr=load_config("tiny").loop.lr,
                                                                  num_workers=4))
    probe = dataclasses.replace(config, loop=probe_loop(config.loop, job.rehearse))
    started = time.monotonic()
    train_anatomy(job.data, job.work / "probe", config=probe, label_map=labels, stop_at_step=probe_steps(job.rehearse))
    rate = steps_per_second(job.work / "probe" / "log.csv", probe.loop.batch_size * probe.loop.grad_accumulation)
    probe_seconds = time.monotonic() - started
    seconds = job.seconds_left() - RESERVE_SECONDS * (not job.rehearse)
    steps = fit_steps(rate, seconds, job.rehearse)
    loop = fitted_loop(config.loop, steps, job.rehearse)
    splits = read_manifest(job.data)["split"]
    per_epoch = max(1, int((splits == "train").sum()) // loop.batch_size)
    # warm-up a tenth of the run, as the 4 mm recipe from scratch; validate (and checkpoint) once an epoch, at
    # most about 20 times: each costs a pass over the val split
    loop = dataclasses.replace(loop, warmup_steps=max(1, steps // 10), checkpoint_every=max(per_epoch, steps // 20),
                               keep_checkpoints=1)
    config = dataclasses.replace(config, loop=loop)
    run = job.work / "run"
    result = train_anatomy(job.data, run, config=config, label_map=labels, max_minutes=max(seconds, 1.0) / 60)
    best = result["best"]
    if best is None:
        raise RuntimeError(f"{run}: no finite validation loss in {result['step']} steps; nothing to select")
    training_seconds = time.monotonic() - started
    with open(run / "validation.csv", newline="") as stream:
        history = [{"epoch": round(int(row["step"]) / per_epoch, 2), "step": int(row["step"]),
                    **{f"val_{k}": round(float(v), 4) for k, v in row.items() if k != "step"}}
                   for row in csv.DictReader(stream)]
    record = {"commands": [job.command],
              "epochs_run": round(result["step"] / per_epoch, 2), "best_epoch": round(best["step"] / per_epoch, 2),
              "steps": result["step"], "best_step": best["step"], "batch_size": loop.batch_size, "lr": loop.lr,
              "loss_weights": {"age": config.age_weight, "sex": config.sex_weight},
              "schedule": f"linear warm-up over {loop.warmup_steps} steps, cosine decay; EMA {loop.ema_decay}; AdamW "
                          f"weight decay {loop.weight_decay}; selected on the val split every {loop.checkpoint_every} steps",
              "trained_on": f"an {device_record()['device']}" if not job.rehearse else "the CPU (rehearsal)",
              "train_minutes": round(training_seconds / 60, 1), "history": history}
    save_anatomy_encoder(job.out / "anatomy.safetensors", anatomy_network(best["checkpoint"]), record=record,
                         dtype=torch.float16)
    shutil.copy(run / "log.csv", job.out / "log.csv")
    shutil.copy(run / "validation.csv", job.out / "validation.csv")
    montages = sorted((run / "montages").glob("*.png"))
    if montages:
        shutil.copy(montages[-1], job.out / "montage.png")
    return {"stage": "anatomy", "preset": "small", "probe": {"steps_per_second": round(rate, 3),
                                                              "seconds": round(probe_seconds, 1)},
            "schedule": {"max_steps": steps, "warmup_steps": loop.warmup_steps, "ema_decay": loop.ema_decay,
                         "lr": loop.lr, "checkpoint_every": loop.checkpoint_every},
            "steps": result["step"], "best_step": best["step"],
            "validation": {k: round(v, 4) for k, v in best["validation"].items()},
            "validation_subjects": int((splits == "val").sum())}


class RandomVolumes:
    """`count` items of random inputs of one shape, for throughput and memory where the content does not matter."""

    def __init__(self, key: str, shape: tuple[int, ...], count: int = 64):
        self.key, self.shape, self.count = key, shape, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        item = torch.rand(self.shape) if self.key == "image" else torch.randn(self.shape)
        return {self.key: item, "mask": torch.ones(self.shape, dtype=torch.uint8), "covariates": torch.zeros(0),
                "covariates_present": torch.zeros(0, dtype=torch.bool)}


def measure_stage(name: str, stage, dataset, loop, work: Path, rehearse: bool) -> dict[str, Any]:
    """Training speed (median volumes/s after the first logged interval) and peak GPU memory of a few steps."""
    import torch

    from mriflow.config import to_dict
    from mriflow.train import loop as training

    loop = dataclasses.replace(probe_loop(loop, rehearse), num_workers=0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    training.train(stage, dataset, loop, work / name, {"stage": name, "config": {"loop": to_dict(loop)}},
                   stop_at_step=probe_steps(rehearse))
    volumes_per_step = loop.batch_size * loop.grad_accumulation
    return {"batch_size": loop.batch_size, "bf16_autocast": loop.amp and not rehearse,
            "steps_per_second": round(steps_per_second(work / name / "log.csv", volumes_per_step), 3),
            "volumes_per_second": round(steps_per_second(work / name / "log.csv", volumes_per_step) * volumes_per_step, 2),
            "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
            "seconds": round(time.monotonic() - started, 1)}


def large_presets_job(job: Job) -> dict[str, Any]:
    """J4: the 1 mm (large) presets' training speed and memory on random inputs with bf16 autocast, then the
    NCCL paths no CPU test reaches: torchrun (one process per GPU) for `train autoencoder` and `generate`."""
    from mriflow.config import get_grid
    from mriflow.train.autoencoder import AutoencoderStage
    from mriflow.train.autoencoder import load_config as autoencoder_config
    from mriflow.families.flow import RectifiedFlow
    from mriflow.train.generator import GeneratorStage
    from mriflow.train.generator import load_config as generator_config

    shape = (64, 64, 64) if job.rehearse else get_grid("1mm").shape  # the critic needs 4 halvings
    figures: dict[str, Any] = {"grid": "rehearsal" if job.rehearse else "1mm", "image_shape": list(shape)}
    config = autoencoder_config("large")
    adversarial = dataclasses.replace(config, loss=dataclasses.replace(config.loss, adversarial_start=0))
    if job.rehearse:
        adversarial = dataclasses.replace(adversarial, model=dataclasses.replace(config.model, channels=(8, 16, 16),
                                                                                 norm_num_groups=4))
    figures["autoencoder_large"] = measure_stage("autoencoder", AutoencoderStage(adversarial),
                                                 RandomVolumes("image", (1, *shape)), adversarial.loop, job.work,
                                                 job.rehearse)
    flow = generator_config("flow", "large")
    latent = adversarial.model.latent_shape(shape)
    figures["flow_large"] = measure_stage("flow", GeneratorStage(RectifiedFlow(flow), latent), RandomVolumes("latent", latent), flow.loop,
                                          job.work, job.rehearse)
    device = [] if job.rehearse else ["--device", "cuda"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "mriflow"]
    commands = {
        "train_autoencoder_torchrun": torchrun + ["train", "autoencoder", str(job.data), "--preset", "base",
                                                  "--max-steps", "4", "--out", str(job.work / "ddp-autoencoder")],
        "generate_torchrun": torchrun + ["generate", "--model", "4mm", "--out", str(job.work / "ddp-samples"),
                                         "--batch-size", "8", *device],
    }
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    for name, command in commands.items():
        started = time.monotonic()
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=environment,
                                  timeout=max(30.0, job.seconds_left() - 20))
        except subprocess.TimeoutExpired as error:  # recorded, not fatal: the figures above still come back
            figures[name] = {"command": " ".join(command[1:]), "exit_code": None, "timed_out_after": error.timeout}
            continue
        figures[name] = {"command": " ".join(command[1:]), "exit_code": done.returncode,
                         "seconds": round(time.monotonic() - started, 1), "output_tail": (done.stdout + done.stderr)[-1500:]}
    figures["nccl"] = not job.rehearse  # torchrun on CUDA initialises the NCCL backend (gloo on the CPU)
    return {"stage": "large presets", **figures}


def generation_job(job: Job) -> dict[str, Any]:
    """J5: seconds per volume and volumes per second of the shipped model(s) on the GPU at batch sizes 1-64, in
    float32 and under bf16 autocast (benchmarks/generate.py, its own section; issue 27.4)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import generate as benchmark

    from mriflow.generate import shipped_models

    models = list(shipped_models())
    device = "cpu" if job.rehearse else "cuda"
    sections = []
    for model in models:
        sections.append(f"## generate on a GPU: {model}")
        benchmark.main(["--model", model, "--device", device, "--repeats", "1" if job.rehearse else "5",
                        "--samples", "1" if job.rehearse else "8", "--section", sections[-1],
                        "--batch-sizes", "1,2" if job.rehearse else "1,2,4,8,16,32,64", "--bf16",
                        "--document", str(job.out / "sections.md"), "--results", str(job.out)])
    return {"stage": "generate", "models": models, "sections": sections}


JOBS: dict[str, Callable[[Job], dict[str, Any]]] = {"J1a": autoencoder_job, "J1b": flow_job, "J2": anatomy_job,
                                                  "J4": large_presets_job, "J5": generation_job}


# ---- outputs --------------------------------------------------------------------------------------


def export_checkpoint(run: Path, target: Path, autoencoder_path: str | None = None) -> Path:
    """The run's latest inference weights as an fp16 checkpoint folder (no train state), with where it was trained."""
    from mriflow import checkpoint as ckpt

    weights, meta = ckpt.load_checkpoint(run)
    meta.pop("path")
    meta["trained_on"] = device_record()
    if autoencoder_path is not None:
        meta["autoencoder"] = {**meta["autoencoder"], "path": autoencoder_path}
    ckpt.save_checkpoint(target, weights, meta, weights_dtype="float16")
    return target


def check_outputs(out: Path) -> list[str]:
    """What the device tool would not bring back: too many files, files too large or too deep, odd names."""
    files = [p for p in out.rglob("*") if p.is_file()]
    problems = [f"{len(files)} files (at most {MAX_FILES})"] if len(files) > MAX_FILES else []
    for path in files:
        relative = path.relative_to(out)
        if path.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{relative} is {path.stat().st_size / 2**20:.1f} MiB (at most 16)")
        if len(relative.parts) - 1 > MAX_DEPTH:
            problems.append(f"{relative} is more than {MAX_DEPTH} folders down")
        if any(not re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in relative.parts):
            problems.append(f"{relative} has characters other than letters, digits, '.', '_' and '-'")
    return problems


def device_record() -> dict[str, Any]:
    import torch

    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
            "cpus": os.cpu_count()}


def install_wheels(kit: Path) -> list[str]:
    """pip install the carried wheels into a private folder put first on sys.path (nothing is fetched)."""
    wheels = sorted((kit / "wheels").glob("*.whl"))
    if not wheels:
        return []
    target = Path(tempfile.gettempdir()) / "mriflow-site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)], check=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    return [w.name for w in wheels]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock budget of the whole job")
    parser.add_argument("--out", required=True, help="output folder (the device tool's $OUT)")
    parser.add_argument("--kit", default=str(KIT), help="what pack.py wrote (default .device)")
    parser.add_argument("--autoencoder", default=str(AUTOENCODER_2MM), help="J1b: the 2 mm autoencoder checkpoint folder")
    parser.add_argument("--rehearse", action="store_true", help="the same code path on the CPU, a few steps, no wheels")
    args = parser.parse_args(argv)

    deadline = time.monotonic() + 60 * args.minutes
    out, kit = Path(args.out), Path(args.kit)
    if not (kit / "data.npz.xz").is_file() and args.job != "J5":
        print(f"run: {kit} has no data.npz.xz; run benchmarks/device/pack.py first", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "job": args.job, "command": "python3 benchmarks/device/run.py " + " ".join(map(shlex.quote, argv or sys.argv[1:])),
        "minutes_budget": args.minutes, "rehearsal": args.rehearse,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    begun = time.monotonic()
    try:
        record["wheels"] = [] if args.rehearse else install_wheels(kit)
        sys.path.insert(0, str(ROOT / "src"))
        import torch

        if not args.rehearse and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device; use --rehearse on a CPU machine")
        torch.backends.cudnn.benchmark = True
        from pack import unpack

        with tempfile.TemporaryDirectory(prefix="mriflow-device-") as folder:
            work = Path(folder)
            data = unpack(kit, work / "data") if args.job != "J5" else work
            record["unpack_seconds"] = round(time.monotonic() - begun, 1)
            job = Job(data, work, out, deadline, args.rehearse, Path(args.autoencoder).resolve(), record["command"])
            record["result"] = JOBS[args.job](job)
        record["status"] = "done"
    except Exception as error:  # the record comes back either way: say what failed, with its traceback
        record.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        print(record["traceback"], file=sys.stderr)
    record["seconds"] = round(time.monotonic() - begun, 1)
    record["machine"] = device_record()
    (out / "result.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    problems = check_outputs(out)
    if problems:
        print("run: the device tool would not bring back: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(json.dumps({k: record[k] for k in ("job", "status", "seconds") if k in record}))
    return 0 if record["status"] == "done" else 1


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
