"""SFT components: completion-only masking, the loss by hand, data order, and the engine loop
(accumulation = one big batch; a crashed run resumes to the same weights as an uninterrupted one)."""

import math
from types import SimpleNamespace

import pytest
import torch

from models.config import SFTConfig
from models.training.batching import EpochSampler
from models.training.lm_loss import IGNORE, causal_lm_nll_sum, collate, n_label_tokens
from models.recipes.sft import tokenize_examples
from models.modeling.tokenizer import build_tokenizer


def test_completion_only_masking_by_hand():
    tok = build_tokenizer()
    rows = [{"prompt": "Q: 1+2\nA:", "completion": "<answer>3</answer>"}]
    (ids, labels), = tokenize_examples(rows, "prompt_completion", tok, 64, completion_only=True)[0]
    # BOS + 9 prompt chars, then <answer> 3 </answer> EOS
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + 9 + 3 + 1
    assert labels[:10] == [IGNORE] * 10
    assert labels[10:] == ids[10:] == tok.convert_tokens_to_ids(["<answer>", "3", "</answer>"]) + [tok.eos_token_id]
    # without completion_only every position is a label
    (_, full), = tokenize_examples(rows, "prompt_completion", tok, 64, completion_only=False)[0]
    assert full == ids
    # the loss counts the 4 completion tokens (each predicted from the position before it)
    assert n_label_tokens([(ids, labels)]) == 4


def test_truncation_keeps_prompt_and_drops_examples_without_room():
    tok = build_tokenizer()
    rows = [{"prompt": "Q: 1+2\nA:", "completion": "<answer>3</answer>"}]
    (ids, labels), = tokenize_examples(rows, "prompt_completion", tok, 12, True)[0]
    assert len(ids) == 12 and labels[10:] == ids[10:12]
    kept, dropped = tokenize_examples(rows, "prompt_completion", tok, 10, True)
    assert kept == [] and dropped == 1


def test_cut_rows_and_text_outside_the_vocabulary_are_counted_and_said():
    from models.recipes.sft import data_warnings

    tok = build_tokenizer()
    rows = [{"prompt": "Q: 1+2\nA:", "completion": "<answer>3</answer>"},  # fits in 20 tokens
            {"prompt": "Q: 1+2+3+4+5+6+7\nA:", "completion": "<answer>28</answer>"},  # its prompt alone fills 20
            {"prompt": "Q: ½+1\nA:", "completion": "<answer>1.5</answer>"}]  # '½' is not in the built-in vocabulary
    stats: dict = {}
    kept, dropped = tokenize_examples(rows, "prompt_completion", tok, 20, True, stats=stats)
    assert stats == {"truncated": {"rows": 1, "first_row": 2}, "unk": {"rows": 1, "first_row": 3}}
    assert len(kept) == 2 and dropped == 1
    truncated, unk = data_warnings(stats, dropped, len(rows), 20, "d.jsonl")
    assert truncated.startswith("d.jsonl: 1 of 3 examples are longer than max_seq_len=20 and are cut (first: row 2); 1 of them left")
    assert unk.startswith("d.jsonl: 1 of 3 examples hold text outside the tokenizer's vocabulary") and "row 3" in unk
    assert data_warnings({}, 0, 3, 20, "d.jsonl") == []


def test_messages_format_uses_the_chat_template_once():
    tok = build_tokenizer()
    rows = [{"messages": [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "<answer>3</answer>"}]}]
    (ids, labels), = tokenize_examples(rows, "messages", tok, 64, True)[0]
    assert ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True).startswith("Q: 1+2\nA:<answer>3</answer>")
    assert [x for x in labels if x != IGNORE] == tok.convert_tokens_to_ids(["<answer>", "3", "</answer>"]) + [tok.eos_token_id]


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: lets the loss be computed by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.logits)


