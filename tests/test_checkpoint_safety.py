"""Nothing executed from a checkpoint, every byte verified: tampered rank files, ``dist/.metadata``, ``common.pt``,
flipped bytes, and non-finite states that must never be written."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from caopd_megatron.checkpointing.checkpoint import CheckpointError, TrainState, load_checkpoint, save_checkpoint
from caopd_megatron.checkpointing.format import latest_checkpoint
from helpers_models import runtime  # noqa: F401  (a fixture)


class _CreatesMarker:
    """A pickle that, when unpickled by a plain loader, creates the file ``path`` (stands for arbitrary code)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _rehash(ckpt: Path, name: str) -> None:
    """What an attacker who can write the folder does: make meta.json's hash agree with the tampered file."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"][name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _plain(tmp_path: Path, step: int = 1) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = save_checkpoint(tmp_path, step, student=model, optimizer=opt, scheduler=None, teacher=None,
                           state=TrainState(step, {}), config_yaml="")
    return ckpt, model


def test_flipped_byte_in_a_rank_file_is_an_error_naming_the_file(tmp_path):
    ckpt, _ = _plain(tmp_path)
    rank_file = ckpt / "rank_00000.pt"
    data = bytearray(rank_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    rank_file.write_bytes(bytes(data))
    fresh = nn.Linear(4, 3)
    before = fresh.weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"rank_00000\.pt does not match the sha256"):
        load_checkpoint(tmp_path, student=fresh)
    assert torch.equal(fresh.weight, before)


def test_meta_json_records_a_hash_per_file(tmp_path):
    ckpt, _ = _plain(tmp_path)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["sha256"] == {"rank_00000.pt": hashlib.sha256((ckpt / "rank_00000.pt").read_bytes()).hexdigest()}
    assert list(meta)[-1] == "complete"


def test_rank_file_with_pickled_code_is_refused(tmp_path):
    ckpt, _ = _plain(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"student": _CreatesMarker(marker)}, ckpt / "rank_00000.pt")
    _rehash(ckpt, "rank_00000.pt")
    with pytest.raises(CheckpointError, match=r"rank_00000\.pt is corrupt or not a caopd checkpoint"):
        load_checkpoint(tmp_path, student=nn.Linear(4, 3))
    assert not marker.exists()


def test_non_finite_state_is_never_checkpointed_and_keeps_the_good_ones(tmp_path):
    good, model = _plain(tmp_path, step=1)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"refusing to checkpoint step 2: .*'weight'.* non-finite"):
        save_checkpoint(tmp_path, 2, student=model, optimizer=None, scheduler=None, teacher=None,
                        state=TrainState(2, {}), config_yaml="", keep_last=1)
    assert latest_checkpoint(tmp_path) == good  # keep_last=1 did not prune the good one over the refused save
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]


# ---- the megatron-core distributed copy (dist/) ------------------------------------------------------------


@pytest.fixture
def dist_checkpoint(runtime, tmp_path):
    """A real checkpoint with a distributed copy, written by a tiny GPTModel in this process."""
    from helpers_models import tiny_model

    model, _ = tiny_model(seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt = save_checkpoint(tmp_path, 1, student=model, optimizer=opt, scheduler=None, teacher=None,
                           state=TrainState(1, {"cursor": 1}), config_yaml="", distributed=True)
    return ckpt


def _claim_other_layout(ckpt: Path) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["layout"]["tensor_model_parallel_size"] = 2  # a resume under "another layout" reads dist/
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_dist_metadata_with_pickled_code_is_refused_on_resume_under_another_layout(dist_checkpoint, tmp_path):
    from helpers_models import tiny_model

    ckpt = dist_checkpoint
    marker = tmp_path / "pwned"
    (ckpt / "dist" / ".metadata").write_bytes(__import__("pickle").dumps(_CreatesMarker(marker)))
    _rehash(ckpt, "dist/.metadata")
    _claim_other_layout(ckpt)
    model, _ = tiny_model(seed=4)
    with pytest.raises(CheckpointError, match=r"dist/\.metadata: refused"):
        load_checkpoint(tmp_path, student=model, optimizer=None)
    assert not marker.exists()


def test_common_pt_with_pickled_code_is_refused(dist_checkpoint, tmp_path):
    from helpers_models import tiny_model

    ckpt = dist_checkpoint
    marker = tmp_path / "pwned"
    torch.save({"common": _CreatesMarker(marker)}, ckpt / "dist" / "common.pt")
    _rehash(ckpt, "dist/common.pt")
    _claim_other_layout(ckpt)
    model, _ = tiny_model(seed=4)
    with pytest.raises(CheckpointError, match=r"common\.pt: refused, not loadable with weights_only"):
        load_checkpoint(tmp_path, student=model)
    assert not marker.exists()


def test_flipped_byte_in_the_distributed_copy_is_an_error_naming_the_file(dist_checkpoint, tmp_path):
    from helpers_models import tiny_model

    ckpt = dist_checkpoint
    shard = next(p for p in sorted((ckpt / "dist").iterdir()) if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x40
    shard.write_bytes(bytes(data))
    _claim_other_layout(ckpt)
    model, _ = tiny_model(seed=4)
    with pytest.raises(CheckpointError, match=rf"dist/{shard.name} does not match the sha256"):
        load_checkpoint(tmp_path, student=model)
