"""Batched augmentation on the training device (SPEC §2): uint8 batches in, normalised float32 out.

weak   = RandomCrop(image_size, padding, zero fill) + horizontal flip, with a different offset and
         flip for every image, done by one gather (no loop over samples)
strong = weak + RandAugment(num_ops=2, magnitude=9) or AutoAugment(CIFAR-10 policy), torchvision v2

torchvision's v2 policies draw one op sequence per call and apply it to every image of the call,
so `strong` splits the batch into chunks of `chunk_size` images, each chunk with its own draw
(a batch of 128 with chunk_size 16 sees 8 different op sequences). Smaller chunks give more
diversity for more Python calls; chunk_size=1 is the per-sample torchvision behaviour.

All randomness comes from torch's global RNG (the trainer seeds it): offsets and flips from the
generator of the images' device, the policy draws from the CPU generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from hrp_ood.errors import UserError

STRONG_POLICIES = ("randaugment", "autoaugment", "none")
RANDAUGMENT_NUM_OPS = 2
RANDAUGMENT_MAGNITUDE = 9


def crop_with_offsets(
    images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int, padding: int
) -> torch.Tensor:
    """Zero-pad every image by `padding` on each side, then cut out padded[i, :, top_i:top_i+size, left_i:left_i+size].

    images (B, C, H, W); top, left (B,) int64 offsets into the padded image, in [0, H + 2·padding − size].
    """
    padded = F.pad(images, (padding, padding, padding, padding))
    steps = torch.arange(size, device=images.device)
    rows = (top[:, None] + steps)[:, None, :, None]  # (B, 1, size, 1)
    cols = (left[:, None] + steps)[:, None, None, :]  # (B, 1, 1, size)
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def flip_where(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images whose `flip` (B,) bool entry is True."""
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def _strong_policy(name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if name == "randaugment":
        return v2.RandAugment(num_ops=RANDAUGMENT_NUM_OPS, magnitude=RANDAUGMENT_MAGNITUDE)
    if name == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    if name == "none":
        return None
    raise UserError(f"strong_policy must be one of {', '.join(STRONG_POLICIES)}, got {name!r}")


class BatchAugment:
    """The weak / strong / evaluation views of uint8 image batches (B, 3, H, W) on any device."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int,
        padding: int = 4,
        strong_policy: str = "randaugment",
        flip: bool = True,
        chunk_size: int = 16,
    ):
        if chunk_size < 1:
            raise UserError(f"augmentation chunk_size must be at least 1, got {chunk_size}")
        if padding < 0:
            raise UserError(f"crop padding must be >= 0, got {padding}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.image_size = image_size
        self.padding = padding
        self.flip = flip
        self.chunk_size = chunk_size
        self.strong_policy = strong_policy
        self._policy = _strong_policy(strong_policy)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _check(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected a uint8 batch (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if min(images.shape[-2:]) + 2 * self.padding < self.image_size:
            raise ValueError(
                f"images of {tuple(images.shape[-2:])} padded by {self.padding} are smaller than "
                f"the {self.image_size}-pixel crop"
            )

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:
            self._stats[device] = (
                torch.tensor(self.mean, device=device).view(1, -1, 1, 1),
                torch.tensor(self.std, device=device).view(1, -1, 1, 1),
            )
        return self._stats[device]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation view: x = (pixel/255 − mean) / std, float32 — what v2.ToDtype(scale=True) + v2.Normalize do."""
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}")
        mean, std = self._mean_std(images.device)
        return (images.float().div_(255.0) - mean).div_(std)

    def weak_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Random crop (zero padding) + random horizontal flip, drawn per image; stays uint8."""
        self._check(images)
        batch, device = images.shape[0], images.device
        height, width = images.shape[-2:]
        top = torch.randint(0, height + 2 * self.padding - self.image_size + 1, (batch,), device=device)
        left = torch.randint(0, width + 2 * self.padding - self.image_size + 1, (batch,), device=device)
        out = crop_with_offsets(images, top, left, self.image_size, self.padding)
        if self.flip:
            out = flip_where(out, torch.rand(batch, device=device) < 0.5)
        return out

    def weak(self, images: torch.Tensor) -> torch.Tensor:
        """Weak view, normalised float32 (B, 3, image_size, image_size)."""
        return self.normalize(self.weak_uint8(images))

    def strong(self, images: torch.Tensor) -> torch.Tensor:
        """Strong view: the weak view, then the strong policy with one draw per chunk of `chunk_size` images."""
        out = self.weak_uint8(images)
        if self._policy is not None and len(out):
            out = torch.cat([self._policy(chunk) for chunk in out.split(self.chunk_size)])
        return self.normalize(out)
