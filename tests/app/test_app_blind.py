"""The visual Turing test stays blind (issue 25.1): a rater can learn an item's class from nothing but its image.

(a) the answers (with every item's truth) are kept outside every folder the app serves, and the results and the
    export are for the study owner alone (the token `mriflow app` prints); (b) every item is served with the same
    dtype, quantisation, compression, header and length, background exactly 0, so neither the file size nor its
    header bytes tell a class; (c) a database holds one study, and another study is refused unless told otherwise,
    losing no answer either way.
"""

from __future__ import annotations

import gzip
import sqlite3
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app_helpers import NIIVUE_STAND_IN, SHAPE, write_study
from conftest import head_phantom
from mriflow.app.encoding import QUANTA, encode_volume
from mriflow.app.launch import DEFAULT_DB, addresses, load_turing
from mriflow.app.server import OWNER_HEADER, AppState, Turing, create_app
from mriflow.app.store import AnswerStore, move_aside
from mriflow.app.turing import build_study
from mriflow.cli import main
from mriflow.data.background import zero_background


def quiet(*_args, **_kwargs) -> None:
    pass


def app_for(turing: Turing, tmp_path: Path) -> TestClient:
    (tmp_path / "niivue.umd.js").write_text(NIIVUE_STAND_IN)
    return TestClient(create_app(AppState(out=tmp_path / "out", niivue=tmp_path / "niivue.umd.js", turing=turing)))


def answer_all(client: TestClient, rater: str) -> int:
    session = client.post("/api/turing/session", json={"rater": rater}).json()
    answered = 0
    while session["next"]:
        session = client.post("/api/turing/answer", json={"rater": rater, "item": session["next"], "answer": "real",
                                                          "confidence": 3}).json()
        answered += 1
    return answered


# ---------------------------------------------------------------------- (a) where the truth is, and who sees it


def test_the_default_database_is_outside_the_output_folder_the_app_serves(tmp_path, monkeypatch):
    real, fake = write_study(tmp_path, real_test=2, fakes=2)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "app-output"
    turing = load_turing(real, fake, out=out, reports=[], say=quiet)
    assert turing.store.path.resolve() == (tmp_path / DEFAULT_DB).resolve()
    answer_all(app_for(turing, tmp_path), "ann")
    out.mkdir(exist_ok=True)
    (tmp_path / "niivue.umd.js").write_text(NIIVUE_STAND_IN)
    generation_app = TestClient(create_app(AppState(out=out, niivue=tmp_path / "niivue.umd.js")))
    assert generation_app.get(f"/files/{DEFAULT_DB}").status_code == 404  # the probe's GET /files/turing.sqlite
    assert not list(out.rglob("*.sqlite*"))


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    path = tmp_path / "niivue.umd.js"
    path.write_text(NIIVUE_STAND_IN)
    monkeypatch.setenv("MRIFLOW_NIIVUE", str(path))
    return path


def one_line_error(capsys, argv, *words) -> str:
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    for word in words:
        assert word in error, error
    return error


def test_a_database_inside_a_served_folder_is_refused_in_one_line(tmp_path, bundle, capsys):
    real, fake = write_study(tmp_path, real_test=2, fakes=2)
    out, reports = tmp_path / "out", tmp_path / "reports"
    reports.mkdir()
    study = ["app", "--turing", "--real", str(real), "--fake", str(fake), "--port", "0", "--out", str(out)]
    one_line_error(capsys, study + ["--db", str(out / "answers.sqlite")], "--db", "--out", "serves")
    one_line_error(capsys, study + ["--db", str(reports / "a" / "answers.sqlite"), "--reports", str(reports)],
                   "--reports")
    assert not out.exists() or not list(out.rglob("*.sqlite"))


def test_an_earlier_database_in_the_output_folder_is_left_alone_and_named(tmp_path, bundle, capsys, monkeypatch):
    real, fake = write_study(tmp_path, real_test=2, fakes=2)
    out = tmp_path / "out"
    out.mkdir()
    earlier = AnswerStore(out / "turing.sqlite")  # where answers went before: inside --out
    earlier.begin_study("0" * 64, build_study(real, fake).items, {})
    before = (out / "turing.sqlite").read_bytes()
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, ["app", "--turing", "--real", str(real), "--fake", str(fake), "--port", "0", "--out", str(out)],
                   "turing.sqlite", "move it")
    assert (out / "turing.sqlite").read_bytes() == before and not (tmp_path / DEFAULT_DB).exists()


