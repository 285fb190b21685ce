"""The paper's public evaluation sets in ../shared/data/caopd-eval (never copied into the repo).

Locally a checkout without the shared folder skips the tests that read them; under CI (``CI`` set), where the
folder is always beside the checkout, a missing file is a failure, so those tests can never silently vanish.
``CAOPD_EVAL_DIR`` points elsewhere (a checkout that is not beside the shared folder, e.g. a git worktree).
"""
import os
from pathlib import Path

import pytest

EVAL_DIR = Path(
    os.environ.get("CAOPD_EVAL_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "caopd-eval"
)


def real_eval_file(name: str) -> Path:
    path = EVAL_DIR / name
    if not path.is_file():
        message = f"real eval set {name} not present at {EVAL_DIR} (shared data folder absent)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
