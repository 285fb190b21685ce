"""Checks ``checkpointing/hf``: HF Llama/Mistral/Qwen2/Qwen3/OLMo-3 <-> megatron-core checkpoints, in both directions.

References (no downloads: tiny random-init HF models built from configs, every weight - norms included -
redrawn so a swapped or mis-laid tensor cannot hide behind an init value):
- round trip: HF -> import -> load into a GPTModel under TP 1/2 x PP 1/2 -> save from that layout ->
  export -> every tensor ``torch.equal`` to the original, and ``from_pretrained`` reports no missing or
  unexpected keys;
- logits: the megatron model's logits (fp32) against transformers' on the same tokens, max |diff| <= 1e-4,
  under every layout (PP stages chained by hand with point-to-point sends);
- greedy generation: the exported folder under ``transformers.generate`` against the project's own
  rollout sampler (``rollout.sampler.generate``, temperature 0) on the imported checkpoint;
- the families cover: GQA (4 heads / 2 groups), Llama-3 rope scaling (Llama), QKV bias + tied embeddings +
  single-file safetensors (Qwen2), QK norm + head_dim != hidden/heads (Qwen3), post-sublayer norms + QK
  norm over the whole projection + sliding-window layers shorter than the test sequences (OLMo-3), a
  window on every layer shorter than the test sequences and than the greedy rollouts (Mistral),
  sharded safetensors with an index (Llama, Qwen3, OLMo-3), and a real vocabulary (300) padded differently
  under TP 1 (384) and 2 (512);
- errors: unsupported architecture, missing/corrupt files, shape mismatches (tensor and both shapes
  named), unsupported rope parameters, and a checkpoint whose pickled metadata references code.
"""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_harness import run_distributed
from helpers_models import runtime  # noqa: F401  (session fixture: a world of 1 with megatron parallel state)

REAL_VOCAB = 300
EOS = 2
LAYOUTS = [(2, 1), (1, 2), (2, 2)]  # (TP, PP) run on 4 gloo ranks; (1, 1) runs in-process
REPO = Path(__file__).resolve().parents[1]

