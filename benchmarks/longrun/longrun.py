"""The CPU long-run queue (queue.yaml): train the top job in the background in legs, and record each leg.

    python benchmarks/longrun/longrun.py                 # the jobs, one line each, and whether one is training now
    python benchmarks/longrun/longrun.py start           # the top open job in the background (nice 19, one thread)
    python benchmarks/longrun/longrun.py record          # stop it with a checkpoint, measure the leg on the validation
                                                         # split, append it to the job's curve, export its weights

`start` prepares the job's data under runs/longrun/ when it is missing (mriflow prepare from ../shared/data/ixi), then
resumes the job's run folder (runs/longrun/<job>/) or, on a machine that has none, starts it warm from the committed
export (its fp16 weights and step, `mriflow train ... --warm-start`), or fresh when neither exists. The training
writes a checkpoint at least every 10 minutes (--checkpoint-minutes), so a session that ends without `record` loses
at most that much. `record` sends SIGTERM (the loop finishes its step and writes a checkpoint), waits, measures the
latest checkpoint (samples at requests sweeping age and sex, evaluated against the split in `measure` with the
anatomy backbone: FD, precision, recall, coverage, MS-SSIM, high-frequency energy, age MAE), appends the leg (step,
thread-hours from the run's log.csv, wall time, machine, commit) to benchmarks/results/longrun-<job>.json, redraws
docs/longrun_<job>.png and the "## long run: <job>" section of docs/benchmarks.md, and exports the weights to the
job's `export` folder for the next machine. A job reaching target_thread_hours is marked done.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import DOCUMENT, ROOT, link, machine, replace_section, sample_requests, write_result  # noqa: E402

QUEUE = Path(__file__).resolve().parent / "queue.yaml"
WORK = ROOT / "runs" / "longrun"  # git-ignored: data, run folders, logs, pid files
SHARED = ROOT.parent / "shared" / "data" / "ixi"
CHECKPOINT_MINUTES = 10
METRICS = ("fd", "precision", "recall", "coverage")


def load(path: Path = QUEUE) -> tuple[str, list[dict]]:
    """(the header comment, the jobs in priority order)."""
    text = path.read_text()
    return "".join(line + "\n" for line in text.splitlines() if line.startswith("#")), yaml.safe_load(text)["jobs"]


def save(header: str, jobs: list[dict], path: Path = QUEUE) -> None:
    path.write_text(header + yaml.safe_dump({"jobs": jobs}, sort_keys=False, width=120, allow_unicode=True))


def top_job(jobs: list[dict], name: str | None = None) -> dict:
    chosen = [job for job in jobs if (job["name"] == name if name else job["status"] == "open")]
    if not chosen:
        raise SystemExit(f"no {'job named ' + name if name else 'open job'} in {QUEUE}")
    return chosen[0]


def paths(job: dict) -> dict[str, Path]:
    name = job["name"]
    return {"run": WORK / name, "data": WORK / f"data-{job['data']}", "pid": WORK / f"{name}.pid",
            "leg": WORK / f"{name}.leg.json", "logs": WORK / "logs", "export": ROOT / job["export"]}


def running_pid(job: dict) -> int | None:
    """The pid of the job's training process when it is alive."""
    pid_file = paths(job)["pid"]
    if not pid_file.is_file():
        return None
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    return pid if cmdline.is_file() and b"train" in cmdline.read_bytes() else None


def log_rows(run: Path) -> list[dict]:
    if not (run / "log.csv").is_file():
        return []
    with open(run / "log.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def thread_hours(run: Path) -> float:
    """CPU time the run has trained (log.csv cpu_seconds, summed over every leg on every machine), in hours."""
    rows = log_rows(run)
    return float(rows[-1].get("cpu_seconds") or 0.0) / 3600 if rows else 0.0


def hours_before(run: Path, legs: list[dict]) -> float:
    """Thread-hours a warm-started run had trained before its first step, which its log.csv (counting from 0 on the
    new machine) does not hold: the curve's at the last leg up to the warm start's step (0 for a run that was not
    warm-started, or without such a leg)."""
    from mriflow import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run) if run.is_dir() else None
    if latest is None or not (latest / "checkpoint.json").is_file():
        return 0.0
    warm = json.loads((latest / "checkpoint.json").read_text()).get("warm_start") or {}
    earlier = [leg for leg in legs if "step" in warm and leg["step"] <= int(warm["step"])]
    return float(max(earlier, key=lambda leg: leg["step"])["thread_hours"]) if earlier else 0.0


