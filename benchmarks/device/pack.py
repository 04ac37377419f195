"""Pack what a GPU window needs into one git-ignored folder, and measure what travels.

A lent GPU machine (one H100/H200) gets a copy of the working tree (tracked files, untracked
files git does not ignore, and the ignored paths a call carries: 64 MiB in all) and no network.
Its image has torch, numpy, scipy, pandas, scikit-image, safetensors, tqdm, matplotlib, pyyaml,
tensorboard, einops and torchdiffeq, but not monai, nibabel or dacite. This script writes `.device/`:

    .device/wheels/*.whl      monai, nibabel and dacite at the versions installed here (pure-Python wheels;
                              their packages' tests/ folders removed: nibabel's test data is 2.7 MiB)
    .device/data.npz.xz       the prepared dataset's volumes of the chosen splits: images as uint8
                              (round(255 x), lossless for training: the step 1/255 is 0.002, 20x below
                              the reconstruction error targets), brain masks as packed bits, the label
                              maps as uint8 tissue classes (mriflow.data.labels; what the anatomy network
                              and the label decoder learn) with the label map that made them, the manifest
                              rows and prepare.json; xz-compressed (about 0.2 MB a 2 mm volume, 0.04 MB
                              a tissue map)
    .device/pack.json         what is inside, with sizes and the sha256 of every file

and then adds up the whole tree that would travel, refusing (exit 2) when it is over the limit.
`run.py` reads the data back (`unpack`) into an ordinary prepared folder.

    python benchmarks/device/pack.py --data data/ixi2                   # train + val splits, wheels
    python benchmarks/device/pack.py --data data/ixi2 --regions ../shared/data/ixi/muse_regions.csv
    python benchmarks/device/pack.py --data data/ixi2 --splits train --no-wheels
    python benchmarks/device/pack.py --data data/ixi2 --no-tissue      # what most jobs carry (jobqueue.py next says)
    python benchmarks/device/pack.py --data data/ixi2 --no-tissue --leave-home src/mriflow/weights/4mm
    python benchmarks/device/pack.py --restore                         # bring what stayed home back (land.py does)

`--leave-home PATH` keeps committed folders a job does not read (the shipped models) off the device:
they are removed from the working tree, only when they are exactly as committed (they come back from
git, `--restore` or `land.py`, or `git checkout HEAD -- PATH`), and listed in .device/pack.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import lzma
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / ".device"
DATA_FILE = "data.npz.xz"
RECORD_FILE = "pack.json"
TRAVEL_LIMIT = 64 * 2**20  # the device tool's limit on what travels
WHEELS = ("monai", "nibabel", "dacite")  # what the training imports that the GPU image lacks
# manylinux platforms pip may match for Python 3.12 on x86-64 (only needed for compiled wheels)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def pack_data(data_dir: Path, splits: tuple[str, ...], target: Path, label_map: dict[str, str] | None = None,
              tissue_maps: bool = True) -> dict:
    """Write the volumes of `splits` of prepared folder `data_dir` to `target` (see the module docstring). The label
    maps travel as tissue classes by `label_map` (DLMUSE label -> class; default: the shipped anatomy network's)
    when every carried subject has one, unless not `tissue_maps` (a job that does not read them: 4 MiB less at 2 mm)."""
    from mriflow.data.dataset import read_manifest
    from mriflow.data.io import load_volume
    from mriflow.data.labels import tissue_lookup
    from mriflow.train.labels import read_label_map, tissue_targets

    manifest = read_manifest(data_dir)
    rows = manifest[manifest["split"].isin(splits)].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"{data_dir}: no subjects in split(s) {', '.join(splits)}")
    images, masks = [], []
    for image_file, mask_file in zip(rows["image"], rows["mask"]):
        image, _ = load_volume(data_dir / image_file)
        mask, _ = load_volume(data_dir / mask_file)
        images.append(np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8))
        masks.append(np.packbits(mask > 0))
    labelled = tissue_maps and "labels" in rows and rows["labels"].map(lambda v: isinstance(v, str) and bool(v)).all()
    tissue = {}
    if labelled:
        label_map = label_map if label_map is not None else read_label_map(None)
        tissue = {"tissue": tissue_targets(data_dir, rows["subject"].astype(str).tolist(), tissue_lookup(label_map)).numpy(),
                  "label_map": np.frombuffer(json.dumps(label_map).encode(), np.uint8)}
    preparation_file = data_dir / "prepare.json"
    preparation = json.loads(preparation_file.read_text()) if preparation_file.is_file() else {}
    preparation.pop("records", None)
    table = rows.drop(columns=["image", "mask", "labels"], errors="ignore")
    buffer = io.BytesIO()
    np.savez(buffer, images=np.stack(images), masks=np.stack(masks),
             manifest=np.frombuffer(table.to_csv(index=False).encode(), np.uint8),
             preparation=np.frombuffer(json.dumps(preparation).encode(), np.uint8), **tissue)
    target.write_bytes(lzma.compress(buffer.getvalue(), preset=6))
    record = {"source": str(data_dir.resolve()), "splits": list(splits), "subjects": len(rows),
              "shape": list(images[0].shape), "bytes": target.stat().st_size, "tissue_maps": bool(labelled)}
    if labelled:  # what the tissue maps add, measured alone
        record["tissue_bytes"] = len(lzma.compress(tissue["tissue"].tobytes(), preset=6))
    return record


def unpack(kit: Path, out: Path) -> Path:
    """Rebuild a prepared folder (uncompressed .nii volumes, manifest.csv, prepare.json) from `kit`'s data.

    Tissue maps, when carried, come back as label maps (labels/) that hold for every class the smallest DLMUSE
    label the carried label map gives it, so `tissue_map` with that label map (written as label_map.json; see
    `label_map`) returns exactly the carried classes, and a network trained on them records the real mapping."""
    import pandas as pd

    from mriflow.data.io import save_volume
    from mriflow.data.labels import TISSUE_CLASSES

    with np.load(io.BytesIO(lzma.decompress((kit / DATA_FILE).read_bytes()))) as arrays:
        images, masks = arrays["images"], arrays["masks"]
        table = pd.read_csv(io.BytesIO(arrays["manifest"].tobytes()), dtype={"subject": str})
        preparation = json.loads(arrays["preparation"].tobytes())
        tissue = arrays["tissue"] if "tissue" in arrays else None
        label_map = json.loads(arrays["label_map"].tobytes()) if "label_map" in arrays else None
    if label_map is not None:
        representative = np.zeros(len(TISSUE_CLASSES), np.int16)  # class index -> a DLMUSE label of it
        for label, name in sorted(label_map.items(), key=lambda item: -int(item[0])):
            representative[TISSUE_CLASSES.index(name)] = int(label)
        (out / "label_map.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "label_map.json").write_text(json.dumps(label_map, indent=1))
    affine = np.asarray(preparation["affine"], dtype=np.float64)
    shape = images.shape[1:]
    rows = []
    for i, row in table.iterrows():
        subject = str(row["subject"])
        save_volume(out / "images" / f"{subject}.nii", images[i].astype(np.float32) / 255.0, affine)
        mask = np.unpackbits(masks[i])[: int(np.prod(shape))].reshape(shape)
        save_volume(out / "masks" / f"{subject}.nii", mask, affine, dtype=np.uint8)
        labels = ""
        if tissue is not None:
            labels = f"labels/{subject}.nii"
            save_volume(out / labels, representative[tissue[i]], affine, dtype=np.int16)
        rows.append({"subject": subject, "image": f"images/{subject}.nii", "mask": f"masks/{subject}.nii", "labels": labels,
                     **{k: v for k, v in row.items() if k != "subject"}})
    columns = ["subject", "image", "mask", "labels", "split"]
    frame = pd.DataFrame(rows)
    frame[columns + [c for c in frame.columns if c not in columns]].to_csv(out / "manifest.csv", index=False)
    (out / "prepare.json").write_text(json.dumps(preparation, indent=1))
    return out


def label_map(data: Path) -> dict[str, str] | None:
    """The label map of an unpacked folder's label maps (None when no tissue maps travelled)."""
    path = data / "label_map.json"
    return json.loads(path.read_text()) if path.is_file() else None


def download_wheels(target: Path) -> list[dict]:
    """Wheels of WHEELS at the versions installed here, for Python 3.12 on manylinux x86-64."""
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob("*.whl"):
        stale.unlink()
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    wheels = []
    for name in WHEELS:
        version = importlib.metadata.version(name)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(target),
                        f"{name}=={version}"], check=True)
        wheels.append({"name": name, "version": version})
    for wheel in target.glob("*.whl"):
        removed = slim_wheel(wheel)
        if removed:
            next(w for w in wheels if wheel.name.lower().startswith(w["name"])).update(tests_removed_bytes=removed)
    return wheels


