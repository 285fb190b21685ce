"""`caopd run` -> run_dir/final -> tools/export_hf.py -> transformers: the trained student is released intact.

References: the training checkpoint's own student weights (final/ must hold exactly them), and transformers'
logits on the exported folder against the project's megatron model built from final/ (as in
tests/test_hf_conversion.py).
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers_models import runtime  # noqa: F401  (a fixture)
from test_cli_e2e import ROOT, TINY, caopd
from test_hf_conversion import build_from_checkpoint

pytestmark = pytest.mark.slow


def test_caopd_run_writes_a_final_student_that_transformers_loads(runtime, tmp_path):  # noqa: F811
    import transformers

    run = tmp_path / "run"
    caopd("run", *TINY, "distill.steps=2", "checkpoint.save_interval=0", f"run.output_dir={run}")
    final = run / "final"
    assert (final / "caopd_checkpoint.json").is_file() and (final / "tokenizer" / "tokenizer.json").is_file()
    assert not [p.name for p in run.iterdir() if p.name.startswith("final.tmp-")]

    model, cfg, vocab = build_from_checkpoint(final)
    trained = torch.load(run / "checkpoints" / "step_000002" / "rank_00000.pt", weights_only=True)["student"]
    ours = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for name, tensor in trained.items():
        if isinstance(tensor, torch.Tensor) and name in ours:
            assert torch.equal(ours[name], tensor), name
    assert set(k for k, v in trained.items() if isinstance(v, torch.Tensor)) <= set(ours) | {
        k for k in trained if k.endswith("_extra_state")}

    spec = importlib.util.spec_from_file_location("export_hf", ROOT / "tools" / "export_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--ckpt", str(final), "--out", str(tmp_path / "hf"), "--dtype", "float32", "--no-progress"]) == 0

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, vocab.real, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(tokens.size(1)).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        want = model(tokens, positions, attention_mask=None)[..., :vocab.real]
        got = hf(tokens).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert float((want - want.mean()).abs().max()) > 1e-2  # the comparison is not between two flat outputs
