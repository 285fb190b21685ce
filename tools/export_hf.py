#!/usr/bin/env python
"""Export a megatron-core checkpoint directory (saved under any TP/PP layout) as a Hugging Face model folder.

    python tools/export_hf.py --ckpt ckpts/student --out hf/student --dtype bfloat16

Design decisions:
- A thin command line: the logic is ``caopd_megatron.checkpointing.hf.export_hf_checkpoint``.
- One process, no GPU and no process group: the checkpoint is read chunk by chunk from disk.
- Errors the user can fix (missing/corrupt files, shape mismatches, unsupported settings) print one line
  and exit with status 2; anything else is a bug and keeps its traceback.
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
    p.add_argument("--ckpt", required=True, help="checkpoint directory (import_hf output or a saved student)")
    p.add_argument("--out", required=True, help="HF folder to create (must be new or empty)")
    p.add_argument("--dtype", choices=get_args(ParamsDtype), default="bfloat16",
                   help="dtype of the written weights (default bfloat16)")
    p.add_argument("--architecture", default=None,
                   help="HF architecture to write (default: the imported one, or inferred from the model config)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from caopd_megatron.checkpointing.hf import ConversionError, export_hf_checkpoint

    try:
        summary = export_hf_checkpoint(args.ckpt, args.out, dtype=args.dtype, architecture=args.architecture,
                                       max_shard_size=args.max_shard_size, show_progress=not args.no_progress,
                                       overwrite=args.overwrite)
    except ConversionError as exc:
        print(f"export_hf: error: {exc}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
