"""Shared fixtures and helpers: head phantoms, small prepared folders and training configs, the shared IXI data."""

from __future__ import annotations

import os
import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mriflow import checkpoint as ckpt
from mriflow.config import Grid, LoopConfig, to_dict
from mriflow.data.dataset import Covariate, CovariateSchema
from mriflow.data.io import save_volume, template_affine
from mriflow.models.autoencoder import Autoencoder, AutoencoderConfig
from mriflow.models.discriminators import DiscriminatorConfig
from mriflow.train.autoencoder import AutoencoderLossConfig, AutoencoderTrainingConfig

IXI_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ixi"

# The evaluation's on-disk feature store (evaluate/feature_store.py) stays off in tests: a test that patches a
# network must not leave rows behind for another, nor read rows from the machine's own cache.
# tests/evaluate/test_feature_store.py turns it on in a temporary folder.
os.environ["MRIFLOW_CACHE"] = "off"


def head_phantom(shape=(48, 56, 44), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic T1-like head: skull shell, CSF, grey and white matter ellipsoids, two ventricles.

    Returns (image float32, label map uint8 with 1 = CSF/ventricle, 2 = grey, 3 = white; 0 outside the brain).
    Asymmetric on purpose (an off-centre lesion-like blob) so flips and rotations are detectable.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))

    def ellipsoid(radii, centre=(0.0, 0.0, 0.0)):
        return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0

    head = ellipsoid((0.95, 0.95, 0.95))
    brain = ellipsoid((0.75, 0.8, 0.75))
    white = ellipsoid((0.5, 0.58, 0.5))
    ventricles = ellipsoid((0.08, 0.3, 0.12), (-0.15, 0.0, 0.1)) | ellipsoid((0.08, 0.3, 0.12), (0.15, 0.0, 0.1))
    blob = ellipsoid((0.12, 0.12, 0.12), (0.35, 0.3, -0.2))

    image = np.zeros(shape, np.float32)
    image[head] = 300.0  # scalp and skull
    labels = np.zeros(shape, np.uint8)
    labels[brain] = 2
    labels[white] = 3
    labels[ventricles] = 1
    image[labels == 2] = 600.0
    image[labels == 3] = 900.0
    image[labels == 1] = 150.0
    image[blob & brain] = 1100.0
    image += rng.normal(0, 10, shape).astype(np.float32) * (image > 0)
    return image, labels


def tiny_velocity_net(**overrides):
    """A small VelocityNet on 2-channel latents, conditioned on age (continuous) and sex (2 categories),
    in eval mode, with MONAI's zero-initialised output convolutions given small random weights
    (otherwise the untrained network outputs zero and every sampler looks alike)."""
    from mriflow.models.velocity import VelocityNet, VelocityNetConfig

    config = dict(
        in_channels=2, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8,
        norm_num_groups=4, covariate_names=("age", "sex"), covariate_kinds=("continuous", "categorical"),
        covariate_categories=(0, 2),
    )
    torch.manual_seed(0)
    return wake(VelocityNet(VelocityNetConfig(**{**config, **overrides})).eval())


def wake(net):
    """`net` with its all-zero tensors given small random weights (MONAI and DiT zero-initialise output layers, so an
    untrained network would output zeros and every condition, sampler and input would look alike)."""
    with torch.no_grad():
        for parameter in net.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05)
    return net


# ---- small prepared folders and training configs, shared by the training, generation and CLI tests ----


def write_prepared(root, splits=("train",) * 5, shape=(16, 20, 16), voxel_mm=4.0):
    """A prepared folder of small head phantoms (intensities in [0, 1]) with a manifest and prepare.json."""
    affine = template_affine(Grid("test", voxel_mm, shape))
    rows = []
    for i, split in enumerate(splits):
        image, labels = head_phantom(shape, seed=i)
        subject = f"sub{i:02d}"
        save_volume(root / "images" / f"{subject}.nii.gz", image / image.max(), affine)
        save_volume(root / "masks" / f"{subject}.nii.gz", (labels > 0).astype(np.uint8), affine, dtype=np.uint8)
        rows.append({"subject": subject, "image": f"images/{subject}.nii.gz", "mask": f"masks/{subject}.nii.gz",
                     "labels": "", "split": split, "age": 20 + 7 * i})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    (root / "prepare.json").write_text(json.dumps({"preset": "test", "recipe": ["phantom"]}))
    return root


