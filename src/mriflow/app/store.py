"""The answers of a visual Turing test, in SQLite, and what they add up to.

One database file (WAL journal, synchronous=FULL) holds one study, in four tables:

    study    (key, value)                                    its fingerprint (turing.fingerprint) and how it was drawn
    items    (id, truth 'real'|'synthetic', source)          the volumes of the study
    raters   (name, created, item_order)                     a rater's session: their own random order
    answers  (rater, item, truth, answer, confidence, seconds, created)   PRIMARY KEY (rater, item)

Every call opens its own connection and commits before it returns, so an answer that was acknowledged
survives a crash or a restart, and several processes or threads may write at once (SQLite serializes
the writers; a busy database is waited for). The primary key makes a repeated answer (a double
click, a retried request, a second tab) a no-op that is reported, never a second count.

Accuracy comes with an exact Clopper-Pearson 95 % interval (the binomial's own quantiles through the
beta distribution; it never falls below the nominal coverage, unlike the Wald interval) and a
two-sided binomial test against chance (50 %).

The file holds the truth of every item, so it must lie outside every folder the app serves (`launch` sees to
that), and a database of another study is refused (`begin_study`), never mixed with this one; `move_aside` renames
it so that a new study can start at its path, deleting nothing. The CSV export escapes a cell that a spreadsheet
would run as a formula (one starting with = + - @, a tab or a carriage return) with a leading apostrophe.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from scipy import stats

from mriflow.utils.text import counted

TRUTHS = ("real", "synthetic")
CONFIDENCE = (1, 5)  # 1 = guessing, 5 = certain
RATER_NAME = re.compile(r"^[\w .@+-]{1,64}$")
LEVEL = 0.95
# The yardstick next to the result: Park et al., JMIR 2021 (readers telling real from synthetic body CT).
ANCHOR = {"accuracy": 0.594, "text": "Park et al. (JMIR 2021): readers told real from synthetic body CT with "
                                    "59.4 % accuracy"}
CSV_COLUMNS = ("rater", "item", "truth", "answer", "correct", "confidence", "seconds", "created")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet read a cell as a formula (OWASP)

SCHEMA = """
CREATE TABLE IF NOT EXISTS study (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    truth TEXT NOT NULL CHECK (truth IN ('real', 'synthetic')),
    source TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS raters (
    name TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    item_order TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    rater TEXT NOT NULL REFERENCES raters(name),
    item TEXT NOT NULL REFERENCES items(id),
    truth TEXT NOT NULL CHECK (truth IN ('real', 'synthetic')),
    answer TEXT NOT NULL CHECK (answer IN ('real', 'synthetic')),
    confidence INTEGER NOT NULL CHECK (confidence BETWEEN 1 AND 5),
    seconds REAL,
    created TEXT NOT NULL,
    PRIMARY KEY (rater, item)
);
"""


class StudyMismatch(ValueError):
    """The database holds the answers of another study."""


@dataclass(frozen=True)
class Item:
    id: str
    truth: str  # "real" | "synthetic"
    source: str  # where the volume is, for the organizer (never sent to a rater)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def clopper_pearson(correct: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided interval of a binomial proportion correct / n."""
    if n <= 0:
        return (0.0, 1.0)
    alpha = 1.0 - level
    low = 0.0 if correct == 0 else float(stats.beta.ppf(alpha / 2, correct, n - correct + 1))
    high = 1.0 if correct == n else float(stats.beta.ppf(1 - alpha / 2, correct + 1, n - correct))
    return (low, high)


def summary(correct: int, n: int) -> dict[str, Any]:
    """{n, correct, accuracy, ci_low, ci_high, p_chance}: accuracy with its exact 95 % interval and the
    two-sided binomial test against 50 %."""
    low, high = clopper_pearson(correct, n)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None, "ci_low": low, "ci_high": high,
            "p_chance": float(stats.binomtest(correct, n, 0.5).pvalue) if n else None}


