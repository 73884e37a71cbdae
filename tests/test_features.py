"""One batched forward pass per dataset, normalised on the device, cached atomically on disk."""

from __future__ import annotations

import errno
import logging

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from fakes import CountingNet
from torch import nn

from hrp_ood.errors import UserError
from hrp_ood.eval import features as features_module
from hrp_ood.eval.features import cached_features, extract_features

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _images(n: int, seed: int = 0, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _reference(net: CountingNet, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One unbatched eval-mode pass with torchvision's normalize (an independent normalisation)."""
    x = TF.normalize(images.float() / 255, list(MEAN), list(STD))
    net.eval()
    with torch.no_grad():
        logits, feature = nn.Module.__call__(net, x, return_feature=True)
    return logits.numpy(), feature.numpy()


def test_extract_features_matches_one_reference_pass_in_eval_mode():
    net, images = CountingNet(), _images(20)
    ref_logits, ref_features = _reference(net, images)
    net.train()
    net.calls = 0
    out = extract_features(net, images, MEAN, STD, batch_size=7)
    assert net.calls == 3  # ceil(20 / 7) batches
    assert out.logits.dtype == np.float32 and out.features.dtype == np.float32
    assert out.logits.shape == (20, 3) and out.features.shape == (20, 6) and out.labels is None
    np.testing.assert_allclose(out.logits, ref_logits, rtol=1e-5, atol=1e-5)  # dropout off: eval mode
    np.testing.assert_allclose(out.features, ref_features, rtol=1e-5, atol=1e-5)
    assert net.training  # the caller's mode is restored


def test_amp_on_cpu_gives_float32_close_to_full_precision():
    net, images = CountingNet(), _images(10)
    full = extract_features(net, images, MEAN, STD)
    mixed = extract_features(net, images, MEAN, STD, amp=True)
    assert mixed.logits.dtype == np.float32
    np.testing.assert_allclose(mixed.logits, full.logits, atol=0.1)


def test_second_call_reads_the_cache_without_a_forward_pass(tmp_path):
    net, images = CountingNet(), _images(12)
    labels = np.arange(12) % 3
    first = cached_features(
        net, images, MEAN, STD, cache_dir=tmp_path, key="abc-net1-cifar10-test", labels=labels, batch_size=5
    )
    calls = net.calls
    second = cached_features(net, images, MEAN, STD, cache_dir=tmp_path, key="abc-net1-cifar10-test", labels=labels)
    assert net.calls == calls == 3
    np.testing.assert_array_equal(first.logits, second.logits)
    np.testing.assert_array_equal(first.features, second.features)
    np.testing.assert_array_equal(second.labels, labels)
    assert second.labels.dtype == np.int64
    assert [p.name for p in tmp_path.iterdir()] == ["abc-net1-cifar10-test.npz"]  # no temporary file left
    with np.load(tmp_path / "abc-net1-cifar10-test.npz", allow_pickle=False) as data:
        np.testing.assert_array_equal(data["logits"], first.logits)


def test_other_images_under_the_same_key_are_recomputed(tmp_path):
    net = CountingNet()
    cached_features(net, _images(12, seed=0), MEAN, STD, cache_dir=tmp_path, key="k")
    calls = net.calls
    out = cached_features(net, _images(12, seed=1), MEAN, STD, cache_dir=tmp_path, key="k")
    assert net.calls > calls
    np.testing.assert_allclose(out.logits, _reference(net, _images(12, seed=1))[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changed", [1, 150], ids=["second-image", "last-image"])
def test_one_changed_image_of_a_large_set_is_recomputed(tmp_path, changed):
    """Every image counts: the cache once fingerprinted 64 evenly spaced images, so in a set of 151 a replaced
    second image kept the stale features."""
    net = CountingNet()
    images = _images(151)
    cached_features(net, images, MEAN, STD, cache_dir=tmp_path, key="k")
    images[changed] = 255 - images[changed]
    calls = net.calls
    out = cached_features(net, images, MEAN, STD, cache_dir=tmp_path, key="k")
    assert net.calls > calls, "a changed image must not be served from the cache"
    np.testing.assert_allclose(out.logits, _reference(net, images)[0], rtol=1e-5, atol=1e-5)


def test_unreadable_cache_is_recomputed_with_a_warning(tmp_path, caplog):
    net, images = CountingNet(), _images(4)
    (tmp_path / "k.npz").write_bytes(b"PK\x03\x04 torn")
    with caplog.at_level(logging.WARNING):
        out = cached_features(net, images, MEAN, STD, cache_dir=tmp_path, key="k")
    assert net.calls == 1 and "unreadable" in caplog.text
    np.testing.assert_allclose(out.logits, _reference(net, images)[0], rtol=1e-5, atol=1e-5)


def test_a_failed_write_leaves_no_cache_file(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(features_module.np, "savez", crash)
    with pytest.raises(UserError, match=r"cannot write .*k\.npz: No space left on device \(ENOSPC\)"):
        cached_features(CountingNet(), _images(4), MEAN, STD, cache_dir=tmp_path, key="k")
    assert list(tmp_path.iterdir()) == []


def test_keys_with_path_characters_stay_inside_the_cache_dir(tmp_path):
    cached_features(CountingNet(), _images(4), MEAN, STD, cache_dir=tmp_path / "cache", key="../../escape/me")
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and "/" not in files[0].name and files[0].name != "me.npz"
    assert not (tmp_path / "escape").exists()
