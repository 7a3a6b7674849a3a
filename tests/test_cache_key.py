"""The cache key changes when — and only when — an input that matters changes."""

from data_contracts.artifacts import ArtifactRef
from models.config import load_recipe, resolved
from tasks.cache import stage_cache_key

REF = ArtifactRef(kind="model", path="/a/model", digest="sha256:aaa", run_id="r1")
DATA = ArtifactRef(kind="dataset", path="/a/data.jsonl", digest="sha256:ddd")


def key(cfg=None, inputs=None, code="c1", stage="sft"):
    cfg = cfg if cfg is not None else resolved(load_recipe("r1").sft)
    return stage_cache_key(stage, cfg, inputs if inputs is not None else {"model": REF, "dataset": DATA}, code)


def test_same_inputs_same_key():
    assert key() == key()


def test_changes_that_matter_change_the_key():
    base = key()
    assert key(cfg=resolved(load_recipe("r1", ["sft.lr=2e-3"]).sft)) != base
    assert key(cfg=resolved(load_recipe("r1", ["sft.seed=1"]).sft)) != base
    assert key(inputs={"model": REF.model_copy(update={"digest": "sha256:bbb"}), "dataset": DATA}) != base
    assert key(inputs={"model": REF, "dataset": DATA.model_copy(update={"digest": "sha256:eee"})}) != base
    assert key(code="c2") != base
    assert key(stage="refine") != base


def test_changes_that_do_not_matter_keep_the_key():
    base = key()
    # where the same bytes live, and which run made them, is not part of the identity
    moved = {"model": REF.model_copy(update={"path": "/b/model", "run_id": "other"}),
             "dataset": DATA.model_copy(update={"path": "/elsewhere.jsonl"})}
    assert key(inputs=moved) == base
    # bookkeeping fields do not change what a stage computes
    for override in ("sft.save_every=7", "sft.log_every=5", "sft.keep_checkpoints=4"):
        assert key(cfg=resolved(load_recipe("r1", [override]).sft)) == base, override


def test_stage_code_version_covers_what_the_stage_imports_and_nothing_else():
    from tasks.cache import REPO_ROOT, stage_source_files

    files = {f.relative_to(REPO_ROOT).as_posix() for f in stage_source_files(("tasks.train", "models.recipes.sft"))}
    assert {"models/engine.py", "models/recipes/sft.py", "data_contracts/sft.py", "tasks/train.py"} <= files
    # sampling, RL losses and the CLI cannot change what SFT computes
    assert not files & {"models/rollouts.py", "models/losses.py", "flows/cli.py"}
    evaluate = {f.relative_to(REPO_ROOT).as_posix() for f in stage_source_files(("tasks.evaluate",))}
    assert {"models/rollouts.py", "models/evaluation.py", "models/rewards/__init__.py"} <= evaluate
