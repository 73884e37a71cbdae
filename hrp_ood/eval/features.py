"""One forward pass per dataset, cached on disk: every postprocessor then works from (logits, features).

The pass normalises each uint8 batch on the device, x = (u / 255 − mean) / std, and keeps the
network's `(logits, penultimate feature)` as float32 numpy (OpenOOD's `return_feature=True` contract).
"""

from __future__ import annotations

import hashlib
import logging
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hrp_ood.data.sources import ImageSource, pixels
from hrp_ood.errors import UserError
from hrp_ood.io import atomic_write
from hrp_ood.postprocessors.featureset import FeatureSet

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_SAFE_KEY = re.compile(r"[^A-Za-z0-9._=+-]")


def normalise_batch(images_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """x = (u / 255 − mean) / std for a uint8 batch (N, 3, H, W); mean/std are (1, 3, 1, 1) on its device."""
    return (images_uint8.float().div_(255) - mean) / std


def channel_stats(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as (1, 3, 1, 1) float32 tensors on `device`."""

    def as_tensor(values: Sequence[float]) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    return as_tensor(mean), as_tensor(std)


def batches(n: int, batch_size: int, *, progress: bool = False, desc: str = "") -> range | tqdm:
    """Start indices of consecutive batches over n items, optionally with a progress bar."""
    starts = range(0, n, batch_size)
    return tqdm(starts, desc=desc, unit="batch", leave=False) if progress else starts


def extract_features(
    net: nn.Module,
    images_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: bool = False,
) -> FeatureSet:
    """Logits (N, C) and penultimate features (N, D) of `net` on every image: eval mode, no_grad, batched.

    `amp` runs the forward under autocast (bfloat16 on CPU, float16 on CUDA); outputs are float32 either way.
    The network's train/eval mode is restored afterwards. `labels` of the result are None.
    """
    if len(images_uint8) == 0:
        raise UserError("no images to extract features from; check the dataset path")
    device = torch.device(device)
    mean_t, std_t = channel_stats(mean, std, device)
    was_training = net.training
    net.eval()
    logits, features = [], []
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            for start in batches(len(images_uint8), batch_size, progress=progress, desc="features"):
                x = normalise_batch(
                    images_uint8[start : start + batch_size].to(device, non_blocking=True), mean_t, std_t
                )
                batch_logits, batch_features = net(x, return_feature=True)
                logits.append(batch_logits.float().cpu())
                features.append(batch_features.float().flatten(1).cpu())
    finally:
        net.train(was_training)
    return FeatureSet(logits=torch.cat(logits).numpy(), features=torch.cat(features).numpy())


def cached_features(
    net: nn.Module,
    images_uint8: torch.Tensor | ImageSource,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    cache_dir: str | Path,
    key: str,
    labels: np.ndarray | None = None,
    **kw,
) -> FeatureSet:
    """`extract_features`, memoised in `<cache_dir>/<key>.npz`.

    `key` must identify everything the features depend on (checkpoint hash, net choice, dataset, transform);
    the file also records a fingerprint of every image, and a mismatch (or an unreadable file) recomputes. An
    `ImageSource` whose stamp the file recorded is not decoded at all (`hrp_ood.data.sources`); another stamp
    is checked against the decoded pixels and then recorded. The file is written atomically and read with
    `allow_pickle=False`. `kw` go to `extract_features`; `labels` are attached to the result, not cached.
    """
    path = _cache_path(cache_dir, key)
    stamp = images_uint8.stamp if isinstance(images_uint8, ImageSource) else ""
    cached = _read_cache(path)
    if cached is not None and stamp and cached.stamp == stamp:
        log.info("features from cache %s (files unchanged: nothing decoded)", path)
        features = cached.features
    else:
        features = _checked_features(net, pixels(images_uint8), mean, std, path, cached, stamp, **kw)
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(features):
            raise ValueError(f"{len(labels)} labels for {len(features)} images")
    return FeatureSet(logits=features.logits, features=features.features, labels=labels)


def _checked_features(
    net: nn.Module,
    images_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    path: Path,
    cached: _CacheFile | None,
    stamp: str,
    **kw,
) -> FeatureSet:
    """The cached features when they were made from these pixels, else a new pass; either way the file then
    records the pixels' fingerprint and `stamp`."""
    fingerprint = images_fingerprint(images_uint8)
    if cached is not None and cached.fingerprint == fingerprint:
        log.info("features from cache %s", path)
        features = cached.features
        if cached.stamp == stamp or not stamp:
            return features
    else:
        if cached is not None:
            log.warning("feature cache %s was made from other images; recomputing", path)
        features = extract_features(net, images_uint8, mean, std, **kw)
        log.info("cached features %s (%d samples)", path, len(features))
    _write_cache(path, features, fingerprint, stamp)
    return features


def decode_unless_cached(images: torch.Tensor | ImageSource, *, cache_dir: str | Path, key: str) -> None:
    """Decode a source now unless `cached_features(..., key=key)` will find it by its stamp: an unreadable
    image then fails before the first pass and before anything is written."""
    if isinstance(images, ImageSource) and _cached_stamp(_cache_path(cache_dir, key)) != images.stamp:
        images.images  # noqa: B018 (decodes)


def images_fingerprint(images_uint8: torch.Tensor) -> str:
    """sha256 of the shape and of every pixel: a change to any image of a set (a file replaced in an OOD folder,
    another decoder) gives another fingerprint. Hashing runs at ~1 GB/s, far below the forward pass it saves."""
    digest = hashlib.sha256(str(tuple(images_uint8.shape)).encode())
    digest.update(images_uint8.contiguous().cpu().numpy())
    return digest.hexdigest()


def _cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"{_safe_key(key)}.npz"


def _safe_key(key: str) -> str:
    """`key` as a file name: odd characters become '_'; a long key is shortened with its hash."""
    safe = _SAFE_KEY.sub("_", key)
    if len(safe) > 150 or safe in {"", ".", ".."}:
        safe = f"{safe[:100]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    return safe


@dataclass
class _CacheFile:
    features: FeatureSet
    fingerprint: str
    stamp: str  # "" when the images were given as a tensor


def _read_cache(path: Path) -> _CacheFile | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["format"]) != CACHE_FORMAT:
                return None
            stamp = str(data["stamp"]) if "stamp" in data.files else ""
            return _CacheFile(
                FeatureSet(logits=data["logits"], features=data["features"]), str(data["fingerprint"]), stamp
            )
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        log.warning("feature cache %s is unreadable (%s); recomputing", path, err)
        return None


def _cached_stamp(path: Path) -> str | None:
    """The stamp a cache file recorded, read without its features (None when there is no readable one)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["format"]) != CACHE_FORMAT or "stamp" not in data.files:
                return None
            return str(data["stamp"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def _write_cache(path: Path, features: FeatureSet, fingerprint: str, stamp: str) -> None:
    atomic_write(
        path,
        lambda f: np.savez(
            f,
            logits=features.logits,
            features=features.features,
            fingerprint=np.array(fingerprint),
            stamp=np.array(stamp),
            format=np.array(CACHE_FORMAT),
        ),
    )