def slim_wheel(wheel: Path) -> int:
    """Rewrite `wheel` without the files of its packages' tests/ folders (nibabel's are 2.7 MiB of its 3.1 MiB, test
    data a job never reads) and their RECORD lines; returns the compressed bytes removed. pip installs the rest as
    before (`--no-index --no-deps --target`)."""
    import zipfile

    with zipfile.ZipFile(wheel) as source:
        dropped = [i for i in source.infolist() if "/tests/" in f"/{i.filename}"]
        if not dropped:
            return 0
        names = {i.filename for i in dropped}
        slim = wheel.with_suffix(".slim")
        with zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as out:
            for item in source.infolist():
                if item.filename in names:
                    continue
                data = source.read(item)
                if item.filename.endswith(".dist-info/RECORD"):
                    data = "".join(line for line in data.decode().splitlines(keepends=True)
                                   if line.split(",")[0] not in names).encode()
                out.writestr(item, data)
    removed = wheel.stat().st_size - slim.stat().st_size
    slim.replace(wheel)
    return removed


def leave_home(paths: list[str], root: Path = ROOT) -> list[str]:
    """Remove the committed folders `paths` (relative to `root`) from the working tree, so they do not travel; each
    must be exactly as committed (no change, nothing untracked in it), else ValueError and nothing is removed."""
    for path in paths:
        if not (root / path).exists():
            raise ValueError(f"--leave-home {path}: no such file or folder in {root}")
        changed = subprocess.run(["git", "status", "--porcelain", "--", path], cwd=root, capture_output=True,
                                 text=True, check=True).stdout.strip()
        tracked = subprocess.run(["git", "ls-files", "--", path], cwd=root, capture_output=True, text=True,
                                 check=True).stdout.strip()
        if changed or not tracked:
            raise ValueError(f"--leave-home {path}: {'it differs from the last commit' if tracked else 'not committed'}"
                             "; only committed, unchanged files can stay home (git brings them back); commit it first")
    for path in paths:
        target = root / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return list(paths)


