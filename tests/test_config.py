from dataclasses import dataclass, field

import pytest
import yaml

from usjepa import cli
from usjepa.config import ConfigError, StrictLoader, dump_yaml, load_config, load_typed
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
        ("train.total_steps=ten", "override train.total_steps=ten: expected int"),
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


def _train_error(capsys, *argv) -> str:
    """`usjepa train ARGV` in-process: it must fail with exit status 2 and one line on stderr."""
    assert cli.main(["train", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  # and another\n"])
def test_an_empty_config_file_is_an_error_not_the_default_model(tmp_path, capsys, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert _train_error(capsys, path) == (
        f"usjepa train: error: config file '{path}' is empty; write the settings to change, "
        "as in configs/demo.yaml ('{}' for all the defaults)"
    )


def test_an_explicitly_empty_mapping_still_means_the_defaults(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text("{}  # all the defaults\n")
    assert load_config(path) == load_config(None)


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("optim:\n  lr: 1.0e-4\ntrain:\n  total_steps: 10\noptim:\n  warmup_steps: 5\n", "optim", (1, 5)),
        ("optim:\n  lr: 1.0e-4\n  weight_decay: 0.1\n  lr: 2.0e-4\n", "lr", (2, 4)),
        ("data:\n  augment:\n    hflip: 0.1\n    vflip: 0.2\n\n    hflip: 0.3\n", "hflip", (3, 6)),
        ("data:\n  mixture:\n    - {shards: a, weight: 1, shards: b}\n", "shards", (3, 3)),
    ],
)
def test_a_key_given_twice_is_an_error_naming_it_and_both_lines(tmp_path, capsys, text, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    assert _train_error(capsys, path) == (
        f"usjepa train: error: {path}: key '{key}' is given twice in the same mapping, at lines {lines[0]} and "
        f"{lines[1]} (only the last would count); keep one"
    )


def test_the_strict_loader_reads_what_safe_load_reads_and_lets_merged_keys_be_overridden():
    text = "base: &b {lr: 1, wd: 2}\nrun:\n  <<: *b\n  lr: 3\nlist: [1, {a: 1}]\n"
    assert yaml.load(text, Loader=StrictLoader) == yaml.safe_load(text)
    assert yaml.load(text, Loader=StrictLoader)["run"] == {"lr": 3, "wd": 2}


@dataclass
class _Arm:
    config: str = ""
    steps: int = 0


@dataclass
class _Spec:
    out: str = "out"
    arms: dict[str, _Arm] = field(default_factory=dict)


def test_specs_loaded_with_load_typed_refuse_duplicates_and_blame_overrides(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("arms:\n  salt:\n    config: a.yaml\n  salt:\n    config: b.yaml\n")
    with pytest.raises(
        ConfigError, match=r"spec.yaml: key 'salt' is given twice in the same mapping, at lines 2 and 4"
    ):
        load_typed(_Spec, path)
    path.write_text("arms:\n  salt:\n    config: a.yaml\n")
    assert load_typed(_Spec, path, ["arms.salt.steps=5"]).arms["salt"] == _Arm("a.yaml", 5)
    with pytest.raises(ConfigError) as err:
        load_typed(_Spec, path, ["arms.salt.steps=many"])
    assert str(err.value) == "override arms.salt.steps=many: expected int, got 'many' (str)"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=abc", "override optim.lr=abc: expected float, got 'abc' (str)"),
        ("optim.betas=[0.9,x]", "override optim.betas=[0.9,x]: optim.betas[1]: expected float, got 'x' (str)"),
        (
            "train.objective=sal",
            "override train.objective=sal: 'sal' is not one of mae, salt, ema; did you mean 'salt'?",
        ),
        ("optim.lrr=1", "override optim.lrr=1: unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        (
            "data.mixture=[{weight: 1}]",
            "override data.mixture=[{weight: 1}]: missing key 'data.mixture[0].shards': it has no default, "
            "so it must be given",
        ),
        (
            "data.augment={hflip: 0.1, hflip: 0.2}",
            "override data.augment={hflip: 0.1, hflip: 0.2}: key 'hflip' is given twice",
        ),
    ],
)
def test_a_bad_value_on_the_command_line_is_blamed_on_the_override(capsys, override, message):
    assert (
        _train_error(capsys, "configs/demo.yaml", "train.total_steps=5", override) == f"usjepa train: error: {message}"
    )


def test_a_bad_value_in_the_file_is_blamed_on_the_file_with_its_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: abc\n")
    expected = f"usjepa train: error: {path}: optim.lr: expected float, got 'abc' (str)"
    assert _train_error(capsys, path, "optim.warmup_steps=5") == expected
    assert load_config(path, ["optim.lr=1e-4"]).optim.lr == pytest.approx(1e-4)  # the override replaces it
    path.write_text("optim: 5\n")
    assert _train_error(capsys, path, "optim.lr=1") == (
        f"usjepa train: error: {path}: optim: expected a mapping of keys, got 5"
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.total_steps=-5", "override train.total_steps=-5: must be at least 1"),
        ("checkpoint.every_steps=0", "override checkpoint.every_steps=0: must be at least 1"),
        ("optim.lr=nan", "override optim.lr=nan: nan is not a finite number"),
        ("optim.weight_decay=.inf", "override optim.weight_decay=.inf: inf is not a finite number"),
        ("optim.betas=[0.9,.nan]", "override optim.betas=[0.9,.nan]: nan is not a finite number"),
        ("optim.final_lr=-1e-6", "override optim.final_lr=-1e-6: learning rates must be >= 0, got -1e-06"),
        ("run.stop_at_step=-3", "override run.stop_at_step=-3: must be >= 0 (0: run to train.total_steps), got -3"),
        (
            "data.augment={crop_scale: [0.9, 0.5]}",
            "override data.augment={crop_scale: [0.9, 0.5]}: needs 0 < low <= high <= 1.0, got (0.9, 0.5)",
        ),
    ],
)
def test_a_value_out_of_range_on_the_command_line_is_blamed_on_the_override(capsys, override, message):
    # The file's own setting is replaced: the override is what is out of range.
    assert _train_error(capsys, "configs/demo.yaml", "optim.lr=1e-4", override) == f"usjepa train: error: {message}"


def test_a_value_out_of_range_in_the_file_is_blamed_on_the_file_with_its_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  total_steps: -5\noptim:\n  lr: .nan\n")
    assert _train_error(capsys, path, "optim.lr=1e-4") == (
        f"usjepa train: error: {path}: train.total_steps: must be at least 1"
    )
    assert _train_error(capsys, path, "train.total_steps=5") == (
        f"usjepa train: error: {path}: optim.lr: nan is not a finite number"
    )
    # A cross-field check names the key it checks; neither file nor command line set it here.
    assert _train_error(capsys, path, "train.total_steps=5", "optim.lr=1e-4", "optim.warmup_steps=9") == (
        "usjepa train: error: override optim.warmup_steps=9: must be between 0 and train.total_steps=5"
    )
    path.write_text("{}\n")
    assert _train_error(capsys, path, "train.total_steps=5") == (
        "usjepa train: error: optim.warmup_steps: must be between 0 and train.total_steps=5"
    )


def test_stop_at_step_zero_means_the_whole_schedule():
    assert load_config("configs/demo.yaml", ["run.stop_at_step=0"]).run.stop_at_step == 0
    with pytest.raises(ConfigError, match=r"^run.stop_at_step: must be >= 0"):
        load_config(None, ["run.stop_at_step=-1"])  # no file: nothing else it could come from
