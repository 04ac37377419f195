"""The flow-vs-diffusion benchmarks' shared quality helper and their target checks, on random features."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from quality import covariate_mix, set_quality, within  # noqa: E402


def test_a_shifted_fake_set_scores_worse_fd_and_coverage_than_one_from_the_real_distribution():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 16))
    same = rng.normal(size=(60, 16))
    shifted = rng.normal(size=(60, 16)) + 0.75
    good, bad = set_quality(real, same, rounds=5), set_quality(real, shifted, rounds=5)
    assert good["_settings"]["n"] == bad["_settings"]["n"] == 48  # one n: the FDs compare
    assert bad["fd"]["mean"] > good["fd"]["mean"] + 3 * (good["fd"]["sd"] + bad["fd"]["sd"])
    assert bad["coverage"]["mean"] < good["coverage"]["mean"]
    assert not within(bad["fd"], good["fd"], lower_is_better=True)
    assert within(good["fd"], bad["fd"], lower_is_better=True)


def test_the_covariate_mix_cycles_over_the_held_out_subjects():
    requests = [{"age": 30, "sex": "F"}, {"sex": "M"}]
    assert covariate_mix(requests, 5) == [requests[0], requests[1], requests[0], requests[1], requests[0]]
    with pytest.raises(ValueError, match="no held-out subjects"):
        covariate_mix([], 3)


def point(stage, step, fd, sd=1.0):
    return {"stage": stage, "step": step, "metrics": {"fd": {"mean": fd, "sd": sd}}}


def test_the_training_target_is_met_missed_or_undetermined_from_the_numbers():
    from training import leg_ends, target_check

    assert leg_ends(10, 4) == [4, 8, 10] and leg_ends(9, 3) == [3, 6, 9]
    diffusion = [point("diffusion", 300, 20.0), point("diffusion", 900, 10.0)]
    assert target_check([point("flow", 300, 10.9), point("flow", 900, 5.0)] + diffusion)["status"] == "met"
    assert target_check([point("flow", 300, 11.5), point("flow", 600, 9.0)] + diffusion)["status"] == "missed"
    assert target_check([point("flow", 450, 9.0)] + diffusion)["status"] == "undetermined"


def row(stage, solver, steps, nfe, fd, coverage, sd=0.01):
    return {"stage": stage, "solver": solver, "steps": steps, "nfe": nfe,
            "metrics": {"fd": {"mean": fd, "sd": sd}, "coverage": {"mean": coverage, "sd": sd}}}


def test_the_sampling_target_needs_a_flow_sampler_at_8_nfe_or_fewer_within_ddim_50_on_fd_and_coverage():
    from sampling import target_check

    ddim = row("diffusion", "ddim", 50, 50, 1.0, 0.8)
    close = row("flow", "heun", 4, 8, 1.005, 0.795)
    assert target_check([ddim, row("flow", "euler", 2, 2, 2.0, 0.8), close]) | {"text": ""} == {
        "status": "met", "ratio": 6.25, "ddim50": "diffusion ddim 50", "passing": ["flow heun 4"], "text": ""}
    worse_coverage = row("flow", "euler", 8, 8, 0.9, 0.7)
    too_many = row("flow", "heun", 8, 16, 1.0, 0.8)
    assert target_check([ddim, worse_coverage, too_many])["status"] == "missed"


def test_a_rewritten_section_keeps_its_hand_written_reading_unless_the_new_body_has_one(tmp_path):
    from common import replace_section

    document = tmp_path / "benchmarks.md"
    document.write_text("# B\n\n## a\n\nold figures\n\nReading: what they mean.\nSecond line.\n\n## b\n\nkept\n")
    replace_section(document, "## a", "new figures")
    assert document.read_text() == ("# B\n\n## a\n\nnew figures\n\nReading: what they mean.\nSecond line.\n\n"
                                    "## b\n\nkept\n")
    replace_section(document, "## a", "newer\n\nReading: its own.")
    assert "what they mean" not in document.read_text() and "Reading: its own.\n\n## b" in document.read_text()
    replace_section(document, "## c", "appended")
    assert document.read_text().endswith("## b\n\nkept\n\n## c\n\nappended\n")


def test_the_generation_targets_are_judged_against_real_vs_real():
    from default_model import target_checks

    def column(fd, coverage, recall):
        return {"fd": {"mean": fd}, "coverage": {"mean": coverage}, "recall": {"mean": recall}}

    record = {"n": 32, "columns": {"real_vs_real": column(100.0, 0.8, 0.8), "real_vs_generated": column(145.0, 0.75, 0.7)},
              "diversity": {"real": {"mean": 0.88}, "generated": {"mean": 0.91}},
              "memorization": {"chance_rate": 0.03, "flagged_voxel": 0, "flagged_feature": 2,
                               "voxel": {"closest_record": {"p_value": 0.01, "share_closer_to_training": 0.86,
                                                            "expected_without_memorization": 0.65}}},
              "conditional_fidelity": {"age": {"generated": {"mae": 6.5}, "real": {"mae": 7.4}}},
              "sharpness": {"sets": {"generated": {"laplacian": {"ratio": {"mean": 0.59, "sd": 0.02}}}}},
              "seconds_per_volume_batch8": 2.4}
    checks = {c["target"]: c["met"] for c in target_checks(record)}
    assert checks == {"FD ≤ 1.5 x Real vs Real": True, "coverage ≥ 0.9 x Real vs Real": True,
                      "recall ≥ 0.9 x Real vs Real": False, "generated MS-SSIM within 0.02 of real": False,
                      "age MAE (generated vs requested) ≤ the predictor's on real scans": True,
                      "high-frequency energy 0.9-1.1 x real": False,
                      "samples flagged as copies (voxel space) ≤ the chance rate": True,
                      "samples flagged as copies (feature space) ≤ the chance rate": False,
                      "closest real subject not leaning to training subjects (p > 0.05)": False,
                      "sampling ≤ 2.5 s per volume at batch 8 on one thread": True}


def test_the_reliability_probes_are_judged_as_a_user_sees_them():
    from reliability import counts, judged, last_line

    bar_then_error = "\rfeatures:   0%|   | 0/1\r                \rmriflow evaluate generation: error: /d/x.nii.gz: bad\n"
    assert last_line(bar_then_error) == "mriflow evaluate generation: error: /d/x.nii.gz: bad"
    assert judged(2, bar_then_error, "/d/x.nii.gz") == "one-line error"
    assert judged(2, bar_then_error, "/d/y.nii.gz") == "unclear error"  # it must name the file
    assert judged(1, "Traceback (most recent call last):\n  ...\nKeyError: 'x'\n", None) == "traceback"
    assert judged(0, "", None) == "ok"
    records = [{"outcome": o, "data_lost": lost} for o, lost in
               (("one-line error", []), ("skipped", []), ("recovered", ["f"]), ("traceback", []))]
    assert counts(records) == {"probes": 4, "one_line_errors": 1, "skipped_with_reason": 1, "recovered": 1,
                               "tracebacks": 1, "other": 0, "data_lost": 1}


def test_label_edits_grow_the_ventricles_and_thin_the_cortex_only_where_asked():
    from label_edits import CSF, GREY, VENTRICLES, WHITE, atrophy_cortex, enlarge_ventricles

    tissue = np.zeros((12, 12, 12), np.uint8)
    tissue[2:10, 2:10, 2:10] = GREY
    tissue[4:8, 4:8, 4:8] = WHITE
    tissue[5:7, 5:7, 5:7] = VENTRICLES
    grown = enlarge_ventricles(tissue)
    assert (grown == VENTRICLES).sum() > (tissue == VENTRICLES).sum()
    changed = grown != tissue
    assert set(np.unique(tissue[changed])) <= {GREY, WHITE} and (grown[changed] == VENTRICLES).all()
    thinned = atrophy_cortex(tissue)
    changed = thinned != tissue
    assert changed.any() and (tissue[changed] == GREY).all() and (thinned[changed] == CSF).all()
    assert thinned[3, 3, 3] == GREY and thinned[2, 5, 5] == CSF  # the outer layer only


def test_the_family_comparison_trains_each_family_by_its_command_in_resumed_legs(tmp_path):
    from families import FAMILY_COMMANDS, train_command

    run = tmp_path / "run"
    first = train_command("flow-dit", Path("data"), Path("ae"), run, 4000, 1000, 1, "age,sex")
    assert first[first.index("train") + 1:first.index("train") + 3] == ["flow", "data"]
    assert first[first.index("--autoencoder") + 1] == "ae" and first[first.index("--backbone") + 1] == "dit"
    assert first[first.index("--stop-at-step") + 1] == "1000" and first[first.index("--max-steps") + 1] == "4000"
    assert "--resume" not in first
    (run / "checkpoints").mkdir(parents=True)  # after the first leg the same schedule is resumed
    assert train_command("flow-dit", Path("data"), Path("ae"), run, 4000, 2000, 1, "age,sex")[-1] == "--resume"
    slices = train_command("slices", Path("data"), Path("ae"), tmp_path / "other", 4000, 1000, 1, "age,sex")
    assert "--autoencoder" not in slices  # the image-space family has none
    assert set(FAMILY_COMMANDS) == {"flow", "flow-dit", "diffusion", "gan", "slices"}


def test_the_family_table_reads_time_to_best_from_the_legs_and_figures_from_the_last():
    from families import table

    def leg(step, minutes, fd):
        column = {m: {"mean": fd if m == "fd" else 0.5, "sd": 1.0} for m in ("fd", "precision", "recall", "density", "coverage")}
        return {"step": step, "training_seconds": 60 * minutes, "training_peak_mib": 900 + step / 100, "parameters": 2e6,
                "batch_size": 8, "nfe": 16, "seconds_per_volume": 1.0, "columns": {"real_vs_generated": column},
                "diversity": {"real": 0.84, "generated": 0.9}, "flagged": {"voxel": 1, "feature": 0},
                "closest_record": {"share_closer_to_training": 0.9, "expected_without_memorization": 0.8},
                "morphometry": {"frechet_generated": None}, "age": None, "consistency": {}}

    record = {"what": "a family", "sampling_peak_mib": 700, "legs": [leg(1000, 5, 200.0), leg(2000, 10, 150.0),
                                                                        leg(4000, 20, 160.0)]}
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1].strip(" |") for line in table({"x": record}, 32)[2:]}
    assert rows["time to best FD (step)"] == "10 min (2000)"  # the best leg, not the last
    assert rows["fd"].startswith("160 ") and rows["training wall time"] == "20 min"
    assert rows["peak memory, training / sampling"] == "940 / 700 MiB"
    assert rows["inter-slice consistency"] == "not measured" and rows["tissue volumes, Fréchet distance"] == "n/a"


def test_a_refined_decoder_gets_its_own_autoencoder_section_beside_its_source(tmp_path, monkeypatch):
    import autoencoder as benchmark

    document = tmp_path / "benchmarks.md"
    document.write_text("# B\n\n## autoencoder: small (2mm)\n\nthe source's figures\n")
    monkeypatch.setattr(benchmark, "DOCUMENT", document)
    point = {"minutes": 20.0, "step": 900, "training_volumes_per_second": 1.5,
             "metrics": {"ssim": 0.9, "psnr": 28.0, "ms_ssim": 0.98, "ssim_brain": 0.85, "psnr_brain": 24.0}}
    record = {"preset": "small", "grid": "2mm", "kind": "kl", "parameters": 2.1e6, "latent_shape": [4, 20, 24, 20],
              "crop_size": [48, 64, 48], "split": "test", "subjects": 15, "points": [point], "peak_memory_mb": 900,
              "machine": {"cpus": 2, "gpu": None, "torch_threads": 1, "load_average": [1.0]}, "command": "python x",
              "decoder_refined_from": {"path": "/runs/ae-small/checkpoints/step-00004000", "step": 4000}}
    benchmark.write_section(record, tmp_path / "result.json")
    text = document.read_text()
    assert "## autoencoder: small (2mm)\n\nthe source's figures" in text  # the source's section is left alone
    refined = text.split("## autoencoder: small, decoder refined (2mm)")[1]
    assert "encoder frozen" in refined and "step 4000" in refined and "| 20.0 | 900 |" in refined
    assert "autoencoder_reconstruction_small_2mm_refined.png" in refined and "SSIM ≥ 0.92" in refined


def test_the_long_run_section_shows_the_last_legs_samples_and_its_reading_when_they_exist(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "longrun"))
    import longrun

    monkeypatch.setattr(longrun, "ROOT", tmp_path)
    figure = lambda mean: {"mean": mean, "sd": 1.0}  # noqa: E731
    leg = {"step": 10, "thread_hours": 1.0, "fd": figure(300.0), "fd_real": figure(90.0), "recall": figure(0.5),
           "coverage": figure(0.4), "coverage_real": figure(0.99), "ms_ssim": {"generated": 0.8, "real": 0.81},
           "hf_ratio": figure(1.0), "age_mae": {"generated": 9.0, "real": 8.0}, "seconds_per_volume": 4.0, "how": "fresh"}
    curve = {"job": {"name": "job", "what": "w", "command": "flow", "measure": {"split": "val", "n": 4}}, "legs": [leg]}
    picture = tmp_path / "docs" / "longrun_job.png"
    plain = longrun.section(curve, picture)
    assert "| 1 | 10 | 1.00 | 300.0 ± 1.0 (real 90.0) |" in plain and "samples beside real" not in plain
    (tmp_path / "docs").mkdir()
    longrun.samples_picture(curve["job"]).write_bytes(b"png")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "longrun-job-reading.md").write_text("Reading: mottled.\n")
    text = longrun.section(curve, picture)
    assert "longrun_job_samples.png" in text and text.rstrip().endswith("Reading: mottled.")


def test_the_long_run_queue_resumes_a_run_or_starts_warm_from_its_export_on_a_new_machine(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "longrun"))
    import longrun

    job = {"name": "toy", "command": "flow --preset wavelet --condition age,sex", "data": "2mm",
           "export": str(tmp_path / "export"), "target_thread_hours": 1, "measure": {"split": "val", "n": 4}}
    monkeypatch.setattr(longrun, "WORK", tmp_path / "work")
    monkeypatch.setattr(longrun, "prepare_data", lambda job: tmp_path / "data")
    launched = []

    class Process:
        pid = 4242

    monkeypatch.setattr(longrun.subprocess, "Popen", lambda command, **kwargs: launched.append(command) or Process())
    longrun.start(job)  # nothing anywhere: a fresh run
    assert launched[-1][:3] == ["nice", "-n", "19"] and "--resume" not in launched[-1]
    assert "--warm-start" not in launched[-1] and launched[-1][launched[-1].index("--threads") + 1] == "1"
    assert launched[-1][launched[-1].index("--checkpoint-minutes") + 1] == "10"
    (tmp_path / "export" / "flow").mkdir(parents=True)
    (tmp_path / "export" / "flow" / "checkpoint.json").write_text("{}")
    longrun.start(job)  # a new machine: warm from the committed export, its covariates kept
    assert launched[-1][launched[-1].index("--warm-start") + 1] == str(tmp_path / "export" / "flow")
    assert "--condition" not in launched[-1]
    (tmp_path / "work" / "toy" / "checkpoints" / "step-00000010").mkdir(parents=True)
    longrun.start(job)  # its own run folder: resumed
    assert "--resume" in launched[-1] and "--warm-start" not in launched[-1]
    assert (tmp_path / "work" / "toy.pid").read_text().strip() == "4242"


def test_a_warm_started_long_run_counts_the_thread_hours_before_its_warm_start(tmp_path):
    """On a new machine the run restarts warm from the export and its log.csv counts CPU time from 0; the curve's
    thread-hours go on from the leg the export was recorded at (2026-12-07: leg 10 was first written as 2.12 h)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "longrun"))
    import longrun

    run = tmp_path / "run"
    legs = [{"step": 5000, "thread_hours": 10.0}, {"step": 6835, "thread_hours": 13.58}]
    (run / "checkpoints" / "step-00007630").mkdir(parents=True)
    (run / "log.csv").write_text("step,loss,cpu_seconds\n6850,1.0,100\n7630,0.9,7632\n")
    (run / "checkpoints" / "step-00007630" / "checkpoint.json").write_text(json.dumps({"step": 7630}))
    assert longrun.hours_before(run, legs) == 0.0  # not warm-started: log.csv holds every hour
    (run / "checkpoints" / "step-00007630" / "checkpoint.json").write_text(
        json.dumps({"step": 7630, "warm_start": {"step": 6835}}))
    assert longrun.hours_before(run, legs) == 13.58
    assert longrun.hours_before(run, legs) + longrun.thread_hours(run) == pytest.approx(15.70)
    assert longrun.hours_before(run, []) == 0.0 and longrun.hours_before(tmp_path / "none", legs) == 0.0


