import pytest
import yaml

from sdtune.errors import SdtuneError
from sdtune.training.config import RESOLVED_CONFIG_NAME, parse_args, save_resolved_config

REQUIRED = ["--pretrained_model_name_or_path", "model", "--train_data_dir", "data"]


def test_flags_override_the_recipe_which_overrides_defaults(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 0.5\ntrain_batch_size: 3\nuse_ema: true\n")
    args = parse_args(REQUIRED + ["--config", str(recipe), "--train_batch_size", "5"])
    assert args.learning_rate == 0.5  # from the recipe
    assert args.train_batch_size == 5  # the flag wins
    assert args.use_ema is True
    assert args.adam_beta1 == 0.9  # untouched default


def test_unknown_recipe_key_is_an_error_not_ignored(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rat: 0.5\n")
    with pytest.raises(SdtuneError, match="learning_rat"):
        parse_args(REQUIRED + ["--config", str(recipe)])


def test_missing_recipe_file_names_the_folder():
    with pytest.raises(SdtuneError, match="configs/"):
        parse_args(REQUIRED + ["--config", "nope.yaml"])


@pytest.mark.parametrize("extra, message", [
    (["--cache_latents"], "center_crop"),
    (["--offload_ema"], "use_ema"),
    (["--resolution", "100"], "multiple of 8"),
    (["--proportion_empty_prompts", "2"], "between 0 and 1"),
    (["--validation_split", "0"], "fraction between 0 and 1"),
    (["--validation_split", "1"], "fraction between 0 and 1"),
    (["--validation_split", "0.1", "--validation_data_dir", "."], "give one"),
])
def test_impossible_combinations_are_refused(extra, message):
    with pytest.raises(SdtuneError, match=message):
        parse_args(REQUIRED + extra)


def test_model_and_data_are_required():
    with pytest.raises(SdtuneError, match="pretrained_model_name_or_path"):
        parse_args(["--train_data_dir", "x"])
    with pytest.raises(SdtuneError, match="dataset_name"):
        parse_args(["--pretrained_model_name_or_path", "x"])


def test_a_missing_seed_is_drawn_and_recorded(tmp_path):
    args = parse_args(REQUIRED)
    assert isinstance(args.seed, int)
    saved = yaml.safe_load(save_resolved_config(args, tmp_path).read_text())
    assert saved["seed"] == args.seed
    assert (tmp_path / RESOLVED_CONFIG_NAME).is_file()


def test_shipped_recipes_parse():
    for recipe in ["configs/pokemon.yaml", "configs/pokemon-lowmem.yaml", "configs/tiny.yaml"]:
        args = parse_args(["--config", recipe])
        assert args.pretrained_model_name_or_path
    lowmem = parse_args(["--config", "configs/pokemon-lowmem.yaml"])
    assert lowmem.use_8bit_adam and lowmem.offload_ema and lowmem.cache_latents