def test_nll_sum_by_hand():
    # vocab 4, one sequence of 3 tokens [0, 1, 2]; labels: prompt = position 0 and 1, completion = 2
    logits = torch.tensor([[[0.0, 0.0, 2.0, 0.0],    # predicts token at position 1 (masked: prompt)
                            [0.0, 0.0, 2.0, 0.0],    # predicts token 2 at position 2 -> counted
                            [9.0, 9.0, 9.0, 9.0]]])  # last position predicts nothing
    batch = {"input_ids": torch.tensor([[0, 1, 2]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([[IGNORE, IGNORE, 2]])}
    nll, n = causal_lm_nll_sum(FixedLogits(logits), batch)
    # -log(e^2 / (e^2 + 3)) = log(1 + 3 e^-2) = 0.34901
    assert n == 1
    assert nll.item() == pytest.approx(math.log(1 + 3 * math.exp(-2)), abs=1e-6)
    # unmasking the prompt adds -log(e^0 / (e^2 + 3)) = log(e^2 + 3) = 2.34901 for token 1
    batch["labels"] = torch.tensor([[0, 1, 2]])
    nll, n = causal_lm_nll_sum(FixedLogits(logits), batch)
    assert n == 2 and nll.item() == pytest.approx(math.log(1 + 3 * math.exp(-2)) + math.log(math.exp(2) + 3), abs=1e-6)


def test_collate_pads_right_and_ignores_padding():
    b = collate([([5, 6, 7], [IGNORE, 6, 7]), ([5, 6], [IGNORE, 6])], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 6, IGNORE]]


def test_epoch_sampler_is_a_pure_function_of_position():
    s = EpochSampler(10, seed=3)
    first = s.indices(0, 25)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert EpochSampler(10, seed=3).indices(13, 5) == first[13:18]
    assert EpochSampler(10, seed=4).indices(0, 10) != first[:10]


def _run_sft(base, data, workdir, **over):
    from models.recipes.sft import train_sft

    cfg = SFTConfig(**{"max_steps": 3, "batch_size": 8, "micro_batch_size": 8, "lr": 1e-3, "warmup_steps": 1,
                       "save_every": 1, "max_seq_len": 64, **over})
    return train_sft({"config": cfg.model_dump(), "base_path": str(base), "dataset_path": str(data),
                      "workdir": str(workdir)})


def _weights(path):
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


def test_gradient_accumulation_equals_one_big_batch(tiny_base, sft_file, tmp_path):
    one = _run_sft(tiny_base, sft_file, tmp_path / "one")
    accum = _run_sft(tiny_base, sft_file, tmp_path / "accum", micro_batch_size=2)  # 4 accumulation steps
    w1, w2 = _weights(one["output_dir"]), _weights(accum["output_dir"])
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6)
    assert one["last_metrics"]["loss"] == pytest.approx(accum["last_metrics"]["loss"], rel=1e-5)