COMMON = dict(vocab_size=REAL_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=EOS)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 8.0, "beta_slow": 1.0}
FAMILIES = {
    "llama": dict(cls="LlamaForCausalLM", cfg="LlamaConfig", shard="150KB",
                  kwargs=dict(max_position_embeddings=16384, tie_word_embeddings=False, rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "mistral": dict(cls="MistralForCausalLM", cfg="MistralConfig", shard=None,
                    kwargs=dict(max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=1000000.0,
                                sliding_window=None, head_dim=16)),
    # A window on every layer: 4 tokens < the 12 test tokens and the 4-15 token greedy rollouts.
    "mistral_window": dict(cls="MistralForCausalLM", cfg="MistralConfig", shard=None,
                           kwargs=dict(max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=1000000.0,
                                       sliding_window=4, head_dim=16)),
    "qwen2": dict(cls="Qwen2ForCausalLM", cfg="Qwen2Config", shard=None,
                  kwargs=dict(max_position_embeddings=512, tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3": dict(cls="Qwen3ForCausalLM", cfg="Qwen3Config", shard="150KB",
                  kwargs=dict(max_position_embeddings=512, tie_word_embeddings=False, rope_theta=1000000.0, head_dim=24)),
    # Post-sublayer norms, QK norm over the whole projection, sliding-window layers (window 4 < the 12 tokens)
    "olmo3": dict(cls="Olmo3ForCausalLM", cfg="Olmo3Config", shard="150KB",
                  kwargs=dict(max_position_embeddings=512, tie_word_embeddings=False, rope_theta=500000.0,
                              sliding_window=4, layer_types=["sliding_attention", "full_attention",
                                                             "sliding_attention", "sliding_attention"])),
    # The released long-context form: YaRN on the full-attention layers only; an original context of 8
    # positions so that the ramp, the stretched frequencies and the attention factor all act on 12 tokens.
    "olmo3_yarn": dict(cls="Olmo3ForCausalLM", cfg="Olmo3Config", shard=None,
                       kwargs=dict(max_position_embeddings=32, tie_word_embeddings=False, rope_theta=500000.0,
                                   sliding_window=4, layer_types=["sliding_attention", "full_attention",
                                                                  "sliding_attention", "full_attention"],
                                   rope_scaling=dict(YARN))),
}
TOKENS = torch.tensor([[5, 17, 42, 299, 7, 128, 64, 3, 250, 11, 90, 1],
                       [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 100, 200]])
PROMPTS = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3], [250]]


# --------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------------


def build_hf_model(family: str, seed: int = 0):
    import transformers

    spec = FAMILIES[family]
    config = getattr(transformers, spec["cfg"])(**COMMON, **spec["kwargs"])
    torch.manual_seed(seed)
    model = getattr(transformers, spec["cls"])(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm weights around 1, matrices with std 0.1: spread logits, so greedy argmaxes have margins.
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def save_hf(model, folder: Path, shard: str | None) -> Path:
    from caopd_megatron.data.tokenizer import build_synthetic_tokenizer

    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    build_synthetic_tokenizer().save(folder)  # tokenizer files must travel through import and export
    return folder


def hf_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, runtime):  # noqa: F811
    """Per family: the HF folder, its original tensors and logits, and the imported checkpoint (TP=1 padding)."""
    from caopd_megatron.checkpointing.hf import import_hf_checkpoint

    out = {}
    root = tmp_path_factory.mktemp("hf")
    for family, spec in FAMILIES.items():
        model = build_hf_model(family)
        hf_dir = save_hf(model, root / f"{family}_hf", spec["shard"])
        with torch.no_grad():
            logits = model(TOKENS).logits
        summary = import_hf_checkpoint(hf_dir, root / f"{family}_ckpt", tensor_model_parallel_size=1,
                                       show_progress=False)
        out[family] = dict(hf_dir=hf_dir, ckpt=Path(summary.out_dir), state=hf_state(model), logits=logits,
                           summary=summary, root=root)
    return out


def build_from_checkpoint(ckpt: Path, tp: int = 1, pp: int = 1, sequence_parallel: bool = False):
    from caopd_megatron.checkpointing.hf import load_megatron_checkpoint, load_model_config
    from caopd_megatron.config.schema import ParallelConfig
    from caopd_megatron.models.builder import build_gpt_model, resolve_vocab
    from caopd_megatron.runtime.backend import detect_backend
    from caopd_megatron.runtime.distributed import process_groups

    cfg = load_model_config(ckpt)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              sequence_parallel=sequence_parallel)
    vocab = resolve_vocab(cfg, cfg.vocab_size, tp)
    model = build_gpt_model(cfg, parallel, vocab, detect_backend(), process_groups())
    load_megatron_checkpoint(ckpt, model)
    return model.eval(), cfg, vocab


def assert_same_tensors(expected: dict[str, torch.Tensor], folder: Path, family: str) -> None:
    import transformers

    model, info = getattr(transformers, FAMILIES[family]["cls"]).from_pretrained(
        folder, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    got = model.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), f"{name} differs after the round trip"


def export(ckpt: Path, out: Path, **kw):
    from caopd_megatron.checkpointing.hf import export_hf_checkpoint

    return export_hf_checkpoint(ckpt, out, show_progress=False, **{"dtype": "float32", **kw})


