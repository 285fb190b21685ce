"""Process-group plumbing under the training step: DDP, the distributed optimizer, decoding, shard utilities.

Design decisions (the full note is ``docs/design.md``):
- Every function takes the job's process groups (megatron's ``ProcessGroupCollection``, built once by
  ``runtime.distributed.process_groups``), mostly through the model that was built with them
  (``data_parallel.model_groups``); nothing here reads megatron's global parallel state.
- ``data_parallel``: megatron-core DDP when PP > 1, DP > 1 or gradients are TP-partial (``needs_ddp``);
  gradient finalisation once per optimizer step; DP slicing and gathers.
- ``distributed_optimizer``: megatron-core's ``DistributedOptimizer`` (``parallel.use_distributed_optimizer``).
- ``generation``: stage-by-stage decoding for the sampler under PP (hidden states p2p, tokens broadcast).
- ``state``: describe, gather and load parameter shards by their global names (tests, tools).
- The step itself (one for every layout) lives above, in ``distill/step.py``.
"""
