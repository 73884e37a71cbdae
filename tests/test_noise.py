"""Label noise: spec parsing, realised rates per mode, exact asymmetric maps, reproducibility, files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes import CIFAR100_COARSE_OF_FINE

from hrp_ood.data.noise import (
    NoiseSpec,
    load_label_file,
    load_noise,
    make_noisy_labels,
    parse_noise,
    realised_noise_rate,
    save_noise,
)
from hrp_ood.errors import UserError

N = 20_000


def balanced_labels(num_classes: int, n: int = N) -> np.ndarray:
    return np.random.default_rng(123).permutation(np.arange(n) % num_classes)


@pytest.mark.parametrize(
    "text, mode, rate, canonical",
    [
        ("sym80", "sym", 0.8, "sym80"),
        ("symflip40", "symflip", 0.4, "symflip40"),
        ("asym40", "asym", 0.4, "asym40"),
        ("sym12.5", "sym", 0.125, "sym12.5"),
        ("none", "none", 0.0, "none"),
        (" SYM0 ", "sym", 0.0, "sym0"),
        ("sym100", "sym", 1.0, "sym100"),
        ("file", "file", 0.0, "file"),
    ],
)
def test_parse_noise_and_canonical_string(text, mode, rate, canonical):
    spec = parse_noise(text)
    assert (spec.mode, spec.rate) == (mode, pytest.approx(rate))
    assert str(spec) == canonical and parse_noise(str(spec)) == spec


@pytest.mark.parametrize("text", ["sym120", "sym-5", "foo40", "", "sym", "none5", "40", "sym4o", "sym 40"])
def test_parse_noise_rejects_bad_specs_listing_the_valid_forms(text):
    with pytest.raises(UserError, match=r"valid forms: none, symR, symflipR, asymR"):
        parse_noise(text)


def test_noise_spec_validates_directly():
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        NoiseSpec("sym", 1.5)
    with pytest.raises(UserError, match="unknown noise mode"):
        NoiseSpec("pair", 0.2)


def make(labels, num_classes, text, seed=0, dataset="cifar10", coarse=None):
    return make_noisy_labels(labels, num_classes, parse_noise(text), seed, dataset=dataset, coarse_labels=coarse)


def test_sym_draws_from_all_classes_dividemix_convention():
    clean = balanced_labels(10)
    noisy = make(clean, 10, "sym80", seed=1)
    assert noisy.dtype == np.int64
    assert realised_noise_rate(noisy, clean) == pytest.approx(0.8 * 9 / 10, abs=0.015)
    # the replacement is uniform over all classes: each wrong class ≈ 0.8/10 of a class's samples
    confusion = np.zeros((10, 10))
    np.add.at(confusion, (clean, noisy), 1)
    off_diagonal = confusion[~np.eye(10, dtype=bool)] / (N / 10)
    assert np.abs(off_diagonal - 0.08).max() < 0.025


def test_symflip_draws_only_other_classes():
    clean = balanced_labels(10)
    noisy = make(clean, 10, "symflip80", seed=1)
    assert realised_noise_rate(noisy, clean) == pytest.approx(0.8, abs=0.015)
    changed = noisy != clean
    counts = np.bincount((noisy[changed] - clean[changed]) % 10, minlength=10)
    assert counts[0] == 0 and np.abs(counts[1:] / changed.sum() - 1 / 9).max() < 0.015


def test_rate_zero_and_none_keep_the_labels():
    clean = balanced_labels(10, 500)
    for text in ("none", "sym0", "symflip0", "asym0"):
        np.testing.assert_array_equal(make(clean, 10, text), clean)


def test_asym_cifar10_flips_exactly_along_the_map():
    clean = balanced_labels(10)
    noisy = make(clean, 10, "asym40", seed=4)
    expected_target = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}  # truck→automobile, bird→airplane, deer→horse, cat↔dog
    changed = noisy != clean
    for source in range(10):
        in_class = clean == source
        if source in expected_target:
            assert set(noisy[in_class & changed]) == {expected_target[source]}
            assert changed[in_class].mean() == pytest.approx(0.4, abs=0.035)
        else:
            assert not changed[in_class].any()


def test_asym_cifar100_moves_to_the_next_fine_class_of_the_same_superclass():
    clean = balanced_labels(100)
    coarse = CIFAR100_COARSE_OF_FINE[clean]
    noisy = make(clean, 100, "asym40", seed=2, dataset="cifar100", coarse=coarse)
    changed = noisy != clean
    assert realised_noise_rate(noisy, clean) == pytest.approx(0.4, abs=0.015)
    np.testing.assert_array_equal(CIFAR100_COARSE_OF_FINE[noisy], coarse)  # never leaves the superclass
    # superclass 4 (fruit and vegetables) holds fine ids 0, 51, 53, 57, 83: the cycle 0→51→53→57→83→0
    cycle = {0: 51, 51: 53, 53: 57, 57: 83, 83: 0}
    for source, target in cycle.items():
        assert set(noisy[(clean == source) & changed]) == {target}


def test_asym_errors():
    clean = balanced_labels(10, 200)
    with pytest.raises(UserError, match="cifar10 and cifar100 only, not 'digits'"):
        make(clean, 10, "asym40", dataset="digits")
    with pytest.raises(UserError, match="superclass"):
        make(balanced_labels(100, 300), 100, "asym40", dataset="cifar100")
    with pytest.raises(UserError, match="reads the labels from a file"):
        make(clean, 10, "file")


def test_same_seed_same_labels_other_seed_other_labels():
    clean = balanced_labels(10, 2000)
    for text in ("sym50", "symflip50", "asym50"):
        first, again, other = (make(clean, 10, text, seed=seed) for seed in (7, 7, 8))
        np.testing.assert_array_equal(first, again)
        assert (first != other).mean() > 0.1


def test_realised_noise_rate_known_answer():
    assert realised_noise_rate(np.array([0, 1, 2, 3]), np.array([0, 1, 0, 0])) == 0.5
    assert realised_noise_rate(np.array([], dtype=int), np.array([], dtype=int)) == 0.0


def test_save_load_noise_round_trip(tmp_path):
    clean = balanced_labels(10, 300)
    noisy = make(clean, 10, "sym50", seed=3)
    save_noise(tmp_path / "noise.npz", noisy, clean, spec="sym50", seed=3)
    assert not list(tmp_path.glob("*.tmp"))
    loaded_noisy, loaded_clean, info = load_noise(tmp_path / "noise.npz")
    np.testing.assert_array_equal(loaded_noisy, noisy)
    np.testing.assert_array_equal(loaded_clean, clean)
    assert info == {"spec": "sym50", "seed": 3, "noise_rate": realised_noise_rate(noisy, clean)}


def test_corrupt_or_incomplete_noise_file_is_a_user_error(tmp_path):
    (tmp_path / "noise.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="delete it to regenerate"):
        load_noise(tmp_path / "noise.npz")
    np.savez(tmp_path / "partial.npz", noisy_labels=np.zeros(3, dtype=np.int64))
    with pytest.raises(UserError, match="unreadable or incomplete"):
        load_noise(tmp_path / "partial.npz")


def cifar_n_dict(n: int) -> dict:
    """What CIFAR-10N's CIFAR-10_human.pt holds: a dict of numpy int arrays."""
    rng = np.random.default_rng(0)
    keys = ("clean_label", "worse_label", "aggre_label", "random_label1", "random_label2", "random_label3")
    return {key: rng.integers(0, 10, n) for key in keys}