def test_the_bake_off_counts_an_arms_cpu_minutes_to_its_latest_checkpoint_and_joins_its_curve(tmp_path):
    import bakeoff

    run = tmp_path / "arm"
    (run / "checkpoints" / "step-00000020" ).mkdir(parents=True)
    (run / "checkpoints" / "step-00000020" / "checkpoint.json").write_text("{}")
    (run / "log.csv").write_text("step,loss,cpu_seconds\n10,1.0,600\n20,0.9,1200\n30,0.8,1800\n")
    (run / "validation.csv").write_text("step,val_x_mse\n10,0.05\n20,0.04\n")
    assert bakeoff.spent_cpu_minutes(run) == 20.0  # the steps after the checkpoint are lost on a resume
    assert bakeoff.curve(run) == [{"step": 10, "cpu_minutes": 10.0, "val_x_mse": 0.05},
                                  {"step": 20, "cpu_minutes": 20.0, "val_x_mse": 0.04}]
    assert bakeoff.spent_cpu_minutes(tmp_path / "none") == 0.0
    for name in bakeoff.ARMS:  # every arm builds a valid config of the flow-wavelet preset
        config = bakeoff.arm_config(name)
        assert config.representation == "haar2"


def test_the_few_step_targets_compare_one_or_two_evaluations_with_the_teachers_sixteen():
    import fewstep

    def row(label, nfe, fd, recall, seconds, hf=1.0):
        figure = lambda mean, sd=0.0: {"mean": mean, "sd": sd}  # noqa: E731
        return {"label": label, "nfe": nfe, "fd": figure(fd, 10.0), "recall": figure(recall, 0.05),
                "coverage": figure(0.5, 0.05), "hf_ratio": figure(hf, 0.05), "seconds_per_volume_batch8": seconds}

    teacher = row("teacher heun 8", 16, 300.0, 0.5, 2.5)
    close = row("distill-1 euler 1", 1, 309.0, 0.46, 0.2)
    blurred = row("reflow-2 euler 2", 2, 305.0, 0.5, 0.3, hf=0.8)
    slow = row("teacher euler 2", 2, 290.0, 0.6, 0.6)
    many = row("reflow-2 euler 4", 4, 200.0, 0.9, 0.6)
    verdict = fewstep.targets([teacher, close, blurred, slow, many])
    assert verdict["status"] == "met" and verdict["met_by"] == ["distill-1 euler 1"]
    assert verdict["rows"]["reflow-2 euler 2"]["hf"] is False and verdict["rows"]["teacher euler 2"]["seconds"] is False
    assert "reflow-2 euler 4" not in verdict["rows"]  # 4 evaluations are not what the target asks for
    far = row("distill-1 euler 1", 1, 311.0, 0.5, 0.2)
    assert fewstep.targets([teacher, far])["status"] == "missed"
    assert fewstep.targets([far])["status"] == "undetermined"