# --------------------------------------------------------------------------------------------------------
# In-process: TP=1, PP=1
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp1_pp1_logits_roundtrip_and_greedy_generation(family, converted, tmp_path):
    import transformers

    from caopd_megatron.checkpointing.hf import save_megatron_checkpoint
    from caopd_megatron.rollout.sampler import SamplingParams, generate

    c = converted[family]
    assert c["summary"].real_vocab_size == REAL_VOCAB and c["summary"].padded_vocab_size == 384
    assert "tokenizer.json" in c["summary"].tokenizer_files
    model, cfg, vocab = build_from_checkpoint(c["ckpt"])
    positions = torch.arange(TOKENS.size(1)).unsqueeze(0).expand_as(TOKENS)
    with torch.no_grad():
        logits = model(TOKENS, positions, attention_mask=None)
    assert logits.shape[-1] == 384
    diff = (logits[..., :REAL_VOCAB] - c["logits"]).abs().max().item()
    assert diff <= 1e-4, f"{family}: megatron vs transformers logits differ by {diff}"

    # Save from the loaded model (the path a trained student takes), export, compare every tensor.
    saved = save_megatron_checkpoint(tmp_path / "ckpt", model, cfg, real_vocab_size=vocab.real,
                                     tokenizer_dir=c["ckpt"] / "tokenizer", hf_source_dir=c["ckpt"] / "hf_source",
                                     source_architecture=FAMILIES[family]["cls"])
    summary = export(saved, tmp_path / "hf_out", max_shard_size="100KB")
    assert summary.vocab_rows_dropped == 384 - REAL_VOCAB
    assert (tmp_path / "hf_out" / "model.safetensors.index.json").is_file()
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(summary.tokenizer_files)
    assert json.loads((tmp_path / "hf_out" / "generation_config.json").read_text())["eos_token_id"] == EOS
    assert_same_tensors(c["state"], tmp_path / "hf_out", family)

    # Greedy tokens: transformers on the exported folder vs the project's rollout sampler on megatron.
    hf_model = getattr(transformers, FAMILIES[family]["cls"]).from_pretrained(tmp_path / "hf_out", dtype=torch.float32).eval()
    ours = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0), eos_id=EOS,
                    real_vocab_size=REAL_VOCAB)
    for prompt, gen in zip(PROMPTS, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                    eos_token_id=EOS, pad_token_id=EOS, output_scores=True, return_dict_in_generate=True)
        # The comparison means something only without float near-ties between the top two tokens.
        margins = [float(torch.topk(step[0], 2).values.diff().abs()) for step in out.scores]
        assert min(margins) > 1e-3, f"{family}: near-tie in the reference; pick another seed"
        theirs = out.sequences[0, len(prompt):].tolist()
        if EOS in theirs:
            theirs = theirs[: theirs.index(EOS) + 1]
        assert gen.response_ids == theirs, f"{family}: greedy tokens differ for prompt {prompt}"


def test_olmo3_yarn_reference_tells_the_rope_variants_apart(converted):
    """The olmo3_yarn bar (logits <= 1e-4) discriminates: transformers' model with YaRN on every layer, or with
    YaRN's attention factor set to 1, differs from the imported model by far more, and the import records
    the factor transformers computes (0.1 ln 4 + 1)."""
    import transformers

    from caopd_megatron.models.rope import model_yarn_rope

    c = converted["olmo3_yarn"]
    model, cfg, _ = build_from_checkpoint(c["ckpt"])
    assert model_yarn_rope(cfg).attention_scaling == pytest.approx(1.1386294361, abs=1e-9)
    assert cfg.sliding_layers() == [True, False, True, False]
    positions = torch.arange(TOKENS.size(1)).unsqueeze(0).expand_as(TOKENS)
    with torch.no_grad():
        ours = model(TOKENS, positions, attention_mask=None)[..., :REAL_VOCAB]
    yarn_everywhere = {"full_attention": dict(YARN, rope_theta=500000.0), "sliding_attention": dict(YARN, rope_theta=500000.0)}
    no_factor = {"full_attention": dict(YARN, rope_theta=500000.0, attention_factor=1.0),
                 "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0}}
    spec = FAMILIES["olmo3_yarn"]
    for variant in (yarn_everywhere, no_factor):
        kwargs = {k: v for k, v in spec["kwargs"].items() if k not in ("rope_scaling", "rope_theta")}
        hf = transformers.Olmo3ForCausalLM(transformers.Olmo3Config(**COMMON, **kwargs, rope_parameters=variant)).eval()
        hf.load_state_dict(c["state"])
        with torch.no_grad():
            theirs = hf(TOKENS).logits
        assert (ours - theirs).abs().max().item() > 1e-2, variant


def test_export_dtype_option_and_tokenizer_loads(converted, tmp_path):
    import transformers
    from safetensors import safe_open

    c = converted["qwen2"]
    summary = export(c["ckpt"], tmp_path / "bf16", dtype="bfloat16")
    assert summary.files[0] == "model.safetensors" and summary.dtype == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert "lm_head.weight" not in names  # tied: the head is the embedding
        for name in names:
            t = f.get_tensor(name)
            assert t.dtype == torch.bfloat16 and torch.equal(t, c["state"][name].to(torch.bfloat16)), name
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True and config["vocab_size"] == REAL_VOCAB
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "bf16")
    assert tok.eos_token == "<eos>"


