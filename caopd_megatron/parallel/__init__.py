"""Pipeline- and data-parallel machinery of the distillation step (tensor parallelism lives in the losses).

Design decisions (the full note is ``design.md`` beside this file):
- ``data_parallel``: megatron-core's ``DistributedDataParallel`` wraps the student whenever PP > 1 or DP > 1;
  ``needs_parallel_path`` is the single switch every phase consults, so TP-only and single-process runs keep
  the plain path (and its tests) unchanged.
- ``schedule``: the micro-batch forward/backward runs on megatron-core's own pipeline schedules
  (``get_forward_backward_func``); the teacher runs first, forward-only, keeping its final hidden states at
  response positions per micro-batch, which the student's last stage projects in the loss.
- ``steps``: the distillation and supervised steps built on the schedule (DP slicing, sequence-count
  weighting, one gradient finalisation per optimizer step).
- ``distributed_optimizer``: megatron-core's ``DistributedOptimizer`` (``parallel.use_distributed_optimizer``):
  AdamW state sharded over DP, reduce-scattered gradients, all-gathered parameters, and its checkpoints.
- ``generation``: stage-by-stage decoding for the sampler under PP (hidden states p2p, tokens broadcast).
- ``state``: describe, gather and load parameter shards by their global names (tests, tools).
"""
