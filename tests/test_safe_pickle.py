"""The restricted readers of a distributed checkpoint's pickled files (caopd_megatron.checkpointing.safe_pickle).

A real PyTorch DCP save supplies the metadata to accept; hand-made pickles supply what must be refused, and a
marker file proves the refused code never ran.
"""
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from caopd_megatron.checkpointing.safe_pickle import (
    UnsafeCheckpointError,
    check_weights_only,
    read_dcp_metadata,
    verify_distributed_checkpoint,
)


class _WritesMarker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture()
def dcp_dir(tmp_path):
    out = tmp_path / "ckpt"
    state = {"weight": torch.arange(12, dtype=torch.bfloat16).view(3, 4), "bias": torch.zeros(4)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(out)), no_dist=True)
    (out / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    torch.save({"step": 3, "lr": torch.tensor(0.1)}, out / "common.pt")
    return out


def test_real_dcp_metadata_is_accepted_and_equals_the_plain_unpickle(dcp_dir):
    meta = verify_distributed_checkpoint(dcp_dir)
    with open(dcp_dir / ".metadata", "rb") as f:
        plain = pickle.load(f)
    assert meta.state_dict_metadata.keys() == plain.state_dict_metadata.keys() == {"weight", "bias"}
    assert meta.state_dict_metadata["weight"].size == torch.Size([3, 4])
    assert meta.state_dict_metadata["weight"].properties.dtype == torch.bfloat16
    assert meta.state_dict_metadata == plain.state_dict_metadata


@pytest.mark.parametrize("victim", [".metadata", "common.pt"])
def test_pickled_code_is_refused_and_never_runs(dcp_dir, tmp_path, victim):
    marker = tmp_path / "ran"
    payload = _WritesMarker(marker)
    if victim == "common.pt":
        torch.save({"state": payload}, dcp_dir / victim)
    else:
        (dcp_dir / victim).write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafeCheckpointError, match=f"{victim}: refused"):
        verify_distributed_checkpoint(dcp_dir)
    assert not marker.exists()


def test_missing_and_corrupt_files_are_named(dcp_dir, tmp_path):
    (dcp_dir / ".metadata").write_bytes((dcp_dir / ".metadata").read_bytes()[:20])
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: corrupt"):
        read_dcp_metadata(dcp_dir)
    with pytest.raises(UnsafeCheckpointError, match="no .metadata"):
        read_dcp_metadata(tmp_path)
    (dcp_dir / "metadata.json").unlink()
    with pytest.raises(UnsafeCheckpointError, match="no metadata.json"):
        verify_distributed_checkpoint(dcp_dir)
    torch.save({"ok": torch.ones(2)}, tmp_path / "plain.pt")
    check_weights_only(tmp_path / "plain.pt")
