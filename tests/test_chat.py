"""Conversational prompts: one rendering for every stage (models/modeling/chat.py), with the built-in
tokenizer's template and with SmolLM2's ChatML template (the tokenizer shipped in its GGUF file)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from data_contracts.errors import ContractError
from data_contracts.preferences import validate_preferences
from data_contracts.problems import validate_problems
from data_contracts.sft import load_sft_dataset
from models.modeling.chat import (
    completion_end,
    encode_prompt,
    end_of_turn_id,
    problem_prompt_ids,
    prompt_text,
    render_prompt,
    uses_template,
)
from models.config import load_recipe
from models.training.lm_loss import IGNORE
from models.data.preference_pairs import encode_sequence
from models.recipes.sft import tokenize_examples
from models.generation.rollouts import Rollout, SamplingParams, _eos_ids
from models.modeling.tokenizer import build_tokenizer

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
CONVERSATION = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": "<think>3+4=7</think><answer>7</answer>"},
]


@pytest.fixture(scope="module")
def chatml(smollm2_tokenizer):
    return smollm2_tokenizer


def test_string_and_one_message_give_the_same_ids_under_auto(chatml):
    as_string = encode_prompt(chatml, QUESTION, "auto")
    as_message = encode_prompt(chatml, [{"role": "user", "content": QUESTION}], "auto")
    assert as_string == as_message
    # rendered in ChatML with the generation prompt, BOS (<|im_start|>) once, at the start
    text = chatml.decode(as_string)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>user\n{QUESTION}<|im_end|>" in text
    assert as_string.count(chatml.bos_token_id) == text.count("<|im_start|>")


def test_never_feeds_text_as_written_and_refuses_a_conversation(chatml):
    assert chatml.decode(encode_prompt(chatml, QUESTION, "never")) == QUESTION
    with pytest.raises(ValueError, match="'never' but the prompt is a conversation"):
        encode_prompt(chatml, CONVERSATION[:2], "never")
    # unset (a config used outside a recipe): TRL's rule, conversations templated and text as written
    assert not uses_template(chatml, QUESTION, None) and uses_template(chatml, CONVERSATION[:2], None)


def test_builtin_template_renders_the_builtin_prompt_format():
    tok = build_tokenizer()
    # the built-in tokenizer's template turns a user turn into the built-in task's prompt
    assert render_prompt(tok, "4-0+2", "auto") == "<bos>Q: 4-0+2\nA:"
    assert encode_prompt(tok, "4-0+2", "auto") == encode_prompt(tok, "Q: 4-0+2\nA:", "never")
    assert end_of_turn_id(tok) == tok.eos_token_id


def test_end_of_turn_is_im_end_and_stops_the_sampler(chatml):
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(chatml) == im_end

    class NoConfig:  # a model whose generation config names no eos
        generation_config = None

    assert im_end in _eos_ids(NoConfig(), chatml)


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion"])
def test_sft_ids_equal_the_sampler_ids_up_to_the_completion(chatml, fmt):
    """One conversation: what SFT trains on, prompt part, is what the sampler is fed."""
    if fmt == "messages":
        row = {"messages": CONVERSATION}
    else:  # TRL's conversational prompt/completion
        row = {"prompt": CONVERSATION[:2], "completion": [CONVERSATION[2]]}
    (ids, labels), = tokenize_examples([row], fmt, chatml, 512, completion_only=True, chat_template="auto")[0]
    fed = problem_prompt_ids(chatml, "auto")({"id": "p0", "prompt": CONVERSATION[:2]})
    n_prompt = sum(1 for x in labels if x == IGNORE)
    assert ids[:n_prompt] == fed
    completion = chatml(CONVERSATION[2]["content"], add_special_tokens=False)["input_ids"]
    # the completion ends with the template's end of turn, as the assistant turn does in ChatML
    assert ids[n_prompt:] == completion + [chatml.convert_tokens_to_ids("<|im_end|>")]
    assert labels[n_prompt:] == ids[n_prompt:]


def test_preference_pairs_render_like_sft(chatml):
    prompt = CONVERSATION[:2]
    ids, n_prompt = encode_sequence(chatml, prompt, [{"role": "assistant", "content": "7"}], 512, "auto")
    assert ids[:n_prompt] == encode_prompt(chatml, prompt, "auto")
    end = completion_end(chatml, "auto")
    assert ids[n_prompt:] == chatml("7", add_special_tokens=False)["input_ids"] + [end(prompt)]


def test_contracts_take_conversational_prompts(tmp_path):
    ok = pd.DataFrame([{"id": "a", "prompt": CONVERSATION[:2], "answer": "7"},
                       {"id": "b", "prompt": "2+2?", "answer": "4"}], dtype=object)
    validate_problems(ok, "problems.jsonl")
    bad = pd.DataFrame([{"id": "a", "prompt": "x", "answer": "1"},
                        {"id": "b", "prompt": CONVERSATION, "answer": "7"}], dtype=object)
    with pytest.raises(ContractError) as e:
        validate_problems(bad, "problems.jsonl")
    assert (e.value.row, e.value.field) == (2, "prompt")
    assert e.value.reason == "last turn is 'assistant', must be 'user'"

    pairs = pd.DataFrame([{"prompt": CONVERSATION[:2], "chosen": [{"role": "assistant", "content": "7"}],
                           "rejected": [{"role": "assistant", "content": "8"}]}], dtype=object)
    validate_preferences(pairs, "pairs.jsonl")
    tie = pairs.assign(rejected=[[{"role": "assistant", "content": "7"}]])
    with pytest.raises(ContractError, match="same text as 'chosen'"):
        validate_preferences(tie, "pairs.jsonl")

    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps({"prompt": CONVERSATION[:2], "completion": [{"role": "user", "content": "7"}]}) + "\n")
    with pytest.raises(ContractError) as e:
        load_sft_dataset(f)
    assert (e.value.row, e.value.field) == (1, "completion")
    assert "a completion holds only 'assistant' turns" in e.value.reason


def test_rejection_samples_keep_the_conversation_for_refine(chatml, monkeypatch):
    """The sample stage stores the prompt as the problem has it, so refine's SFT ids of a kept sample
    begin with exactly the ids it was sampled from."""
    from models.generation import rejection_sampling as samples_mod
    from models.recipes.sample_filter_config import SampleConfig

    seen = {}

    def fake_sample(model, tok, prompts, n, params, *, seed, batch_size):
        seen["ids"] = prompts
        return [Rollout(i, s, list(p), [], "<answer>7</answer>", [], "stop") for i, p in enumerate(prompts)
                for s in range(n)]

    monkeypatch.setattr(samples_mod, "sample", fake_sample)
    problems = [{"id": "p0", "prompt": CONVERSATION[:2], "answer": "7"}]
    cfg = SampleConfig(num_prompts=1, num_samples=2, rewards={"builtin_task": 1.0}, chat_template="auto")
    df = samples_mod.generate_samples(None, chatml, problems, cfg)
    assert df["prompt"][0] == CONVERSATION[:2]
    assert df["total"].tolist() == [1.0, 1.0]
    sft = samples_mod.samples_to_sft(df)
    (ids, labels), = tokenize_examples(sft.to_dict("records")[:1], "prompt_completion", chatml, 512, True, "auto")[0]
    n_prompt = sum(1 for x in labels if x == IGNORE)
    assert ids[:n_prompt] == seen["ids"][0]


def test_prompt_text_and_recipe_default():
    assert prompt_text(CONVERSATION[:2]) == f"Answer with a number.\n\n{QUESTION}"
    assert prompt_text("Q: 1+1\nA:") == "Q: 1+1\nA:"
    # every prompt-rendering section takes the recipe's chat_template unless it sets its own
    cfg = load_recipe("r1", ["chat_template=auto", "grpo.chat_template=never"])
    assert (cfg.sft.chat_template, cfg.grpo.chat_template, cfg.evaluate.chat_template) == ("auto", "never", "auto")
    assert load_recipe("r1").sample.chat_template == "never"
    assert SamplingParams().stop_strings == ("</answer>",)