def test_a_lighter_decoder_meets_its_targets_only_as_good_as_the_models_own_and_fast_enough():
    import decoders

    def row(label, fd, coverage, seconds, hf=0.55):
        figure = lambda mean, sd=0.0: {"mean": mean, "sd": sd}  # noqa: E731
        return {"label": label, "fd": figure(fd, 30.0), "recall": figure(0.9, 0.1), "coverage": figure(coverage, 0.1),
                "hf_ratio": figure(hf, 0.01), "seconds_per_volume_batch8": seconds}

    own = row("own decoder", 270.0, 0.7, 1.3)
    light = row("light", 295.0, 0.65, 0.4)
    verdict = decoders.targets([own, light, row("blurred", 280.0, 0.7, 0.4, hf=0.5), row("slow", 260.0, 0.7, 0.6),
                                row("worse", 301.0, 0.7, 0.3)])
    assert verdict["status"] == "met" and verdict["met_by"] == ["light"]
    assert verdict["rows"]["blurred"]["hf"] is False and verdict["rows"]["slow"]["seconds"] is False
    assert verdict["rows"]["worse"]["fd"] is False and "own decoder" not in verdict["rows"]
    assert decoders.targets([own])["status"] == "missed"  # nothing to compare: no decoder met them


def test_reused_decoder_rows_call_own_decoder_only_what_the_model_ships_today():
    """--reuse after the model shipped another decoder: the earlier own decoder keeps its figures under its
    autoencoder's id and is not retimed (nothing rebuilds it); the kept row of today's decoder becomes own decoder."""
    import decoders

    old, today = "flow-x+ae-step3000", "flow-x+ae-step3000+noattn-step900"
    kept = {"own decoder": {"label": "own decoder", "model_id": old},
            "noattn": {"label": "noattn", "model_id": today, "decoder": {"run": "runs/noattn"}},
            "light": {"label": "light", "model_id": "flow-x+ae-step3000+light-step10"}}
    rows = decoders.relabel_own(kept, today)
    assert list(rows) == ["ae-step3000", "own decoder", "light"]
    assert rows["ae-step3000"]["retime"] is False and rows["ae-step3000"]["label"] == "ae-step3000"
    assert rows["own decoder"]["model_id"] == today and rows["own decoder"]["label"] == "own decoder"
    assert "retime" not in rows["own decoder"] and rows["light"] is kept["light"]
    assert rows["own decoder"]["measured_as"] == "noattn" and rows["ae-step3000"]["measured_as"] == "own decoder"
    moved = {**kept, "noattn": {**kept["noattn"], "measured_as": "first-name"}}  # relabelled by an earlier run
    assert decoders.relabel_own(moved, today)["own decoder"]["measured_as"] == "first-name"  # still where its samples are
    assert decoders.relabel_own(kept, old) is kept  # nothing shipped since: unchanged
    alone = decoders.relabel_own({"own decoder": kept["own decoder"]}, today)
    assert list(alone) == ["ae-step3000"]  # no row of today's decoder: own decoder is measured again


