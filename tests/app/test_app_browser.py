"""The app in a real browser: Debian's chromium, headless, driven by Playwright against `mriflow app` run as a process.

It generates two brains side by side, scrolls, zooms and windows them with linked cursors, downloads one and
checks its affine; then a rater completes a Turing session of 10 answers, and the stored answers and the
results page are checked. No request may leave 127.0.0.1 (any that tries is blocked and fails the test).

Skipped only when chromium, NiiVue (`npm ci`) or Playwright is missing and CI is unset; with CI set they fail.
Screenshots go to $MRIFLOW_SCREENSHOTS (the README's: `MRIFLOW_SCREENSHOTS=docs python -m pytest tests/app/test_app_browser.py`).
"""

from __future__ import annotations

import csv
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import nibabel as nib
import numpy as np
import pytest

from conftest import write_prepared
from mriflow.app.niivue import NiivueMissing, locate_niivue
from mriflow.app.store import clopper_pearson
from mriflow.cli import main
from mriflow.generate import GENERATOR_DIR, default_model_dir

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT = 180  # s: loading torch and the model on a busy 2-core machine
GENERATE_TIMEOUT = 300_000  # ms
DEFAULT_META = json.loads((default_model_dir() / GENERATOR_DIR / "checkpoint.json").read_text())
DEFAULT_SHAPE, DEFAULT_VOXEL_MM = tuple(DEFAULT_META["image_shape"]), abs(DEFAULT_META["affine"][0][0])  # its grid


def missing_tools() -> list[str]:
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"chromium ({CHROMIUM}; apt-get install chromium)")
    try:
        locate_niivue()
    except NiivueMissing:
        missing.append("NiiVue (npm ci)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[test]')")
    return missing


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = missing_tools()
    if missing:
        message = "browser tests need " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set, so this is a failure, not a skip)")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True, args=ARGS,
            accept_downloads=True, viewport={"width": 1400, "height": 1000})
        outside: list[str] = []

        def only_loopback(route):
            if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", only_loopback)
        yield context, outside
        context.close()
    assert not outside, f"the app asked for something outside this machine: {outside}"


@pytest.fixture
def screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("MRIFLOW_SCREENSHOTS", tmp_path / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class App:
    """`python -m mriflow app ... --port 0` as a child process; its URL read from what it prints."""

    def __init__(self, *args: str, cwd: Path):
        self.lines: list[str] = []
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "mriflow", "app", "--port", "0", "--threads", "1", *args],
                                        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()
        start = time.time()
        while time.time() - start < START_TIMEOUT:
            found = [re.search(r"http://127\.0\.0\.1:\d+", line) for line in self.lines]
            if any(found):
                self.url = next(m.group(0) for m in found if m)
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise AssertionError("mriflow app did not start:\n" + "".join(self.lines))

    def owner_link(self, timeout: float = 10.0) -> str:
        """The results link with the owner's token, printed after the address when a Turing test starts."""
        start = time.time()
        while time.time() - start < timeout:
            found = [re.search(r"http://127\.0\.0\.1:\d+/turing/results\?token=[\w-]+", line) for line in self.lines]
            if any(found):
                return next(m.group(0) for m in found if m)
            time.sleep(0.1)
        raise AssertionError("mriflow app printed no owner link:\n" + "".join(self.lines))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def set_range(page, selector: str, value: float) -> None:
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", value)