# DLMUSE-like labels for the phantom's classes (1 ventricles, 2 grey, 3 white) and their region names
PHANTOM_MUSE_LABELS = {1: 4, 2: 23, 3: 40}
PHANTOM_REGIONS = pd.DataFrame({"index": [4, 23, 40, 35], "name": ["Left_Lateral_Ventricle", "Right_Hippocampus",
                                                                    "Left_Frontal_WM", "BrainStem"]})


def write_labelled(root, splits=("train",) * 4 + ("test",), shape=(16, 20, 16)):
    """write_prepared's phantoms with DLMUSE-like label maps (labels/) and their region list (regions.csv)."""
    import nibabel as nib

    write_prepared(root, splits=splits, shape=shape)
    manifest = pd.read_csv(root / "manifest.csv", dtype={"labels": str})
    for i, subject in enumerate(manifest["subject"]):
        _, labels = head_phantom(shape, seed=i)
        muse = np.zeros_like(labels, dtype=np.int16)
        for phantom_class, label in PHANTOM_MUSE_LABELS.items():
            muse[labels == phantom_class] = label
        affine = nib.load(str(root / manifest.loc[i, "image"])).affine
        save_volume(root / "labels" / f"{subject}.nii.gz", muse, affine, dtype=np.int16)
        manifest.loc[i, "labels"] = f"labels/{subject}.nii.gz"
    manifest.to_csv(root / "manifest.csv", index=False)
    PHANTOM_REGIONS.to_csv(root / "regions.csv", index=False)
    return root


# ---- tiny saved models (untrained), shared by the generation and fault tests ----


MODEL_IMAGE_SHAPE = (16, 20, 16)  # write_prepared's grid, so a prepared phantom folder is on the model's grid
MODEL_LATENT_SHAPE = (2, 4, 5, 4)
MODEL_AFFINE = template_affine(Grid("test", 4.0, MODEL_IMAGE_SHAPE))
MODEL_SCHEMA = CovariateSchema([Covariate("age", "continuous", mean=50.0, std=15.0, minimum=20.0, maximum=80.0),
                                Covariate("sex", "categorical", categories=["F", "M"])])
DIFFUSION_SCHEDULE = {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0015,
                      "beta_end": 0.0205, "prediction": "v", "loss": "l2"}


def save_tiny_autoencoder(folder: Path) -> Path:
    """An untrained tiny autoencoder checkpoint for MODEL_IMAGE_SHAPE volumes; returns the checkpoint folder."""
    config = AutoencoderConfig(kind="kl", patch_size=2, channels=(8, 16), num_res_blocks=(1, 1),
                               attention_levels=(False, False), latent_channels=2, norm_num_groups=4)
    torch.manual_seed(1)
    model = Autoencoder(config)
    weights = {f"autoencoder.{k}": v for k, v in model.state_dict().items()}
    meta = {"stage": "autoencoder", "config": {"model": to_dict(config)}, "step": 5, "latent_scale": 0.8,
            "image_shape": list(MODEL_IMAGE_SHAPE), "latent_shape": list(MODEL_LATENT_SHAPE)}
    return ckpt.save_checkpoint(folder / "checkpoints" / "step-00000005", weights, meta, train_state=weights)


