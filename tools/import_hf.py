#!/usr/bin/env python
"""Convert a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / OLMo-3 folder into a megatron-core checkpoint directory.

    python tools/import_hf.py --hf-dir path/to/hf_model --out ckpts/student --tp 2 --pp 1

Design decisions:
- A thin command line: the logic is ``caopd_megatron.checkpointing.hf.import_hf_checkpoint``.
- Runs as one process whatever ``--tp``/``--pp`` say: the checkpoint is layout-free and loads under any
  layout; ``--tp``/``--pp`` choose the vocabulary padding and are checked against the model.
- Errors the user can fix (bad files, unsupported model, layout) print one line and exit with status 2;
  anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from caopd_megatron.config.schema import ParamsDtype  # noqa: E402  (after the path insert)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, help="HF model folder (config.json, safetensors, tokenizer files)")
    p.add_argument("--out", required=True, help="checkpoint directory to create (must be new or empty)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size the vocabulary is padded for (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate against (default 1)")
    p.add_argument("--dtype", choices=get_args(ParamsDtype), default=None,
                   help="cast the weights (default: keep the HF dtype)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from caopd_megatron.checkpointing.hf import ConversionError, import_hf_checkpoint
    from caopd_megatron.runtime.distributed import LayoutError

    try:
        summary = import_hf_checkpoint(args.hf_dir, args.out, tensor_model_parallel_size=args.tp,
                                       pipeline_model_parallel_size=args.pp, dtype=args.dtype,
                                       make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                       show_progress=not args.no_progress, overwrite=args.overwrite)
    except (ConversionError, LayoutError) as exc:
        print(f"import_hf: error: {exc}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