def curve_legs(job: dict) -> list[dict]:
    path = ROOT / "benchmarks" / "results" / f"longrun-{job['name']}.json"
    return json.loads(path.read_text())["legs"] if path.is_file() else []


def prepare_data(job: dict) -> Path:
    data = paths(job)["data"]
    if (data / "manifest.csv").is_file():
        return data
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED}: the shared IXI data is not here; the long run trains on it")
    command = [sys.executable, "-m", "mriflow", "prepare", str(SHARED / "T1"), "--masks", str(SHARED / "labels"),
               "--covariates", str(SHARED / "demographics.csv"), "--preset", job["data"], "--workers", "1",
               "--out", str(data)]
    print("preparing the data:", " ".join(command))
    subprocess.run(command, check=True, cwd=ROOT)
    return data


def start(job: dict) -> None:
    if (pid := running_pid(job)) is not None:
        print(f"{job['name']} is already training (pid {pid})")
        return
    where = paths(job)
    data = prepare_data(job)
    command = [sys.executable, "-m", "mriflow", "train", *job["command"].split()[:1], str(data),
               *job["command"].split()[1:], "--out", str(where["run"]), "--threads", "1",
               "--checkpoint-minutes", str(CHECKPOINT_MINUTES)]
    has_checkpoint = (where["run"] / "checkpoints").is_dir() and any((where["run"] / "checkpoints").glob("step-*"))
    if has_checkpoint:
        command.append("--resume")
        how = "resumed"
    elif (where["export"] / "flow" / "checkpoint.json").is_file():
        command += ["--warm-start", str(where["export"] / "flow")]
        command = _without_condition(command)  # the export's covariates are kept
        how = "warm start from " + job["export"]
    else:
        how = "fresh"
    where["logs"].mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    log = where["logs"] / f"{job['name']}-{stamp}.log"
    with open(log, "w") as stream:
        process = subprocess.Popen(["nice", "-n", "19", *command], stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT,
                                   start_new_session=True)
    where["pid"].write_text(f"{process.pid}\n")
    rows = log_rows(where["run"])
    where["leg"].write_text(json.dumps({"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                        "how": how, "start_step": int(rows[-1]["step"]) if rows else 0,
                                        "start_thread_hours": thread_hours(where["run"]), "log": str(log)}))
    print(f"{job['name']}: training in the background ({how}), pid {process.pid}, log {log}")


def _without_condition(command: list[str]) -> list[str]:
    if "--condition" in command:
        i = command.index("--condition")
        return command[:i] + command[i + 2:]
    return command


def stop(job: dict, timeout_s: float = 900) -> None:
    """SIGTERM: the loop finishes its step and writes a checkpoint; wait for it."""
    pid = running_pid(job)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    waited = time.time()
    while running_pid(job) is not None:
        if time.time() - waited > timeout_s:
            raise SystemExit(f"{job['name']} (pid {pid}) did not stop within {timeout_s:.0f} s; its last checkpoint "
                             "stands (at most 10 minutes old)")
        time.sleep(2)
    print(f"{job['name']}: stopped with a checkpoint")


def measure(checkpoint: Path, data: Path, out: Path, split: str, n: int, seed: int = 0) -> dict:
    """Figures of one checkpoint against `split`: n samples at requests sweeping age and sex."""
    from mriflow.evaluate.generation import evaluate_generation
    from mriflow.generate import load_generator

    generator = load_generator(checkpoint, "cpu", labels=False)
    drawn = sample_requests(generator, out / "samples", n, seed)
    result = evaluate_generation(data, out / "samples", out / "report", split=split, other_split="test" if split == "val" else "val",
                                 progress=False)
    return figures(result, drawn)


