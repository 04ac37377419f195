"""The device queue (queue.yaml): which GPU job is next, and the call that runs it.

    python benchmarks/device/jobqueue.py            # the jobs, one line each
    python benchmarks/device/jobqueue.py next       # the top open job, its pack command and the exact device call
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

QUEUE = Path(__file__).resolve().parent / "queue.yaml"
START_UP_MINUTES = 2  # the machine's start and the copy of the working tree, added to a job's timeout


def load(path: Path = QUEUE) -> tuple[str, list[dict]]:
    """(the header comment, the jobs in priority order)."""
    text = path.read_text()
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    return header, yaml.safe_load(text)["jobs"]


def save(header: str, jobs: list[dict], path: Path = QUEUE) -> None:
    path.write_text(header + yaml.safe_dump({"jobs": jobs}, sort_keys=False, width=120, allow_unicode=True))


def next_job(jobs: list[dict]) -> dict | None:
    return next((job for job in jobs if job["status"] == "open"), None)


def device_call(job: dict) -> dict:
    """The arguments of the device tool's `run` for `job`."""
    return {"command": f"set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/device/run.py {job['id']} --minutes {job['minutes']} "
                       f"--out $OUT 2>&1 | tee $OUT/output.log",
            "carry": [".device"], "timeout_s": int(60 * (job["minutes"] + START_UP_MINUTES))}


def pack_command(job: dict, data: str = "<the 2 mm prepared folder>") -> str:
    """The pack.py call that carries what `job` reads (its `pack` arguments in the queue): the travelling tree is
    measured against the device's limit with that job's data, not every job's."""
    arguments = str(job.get("pack", "")).split()
    return " ".join(["python benchmarks/device/pack.py", *([] if "--no-data" in arguments else ["--data", data]), *arguments])


def mark_done(job_id: str, record: dict, path: Path = QUEUE) -> None:
    header, jobs = load(path)
    job = next((j for j in jobs if j["id"] == job_id), None)
    if job is None:
        raise ValueError(f"{path}: no job {job_id}")
    job.update(status="done", **record)
    save(header, jobs, path)


def main(argv: list[str]) -> int:
    _, jobs = load()
    if argv[:1] == ["next"]:
        job = next_job(jobs)
        if job is None:
            print("no open job in the device queue")
            return 0
        print(f"{job['id']}: {job['what']}")
        print(f"pack first: {pack_command(job)}")
        print(f"device run: {device_call(job)}")
        return 0
    for job in jobs:
        print(f"{job['id']:4} {job['minutes']:>3} min  {job['status']:<12.40}  {job['what']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
