"""Any image Pillow opens → 8-bit RGB, with deep grey images scaled from their range instead of clipped.

Pillow's `convert("RGB")` is right for every 8-bit mode its decoders produce (1, L, LA, P, PA, RGB, RGBA,
CMYK, YCbCr, LAB), but it clips the deep grey modes at 255: a 16-bit PNG ('I;16') of mid grey comes out
white. Those are scaled from the full range of their data instead:

* 'I;16', 'I;16B', 'I;16L', 'I;16N': 16-bit, 0..65535;
* 'I' (32-bit integers; Pillow's mode for 16-bit PGM and some TIFFs): 0..65535 when every value fits in
  16 bits, else 0..2**32 − 1;
* 'F' (32-bit floats): 0..1 when every value lies there (the usual float-image convention), else 0..255,
  else 0..65535, else 0..2**32 − 1.

Negative values become 0.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

DEEP_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_INTEGER_RANGES = (65535.0, 2.0**32 - 1)
_FLOAT_RANGES = (1.0, 255.0, *_INTEGER_RANGES)


def full_scale(mode: str, values: np.ndarray) -> float:
    """The value that stands for white in a deep image of `mode` holding `values` (module docstring)."""
    top = float(values.max()) if values.size else 0.0
    ranges = _FLOAT_RANGES if mode == "F" else _INTEGER_RANGES
    return next((r for r in ranges if top <= r), top)


def rgb_image(image: Image.Image) -> Image.Image:
    """`image` as an 8-bit RGB image (alpha dropped, as OpenOOD's `convert("RGB")` drops it)."""
    if image.mode not in DEEP_MODES:
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    grey = np.clip(np.rint(values / full_scale(image.mode, values) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