def test_pytorch_bin_weights_import_like_safetensors(converted, tmp_path):
    """Legacy ``pytorch_model.bin`` (read with weights_only=True) converts to the same megatron tensors."""
    from caopd_megatron.checkpointing.hf import import_hf_checkpoint
    from caopd_megatron.checkpointing.hf.exporter import DistCheckpointReader

    c = converted["qwen2"]
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(c["hf_dir"] / "config.json", src / "config.json")
    torch.save({k: v for k, v in c["state"].items() if k != "lm_head.weight"}, src / "pytorch_model.bin")
    import_hf_checkpoint(src, tmp_path / "ck", show_progress=False)
    ours, ref = DistCheckpointReader(tmp_path / "ck"), DistCheckpointReader(c["ckpt"])
    keys = [k for k in ref.metadata.state_dict_metadata if ref.shape(k) is not None]
    assert keys and sorted(keys) == sorted(k for k in ours.metadata.state_dict_metadata if ours.shape(k) is not None)
    for key in keys:
        shape = ref.shape(key)
        assert torch.equal(ours.read(key, (0,) * len(shape), shape), ref.read(key, (0,) * len(shape), shape)), key


def test_cli_tools_import_and_export(converted, tmp_path):
    import importlib.util

    def load(name):
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    c = converted["llama"]
    # The import as a user runs it: its own process, no torch.distributed set up beforehand.
    run = subprocess.run([sys.executable, str(REPO / "tools" / "import_hf.py"), "--hf-dir", str(c["hf_dir"]),
                          "--out", str(tmp_path / "ck"), "--tp", "2", "--pp", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "padded to 512" in run.stdout and "import LlamaForCausalLM" in run.stderr  # summary and progress bar
    info = json.loads((tmp_path / "ck" / "caopd_checkpoint.json").read_text())
    assert info["padded_vocab_size"] == 512 and info["source_architecture"] == "LlamaForCausalLM"
    assert load("export_hf").main(["--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "hf"), "--dtype", "float32",
                                   "--no-progress"]) == 0
    assert_same_tensors(c["state"], tmp_path / "hf", "llama")
    # A bad layout is refused with the numbers named, and the tool exits non-zero.
    assert load("import_hf").main(["--hf-dir", str(c["hf_dir"]), "--out", str(tmp_path / "bad"), "--tp", "3",
                                   "--no-progress"]) != 0


# --------------------------------------------------------------------------------------------------------
# TP 2 / PP 2 on 4 gloo ranks
# --------------------------------------------------------------------------------------------------------


def _pipeline_logits(model, tokens):
    """Forward through all pipeline stages (hidden states sent rank to rank); logits on the last stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    positions = torch.arange(tokens.size(1)).unsqueeze(0).expand_as(tokens)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    if not first:
        hidden = torch.empty(tokens.size(1), tokens.size(0), model.config.hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model(tokens, positions, attention_mask=None, runtime_gather_output=True)
    if not last:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def _layouts_worker(rank, world_size, jobs):
    """For each (family, layout): load the imported checkpoint, compare logits, save under this layout."""
    from megatron.core import parallel_state as ps

    from caopd_megatron.checkpointing.hf import save_megatron_checkpoint
    from caopd_megatron.config.schema import ParallelConfig
    from caopd_megatron.runtime import distributed
    from caopd_megatron.runtime.backend import detect_backend

    detect_backend()  # CPU shims (incl. Tensor.cuda for the tied-embedding sync between PP stages)
    diffs = {}
    for tp, pp in LAYOUTS:
        distributed.initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=0)
        for family, job in jobs.items():
            model, cfg, vocab = build_from_checkpoint(Path(job["ckpt"]), tp, pp)
            assert vocab.padded == (512 if tp == 2 else 384)
            logits = _pipeline_logits(model, TOKENS)
            if logits is not None:
                diffs[(family, tp, pp)] = (logits[..., :REAL_VOCAB] - job["logits"]).abs().max().item()
            save_megatron_checkpoint(Path(job["out"]) / f"tp{tp}_pp{pp}", model, cfg, real_vocab_size=vocab.real,
                                     source_architecture=FAMILIES[family]["cls"])
        ps.destroy_model_parallel()
    return diffs


@pytest.mark.slow
def test_tp2_pp2_layouts_logits_and_roundtrip(converted):
    jobs = {f: dict(ckpt=str(c["ckpt"]), logits=c["logits"], out=str(c["root"] / f"{f}_layouts"))
            for f, c in converted.items()}
    results = run_distributed(_layouts_worker, 4, jobs, timeout=240)
    diffs = {k: v for r in results for k, v in r.items()}
    assert len(diffs) == len(FAMILIES) * len(LAYOUTS)
    assert max(diffs.values()) <= 1e-4, diffs
    for family, c in converted.items():
        for tp, pp in LAYOUTS:
            saved = Path(jobs[family]["out"]) / f"tp{tp}_pp{pp}"
            info = json.loads((saved / "caopd_checkpoint.json").read_text())
            assert (info["tensor_model_parallel_size"], info["pipeline_model_parallel_size"]) == (tp, pp)
            summary = export(saved, c["root"] / f"{family}_tp{tp}_pp{pp}_hf")
            assert summary.vocab_rows_dropped == info["padded_vocab_size"] - REAL_VOCAB
            assert_same_tensors(c["state"], Path(summary.out_dir), family)


# --------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------


def _copy_hf(converted, family, tmp_path) -> Path:
    dst = tmp_path / f"{family}_copy"
    shutil.copytree(converted[family]["hf_dir"], dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_unsupported_architecture_is_named_with_the_supported_list(converted, tmp_path):
    from caopd_megatron.checkpointing.hf import UnsupportedArchitectureError, import_hf_checkpoint

    src = _copy_hf(converted, "qwen2", tmp_path)
    _edit_json(src / "config.json", architectures=["GemmaForCausalLM"])
    with pytest.raises(UnsupportedArchitectureError,
                       match="GemmaForCausalLM.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        import_hf_checkpoint(src, tmp_path / "out", show_progress=False)


def test_mistral_sliding_window_imports_on_every_layer_and_contradictions_are_refused(converted):
    from caopd_megatron.checkpointing.hf import UnsupportedArchitectureError, hf_config_to_model_config

    base = json.loads((converted["mistral"]["hf_dir"] / "config.json").read_text())
    assert base["model_type"] == "mistral" and base["sliding_window"] is None
    cfg, family = hf_config_to_model_config({**base, "sliding_window": 1024})
    assert family.architecture == "MistralForCausalLM" and not cfg.add_qkv_bias and not cfg.qk_layernorm
    assert (cfg.sliding_window, cfg.layer_types, cfg.sliding_layers()) == (1024, None, [True] * 4)
    for full in (None, 4096, 8192):  # null, or a window as long as the context or longer: full attention
        cfg, _ = hf_config_to_model_config({**base, "sliding_window": full})
        assert cfg.sliding_window is None and cfg.sliding_layers() == [False] * 4, full
    cfg, _ = hf_config_to_model_config({**base, "sliding_window": 1024, "layer_types": ["sliding_attention"] * 4})
    assert cfg.sliding_window == 1024 and cfg.layer_types is None
    # transformers' Mistral ignores layer_types and slides every layer: kinds that disagree are refused.
    mixed = ["sliding_attention", "full_attention"] * 2
    with pytest.raises(UnsupportedArchitectureError, match=r"layer_types \['full_attention', 'sliding_attention'\]"):
        hf_config_to_model_config({**base, "sliding_window": 1024, "layer_types": mixed})
    with pytest.raises(UnsupportedArchitectureError, match=r"sliding_window=1024 to every layer \(all sliding_attention\)"):
        hf_config_to_model_config({**base, "sliding_window": 1024, "layer_types": ["full_attention"] * 4})
    with pytest.raises(UnsupportedArchitectureError, match="sliding_window=0: a window needs >= 1 token"):
        hf_config_to_model_config({**base, "sliding_window": 0})


def test_mistral_window_reference_applies_the_window(converted):
    """The mistral_window bar (logits <= 1e-4) discriminates: transformers' eager and sdpa attention agree with
    the imported model, and the same weights without the window differ from it by far more."""
    import transformers

    c = converted["mistral_window"]
    model, cfg, _ = build_from_checkpoint(c["ckpt"])
    assert (cfg.sliding_window, cfg.layer_types) == (4, None)
    positions = torch.arange(TOKENS.size(1)).unsqueeze(0).expand_as(TOKENS)
    with torch.no_grad():
        ours = model(TOKENS, positions, attention_mask=None)[..., :REAL_VOCAB]
    for attn in ("eager", "sdpa"):
        for window, same in ((4, True), (None, False)):
            hf = transformers.MistralForCausalLM.from_pretrained(c["hf_dir"], attn_implementation=attn,
                                                                 sliding_window=window, dtype=torch.float32).eval()
            assert (hf.config._attn_implementation, hf.config.sliding_window) == (attn, window)
            with torch.no_grad():
                diff = (ours - hf(TOKENS).logits).abs().max().item()
            assert (diff <= 1e-4) if same else (diff > 1e-2), (attn, window, diff)


def test_mistral_window_export_config_and_from_scratch_family(converted, tmp_path):
    """An imported Mistral with a window exports the config transformers reads as the source's; the same
    weights saved without a source architecture export as Mistral (window on every layer), window-free
    Llama switches as Llama; a window on some layers with Llama switches is refused before anything is written."""
    import transformers

    from caopd_megatron.checkpointing.hf import UnsupportedArchitectureError, save_megatron_checkpoint
    from caopd_megatron.checkpointing.hf.adapter import check_family_matches, infer_family
    from caopd_megatron.config.schema import ModelConfig

    c = converted["mistral_window"]
    summary = export(c["ckpt"], tmp_path / "imported")
    assert summary.architecture == "MistralForCausalLM" and "imported" in summary.architecture_from
    fields = ("architectures", "model_type", "sliding_window", "max_position_embeddings", "rope_parameters",
              "head_dim", "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps")
    source = transformers.AutoConfig.from_pretrained(c["hf_dir"]).to_dict()
    written = transformers.AutoConfig.from_pretrained(tmp_path / "imported").to_dict()
    assert {k: written[k] for k in fields} == {k: source[k] for k in fields}
    assert written["sliding_window"] == 4

    for family, expected in (("mistral_window", "MistralForCausalLM"), ("mistral", "LlamaForCausalLM")):
        model, cfg, vocab = build_from_checkpoint(converted[family]["ckpt"])
        saved = save_megatron_checkpoint(tmp_path / f"{family}_scratch", model, cfg, real_vocab_size=vocab.real)
        summary = export(saved, tmp_path / f"{family}_scratch_hf")
        assert summary.architecture == expected and "inferred" in summary.architecture_from
        hf_cfg = json.loads((tmp_path / f"{family}_scratch_hf" / "config.json").read_text())
        assert hf_cfg.get("sliding_window") == cfg.sliding_window
        hf = getattr(transformers, expected).from_pretrained(tmp_path / f"{family}_scratch_hf", dtype=torch.float32).eval()
        assert all(torch.equal(hf.state_dict()[k], v) for k, v in converted[family]["state"].items())
        with torch.no_grad():
            assert (hf(TOKENS).logits - converted[family]["logits"]).abs().max().item() == 0.0
    assert "sliding_window=4 on every layer" in export(tmp_path / "mistral_window_scratch", tmp_path / "again").architecture_from

    some_layers = ModelConfig(num_layers=2, vocab_size=REAL_VOCAB, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"])
    assert infer_family(ModelConfig(num_layers=2, vocab_size=REAL_VOCAB)).architecture == "LlamaForCausalLM"
    with pytest.raises(UnsupportedArchitectureError, match="MistralForCausalLM applies sliding_window=4 to every layer"):
        check_family_matches(infer_family(some_layers), some_layers)


def test_export_read_back_catches_a_lost_window(converted, tmp_path, monkeypatch):
    """The exporter's transformers read-back compares the window: a config written without it is refused."""
    from caopd_megatron.checkpointing.hf import ConversionError, exporter

    write = exporter.model_config_to_hf_config
    monkeypatch.setattr(exporter, "model_config_to_hf_config",
                        lambda *a, **kw: {**write(*a, **kw), "sliding_window": None})
    with pytest.raises(ConversionError, match=r"'sliding_window': \(None, 4\)"):
        export(converted["mistral_window"]["ckpt"], tmp_path / "out")


def test_unsupported_rope_and_bias_settings_are_refused(converted, tmp_path):
    from caopd_megatron.checkpointing.hf import UnsupportedArchitectureError, hf_config_to_model_config

    base = json.loads((converted["llama"]["hf_dir"] / "config.json").read_text())
    rope = dict(base["rope_parameters"], low_freq_factor=2.0)
    with pytest.raises(UnsupportedArchitectureError, match="low_freq_factor=2.0.*hard-codes"):
        hf_config_to_model_config({**base, "rope_parameters": rope})
    legacy = {k: v for k, v in base.items() if k != "rope_parameters"}
    cfg, _ = hf_config_to_model_config({**legacy, "rope_theta": 500000.0,
                                        "rope_scaling": {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert cfg.rope_scaling and cfg.rope_scaling_factor == 4.0 and cfg.rotary_base == 500000.0
    with pytest.raises(UnsupportedArchitectureError, match="yarn"):
        hf_config_to_model_config({**legacy, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedArchitectureError, match="o_proj"):
        hf_config_to_model_config({**base, "attention_bias": True})


def test_missing_and_corrupt_files_are_named(converted, tmp_path):
    from caopd_megatron.checkpointing.hf import CheckpointFileError, import_hf_checkpoint

    src = _copy_hf(converted, "llama", tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (src / shard).unlink()
    with pytest.raises(CheckpointFileError, match=shard):
        import_hf_checkpoint(src, tmp_path / "o1", show_progress=False)

    single = _copy_hf(converted, "qwen2", tmp_path)
    data = (single / "model.safetensors").read_bytes()
    (single / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointFileError, match="model.safetensors"):
        import_hf_checkpoint(single, tmp_path / "o2", show_progress=False)

    (single / "config.json").unlink()
    with pytest.raises(CheckpointFileError, match="config.json"):
        import_hf_checkpoint(single, tmp_path / "o3", show_progress=False)


def test_shape_mismatches_name_the_tensor_and_both_shapes(converted, tmp_path):
    from caopd_megatron.checkpointing.hf import ShapeMismatchError, import_hf_checkpoint

    src = _copy_hf(converted, "qwen3", tmp_path)
    _edit_json(src / "config.json", intermediate_size=80)
    with pytest.raises(ShapeMismatchError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\[80, 64\].*\[96, 64\]"):
        import_hf_checkpoint(src, tmp_path / "o", show_progress=False)

    # A checkpoint whose model config no longer matches its tensors: export names the megatron key.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted["qwen3"]["ckpt"], ckpt)
    cfg = (ckpt / "model_config.yaml").read_text().replace("ffn_hidden_size: 96", "ffn_hidden_size: 80")
    (ckpt / "model_config.yaml").write_text(cfg)
    with pytest.raises(ShapeMismatchError, match=r"linear_fc1\.weight: checkpoint \[4, 192, 64\].*\[4, 160, 64\]"):
        export(ckpt, tmp_path / "hf")
    # ... and so does loading it into a model built from that config.
    with pytest.raises(ShapeMismatchError, match=r"linear_fc1\.weight: checkpoint \[4, 192, 64\], model \[4, 160, 64\]"):
        build_from_checkpoint(ckpt)


class _Boom:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_checkpoint_metadata_that_references_code_is_refused(converted, tmp_path, capsys):
    from caopd_megatron.checkpointing.hf import CheckpointFileError, load_megatron_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted["llama"]["ckpt"], ckpt)
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointFileError, match="builtins.print.*not allowed"):
        load_megatron_checkpoint(ckpt, torch.nn.Linear(1, 1))
    with pytest.raises(CheckpointFileError, match="not allowed"):
        export(ckpt, tmp_path / "hf")
    assert "pickled code ran" not in capsys.readouterr().out


def test_output_directory_must_be_new_or_empty(converted, tmp_path):
    from caopd_megatron.checkpointing.hf import ConversionError

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="not empty"):
        export(converted["llama"]["ckpt"], tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
