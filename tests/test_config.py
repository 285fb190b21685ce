"""Checks ``config/loader.py`` against the dataclass defaults of ``config/schema.py`` and hand-written YAML.

Reference: the expected values are written out by hand in each test (defaults come from constructing the
plain dataclasses, which is independent of OmegaConf); errors must be ``ConfigError`` whose message names
the offending key, and the YAML file for file errors. save_config -> load_config must round-trip.
Every file in ``examples/configs/`` loads; the demo example equals the packaged demo preset, which equals
the dataclass defaults plus its two hand-listed choices. Choices are found from the schema's ``Literal``
annotations: each allowed value loads, any other fails naming the key.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from caopd_megatron.cli import phases
from caopd_megatron.cli.main import main as cli_main
from caopd_megatron.config.loader import ConfigError, load_config, load_section, preset_path, save_config, to_yaml
from caopd_megatron.config.schema import CaOPDConfig, ModelConfig, ParallelConfig


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- defaults, files, overrides
def test_defaults_equal_the_dataclass_defaults():
    cfg = load_config()
    assert isinstance(cfg, CaOPDConfig)
    assert cfg == CaOPDConfig()
    # a few values spelled out, so a silently changed default in the loader path is caught
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 128 and cfg.model.ffn_hidden_size == 384
    assert cfg.parallel == ParallelConfig(1, 1, False, "auto")
    assert cfg.teacher.model is None and cfg.model.fp8 is None
    assert cfg.distill.loss == "reverse_kl" and cfg.calibration.precision == 1
    assert isinstance(cfg.model, ModelConfig)  # typed objects, not OmegaConf containers


def test_yaml_files_merge_in_order(tmp_path):
    a = write(tmp_path, "a.yaml", "model:\n  num_layers: 7\n  hidden_size: 96\ndistill:\n  loss: jsd\n  beta: 0.25\n")
    b = write(tmp_path, "b.yaml", "model:\n  hidden_size: 64\nrollout:\n  temperature: 0.5\n")
    cfg = load_config([a, b])
    assert cfg.model.num_layers == 7  # from a, untouched by b
    assert cfg.model.hidden_size == 64  # b wins over a
    assert cfg.distill.loss == "jsd" and cfg.distill.beta == 0.25
    assert cfg.rollout.temperature == 0.5
    assert cfg.model.num_attention_heads == 4  # untouched default
    assert load_config([b, a]).model.hidden_size == 96  # order matters
    # an empty file changes nothing
    assert load_config([write(tmp_path, "empty.yaml", "")]) == CaOPDConfig()


def test_overrides_apply_after_files(tmp_path):
    a = write(tmp_path, "a.yaml", "model:\n  num_layers: 7\n")
    cfg = load_config([a], ["model.num_layers=9", "optim.lr=1e-5", "calibration.rewrite=false",
                            "data.student_template='Q: {question} ->'", "run.output_dir=/tmp/some run"])
    assert cfg.model.num_layers == 9
    assert cfg.optim.lr == 1e-5
    assert cfg.calibration.rewrite is False
    assert cfg.data.student_template == "Q: {question} ->"
    assert cfg.run.output_dir == "/tmp/some run"


def test_override_int_to_float_field_is_coerced():
    cfg = load_config(overrides=["distill.beta=1", "model.rotary_base=500000"])
    assert cfg.distill.beta == 1.0 and isinstance(cfg.distill.beta, float)
    assert cfg.model.rotary_base == 500000.0 and isinstance(cfg.model.rotary_base, float)


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_plus_prefixes_set_existing_keys(prefix):
    assert load_config(overrides=[f"{prefix}model.num_layers=5"]).model.num_layers == 5


def test_tilde_resets_to_schema_default(tmp_path):
    assert load_config(overrides=["model.num_layers=5", "~model.num_layers"]).model.num_layers == 3
    # also resets a value that came from a file (the default is the schema's, not the file's)
    a = write(tmp_path, "a.yaml", "model:\n  hidden_size: 64\n")
    assert load_config([a], ["~model.hidden_size"]).model.hidden_size == 128
    # an Optional key resets to None
    assert load_config(overrides=["model.fp8=e4m3", "~model.fp8"]).model.fp8 is None


def test_null_and_list_values():
    cfg = load_config(overrides=["model.num_query_groups=2", "model.num_query_groups=null",
                                 "calibration.note_template=null"])
    assert cfg.model.num_query_groups is None and cfg.calibration.note_template is None
    with pytest.raises(ConfigError, match=r"model\.num_layers"):
        load_config(overrides=["model.num_layers=null"])  # not Optional
    with pytest.raises(ConfigError, match=r"run\.threads"):
        load_config(overrides=["run.threads=[1,2]"])  # a list is not an int


def test_nemo_alias_lands_in_parallel(tmp_path):
    cfg = load_config(overrides=["model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=4",
                                 "model.sequence_parallel=true"])
    assert cfg.parallel == ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=4,
                                          sequence_parallel=True, backend="auto")
    assert not hasattr(cfg.model, "tensor_model_parallel_size")
    # the same aliases in a YAML file
    a = write(tmp_path, "a.yaml", "model:\n  num_layers: 4\n  tensor_model_parallel_size: 8\n")
    cfg = load_config([a])
    assert cfg.parallel.tensor_model_parallel_size == 8 and cfg.model.num_layers == 4


def test_teacher_model_override_starts_from_the_student_model():
    cfg = load_config(overrides=["model.hidden_size=64", "model.num_query_groups=2", "teacher.mode=separate",
                                 "teacher.model.num_layers=2"])
    assert cfg.teacher.model is not None
    expected = dataclasses.replace(cfg.model, num_layers=2)
    assert cfg.teacher.model == expected
    assert cfg.teacher.model.hidden_size == 64 and cfg.teacher.model.num_query_groups == 2
    assert cfg.model.num_layers == 3  # the student is untouched
    # a second teacher.model override changes only its key
    cfg = load_config(overrides=["teacher.model.num_layers=2", "teacher.model.hidden_size=256"])
    assert cfg.teacher.model == dataclasses.replace(ModelConfig(), num_layers=2, hidden_size=256)
    assert load_config().teacher.model is None


# ---------------------------------------------------------------- errors name the key (and the file)
@pytest.mark.parametrize("override, key", [
    ("model.nope=1", "model.nope"),
    ("nosection.x=1", "nosection.x"),
    ("+model.nope=1", "model.nope"),
    ("teacher.model.nope=1", "teacher.model.nope"),
])
def test_unknown_override_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert f"'{key}'" in str(info.value)
    assert "command line" in str(info.value)


def test_unknown_key_lists_known_keys_of_the_section():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["distill.los=jsd"])
    assert "'distill.los'" in str(info.value) and "loss" in str(info.value) and "micro_batch_size" in str(info.value)


@pytest.mark.parametrize("override, key", [
    ("model.num_layers=abc", "model.num_layers"),
    ("calibration.rewrite=maybe", "calibration.rewrite"),
    ("optim.lr=fast", "optim.lr"),
])
def test_wrong_type_override(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(overrides=[override])


@pytest.mark.parametrize("override, key", [
    ("distill.loss=kl", "distill.loss"),
    ("teacher.mode=student", "teacher.mode"),
    ("model.params_dtype=float64", "model.params_dtype"),
    ("model.fp8=e5m2", "model.fp8"),
    ("logging.level=info", "logging.level"),
])
def test_bad_choice(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert f"'{key}'" in str(info.value)
    assert repr(override.split("=")[1]) in str(info.value)  # the offending value is shown


@pytest.mark.parametrize("override", ["model.num_layers", "model.num_layers==", "model.num_layers=[1,"])
def test_unparsable_override(override):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert "cannot parse override" in str(info.value) and override in str(info.value)


@pytest.mark.parametrize("text, key", [
    ("model:\n  nope: 1\n", "model.nope"),
    ("nosection:\n  x: 1\n", "nosection"),
    ("model:\n  num_layers: abc\n", "model.num_layers"),
    ("calibration:\n  rewrite: maybe\n", "calibration.rewrite"),
])
def test_yaml_key_and_type_errors_name_file_and_key(tmp_path, text, key):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config([path])
    msg = str(info.value)
    assert str(path) in msg and f"'{key}'" in msg


def test_yaml_bad_choice_names_the_key(tmp_path):
    path = write(tmp_path, "bad.yaml", "distill:\n  loss: kl\n")
    with pytest.raises(ConfigError, match=r"'distill\.loss'"):
        load_config([path])


@pytest.mark.parametrize("text, fragment", [
    ("model: [1, 2\n", "not valid YAML"),
    ("- 1\n- 2\n", "mapping"),
])
def test_malformed_yaml_names_the_file(tmp_path, text, fragment):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config([path])
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config([path])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- save / load round trip
def test_save_load_round_trip(tmp_path):
    cfg = load_config(overrides=[
        "model.hidden_size=64", "model.fp8=e4m3", "model.num_query_groups=2", "teacher.mode=separate",
        "teacher.model.num_layers=2", "teacher.checkpoint=/ckpt/teacher", "calibration.note_template=null",
        "data.teacher_template='R: {demonstration} {note} Q {question} ='", "optim.lr=1.5e-5",
        "model.tensor_model_parallel_size=2", "run.output_dir=/tmp/a b", "distill.loss=jsd",
    ])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path == tmp_path / "run" / "config.yaml" and path.is_file()
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temp file
    back = load_config([path])
    assert back == cfg
    assert back.teacher.model == dataclasses.replace(cfg.model, num_layers=2)
    assert back.parallel.tensor_model_parallel_size == 2 and back.optim.lr == 1.5e-5
    # every key is written, defaults included
    text = path.read_text()
    for f in dataclasses.fields(CaOPDConfig()):
        assert f"{f.name}:" in text
    assert "make_vocab_size_divisible_by: 128" in text
    assert to_yaml(back) == text


def test_save_load_round_trip_of_defaults(tmp_path):
    path = save_config(CaOPDConfig(), tmp_path / "c.yaml")
    assert load_config([path]) == CaOPDConfig()


# ---------------------------------------------------------------- shipped configs and presets
EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"demo.yaml", "caopd_70b.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_loads(path):
    cfg = load_config([path])
    assert isinstance(cfg, CaOPDConfig) and cfg != CaOPDConfig()


def test_demo_preset_is_the_defaults_plus_its_two_choices():
    preset = load_config([preset_path("demo")])
    expected = CaOPDConfig()
    expected.teacher.replay_fraction = 0.25
    expected.distill.grad_clip = 0.0
    assert preset == expected


def test_demo_example_resolves_to_the_packaged_preset():
    (demo,) = [p for p in EXAMPLES if p.name == "demo.yaml"]
    assert load_config([demo]) == load_config([preset_path("demo")])


def test_unknown_preset_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*demo"):
        preset_path("nope")


def test_caopd_demo_loads_the_preset_then_user_files_then_overrides(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(phases, "cmd_demo", lambda cfg, args: seen.append(cfg))
    assert cli_main(["demo"]) == 0
    assert seen[-1] == load_config([preset_path("demo")])
    user = write(tmp_path, "u.yaml", "teacher:\n  mode: ema\n")
    assert cli_main(["demo", "-c", str(user), "distill.grad_clip=0.5"]) == 0
    assert seen[-1].teacher.mode == "ema" and seen[-1].distill.grad_clip == 0.5
    # the preset is a `demo` choice only
    monkeypatch.setattr(phases, "cmd_evaluate", lambda cfg, args: seen.append(cfg))
    assert cli_main(["evaluate"]) == 0 and seen[-1] == CaOPDConfig()


# ---------------------------------------------------------------- choices come from the Literal types
def literal_fields():
    """(key, allowed values) of every ``Literal`` field of the schema, found from the annotations."""
    out = []
    for section in dataclasses.fields(CaOPDConfig):
        cls = type(getattr(CaOPDConfig(), section.name))
        for f, hint in typing.get_type_hints(cls).items():
            args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            if typing.get_origin(hint) is typing.Literal or typing.get_origin(args[0]) is typing.Literal:
                allowed = typing.get_args(hint if typing.get_origin(hint) is typing.Literal else args[0])
                out.append((f"{section.name}.{f}", allowed))
    return out


def test_the_schema_types_its_choices():
    keys = dict(literal_fields())
    assert keys["distill.loss"] == ("reverse_kl", "forward_kl", "jsd", "mixed", "vopd")
    assert keys["model.params_dtype"] == ("float32", "bfloat16", "float16")
    assert {"teacher.mode", "parallel.backend", "optim.schedule", "logging.level", "model.fp8"} <= set(keys)


@pytest.mark.parametrize("key, allowed", literal_fields())
def test_every_choice_loads_and_others_fail(key, allowed):
    section, name = key.split(".")
    for value in allowed:
        assert getattr(getattr(load_config(overrides=[f"{key}={value}"]), section), name) == value
    with pytest.raises(ConfigError, match=f"'{key}'.*'not_a_choice' is not one of"):
        load_config(overrides=[f"{key}=not_a_choice"])


def test_bad_choice_in_teacher_model_and_in_a_file_names_key_and_source(tmp_path):
    with pytest.raises(ConfigError, match=r"'teacher\.model\.params_dtype'"):
        load_config(overrides=["teacher.model.params_dtype=float64"])
    path = write(tmp_path, "bad.yaml", "optim:\n  schedule: linear\n")
    with pytest.raises(ConfigError) as info:
        load_config([path])
    assert str(path) in str(info.value) and "'optim.schedule'" in str(info.value)


def test_load_section_reads_one_dataclass(tmp_path):
    path = write(tmp_path, "m.yaml", "num_layers: 5\nparams_dtype: bfloat16\n")
    assert load_section(ModelConfig, path) == ModelConfig(num_layers=5, params_dtype="bfloat16")
    assert load_section(ModelConfig, write(tmp_path, "m2.yaml", to_yaml(ModelConfig(fp8="hybrid")))) == \
        ModelConfig(fp8="hybrid")
    with pytest.raises(ConfigError, match=r"m3\.yaml.*'params_dtype'"):
        load_section(ModelConfig, write(tmp_path, "m3.yaml", "params_dtype: float64\n"))
