"""A lighter decoder for the default 2 mm model (issue 27): quality and seconds per volume through each decoder.

The default model draws a brain in one network evaluation (0.13 s per volume at batch 8 on one thread) and then
spends 1.2 s in the autoencoder's decoder. A lighter decoder for the same encoder (the same latents:
`mriflow train autoencoder --refine-decoder AE --decoder-channels 16,32 ...`) is exported with the model
(`export_generator(..., autoencoder=RUN)`, which refuses any decoder of another encoder) and measured beside the
model's own decoder on one split, from the same requests and noise: the samples (FD, precision, recall, coverage on
the anatomy network's features, MS-SSIM, high-frequency energy, age MAE, copies flagged), the split's real scans
reconstructed (SSIM, PSNR, inside the brain too), and seconds per volume at batch 8 on one thread, decoder alone and
in all. Decoders are chosen on the val split.

    python benchmarks/decoders.py --data runs/longrun/data-2mm --model 2mm-fewstep \
        --decoder light-16-32=runs/decoder/light-16-32 --split val --n 24

Writes benchmarks/results/decoders-2mm-<split>.json, docs/decoders_2mm_<split>.png (one request through every
decoder, and a real scan's reconstructions) and the "## lighter decoder (2mm, <split>)" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from common import (DOCUMENT, RESULTS, command_line, link, machine, quality_checks, replace_section, verdict,  # noqa: E402
                    verdict_lines, write_result)

SECONDS_BATCH = 8
TARGET_SECONDS = 0.5  # issue 27: under 0.5 s per volume at batch 8 on one thread


def decoder_record(run: Path) -> dict:
    """How a decoder run was trained: steps, CPU minutes, its sizes and parameters."""
    from bakeoff import spent_cpu_minutes  # noqa: E402  (benchmarks/ is on sys.path)

    from mriflow import checkpoint as ckpt

    model, meta = ckpt.load_autoencoder(run)
    return {"run": str(run), "step": meta.get("step"), "cpu_minutes": round(spent_cpu_minutes(Path(run)), 1),
            **decoder_sizes(model)}


def decoder_sizes(autoencoder) -> dict:
    """An autoencoder's decoder as the table shows it: channels, blocks, attention, upsampling and parameters."""
    channels, blocks, attention, upsample = autoencoder.config.decoder_levels
    return {"channels": list(channels), "res_blocks": list(blocks), "attention": attention, "upsample": upsample,
            "parameters": sum(p.numel() for p in autoencoder.decoder.parameters())}


def decode_seconds(generator, repeats: int = 2) -> float:
    """Seconds per volume of the decoder alone at batch SECONDS_BATCH (one thread), best of `repeats`."""
    import torch

    latents = torch.randn(SECONDS_BATCH, *generator.latent_shape, generator=torch.Generator().manual_seed(0))
    generator.decode(latents[:1])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        generator.decode(latents)
        best = min(best, (time.perf_counter() - started) / SECONDS_BATCH)
    return best


def relabel_own(kept: dict[str, dict], model_id: str) -> dict[str, dict]:
    """Rows kept from an earlier run, by label, with "own decoder" meaning the model's decoder today: when the model
    has shipped another decoder since (its model id differs), the earlier own decoder's row keeps its figures under
    its autoencoder's id and is not retimed (nothing rebuilds it), and the kept row of today's decoder, if any,
    becomes "own decoder"."""
    own = kept.get("own decoder")
    if own is None or own["model_id"] == model_id:
        return kept
    def renamed(row: dict, label: str, **more) -> dict:  # its samples stay in the folder it was measured in
        return {**row, "label": label, "measured_as": row.get("measured_as", row["label"]), **more}

    label = own["model_id"].split("+", 1)[-1]
    rows = {(label if name == "own decoder" else name): (renamed(row, label, retime=False) if name == "own decoder"
                                                         else row)
            for name, row in kept.items()}
    today = next((name for name, row in rows.items() if row["model_id"] == model_id), None)
    if today is not None:
        rows = {("own decoder" if name == today else name): (renamed(row, "own decoder") if name == today else row)
                for name, row in rows.items()}
    return rows