def save_tiny_generator(run: Path, autoencoder: Path, stage: str = "flow", relative: bool = True) -> Path:
    """A generator run ("flow" or "diffusion") of tiny_velocity_net on `autoencoder`'s latents, to the checkpoint
    contract of the training stages; returns the run folder."""
    net = tiny_velocity_net(time_scale=1000.0 if stage == "flow" else 1.0)
    directory = run / "checkpoints" / "step-00000010"
    config = {"model": to_dict(net.config)}
    if stage == "flow":
        config["objective"] = {"loss": "l2", "time_distribution": "logit_normal"}
        config["sampling"] = {"solver": "heun", "steps": 2, "guidance": 1.0, "time_shift": 1.0}
    else:
        config["diffusion"] = DIFFUSION_SCHEDULE
        config["sampling"] = {"solver": "ddim", "steps": 3, "guidance": 1.0}
    meta = {
        "stage": stage, "config": config, "schema": MODEL_SCHEMA.to_dict(), "step": 10,
        "autoencoder": {"path": os.path.relpath(autoencoder, directory) if relative else str(autoencoder),
                        "model_sha256": ckpt.sha256(autoencoder / ckpt.MODEL_FILE), "latent_scale": 0.8, "step": 5},
        "latent_shape": list(MODEL_LATENT_SHAPE), "image_shape": list(MODEL_IMAGE_SHAPE), "affine": MODEL_AFFINE.tolist(),
        "grid": "test",
    }
    weights = {f"velocity.{k}": v for k, v in net.state_dict().items()}
    ckpt.save_checkpoint(directory, weights, meta, train_state={f"ema.velocity.{k}": v for k, v in weights.items()})
    return run


def tiny_config(max_steps=6, adversarial_start=3, kind="kl", **loop):
    """A tiny autoencoder training config for phantoms of write_prepared's shape (critics from `adversarial_start`)."""
    return AutoencoderTrainingConfig(
        model=AutoencoderConfig(kind=kind, patch_size=2, channels=(8, 16), num_res_blocks=(1, 1),
                                attention_levels=(False, False), latent_channels=2, norm_num_groups=4, num_embeddings=16),
        loss=AutoencoderLossConfig(adversarial_start=adversarial_start, feature_matching_weight=0.1,
                                   critic=DiscriminatorConfig(volume_channels=4, volume_layers=2, slice_channels=4,
                                                              slice_layers=2, num_slices=2)),
        loop=LoopConfig(**{"max_steps": max_steps, "batch_size": 2, "warmup_steps": 2, "log_every": 1, "montage_every": 3,
                           "checkpoint_every": 3, "device": "cpu", **loop}),
    )


def read_log(run):
    """The rows of a run's log.csv."""
    with open(run / "log.csv", newline="") as stream:
        return list(csv.DictReader(stream))


# ---- reading montages back: what a PNG shows, not only that it exists ----


def montage_panels(path) -> list[list[np.ndarray]]:
    """The image panels of a montage PNG (three_plane_montage, batch_montage) as grey [0, 1] arrays, one list
    per row (sagittal, coronal, axial): the outermost large non-white rectangles, each framed by its axes'
    spines (cropped off), told from the labels' letters by their size."""
    import matplotlib.image
    from scipy import ndimage

    picture = matplotlib.image.imread(str(path))[..., :3].mean(-1)
    components, _ = ndimage.label(picture < 0.999)
    boxes = [box for box in ndimage.find_objects(components)
             if (box[0].stop - box[0].start) * (box[1].stop - box[1].start) > 1000]

    def inside(inner, outer):
        return inner is not outer and all(o.start <= i.start and i.stop <= o.stop for i, o in zip(inner, outer))

    boxes = [box for box in boxes if not any(inside(box, other) for other in boxes)]  # white areas split a panel
    boxes.sort(key=lambda box: (box[0].start + box[0].stop, box[1].start))  # panels of a row share their centre
    panels = [picture[box[0].start + 2: box[0].stop - 2, box[1].start + 2: box[1].stop - 2] for box in boxes]
    if len(panels) % 3:
        raise AssertionError(f"{path}: {len(panels)} panels, not rows of three")
    return [panels[i: i + 3] for i in range(0, len(panels), 3)]


