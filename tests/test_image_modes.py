"""Issue 11: images in every mode Pillow's decoders produce come out as the right 8-bit RGB, in both loaders (OOD
sets: hrp_ood.eval.ood_data; ID image folders: hrp_ood.data.folder). 16-bit and float images are scaled from
their range, not clipped: a mid-grey 16-bit PNG used to come out white."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hrp_ood.data.folder import decode_all
from hrp_ood.errors import UserError
from hrp_ood.eval.ood_data import load_image_folder

SIZE = 8


def grey(value: int) -> tuple[int, int, int]:
    return (value, value, value)


def deep(mode: str, value: float) -> Image.Image:
    """A constant image of a deep mode, built from its raw bytes (Pillow's convert between them clips)."""
    dtype = {"I": "<i4", "F": "<f4", "I;16": "<u2", "I;16B": ">u2"}[mode]
    raw = {"I": "I;32", "F": "F;32F", "I;16": "I;16", "I;16B": "I;16B"}[mode]
    return Image.frombytes(mode, (SIZE, SIZE), np.full((SIZE, SIZE), value, dtype=dtype).tobytes(), "raw", raw)


# (case id, the image, file extension, expected RGB or None for "what Pillow's convert('RGB') gives")
CASES = [
    ("1", Image.new("1", (SIZE, SIZE), 1), ".png", None),
    ("L", Image.new("L", (SIZE, SIZE), 77), ".png", None),
    ("LA", Image.new("LA", (SIZE, SIZE), (77, 120)), ".png", None),
    ("P", Image.new("P", (SIZE, SIZE), 9), ".png", None),
    ("PA", Image.new("PA", (SIZE, SIZE), (9, 120)), ".tiff", None),
    ("RGB", Image.new("RGB", (SIZE, SIZE), (10, 120, 230)), ".png", None),
    ("RGBA", Image.new("RGBA", (SIZE, SIZE), (10, 120, 230, 60)), ".png", None),
    ("CMYK", Image.new("CMYK", (SIZE, SIZE), (20, 140, 60, 10)), ".tiff", None),
    ("YCbCr", Image.new("YCbCr", (SIZE, SIZE), (120, 100, 150)), ".tiff", None),
    ("LAB", Image.new("LAB", (SIZE, SIZE), (128, 150, 100)), ".tiff", None),
    ("I;16-png", deep("I;16", 20000), ".png", grey(78)),  # 20000 / 65535 · 255 = 77.8
    ("I;16B-tiff", deep("I;16B", 40000), ".tiff", grey(156)),
    ("I-tiff-16-bit-values", deep("I", 32896), ".tiff", grey(128)),
    ("I-pgm-16-bit", deep("I;16", 50000), ".pgm", grey(195)),  # Pillow opens a 16-bit PGM as mode I
    ("F-tiff-unit-range", deep("F", 0.25), ".tiff", grey(64)),
    ("F-tiff-byte-range", deep("F", 100.0), ".tiff", grey(100)),
]
OPENED_AS = {"I;16B-tiff": "I;16B", "I-pgm-16-bit": "I", "I;16-png": "I;16"}


def write_png_rgb16(path: Path, rgb: tuple[int, int, int]) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one): IHDR bit depth 16, colour type 2."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + struct.pack(">" + "H" * 3 * SIZE, *(rgb * SIZE))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", SIZE, SIZE, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(row * SIZE))
        + chunk(b"IEND", b"")
    )


def loaded_both_ways(path: Path) -> list[np.ndarray]:
    """The image as (H, W, 3) uint8 from the OOD loader and, for the ID loader's extensions, from the ID loader."""
    ood = load_image_folder(path.parent, SIZE)
    assert ood.shape == (1, 3, SIZE, SIZE)
    results = [ood[0].permute(1, 2, 0).numpy()]
    results.append(decode_all([path], SIZE)[0].permute(1, 2, 0).numpy())
    return results


@pytest.mark.parametrize("case, image, ext, expected", CASES, ids=[c[0] for c in CASES])
def test_every_mode_becomes_the_right_rgb(case, image, ext, expected, tmp_path):
    path = tmp_path / f"image{ext}"
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == OPENED_AS.get(case, image.mode), "the file holds the mode this case is about"
    want = np.asarray(image.convert("RGB"))[0, 0] if expected is None else np.array(expected)
    for got in loaded_both_ways(path):
        assert got.dtype == np.uint8
        assert np.abs(got.astype(int) - want).max() <= 1, (case, got[0, 0], want)


def test_a_16_bit_rgb_png_is_scaled_in_both_loaders(tmp_path):
    path = tmp_path / "deep.png"
    write_png_rgb16(path, (40000, 20000, 65535))  # torchvision decodes it to uint16
    for got in loaded_both_ways(path):
        assert np.abs(got.astype(int) - np.array([156, 78, 255])).max() <= 1, got[0, 0]


def _png_header_claiming(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("width, height", [(20000, 20000), (12000, 9000)])
def test_an_image_claiming_an_absurd_size_is_refused_before_decoding(tmp_path, width, height):
    """A header may claim any size and decoders allocate it first (a 20000x20000 PNG crashed the process)."""
    from hrp_ood.data.images import decode_images, decode_rgb

    path = _png_header_claiming(tmp_path / "huge.png", width, height)
    with pytest.raises(UserError, match=r"huge.png") as info:
        decode_rgb(path)
    assert "\n" not in str(info.value)
    assert decode_images([path], SIZE, skip_corrupt=True).shape == (0, 3, SIZE, SIZE)  # skipped, counted


def test_a_tiny_first_training_image_asks_for_image_size(tmp_path):
    from hrp_ood.data.folder import load_image_folder as load_training_folder

    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (1, 1)).save(tmp_path / split / "a" / "0.png")
        Image.new("RGB", (32, 32)).save(tmp_path / split / "a" / "1.png")
    with pytest.raises(UserError, match=r"1 px on its shorter side.*--set image_size=N"):
        load_training_folder(tmp_path)
    assert load_training_folder(tmp_path, image_size=32).train_images.shape == (2, 3, 32, 32)