@pytest.fixture
def study_app(tmp_path):
    real, fake = write_study(tmp_path, real_test=3, fakes=3)
    turing = load_turing(real, fake, out=tmp_path / "out", db=tmp_path / "answers.sqlite", reports=[], say=quiet)
    client = app_for(turing, tmp_path)
    answer_all(client, "ann")
    return client, turing


@pytest.mark.parametrize("url", ["/api/turing/results", "/api/turing/answers.csv"])
def test_results_and_answers_are_for_the_study_owner_alone(study_app, url):
    client, turing = study_app
    for refused in (client.get(url), client.get(url, params={"token": "guess"}),
                    client.get(url, headers={OWNER_HEADER: turing.owner_token[:-1]}),
                    client.get(url, params={"token": "é"})):
        assert refused.status_code == 403
        detail = refused.json()["detail"]
        assert "\n" not in detail and "token" in detail and "truth" not in refused.text
    by_link = client.get(url, params={"token": turing.owner_token})
    by_header = client.get(url, headers={OWNER_HEADER: turing.owner_token})
    assert by_link.status_code == by_header.status_code == 200 and by_link.content == by_header.content
    if url.endswith(".csv"):
        assert by_link.text.startswith("rater,item,truth,") and len(by_link.text.strip().splitlines()) == 7
    else:
        assert by_link.json()["overall"]["n"] == 6


def test_a_rater_sees_no_truth_and_no_file_of_the_server(study_app, tmp_path):
    client, _ = study_app
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "note.txt").write_text("x")
    for url in ("/files/note.txt", "/api/outputs", "/api/reports", "/api/difference/a/b/difference.nii.gz",
                "/api/scans/sub00/volume.nii.gz"):
        assert client.get(url).status_code == 404, url
    config = client.get("/api/config").json()
    assert config["turing"] == {"items": 6, "per_class": {"real": 3, "synthetic": 3}} and "out" not in config
    session = client.get("/api/turing/session/ann").json()
    assert set(session) == {"rater", "total", "answered", "next"}


def test_the_owner_link_is_printed_with_the_token(study_app):
    _, turing = study_app
    state = AppState(out=Path("out"), niivue=Path("x"), turing=turing)
    lines = addresses(state, "127.0.0.1", 8765)
    assert lines[0].endswith("http://127.0.0.1:8765/  (Ctrl+C to stop)")
    assert any(f"http://127.0.0.1:8765/turing/results?token={turing.owner_token}" in line for line in lines)
    assert len(turing.owner_token) >= 22  # 128 bits or more, URL-safe


# ---------------------------------------------------------------------- (b) every item served alike


def best_threshold_accuracy(values: list[float], classes: list[int]) -> float:
    """The accuracy of the best rule `class = value > t` (or <), over every threshold: 0.5 is chance for balanced classes."""
    values, classes = np.asarray(values, float), np.asarray(classes)
    best = 0.0
    for t in np.concatenate([[-np.inf], np.unique(values)]):
        above = values > t
        best = max(best, np.mean(above == classes), np.mean(above != classes))
    return float(best)


def test_neither_file_size_nor_header_bytes_tell_the_classes_apart(tmp_path):
    """The probe's leak on phantoms: generated volumes with a faint haze outside the head (what the 2 mm decoder
    left) are larger files than prepared scans, so that a size threshold separates the classes perfectly as the files
    lie on disk. Served, every item has one length and one header, so the best size threshold is at chance (exactly
    0.5 with 6 + 6 items: no margin needed) and the header bytes carry a single value."""
    real, fake = write_study(tmp_path, real_test=6, fakes=6, haze=0.015)
    study = build_study(real, fake, per_class=6)
    classes = [int(item.truth == "synthetic") for item in study.items]
    on_disk = [study.paths[item.id].stat().st_size for item in study.items]
    assert best_threshold_accuracy(on_disk, classes) == 1.0  # the leak is there to be hidden
    client = app_for(Turing(study, AnswerStore(tmp_path / "a.sqlite")), tmp_path)
    served = [client.get(f"/api/turing/item/{item.id}/volume.nii.gz").content for item in study.items]
    assert best_threshold_accuracy([len(s) for s in served], classes) == 0.5
    assert len({len(s) for s in served}) == 1
    assert len({s[:10] for s in served}) == 1  # the gzip header: flags, time stamp, system
    volumes = [gzip.decompress(s) for s in served]
    assert len({v[:352] for v in volumes}) == 1  # the NIfTI header and its extension flag, byte for byte
    for volume in volumes:
        data = np.asarray(nib.Nifti1Image.from_bytes(volume).dataobj)
        assert data.dtype == np.float32 and 0 <= data.min() and data.max() <= 1
        assert np.array_equal(data, zero_background(data))  # background exactly 0, as in prepared scans
        assert np.array_equal(data * QUANTA, np.round(data * QUANTA))  # one quantisation: k / 65535
        assert np.count_nonzero((data > 0) & (data < 0.02)) < 0.01 * data.size  # the haze is gone