def restore(kit: Path = KIT, root: Path = ROOT, record: dict | None = None) -> list[str]:
    """Bring back from git what `leave_home` removed (listed in the kit's record, or in `record`); returns those
    paths."""
    if record is None:
        file = kit / RECORD_FILE
        record = json.loads(file.read_text()) if file.is_file() else {}
    paths = record.get("left_home", [])
    if paths:
        subprocess.run(["git", "checkout", "HEAD", "--", *paths], cwd=root, check=True)
    return paths


def travelling_files(root: Path = ROOT, carried: tuple[Path, ...] = (KIT,)) -> list[tuple[Path, int]]:
    """(path, bytes) of everything a device call sends: tracked and untracked-not-ignored files, plus `carried`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    files = [root / name for name in listed if name and (root / name).is_file()]
    for folder in carried:
        files += [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return sorted(((p, p.stat().st_size) for p in set(files)), key=lambda item: -item[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="prepared dataset (mriflow prepare --preset 2mm); required unless --restore")
    parser.add_argument("--splits", default="train,val", help="splits to carry (default train,val; test stays here)")
    parser.add_argument("--kit", default=str(KIT), help="output folder (default .device in the repository root)")
    parser.add_argument("--regions", help="the label maps' region list (muse_regions.csv: index,name) that makes them "
                        "tissue classes (default: the shipped anatomy network's label map)")
    parser.add_argument("--no-tissue", action="store_true",
                        help="carry no tissue maps (every job but J2's anatomy network; the queue's pack arguments say)")
    parser.add_argument("--no-wheels", action="store_true",
                        help="download no wheels (CPU rehearsal, or those already in the kit are kept)")
    parser.add_argument("--leave-home", action="append", default=[], metavar="PATH",
                        help="a committed folder the job does not read (e.g. a shipped model) that should not travel: "
                             "removed from the working tree until --restore or land.py (repeatable)")
    parser.add_argument("--restore", action="store_true", help="only bring back what --leave-home removed")
    parser.add_argument("--no-data", action="store_true", help="carry no prepared data (J5 times the shipped models and "
                        "reads none; a data file of an earlier pack is removed from the kit)")
    args = parser.parse_args(argv)

    kit = Path(args.kit)
    if args.restore:
        print(f"restored: {', '.join(restore(kit)) or 'nothing (no folder stayed home)'}")
        return 0
    if args.data is None and not args.no_data:
        parser.error("--data is required (unless --restore or --no-data)")
    data_dir = Path(args.data or ".")
    if not args.no_data and not (data_dir / "manifest.csv").is_file():
        print(f"pack: --data {data_dir} is not a prepared dataset (no manifest.csv); run `mriflow prepare` first",
              file=sys.stderr)
        return 2
    kit.mkdir(parents=True, exist_ok=True)
    restore(kit)  # a previous pack's folders come back first: each pack says afresh what stays home
    try:
        left = leave_home(args.leave_home)
    except ValueError as error:
        print(f"pack: {error}", file=sys.stderr)
        return 2
    try:
        return _pack(args, data_dir, kit, left)
    except BaseException:
        restore(kit, record={"left_home": left})  # nothing stays home after a pack that failed
        raise


def _pack(args: argparse.Namespace, data_dir: Path, kit: Path, left: list[str]) -> int:
    from mriflow.train.labels import read_label_map

    if args.no_data:
        (kit / DATA_FILE).unlink(missing_ok=True)
        data = {"subjects": 0, "bytes": 0, "tissue_maps": False}
    else:
        data = pack_data(data_dir, tuple(args.splits.split(",")), kit / DATA_FILE,
                         None if args.regions is None else read_label_map(args.regions), not args.no_tissue)
    record = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "data": data,
              "wheels": [{"file": w.name} for w in sorted((kit / "wheels").glob("*.whl"))] if args.no_wheels
              else download_wheels(kit / "wheels"),
              "left_home": left}
    from mriflow.utils.files import sha256

    record["files"] = {str(p.relative_to(kit)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
                       for p in sorted(kit.rglob("*")) if p.is_file() and p.name != RECORD_FILE}
    files = travelling_files(carried=(kit,)) if kit.resolve().is_relative_to(ROOT) else travelling_files()
    total = sum(size for _, size in files)
    record["travelling_bytes"] = total
    (kit / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    tissue = (f", tissue maps {record['data']['tissue_bytes'] / 2**20:.1f} MiB of it" if record["data"]["tissue_maps"]
              else "; no tissue maps (--no-tissue)" if args.no_tissue else "; no data (--no-data)" if args.no_data
              else "; no tissue maps (not every subject has a label map)")
    print(f"packed {record['data']['subjects']} subjects ({record['data']['bytes'] / 2**20:.1f} MiB{tissue}) and "
          f"{len(record['wheels'])} wheels into {kit}")
    if left:
        print(f"staying home until `pack.py --restore` or land.py: {', '.join(left)}")
    print(f"travelling: {total / 2**20:.1f} MiB of {TRAVEL_LIMIT / 2**20:.0f} MiB; largest: "
          + ", ".join(f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p} {s / 2**20:.1f}" for p, s in files[:5]))
    if total > TRAVEL_LIMIT:
        print(f"pack: {total / 2**20:.1f} MiB would travel, over the device limit of 64 MiB; pack with the job's own "
              "arguments (jobqueue.py next), carry fewer splits (--splits train), leave committed folders the job "
              "does not read home (--leave-home) or make the largest files smaller", file=sys.stderr)
        restore(kit)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