def retime(rows: list[dict], model: Path, exported: Path, rounds: int = 3) -> None:
    """Every row's seconds measured again here, in one process, the decoders taking turns round by round (best of
    `rounds`): rows kept from an earlier run (--reuse) and rows measured now under other load are compared on the
    same footing. A decoder's exported model folder is made again from its run if it is gone."""
    import os

    from generate import time_sampling  # noqa: E402  (benchmarks/generate.py)

    from mriflow.export import export_generator
    from mriflow.generator import load_generator
    from mriflow.models.conditioning import resolve_request

    generators = {}
    for row in rows:
        if row.get("retime") is False:  # an earlier own decoder: its seconds stay those measured with it
            continue
        folder = model if row["label"] == "own decoder" else exported / row["label"]
        if not (folder / "flow").is_dir():
            export_generator(model / "flow", folder, autoencoder=row["decoder"]["run"])
        generators[row["label"]] = load_generator(folder, device="cpu", labels=False)
    best = {label: {"decode": float("inf"), "all": float("inf")} for label in generators}
    for _ in range(rounds):
        for label, generator in generators.items():
            settings = generator.sampling_settings()
            condition = resolve_request(generator.schema, {"age": 50.0, "sex": "F"})
            best[label]["decode"] = min(best[label]["decode"], decode_seconds(generator, repeats=1))
            timing = time_sampling(generator, settings, condition, SECONDS_BATCH, repeats=1)
            best[label]["all"] = min(best[label]["all"], timing["seconds_per_volume"])
    for row in (row for row in rows if row["label"] in best):
        row["decode_seconds_per_volume"] = round(best[row["label"]]["decode"], 4)
        row["seconds_per_volume_batch8"] = round(best[row["label"]]["all"], 4)
        row["timed"] = f"with the others, taking turns, best of {rounds}; load average {os.getloadavg()[0]:.1f}"


def reconstruction(generator, data: Path, split: str, out: Path) -> dict:
    """The split's real scans through the generator's autoencoder: SSIM and PSNR, whole volume and inside the brain."""
    from mriflow.evaluate.reconstruction import evaluate_reconstruction

    summary = evaluate_reconstruction(data, generator.path.parent / "autoencoder", split, out, device="cpu")
    return {key: summary["metrics"][key]["mean"] for key in ("ssim", "psnr", "ssim_brain", "psnr_brain")}


def measure(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent / "longrun"))
    from fewstep import measure_one  # noqa: E402

    from mriflow.export import export_generator
    from mriflow.generator import load_generator, shipped_models

    torch.set_num_threads(1)
    model = shipped_models().get(args.model, Path(args.model))
    rows = []
    plans = [("own decoder", None)] + [tuple(item.split("=", 1)) for item in args.decoder]
    earlier = RESULTS / f"decoders-2mm-{args.split}.json"
    kept = {}
    if args.reuse and earlier.is_file():  # rows measured before, for decoders not named again (own decoder included)
        named = {label for label, _ in plans[1:]}
        kept = {row["label"]: row for row in json.loads(earlier.read_text())["rows"] if row["label"] not in named}
        kept = relabel_own(kept, load_generator(model, device="cpu", labels=False).model_id)
        plans = ([] if "own decoder" in kept else plans[:1]) + plans[1:]
    for label, run in plans:
        folder = model
        trained = None
        if run is not None:
            folder = args.out / "models" / label
            shutil.rmtree(folder, ignore_errors=True)
            export_generator(model / "flow", folder, autoencoder=run)  # refuses a decoder of another encoder
            trained = decoder_record(Path(run))
        generator = load_generator(folder, device="cpu", labels=False)
        print(f"measuring {label}")
        settings = generator.sampling_settings()
        row = {"label": label, "decoder": trained, "model_id": generator.model_id,
               **measure_one(generator, settings, args.data, args.out / "measure" / args.split / label, args.split,
                             args.n),
               "decode_seconds_per_volume": decode_seconds(generator),
               "reconstruction": reconstruction(generator, args.data, args.split,
                                                args.out / "measure" / args.split / label / "reconstruction")}
        if trained is None:
            row["decoder"] = decoder_sizes(generator.autoencoder)
        rows.append(row)
    if kept:
        rows = [kept.pop("own decoder", None) or rows.pop(0)] + list(kept.values()) + rows
    retime(rows, model, args.out / "models")
    commands = [command_line(__file__, args.argv)]
    if kept:  # the kept rows' figures came from the earlier commands
        before = json.loads(earlier.read_text())
        commands = [c for c in before.get("commands", [before["command"]]) if c not in commands] + commands
    record = {"benchmark": "decoders", "grid": "2mm", "split": args.split, "n": args.n, "model": args.model,
              "command": commands[-1], "commands": commands, "machine": machine(), "rows": rows}
    record["targets"] = targets(rows)
    write_result(f"decoders-2mm-{args.split}", record)
    picture = DOCUMENT.parent / f"decoders_2mm_{args.split}.png"
    montage(rows, args.out / "measure" / args.split, picture)
    replace_section(DOCUMENT, f"## lighter decoder (2mm, {args.split})", section(record, picture))
    return record


