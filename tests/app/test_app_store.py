"""The Turing test's answer store: one row per (rater, item), durable, shared safely by threads and processes."""

from __future__ import annotations

import csv
import io
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
from scipy import stats

from mriflow.app.store import AnswerStore, Item, StudyMismatch, clopper_pearson, spreadsheet_safe, summary

ITEMS = [Item(f"item{i:02d}", "real" if i % 2 else "synthetic", f"/data/{i}.nii.gz") for i in range(12)]
IDS = [item.id for item in ITEMS]
TRUTH = {item.id: item.truth for item in ITEMS}
STUDY = "f" * 64  # the study's fingerprint


def make_store(path: Path) -> AnswerStore:
    store = AnswerStore(path)
    store.begin_study(STUDY, ITEMS, {"real": "/data", "per_class": 6})
    return store


def test_clopper_pearson_bounds_are_where_the_binomial_tails_are_two_and_a_half_percent():
    for correct, n in [(7, 10), (59, 100), (1, 30), (29, 30)]:
        low, high = clopper_pearson(correct, n)
        assert 0 < low < correct / n < high < 1
        assert stats.binom.sf(correct - 1, n, low) == pytest.approx(0.025, abs=1e-6)  # P(X >= k | low)
        assert stats.binom.cdf(correct, n, high) == pytest.approx(0.025, abs=1e-6)  # P(X <= k | high)
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** (1 / 10)))
    assert clopper_pearson(10, 10) == (pytest.approx(0.025 ** (1 / 10)), 1.0)
    assert summary(0, 0)["accuracy"] is None


def test_a_session_keeps_its_order_and_resumes_where_the_rater_stopped(tmp_path):
    store = make_store(tmp_path / "answers.sqlite")
    order = store.start_session("ann", IDS, random.Random(1))
    assert sorted(order) == sorted(IDS) and order != IDS  # a shuffled permutation
    assert store.start_session("ann", IDS, random.Random(2)) == order  # a second visit gets the same order
    assert store.answer("ann", order[0], "real", 3)
    session = AnswerStore(tmp_path / "answers.sqlite").session("ann")  # a fresh instance, as after a restart
    assert session == {"rater": "ann", "total": 12, "answered": 1, "next": order[1]}
    other = store.start_session("bob", IDS, random.Random(3))
    assert other != order and store.session("bob")["answered"] == 0


def test_a_repeated_answer_is_not_counted_twice_and_the_first_one_stands(tmp_path):
    store = make_store(tmp_path / "answers.sqlite")
    store.start_session("ann", IDS)
    assert store.answer("ann", "item01", "real", 5) is True
    assert store.answer("ann", "item01", "synthetic", 1) is False
    rows = store.answers()
    assert len(rows) == 1 and rows[0]["answer"] == "real" and rows[0]["confidence"] == 5 and rows[0]["correct"] == 1


@pytest.mark.parametrize("answer, confidence, item, error", [
    ("maybe", 3, "item01", ValueError), ("real", 0, "item01", ValueError), ("real", 6, "item01", ValueError),
    ("real", "3", "item01", ValueError), ("real", True, "item01", ValueError), ("real", 3, "elsewhere", ValueError),
])
def test_malformed_answers_are_refused(tmp_path, answer, confidence, item, error):
    store = make_store(tmp_path / "answers.sqlite")
    store.start_session("ann", IDS)
    with pytest.raises(error):
        store.answer("ann", item, answer, confidence)
    with pytest.raises(KeyError):
        store.answer("nobody", "item01", "real", 3)
    assert store.answers() == []


def test_rater_names_are_checked(tmp_path):
    store = make_store(tmp_path / "answers.sqlite")
    for bad in ("", " ", "x" * 65, "a/b", "<script>"):
        with pytest.raises(ValueError):
            store.start_session(bad, IDS)


def test_results_count_per_class_and_per_rater_with_exact_intervals(tmp_path):
    store = make_store(tmp_path / "answers.sqlite")
    for rater in ("ann", "bob"):
        store.start_session(rater, IDS)
    # ann calls everything real: right on the 6 real items, wrong on the 6 synthetic ones
    for item in IDS:
        store.answer("ann", item, "real", 2)
    # bob answers 4 items, all correctly
    for item in IDS[:4]:
        store.answer("bob", item, TRUTH[item], 4)
    results = store.results()
    assert results["overall"]["n"] == 16 and results["overall"]["correct"] == 10
    assert results["overall"]["accuracy"] == pytest.approx(10 / 16)
    assert (results["overall"]["ci_low"], results["overall"]["ci_high"]) == pytest.approx(clopper_pearson(10, 16))
    real, synthetic = results["per_class"]["real"], results["per_class"]["synthetic"]
    assert (real["n"], real["correct"], synthetic["n"], synthetic["correct"]) == (8, 8, 8, 2)
    assert results["per_rater"]["ann"]["accuracy"] == 0.5 and results["per_rater"]["bob"]["accuracy"] == 1.0
    assert results["anchor"]["accuracy"] == 0.594 and "Clopper-Pearson" in results["interval"]
    table = list(csv.DictReader(io.StringIO(store.csv())))
    assert len(table) == 16 and {r["rater"] for r in table} == {"ann", "bob"}
    assert sum(int(r["correct"]) for r in table) == 10


