import math
import re
import typing
from pathlib import Path

import pytest

from hrp_ood.config import (
    METHODS,
    VALUE_RANGES,
    TrainConfig,
    build_config,
    parse_set_option,
    read_yaml,
    save_config,
)
from hrp_ood.errors import UserError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_defaults_are_the_papers_cifar10_setup():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_milestones) == (0.05, 0.9, 5e-4, [250, 400])
    assert (cfg.kappa, cfg.t_min, cfg.t_max, cfg.cdcl_temperature, cfg.tau_conf) == (4.0, 0.1, 3.0, 0.1, 0.95)
    assert cfg.meta_size == 1000 and cfg.epochs == 450


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = build_config(path)
    assert cfg.method in METHODS


def test_every_method_has_a_config():
    methods = {build_config(p).method for p in CONFIGS}
    assert set(METHODS) - {"hrp_no_meta"} <= methods


def test_precedence_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.1\nepochs: 7\n")
    cfg = build_config(path, {"epochs": 3, "seed": None}, base={"lr": 0.2, "seed": 5})
    assert (cfg.lr, cfg.epochs, cfg.seed) == (0.1, 3, 5)


def test_unknown_key_names_it_and_suggests_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rat: 0.1\nepoch: 3\n")
    with pytest.raises(UserError, match=r"unknown config key 'learning_rat'.*c\.yaml"):
        build_config(path)
    with pytest.raises(UserError, match="did you mean 'epochs'"):
        build_config(overrides={"epoch": 3})


@pytest.mark.parametrize(
    "values, words",
    [
        ({"lr": "fast"}, "'lr' must be float"),
        ({"epochs": 2.5}, "'epochs' must be int"),
        ({"download": 1}, "'download' must be bool"),
        ({"lr_milestones": [10, "x"]}, "list of int"),
        ({"method": "hrp2"}, "unknown method 'hrp2'"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"t_min": 4.0}, "t_min"),
        (
            {"ce_loss": "weighted"},
            "ce_loss must be one of refined, meta_weighted, meta_weighted_peer, meta_weighted_s, got 'weighted'",
        ),
        ({"normalization": "joint"}, "normalization must be one of separate, coupled, got 'joint'"),
        ({"meta_bn": "train"}, "meta_bn must be one of eval, batch, eval_weak_stats, got 'train'"),
        ({"crop_padding": -1}, "crop_padding must be an integer in"),
        ({"flip": "no"}, "'flip' must be bool"),
    ],
)
def test_wrong_values_are_one_line_errors(values, words):
    with pytest.raises(UserError, match=words) as info:
        build_config(overrides=values)
    assert "\n" not in str(info.value)


def test_hrp_is_the_papers_form_and_hrp_meta_weighted_fixes_its_two_departures():
    spec = build_config().spec
    assert (spec.ce_loss, spec.normalization, build_config().meta_bn) == ("refined", "separate", "eval")
    variant = build_config(
        overrides={"method": "hrp_meta_weighted", "ce_loss": "refined", "normalization": "separate"}
    ).spec
    assert (variant.ce_loss, variant.normalization) == ("meta_weighted", "coupled")
    assert build_config(overrides={"method": "coupled_meta"}).spec.ce_loss == "refined"


def test_a_shorter_run_scales_the_configs_milestones_and_says_so(caplog):
    paper = Path(__file__).resolve().parents[1] / "configs" / "cifar10_hrp.yaml"
    with caplog.at_level("WARNING"):
        assert build_config(paper, {"epochs": 45}).lr_milestones == [25, 40]
    assert "lr_milestones [250, 400] (for 450 epochs) scaled to [25, 40]" in caplog.text
    assert build_config(paper, {"epochs": 420}).lr_milestones == [250, 400]  # within the run: kept
    explicit = build_config(paper, {"epochs": 20, "lr_milestones": [30]})  # given with the epochs: not scaled
    with pytest.raises(UserError, match=r"lr_milestones \[30\] lie outside \[0, 20\]"):
        explicit.check_schedule()


