"""The cache key changes when — and only when — an input that matters changes."""

from data_contracts.artifacts import ArtifactRef
from models.config import load_recipe, resolved
from tasks.cache import stage_cache_key

REF = ArtifactRef(kind="model", path="/a/model", digest="sha256:aaa", run_id="r1")
DATA = ArtifactRef(kind="dataset", path="/a/data.jsonl", digest="sha256:ddd")


def key(cfg=None, inputs=None, code="c1", stage="sft"):
    cfg = cfg if cfg is not None else resolved(load_recipe("r1").sft)
    return stage_cache_key(stage, cfg, inputs if inputs is not None else {"model": REF, "dataset": DATA}, code)


def test_key_is_the_sha256_of_the_canonical_payload_whatever_the_input_order():
    # sha256 of the sorted, compact JSON {"code","config","inputs": name -> digest,"stage"}, first 32
    # hex digits: a literal, so the key is stable across processes (no hash seed, no object ids) and a
    # change of its format, which would invalidate every finished stage, shows up here.
    # sha256(b'{"code":"c1","config":{"lr":0.001},"inputs":{"dataset":"sha256:ddd","model":"sha256:aaa"},"stage":"sft"}')
    golden = "1ca3e28206116f290d547e54862c2f6b"
    assert stage_cache_key("sft", {"lr": 1e-3, "log_every": 5}, {"model": REF, "dataset": DATA}, "c1") == golden
    assert stage_cache_key("sft", {"lr": 1e-3}, {"dataset": DATA, "model": REF}, "c1") == golden


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
    assert {"models/training/engine.py", "models/recipes/sft.py", "data_contracts/sft.py", "tasks/train.py"} <= files
    # sampling, RL losses and the CLI cannot change what SFT computes
    assert not files & {"models/generation/rollouts.py", "models/algorithms/losses.py", "flows/cli.py"}
    evaluate = {f.relative_to(REPO_ROOT).as_posix() for f in stage_source_files(("tasks.evaluate",))}
    assert {"models/generation/rollouts.py", "models/generation/evaluation.py", "models/rewards/__init__.py"} <= evaluate


def test_keys_of_configs_written_before_the_node_fields_are_unchanged():
    # literals computed on the commit before nnodes / nproc_per_node / rdzv_* existed: adding them as
    # bookkeeping fields keeps every finished single-node stage cached
    assert key() == "33b942c9bafb87afa37b797f79deb268"
    two = ["sft.world_size=2", "sft.micro_batch_size=8"]
    assert key(cfg=resolved(load_recipe("r1", two).sft)) == "13062fef5db4bcecb45f328836ce1cac"
    pre = ["fetch.pretrain.world_size=2", "fetch.pretrain.micro_batch_size=16"]
    assert key(cfg=resolved(load_recipe("r1", pre).fetch)) == "307f4d6339365d0dcfef0a5bdc1c300f"
    assert key(cfg=resolved(load_recipe("r1").grpo), stage="grpo") == "eeeb900f21c3395fa4d6f8c895438756"


def test_corpus_and_packing_fields_at_their_default_keep_the_keys_and_otherwise_change_them():
    # task.worked_after_question / check_fraction / guess_accuracy and fetch.pretrain.packing came after
    # the literals above; at their defaults they compute what configs without them did. The fetch key
    # hashes the fetch settings with the task's (flows/post_train.py, plan_node)
    def fetch_key(overrides):
        recipe = load_recipe("r1", overrides)
        return key(cfg={"fetch": resolved(recipe.fetch), "task": resolved(recipe.task)}, stage="fetch")

    base = fetch_key([])
    assert base == "ab24ec27b5508268808a9d022f857242"  # computed on the commit before these fields
    explicit = ["task.worked_after_question=false", "task.check_fraction=0.0", "task.guess_accuracy=0.5",
                "fetch.pretrain.packing=blocks"]
    assert fetch_key(explicit) == base
    for change in ("task.worked_after_question=true", "task.check_fraction=0.1", "task.guess_accuracy=0.9",
                   "fetch.pretrain.packing=documents"):
        assert fetch_key([change]) != base, change


def test_how_ranks_are_spread_over_nodes_is_bookkeeping_but_world_size_is_not():
    two_ranks = key(cfg=resolved(load_recipe("r1", ["sft.world_size=2", "sft.micro_batch_size=8"]).sft))
    for layout in (["sft.nnodes=2"], ["sft.nnodes=2", "sft.nproc_per_node=1"],
                   ["sft.nnodes=2", "sft.rdzv_endpoint=node0:29400", "sft.rdzv_timeout_s=30"]):
        cfg = resolved(load_recipe("r1", layout + ["sft.micro_batch_size=8"]).sft)
        assert cfg["world_size"] == 2 and key(cfg=cfg) == two_ranks, layout
    four = resolved(load_recipe("r1", ["sft.nnodes=2", "sft.nproc_per_node=2", "sft.micro_batch_size=4"]).sft)
    assert key(cfg=four) != two_ranks
