import pytest

from canao.config import PROFILES, ConfigError, config_hash
from canao.profiles import load_config
from canao.qa.config import TeacherConfig


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_loads(profile):
    cfg = load_config("teacher", profile)
    assert isinstance(cfg, TeacherConfig)


def test_overrides_reach_nested_sections_and_parse_yaml_types():
    cfg = load_config("teacher", "tiny", overrides=["train.epochs=3", "features.max_seq_len=96", "train.bf16=true"])
    assert cfg.train.epochs == 3.0 and isinstance(cfg.train.epochs, float)
    assert cfg.features.max_seq_len == 96
    assert cfg.train.bf16 is True
    assert config_hash(cfg) != config_hash(load_config("teacher", "tiny"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "train.epoch: unknown key"),
        ("trian.epochs=3", "trian: unknown key"),
        ("train.batch_size=big", "train.batch_size: expected int, got 'big'"),
        ("train.batch_size=1.5", "train.batch_size: expected int, got 1.5"),
        ("init=bert-large", "init: must be 'minilm' or 'random'"),
        ("features.doc_stride=100", "features.doc_stride: must be in [0, max_seq_len/2)"),
        ("train", "override 'train': expected key=value"),
        ("seed.x=1", "override seed.x: seed is not a section"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("teacher", "tiny", overrides=[override])
    assert message in str(err.value)


def test_bad_files_and_names(tmp_path):
    with pytest.raises(ConfigError, match="profile: unknown 'huge'"):
        load_config("teacher", "huge")
    with pytest.raises(ConfigError, match="stage: unknown 'nope'"):
        load_config("nope", "tiny")
    path = tmp_path / "teacher.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="teacher.yaml: not valid YAML"):
        load_config("teacher", file=path)
    path.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="teacher.yaml: train: expected a mapping"):
        load_config("teacher", file=path)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config("teacher", file=tmp_path / "missing.yaml")


def test_exponent_floats_without_a_dot_are_floats():
    assert load_config("teacher", "tiny", overrides=["train.learning_rate=1e-4"]).train.learning_rate == 1e-4
    with pytest.raises(ConfigError, match="train.learning_rate: expected float, got 'fast'"):
        load_config("teacher", "tiny", overrides=["train.learning_rate=fast"])