def targets(rows: list[dict]) -> dict:
    """Each lighter decoder against the model's own: FD within its bootstrap sd, recall, coverage and sharpness no
    lower by more than one sd (issue 27's quality targets), and under TARGET_SECONDS per volume in all."""
    return verdict({row["label"]: quality_checks(row, rows[0], TARGET_SECONDS) for row in rows[1:]})


def montage(rows: list[dict], folder: Path, path: Path, index: int = 12) -> None:
    """One request (the same noise, age and sex) through every decoder, and a real scan with its reconstructions."""
    from mriflow.data.io import load_volume
    from mriflow.utils.montage import three_plane_montage

    volumes = {}
    for row in rows:
        sample = folder / row.get("measured_as", row["label"]) / "samples" / f"sample_{index:05d}.nii.gz"
        if sample.is_file():
            volumes[f"sample, {row['label']}"] = load_volume(sample)[0]
    if volumes:
        three_plane_montage(volumes, path, title="one request through each decoder (same latent)")


def cell(value: dict, digits: int = 0) -> str:
    return f"{value['mean']:.{digits}f} ± {value['sd']:.{digits}f}"


def section(record: dict, picture: Path) -> str:
    commands = record.get("commands", [record["command"]])
    lines = [f"Command{'s' if len(commands) > 1 else ''}: " + ", then ".join(f"`{c}`" for c in commands)
             + f". Model `{record['model']}` at its own sampler (one Euler step), "
             f"{record['n']} samples at requests sweeping age and sex against the {record['split']} split; one CPU "
             f"thread; the seconds of every decoder measured again together, taking turns (best of three rounds), so "
             f"rows kept from earlier runs compare on the same footing (but a decoder the model no longer ships, named "
             f"by its autoencoder's id). The same request through each decoder: "
             f"{link(picture, DOCUMENT)}.", "",
             "| decoder | channels, blocks, attention, upsampling | parameters | trained (steps, CPU min) | FD | recall | coverage | "
             "MS-SSIM (real) | HF / real | age MAE (real) | reconstruction SSIM / PSNR (brain) | decoder s / vol | "
             "s / volume, batch 8 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        d = r["decoder"]
        trained = f"{d['step']}, {d['cpu_minutes']}" if "step" in d else "shipped"
        rec = r["reconstruction"]
        later = " (timed earlier)" if r.get("retime") is False else ""
        lines.append(f"| {r['label']} | {'/'.join(map(str, d['channels']))}, {'/'.join(map(str, d['res_blocks']))}, "
                     f"{'yes' if d['attention'] else 'no'}, {d.get('upsample', 'interpolate')} | {d['parameters'] / 1e6:.2f} M | {trained} | {cell(r['fd'])} | "
                     f"{cell(r['recall'], 2)} | {cell(r['coverage'], 2)} | {r['ms_ssim']['generated']:.3f} "
                     f"({r['ms_ssim']['real']:.3f}) | {cell(r['hf_ratio'], 2)} | {r['age_mae']['generated']:.1f} "
                     f"({r['age_mae']['real']:.1f}) | {rec['ssim']:.3f} / {rec['psnr']:.1f} dB ({rec['ssim_brain']:.3f} / "
                     f"{rec['psnr_brain']:.1f} dB) | {r['decode_seconds_per_volume']:.3f}{later} | "
                     f"{r['seconds_per_volume_batch8']:.3f}{later} |")
    lines += ["", *verdict_lines(record["targets"], "issue 27: against the model's own decoder, FD within its bootstrap "
                                 "sd, recall, coverage and HF no lower by more than one sd; under "
                                 f"{TARGET_SECONDS} s per volume at batch 8 in all")]
    reading = RESULTS / f"decoders-2mm-{record['split']}-reading.md"
    if reading.is_file():
        lines += ["", reading.read_text().strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the prepared 2 mm dataset (its val and test splits)")
    parser.add_argument("--model", default="2mm-fewstep", help="a shipped model's name or an exported model folder")
    parser.add_argument("--decoder", action="append", default=[], metavar="NAME=RUN",
                        help="a decoder run of the model's encoder (mriflow train autoencoder --refine-decoder)")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--reuse", action="store_true",
                        help="keep the earlier result's quality figures for the decoders not named again (own decoder "
                             "included); measure only the named ones (every row's seconds are measured again, but "
                             "those of a decoder the model no longer ships)")
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("runs/decoder"))
    args = parser.parse_args(argv)
    args.argv = argv
    bad = [item for item in args.decoder if "=" not in item]
    if bad:
        parser.error(f"--decoder {bad[0]}: give NAME=RUN")
    measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