def test_counterfactual_targets_are_met_or_missed_by_the_default_detail(monkeypatch, tmp_path):
    import counterfactuals

    import mriflow.edit

    def kind(slope, brain):
        return {"round_trip_ssim": 1.0, "round_trip_psnr": 99.0, "identity_kept": 1.0, "age_slope": slope,
                "age_mae": 9.0, "age_slope_corrected": slope, "age_mae_corrected": 9.0, "plus_20_ssim": 0.9,
                "hf_ratio": 1.0, "sex_edits_read_as_requested": 1.0,
                "per_decade": {"ventricles_ml": 4.0, "total_brain_ml": brain}}

    summary = {"scan": kind(0.5, -16.0), "moved": kind(0.9, -20.0), "model": kind(0.6, -19.0),
               "predictor_slope_real": 0.7, "predictor_mae": 9.5, "predictor_mae_corrected": 9.8,
               "population_per_decade": {"ventricles_ml": {"per_decade": 4.2, "low": 3.2, "high": 5.0},
                                         "total_brain_ml": {"per_decade": -21.6, "low": -24.7, "high": -18.7}}}
    rows = {t["target"][:20]: t for t in counterfactuals.targets(summary, "val", ["scan", "moved", "model"])}
    brain = next(t for t in rows.values() if t["target"].startswith("total brain"))
    assert brain["met"] == {"scan": False, "moved": True, "model": True} and brain["measured"]["scan"] == "-16.0 ml"
    record = {"command": "c", "subjects": [{}] * 3, "model_id": "m", "solver": "heun", "steps": 4, "summary": summary,
              "split": "val"}
    monkeypatch.setattr(mriflow.edit, "DEFAULT_DETAIL", "scan")
    as_scan = counterfactuals.section(record, tmp_path / "p.png", tmp_path / "r.json")
    monkeypatch.setattr(mriflow.edit, "DEFAULT_DETAIL", "moved")
    as_moved = counterfactuals.section(record, tmp_path / "p.png", tmp_path / "r.json")
    brain_line = lambda text: next(line for line in text.splitlines() if line.startswith("| total brain"))  # noqa: E731
    assert "| missed |" in brain_line(as_scan) and "| met |" in brain_line(as_moved)
    assert "| moved (default) |" in as_moved and "3 val subjects" in as_moved
    # a candidate measured with --also gets its own column and row, and says it is not an output of mriflow edit
    with_candidate = counterfactuals.section(record | {"kinds": ["scan", "moved", "model", "moved-cubic"],
                                                       "summary": summary | {"moved-cubic": kind(1.0, -30.0)}},
                                             tmp_path / "p.png", tmp_path / "r.json")
    assert "| moved-cubic | 0.900 |" in with_candidate and "Candidate **moved-cubic**" in with_candidate
    assert brain_line(with_candidate).count("ml") == 4 and "| met |" in brain_line(with_candidate)