def test_a_haze_outside_the_head_changes_no_byte_of_what_is_served():
    image, _ = head_phantom(SHAPE, seed=3)
    clean = np.clip(image / image.max(), 0, 1).astype(np.float32)
    rng = np.random.default_rng(0)
    hazy = np.where(clean > 0, clean, rng.uniform(0.001, 0.015, SHAPE))  # float64, as another writer may leave it
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    assert encode_volume(clean, affine) == encode_volume(hazy.astype(np.float64), affine)
    assert encode_volume(clean, affine) != encode_volume(np.roll(clean, 1, axis=0), affine)  # the image still counts


# ---------------------------------------------------------------------- (c) one database, one study


def test_a_restart_with_the_same_study_keeps_its_answers(tmp_path):
    real, fake = write_study(tmp_path, real_test=2, fakes=2)
    first = load_turing(real, fake, out=tmp_path / "out", db=tmp_path / "a.sqlite", reports=[], say=quiet)
    answer_all(app_for(first, tmp_path), "ann")
    again = load_turing(real, fake, out=tmp_path / "out", db=tmp_path / "a.sqlite", reports=[], say=quiet)
    assert again.study.fingerprint == first.study.fingerprint and len(again.store.answers()) == 4


@pytest.mark.parametrize("change", ["fake", "per_class", "content"])
def test_another_study_is_refused_in_one_line_and_nothing_changes(tmp_path, change):
    real, fake = write_study(tmp_path, real_test=3, fakes=3)
    db = tmp_path / "a.sqlite"
    first = load_turing(real, fake, per_class=2, out=tmp_path / "out", db=db, reports=[], say=quiet)
    answer_all(app_for(first, tmp_path), "ann")
    arguments = {"real": real, "fake": fake, "per_class": 2}
    if change == "fake":
        arguments["fake"] = write_study(tmp_path, fakes=3, fake_name="other", first_seed=200)[1]
    elif change == "per_class":
        arguments["per_class"] = 3
    else:  # the same paths, other volumes: a regenerated folder
        for path, item in ((first.study.paths[i.id], i) for i in first.study.items if i.truth == "synthetic"):
            nib.save(nib.Nifti1Image(np.asarray(nib.load(str(path)).dataobj)[::-1].copy(), nib.load(str(path)).affine),
                     str(path))
    with pytest.raises(ValueError) as refused:
        load_turing(**arguments, out=tmp_path / "out", db=db, reports=[], say=quiet)
    message = str(refused.value)
    assert "\n" not in message and "another study" in message and "--new-study" in message and "--db" in message
    assert len(AnswerStore(db).answers()) == 4 and not list(tmp_path.glob("a.*.sqlite"))


def test_new_study_moves_the_old_answers_aside_and_starts_afresh(tmp_path):
    real, fake = write_study(tmp_path, real_test=2, fakes=2)
    other = write_study(tmp_path, fakes=2, fake_name="other", first_seed=200)[1]
    db = tmp_path / "a.sqlite"
    first = load_turing(real, fake, out=tmp_path / "out", db=db, reports=[], say=quiet)
    answer_all(app_for(first, tmp_path), "ann")
    said = []
    second = load_turing(real, other, out=tmp_path / "out", db=db, reports=[], new_study=True, say=said.append)
    archived = list(tmp_path.glob("a.*.sqlite"))
    assert len(archived) == 1 and any(str(archived[0]) in line for line in said)
    kept = AnswerStore(archived[0])
    assert len(kept.answers()) == 4 and kept.fingerprint() == first.study.fingerprint  # nothing lost
    assert second.store.answers() == [] and second.store.fingerprint() == second.study.fingerprint
    assert answer_all(app_for(second, tmp_path), "bob") == 4
    # the same study again with --new-study: nothing to move aside, the answers stay where they are
    third = load_turing(real, other, out=tmp_path / "out", db=db, reports=[], new_study=True, say=quiet)
    assert len(third.store.answers()) == 4 and len(list(tmp_path.glob("a.*.sqlite"))) == 1