class AnswerStore:
    """The Turing test's SQLite file; safe to share between threads and processes (see the module's text)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(self.connect()) as db:
                db.execute("PRAGMA journal_mode=WAL")  # persistent: recorded in the file
                db.executescript(SCHEMA)
        except sqlite3.DatabaseError as error:  # not a database, or a damaged one
            raise ValueError(f"{self.path}: cannot be used as the answer database ({error}); give another --db") from None

    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)  # autocommit; BEGIN IMMEDIATE by hand
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    # ------------------------------------------------------------------ study and sessions

    def begin_study(self, fingerprint: str, items: Sequence[Item], description: dict[str, Any],
                    secret: str | None = None) -> None:
        """Record the study (its fingerprint, its items, how it was drawn) in an empty database, or check that the
        database holds this study: StudyMismatch, with what it holds, when it holds another. A database written
        before fingerprints were recorded is taken for this study when its items are exactly this study's."""
        with closing(self.connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                recorded = dict(db.execute("SELECT key, value FROM study").fetchall())
                held = set(db.execute("SELECT id, truth FROM items").fetchall())
                if recorded.get("fingerprint", fingerprint) != fingerprint or (
                        "fingerprint" not in recorded and held and held != {(i.id, i.truth) for i in items}):
                    raise StudyMismatch(self._held(db, recorded, len(held)))
                if "fingerprint" not in recorded:
                    meta = {"fingerprint": fingerprint, "created": now(), **{k: json.dumps(v) for k, v in description.items()},
                            **({"secret": secret} if secret is not None else {})}
                    db.executemany("INSERT INTO study (key, value) VALUES (?, ?)", meta.items())
                    db.executemany("INSERT OR IGNORE INTO items (id, truth, source) VALUES (?, ?, ?)",
                                   [(i.id, i.truth, i.source) for i in items])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _held(self, db: sqlite3.Connection, recorded: dict[str, str], items: int) -> str:
        answers = db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        drawn = ", ".join(f"{k} {json.loads(recorded[k])}" for k in ("real", "split", "fake", "per_class") if k in recorded)
        return (f"{self.path} holds the answers of another study ({counted(items, 'item')}"
                + (f": {drawn}" if drawn else "") + f", {counted(answers, 'answer')}"
                + (f", begun {recorded['created']}" if "created" in recorded else "") + ")")

    def secret(self) -> str | None:
        """The key of the items' ids (turing.item_id) of the study this database holds; None for an empty database
        or one begun before secrets were kept."""
        with closing(self.connect()) as db:
            row = db.execute("SELECT value FROM study WHERE key = 'secret'").fetchone()
        return row[0] if row else None

    def is_empty(self) -> bool:
        """No study recorded and no item: a new database."""
        with closing(self.connect()) as db:
            return db.execute("SELECT (SELECT COUNT(*) FROM study) + (SELECT COUNT(*) FROM items)").fetchone()[0] == 0

    def fingerprint(self) -> str | None:
        with closing(self.connect()) as db:
            row = db.execute("SELECT value FROM study WHERE key = 'fingerprint'").fetchone()
        return row[0] if row else None

    def items(self) -> list[Item]:
        with closing(self.connect()) as db:
            return [Item(*row) for row in db.execute("SELECT id, truth, source FROM items ORDER BY id")]

    def start_session(self, rater: str, item_ids: Sequence[str], rng: random.Random | None = None) -> list[str]:
        """The rater's item order: stored on their first visit (a fresh random permutation of `item_ids`),
        the same one on every later visit, so a rater resumes where they stopped."""
        check_rater(rater)
        order = list(item_ids)
        (rng or random.SystemRandom()).shuffle(order)
        with closing(self.connect()) as db:
            db.execute("INSERT OR IGNORE INTO raters (name, created, item_order) VALUES (?, ?, ?)",
                       (rater, now(), json.dumps(order)))
            return json.loads(db.execute("SELECT item_order FROM raters WHERE name = ?", (rater,)).fetchone()[0])

    def session(self, rater: str) -> dict[str, Any]:
        """{rater, total, answered, next (item id or None)}; KeyError for a rater who never started."""
        with closing(self.connect()) as db:
            row = db.execute("SELECT item_order FROM raters WHERE name = ?", (rater,)).fetchone()
            if row is None:
                raise KeyError(f"no session for rater {rater!r}; start one first")
            order = json.loads(row[0])
            done = {r[0] for r in db.execute("SELECT item FROM answers WHERE rater = ?", (rater,))}
        remaining = [item for item in order if item not in done]
        return {"rater": rater, "total": len(order), "answered": len(order) - len(remaining),
                "next": remaining[0] if remaining else None}

    # ------------------------------------------------------------------ answers

    def answer(self, rater: str, item: str, answer: str, confidence: int, seconds: float | None = None) -> bool:
        """Store one answer; True when stored, False when this rater had already answered this item (the
        first answer stands). ValueError for an answer that is not real/synthetic, a confidence outside
        1-5, or an item that is not in the rater's session."""
        if answer not in TRUTHS:
            raise ValueError(f"answer must be one of {', '.join(TRUTHS)}, got {answer!r}")
        if isinstance(confidence, bool) or not isinstance(confidence, int) or not CONFIDENCE[0] <= confidence <= CONFIDENCE[1]:
            raise ValueError(f"confidence must be an integer from {CONFIDENCE[0]} to {CONFIDENCE[1]}, got {confidence!r}")
        with closing(self.connect()) as db:
            row = db.execute("SELECT item_order FROM raters WHERE name = ?", (rater,)).fetchone()
            if row is None:
                raise KeyError(f"no session for rater {rater!r}; start one first")
            if item not in json.loads(row[0]):
                raise ValueError(f"item {item!r} is not in the session of rater {rater!r}")
            truth = db.execute("SELECT truth FROM items WHERE id = ?", (item,)).fetchone()[0]
            cursor = db.execute(
                "INSERT OR IGNORE INTO answers (rater, item, truth, answer, confidence, seconds, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (rater, item, truth, answer, confidence, seconds, now()))
            return cursor.rowcount == 1

    def answers(self) -> list[dict[str, Any]]:
        with closing(self.connect()) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT rater, item, truth, answer, confidence, seconds, created FROM answers "
                              "ORDER BY created, rater, item").fetchall()
        return [{**dict(row), "correct": int(row["truth"] == row["answer"])} for row in rows]

    def results(self) -> dict[str, Any]:
        """Accuracy overall, per class (the share of real volumes called real, of synthetic ones called
        synthetic) and per rater, each with its Clopper-Pearson 95 % interval, next to the anchor."""
        rows = self.answers()

        def count(selected: list[dict[str, Any]]) -> dict[str, Any]:
            return summary(sum(r["correct"] for r in selected), len(selected))

        raters = sorted({r["rater"] for r in rows})
        return {
            "overall": count(rows),
            "per_class": {truth: count([r for r in rows if r["truth"] == truth]) for truth in TRUTHS},
            "per_rater": {rater: count([r for r in rows if r["rater"] == rater]) for rater in raters},
            "mean_confidence": sum(r["confidence"] for r in rows) / len(rows) if rows else None,
            "interval": "Clopper-Pearson (exact) 95 %", "chance": 0.5, "anchor": ANCHOR,
        }

    def csv(self) -> str:
        """Every answer as CSV (CSV_COLUMNS), one row per (rater, item)."""
        stream = io.StringIO()
        writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: spreadsheet_safe(value) for key, value in row.items()} for row in self.answers())
        return stream.getvalue()


