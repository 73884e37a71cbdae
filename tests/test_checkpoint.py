import os

import pytest
import torch

from hrp_ood.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from hrp_ood.errors import UserError


class CodeOnUnpickle:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_round_trip_and_rng_restore(tmp_path):
    torch.manual_seed(3)
    save_checkpoint({"w": torch.arange(4.0), "rng": rng_state(), "epoch": 2}, tmp_path / "a.pt")
    expected = torch.rand(5)
    state = load_checkpoint(tmp_path / "a.pt")
    assert state["epoch"] == 2 and torch.equal(state["w"], torch.arange(4.0))
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(5), expected)
    assert not list(tmp_path.glob(".*tmp")), "no temporary file is left behind"


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    save_checkpoint({"w": torch.ones(1000)}, tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not an hrp-ood checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError):
        load_checkpoint(tmp_path / "text.pt")


def test_a_pickle_that_runs_code_is_rejected_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": "hrp-ood/1", "payload": CodeOnUnpickle(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
