"""OOD sets that need no download, generated from what the declared dependencies ship: patches of
scikit-learn's sample photographs and uniform-noise images (the demo's and the CPU experiments' OOD sets; any
`evaluate` or experiment file can name them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

GENERATED_OOD_SETS = ("photo_patches", "uniform_noise")


def photo_patches(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random size×size crops of scikit-learn's two bundled sample photographs (uint8, N×3×size×size)."""
    from sklearn.datasets import load_sample_images

    photos = [torch.tensor(img).permute(2, 0, 1) for img in load_sample_images().images]
    # shrink first so a crop holds structure (edges, textures) rather than a flat region
    photos = [F.interpolate(p[None].float(), scale_factor=0.25, mode="area")[0] for p in photos]
    which = torch.randint(len(photos), (count,), generator=generator)
    crops = []
    for k, photo in enumerate(photos):
        n = int((which == k).sum())
        top = torch.randint(photo.shape[1] - size + 1, (n,), generator=generator)
        left = torch.randint(photo.shape[2] - size + 1, (n,), generator=generator)
        rows = top[:, None] + torch.arange(size)
        cols = left[:, None] + torch.arange(size)
        crops.append(photo[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3))
    return torch.cat(crops).round().clamp(0, 255).to(torch.uint8)


def uniform_noise(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, size, size), generator=generator, dtype=torch.uint8)


def generated_ood_sets(size: int = 32, count: int = 500, seed: int = 0) -> dict[str, torch.Tensor]:
    """Both generated sets at `size` (the same images for the same arguments)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "photo_patches": photo_patches(count, size, generator),
        "uniform_noise": uniform_noise(count, size, generator),
    }
