"""Load a ``CaOPDConfig`` from YAML files and NeMo/Hydra-style command-line overrides.

Design decisions:
- OmegaConf validates keys and types against the schema; its errors become one-line ``ConfigError``s naming
  the key and its source (file or override), never a traceback from inside OmegaConf.
- Overrides use Hydra's grammar parser (``key=value``, ``+key``, ``++key``, ``~key`` = reset to default,
  lists, quoted strings, ``null``) without Hydra's app machinery; every key exists in the schema.
- Choices are ``typing.Literal`` fields. OmegaConf 2.3 cannot validate a ``Literal``, so it sees a mirror of
  the schema (``omegaconf_schema``: each ``Literal`` replaced by its values' type); after every file and
  override the typed dataclasses are rebuilt and each ``Literal`` value checked, naming key and source.
- Presets are data: YAML files shipped in ``config/presets/`` (``preset_path``), loaded like any file.
- ``save_config`` writes the fully resolved config next to every run's outputs.
"""
from __future__ import annotations

import dataclasses
import functools
import types
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence, Union, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from caopd_megatron.config.schema import ALIASES, CaOPDConfig
from caopd_megatron.config.validate import out_of_range


PRESETS_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A configuration problem the user can fix: the message names the key and the source."""


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def _read_yaml(path: Path) -> Any:
    """The YAML tree of ``path`` (None when the file is empty); a missing or malformed file is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def _merge_yaml(base: Any, path: Path) -> Any:
    loaded = _read_yaml(path)
    if loaded is None:
        return base
    loaded = _apply_aliases_to_tree(loaded, str(path))
    loaded = _teacher_model_from_student(base, loaded)
    try:
        merged = OmegaConf.merge(base, loaded)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from None
    _typed_tree(CaOPDConfig, merged, source=str(path))
    return merged


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
                default = OmegaConf.select(OmegaConf.structured(omegaconf_schema(CaOPDConfig)), key)
                OmegaConf.update(cfg, key, default, merge=False)
            else:
                OmegaConf.update(cfg, key, ov.value(), merge=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"command line '{text}': {_describe(exc)}") from None
        _typed_tree(CaOPDConfig, cfg, source=f"command line '{text}'")
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


# ---------------------------------------------------------------- Literal-typed schema <-> OmegaConf
def _validated_type(hint: Any) -> Any:
    """The annotation OmegaConf validates in place of ``hint``: a ``Literal`` becomes its values' type."""
    origin = get_origin(hint)
    if origin is Literal:
        (kind,) = {type(v) for v in get_args(hint)}
        return kind
    if origin in (Union, types.UnionType):
        return Union[tuple(_validated_type(arg) for arg in get_args(hint))]
    if dataclasses.is_dataclass(hint):
        return omegaconf_schema(hint)
    return hint


def _mirrored(value: Any) -> Any:
    """A schema dataclass instance as an instance of its ``omegaconf_schema`` mirror (other values unchanged)."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return value
    return omegaconf_schema(type(value))(**{f.name: _mirrored(getattr(value, f.name))
                                            for f in dataclasses.fields(value)})


@functools.cache
def omegaconf_schema(cls: type) -> type:
    """A dataclass with the keys, defaults and nesting of the schema dataclass ``cls`` that OmegaConf can
    validate: each ``Literal`` annotation is replaced by its values' type (``_typed`` checks the value)."""
    hints = get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            spec = dataclasses.field(default_factory=lambda make=f.default_factory: _mirrored(make()))
        else:
            spec = dataclasses.field(default=f.default)
        fields.append((f.name, _validated_type(hints[f.name]), spec))
    return dataclasses.make_dataclass(cls.__name__, fields)


def _typed_value(hint: Any, value: Any, key: str) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(hint):
            return None
        present = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(present) != 1:
            return value
        hint, origin = present[0], get_origin(present[0])
    if origin is Literal and value not in get_args(hint):
        raise ConfigError(f"key '{key}': {value!r} is not one of {', '.join(map(repr, get_args(hint)))}")
    if dataclasses.is_dataclass(hint):
        return _typed(hint, value, f"{key}.")
    return value


def _typed(cls: type, tree: dict, prefix: str = "") -> Any:
    """The schema dataclass ``cls`` built from a plain (already type-validated) tree; checks every ``Literal``."""
    hints = get_type_hints(cls)
    return cls(**{f.name: _typed_value(hints[f.name], tree[f.name], f"{prefix}{f.name}")
                  for f in dataclasses.fields(cls)})


def _typed_tree(cls: type, node: Any, source: str) -> Any:
    """``_typed`` of an OmegaConf node; a bad choice, or a section's own value check (``__post_init__``, e.g.
    DistillConfig's), names its ``source`` (a file or an override)."""
    try:
        return _typed(cls, OmegaConf.to_container(node, resolve=True))
    except ValueError as exc:  # ConfigError included
        raise ConfigError(f"{source}: {exc}") from None


def load_config(files: Iterable[str | Path] = (), overrides: Sequence[str] = ()) -> CaOPDConfig:
    """Defaults <- each YAML file in order <- command-line overrides; returns a typed ``CaOPDConfig``."""
    cfg = OmegaConf.structured(omegaconf_schema(CaOPDConfig))
    for path in files:
        cfg = _merge_yaml(cfg, Path(path))
    cfg = _apply_overrides(cfg, list(overrides))
    obj = _typed_tree(CaOPDConfig, cfg, source="config")
    for problem in out_of_range(obj):  # value ranges: config/validate.py
        raise ConfigError(problem)
    return obj


def preset_path(name: str) -> Path:
    """The YAML preset ``name`` shipped in the package (``config/presets/<name>.yaml``)."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset '{name}'; shipped presets: {', '.join(known)}")
    return path


def load_section(cls: type, path: str | Path) -> Any:
    """One schema dataclass (e.g. a checkpoint's ``ModelConfig``) from a YAML file holding its keys."""
    path = Path(path)
    loaded = _read_yaml(path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(omegaconf_schema(cls)), loaded or {})
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from None
    return _typed_tree(cls, merged, source=str(path))


def to_yaml(cfg: Any) -> str:
    """Any schema dataclass (``CaOPDConfig`` or one section) as YAML, every key written."""
    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))


def save_config(cfg: CaOPDConfig, path: str | Path) -> Path:
    """Write the resolved config (every key, defaults included) as YAML; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
    return path
