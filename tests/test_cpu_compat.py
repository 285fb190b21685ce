"""The CPU shims are version-aware: nothing to patch is said at DEBUG, a failure names both versions.

Reference: stand-in shims with known outcomes (patched / nothing to patch / raising), and the shims' own
bookkeeping on the installed megatron-core: on the release they were written for, every shim patches.
"""
from __future__ import annotations

import logging

import pytest
from helpers_models import runtime  # noqa: F401  (a fixture)

from caopd_megatron.runtime import cpu_compat
from caopd_megatron.runtime.cpu_compat import CpuShimError, Shim, apply_shims


def test_nothing_to_patch_is_logged_at_debug_and_leaves_the_shim_inactive(caplog):
    with caplog.at_level(logging.DEBUG, logger=cpu_compat.__name__):
        active = apply_shims((Shim("patches", lambda: True), Shim("finds-nothing", lambda: False)))
    assert active == ["patches"]
    (record,) = [r for r in caplog.records if "finds-nothing" in r.getMessage()]
    assert record.levelno == logging.DEBUG
    message = record.getMessage()
    assert "nothing to patch" in message and cpu_compat.WRITTEN_FOR in message
    assert cpu_compat.megatron_version() in message


def test_a_failing_shim_names_the_version_it_was_written_for():
    def broken() -> bool:
        raise AttributeError("module has no attribute 'gone'")

    with pytest.raises(CpuShimError) as info:
        apply_shims((Shim("patches", lambda: True), Shim("broken-one", broken)))
    msg = str(info.value)
    assert "'broken-one'" in msg and f"written for megatron-core {cpu_compat.WRITTEN_FOR}" in msg
    assert f"failed on megatron-core {cpu_compat.megatron_version()}" in msg and "no attribute 'gone'" in msg


def test_absent_module_is_nothing_to_patch_but_a_broken_import_is_an_error(tmp_path, monkeypatch):
    assert cpu_compat.import_if_present("megatron.core.no_such_module_here") is None
    (tmp_path / "caopd_broken_probe.py").write_text("import no_such_dependency_of_the_probe\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError):
        cpu_compat.import_if_present("caopd_broken_probe")


def test_shims_on_the_installed_megatron_core(runtime):  # noqa: F811
    active = cpu_compat.activate()
    names = [s.name for s in cpu_compat.SHIMS]
    assert active and set(active) <= set(names)
    if cpu_compat.megatron_version() == cpu_compat.WRITTEN_FOR:
        assert active == names  # written against this release: every shim finds its target