def test_set_null_sets_an_optional_key_to_null_and_is_refused_for_the_others(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("forget_rate: 0.3\n")
    assert build_config(path).forget_rate == 0.3
    assert build_config(path, dict([parse_set_option("forget_rate=null")])).forget_rate is None
    assert build_config(path, {"forget_rate": None}).forget_rate == 0.3  # a flag not given
    with pytest.raises(UserError, match=r"config key 'lr' must be float, got None"):
        build_config(path, dict([parse_set_option("lr=null")]))


def test_int_is_accepted_for_float_and_null_for_optional():
    cfg = build_config(overrides={"lr": 1, "forget_rate": None, "image_size": 64})
    assert isinstance(cfg.lr, float) and cfg.forget_rate is None and cfg.image_size == 64


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [0.1\nepochs: 3\n")
    with pytest.raises(UserError, match="not valid YAML"):
        read_yaml(bad)
    with pytest.raises(UserError, match="not found"):
        build_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- lr\n- 0.1\n")
    with pytest.raises(UserError, match="flat mapping"):
        read_yaml(listy)


def test_set_option_parses_yaml_values():
    assert parse_set_option("kappa=2") == ("kappa", 2)
    assert parse_set_option("lr_milestones=[1, 2]") == ("lr_milestones", [1, 2])
    assert parse_set_option("name=a=b") == ("name", "a=b")
    with pytest.raises(UserError, match="key=value"):
        parse_set_option("kappa")


def test_saved_config_reloads_identically(tmp_path):
    cfg = build_config(overrides={"noise": "asym40", "lr_milestones": [3, 4], "forget_rate": 0.3})
    save_config(cfg, tmp_path / "config.yaml")
    assert build_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("method", [name for name, spec in METHODS.items() if not spec.needs_meta_set])
def test_methods_without_a_meta_set_may_use_the_whole_training_split(method):
    assert build_config(overrides={"method": method, "meta_size": 0}).meta_size == 0


@pytest.mark.parametrize("method", ["hrp", "coupled_meta", "ce_meta"])
def test_meta_methods_need_a_meta_set(method):
    with pytest.raises(UserError, match=f"meta_size must be positive for {method}.*ce, gce, coteach") as info:
        build_config(overrides={"method": method, "meta_size": 0})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["ce", "hrp"])
def test_meta_sizes_are_never_negative(method):
    # a negative size is out of VALUE_RANGES (lower bound 0, for the methods without a meta step): the range error
    with pytest.raises(UserError, match=r"^meta_size must be an integer >= 0, got -1; fix it") as info:
        build_config(overrides={"method": method, "meta_size": -1})
    assert "\n" not in str(info.value)


def _outside(key: str) -> list:
    """Values just outside the range VALUE_RANGES gives `key` (plus nan and inf for float keys)."""
    low, high, bounds = VALUE_RANGES[key]
    hint = typing.get_type_hints(TrainConfig)[key]
    kind = float if float in (typing.get_args(hint) or (hint,)) else int
    step = kind(1e-9 if kind is float else 1)
    values = [kind(low - step if bounds[0] == "[" else low)]
    if math.isfinite(high):
        values.append(kind(high + step if bounds[1] == "]" else high))
    return values + ([math.nan, math.inf] if kind is float else [])


@pytest.mark.parametrize("key", sorted(VALUE_RANGES))
def test_every_numeric_key_is_range_checked_with_a_one_line_error(key):
    for value in _outside(key):
        with pytest.raises(
            UserError,
            match=rf"^{key} must be .*, got {re.escape(repr(value))}; fix it in the config "
            rf"or with --set {key}=\.\.\.$",
        ):
            build_config(overrides={key: value})


def test_lr_milestones_must_fall_within_the_run():
    with pytest.raises(UserError, match=r"lr_milestones \[3, 12\] lie outside \[0, 10\].*never decay at 12"):
        build_config(overrides={"epochs": 10, "lr_milestones": [3, 12]}).check_schedule()
    build_config(overrides={"epochs": 10, "lr_milestones": [0, 10]}).check_schedule()


@pytest.mark.parametrize("name", ["../x", "/abs/x", "a/b", ".", "..", ""])
def test_a_run_name_must_be_one_folder_name(name):
    with pytest.raises(UserError, match="must be one folder name"):
        build_config(overrides={"name": name})


def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("lr: 0.2\nepochs: 7\n".encode("utf-16"))
    assert (build_config(path).lr, build_config(path).epochs) == (0.2, 7)
