"""Tests of models/generation/rollouts.py on a tiny random Llama and a char-level tokenizer built here."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from models.generation.rollouts import SamplingParams, filtered_logprobs, sample

CHARS = "0123456789+-=*/() QA:?\nabcdefghijklmnopqrstuvwxyz"  # 50 chars -> vocab 57 > top_k=50


def make_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<bos>", "<eos>"]
    tags = ["<answer>", "</answer>", "<think>", "</think>"]
    vocab = {t: i for i, t in enumerate(specials + tags + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", padding_side="left"
    )


def make_model(tok, seed: int = 0, init: float = 0.02) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=init,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    # a larger init makes the next-token distribution far from uniform, so a wrong temperature shows
    return make_model(tok, init=0.3)


PROMPTS = ["Q: 1+2\nA:", "Q: 7-3+4*2\nA:", "Q: 9\nA:"]


def teacher_forced_logprobs(model, rollouts, temperature: float) -> list[list[float]]:
    """Oracle: one left-padded forward pass over prompt+completion, positions from the mask."""
    seqs = [r.prompt_ids + r.completion_ids for r in rollouts]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    out = []
    for i, r in enumerate(rollouts):
        start = width - len(seqs[i]) + len(r.prompt_ids)  # first completion position
        # the token at position t is predicted by the logits at t - 1
        out.append([logp[i, start + t - 1, tokid].item() for t, tokid in enumerate(r.completion_ids)])
    return out


def test_logprobs_match_teacher_forced_forward(tok, model):
    params = SamplingParams(max_new_tokens=12, temperature=0.8, stop_strings=("</answer>",))
    rollouts = sample(model, tok, PROMPTS, 3, params, seed=1, batch_size=4)
    assert len(rollouts) == 9
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(p, s) for p in range(3) for s in range(3)]
    expected = teacher_forced_logprobs(model, rollouts, temperature=0.8)
    for r, exp in zip(rollouts, expected):
        assert r.prompt_ids == tok(PROMPTS[r.prompt_index])["input_ids"] and r.prompt_ids[0] == tok.bos_token_id
        assert len(r.logprobs) == len(r.completion_ids) > 0
        assert torch.allclose(torch.tensor(r.logprobs), torch.tensor(exp), atol=1e-4)


def test_greedy_logprobs_are_untempered_log_softmax_of_argmax(tok, model):
    params = SamplingParams(max_new_tokens=8, greedy=True, temperature=0.3, stop_strings=())
    rollouts = sample(model, tok, PROMPTS, 1, params, seed=0)
    expected = teacher_forced_logprobs(model, rollouts, temperature=1.0)
    for r, exp in zip(rollouts, expected):
        assert torch.allclose(torch.tensor(r.logprobs), torch.tensor(exp), atol=1e-4)
        assert all(lp > -math.log(len(tok)) for lp in r.logprobs)  # argmax has at least 1/V mass


def test_top_k_top_p_filtering_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # top_p=0.7: mass before each token (sorted) is 0, .5, .8, .95 -> keep tokens with mass-before < .7
    # -> {0.5, 0.3}, renormalised: 0.5/0.8 = 0.625, 0.3/0.8 = 0.375
    got = filtered_logprobs(logits, 1.0, 0, 0.7).exp()
    assert torch.allclose(got, torch.tensor([[0.625, 0.375, 0.0, 0.0]]), atol=1e-6)
    # top_k=3: drops 0.05 -> 0.5/0.95, 0.3/0.95, 0.15/0.95
    got = filtered_logprobs(logits, 1.0, 3, 1.0).exp()
    assert torch.allclose(got, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95, atol=1e-6)
    # temperature 0.5 squares the probabilities before renormalising: .25, .09, .0225, .0025 (sum .365)
    got = filtered_logprobs(logits, 0.5, 0, 1.0).exp()
    assert torch.allclose(got, torch.tensor([[0.25, 0.09, 0.0225, 0.0025]]) / 0.365, atol=1e-6)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson chi-square with tokens of expected count < 5 pooled into one bin. Returns (stat, dof)."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def test_sampled_distribution_is_the_models(tok):
    # init 0.1: spread enough that both a wrong temperature and a silent top_k=50 (vocab 57) show up
    model = make_model(tok, init=0.1)
    prompt, temperature, n = "Q: 3+4\nA:", 1.5, 4000
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    target = torch.softmax(logits / temperature, -1)

    def draw(**kw) -> tuple[list, torch.Tensor]:
        params = SamplingParams(max_new_tokens=1, temperature=temperature, stop_strings=(), **kw)
        rollouts = sample(model, tok, [prompt], n, params, seed=0, batch_size=n)
        first = torch.tensor([r.completion_ids[0] for r in rollouts])
        return rollouts, torch.bincount(first, minlength=len(tok)).double()

    def rejected(stat: float, dof: int) -> bool:
        # chi2(dof) has mean dof and sd sqrt(2 dof); 5 sd is a ~1e-6 false-alarm rate
        return stat > dof + 5 * math.sqrt(2 * dof)

    rollouts, counts = draw()
    stat, dof = chi_square(counts, target)
    assert dof >= 40 and not rejected(stat, dof), (stat, dof)
    # power checks: the same counts are rejected against the untempered distribution (wrong T) ...
    assert rejected(*chi_square(counts, torch.softmax(logits, -1)))
    # ... and transformers' silent default top_k=50 would be rejected too
    assert rejected(*chi_square(draw(top_k=50)[1], target))
    # behaviour log-probs are those of the tempered distribution
    lp = torch.log_softmax(logits / temperature, -1)
    assert all(abs(r.logprobs[0] - lp[r.completion_ids[0]].item()) < 1e-4 for r in rollouts[:50])


def greedy(model, tok, prompts, n_tokens=16, stop_strings=(), batch_size=64):
    params = SamplingParams(max_new_tokens=n_tokens, greedy=True, stop_strings=stop_strings)
    return sample(model, tok, prompts, 1, params, seed=0, batch_size=batch_size)


def test_stop_string_single_token_and_text(tok, model):
    free = greedy(model, tok, ["Q: 5\nA:"], n_tokens=16)[0]
    assert free.finish_reason == "length" and len(free.completion_ids) == 16
    ids = free.completion_ids
    # single-token stop string: the 3rd greedy token's text; truncation right after its first occurrence
    stop = tok.decode([ids[2]])
    first = ids.index(ids[2])
    got = greedy(model, tok, ["Q: 5\nA:"], n_tokens=16, stop_strings=(stop,))[0]
    assert got.completion_ids == ids[: first + 1] and got.finish_reason == "stop"
    assert got.logprobs == pytest.approx(free.logprobs[: first + 1], abs=1e-5)
    assert got.completion_text.endswith(stop)
    # multi-token stop string detected on the decoded text
    stop2 = tok.decode(ids[3:6])
    end = next(m for m in range(1, 17) if stop2 in tok.decode(ids[:m]))  # slow oracle: shortest prefix
    got = greedy(model, tok, ["Q: 5\nA:"], n_tokens=16, stop_strings=("zzzzzzzz", stop2))[0]
    assert got.completion_ids == ids[:end] and got.finish_reason == "stop"
    assert got.completion_text == tok.decode(ids[:end]) and got.completion_text.endswith(stop2)


def test_eos_from_generation_config_and_text_without_specials(tok, model):
    model2 = make_model(tok, init=0.3)
    free = greedy(model2, tok, ["Q: 5\nA:"], n_tokens=10)[0]
    eos_like = free.completion_ids[3]
    model2.generation_config.eos_token_id = [tok.eos_token_id, eos_like]
    got = greedy(model2, tok, ["Q: 5\nA:"], n_tokens=10)[0]
    cut = free.completion_ids.index(eos_like) + 1
    assert got.completion_ids == free.completion_ids[:cut] and got.finish_reason == "eos"


def test_answer_tag_is_a_stop_token_kept_in_text_and_eos_is_dropped(tok, model):
    # hot sampling from a peaked random model: some rollouts end in </answer>, some run to the limit
    params = SamplingParams(max_new_tokens=20, temperature=2.0)
    rollouts = sample(model, tok, ["Q: 1\nA:"], 200, params, seed=3)
    close, eos = tok.convert_tokens_to_ids("</answer>"), tok.eos_token_id
    reasons = {r.finish_reason for r in rollouts}
    assert reasons >= {"stop", "length"}
    for r in rollouts:
        assert close not in r.completion_ids[:-1] and eos not in r.completion_ids[:-1]
        if r.finish_reason == "stop":
            assert r.completion_ids[-1] == close and r.completion_text.endswith("</answer>")
        elif r.finish_reason == "eos":
            assert r.completion_ids[-1] == eos and "<eos>" not in r.completion_text
        else:
            assert len(r.completion_ids) == 20
        assert "<pad>" not in r.completion_text and "<bos>" not in r.completion_text


def test_same_seed_same_rollouts_other_seed_differs(tok, model):
    params = SamplingParams(max_new_tokens=10)
    a = sample(model, tok, PROMPTS, 4, params, seed=7)
    b = sample(model, tok, PROMPTS, 4, params, seed=7)
    c = sample(model, tok, PROMPTS, 4, params, seed=8)
    assert a == b
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]


def test_global_rng_untouched(tok, model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sample(model, tok, PROMPTS, 2, SamplingParams(max_new_tokens=5), seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_left_padding_does_not_change_greedy(tok, model):
    short = "Q: 2\nA:"
    alone = greedy(model, tok, [short])[0]
    batched = greedy(model, tok, ["Q: 1+2+3+4+5+6+7+8\nA:", short])[1]
    assert batched.completion_ids == alone.completion_ids
    assert batched.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_chunking_equals_one_batch_for_greedy(tok, model):
    prompts = PROMPTS + ["Q: 8*8\nA:", "Q: (1)\nA:"]
    one = greedy(model, tok, prompts, stop_strings=("</answer>", "ab"), batch_size=64)
    chunked = greedy(model, tok, prompts, stop_strings=("</answer>", "ab"), batch_size=2)
    assert [r.completion_ids for r in one] == [r.completion_ids for r in chunked]
    assert [r.finish_reason for r in one] == [r.finish_reason for r in chunked]
    for x, y in zip(one, chunked):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)


def test_with_project_tokenizer_and_tiny_model():
    tiny = pytest.importorskip("models.modeling.tiny_model")
    tokmod = pytest.importorskip("models.modeling.tokenizer")
    tok = tokmod.build_tokenizer()
    model = tiny.build_tiny_model(tok, seed=0, hidden_size=32, num_layers=2, intermediate_size=64)
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    rollouts = sample(model, tok, PROMPTS, 2, params, seed=0, batch_size=3)
    expected = teacher_forced_logprobs(model, rollouts, temperature=1.0)
    close = tok.convert_tokens_to_ids("</answer>")
    for r, exp in zip(rollouts, expected):
        assert r.prompt_ids[0] == tok.bos_token_id
        assert torch.allclose(torch.tensor(r.logprobs), torch.tensor(exp), atol=1e-4)
        assert close not in r.completion_ids[:-1]