def test_torch_compile_and_the_adamw_kernels_train_the_same_weights(tiny_base, sft_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    fused = _run_sft(tiny_base, sft_file, tmp_path / "fused", optim="adamw_torch_fused")
    loop = _run_sft(tiny_base, sft_file, tmp_path / "loop")  # the default: adamw_torch
    compiled = _run_sft(tiny_base, sft_file, tmp_path / "compiled", torch_compile=True)
    w = _weights(fused["output_dir"])
    for other in (loop, compiled):
        w2 = _weights(other["output_dir"])
        assert w.keys() == w2.keys()  # compiling in place keeps the parameter names (no _orig_mod.)
        for k in w:
            torch.testing.assert_close(w[k], w2[k], rtol=1e-4, atol=1e-5)
        assert other["last_metrics"]["loss"] == pytest.approx(fused["last_metrics"]["loss"], rel=1e-4)


@pytest.mark.parametrize("mixed", [{}, {"precision": "bf16"}, {"precision": "bf16", "zero_stage": 2}],
                         ids=["fp32", "bf16-zero0", "bf16-zero2"])
def test_crashed_run_resumes_from_checkpoint_to_identical_weights(tiny_base, sft_file, tmp_path, mixed):
    # bf16: the resumed run seeds its masters from the base's fp32 weights, then the checkpoint's win
    from models.training.engine import read_metrics

    straight = _run_sft(tiny_base, sft_file, tmp_path / "straight", max_steps=4, save_every=2, **mixed)

    import models.recipes.sft as sft_mod

    real_run_loop = sft_mod.run_loop

    def crash_at_step_3(*args, **kwargs):
        def on_log(m):
            if m["step"] == 3:
                raise KeyboardInterrupt("simulated crash after step 3")
        return real_run_loop(*args, **dict(kwargs, on_log=on_log))

    sft_mod.run_loop = crash_at_step_3
    try:
        with pytest.raises(KeyboardInterrupt):
            _run_sft(tiny_base, sft_file, tmp_path / "crashy", max_steps=4, save_every=2, **mixed)
    finally:
        sft_mod.run_loop = real_run_loop
    resumed = _run_sft(tiny_base, sft_file, tmp_path / "crashy", max_steps=4, save_every=2, **mixed)
    assert resumed["resumed_from_step"] == 2
    ws, wr = _weights(straight["output_dir"]), _weights(resumed["output_dir"])
    for k in ws:
        torch.testing.assert_close(ws[k], wr[k], rtol=0, atol=0)
    # metrics of the redone step 3 replaced, not duplicated
    steps = [m["step"] for m in read_metrics(resumed["metrics_path"])]
    assert steps == [1, 2, 3, 4]
    assert read_metrics(resumed["metrics_path"])[-1]["loss"] == read_metrics(straight["metrics_path"])[-1]["loss"]


def test_a_checkpoint_killed_before_its_commit_is_never_resumed_from(tiny_base, sft_file, tmp_path, monkeypatch):
    """A save interrupted after its files are on disk but before `latest` names it: resume goes on from
    the previous committed checkpoint, drops the uncommitted tag, and ends on the same weights."""
    import models.training.engine as engine_mod
    from models.training.checkpoints import latest_checkpoint_step
    from models.training.engine import read_metrics

    straight = _run_sft(tiny_base, sft_file, tmp_path / "straight", max_steps=4, save_every=2)
    # a finished stage keeps its final checkpoint only (keep_checkpoints applies while it trains)
    assert [p.name for p in (tmp_path / "straight" / "checkpoints").glob("step*")] == ["step0000004"]

    def die_before_commit(*parts):
        if parts[0] == "checkpoint-uncommitted" and parts[2] == 4:
            raise KeyboardInterrupt("simulated kill while step 4's checkpoint is being written")

    monkeypatch.setattr(engine_mod, "fault_point", die_before_commit)
    with pytest.raises(KeyboardInterrupt):
        _run_sft(tiny_base, sft_file, tmp_path / "crashy", max_steps=4, save_every=2)
    ckpts = tmp_path / "crashy" / "checkpoints"
    assert latest_checkpoint_step(ckpts) == 2 and (ckpts / "step0000004").is_dir()
    partial = sorted(f for f in (ckpts / "step0000004").iterdir() if f.is_file())
    assert partial
    partial[-1].write_bytes(partial[-1].read_bytes()[:100])  # as if killed in the middle of this file
    monkeypatch.undo()

    resumed = _run_sft(tiny_base, sft_file, tmp_path / "crashy", max_steps=4, save_every=2)
    assert resumed["resumed_from_step"] == 2
    ws, wr = _weights(straight["output_dir"]), _weights(resumed["output_dir"])
    for k in ws:
        torch.testing.assert_close(ws[k], wr[k], rtol=0, atol=0)
    assert [m["step"] for m in read_metrics(resumed["metrics_path"])] == [1, 2, 3, 4]
    assert (ckpts / "latest").read_text() == "step0000004" and not list(ckpts.glob("latest.tmp-*"))


def test_stale_op_build_locks_are_cleared(tmp_path):
    import os
    import time

    from models.training.distributed import clear_stale_op_locks

    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert clear_stale_op_locks(str(tmp_path)) == [stale]
    assert not stale.exists() and fresh.exists()  # a compile in progress keeps its lock
    assert clear_stale_op_locks(None) == []
