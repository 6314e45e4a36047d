import pytest

from usjepa.config import ConfigError, dump_yaml, load_config
from usjepa.errors import UserError


def test_defaults_are_the_papers_settings():
    cfg = load_config(None)
    assert (cfg.model.patch_size, cfg.model.embed_dim, cfg.model.depth) == (16, 768, 12)
    assert (cfg.predictor.depth, cfg.predictor.embed_dim) == (12, 384)
    assert cfg.mask.num_targets == 4 and cfg.mask.target_scale == (0.075, 0.125)
    assert cfg.train.loss == "smooth_l1" and cfg.teacher.layernorm_targets


def test_overrides_are_typed():
    cfg = load_config(
        "configs/demo.yaml",
        ["optim.lr=1e-4", "mask.target_scale=[0.1,0.2]", "train.total_steps=700", "run.dir=2024", "probe.seeds=[3]"],
    )
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.mask.target_scale == (0.1, 0.2)
    assert cfg.train.total_steps == 700
    assert cfg.run.dir == "2024"
    assert cfg.probe.seeds == (3,)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("data.augment.hflipp=0.1", "did you mean 'data.augment.hflip'?"),
        ("trian.total_steps=3", "did you mean 'train'?"),
        ("train.objective=sal", "did you mean 'salt'?"),
        ("train.total_steps=ten", "train.total_steps: expected int"),
        ("optim.lr.x=1", "'optim.lr' is a value, not a section"),
        ("data.image_size=65", "not a multiple of model.patch_size"),
        ("mask.target_scale=[0.3,0.1]", "mask.target_scale"),
        ("noequals", "not of the form key=value"),
    ],
)
def test_bad_settings_fail_with_a_one_line_hint(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, UserError)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  wieght_decay: 0.1\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: unknown key 'optim.wieght_decay'; did you mean 'optim.weight_decay'"
    ):
        load_config(path)


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config("configs/salt_vitb16.yaml")
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("name", ["demo.yaml", "demo_teacher.yaml", "salt_vitb16.yaml", "teacher_mae_vitb16.yaml"])
def test_shipped_configs_load(name):
    load_config(f"configs/{name}")


def test_validation_is_bounded_by_default_to_5_percent_of_the_steps_between_checkpoints():
    assert load_config(None, ["checkpoint.every_steps=250"]).val_batch_limit == 13
    assert load_config(None, ["checkpoint.every_steps=2"]).val_batch_limit == 1
    assert load_config(None, ["checkpoint.every_steps=250", "train.val_batches=0"]).val_batch_limit == 0
    assert load_config(None, ["train.val_batches=7"]).val_batch_limit == 7
    with pytest.raises(ConfigError, match="train.val_batches: must be -1"):
        load_config(None, ["train.val_batches=-2"])
