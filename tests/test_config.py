import pytest

from models.config import RecipeError, load_recipe, validate_recipe
from models.engine import deepspeed_config
from models.config import RECIPES_DIR


def test_default_recipe_is_r1_and_every_shipped_recipe_validates():
    assert load_recipe().name == "r1"
    for p in RECIPES_DIR.glob("*.yaml"):
        load_recipe(p.stem)
        load_recipe(p.stem, smoke=True)


def test_set_override_and_smoke():
    r = load_recipe("r1", ["sft.lr=1e-4", "sft.max_steps=7"])
    assert r.sft.lr == 1e-4 and r.sft.max_steps == 7
    smoke = load_recipe("r1", smoke=True)
    assert smoke.sft.max_steps < load_recipe("r1").sft.max_steps
    # --set wins over --smoke
    assert load_recipe("r1", ["sft.max_steps=3"], smoke=True).sft.max_steps == 3


def test_unknown_key_names_its_path():
    with pytest.raises(RecipeError, match=r"sft\.lrr: unknown key"):
        load_recipe("r1", ["sft.lrr=0.1"])
    with pytest.raises(RecipeError, match=r"fetch\.pretrain\.hidden: unknown key"):
        load_recipe("r1", ["fetch.pretrain.hidden=3"])


def test_bad_values_are_reported_with_path():
    with pytest.raises(RecipeError, match=r"sft\.lr"):
        load_recipe("r1", ["sft.lr=-1"])
    with pytest.raises(RecipeError, match=r"sft\.max_steps"):
        load_recipe("r1", ["sft.max_steps=many"])
    with pytest.raises(RecipeError, match="batch_size"):
        load_recipe("r1", ["sft.batch_size=10", "sft.micro_batch_size=4"])


def test_stage_list_is_checked():
    with pytest.raises(RecipeError, match=r"stages\[1\]: unknown stage 'bogus'"):
        validate_recipe({"name": "x", "stages": ["fetch", "bogus"]})
    with pytest.raises(RecipeError, match="no 'sft:' section"):
        validate_recipe({"name": "x", "stages": ["fetch", "sft"]})
    with pytest.raises(RecipeError, match="starts with 'fetch'"):
        validate_recipe({"name": "x", "stages": ["sft"], "sft": {}})


def test_unknown_recipe_lists_shipped_ones():
    with pytest.raises(RecipeError, match="shipped: .*r1"):
        load_recipe("nope")


def test_override_syntax_errors():
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe("r1", ["sft.lr"])
    with pytest.raises(RecipeError, match="is not a section"):
        load_recipe("r1", ["sft.lr.x=1"])


def test_deepspeed_config_merges_stage_settings():
    r = load_recipe("r1", ["sft.batch_size=16", "sft.micro_batch_size=4", "sft.zero_stage=3", "sft.precision=bf16"])
    cfg = deepspeed_config(r.sft)
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["bf16"] == {"enabled": True}
