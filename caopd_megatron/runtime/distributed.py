"""Start torch.distributed and megatron-core's parallel state from torchrun, Slurm or nothing at all.

Design decisions:
- One entry point, ``initialize``, reads the launcher's environment: torchrun (RANK/WORLD_SIZE/LOCAL_RANK),
  Slurm (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), or neither (a single process, e.g. the laptop demo).
  MASTER_ADDR/MASTER_PORT come from the environment; a single process without them uses a free local port.
- Under Slurm without MASTER_ADDR/MASTER_PORT: the head node is the first host of the step's nodelist (the
  compact form is expanded here, no ``scontrol`` needed) resolved to an address, and the port is derived from
  the job and step ids so two jobs sharing a node do not collide; both are logged.
- nccl with CUDA, gloo without, unless the config names one.
- Layout errors (world size not a multiple of TP x PP) are raised here, before megatron-core asserts.
- ``process_groups`` hands the groups out once as a ``ProcessGroupCollection``: this is the one module that
  reads megatron's global parallel state (checkpointing aside).
- ``teardown`` destroys model-parallel state and the process group so tests can run several jobs in one process.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import sys
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from caopd_megatron.config.schema import ParallelConfig

log = logging.getLogger(__name__)


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message names the numbers."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torchrun | slurm | single
    rendezvous: str = ""  # where the process group met (address, port and where they came from), for the log


def read_env() -> DistEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "slurm")
    return DistEnv(0, 1, 0, "single")


@dataclass(frozen=True)
class Rendezvous:
    addr: str
    port: int
    origin: str  # where the two came from, for the log


# Derived ports: PORT_BASE + (job id % PORT_JOBS) * PORT_STEPS + (step id % PORT_STEPS), below Linux's
# ephemeral range (32768+) so an outgoing connection cannot already hold one.
PORT_BASE, PORT_JOBS, PORT_STEPS = 20000, 750, 16


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list -> host names: ``gpu[001-003,7],login1`` -> gpu001 gpu002 gpu003 gpu7 login1.

    Zero padding follows the range's first bound, as ``scontrol show hostnames`` does. Nested brackets in one
    name (``rack[1-2]-n[1-2]``) are expanded as a product.
    """
    hosts: list[str] = []
    for item in re.findall(r"(?:[^,\[]+|\[[^\]]*\])+", nodelist):
        names = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            parts = [literal]
            if ranges:
                parts = []
                for r in ranges.split(","):
                    lo, _, hi = r.partition("-")
                    parts += [f"{literal}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
            names = [n + p for n in names for p in parts]
        hosts += [n for n in names if n]
    return hosts


def derived_port(job_id: int, step_id: int) -> int:
    return PORT_BASE + (job_id % PORT_JOBS) * PORT_STEPS + step_id % PORT_STEPS


def slurm_rendezvous(env: dict[str, str]) -> Rendezvous:
    """Head node address and port for a Slurm step; MASTER_ADDR / MASTER_PORT, when set, win."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    if "MASTER_ADDR" in env:
        addr, addr_origin = env["MASTER_ADDR"], "MASTER_ADDR"
    else:
        hosts = expand_nodelist(nodelist)
        if not hosts:
            raise LayoutError("Slurm launch without MASTER_ADDR and without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST")
        try:
            addr = socket.gethostbyname(hosts[0])
        except OSError:
            addr = hosts[0]
        addr_origin = f"head node {hosts[0]} of {nodelist}"
    if "MASTER_PORT" in env:
        port, port_origin = int(env["MASTER_PORT"]), "MASTER_PORT"
    else:
        job_text, step_text = env.get("SLURM_JOB_ID", ""), env.get("SLURM_STEP_ID", "")
        job = int(job_text) if job_text.isdigit() else 0
        step = int(step_text) if step_text.isdigit() else 0  # the batch step has none
        restart_text = env.get("SLURM_RESTART_COUNT", "")
        restart = int(restart_text) if restart_text.isdigit() else 0
        # A requeued attempt keeps its job id: the restart count moves it off the port its predecessor may
        # still hold while that attempt's processes exit.
        port = derived_port(job, step + restart)
        port_origin = f"derived from job {job} step {step}" + (f" restart {restart}" if restart else "")
    return Rendezvous(addr, port, f"{addr_origin}; port {port_origin}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_layout(world_size: int | None, parallel: ParallelConfig, num_layers: int, num_heads: int,
                 num_query_groups: int | None, what: str = "model") -> None:
    """Raise ``LayoutError`` naming the numbers if this model cannot be split by this layout.

    ``what`` names the model in the message (``model`` for the student, ``teacher.model`` for a separate
    teacher, which shares the student's TP/PP/DP layout and so must split the same way). ``world_size``
    None skips the world-size check (the model's own numbers only).
    """
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise LayoutError(f"parallel sizes must be >= 1 (tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp})")
    if num_heads % tp:
        raise LayoutError(f"{what}.num_attention_heads={num_heads} is not divisible by tensor_model_parallel_size={tp}")
    groups = num_query_groups or num_heads
    if groups % tp:
        raise LayoutError(f"{what}.num_query_groups={groups} is not divisible by tensor_model_parallel_size={tp}")
    if num_layers % pp:
        raise LayoutError(f"{what}.num_layers={num_layers} is not divisible by pipeline_model_parallel_size={pp}")
    if world_size is not None and world_size % (tp * pp):
        raise LayoutError(f"world size {world_size} is not a multiple of TP x PP = {tp} x {pp} = {tp * pp}")


def initialize(parallel: ParallelConfig, seed: int) -> DistEnv:
    """Initialise the default process group (if needed) and megatron-core's TP/PP/DP groups; seed the RNGs."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    env = read_env()
    if not dist.is_initialized():
        backend = parallel.backend if parallel.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
        init_method = None
        if env.launcher == "single":
            # A private rendezvous on a free local port, not written into os.environ: child processes (a test
            # launching `caopd` in a subprocess, say) must not inherit a port this process already listens on.
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        elif env.launcher == "slurm":
            rdv = slurm_rendezvous(dict(os.environ))
            env = replace(env, rendezvous=f"MASTER_ADDR={rdv.addr} MASTER_PORT={rdv.port} ({rdv.origin})")
            init_method = f"tcp://{rdv.addr}:{rdv.port}"
        elif "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise LayoutError(f"{env.launcher} launch with {env.world_size} ranks needs MASTER_ADDR and MASTER_PORT")
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=init_method, rank=env.rank, world_size=env.world_size)
    world = dist.get_world_size()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        )
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    log.info("distributed: launcher=%s world=%d TP=%d PP=%d DP=%d backend=%s", env.launcher, world,
             parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
             parallel_state.get_data_parallel_world_size(), dist.get_backend())
    return env


def process_groups():
    """The job's process groups as megatron-core's ``ProcessGroupCollection`` (TP, PP, DP, model-parallel,
    embedding, ...), read once from the state ``initialize`` set up. This module is the only one that
    consults megatron's global parallel state; everything else gets the groups passed down (models keep
    them as ``pg_collection``)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def teardown() -> None:
    # Only if megatron-core was imported successfully: teardown must not re-raise a failed import.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def current_rank() -> int:
    """The rank in the process group, or, before it exists (or in a single-task phase), the launcher's."""
    return dist.get_rank() if dist.is_initialized() else read_env().rank


def is_main_rank() -> bool:
    return current_rank() == 0
