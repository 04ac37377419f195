"""How a Turing test item is served: one encoder for every volume, so only the image itself differs.

Prepared scans are exactly 0 outside the brain; generated volumes had faint values there, which made their files
twice as large (105-112 KB real, 192-210 KB synthetic at 2 mm): a rater could tell the classes by the size of the
download. Every item, real or generated, now goes through the same steps:

    x = clip(nan_to_num(volume), 0, 1)
    x = zero_background(x)                       # data.background: outside the brain exactly 0, as prepared
    x = round(x * 65535) / 65535 as float32      # one quantisation, whatever precision the file had
    NIfTI-1 with the study's affine, empty description, mm units; gzip level 6, time stamp 0, no file name

and then every file of a study is padded to one length, that of its largest, with a gzip header comment of spaces
(RFC 1952's FCOMMENT, which every gzip reader skips: Python's gzip, zlib's, the browser's DecompressionStream and
fflate, NiiVue's). Dtype, quantisation, compression, header bytes and length are then the same for every item:
the file tells its class by its content or not at all.

    >>> served = encode_items({"a1": path_a, "b2": path_b}, affine, shape)   # {item id: bytes}, all one length
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from mriflow.data.background import zero_background
from mriflow.data.io import load_volume

QUANTA = 65535  # served intensities are k / QUANTA, k = 0..65535
LEVEL = 6  # gzip compression level
FCOMMENT = 0x10  # the gzip header flag of a zero-terminated comment
OS_UNKNOWN = 255


def quantised(volume: np.ndarray) -> np.ndarray:
    """The served intensities of a volume (D, H, W): in [0, 1], background exactly 0, on the grid k / QUANTA."""
    clipped = np.clip(np.nan_to_num(np.asarray(volume, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return (np.round(zero_background(clipped) * QUANTA) / QUANTA).astype(np.float32)


def nifti_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """An uncompressed NIfTI-1 file of a float32 volume whose header holds nothing but the grid."""
    image = nib.Nifti1Image(volume, affine)
    image.header.set_qform(affine, code=4)
    image.header.set_sform(affine, code=4)
    image.header["descrip"] = b""
    image.header.set_xyzt_units("mm")
    return image.to_bytes()


def deflated(data: bytes) -> tuple[bytes, int, int]:
    """(raw deflate stream, CRC-32, length mod 2^32) of `data`: a gzip member's body and its trailer values."""
    compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(), zlib.crc32(data), len(data) & 0xFFFFFFFF


def gzip_member(body: bytes, crc: int, size: int, padding: int) -> bytes:
    """One gzip member: a fixed header with a comment of `padding` spaces, the deflate body, CRC and size."""
    header = struct.pack("<BBBBIBB", 0x1F, 0x8B, 8, FCOMMENT, 0, 0, OS_UNKNOWN)
    return header + b" " * padding + b"\0" + body + struct.pack("<II", crc, size)


def encode_volume(volume: np.ndarray, affine: np.ndarray, padding: int = 0) -> bytes:
    """One volume as served, before its study's padding (`padding` spaces of comment)."""
    return gzip_member(*deflated(nifti_bytes(quantised(volume), affine)), padding)


def encode_items(paths: dict[str, Path], affine: np.ndarray, shape: tuple[int, int, int]) -> dict[str, bytes]:
    """{item id: the bytes served for it}: each volume encoded alike, then padded to the length of the largest.
    ValueError names a volume whose grid is not the study's."""
    members = {}
    for item_id, path in paths.items():
        volume, _ = load_volume(path)
        if volume.shape != tuple(shape):
            raise ValueError(f"{path}: shape {volume.shape} differs from the study's {tuple(shape)}")
        members[item_id] = deflated(nifti_bytes(quantised(volume), affine))
    longest = max((len(body) for body, _, _ in members.values()), default=0)
    return {item_id: gzip_member(body, crc, size, longest - len(body)) for item_id, (body, crc, size) in members.items()}
