"""Every method `hrp-ood train --method` knows: one row of METHODS each, read by the trainer, config validation,
the sweep and evaluate. A row names the module of `hrp_ood.trainers` that implements the method (its networks,
its per-epoch pass, its step; `hrp_ood.trainers.base` says what such a module defines) and what the rest of the
package needs to know about it without importing it.

Adding a method: one module in hrp_ood/trainers/, one row here, one config in configs/
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

TEST_RULES = ("mean", "sum")  # how `evaluate --net ensemble` combines the networks' logits


@dataclass(frozen=True)
class MethodSpec:
    """What a method name switches on."""

    module: str = "hrp"  # hrp_ood.trainers.<module>
    networks: int = 2  # co-trained networks, every one saved in the checkpoints and used by the test rule
    loss: str = "hrp"  # the step inside the module: ce | ce_meta | gce | coteach (baselines) | the module's own
    meta: bool = True  # a bilevel meta step on the clean meta set (HRP's α, β; L2B's example weights)
    # HRP's switches (the ablations of Table 4); ignored by the other modules
    normalization: str | None = None  # fixes the config's `normalization` (coupled_meta); None: the config's
    ce_loss: str | None = None  # fixes the config's `ce_loss` (hrp_meta_weighted); None: the config's
    ram: bool = True
    grg: bool = True
    symmetric_ram: bool = False
    cdcl: bool = True
    # the reference code's test: the ensemble's logits are the mean or the sum of the networks' (MSP and energy
    # depend on which); recorded in eval.json
    test_rule: str = "mean"
    data_parallel: bool = True  # trains under torchrun (methods whose epoch plan is global to the set do not)

    @property
    def dual(self) -> bool:
        return self.networks == 2

    @property
    def trains_on_meta_set(self) -> bool:
        """The clean meta set is training data (ce_meta), not held out."""
        return self.loss == "ce_meta"

    @property
    def needs_meta_set(self) -> bool:
        return self.meta or self.trains_on_meta_set

    @property
    def clean_labels_seen(self) -> str:
        """What the method learns from the meta set's clean labels (docs/method.md)."""
        if self.trains_on_meta_set:
            return "trains on them"
        return "its meta step's loss" if self.meta else "none"

    def implementation(self) -> ModuleType:
        return importlib.import_module(f"hrp_ood.trainers.{self.module}")


_NO_HRP = dict(meta=False, ram=False, grg=False, cdcl=False)

METHODS: dict[str, MethodSpec] = {
    "ce": MethodSpec(module="baselines", networks=1, loss="ce", **_NO_HRP),
    # CE on each noisy batch plus a batch of the clean meta set with its true labels: the baseline that spends
    # the clean labels HRP's meta step uses on plain training (best.pt is then the last epoch: no held-out set)
    "ce_meta": MethodSpec(module="baselines", networks=1, loss="ce_meta", **_NO_HRP),
    "gce": MethodSpec(module="baselines", networks=1, loss="gce", **_NO_HRP),
    "coteach": MethodSpec(module="baselines", loss="coteach", **_NO_HRP),
    # Table 4's "Coupled Meta": one normaliser for α and β (L2B-like) instead of Eq. 5's separate ones
    "coupled_meta": MethodSpec(normalization="coupled"),
    "hrp": MethodSpec(),
    "hrp_no_ram": MethodSpec(ram=False),
    "hrp_no_cdcl": MethodSpec(cdcl=False),
    "hrp_no_grg": MethodSpec(grg=False),
    "hrp_sym_ram": MethodSpec(symmetric_ram=True),
    # not the paper's HRP: L_CE is Eq. 1 with each network's own meta-learned α, β over the whole batch (L2B's
    # training loss) and one normaliser for α and β. The default of hrp-ood 0.1 until 2026-12-02 (docs/method.md)
    "hrp_meta_weighted": MethodSpec(ce_loss="meta_weighted", normalization="coupled"),
    # α = β = 1 everywhere: HRP's losses without the meta step (the speed baseline of benchmarks/train_step.py):
    # T ≡ 2 (L_CE unweighted, RAM's Beta law symmetric, gate 2) and β̂ ≡ 1 (CDCL ungated)
    "hrp_no_meta": MethodSpec(meta=False),
    # Table 4's "independent module verification" rows: Base = two networks exchanging refined targets, L_CE at
    # α = β = 1, and the consistency loss; then one module added
    "base": MethodSpec(meta=False, ram=False, cdcl=False),
    # Base + the paper's meta step (Eq. 5's separate normalisers) reweighting Eq. 13 by T; no RAM, no CDCL
    "base_separate_meta": MethodSpec(ram=False, cdcl=False),
    "base_coupled_meta": MethodSpec(normalization="coupled", ram=False, cdcl=False),
    "base_cdcl": MethodSpec(meta=False, ram=False),
    "base_ram_grg": MethodSpec(meta=False, cdcl=False),
    # L2B (Zhou et al. 2024): one network; its meta step reweights the given label and its own pseudo-label of each
    # sample by their effect on the clean meta set's loss after a virtual step of the real optimizer
    "l2b": MethodSpec(module="l2b", networks=1, meta=True, ram=False, grg=False, cdcl=False),
    # DivideMix (Li et al. 2020): per-epoch GMM co-divide, MixMatch with co-guessing and co-refinement
    "dividemix": MethodSpec(
        module="dividemix", meta=False, ram=False, grg=False, cdcl=False, test_rule="sum", data_parallel=False
    ),
    # LongReMix (Cordeiro et al. 2022): DivideMix finding a high-confidence set, then fresh networks trained with it
    "longremix": MethodSpec(
        module="longremix", meta=False, ram=False, grg=False, cdcl=False, test_rule="sum", data_parallel=False
    ),
    # ProMix (Xiao et al. 2023): two networks, each with a debiased pseudo head, trained on their own class-wise
    # small-loss + matched high-confidence selection; test = the mean of the two primary heads' logits
    "promix": MethodSpec(
        module="promix", meta=False, ram=False, grg=False, cdcl=False, test_rule="mean", data_parallel=False
    ),
    # UNICON (Karim et al. 2022): DivideMix's step with a class-uniform JSD selection, MixMatch on strong views and
    # SimCLR on the unlabeled rows
    "unicon": MethodSpec(
        module="unicon", meta=False, ram=False, grg=False, cdcl=False, test_rule="sum", data_parallel=False
    ),
}
