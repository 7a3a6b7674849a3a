"""LoRA adapters and gradient checkpointing in every training stage (models/modeling/lora.py, the engine loop's
trainable-only checkpoints, the recipes' merged outputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import build_half_solved_base, rl_spec  # noqa: E402
from models.config import SFTConfig, load_recipe
from models.modeling.lora import (ADAPTER_DIR, AdaptersOff, LoraConfig, adapters_disabled, apply_lora, merged_for_inference,
                         merged_state_dict, trainable_bytes)
from models.recipes.preference_config import DPOConfig, RewardModelConfig
from models.recipes.ppo_config import PPOConfig
from models.recipes.rl_config import GRPOConfig


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _param_names(model) -> list[tuple[str, tuple]]:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def assert_plain_like_base(output_dir, base_path) -> None:
    """The output loads with plain from_pretrained with the base's parameter names, shapes and count."""
    out, base = _load(output_dir), _load(base_path)
    assert _param_names(out) == _param_names(base)
    assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in base.parameters())
    adapter = Path(output_dir) / ADAPTER_DIR
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()


def _ids(vocab: int, b: int = 3, t: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("cls", [SFTConfig, DPOConfig, RewardModelConfig, GRPOConfig, PPOConfig])
def test_a_set_style_lora_section_validates_in_every_stage(cls):
    # `--set <stage>.lora.r=8` makes {"lora": {"r": 8}}: the other keys take their defaults
    cfg = cls.model_validate({"lora": {"r": 8}})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (8, 32.0, 0.0, "all-linear")
    assert cls().lora is None and cls().gradient_checkpointing is False  # full fine-tuning by default
    with pytest.raises(ValueError, match=r"lora\.rank"):
        cls.model_validate({"lora": {"rank": 8}})
    with pytest.raises(ValueError, match="ZeRO-3"):
        cls.model_validate({"lora": {"r": 8}, "zero_stage": 3})


@pytest.mark.parametrize("recipe,stage", [("r1", "sft"), ("r1", "grpo"), ("tulu3", "dpo"), ("rlhf", "reward_model"),
                                          ("rlhf", "ppo")])
def test_set_override_reaches_every_stage_config(recipe, stage):
    recipe = load_recipe(recipe, overrides=[f"{stage}.lora.r=8", f"{stage}.gradient_checkpointing=true"])
    node = getattr(recipe, stage)
    assert node.lora.r == 8 and node.gradient_checkpointing is True


def test_pretraining_refuses_lora_and_takes_gradient_checkpointing():
    from models.config import PretrainConfig

    with pytest.raises(ValueError, match="lora: pretraining"):
        PretrainConfig.model_validate({"lora": {"r": 8}})
    assert PretrainConfig(gradient_checkpointing=True).gradient_checkpointing


# ----------------------------------------------------------------------------- components


def _tiny_llama(hidden=32, heads=4, kv=2, layers=2, inter=64, vocab=100, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_adapters_start_at_zero_train_alone_and_can_be_switched_off():
    model = _tiny_llama()
    ids = _ids(100)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    apply_lora(model, LoraConfig(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # 2 layers x 7 linear layers (q, k, v, o, gate, up, down) x (A, B)
    assert len(trainable) == 2 * 7 * 2 and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)  # B = 0: the base exactly
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
        adapted = model(input_ids=ids).logits
        with adapters_disabled(model):
            off = model(input_ids=ids).logits
        off_view = AdaptersOff(model)(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert (adapted - before).abs().max() > 1e-3
    torch.testing.assert_close(off, before, rtol=0, atol=0)
    torch.testing.assert_close(off_view, before, rtol=0, atol=0)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)  # switched back on


def test_padding_free_forward_of_an_adapted_model_and_of_its_adapters_off_view():
    from models.training.packing import STATS, packed_logits, verify

    model = _tiny_llama(vocab=100)
    apply_lora(model, LoraConfig(r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    verdict = verify(model)
    assert verdict["packed"] and verdict["tree"], verdict  # the injected model keeps its forward signature
    # right-padded rows, two sharing a 5-token prefix: a layout that saves work over the padded batch
    ids = _ids(100, b=4, t=12)
    ids[1, :5] = ids[0, :5]
    mask = torch.ones_like(ids)
    mask[2:, 6:] = 0
    real = mask.bool()
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        with adapters_disabled(model):
            base = model(input_ids=ids, attention_mask=mask).logits
        slots = STATS["computed_slots"]
        got = packed_logits(model, ids, mask)
        assert STATS["computed_slots"] - slots < 4 * 12  # a padding-free layout ran, not the padded batch
        got_off = packed_logits(AdaptersOff(model), ids, mask)
    torch.testing.assert_close(got[real], padded[real], rtol=0, atol=1e-4)
    torch.testing.assert_close(got_off[real], base[real], rtol=0, atol=1e-4)
    assert (padded[real] - base[real]).abs().max() > 1e-3


def test_merged_state_is_w_plus_scaled_ba_and_leaves_the_model_unmerged():
    model = _tiny_llama()
    apply_lora(model, LoraConfig(r=2, alpha=6.0, target_modules=["q_proj"]))
    q = model.model.layers[0].self_attn.q_proj
    w = q.base_layer.weight.detach().clone()
    with torch.no_grad():
        q.lora_A["default"].weight.fill_(0.5)  # A: (2, 32)
        q.lora_B["default"].weight.fill_(0.25)  # B: (32, 2)
    state = merged_state_dict(model)
    # (B @ A)[i, j] = 2 * 0.25 * 0.5 = 0.25, scaled by alpha / r = 6 / 2 = 3 -> 0.75 added everywhere
    torch.testing.assert_close(state["model.layers.0.self_attn.q_proj.weight"], w + 0.75)
    assert not any("lora_" in k or "base_layer" in k for k in state)
    assert set(state) == set(_tiny_llama().state_dict())
    torch.testing.assert_close(q.base_layer.weight, w, rtol=0, atol=0)  # the training weights are untouched


def test_decoding_on_merged_weights_computes_the_adapted_model_and_restores_it_bit_for_bit():
    from models.generation.rollouts import SamplingParams, sample
    from models.modeling.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = _tiny_llama(vocab=len(tok))
    apply_lora(model, LoraConfig(r=4, alpha=8.0))
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        ids = _ids(len(tok))
        adapted = model(input_ids=ids).logits
        base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        base_ptr = q.base_layer.weight.data_ptr()
        with merged_for_inference(model):
            merged = model(input_ids=ids).logits
            # inside: W + (alpha / r) B A in the base weight, adapters off (one matmul per layer)
            delta = 2.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
            torch.testing.assert_close(q.base_layer.weight, base_weights["model.layers.0.self_attn.q_proj.base_layer.weight"] + delta)
            assert q.disable_adapters
        after = model(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert not q.disable_adapters and q.base_layer.weight.data_ptr() == base_ptr  # the same storage back
    for n, p in model.named_parameters():  # the frozen base is not drifted by a merge/unmerge round trip
        torch.testing.assert_close(p, base_weights[n], rtol=0, atol=0)
    torch.testing.assert_close(after, adapted, rtol=0, atol=0)
    # the sampler decodes a LoRA policy that way and gives the model back as it was; greedy picks agree
    prompts = [[5, 6, 7], [8, 9]]
    greedy = SamplingParams(max_new_tokens=6, greedy=True, stop_strings=())
    got = sample(model, tok, prompts, 1, greedy, seed=0, batch_size=2)
    assert [len(r.completion_ids) for r in got] and all(r.completion_ids for r in got)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, base_weights[n], rtol=0, atol=0)
    with torch.no_grad():
        for r in got:
            seq = list(r.prompt_ids)
            for t in r.completion_ids:  # each token is the argmax of the adapted (unmerged) model
                if t in (tok.eos_token_id,):
                    break
                assert t == int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
                seq.append(t)


def test_trainable_and_adam_bytes_are_under_5_percent_of_full_fine_tuning():
    # SmolLM2-135M's layer shape (hidden 576, MLP 1536, 9 heads / 3 KV heads, tied embeddings), 2 layers and a
    # 2000-token vocabulary instead of 30 layers and 49152 tokens (which only make LoRA's share smaller)
    model = _tiny_llama(hidden=576, heads=9, kv=3, layers=2, inter=1536, vocab=2000)
    full = trainable_bytes(model)
    n_all = sum(p.numel() for p in model.parameters())
    assert full == n_all * 3 * 4  # fp32 weights + 2 Adam moments
    apply_lora(model, LoraConfig(r=8))
    # per layer r * (in + out): q 8*(576+576)=9216, k 8*(576+192)=6144, v 6144, o 9216,
    # gate/up/down 8*(576+1536)=16896 each -> 81408; 2 layers -> 162816 adapter weights
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_lora == 162816
    lora = trainable_bytes(model)
    assert lora == 162816 * 3 * 4
    assert lora / full <= 0.05, lora / full  # 162816 / 8.23M ≈ 2.0%


# ----------------------------------------------------------------------------- SFT


def _sft(base, data, workdir, **over):
    from models.recipes.sft import train_sft

    cfg = SFTConfig(**{"max_steps": 3, "batch_size": 8, "micro_batch_size": 8, "lr": 1e-3, "warmup_steps": 1,
                       "save_every": 1, "max_seq_len": 64, "num_threads": 1, **over})
    return train_sft({"config": cfg.model_dump(), "base_path": str(base), "dataset_path": str(data),
                      "workdir": str(workdir)})


def test_lora_sft_lowers_the_loss_and_merged_equals_base_plus_adapter(tiny_base, sft_file, tmp_path):
    from peft import PeftModel

    from models.training.engine import read_metrics

    res = _sft(tiny_base, sft_file, tmp_path / "run", max_steps=20, lr=1e-2, save_every=20,
               lora={"r": 8})
    losses = [m["loss"] for m in read_metrics(res["metrics_path"])]
    assert losses[-1] < losses[0] - 0.1, losses
    assert_plain_like_base(res["output_dir"], tiny_base)
    ids = _ids(_load(tiny_base).config.vocab_size)
    with torch.no_grad():
        merged = _load(res["output_dir"]).eval()(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(_load(tiny_base), str(Path(res["output_dir"]) / ADAPTER_DIR)).eval()
        unmerged = peft_model(input_ids=ids).logits
        base = _load(tiny_base).eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert (merged - base).abs().max() > 1e-3  # it did train
    # the checkpoints hold the adapters only: no base weight, no tied LM head
    ckpt = Path(res["output_dir"]).parent / "checkpoints" / "step0000020" / "mp_rank_00_model_states.pt"
    module = torch.load(ckpt, weights_only=False)["module"]
    assert module and all(".lora_" in k for k in module), sorted(module)[:5]


def test_lora_checkpoints_are_a_fraction_of_full_ones(tmp_path, sft_file):
    from models.modeling.tiny_model import save_hf
    from models.modeling.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = _tiny_llama(hidden=192, heads=6, kv=2, layers=4, inter=512, vocab=len(tok))
    model.config.update({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                         "pad_token_id": tok.pad_token_id})
    save_hf(model, tok, tmp_path / "base")

    def ckpt_bytes(workdir):
        return sum(f.stat().st_size for f in (workdir / "checkpoints").rglob("*") if f.is_file())

    _sft(tmp_path / "base", sft_file, tmp_path / "full", max_steps=2, save_every=2)
    _sft(tmp_path / "base", sft_file, tmp_path / "lora", max_steps=2, save_every=2, lora={"r": 8})
    full, lora = ckpt_bytes(tmp_path / "full"), ckpt_bytes(tmp_path / "lora")
    assert lora < 0.1 * full, (lora, full)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_lora_resume_gives_the_uninterrupted_weights(tiny_base, sft_file, tmp_path, zero_stage):
    from safetensors.torch import load_file

    # dropout > 0: the loop seeds the masks per step, so the resumed run draws the same ones
    kw = dict(lora={"r": 4, "dropout": 0.1}, save_every=2, lr_schedule="constant",  # a schedule free of max_steps
              zero_stage=zero_stage)
    straight = _sft(tiny_base, sft_file, tmp_path / "straight", max_steps=4, **kw)
    first = _sft(tiny_base, sft_file, tmp_path / "resumed", max_steps=2, **kw)
    assert first["final_step"] == 2
    (tmp_path / "resumed" / "output" / ".complete").unlink()  # the same work dir, a longer run
    resumed = _sft(tiny_base, sft_file, tmp_path / "resumed", max_steps=4, **kw)
    assert resumed["resumed_from_step"] == 2
    for sub in ("model.safetensors", f"{ADAPTER_DIR}/adapter_model.safetensors"):
        a = load_file(f"{straight['output_dir']}/{sub}")
        b = load_file(f"{resumed['output_dir']}/{sub}")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_base, sft_file):
    from transformers import AutoTokenizer

    from data_contracts.sft import load_sft_dataset
    from models.modeling.lora import enable_gradient_checkpointing
    from models.training.packing import verify as verify_packing
    from models.training.lm_loss import causal_lm_nll_sum, collate
    from models.recipes.sft import tokenize_examples

    tok = AutoTokenizer.from_pretrained(tiny_base)
    df, fmt = load_sft_dataset(sft_file)
    examples, _ = tokenize_examples(df.to_dict("records")[:8], fmt, tok, 64, True)
    batch = collate(examples, tok.pad_token_id)
    out = []
    for gc in (False, True):
        model = _load(tiny_base).train()
        if gc:
            enable_gradient_checkpointing(model)
        verify_packing(model)  # its forwards before the hook counts
        calls = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
        nll, n = causal_lm_nll_sum(model, batch)
        (nll / n).backward()
        out.append((float(nll.detach()), {k: p.grad.clone() for k, p in model.named_parameters()}, len(calls)))
    assert (out[0][2], out[1][2]) == (1, 2)  # checkpointing recomputes the layer's forward in the backward
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    for k, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][k], g, rtol=1e-5, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- every stage kind


@pytest.fixture(scope="module")
def rl_base(tmp_path_factory):
    return build_half_solved_base(tmp_path_factory.mktemp("lora_rl_base"))


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory) -> Path:
    from models.data.builtin_task import make_problems

    from helpers import off_by_one_pairs

    rows = off_by_one_pairs(make_problems(0, 8, 1, 2, 3)[0])
    out = tmp_path_factory.mktemp("lora_prefs") / "pairs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _pref_spec(cls, base, data, workdir, **over) -> dict:
    cfg = dict(dataset="file", max_steps=2, batch_size=8, micro_batch_size=8, lr=1e-3, save_every=1,
               lr_schedule="constant", max_seq_len=64, num_threads=1, lora={"r": 8}, **over)
    return {"config": cls(**cfg).model_dump(), "base_path": str(base), "dataset_path": str(data),
            "workdir": str(workdir)}


def _rl_config(**kw) -> dict:
    return dict(num_prompts=4, num_generations=4, max_new_tokens=24, max_steps=2, micro_batch_size=8,
                save_every=1, lr=1e-3, seed=3, num_threads=1, lora={"r": 8}, **kw)


def _no_second_model(monkeypatch):
    """Make loading a frozen reference copy an error."""
    import models.recipes.rollout_common as rc

    real = rc.load_causal_lm

    def load(path, frozen=False):
        assert not frozen, "a second (reference) copy of the weights was loaded"
        return real(path, frozen)

    monkeypatch.setattr(rc, "load_causal_lm", load)


def test_lora_dpo_trains_two_steps_to_a_plain_output(tiny_base, pref_file, tmp_path):
    from models.training.engine import read_metrics
    from models.recipes.dpo import train_dpo

    res = train_dpo(_pref_spec(DPOConfig, tiny_base, pref_file, tmp_path / "dpo", gradient_checkpointing=True))
    rows = read_metrics(res["metrics_path"])
    # the reference log-probs come from the start policy (adapters at B = 0): step 1 is at ln 2
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert res["final_step"] == 2
    assert_plain_like_base(res["output_dir"], tiny_base)


def test_lora_reward_model_trains_its_head_in_full_and_loads(tiny_base, pref_file, tmp_path):
    from models.modeling.heads import RewardModel
    from models.recipes.reward_model import load_reward_scorer, train_reward_model

    res = train_reward_model(_pref_spec(RewardModelConfig, tiny_base, pref_file, tmp_path / "rm"))
    assert_plain_like_base(res["output_dir"], tiny_base)
    rm = RewardModel.load(res["output_dir"], dtype=torch.float32)
    assert _param_names(rm.pretrained_model) == _param_names(_load(tiny_base))
    # what trained (the checkpoint holds exactly that): the whole score head and the backbone's adapters
    ckpt = Path(res["output_dir"]).parent / "checkpoints" / "step0000002" / "mp_rank_00_model_states.pt"
    module = torch.load(ckpt, weights_only=False)["module"]
    assert {"score_head.linear.weight", "score_head.linear.bias"} <= set(module)
    assert all(".lora_" in k for k in set(module) - {"score_head.linear.weight", "score_head.linear.bias"})
    torch.testing.assert_close(rm.score_head.linear.weight, module["score_head.linear.weight"])
    scores = load_reward_scorer(res["output_dir"])(["Q: 1+2\nA:"], ["<think>1+2=3</think><answer>3</answer>"])
    assert len(scores) == 1 and scores[0] == scores[0]  # a finite score through the stage's own loader


def test_lora_grpo_with_kl_uses_the_policy_with_adapters_off_as_reference(rl_base, tmp_path, monkeypatch):
    from models.training.engine import read_metrics
    from models.recipes.grpo import train_grpo

    _no_second_model(monkeypatch)
    res = train_grpo(rl_spec(rl_base, tmp_path / "grpo", _rl_config(beta=0.1)))
    rows = read_metrics(res["metrics_path"])
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # B = 0: policy and reference are the same model
    assert rows[1]["kl"] > 0  # after one update the adapters move the policy off the base
    assert_plain_like_base(res["output_dir"], rl_base["base_path"])


def test_lora_ppo_with_kl_trains_to_a_plain_output_and_value_head(rl_base, tmp_path, monkeypatch):
    from models.training.engine import read_metrics
    from models.recipes.ppo import VALUE_HEAD_FILE, train_ppo

    _no_second_model(monkeypatch)
    res = train_ppo(rl_spec(rl_base, tmp_path / "ppo", _rl_config(kl_coef=0.05)))
    rows = read_metrics(res["metrics_path"])
    assert len(rows) == 2
    assert_plain_like_base(res["output_dir"], rl_base["base_path"])
    assert (Path(res["output_dir"]) / VALUE_HEAD_FILE).exists()


def test_the_train_task_logs_the_adapter_as_its_own_artifact(tiny_base, sft_file, tmp_path):
    from mlflow.tracking import MlflowClient

    from data_contracts.artifacts import ArtifactRef, digest_path
    from tasks.common import RunContext
    from tasks.train import train_stage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = RunContext(state_dir=str(tmp_path / "state"), tracking_uri=uri, experiment="lora")
    config = SFTConfig(max_steps=1, batch_size=8, micro_batch_size=8, max_seq_len=64, num_threads=1,
                       lora={"r": 4}).model_dump()
    inputs = {"model": ArtifactRef(kind="model", path=str(tiny_base), digest=digest_path(tiny_base)),
              "dataset": ArtifactRef(kind="dataset", path=str(sft_file), digest=digest_path(sft_file))}
    res = train_stage.fn("sft", "sft", "key0", config, inputs, ctx)
    files = {f.path for f in MlflowClient(uri).list_artifacts(res.mlflow_run_id, "adapter")}
    assert files == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
