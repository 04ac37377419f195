"""The worker pool of `mriflow prepare`: subjects run in spawned processes of one thread each, which
hold the run's lock and end with the run.

    >>> outcomes = run_subjects(tasks, workers=4, progress=True, lock=out / LOCK_FILE)

The run holds ``OUT/.prepare.lock`` (exclusively, then shared: ``prepare._alone_in``); each worker
takes it shared too (:func:`_init_worker`) and dies with the run's process (:func:`_end_with_parent`),
so a second run into the same folder is refused while any of them lives, and no orphan goes on
writing into a folder a rerun may be writing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import SimpleITK as sitk
from tqdm.auto import tqdm

from mriflow.data.subject import SubjectOutcome, SubjectTask, prepare_subject
from mriflow.utils.files import FileLock

LOCK_FILE = ".prepare.lock"
LOCK_WAIT_SECONDS = 5.0  # a run waits this long for the workers of a killed one to end before it is refused
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def run_subjects(tasks: Sequence[SubjectTask], workers: int, progress: bool, lock: Path) -> list[SubjectOutcome]:
    """Prepare every task, in this process when `workers` is 1 (or one task), else in a pool of spawned
    processes holding `lock`; one outcome per task, in the order they finished."""
    outcomes: list[SubjectOutcome] = []
    if not tasks:
        return outcomes
    bar = tqdm(total=len(tasks), desc="prepare", unit="subject", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1 or len(tasks) == 1:
            with _single_thread():
                for task in tasks:
                    outcomes.append(prepare_subject(task))
                    bar.update()
        else:
            # spawn: fresh interpreters, so no thread pool (ITK, OpenMP, tqdm) is copied half-alive by fork.
            context = multiprocessing.get_context("spawn")
            pool = concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context,
                                                          initializer=_init_worker, initargs=(os.getpid(), str(lock)))
            try:
                futures = {pool.submit(prepare_subject, task): task for task in tasks}
                for future in concurrent.futures.as_completed(futures):
                    task = futures[future]
                    try:
                        outcomes.append(future.result())
                    except Exception as error:  # e.g. a worker killed for memory
                        outcomes.append(SubjectOutcome(task.subject, task.image, f"worker process failed: {type(error).__name__}: {error}"))
                    bar.update()
            except BaseException:
                # Ctrl-C: drop the queued subjects instead of finishing them; finished ones are kept (resume).
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()
    finally:
        bar.close()
    return outcomes


_RUN_LOCK: FileLock | None = None  # a worker's hold on its run's lock, kept until the worker ends


def _init_worker(parent: int, lock: str) -> None:
    """Set a worker process up: one thread (the workers are the parallelism), ended with the run's
    process `parent`, holding the run's lock (shared) so no other run starts while it could still write."""
    global _RUN_LOCK
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[name] = "1"
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    _end_with_parent(parent)
    _RUN_LOCK = FileLock(lock)
    if not _RUN_LOCK.acquire(shared=True, wait_seconds=LOCK_WAIT_SECONDS):
        raise RuntimeError(f"{lock} is held by another prepare run")


def _end_with_parent(parent: int) -> None:
    """End this process as soon as `parent` ends, however it ends (SIGKILL, out of memory): an orphaned
    worker would go on writing the subjects queued to it into a folder a rerun may be writing.

    On Linux the kernel kills it (prctl PR_SET_PDEATHSIG), at once and with no thread of ours; the
    signal follows the death of the parent *thread* that started the worker, which for the pool is the
    one calling submit(), i.e. the one running the whole run. Elsewhere a daemon thread polls
    os.getppid() twice a second (after a parent's death the orphan is re-parented, so the id changes).
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:  # the parent died before the request was made
                    os._exit(1)
                return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


@contextlib.contextmanager
def _single_thread():
    """Run in this process with one ITK/torch thread, as a worker would, then restore the settings."""
    itk_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch is not None else None
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(torch_threads or torch.get_num_threads())