def test_the_database_is_in_wal_mode_and_a_foreign_file_is_refused_in_one_line(tmp_path):
    make_store(tmp_path / "answers.sqlite")
    with sqlite3.connect(tmp_path / "answers.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    (tmp_path / "notes.txt").write_text("not a database, but long enough to be read as a header " * 20)
    with pytest.raises(ValueError, match="cannot be used as the answer database"):
        AnswerStore(tmp_path / "notes.txt")


def test_a_changed_study_is_refused_rather_than_mixed(tmp_path):
    store = make_store(tmp_path / "answers.sqlite")
    store.start_session("ann", IDS)
    store.answer("ann", "item01", "real", 3)
    with pytest.raises(StudyMismatch, match="another study .12 items: real /data, per_class 6, 1 answer[,)]"):
        store.begin_study("e" * 64, ITEMS, {})
    store.begin_study(STUDY, ITEMS, {})  # the same study again: accepted, nothing added
    assert store.fingerprint() == STUDY and store.items() == sorted(ITEMS, key=lambda i: i.id)
    assert len(store.answers()) == 1


def test_formula_cells_are_escaped_and_other_values_kept():
    assert [spreadsheet_safe(v) for v in ("=1+1", "+1", "-1", "@A", "\tx", "ann", "a-b", -1.5, None, 3)] == \
        ["'=1+1", "'+1", "'-1", "'@A", "'\tx", "ann", "a-b", -1.5, None, 3]


# ---------------------------------------------------------------------- several writers at once


def _writer(path: str, rater: str, shared: str) -> tuple[int, int]:
    """Answer every item as `rater`, twice over, and every item as the one `shared` rater; (stored, refused)."""
    store = AnswerStore(path)
    store.start_session(rater, IDS)
    store.start_session(shared, IDS)
    stored = refused = 0
    for _ in range(2):
        for item in IDS:
            for who in (rater, shared):
                if store.answer(who, item, "real", 3):
                    stored += 1
                else:
                    refused += 1
    return stored, refused


def test_concurrent_processes_and_threads_neither_lose_nor_double_count_answers(tmp_path):
    path = str(tmp_path / "answers.sqlite")
    make_store(Path(path))
    jobs = [(path, f"p{p}", "shared") for p in range(4)]
    with ProcessPoolExecutor(4, mp_context=get_context("spawn")) as pool:
        process_results = list(pool.map(_writer, *zip(*jobs)))
    thread_results = []
    threads = [threading.Thread(target=lambda r=f"t{t}": thread_results.append(_writer(path, r, "shared")))
               for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = process_results + thread_results
    store = AnswerStore(path)
    rows = store.answers()
    writers = 8
    assert len(rows) == (writers + 1) * len(IDS)  # every rater's items once, the shared rater's once in all
    assert len({(r["rater"], r["item"]) for r in rows}) == len(rows)
    assert sum(s for s, _ in results) == len(rows)  # exactly one writer was told "stored" for each row
    assert sum(s + f for s, f in results) == writers * 2 * 2 * len(IDS)
    assert store.results()["overall"]["n"] == len(rows)


def test_every_acknowledged_answer_survives_a_killed_process(tmp_path):
    """A writer killed with SIGKILL mid-stream: every answer it printed as stored is there after a restart, once."""
    path = tmp_path / "answers.sqlite"
    make_store(path)
    script = (
        "import sys\nfrom mriflow.app.store import AnswerStore\n"
        f"store = AnswerStore({str(path)!r})\n"
        "for r in range(1000):\n"
        f"    rater = f'k{{r}}'\n    store.start_session(rater, {IDS!r})\n"
        f"    for item in {IDS!r}:\n"
        "        if store.answer(rater, item, 'synthetic', 4):\n"
        "            print(rater, item, flush=True)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    for line in process.stdout:
        acknowledged.append(tuple(line.split()))
        if len(acknowledged) == 40:
            break
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    acknowledged += [tuple(line.split()) for line in process.stdout.read().splitlines() if line.strip()]
    rows = {(r["rater"], r["item"]) for r in AnswerStore(path).answers()}
    assert set(acknowledged) <= rows  # nothing acknowledged is lost
    assert len(rows) >= 40
    assert len(AnswerStore(path).answers()) == len(rows)  # and nothing is there twice
