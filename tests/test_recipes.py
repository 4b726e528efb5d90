import json

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.core.errors import ConfigError
from edgetl.core.shipped import list_shipped
from edgetl.workstation.options import TrainConfig
from edgetl.workstation.recipes import load_recipe, make_config


def test_shipped_recipes_are_valid_configs():
    names = list_shipped("recipe")
    assert {"mobilenet_v2-feature-extraction", "mobilenet_v2-fine-tune", "mobilenet_v2-full"} <= set(names)
    for name in names:
        cfg = make_config(name, {})
        assert name.startswith(cfg.backbone) and name.endswith(cfg.strategy)


def test_unknown_key_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone: mobilenet_v2\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        load_recipe(str(bad))


def test_bad_value_type_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: ten\n")
    with pytest.raises(ConfigError, match="epochs"):
        make_config(str(bad), {})


def test_yaml_is_data_not_code(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("epochs: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_recipe(str(bad))


def test_unknown_recipe_name_lists_choices():
    with pytest.raises(ConfigError, match="mobilenet_v2-fine-tune"):
        load_recipe("no-such-recipe")


def test_command_line_overrides_recipe(image_folder, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("backbone: tiny_test\nweights: none\nepochs: 3\nbatch_size: 16\nlr: 0.05\n")
    result = CliRunner().invoke(
        main,
        [
            "finetune",
            str(image_folder),
            "--out",
            str(tmp_path / "run"),
            "--recipe",
            str(recipe),
            "--epochs",
            "2",
            "--no-progress",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    train = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert train["epochs"] == 2 and train["lr"] == 0.05 and train["batch_size"] == 16
    assert train["dropout"] == TrainConfig().dropout


def test_recipe_from_a_run_reproduces_it(image_folder, tmp_path):
    runner = CliRunner()
    args = [
        "--backbone",
        "tiny_test",
        "--weights",
        "none",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--no-progress",
        "--json",
    ]
    a = runner.invoke(main, ["finetune", str(image_folder), "--out", str(tmp_path / "a"), *args])
    b = runner.invoke(
        main,
        [
            "finetune",
            str(image_folder),
            "--out",
            str(tmp_path / "b"),
            "--recipe",
            str(tmp_path / "a"),
            "--no-progress",
            "--json",
        ],
    )
    assert a.exit_code == 0 and b.exit_code == 0, b.output
    assert json.loads(a.stdout)["results"][0]["val_top1"] == json.loads(b.stdout)["results"][0]["val_top1"]
    ha = json.loads((tmp_path / "a" / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]


def test_cli_unknown_recipe_key_one_line(image_folder, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epoch: 3\n")
    result = CliRunner().invoke(
        main, ["finetune", str(image_folder), "--out", str(tmp_path / "run"), "--recipe", str(recipe)]
    )
    assert result.exit_code == 2 and "unknown key 'epoch'" in result.stderr and "Traceback" not in result.output