def figures(result: dict, drawn: dict | None = None) -> dict:
    """The flat figures a leg (or a bake-off arm) reports, from an evaluation result."""
    columns = result["columns"]
    out = {f"{m}": {k: columns["real_vs_generated"][m][k] for k in ("mean", "sd")} for m in METRICS}
    out.update({f"{m}_real": {k: columns["real_vs_real"][m][k] for k in ("mean", "sd")} for m in METRICS})
    out["ms_ssim"] = {"generated": result["diversity"]["generated"]["mean"], "real": result["diversity"]["real"]["mean"]}
    sets = result["sharpness"]["sets"]
    out["hf_ratio"] = {k: sets["generated"]["laplacian"]["ratio"][k] for k in ("mean", "sd")}
    out["gradient_ratio"] = {k: sets["generated"]["gradient"]["ratio"][k] for k in ("mean", "sd")}
    out["hf_ratio_real"] = {k: sets["other"]["laplacian"]["ratio"][k] for k in ("mean", "sd")}
    age = result["conditional_fidelity"].get("age") or {}
    out["age_mae"] = {"generated": (age.get("generated") or {}).get("mae"), "real": (age.get("real") or {}).get("mae")}
    memorization = result["memorization"]
    out["flagged"] = {"voxel": memorization.get("flagged_voxel"), "feature": memorization.get("flagged_feature")}
    if drawn is not None:
        out.update(seconds_per_volume=drawn["seconds_per_volume"], nfe=drawn["nfe"], settings=drawn["settings"])
    return out


