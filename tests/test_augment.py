"""Batched augmentation: per-sample crops and flips equal a per-image reference, normalisation equals
torchvision's, strong views differ from weak ones, everything follows the global torch seed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from hrp_ood.data.augment import BatchAugment, crop_with_offsets, flip_where
from hrp_ood.errors import UserError

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def random_images(n: int = 32, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_crop_with_offsets_equals_a_per_image_reference():
    images = random_images(16, size=12)
    generator = torch.Generator().manual_seed(1)
    top, left = torch.randint(0, 9, (16,), generator=generator), torch.randint(0, 9, (16,), generator=generator)
    crops = crop_with_offsets(images, top, left, size=12, padding=4)
    for i in range(16):
        padded = F.pad(images[i], (4, 4, 4, 4))
        assert torch.equal(crops[i], padded[:, top[i] : top[i] + 12, left[i] : left[i] + 12])
    corner = crop_with_offsets(images[:1], torch.tensor([0]), torch.tensor([0]), size=12, padding=4)
    assert (corner[0, :, :4] == 0).all() and torch.equal(corner[0, :, 4:, 4:], images[0, :, :8, :8])


def test_flip_where_mirrors_only_the_chosen_images():
    images = random_images(4)
    flip = torch.tensor([True, False, True, False])
    out = flip_where(images, flip)
    for i in range(4):
        assert torch.equal(out[i], images[i].flip(-1) if flip[i] else images[i])


def test_normalize_matches_torchvision():
    images = random_images(8)
    reference = v2.Normalize(MEAN, STD)(v2.ToDtype(torch.float32, scale=True)(images))
    out = BatchAugment(MEAN, STD, 32).normalize(images)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


def test_weak_shapes_and_per_sample_randomness():
    augment = BatchAugment(MEAN, STD, 32)
    same_image = random_images(1).expand(64, -1, -1, -1).contiguous()
    torch.manual_seed(0)
    out = augment.weak(same_image)
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32
    distinct = torch.unique(out.flatten(1), dim=0)
    assert len(distinct) > 40  # 81 offsets × 2 flips: nearly every copy gets its own crop


def test_weak_without_padding_or_flip_is_the_identity():
    images = random_images(5)
    augment = BatchAugment(MEAN, STD, 32, padding=0, flip=False)
    torch.testing.assert_close(augment.weak(images), augment.normalize(images))


def test_weak_crops_smaller_images_to_image_size():
    out = BatchAugment(MEAN, STD, 24, padding=2).weak_uint8(random_images(6, size=28))
    assert out.shape == (6, 3, 24, 24) and out.dtype == torch.uint8


# RandAugment changes nearly every chunk (only identity+identity leaves one alone); AutoAugment's
# CIFAR-10 sub-policies apply each op with its own probability, so about 60% of chunks change.
@pytest.mark.parametrize("policy, min_changed", [("randaugment", 14), ("autoaugment", 6)])
def test_strong_differs_from_weak_and_follows_the_seed(policy, min_changed):
    images = random_images(64)
    augment = BatchAugment(MEAN, STD, 32, strong_policy=policy, chunk_size=4)
    torch.manual_seed(3)
    weak = augment.weak(images)
    torch.manual_seed(3)  # same crops and flips, then the policy on top
    strong = augment.strong(images)
    assert strong.shape == weak.shape and strong.dtype == torch.float32
    changed_chunks = [not torch.equal(s, w) for s, w in zip(strong.split(4), weak.split(4))]
    assert sum(changed_chunks) >= min_changed
    torch.manual_seed(3)
    assert torch.equal(augment.strong(images), strong)
    torch.manual_seed(4)
    assert not torch.equal(augment.strong(images), strong)


def test_one_policy_draw_per_chunk():
    same_image = random_images(1).expand(48, -1, -1, -1).contiguous()
    augment = BatchAugment(MEAN, STD, 32, padding=0, flip=False, chunk_size=6)
    torch.manual_seed(0)
    chunks = augment.strong(same_image).split(6)
    for chunk in chunks:  # identical inputs, one draw: identical outputs inside a chunk
        assert torch.equal(chunk, chunk[:1].expand_as(chunk))
    assert len({chunk[0].sum().item() for chunk in chunks}) > 2  # different draws across chunks


def test_policy_none_makes_strong_equal_weak():
    images = random_images(10)
    augment = BatchAugment(MEAN, STD, 32, strong_policy="none")
    torch.manual_seed(9)
    weak = augment.weak(images)
    torch.manual_seed(9)
    assert torch.equal(augment.strong(images), weak)


def test_bad_arguments():
    with pytest.raises(UserError, match="strong_policy must be one of randaugment, autoaugment, none"):
        BatchAugment(MEAN, STD, 32, strong_policy="trivial")
    with pytest.raises(UserError, match="chunk_size"):
        BatchAugment(MEAN, STD, 32, chunk_size=0)
    with pytest.raises(ValueError, match="uint8"):
        BatchAugment(MEAN, STD, 32).weak(random_images(2).float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_output_stays_on_the_input_device():
    images = random_images(16).cuda()
    augment = BatchAugment(MEAN, STD, 32)
    for view in (augment.normalize, augment.weak, augment.strong):
        assert view(images).device == images.device
