"""Checks of attnpo_train.config: defaults, YAML loading, overrides and validation."""

import dataclasses

import pytest

from attnpo_train.config import TrainConfig, load_config
from kfh_probe import SettingError, help_of


def test_defaults_match_the_method_page():
    cfg = TrainConfig()
    assert (cfg.method, cfg.estimator, cfg.group_size) == ("attnpo", "rloo", 8)
    assert (cfg.alpha_len, cfg.alpha, cfg.beta, cfg.delta, cfg.horizon) == (0.2, 2.0, 2.0, 0.0, 1000)
    assert cfg.kl_coef == 0.0
    assert cfg.pos_attenuation and cfg.neg_attenuation and cfg.use_difficulty
    assert cfg.marker == "</think>" and cfg.top_n_heads is None and not cfg.allow_finetuned


def test_every_field_declares_its_help():
    for field in dataclasses.fields(TrainConfig):
        assert len(help_of(field)) > 10, f"field {field.name} has no help"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: tlmre\nlr: 1e-5\ngroup_size: 4\nneg_attenuation: false\nmodel: /m\n")
    cfg = load_config(path, {"group_size": "6", "top_n_heads": 3})
    assert cfg.method == "tlmre"
    assert cfg.lr == 1e-5  # PyYAML reads "1e-5" as a string; it is converted
    assert cfg.group_size == 6  # the override wins and is converted from a string
    assert cfg.neg_attenuation is False
    assert cfg.top_n_heads == 3 and cfg.model == "/m"


def test_no_file_no_overrides_gives_defaults():
    assert load_config() == TrainConfig()


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == TrainConfig()


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lrr: 0.1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown config key 'lrr' \(did you mean 'lr'\?\)"):
        load_config(path)
    with pytest.raises(ValueError, match="overrides: unknown config key 'bogus'"):
        load_config(None, {"bogus": 1})


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"group_size": 1}, "group_size"),
        ({"delta": 1.5}, "delta"),
        ({"method": "ppo"}, "method"),
        ({"estimator": "gae"}, "estimator"),
        ({"kl_coef": -0.1}, "kl_coef"),
        ({"method": "tlmre", "credit": "shuffled"}, "credit"),
        ({"alpha_len": -0.1}, "alpha_len"),
        ({"top_n_heads": 0}, "top_n_heads"),
        ({"temperature": 0}, "temperature"),
        ({"marker": ""}, "marker"),
    ],
)
def test_ranges_are_validated(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, override)
    with pytest.raises(ValueError, match=message):
        TrainConfig(**override)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"delta": 1.5}, "setting 'delta' must be in [0, 1]; got 1.5"),
        ({"rhythm_top": 0.0}, "setting 'rhythm_top' must be in (0, 1]; got 0.0"),
        ({"lr": 0.0}, "setting 'lr' must be > 0; got 0.0"),
        ({"top_n_heads": 0}, "setting 'top_n_heads' must be >= 1 or null; got 0"),
        ({"estimator": "gae"}, "setting 'estimator' must be one of rloo, grpo; got 'gae'"),
        ({"grader": "judge"}, "setting 'grader' must be one of auto, math-verify, exact; got 'judge'"),
        ({"marker": ""}, "setting 'marker' must be a non-empty string; got ''"),
        ({"method": "tlmre", "credit": "oracle"},
         "setting 'credit' must be one of the method's controls ('attention'; 'attnpo' also 'shuffled' and "
         "'oracle', which replace its step scores); got 'oracle'"),
        ({"steps": None}, "setting 'steps' must be of type int, not null; got None"),
    ],
)
def test_a_broken_constraint_names_the_setting_what_it_must_be_and_the_value(override, message):
    with pytest.raises(SettingError) as caught:
        TrainConfig(**override)
    assert str(caught.value) == message


def test_there_are_no_clip_settings_since_one_optimiser_step_per_rollout_batch_never_clips():
    # the reference (NieSYsc20/AttnPO) updates once per rollout batch, as the loop does: the PPO ratio is 1
    with pytest.raises(ValueError, match="unknown config key 'clip_eps'"):
        load_config(None, {"clip_eps": 0.2})
    with pytest.raises(ValueError, match="unknown config key 'dual_clip'"):
        load_config(None, {"dual_clip": 3.0})


def test_range_error_names_the_file(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("group_size: 1\n")
    with pytest.raises(ValueError, match=r"g\.yaml: setting 'group_size' must be >= 2; got 1$"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"pos_attenuation": 1}, "bool"),
        ({"group_size": 2.5}, "int"),
        ({"group_size": True}, "int"),
        ({"lr": "fast"}, "float"),
        ({"device": 0}, "str"),
        ({"steps": None}, "null"),
    ],
)
def test_types_are_checked(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, override)


def test_a_value_of_the_wrong_type_names_its_source_and_the_setting(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("group_size: four\n")
    with pytest.raises(ValueError, match=r"t\.yaml: setting 'group_size' must be of type int; got 'four'$"):
        load_config(path)
    with pytest.raises(ValueError, match=r"^overrides: setting 'top_n_heads' must be of type int or null; got 'x'$"):
        load_config(None, {"top_n_heads": "x"})


def test_command_line_strings_become_the_fields_types():
    cfg = load_config(None, {"lr": "2e-6", "steps": "3", "kl_coef": "0", "fused_scoring": "off", "top_n_heads": "null"})
    assert cfg.lr == 2e-6 and cfg.steps == 3 and cfg.kl_coef == 0.0 and cfg.top_n_heads is None
    assert cfg.fused_scoring is False
    assert load_config(None, {"horizon": 30.0}).horizon == 30  # a whole float is an int


def test_string_booleans_and_nulls_from_the_command_line():
    cfg = load_config(None, {"use_difficulty": "False", "manifest": "none", "allow_finetuned": "yes"})
    assert cfg.use_difficulty is False and cfg.manifest is None and cfg.allow_finetuned is True
