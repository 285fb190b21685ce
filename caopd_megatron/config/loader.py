"""Load a ``CaOPDConfig`` from YAML files and NeMo/Hydra-style command-line overrides.

Design decisions:
- OmegaConf structured configs validate keys and types against the dataclasses in ``schema.py``; we wrap
  its errors into ``ConfigError`` messages that name the key and where it came from (file or command line),
  because a traceback from deep inside OmegaConf is not an error message.
- Overrides use Hydra's own grammar parser (``key=value``, ``+key=value``, ``++key=value``, ``~key``,
  lists, quoted strings, ``null``), without Hydra's app machinery. Since every key exists in the schema,
  ``+key`` and ``++key`` simply set it, and ``~key`` resets it to its default.
- ``CHOICES`` are checked after merging, so a typo in ``distill.loss`` fails at start-up, not mid-run.
- ``save_config`` writes the fully resolved config next to every run's outputs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from caopd_megatron.config.schema import ALIASES, CHOICES, CaOPDConfig


class ConfigError(ValueError):
    """A configuration problem the user can fix: the message names the key and the source."""


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def _merge_yaml(base: Any, path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is None:
        return base
    loaded = _apply_aliases_to_tree(loaded, str(path))
    loaded = _teacher_model_from_student(base, loaded)
    try:
        return OmegaConf.merge(base, loaded)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from None


def _apply_aliases_to_tree(node: Any, source: str) -> Any:
    """Move NeMo-style ``model.tensor_model_parallel_size`` keys of a YAML tree to their ``parallel`` home."""
    container = OmegaConf.to_container(node)
    if not isinstance(container, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    for alias, target in ALIASES.items():
        section, key = alias.split(".")
        if isinstance(container.get(section), dict) and key in container[section]:
            value = container[section].pop(key)
            tsec, tkey = target.split(".")
            container.setdefault(tsec, {})[tkey] = value
    return OmegaConf.create(container)


def _teacher_model_from_student(base: Any, loaded: Any) -> Any:
    """A YAML ``teacher.model`` lists what differs from the student: fill the rest from the student's model.

    The student's model is the one in effect after this file (earlier files + this file's ``model``), the same
    rule as on the command line, where ``teacher.model.*`` starts from the student's current ``model``.
    """
    container = OmegaConf.to_container(loaded)
    teacher = container.get("teacher") if isinstance(container, dict) else None
    if not isinstance(teacher, dict) or not isinstance(teacher.get("model"), dict):
        return loaded
    student = OmegaConf.to_container(base.model)
    if isinstance(container.get("model"), dict):
        student.update(container["model"])
    existing = base.teacher.model
    start = OmegaConf.to_container(existing) if existing is not None else student
    teacher["model"] = {**start, **teacher["model"]}
    return OmegaConf.create(container)


def _apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for text in overrides:
        try:
            (ov,) = parser.parse_overrides([text])
        except HydraException as exc:
            raise ConfigError(f"command line: cannot parse override '{text}': {exc}") from None
        key = ALIASES.get(ov.key_or_group, ov.key_or_group)
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__" and not _is_optional_section_key(key):
            raise ConfigError(f"command line: unknown key '{key}' (from '{text}'); "
                              f"known keys of this section: {', '.join(_section_keys(key))}")
        if _is_optional_section_key(key) and cfg.teacher.model is None:
            # A separate teacher starts from the student's architecture; overrides then change what differs.
            cfg.teacher.model = OmegaConf.structured(OmegaConf.to_object(cfg.model))
        try:
            if ov.is_delete():
                default = OmegaConf.select(OmegaConf.structured(CaOPDConfig), key)
                OmegaConf.update(cfg, key, default, merge=False)
            else:
                OmegaConf.update(cfg, key, ov.value(), merge=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"command line '{text}': {_describe(exc)}") from None
    return cfg


def _is_optional_section_key(key: str) -> bool:
    # teacher.model.* is an Optional[ModelConfig] that is None until set.
    return key.startswith("teacher.model.") and key.split(".")[-1] in {f.name for f in dataclasses.fields(
        CaOPDConfig().model)}


def _section_keys(key: str) -> list[str]:
    section = key.split(".")[0]
    node = getattr(CaOPDConfig(), section, None)
    if node is None or not dataclasses.is_dataclass(node):
        return [f.name for f in dataclasses.fields(CaOPDConfig)]
    return [f.name for f in dataclasses.fields(node)]


def _check_choices(cfg: CaOPDConfig) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"key '{key}': {value!r} is not one of {', '.join(map(repr, allowed))}")


def load_config(files: Iterable[str | Path] = (), overrides: Sequence[str] = ()) -> CaOPDConfig:
    """Defaults <- each YAML file in order <- command-line overrides; returns a typed ``CaOPDConfig``."""
    cfg = OmegaConf.structured(CaOPDConfig)
    for path in files:
        cfg = _merge_yaml(cfg, Path(path))
    cfg = _apply_overrides(cfg, list(overrides))
    try:
        obj = OmegaConf.to_object(cfg)
    except ValueError as exc:  # a section's own value check (``__post_init__``), e.g. DistillConfig's
        raise ConfigError(str(exc)) from None
    assert isinstance(obj, CaOPDConfig)
    _check_choices(obj)
    return obj


def to_yaml(cfg: CaOPDConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: CaOPDConfig, path: str | Path) -> Path:
    """Write the resolved config (every key, defaults included) as YAML; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
    return path
