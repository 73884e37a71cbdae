"""The clean meta set: balanced, disjoint from the training part, reproducible, saved and reloaded."""

from __future__ import annotations

import re

import numpy as np
import pytest

from hrp_ood.data.meta_set import load_indices, save_indices, split_meta_set
from hrp_ood.errors import UserError


def labels_with_counts(counts: list[int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))


def assert_partition(meta: np.ndarray, train: np.ndarray, n: int) -> None:
    for part in (meta, train):
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)  # sorted, no repeats
    assert len(np.intersect1d(meta, train)) == 0
    np.testing.assert_array_equal(np.union1d(meta, train), np.arange(n))


def test_balanced_meta_set_like_cifar10():
    labels = labels_with_counts([500] * 10)
    meta, train = split_meta_set(labels, 10, size=1000, seed=0)
    assert_partition(meta, train, len(labels))
    np.testing.assert_array_equal(np.bincount(labels[meta], minlength=10), [100] * 10)
    # inside a class the pick is random, not the first indices of the class
    first_of_class = np.concatenate([np.flatnonzero(labels == c)[:100] for c in range(10)])
    assert len(np.intersect1d(meta, first_of_class)) < 400


def test_remainder_goes_one_each_to_random_classes():
    labels = labels_with_counts([60] * 10)
    meta, _ = split_meta_set(labels, 10, size=103, seed=5)
    counts = np.bincount(labels[meta], minlength=10)
    assert counts.sum() == 103 and sorted(counts.tolist()) == [10] * 7 + [11] * 3
    extra_classes = {
        tuple(np.flatnonzero(np.bincount(labels[split_meta_set(labels, 10, 103, seed)[0]]) == 11)) for seed in range(6)
    }
    assert len(extra_classes) > 1  # which classes get the extra sample depends on the seed


def test_reproducible_from_the_seed():
    labels = labels_with_counts([80, 90, 100])
    first, again, other = (split_meta_set(labels, 3, 30, seed) for seed in (1, 1, 2))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_class_with_too_few_samples_is_a_user_error():
    labels = labels_with_counts([50, 50, 4])
    with pytest.raises(UserError, match=r"class 2 has 4 training samples, fewer than the 10"):
        split_meta_set(labels, 3, size=30)


def test_unbalanced_is_a_uniform_subset():
    labels = labels_with_counts([900, 50, 50])
    meta, train = split_meta_set(labels, 3, size=200, seed=0, balanced=False)
    assert_partition(meta, train, len(labels))
    assert len(meta) == 200 and np.bincount(labels[meta])[0] > 150  # follows the class frequencies, ≈ 180


def test_size_limits():
    labels = labels_with_counts([5, 5])
    meta, train = split_meta_set(labels, 2, size=0)
    assert len(meta) == 0 and len(train) == 10
    with pytest.raises(UserError, match="meta_size must be between 0 and the 10"):
        split_meta_set(labels, 2, size=11)


def test_indices_round_trip_and_corrupt_file(tmp_path):
    meta, train = split_meta_set(labels_with_counts([30, 30]), 2, size=10)
    save_indices(tmp_path / "meta.npz", meta_indices=meta, train_indices=train)
    loaded = load_indices(tmp_path / "meta.npz")
    assert sorted(loaded) == ["meta_indices", "train_indices"]
    np.testing.assert_array_equal(loaded["meta_indices"], meta)
    np.testing.assert_array_equal(loaded["train_indices"], train)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(UserError, match="delete it to redraw"):
        load_indices(tmp_path / "bad.npz")


def test_a_hand_edited_split_that_trains_on_the_meta_set_is_refused(tmp_path):
    from hrp_ood.train.data import _saved_split

    from hrp_ood.data.meta_set import save_indices

    path = tmp_path / "meta_indices.npz"
    save_indices(path, meta_indices=np.array([0, 1]), train_indices=np.array([2, 3, 4]))
    assert [a.tolist() for a in _saved_split(path, 5)] == [[0, 1], [2, 3, 4]]
    for meta, train, words in [
        ([0, 1], [1, 2, 3], "1 meta sample(s) in the training split (e.g. 1)"),
        ([0, 9], [2, 3], "index 9 outside 0..4"),
        ([0], [2, 2], "a training index twice"),
    ]:
        save_indices(path, meta_indices=np.array(meta), train_indices=np.array(train))
        with pytest.raises(UserError, match=re.escape(words)):
            _saved_split(path, 5)


def test_an_openood_list_label_must_be_an_ascii_number(tmp_path):
    from hrp_ood.data.image_lists import _class_label

    assert _class_label("3", 10, tmp_path / "l.txt", 1) == 3
    with pytest.raises(UserError, match="l.txt"):
        _class_label("²", 10, tmp_path / "l.txt", 1)  # str.isdigit() accepts it, int() does not