def test_generate_two_brains_side_by_side_view_scroll_and_download(browser, tmp_path, screenshots):
    context, _ = browser
    (tmp_path / "reports" / "flow").mkdir(parents=True)  # found as reports/ of the folder the app starts in
    (tmp_path / "reports" / "flow" / "report.html").write_text("<html><h1>Evaluation report</h1></html>")
    app = App("--out", str(tmp_path / "out"), cwd=tmp_path)
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(app.url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        assert page.locator("#cov-A-age").get_attribute("min") == "20.17"  # the model's training range
        set_range(page, "#cov-A-age", 30)  # the slider
        assert page.input_value("#cov-A-age-v") == "30"
        page.fill("#cov-B-age-v", "80")  # the number box: beyond the training range (79.4), said on the page
        page.select_option("#cov-A-sex", "F")
        page.select_option("#cov-B-sex", "M")
        polled = []
        page.on("response", lambda r: polled.append(r) if "/api/jobs/" in r.url else None)
        page.click("#generate-both")
        page.wait_for_function("window.mriflow.loaded.D >= 1", timeout=GENERATE_TIMEOUT)
        # progress: the page polled each job until done, its network-evaluation count never going back
        views = [r.json() for r in polled]
        for job in {v["id"] for v in views}:
            steps = [v for v in views if v["id"] == job]
            assert steps[-1]["state"] == "done" and steps[-1]["progress"] == 1.0
            assert all(a["calls"] <= b["calls"] and a["progress"] <= b["progress"] for a, b in zip(steps, steps[1:]))
        assert len({v["id"] for v in views}) == 2
        assert "age 30.0, sex F" in page.text_content("#status-A")
        assert "age 80.0, sex M" in page.text_content("#status-B") and "training range" in page.text_content("#status-B")
        dims = page.evaluate("[window.mriflow.viewers.A.volumes[0].dims, window.mriflow.viewers.B.volumes[0].dims]")
        assert dims == [[3, *DEFAULT_SHAPE], [3, *DEFAULT_SHAPE]]  # the default model's grid
        for canvas in ("#canvas-A", "#canvas-B", "#canvas-D"):
            assert page.locator(canvas).bounding_box()["height"] > 200
        # the difference view: A in grey under B - A, whose voxels are the two volumes' difference
        difference = page.evaluate("(() => { const [a, d] = window.mriflow.viewers.D.volumes;"
                                   " const b = window.mriflow.viewers.B.volumes[0];"
                                   " let worst = 0; for (let i = 0; i < d.img.length; i++)"
                                   "   worst = Math.max(worst, Math.abs(d.img[i] - (b.img[i] - a.img[i])));"
                                   " return [d.name, d.img.length, worst]; })()")
        assert difference[0] == "difference.nii.gz" and difference[1] == int(np.prod(DEFAULT_SHAPE)) and difference[2] < 1e-5

        # scrolling through slices: the mouse wheel over A's axial view moves A's crosshair, and B's with it
        before = page.evaluate("Array.from(window.mriflow.viewers.A.scene.crosshairPos)")
        box = page.locator("#canvas-A").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 6, box["y"] + box["height"] / 2)
        for _ in range(5):
            page.mouse.wheel(0, -120)
            page.wait_for_timeout(100)
        page.click("button[data-axis='2'][data-delta='1']")
        page.wait_for_timeout(300)
        after = page.evaluate("Array.from(window.mriflow.viewers.A.scene.crosshairPos)")
        linked = page.evaluate("[Array.from(window.mriflow.viewers.B.scene.crosshairPos), "
                               "Array.from(window.mriflow.viewers.D.scene.crosshairPos)]")
        assert after != before and after[2] != before[2]
        assert np.allclose(linked[0], after) and np.allclose(linked[1], after)

        # zoom and intensity window apply to the views together
        set_range(page, "#zoom", 1.5)
        set_range(page, "#win-high", 0.6)
        page.wait_for_timeout(300)
        assert page.evaluate("[window.mriflow.viewers.A.scene.pan2Dxyzmm[3], window.mriflow.viewers.B.scene.pan2Dxyzmm[3]]") == [1.5, 1.5]
        assert page.evaluate("window.mriflow.viewers.B.volumes[0].cal_max") == pytest.approx(0.6)
        set_range(page, "#zoom", 1.0)
        set_range(page, "#win-high", 1.0)
        # a label map is offered, and shown over the image, exactly when the sample has one
        has_labels = (tmp_path / "out" / page.evaluate("window.mriflow.state.B.folder") / "sample_00000_labels.nii.gz").exists()
        assert page.locator("#downloads-B a[data-kind='label map']").count() == int(has_labels)
        if has_labels:
            page.check("#labels-B")
            # the overlay has a legend naming each tissue class beside its colour (issue 26)
            page.wait_for_selector("#legend-B .legend-item")
            assert "ventricles" in page.inner_text("#legend-B")
            page.wait_for_function("window.mriflow.viewers.B.volumes.length === 2")
        page.wait_for_timeout(500)
        page.screenshot(path=str(screenshots / "app_generate.png"), full_page=True)

        # download A's volume: float32 on the model's grid with the model's affine
        with page.expect_download() as download:
            page.click("#downloads-A a[data-kind='NIfTI']")
        assert download.value.suggested_filename == "sample_00000.nii.gz"
        saved = tmp_path / "downloaded.nii.gz"
        download.value.save_as(saved)
        image = nib.load(str(saved))
        meta = json.loads((default_model_dir() / GENERATOR_DIR / "checkpoint.json").read_text())
        assert np.allclose(image.affine, np.asarray(meta["affine"])) and image.shape == tuple(meta["image_shape"])
        assert int(image.header["sform_code"]) == 4 and image.get_data_dtype() == np.float32
        with page.expect_download() as sidecar:
            page.click("#downloads-A a[data-kind='sidecar (JSON)']")
        record = json.loads(Path(sidecar.value.path()).read_text())
        assert record["covariates"] == {"age": 30.0, "sex": "F"}
        if has_labels:  # the label map downloads on A's grid
            with page.expect_download() as labels:
                page.click("#downloads-A a[data-kind='label map']")
            assert labels.value.suggested_filename == "sample_00000_labels.nii.gz"
            labels.value.save_as(tmp_path / "labels.nii.gz")
            label_map = nib.load(str(tmp_path / "labels.nii.gz"))
            assert np.allclose(label_map.affine, image.affine) and label_map.shape == image.shape

        page.click("nav a[href='/reports']")
        page.wait_for_selector("body[data-ready='1']")
        with context.expect_page() as report:
            page.click("text=reports/flow")
        report.value.wait_for_load_state()
        assert report.value.text_content("h1") == "Evaluation report"
        assert not errors, errors
    finally:
        app.stop()