def test_the_counterfactual_benchmark_runs_to_its_end_and_writes_what_it_measured(monkeypatch, tmp_path):
    """benchmarks/counterfactuals.py's main() on a tiny image-space flow and phantoms, with a stand-in for the anatomy
    network (none is shipped for the tiny grid): it gets through a subject, writes its result, picture and section
    with a candidate output beside the three, and --render writes the same section again. (An hour-long run once
    crashed at its very end: a loop variable shadowed targets().)"""
    import common
    import counterfactuals
    from conftest import train_tiny_image_flow

    import mriflow.evaluate.backbones.anatomy as anatomy

    class Reader:  # reads age, sex and volumes off simple intensity statistics: enough to exercise the plumbing
        sex_categories = ("F", "M")

        def __init__(self, weights):
            pass

        def predict(self, volumes):
            v = np.asarray(volumes, np.float32).reshape(len(volumes), -1)
            return {"age": 100 * v.mean(1), "sex_prob": np.clip(v.mean(1) * 3, 0, 1),
                    "ventricles_ml": (v > 0.6).sum(1) * 0.064, "total_brain_ml": (v > 0).sum(1) * 0.064}

    data, run = train_tiny_image_flow(tmp_path, (16, 20, 16), max_steps=2)
    monkeypatch.setattr(anatomy, "AnatomyBackbone", Reader)
    monkeypatch.setattr(anatomy, "anatomy_weights_for", lambda shape: None)
    document = tmp_path / "benchmarks.md"
    monkeypatch.setattr(counterfactuals, "DOCUMENT", document)
    monkeypatch.setattr(counterfactuals, "ROOT", tmp_path)
    monkeypatch.setattr(counterfactuals, "write_result",
                        lambda name, record: common.write_result(name, record, tmp_path / "benchmarks" / "results"))
    assert counterfactuals.main(["--data", str(data), "--model", str(run), "--name", "tiny", "--n", "1", "--split",
                                 "val", "--ages", "30,60", "--steps", "2", "--also", "moved-cubic"]) == 0
    record = json.loads((tmp_path / "benchmarks" / "results" / "counterfactuals-tiny.json").read_text())
    assert record["kinds"] == ["scan", "moved", "model", "moved-cubic"] and len(record["subjects"]) == 1
    assert all(len(t["measured"]) == 4 for t in record["targets"])
    assert (tmp_path / "docs" / "counterfactuals_tiny.png").stat().st_size > 0
    written = document.read_text()
    assert "## counterfactuals: tiny" in written and "1 val subjects" in written and "| moved-cubic |" in written
    assert counterfactuals.render("tiny") == 0 and document.read_text() == written
    with pytest.raises(SystemExit):  # an unknown candidate is refused before any work
        counterfactuals.main(["--data", str(data), "--model", str(run), "--also", "moved-quintic"])