def spreadsheet_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, with an apostrophe in front; anything else as it is."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value


def move_aside(path: str | Path) -> Path:
    """Rename the database at `path` to <stem>.<UTC time>.sqlite beside it (never over an existing file) and
    return the new path; nothing is deleted. ValueError when another process has it open (its WAL is in use)."""
    path = Path(path)
    with closing(sqlite3.connect(path, timeout=30.0)) as db:
        busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    # SQLite removes the -wal and -shm files when the last connection closes: if they remain, another has it open
    if busy or any(Path(f"{path}{suffix}").exists() for suffix in ("-wal", "-shm")):
        raise ValueError(f"{path} is open in another process (another mriflow app?); stop it, then start again")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        target = path.with_name(f"{path.stem}.{stamp}{'' if attempt == 0 else f'-{attempt}'}{path.suffix}")
        try:
            os.link(path, target)  # fails if the target exists: nothing is ever overwritten
        except FileExistsError:
            continue
        except OSError:  # a file system without hard links
            if target.exists():
                continue
            os.rename(path, target)
            return target
        os.unlink(path)  # the answers stay in the file under its new name
        return target
    raise ValueError(f"{path}: no free name to move it aside to; move it yourself, then start again")


def check_rater(name: str) -> str:
    if not isinstance(name, str) or not RATER_NAME.match(name) or not name.strip():
        raise ValueError("rater name: 1 to 64 letters, digits, spaces or . _ @ + -")
    return name