@pytest.fixture
def study(tmp_path):
    """Real: 6 test subjects of a prepared folder on the default model's grid; generated: 5 samples of the model."""
    real = write_prepared(tmp_path / "real", splits=("train",) + ("test",) * 6, shape=DEFAULT_SHAPE,
                          voxel_mm=DEFAULT_VOXEL_MM)
    assert main(["generate", "--out", str(tmp_path / "fake"), "--n", "5", "--seed", "0", "--threads", "1"]) == 0
    return real, tmp_path / "fake"


def test_a_turing_session_of_ten_answers_is_stored_and_summarized(browser, study, tmp_path, screenshots):
    context, _ = browser
    real, fake = study
    db = tmp_path / "answers.sqlite"
    app = App("--turing", "--real", str(real), "--fake", str(fake), "--per-class", "5", "--db", str(db),
              "--out", str(tmp_path / "out"), cwd=tmp_path)
    try:
        page = context.new_page()
        page.goto(app.url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        assert page.url.endswith("/turing")
        page.fill("#rater", "rater-1")
        page.click("#begin")
        given = {}
        for k in range(10):
            page.wait_for_function(f"window.mriflow.loaded >= {k + 1}", timeout=60_000)
            assert page.text_content("#counter") == f"Item {k + 1} of 10"
            assert page.locator("#canvas-T").bounding_box()["height"] > 300  # the viewer is there to be seen
            assert page.evaluate("window.mriflow.viewer.volumes[0].dims") == [3, *DEFAULT_SHAPE]
            item = page.evaluate("document.body.dataset.item")
            answer = "real" if k % 3 else "synthetic"
            page.check(f"input[name=answer][value={answer}]")
            page.check(f"input[name=confidence][value='{1 + k % 5}']")
            if k == 2:
                page.screenshot(path=str(screenshots / "app_turing.png"), full_page=True)
            page.click("#submit")
            given[item] = (answer, 1 + k % 5)
        page.wait_for_selector("body[data-done='1']", timeout=60_000)

        with sqlite3.connect(db) as connection:
            rows = connection.execute("SELECT rater, item, truth, answer, confidence FROM answers").fetchall()
        assert len(rows) == 10 and {r[0] for r in rows} == {"rater-1"}
        assert {r[1]: (r[3], r[4]) for r in rows} == given  # every click stored once, as clicked
        assert sorted(r[2] for r in rows) == ["real"] * 5 + ["synthetic"] * 5
        correct = sum(r[2] == r[3] for r in rows)

        page.goto(app.url + "/turing/results")  # a rater's view: no token, no results
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert "study owner" in page.text_content("#headline") and page.locator("#accuracy").count() == 0
        page.goto(app.owner_link())
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        low, high = clopper_pearson(correct, 10)
        assert page.text_content("#n") == "10"
        assert page.text_content("#accuracy") == f"{100 * correct / 10:.1f} %"
        assert page.text_content("#ci") == f"{100 * low:.1f} % – {100 * high:.1f} %"
        assert "59.4 %" in page.text_content("#anchor") and "Clopper-Pearson" in page.text_content("#method")
        page.screenshot(path=str(screenshots / "app_turing_results.png"), full_page=True)
        with page.expect_download() as download:
            page.click("#csv")
        table = list(csv.DictReader(open(download.value.path())))
        assert len(table) == 10 and sum(int(r["correct"]) for r in table) == correct

        page.goto(app.url + "/turing")  # the same rater coming back: nothing left to rate, nothing counted twice
        page.wait_for_selector("body[data-ready='1']")
        assert page.input_value("#rater") == "rater-1"
        page.click("#begin")
        page.wait_for_selector("body[data-done='1']", timeout=30_000)
        with sqlite3.connect(db) as connection:
            assert connection.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 10
    finally:
        app.stop()


def test_a_real_scan_is_drawn_at_another_age_from_the_page(browser, tmp_path, screenshots):
    """`mriflow app --scans DATA`: pick a scan, move the age slider, draw it; the round trip shows in A, the edit in
    B and edit − round trip in the difference view, all on the model's grid."""
    from conftest import write_prepared_with_sex

    context, _ = browser
    data = write_prepared_with_sex(tmp_path / "data", shape=DEFAULT_SHAPE, voxel_mm=DEFAULT_VOXEL_MM)  # the model's grid
    assert np.allclose(nib.load(str(data / "images" / "sub02.nii.gz")).affine, DEFAULT_META["affine"])
    app = App("--out", str(tmp_path / "out"), "--scans", str(data), cwd=tmp_path)
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(app.url + "/")
        page.wait_for_selector("body[data-edit='1']", timeout=60_000)
        assert page.is_visible("#edit-panel")
        page.select_option("#edit-scan", "sub02")  # recorded: 34 years, F
        set_range(page, "#edit-age", 70)
        assert page.text_content("#edit-age-v") == "70"
        page.fill("#edit-steps", "4")
        page.click("#edit-run")
        page.wait_for_function("window.mriflow.edited >= 1", timeout=GENERATE_TIMEOUT)
        assert "sub02 at age 70.0" in page.text_content("#status-E")
        assert "sub02 as scanned (age 34.0, sex F)" in page.text_content("#status-A")  # the edit is drawn over the scan
        dims = page.evaluate("[0, 1, 2].map((i) => [window.mriflow.viewers.A, window.mriflow.viewers.B,"
                             " window.mriflow.viewers.D][i].volumes[0].dims)")
        assert dims == [[3, *DEFAULT_SHAPE]] * 3
        assert page.evaluate("window.mriflow.viewers.D.volumes.length") == 2  # the scan under the difference
        assert page.evaluate("window.mriflow.viewers.A.volumes[0].name") == "scan.nii.gz"
        page.screenshot(path=str(screenshots / "app_edit.png"), full_page=True)
        assert not errors, errors
    finally:
        app.stop()


def test_a_scan_of_ones_own_is_uploaded_prepared_and_drawn_at_another_age_from_the_page(browser, tmp_path, screenshots):
    """`mriflow app --uploads`: choose a raw T1 (1.5 mm, right to left, with a margin), give its age and sex, upload
    it; once prepared onto the model's grid it is drawn at another age like any scan."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluate"))
    from evaluation_helpers import scanner_copy  # noqa: E402

    context, _ = browser
    raw, volume, _ = scanner_copy(tmp_path)
    app = App("--out", str(tmp_path / "out"), "--model", "4mm", "--uploads", cwd=tmp_path)
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(app.url + "/")
        page.wait_for_selector("body[data-edit='1']", timeout=60_000)
        assert page.is_visible("#upload-box")
        page.set_input_files("#upload-file", str(raw))
        page.fill("#upload-age", "52")
        page.select_option("#upload-sex", "F")
        page.click("#upload-run")
        page.wait_for_function("window.mriflow.uploaded", timeout=GENERATE_TIMEOUT)
        assert "prepared my_t1.nii.gz as upload-" in page.text_content("#status-E")
        set_range(page, "#edit-age", 75)
        page.fill("#edit-steps", "2")
        page.click("#edit-run")
        page.wait_for_function("window.mriflow.edited >= 1", timeout=GENERATE_TIMEOUT)
        assert "at age 75.0" in page.text_content("#status-E")
        assert "(age 52.0, sex F)" in page.text_content("#status-A")
        dims = page.evaluate("window.mriflow.viewers.B.volumes[0].dims")
        assert dims == [3, *volume.shape]
        page.screenshot(path=str(screenshots / "app_upload.png"), full_page=True)
        assert not errors, errors
    finally:
        app.stop()