def test_load_label_file_npy_and_cifar_n_pt(tmp_path):
    labels = np.arange(40) % 10
    np.save(tmp_path / "labels.npy", labels.astype(np.int32))
    loaded = load_label_file(tmp_path / "labels.npy", 10, 40)
    assert loaded.dtype == np.int64
    np.testing.assert_array_equal(loaded, labels)

    content = cifar_n_dict(40)
    torch.save(content, tmp_path / "CIFAR-10_human.pt")
    np.testing.assert_array_equal(
        load_label_file(tmp_path / "CIFAR-10_human.pt", 10, 40, key="worse_label"), content["worse_label"]
    )
    torch.save(
        {"noisy_label": torch.arange(40) % 100, "clean_label": torch.zeros(40, dtype=torch.long)},
        tmp_path / "CIFAR-100_human.pt",
    )
    np.testing.assert_array_equal(load_label_file(tmp_path / "CIFAR-100_human.pt", 100, 40), np.arange(40))


def test_label_file_errors(tmp_path):
    torch.save(cifar_n_dict(40), tmp_path / "c10n.pt")
    with pytest.raises(UserError, match=r"choose one of: clean_label, worse_label, aggre_label"):
        load_label_file(tmp_path / "c10n.pt", 10, 40)
    with pytest.raises(UserError, match=r"no key 'worst'"):
        load_label_file(tmp_path / "c10n.pt", 10, 40, key="worst")
    with pytest.raises(UserError, match=r"has 40 labels, the training set has 50"):
        load_label_file(tmp_path / "c10n.pt", 10, 50, key="aggre_label")
    np.save(tmp_path / "range.npy", np.array([0, 1, 10]))
    with pytest.raises(UserError, match=r"outside the 10 classes"):
        load_label_file(tmp_path / "range.npy", 10, 3)
    np.save(tmp_path / "float.npy", np.array([0.0, 1.0, 2.0]))
    with pytest.raises(UserError, match=r"must be integers, got dtype float64"):
        load_label_file(tmp_path / "float.npy", 10, 3)
    with pytest.raises(UserError, match=r"does not exist"):
        load_label_file(tmp_path / "missing.npy", 10, 3)
    torch.save({"noisy_label": np.array([1, 2]), "hook": NoiseSpec("sym", 0.1)}, tmp_path / "unsafe.pt")
    with pytest.raises(UserError, match=r"refusing to load .*unsafe\.pt: unpickling it would call .*NoiseSpec") as info:
        load_label_file(tmp_path / "unsafe.pt", 10, 2)
    assert "weights_only" not in str(info.value), "torch's advice to load unsafely is never repeated"