def test_a_database_from_before_study_fingerprints_is_adopted_only_for_its_own_items(tmp_path):
    real, fake = write_study(tmp_path, real_test=2, fakes=2)
    study = build_study(real, fake)
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as connection:  # the tables as the app wrote them before issue 25
        connection.executescript("CREATE TABLE items (id TEXT PRIMARY KEY, truth TEXT NOT NULL, source TEXT NOT NULL);")
        connection.executemany("INSERT INTO items VALUES (?, ?, ?)", [(i.id, i.truth, i.source) for i in study.items])
    adopted = load_turing(real, fake, out=tmp_path / "out", db=db, reports=[], say=quiet)
    assert adopted.store.fingerprint() == study.fingerprint
    other = write_study(tmp_path, fakes=2, fake_name="other", first_seed=200)[1]
    with sqlite3.connect(tmp_path / "old2.sqlite") as connection:
        connection.executescript("CREATE TABLE items (id TEXT PRIMARY KEY, truth TEXT NOT NULL, source TEXT NOT NULL);")
        connection.executemany("INSERT INTO items VALUES (?, ?, ?)", [(i.id, i.truth, i.source) for i in study.items])
    with pytest.raises(ValueError, match="another study"):
        load_turing(real, other, out=tmp_path / "out", db=tmp_path / "old2.sqlite", reports=[], say=quiet)


def test_a_database_open_in_another_process_is_not_moved(tmp_path):
    real, fake = write_study(tmp_path, real_test=2, fakes=2)
    db = tmp_path / "a.sqlite"
    load_turing(real, fake, out=tmp_path / "out", db=db, reports=[], say=quiet)
    holder = sqlite3.connect(db)
    holder.execute("SELECT COUNT(*) FROM items").fetchone()
    try:
        with pytest.raises(ValueError, match="open"):
            move_aside(db)
        assert db.exists() and not list(tmp_path.glob("a.*.sqlite"))
    finally:
        holder.close()
    moved = move_aside(db)
    assert moved.exists() and not db.exists() and len(AnswerStore(moved).items()) == 4


def test_new_study_is_an_option_of_the_cli(tmp_path, bundle, capsys):
    real, fake = write_study(tmp_path, real_test=2, fakes=2)
    other = write_study(tmp_path, fakes=2, fake_name="other", first_seed=200)[1]
    db = tmp_path / "a.sqlite"
    load_turing(real, fake, out=tmp_path / "out", db=db, reports=[], say=quiet)
    one_line_error(capsys, ["app", "--turing", "--real", str(real), "--fake", str(other), "--db", str(db), "--port", "0",
                            "--out", str(tmp_path / "out")], "another study", "--new-study")
    from mriflow.cli import build_parser
    assert build_parser().parse_args(["app", "--turing", "--new-study"]).new_study is True


def test_item_ids_are_keyed_by_a_secret_the_app_never_serves(tmp_path):
    """Knowing the folders (a prepared dataset's names are predictable) must not let a rater work out which id is
    a real volume: ids are an HMAC under the study's secret, kept in the answer database only; a restart keeps them,
    a new study draws new ones."""
    real, fake = write_study(tmp_path, real_test=2, fakes=2)
    db = tmp_path / "a.sqlite"
    first = load_turing(real, fake, out=tmp_path / "out", db=db, reports=[], say=quiet)
    unkeyed = {i.id for i in build_study(real, fake).items}
    assert unkeyed.isdisjoint(i.id for i in first.study.items)
    secret = AnswerStore(db).secret()
    assert secret and len(secret) == 64
    assert {i.id for i in build_study(real, fake, secret=secret).items} == {i.id for i in first.study.items}
    client = app_for(first, tmp_path)
    served = " ".join(client.get(url).text for url in ("/api/config", "/api/turing/session"))
    assert secret not in served
    again = load_turing(real, fake, out=tmp_path / "out", db=db, reports=[], say=quiet)
    assert [i.id for i in again.study.items] == [i.id for i in first.study.items]
    other = load_turing(real, fake, out=tmp_path / "out", db=tmp_path / "b.sqlite", reports=[], say=quiet)
    assert {i.id for i in other.study.items}.isdisjoint(i.id for i in first.study.items)
