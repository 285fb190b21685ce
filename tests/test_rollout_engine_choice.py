"""``rollout.engine=static|dynamic|auto`` and the dynamic engine adapter's parts that run without CUDA.

References:
- the config loader: a value outside the ``Literal`` and a negative ``rollout.pipeline_microbatches`` are
  one-line ``ConfigError``s naming the key; a session on this CPU stops at start-up on ``dynamic``;
- the choice table (CUDA x flash-attn) written out by hand;
- ``KeyedDraws`` driven the way an engine drives it (active requests in a shuffled order, a changing set of
  them per step, paused ones left out, a finished one kept one step too long) from full-forward logits:
  its generations equal ``rollout.reference.generate_without_cache``'s (token ids, ``finished``,
  log-probabilities);
- the version hooks (``rollout/dynamic_hooks.py``) on a stand-in context: the rows they hand over are the
  active requests' in the context's order, and the tokens land where the engine reads them.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from caopd_megatron.config.loader import ConfigError, load_config
from caopd_megatron.rollout.continuous import group_prompts
from caopd_megatron.rollout.dynamic import KeyedDraws, choose_engine, engine_for_this_process
from caopd_megatron.rollout.reference import full_forward_logits, generate_without_cache
from caopd_megatron.rollout.sampling import SamplingParams
from caopd_megatron.runtime.backend import BackendError
from helpers_models import REAL_VOCAB, runtime, tiny_model  # noqa: F401  (runtime is a fixture)


def test_engine_key_is_typed_and_validated_at_load():
    assert load_config((), []).rollout.engine == "static"
    assert load_config((), ["rollout.engine=auto"]).rollout.engine == "auto"
    with pytest.raises(ConfigError, match="rollout.engine") as err:
        load_config((), ["rollout.engine=vllm"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="rollout.pipeline_microbatches"):
        load_config((), ["rollout.pipeline_microbatches=-1"])


@pytest.mark.parametrize("choice, cuda, flash, expected", [
    ("static", False, False, "static"), ("static", True, True, "static"),
    ("auto", False, False, "static"), ("auto", True, False, "static"), ("auto", True, True, "dynamic"),
    ("dynamic", True, True, "dynamic"),
])
def test_engine_choice(choice, cuda, flash, expected):
    engine, reason = choose_engine(choice, cuda, flash)
    assert engine == expected and choice in reason


@pytest.mark.parametrize("cuda, flash, why", [(False, True, "needs CUDA"), (True, False, "flash-attn")])
def test_dynamic_where_it_cannot_run_is_a_one_line_error(cuda, flash, why):
    with pytest.raises(BackendError, match=why) as err:
        choose_engine("dynamic", cuda, flash)
    assert "\n" not in str(err.value) and "rollout.engine=static or auto" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_this_cpu_process_runs_static_and_refuses_dynamic_at_session_start(tmp_path, caplog):
    from caopd_megatron.pipeline.session import open_session

    caplog.set_level("INFO")
    assert engine_for_this_process("auto") == "static"
    assert "dynamic unavailable (it needs CUDA" in caplog.text
    cfg = load_config((), ["rollout.engine=dynamic", "run.lock=false"])
    with pytest.raises(BackendError, match="rollout.engine=dynamic .*needs CUDA"):
        open_session(cfg, run_dir=tmp_path / "run", parallel=False)
    assert not (tmp_path / "run" / "config.yaml").exists()  # stopped before anything was written


@pytest.fixture(scope="module")
def model(runtime):  # noqa: F811
    m, _ = tiny_model(seed=11, init_method_std=0.2)
    return m.eval()


def test_keyed_draws_driven_like_an_engine_equal_the_no_cache_sampler(model):
    prompts = [[5, 6, 7]] * 3 + [[9], [12, 1, 30, 4, 8], [12, 1, 30, 4, 8]]
    params = SamplingParams(max_new_tokens=7, temperature=1.0, top_p=0.9, seed=4)
    eos = 29
    ref = generate_without_cache(model, prompts, params, eos_id=eos, real_vocab_size=REAL_VOCAB)
    assert 0 < sum(g.finished for g in ref) < len(ref)
    draws = KeyedDraws(group_prompts(prompts, range(len(prompts)), 2), params, eos, REAL_VOCAB)
    rng = random.Random(0)
    lingering = set()
    while True:
        live = [i for i in draws.requests if not draws.done(i)]
        if not live:
            break
        active = rng.sample(live, k=max(1, len(live) - rng.randrange(2)))  # some paused this step
        active += list(lingering)  # a request the engine has not retired yet
        rng.shuffle(active)
        with torch.no_grad():
            logits = torch.stack([full_forward_logits(model, draws.requests[i].prompt + draws.requests[i].tokens)
                                  for i in active])
        draws.draw(logits, active)
        lingering = {i for i in active if draws.done(i)}
    got = draws.generations()
    for i, r in enumerate(ref):
        assert got[i].prompt_ids == prompts[i]
        assert got[i].response_ids == r.response_ids and got[i].finished == r.finished
        assert got[i].logprobs == pytest.approx(r.logprobs, abs=1e-5)


class _Recorder:
    """Stands in for ``KeyedDraws``: returns token ``100 + request id`` and records the rows it was given."""

    def __init__(self):
        self.calls = []

    def draw(self, logits, request_ids):
        self.calls.append((logits.clone(), list(request_ids)))
        return torch.tensor([100 + i for i in request_ids])


def _context():
    # 2 paused requests (ids 7, 8) first, then 3 active (ids 3, 1, 4), then unused rows.
    return SimpleNamespace(request_ids=torch.tensor([7, 8, 3, 1, 4, -1, -1]), paused_request_count=2,
                           total_request_count=5, materialize_only_last_token_logits=True)


def test_the_0_16_hook_hands_over_the_active_rows_and_writes_the_tokens():
    from caopd_megatron.rollout.dynamic_hooks import KeyedController

    controller = object.__new__(KeyedController)  # the hook only, no engine
    controller.inference_wrapped_model = SimpleNamespace(inference_context=_context())
    controller._sampled_tokens_cuda = torch.zeros(8, dtype=torch.long)
    controller.draws = _Recorder()
    logits = torch.randn(1, 3, 16)
    controller._dynamic_step_sample_logits(logits)
    (rows, ids), = controller.draws.calls
    assert ids == [3, 1, 4] and torch.equal(rows, logits[0])
    assert controller._sampled_tokens_cuda[:3].tolist() == [103, 101, 104]


def test_the_0_19_sampling_backend_hands_over_the_active_rows_and_writes_the_tokens():
    from caopd_megatron.rollout.dynamic_hooks import KeyedSampling

    sampling = KeyedSampling(_Recorder())
    logits = torch.randn(5, 16)
    out = torch.zeros(3, dtype=torch.long)
    gather = torch.tensor([4, 0, 2])
    sampling.sample_kernel(logits, 3, _context(), no_top_k=True, no_top_p=True, gather_indices=gather, output=out)
    (rows, ids), = sampling.draws.calls
    assert ids == [3, 1, 4] and torch.equal(rows, logits[gather])
    assert out.tolist() == [103, 101, 104]
