"""Typed training configuration: flat YAML in, validated dataclass out, unknown keys rejected.

Precedence (lowest first): dataclass defaults (the paper's CIFAR-10 set-up, SPEC §3.4.1) →
`--config FILE` → explicit CLI flags / `--set key=value`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hrp_ood.errors import UserError, cut, shown
from hrp_ood.io import atomic_write_text, read_text_file
from hrp_ood.registry import METHODS, MethodSpec

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    # data and noise (SPEC §2)
    dataset: str = "cifar10"
    data_root: str = "./data"
    download: bool = False
    image_size: int | None = None  # image-folder datasets only: resize to this size
    noise: str = "sym50"
    noisy_labels: str | None = None  # file of real noisy labels (.npy or CIFAR-N .pt)
    noisy_labels_key: str | None = None  # key inside a CIFAR-N .pt file, e.g. worse_label
    meta_size: int = 1000  # 0: train on the whole training split (only methods without a meta step)
    meta_balanced: bool = True
    strong_policy: str = "randaugment"  # randaugment | autoaugment | none
    crop_padding: int = 4  # weak view: random crop of the image size after zero padding by this much (0: no crop)
    flip: bool = True  # weak view: random horizontal flip (off for digits and text)
    # model and method
    model: str = "preact_resnet18"
    method: str = "hrp"
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    # optimisation (the paper's schedule)
    epochs: int = 450
    batch_size: int = 128
    meta_batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: list[int] = field(default_factory=lambda: [250, 400])
    lr_gamma: float = 0.1
    # multistep: ×lr_gamma at each of lr_milestones (the paper's); cosine: per epoch from lr to lr_min over the run
    # (L2B, ProMix, UNICON); constant (LongReMix's first stage)
    lr_schedule: str = "multistep"
    lr_min: float = 0.0
    warmup_epochs: int = 10
    ramp_epochs: int = 16
    # HRP hyper-parameters (SPEC §3.4.1)
    meta_method: str = "jvp"  # jvp | double_backward
    # per-sample EMA of the meta-gradients across visits (0 = one batch decides, SPEC Eqs. 4-5 as written);
    # method/reliability.py:ReliabilityMemory
    reliability_momentum: float = 0.0
    # the meta loss at the meta batch's fitted temperature and class biases (method/reliability.py: fit_calibration),
    # so α measures class-specific influence, not how a step moves the networks' confidence (not in SPEC)
    meta_calibration: bool = False
    independent_views: bool = False  # each network draws its own weak/strong augmentation of the batch
    # L_CE (Eq. 13) gives every target class of S the same total weight (method/targets.py:reweighted_ce)
    balanced_s: bool = False
    # L_CE of Eq. 15 (method/targets.py, docs/method.md): "refined" = Eq. 13, the peer's refined targets on S
    # reweighted by the peer's T (SPEC); "meta_weighted" = Eq. 1 with the network's own meta-learned α, β over the
    # whole batch; "meta_weighted_peer" = the same with the peer's α, β, ŷ; "meta_weighted_s" = meta_weighted on S
    ce_loss: str = "refined"
    # Eq. 5: "separate" = α and β each normalised to batch mean 1 (SPEC); "coupled" = one normaliser for both
    normalization: str = "separate"
    # BatchNorm in the meta forward of Eq. 3 (docs/method.md): "eval" = running statistics (the paper); "batch" =
    # the meta batch's own statistics, running buffers saved and restored (L2RW, Meta-Weight-Net, L2B);
    # "eval_weak_stats" = running statistics fed by the weak views only (strong and mixed forwards leave them alone)
    meta_bn: str = "eval"
    kappa: float = 4.0
    t_min: float = 0.1
    t_max: float = 3.0
    delta: float = 1e-8
    cdcl_temperature: float = 0.1
    # SPEC's 0.95 (FixMatch): rows less confident are CDCL negatives only
    tau_conf: float = 0.95
    tau_match: float = 0.5
    sharpen_temperature: float = 0.5
    gamma: float = 0.5
    lambda_cons: float = 1.0
    lambda_c: float = 0.1
    # not in SPEC: DivideMix's uniform-prior penalty (method/targets.py), on by default because the refined targets
    # collapse onto one class without it (docs/method.md)
    lambda_prior: float = 1.0
    # an intervention, not the method (docs/results.md): in each listed term of Eq. 15 — "ce" (Eq. 13's T), "ram"
    # (RAM's Beta law and gate), "cdcl" (the β̂ gate) — every sample's reliability becomes its batch mean from
    # epoch reliability_mean_from on
    reliability_mean_in: list[str] = field(default_factory=list)
    reliability_mean_from: float = 0.0
    # baselines
    gce_q: float = 0.7
    forget_rate: float | None = None  # co-teaching; None = the noise file's realised rate
    coteach_ramp_epochs: int = 10
    # the comparison methods (hrp_ood/trainers/<method>.py). A None value is the reference code's for the dataset and
    # noise level (each module's `reference_values`), resolved when the config is built: config.yaml records it.
    # -- DivideMix, UNICON and LongReMix (hrp_ood/trainers/dividemix.py) --
    lambda_u: float | None = None  # weight of the unlabeled MSE loss Lu (ramped over ramp_epochs after warm-up)
    p_threshold: float | None = None  # GMM clean probability above which a sample is labeled
    mixup_alpha: float = 4.0  # MixMatch's Beta(α, α)
    gmm_loss_epochs: int | None = None  # the GMM fits the mean normalised loss of this many epochs (5 at 90% noise)
    longremix_stage1_epochs: int = 300  # LongReMix: stage 1 (constant lr, finds the HCS), then fresh networks
    hcs_epochs: int = 5  # LongReMix: the HCS = samples the GMM labeled in each of this many last epochs
    hcs_search_epochs: int = 150  # LongReMix: stage 2 takes net 1's largest HCS of this many last stage-1 epochs
    # -- L2B (hrp_ood/trainers/l2b.py) --
    grad_clip: float | None = None  # gradient-norm clip before each step (0: none); CIFAR-10 0.25, CIFAR-100 0.80
    # -- UNICON (hrp_ood/trainers/unicon.py) --
    unicon_d_u: float = 0.7  # mean JSD above which the selection threshold is lowered from the mean ...
    unicon_tau: float = 5.0  # ... by (mean − min) / tau
    # JSD in bits (÷ ln 2, bounded by 1) instead of the reference's nats (bounded by ln 2 < d_u: never lowered)
    unicon_jsd_bits: bool = False
    lambda_supcon: float = 0.025  # weight of SimCLR's loss on the unlabeled rows' strong views
    supcon_temperature: float = 0.05
    # -- ProMix (hrp_ood/trainers/promix.py) --
    # class-wise small-loss selection: per noisy class the ⌈ρ·N/K⌉ smallest losses, ρ linear from start to end over
    # promix_ramp_epochs (the reference's scripts: start = end, 0.7 at 20% noise, else 0.5)
    promix_rho_start: float | None = None
    promix_rho_end: float | None = None
    promix_tau: float | None = None  # matched high confidence: p(given label) > τ joins the selection (0.99 / 0.95)
    promix_debias_output: float | None = None  # logit adjustment of the losses: z + τ·log π (0.8 / 0.5)
    promix_debias_pl: float | None = None  # debiased pseudo-labels: softmax(z − τ·log π) (0.8 / 0.5)
    promix_ramp_epochs: int = 50  # ρ and the weight w ramp over this many epochs, the unchosen weight over twice it
    promix_expand_epochs: int = 250  # label guessing by agreement in the last this many epochs
    promix_expand_fill: float = 0.9  # ... adds agreeing confident rows until this share of the batch is chosen
    promix_prior_momentum: float = 0.9999  # EMA of the class prior π (the mean unadjusted softmax)
    promix_unchosen_weight: float = 0.1  # the pseudo head's loss on the unchosen rows (× the ramp; 0 after it)
    # run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bfloat16 autocast on CUDA; ignored on CPU
    deterministic: bool = False
    compile: bool = False  # torch.compile the training passes (opt-in; helps on GPU, costs start-up time)
    channels_last: bool = False  # channels-last memory format for the backbones (opt-in; helps on tensor cores)
    sync_bn: bool = (
        False  # data-parallel runs: BN statistics over the global batch (hrp_ood.distributed.GlobalBatchNorm)
    )
    on_nonfinite: str = "stop"  # stop | skip (skip the step and count it in metrics.csv)
    out_dir: str = "runs"
    name: str | None = None
    eval_batch_size: int = 512
    signals_every: int = 10  # write signals/epoch_NNNN.npz (per-sample α, β, T, loss) every N epochs, and the last
    # TensorBoard events of every epoch (metrics.csv's columns, histograms of α, β, T, loss; train/tensorboard.py)
    # when the tensorboard package is installed; in tensorboard_dir, or <run>/tb when it is null
    tensorboard: bool = True
    tensorboard_dir: str | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        if self.method in METHODS:
            self._resolve_reference_values()
        self.validate()

    def _resolve_reference_values(self) -> None:
        """The method's reference hyper-parameters for the keys left unset (None): by dataset and noise level."""
        reference_values = getattr(self.spec.implementation(), "reference_values", None)
        for key, value in (reference_values(self) if reference_values else {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method {cut(self.method)}; choose one of: {', '.join(METHODS)}")
        from hrp_ood.data.augment import STRONG_POLICIES
        from hrp_ood.method.reliability import META_BN_MODES, NORMALIZATIONS
        from hrp_ood.method.reliability import METHODS as META_METHODS

        if self.meta_method not in META_METHODS:
            raise UserError(f"meta_method must be {' or '.join(map(repr, META_METHODS))}, got {cut(self.meta_method)}")
        if self.strong_policy not in STRONG_POLICIES:
            raise UserError(
                f"strong_policy must be {', '.join(STRONG_POLICIES[:-1])} or {STRONG_POLICIES[-1]}, "
                f"got {cut(self.strong_policy)}"
            )
        if self.ce_loss not in CE_LOSSES:
            raise UserError(f"ce_loss must be one of {', '.join(CE_LOSSES)}, got {cut(self.ce_loss)}")
        if self.normalization not in NORMALIZATIONS:
            raise UserError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {cut(self.normalization)}")
        if self.meta_bn not in META_BN_MODES:
            raise UserError(f"meta_bn must be one of {', '.join(META_BN_MODES)}, got {cut(self.meta_bn)}")
        unknown_terms = [term for term in self.reliability_mean_in if term not in RELIABILITY_TERMS]
        if unknown_terms:
            raise UserError(
                f"reliability_mean_in takes {', '.join(RELIABILITY_TERMS)}, got {cut(unknown_terms)}; "
                "e.g. --set reliability_mean_in=[ram]"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {cut(self.lr_schedule)}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise UserError(f"on_nonfinite must be 'stop' or 'skip', got {cut(self.on_nonfinite)}")
        for key, bounds in VALUE_RANGES.items():
            _check_range(key, getattr(self, key), *bounds)
        self._validate_meta_size()
        check_device_name(self.device)
        if self.name is not None:
            from hrp_ood.run_dir import check_run_name

            check_run_name(self.name)
        if self.noisy_labels_key is not None and not self.noisy_labels:
            raise UserError(
                f"noisy_labels_key {self.noisy_labels_key!r} is set but noisy_labels is not; give the "
                "label file with --noisy-labels FILE or drop the key"
            )
        if not self.noisy_labels:
            from hrp_ood.data.noise import check_noise_for_dataset, parse_noise

            check_noise_for_dataset(parse_noise(self.noise), self.dataset)
        if not self.t_min <= self.t_max:
            raise UserError(f"t_min ({self.t_min}) must not exceed t_max ({self.t_max})")

    def _validate_meta_size(self) -> None:
        """0 (train on the whole training split) only for methods that do not use a clean meta set."""
        if self.meta_size < 0 or (self.meta_size == 0 and self.spec.needs_meta_set):
            without_meta = ", ".join(name for name, spec in METHODS.items() if not spec.needs_meta_set)
            raise UserError(
                f"meta_size must be positive for {self.method} (it needs a clean meta set), "
                f"got {self.meta_size}; meta_size 0 is for methods without one: {without_meta}"
            )

    def check_schedule(self) -> None:
        """The learning-rate milestones fall within the run (checked for the config a run trains with; a
        `--resume` command line carries only the keys it changes, so this is not part of `validate`)."""
        outside = [m for m in self.lr_milestones if not 0 <= m <= self.epochs]
        if outside and self.lr_schedule == "multistep":
            raise UserError(
                f"lr_milestones {self.lr_milestones} lie outside [0, {self.epochs}] (epochs): the learning "
                f"rate would never decay at {', '.join(map(str, outside))}; give milestones within the "
                "run, e.g. --set lr_milestones=[...], or [] for a constant rate"
            )

    @property
    def spec(self) -> MethodSpec:
        """The method's switches, its L_CE and reliability normalisation resolved (the method's own, else the
        config's)."""
        spec = METHODS[self.method]
        if spec.normalization and spec.ce_loss:
            return spec
        return dataclasses.replace(
            spec, normalization=spec.normalization or self.normalization, ce_loss=spec.ce_loss or self.ce_loss
        )

    @property
    def run_name(self) -> str:
        noise = "file" if self.noisy_labels else self.noise
        return self.name or f"{self.dataset}_{noise}_{self.method}_s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RELIABILITY_TERMS = ("ce", "ram", "cdcl")
LR_SCHEDULES = ("multistep", "cosine", "constant")
CE_LOSSES = ("refined", "meta_weighted", "meta_weighted_peer", "meta_weighted_s")
MAX_EPOCHS = 100_000
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
INF = math.inf

# key → (lowest, highest, bounds): "[]" both included, "(]" lowest excluded, "[)" highest excluded.
# A None value (optional keys) is not checked; every other value must also be finite.
VALUE_RANGES: dict[str, tuple[float, float, str]] = {
    "image_size": (1, 4096, "[]"),
    "crop_padding": (0, 4096, "[]"),
    "meta_size": (0, INF, "[)"),
    "proj_hidden_dim": (1, INF, "[)"),
    "proj_dim": (1, INF, "[)"),
    "epochs": (1, MAX_EPOCHS, "[]"),
    "batch_size": (1, INF, "[)"),
    "meta_batch_size": (1, INF, "[)"),
    "eval_batch_size": (1, INF, "[)"),
    "signals_every": (1, INF, "[)"),
    "reliability_momentum": (0, 1, "[)"),
    "seed": (0, MAX_SEED, "[]"),
    "warmup_epochs": (0, INF, "[)"),
    "ramp_epochs": (0, INF, "[)"),
    "coteach_ramp_epochs": (0, INF, "[)"),
    "lr": (0, INF, "()"),
    "momentum": (0, 1, "[)"),
    "weight_decay": (0, INF, "[)"),
    "lr_gamma": (0, INF, "()"),
    "lr_min": (0, INF, "[)"),
    "reliability_mean_from": (0, INF, "[)"),
    "kappa": (0, INF, "()"),
    "t_min": (0, INF, "()"),
    "t_max": (0, INF, "()"),
    "delta": (0, INF, "()"),
    "cdcl_temperature": (0, INF, "()"),
    "tau_conf": (0, 1, "[]"),
    "tau_match": (0, 1, "[]"),
    "sharpen_temperature": (0, INF, "()"),
    "gamma": (0, 1, "[]"),
    "lambda_cons": (0, INF, "[)"),
    "lambda_c": (0, INF, "[)"),
    "lambda_prior": (0, INF, "[)"),
    "gce_q": (0, 1, "(]"),
    "forget_rate": (0, 1, "[)"),
    "lambda_u": (0, INF, "[)"),
    "p_threshold": (0, 1, "[)"),
    "mixup_alpha": (0, INF, "()"),
    "gmm_loss_epochs": (1, INF, "[)"),
    "longremix_stage1_epochs": (0, INF, "[)"),
    "hcs_epochs": (1, INF, "[)"),
    "hcs_search_epochs": (1, INF, "[)"),
    "grad_clip": (0, INF, "[)"),
    "unicon_d_u": (0, INF, "[)"),
    "unicon_tau": (0, INF, "()"),
    "lambda_supcon": (0, INF, "[)"),
    "supcon_temperature": (0, INF, "()"),
    "promix_rho_start": (0, 1, "(]"),
    "promix_rho_end": (0, 1, "(]"),
    "promix_tau": (0, 1, "[]"),
    "promix_debias_output": (0, INF, "[)"),
    "promix_debias_pl": (0, INF, "[)"),
    "promix_ramp_epochs": (0, INF, "[)"),
    "promix_expand_epochs": (0, INF, "[)"),
    "promix_expand_fill": (0, 1, "[]"),
    "promix_prior_momentum": (0, 1, "[)"),
    "promix_unchosen_weight": (0, INF, "[)"),
}


def check_device_name(name: str) -> None:
    if not DEVICE_NAME.fullmatch(name):
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, got {cut(name)}")


def _range_text(low: float, high: float, bounds: str) -> str:
    if high == INF:
        return f"{'>=' if bounds[0] == '[' else '>'} {low}"
    return f"in {bounds[0]}{low}, {high}{bounds[1]}"


def _check_range(key: str, value: float | None, low: float, high: float, bounds: str) -> None:
    if value is None:
        return
    finite = isinstance(value, int) or math.isfinite(value)  # a huge int does not convert to float
    inside = (
        finite
        and (low <= value if bounds[0] == "[" else low < value)
        and (value <= high if bounds[1] == "]" else value < high)
    )
    if not inside:
        kind = "an integer" if isinstance(value, int) else "a finite number"
        raise UserError(
            f"{key} must be {kind} {_range_text(low, high, bounds)}, got {cut(value)}; "
            f"fix it in the config or with --set {key}=..."
        )


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _unknown_key_error(key: str, where: str) -> UserError:
    close = difflib.get_close_matches(key, field_names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(field_names())}"
    return UserError(f"unknown config key {key!r} in {where}{hint}")


def _allowed_types(hint: Any) -> tuple[type, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(t for arg in typing.get_args(hint) for t in _allowed_types(arg))
    return (typing.get_origin(hint) or hint,)


def _type_name(t: type, item: type = int) -> str:
    return {type(None): "null", list: f"a list of {item.__name__}"}.get(t, t.__name__)


def _list_item_type(hint: Any) -> type:
    """The item type of a list key (list[int], list[str])."""
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is list:
            return typing.get_args(arg)[0]
    return int


def _check_types(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        allowed = _allowed_types(hints[f.name])
        item = _list_item_type(hints[f.name])
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, f.name, float(value))
            continue
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if value is None:
            ok = type(None) in allowed
        if ok and isinstance(value, list):
            ok = all(isinstance(v, item) and not isinstance(v, bool) for v in value)
        if not ok:
            names = " or ".join(_type_name(t, item) for t in allowed)
            raise UserError(f"config key {f.name!r} must be {names}, got {cut(value)} ({type(value).__name__})")


MAX_YAML_BYTES = 1_000_000
MAX_YAML_DEPTH = 20


class _RefusedYaml(yaml.YAMLError):
    """YAML this package does not read: aliases (a few hundred bytes of nested aliases expand to gigabytes) or
    nesting deeper than MAX_YAML_DEPTH."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases and with a depth limit: config and experiment files are small flat
    mappings, and a hostile one must not exhaust memory or the stack."""

    depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 (PyYAML's signature)
        if self.check_event(yaml.AliasEvent):
            line = self.peek_event().start_mark.line + 1
            raise _RefusedYaml(f"YAML aliases (*name) are not supported (line {line}); write the values out")
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _RefusedYaml(f"nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {shown(path)} not found; the shipped configs are in configs/ of the repository")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise UserError(f"config file {shown(path)} is over {MAX_YAML_BYTES:,} bytes; a config is a small mapping")
    try:
        data = load_yaml_text(read_text_file(path, "config file"))
    except _RefusedYaml as err:
        raise UserError(f"config file {shown(path)}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {shown(path)} is not valid YAML{where}: fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {shown(path)} must be a flat mapping of key: value, got {type(data).__name__}")
    return data


class _Null:
    """An override that sets a key to null (`--set key=null`), unlike None, which means "not given"."""

    def __repr__(self) -> str:
        return "null"


NULL = _Null()


def parse_set_option(item: str) -> tuple[str, Any]:
    """`key=value` from `--set`; the value is parsed as YAML (so 0.1 is a float, [1, 2] a list, null NULL)."""
    if "=" not in item:
        raise UserError(f"--set expects key=value, got {cut(item)}")
    key, raw = item.split("=", 1)
    try:
        value = load_yaml_text(raw)
    except yaml.YAMLError:
        raise UserError(f"--set {cut(item)}: the value is not valid YAML") from None
    return key.strip(), NULL if value is None else value


def build_config(
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults ← `base` ← YAML file ← overrides (None values in overrides are ignored, NULL sets null).

    An `epochs` override shorter than the file's milestones scales them to the shorter run (and says so), unless
    the overrides set `lr_milestones` too: shortening a paper run is the first thing users do."""
    values: dict[str, Any] = dict(base or {})
    sources = [(values, "the built-in defaults")]
    if config_file is not None:
        sources.append((read_yaml(config_file), str(config_file)))
    command_line = {k: v for k, v in (overrides or {}).items() if v is not None}
    merged: dict[str, Any] = {}
    valid = set(field_names())
    for mapping, where in [*sources, (command_line, "the command line")]:
        for key, value in mapping.items():
            if key not in valid:
                raise _unknown_key_error(key, where)
            if mapping is command_line and key == "epochs" and "lr_milestones" not in command_line:
                _scale_milestones(merged, value)
            merged[key] = None if value is NULL else value
    return TrainConfig(**merged)


def _scale_milestones(values: dict[str, Any], epochs: Any) -> None:
    """The milestones of `values` scaled from its epochs to `epochs` when one of them lies beyond `epochs`."""
    milestones = values.get("lr_milestones", TrainConfig.__dataclass_fields__["lr_milestones"].default_factory())
    before = values.get("epochs", TrainConfig.epochs)
    if (
        not isinstance(epochs, int)
        or isinstance(epochs, bool)
        or epochs < 1
        or not isinstance(milestones, list)
        or not isinstance(before, int)
        or before < 1
        or all(isinstance(m, int) and m <= epochs for m in milestones)
    ):
        return  # nothing to scale, or a type error TrainConfig reports
    scaled = sorted({min(epochs, max(1, round(m * epochs / before))) for m in milestones if isinstance(m, int)})
    _warn_once(f"--epochs {epochs}: the config's lr_milestones {milestones} (for {before} epochs) scaled to {scaled}")
    values["lr_milestones"] = scaled


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    """A warning said once per process (a sweep builds every grid point's config several times)."""
    log.warning(message)


# Keys that say whether and where a run logs, never what it trains: they may change on resume, a saved config that
# lacks them (saved before they existed) takes the defaults, and a sweep's run that differs in them is the same run.
LOGGING_KEYS = ("tensorboard", "tensorboard_dir")

# Keys added after runs had been saved without them, with the value that reproduces what those runs did: a saved
# config that lacks one resumes (and evaluates) as it trained, not with today's default.
BEHAVIOUR_BEFORE_KEY = {
    "ce_loss": "refined",
    "normalization": "separate",
    "meta_bn": "eval",
    "crop_padding": 4,
    "flip": True,
}


def saved_config(values: dict[str, Any], where: str | Path) -> TrainConfig:
    """The TrainConfig of a run's saved config (config.yaml, or a checkpoint's `config`) read from `where`."""
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise UserError(
            f"{where}: its config has {', '.join(unknown)}, unknown to this version of hrp-ood (saved by "
            "a newer one?); use the version that wrote it, or start a new run"
        )
    return TrainConfig(**{**BEHAVIOUR_BEFORE_KEY, **values})


def save_config(cfg: TrainConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
