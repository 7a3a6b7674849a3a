import pytest

from models.config import RecipeError, load_recipe, validate_recipe
from models.training.deepspeed_setup import deepspeed_config
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


def test_set_on_a_stage_the_recipe_does_not_run_is_an_error():
    with pytest.raises(RecipeError, match=r"--set sft\.dataset=?.*does not run a 'sft' stage \(stages: fetch, grpo\)"):
        load_recipe("r1-zero", ["sft.dataset=/nonexistent.jsonl"])
    with pytest.raises(RecipeError, match=r"--set refine\.lr: .*stages: fetch, sft, grpo\)"):  # after stages=[...]
        load_recipe("r1", ["stages=[fetch,sft,grpo]", "refine.lr=1e-4"], smoke=True)
    # the smoke: section may set sections a user drops; --set stages itself and sections it adds work
    r = load_recipe("r1", ["stages=[fetch,sft,grpo]", "grpo.lr=1e-5"], smoke=True)
    assert r.stages == ["fetch", "sft", "grpo"] and r.grpo.lr == 1e-5
    assert load_recipe("r1-zero", ["evaluate.k=2", "task.seed=3"]).evaluate.k == 2  # not stage sections


def test_set_on_the_smoke_section_is_an_error():
    with pytest.raises(RecipeError, match=r"--set smoke\.sft\.max_steps: .*set the key itself, e\.g\. --set sft\.max_steps="):
        load_recipe("r1", ["smoke.sft.max_steps=2"], smoke=True)


def test_a_bare_name_is_a_shipped_recipe_even_when_the_working_dir_has_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1-zero").write_text("name: mine\n")
    assert load_recipe("r1").name == "r1" and load_recipe("r1-zero", smoke=True).name == "r1-zero"
    with pytest.raises(RecipeError, match=r"^r1: is a directory, not a recipe file"):
        load_recipe("./r1")
    with pytest.raises(RecipeError, match="unknown recipe 'mine'.*pass ./mine"):
        (tmp_path / "mine").write_text("name: mine\n")
        load_recipe("mine")
    (tmp_path / "bin.yaml").write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(RecipeError, match=r"bin\.yaml: not a UTF-8 text file"):
        load_recipe("bin.yaml")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(RecipeError, match=r"dir\.yaml: is a directory"):
        load_recipe("dir.yaml")


def test_operand_range_is_checked_in_one_line():
    with pytest.raises(RecipeError, match=r"invalid recipe: task: min_operands \(7\) is above max_operands \(6\)") as e:
        load_recipe("r1", ["task.min_operands=7"])
    assert "\n" not in str(e.value)
    assert load_recipe("r1", ["task.min_operands=4", "task.max_operands=4"]).task.min_operands == 4


def test_task_corpus_mix_is_checked_at_load():
    with pytest.raises(RecipeError, match="is above 1"):
        load_recipe("r1-zero", ["task.worked_fraction=0.9", "task.check_fraction=0.2"])
    with pytest.raises(RecipeError, match="guess_accuracy"):
        load_recipe("r1-zero", ["task.guess_accuracy=1.5"])