def record(job: dict, args: argparse.Namespace) -> None:
    from mriflow import checkpoint as ckpt
    from mriflow.export import export_generator

    where = paths(job)
    stop(job)
    latest = ckpt.latest_checkpoint(where["run"])
    if latest is None:
        raise SystemExit(f"{where['run']}: no checkpoint to record")
    _, meta = ckpt.load_checkpoint(latest)
    leg = json.loads(where["leg"].read_text()) if where["leg"].is_file() else {}
    before = hours_before(where["run"], curve_legs(job))  # a warm start's log.csv counts from 0
    hours = before + thread_hours(where["run"])
    print(f"measuring {latest} ({hours:.2f} thread-hours) on the {job['measure']['split']} split")
    figures_now = measure(latest, where["data"], WORK / "measure" / f"{job['name']}-step{meta['step']}",
                          job["measure"]["split"], int(job["measure"]["n"]))
    result_path = ROOT / "benchmarks" / "results" / f"longrun-{job['name']}.json"
    curve = json.loads(result_path.read_text()) if result_path.is_file() else {"benchmark": "longrun", "job": job, "legs": []}
    curve["job"] = job
    curve["legs"].append({"step": meta["step"], "thread_hours": round(hours, 3),
                          "leg_thread_hours": round(hours - before - leg.get("start_thread_hours", 0.0), 3),
                          "start_step": leg.get("start_step") or (meta.get("warm_start") or {}).get("step"),
                          "how": leg.get("how"), "started": leg.get("started"),
                          "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "commit": _commit(), "machine": machine(), **figures_now})
    write_result(f"longrun-{job['name']}", curve)
    picture = ROOT / "docs" / f"longrun_{job['name']}.png"
    plot(curve, picture)
    montage = WORK / "measure" / f"{job['name']}-step{meta['step']}" / "report" / "figures" / "montage.png"
    if montage.is_file():  # the leg's samples beside real scans: what the figures are about
        shutil.copyfile(montage, samples_picture(job))
    replace_section(DOCUMENT, f"## long run: {job['name']}", section(curve, picture))
    if not args.no_export:
        if where["export"].exists():
            shutil.rmtree(where["export"])
        export_generator(latest, where["export"])
    if hours >= float(job["target_thread_hours"]):
        header, jobs = load()
        for entry in jobs:
            if entry["name"] == job["name"]:
                entry["status"] = "done"
        save(header, jobs)
    where["leg"].unlink(missing_ok=True)
    print(f"recorded step {meta['step']} at {hours:.2f} thread-hours: {result_path}, {picture}, {where['export']}")
    if args.restart:
        start(job)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return ""


def plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legs = curve["legs"]
    hours = [leg["thread_hours"] for leg in legs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, key, title in ((axes[0], "fd", "FD (anatomy features)"), (axes[1], "coverage", "coverage"),
                             (axes[2], "hf_ratio", "high-frequency energy / real")):
        axis.errorbar(hours, [leg[key]["mean"] for leg in legs], yerr=[leg[key]["sd"] for leg in legs], marker="o")
        reference = key + "_real"
        if reference in legs[-1]:
            axis.axhline(legs[-1][reference]["mean"], color="grey", linestyle="--", label="real vs real")
            axis.legend(fontsize=8)
        axis.set_xlabel("thread-hours of training")
        axis.set_title(title)
    fig.suptitle(f"long run {curve['job']['name']}: {curve['job']['measure']['split']} split, "
                 f"n = {curve['job']['measure']['n']} samples per leg")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(curve: dict, picture: Path) -> str:
    job = curve["job"]
    lines = [f"`python benchmarks/longrun/longrun.py record` after each leg of `python benchmarks/longrun/longrun.py "
             f"start` (queue.yaml job `{job['name']}`: {job['what']}; `mriflow train {job['command']}`, one thread, "
             f"nice 19). Each leg is measured on the {job['measure']['split']} split with {job['measure']['n']} samples at "
             "requests sweeping age and sex (anatomy backbone, bootstrap mean ± sd; Real vs Real = the other split).", "",
             "| leg | step | thread-hours | FD | recall | coverage | MS-SSIM gen / real | HF energy / real | age MAE (y) | s / volume | how |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, leg in enumerate(curve["legs"], 1):
        lines.append(f"| {i} | {leg['step']} | {leg['thread_hours']:.2f} | {leg['fd']['mean']:.1f} ± {leg['fd']['sd']:.1f} "
                     f"(real {leg['fd_real']['mean']:.1f}) | {leg['recall']['mean']:.2f} | {leg['coverage']['mean']:.2f} "
                     f"(real {leg['coverage_real']['mean']:.2f}) | {leg['ms_ssim']['generated']:.3f} / {leg['ms_ssim']['real']:.3f} "
                     f"| {leg['hf_ratio']['mean']:.2f} ± {leg['hf_ratio']['sd']:.2f} | "
                     f"{_age(leg['age_mae'])} | {leg.get('seconds_per_volume', float('nan')):.1f} | {leg.get('how') or ''} |")
    lines += ["", link(picture, DOCUMENT)]
    samples = samples_picture(job)
    if samples.is_file():
        lines += ["", f"The last leg's samples beside real scans of the split (mid slices): {link(samples, DOCUMENT)}."]
    reading = ROOT / "benchmarks" / "results" / f"longrun-{job['name']}-reading.md"
    if reading.is_file():
        lines += ["", reading.read_text().strip()]
    return "\n".join(lines)


def samples_picture(job: dict) -> Path:
    """Where the last recorded leg's real-vs-generated montage is kept (docs/longrun_<job>_samples.png)."""
    return ROOT / "docs" / f"longrun_{job['name']}_samples.png"


def _age(age: dict) -> str:
    if age.get("generated") is None:
        return "n/a"
    return f"{age['generated']:.1f} (predictor {age['real']:.1f})" if age.get("real") is not None else f"{age['generated']:.1f}"


def status(jobs: list[dict]) -> None:
    for job in jobs:
        run = paths(job)["run"]
        pid = running_pid(job)
        rows = log_rows(run)
        step = rows[-1]["step"] if rows else "-"
        hours = hours_before(run, curve_legs(job)) + thread_hours(run)
        print(f"{job['name']:16s} {job['status']:6s} step {step:>6} {hours:6.2f} of {job['target_thread_hours']} "
              f"thread-hours  {'training (pid ' + str(pid) + ')' if pid else 'not running'}  {job['what']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", default="status", choices=("status", "start", "record", "stop"))
    parser.add_argument("--job", help="a job by name (default: the top open one)")
    parser.add_argument("--restart", action="store_true", help="record: start the next leg right after")
    parser.add_argument("--no-export", action="store_true",
                        help="record: measure and append the leg but export no weights (a superseded job's last figures)")
    args = parser.parse_args(argv)
    _, jobs = load()
    if args.action == "status":
        status(jobs)
    elif args.action == "start":
        start(top_job(jobs, args.job))
    elif args.action == "stop":
        stop(top_job(jobs, args.job))
    else:
        record(top_job(jobs, args.job), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