def brightest_quadrant(panel: np.ndarray) -> str:
    """Which quarter of a panel is brightest on average: "top left", "top right", "bottom left" or "bottom right"."""
    half_rows, half_columns = panel.shape[0] // 2, panel.shape[1] // 2
    quarters = {f"{vertical} {horizontal}": panel[rows, columns].mean()
                for vertical, rows in (("top", slice(0, half_rows)), ("bottom", slice(half_rows, None)))
                for horizontal, columns in (("left", slice(0, half_columns)), ("right", slice(half_columns, None)))}
    return max(quarters, key=quarters.get)


def shows_a_centred_head(panel: np.ndarray) -> bool:
    """The panel of a head phantom: bright in the middle ninth, dark in the four corners."""
    rows, columns = panel.shape
    middle = panel[rows // 3: 2 * rows // 3, columns // 3: 2 * columns // 3].mean()
    corners = np.mean([panel[:rows // 8, :columns // 8].mean(), panel[:rows // 8, -columns // 8:].mean(),
                       panel[-rows // 8:, :columns // 8].mean(), panel[-rows // 8:, -columns // 8:].mean()])
    return bool(middle > 0.3 and corners < 0.05)


def left_anterior_superior_block(shape=(40, 48, 40)) -> np.ndarray:
    """A black RAS volume with a white block in the subject's left, anterior, superior octant, through the
    middle slices: it shows top right in the sagittal view, top left in the coronal and axial views."""
    volume = np.zeros(shape, np.float32)
    x, y, z = (n // 2 for n in shape)
    volume[2: x + 1, y: shape[1] - 2, z: shape[2] - 2] = 1.0  # axis 0 runs left -> right, 1 posterior -> anterior
    return volume


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs on one thread: a second thread only fights the other processes on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def phantom():
    return head_phantom()


@pytest.fixture
def umask_022():
    """The usual umask, so a new file should come out 0644 (0666 & ~0o022)."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture
def ixi_dir() -> Path:
    if not (IXI_DIR / "T1").is_dir():
        pytest.skip(f"shared IXI data not found at {IXI_DIR}")
    return IXI_DIR


def write_prepared_with_sex(root: Path, shape=(16, 20, 16), voxel_mm=4.0) -> Path:
    """write_prepared with 6 training subjects (6 ages: a continuous covariate) and 1 validation one, and a sex column."""
    data = write_prepared(root, splits=("train",) * 6 + ("val",), shape=shape, voxel_mm=voxel_mm)
    manifest = pd.read_csv(data / "manifest.csv")
    manifest["sex"] = ["F", "M", "F", "M", "M", "F", "F"]
    manifest.to_csv(data / "manifest.csv", index=False)
    return data


def train_tiny_image_flow(root: Path, shape=(16, 20, 16), max_steps: int = 2) -> tuple[Path, Path]:
    """A tiny image-space flow (Haar packet, preconditioned prediction) trained `max_steps` on write_prepared_with_sex's
    phantoms, conditioned on age and sex: what the edit tests invert. Returns (prepared folder, run folder)."""
    from mriflow.families.flow import FlowObjectiveConfig, FlowTrainingConfig
    from mriflow.models.velocity import VelocityNetConfig
    from mriflow.train.generator import train_flow
    from mriflow.train.loop import LoopConfig

    data = write_prepared_with_sex(root / "data", shape=shape)
    config = FlowTrainingConfig(
        model=VelocityNetConfig(in_channels=64, channels=(16, 16), attention_levels=(False, True), num_res_blocks=1,
                                num_head_channels=8, norm_num_groups=4),
        objective=FlowObjectiveConfig(prediction="preconditioned"), representation="haar2",
        loop=LoopConfig(max_steps=max_steps, batch_size=2, warmup_steps=1, log_every=1, montage_every=100,
                        checkpoint_every=max_steps, device="cpu"))
    train_flow(data, None, root / "run", condition=["age", "sex"], config=config)
    return data, root / "run"