def test_the_decoder_section_names_the_model_and_every_command_its_rows_came_from(tmp_path):
    import decoders

    figure = lambda mean, sd=0.0: {"mean": mean, "sd": sd}  # noqa: E731
    row = {"label": "own decoder", "decoder": {"channels": [32, 64], "res_blocks": [1, 2], "attention": False,
                                               "parameters": 650000},
           "fd": figure(250.0, 30.0), "recall": figure(0.9), "coverage": figure(0.8), "hf_ratio": figure(0.56),
           "ms_ssim": {"generated": 0.89, "real": 0.80}, "age_mae": {"generated": 6.8, "real": 9.5},
           "reconstruction": {"ssim": 0.9, "psnr": 27.0, "ssim_brain": 0.85, "psnr_brain": 23.0},
           "decode_seconds_per_volume": 0.7, "seconds_per_volume_batch8": 0.8}
    record = {"command": "b", "commands": ["a", "b"], "model": "2mm-fewstep", "n": 24, "split": "test",
              "rows": [row], "targets": decoders.targets([row])}
    text = decoders.section(record, tmp_path / "p.png")
    assert text.startswith("Commands: `a`, then `b`. Model `2mm-fewstep` at its own sampler")
    assert "| own decoder | 32/64, 1/2, no, interpolate | 0.65 M | shipped | 250 ± 30 |" in text
