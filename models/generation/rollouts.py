"""Batched sampling from a causal LM: the one sampler behind evaluation, GRPO/PPO rollouts and
rejection sampling.

`sample` runs its own decoding loop on the model's KV cache instead of `model.generate`, for two
reasons: (1) it returns the log-prob of every sampled token under the distribution it was *actually*
drawn from (after temperature / top-k / top-p), which the RL losses need as the behaviour policy;
(2) it does less work: samples of one prompt share one prefill and, while their histories agree, one
row of the batch and of the KV cache (a row forks when its samples draw different tokens; every sample
still draws its own token independently from its own history's distribution), finished rows leave
the batch (and the cache), the LM head runs on the last position only, and the decoding-step attention
mask and attention are its own instead of generate's logits processors and stopping criteria. On the
built-in task, where the G samples of a prompt agree on most of their tokens, that is ~2x fewer
decoded rows than one row per sample.

The samples a seed gives depend on this layout (the random draws are taken per shared row), not
their distribution: each is drawn from softmax(filtered logits / T) of its own history.

What it does not do: beam search, repetition penalties, streaming. `top_k` defaults to 0 (off) on
purpose: transformers' generation config silently defaults to `top_k=50`, which makes the sampled
distribution differ from softmax(logits / T) and the log-probs wrong for any vocab > 50.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass

import torch

from models.modeling.chat import end_of_turn_id
from models.modeling.lora import merged_for_inference
from models.training.segment_attention import attention_implementation


@dataclass
class Rollout:
    """One sampled completion of one prompt."""

    prompt_index: int  # index into the prompts list
    sample_index: int  # 0..num_samples-1
    prompt_ids: list[int]  # prompt tokens incl. BOS, no padding
    completion_ids: list[int]  # generated tokens up to and including the stop/eos token, no padding
    completion_text: str  # decoded without eos/pad/bos, keeping stop strings such as "</answer>"
    logprobs: list[float]  # behaviour log-prob of each completion token (sampled-from distribution)
    finish_reason: str  # "stop" (stop string / stop token), "eos", "length" (hit max_new_tokens)


@dataclass
class SamplingParams:
    """How to sample. `greedy=True` ignores temperature/top-k/top-p."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (transformers defaults to 50; we never want that silently)
    greedy: bool = False
    stop_strings: tuple[str, ...] = ("</answer>",)


# --------------------------------------------------------------------------------------------------
# the sampling distribution


def filtered_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Log-probs of the distribution that is sampled from: softmax(logits / T) restricted to the top-k
    tokens and then to the smallest set of top tokens whose mass reaches top_p (nucleus sampling,
    Holtzman et al. 2020), renormalised. Removed tokens get -inf.

    logits: (B, V) float -> (B, V) float32 log-probs.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (use greedy=True for argmax decoding)")
    scores = logits.float() / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        sorted_probs = sorted_scores.softmax(-1)
        # mass strictly before each token; keep a token while that mass is still < top_p, so the top
        # token is always kept and the kept set is the smallest one with mass >= top_p
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scores, dim=-1)


# --------------------------------------------------------------------------------------------------
# stop handling


def _eos_ids(model, tokenizer) -> set[int]:
    """EOS of the tokenizer and of the generation config (every end-of-turn id a chat model lists
    there), and the chat template's end-of-turn token."""
    eot = end_of_turn_id(tokenizer)
    ids: set[int] = set() if eot is None else {eot}
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids


def _split_stop_strings(tokenizer, stop_strings) -> tuple[dict[int, str], list[str]]:
    """Stop strings that are one vocab token become stop token ids (checked on ids, cheap); the others
    are detected on decoded text. Caveat: a single-token stop string that also occurs *inside* some
    longer vocab token is only caught as its own token."""
    token_stops: dict[int, str] = {}
    text_stops: list[str] = []
    for s in stop_strings:
        ids = tokenizer.encode(s, add_special_tokens=False)
        if len(ids) == 1 and tokenizer.decode(ids, skip_special_tokens=False) == s:
            token_stops[ids[0]] = s
        else:
            text_stops.append(s)
    return token_stops, text_stops


def _strip_ids(tokenizer, keep: set[int]) -> set[int]:
    """Special ids (eos, pad, bos, ...) to drop before decoding; stop-string tokens are kept even when the
    tokenizer registered them as special."""
    return {int(i) for i in tokenizer.all_special_ids} - keep


# --------------------------------------------------------------------------------------------------
# the decoding loop


def _cache_kwarg(model) -> str:
    # transformers >= 5.2x renamed `past_key_values` to `cache`; accept both
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _make_cache(model, max_len: int, max_rows: int | None = None):
    """A KV cache that writes into buffers preallocated for `max_len` positions (and `max_rows` rows)
    and hands attention a view of the filled part (models/generation/kv_cache.py). transformers'
    DynamicCache `torch.cat`s every layer's keys and values each step, which on CPU costs more than
    the matmuls of a small model."""
    from transformers import DynamicCache

    cfg = model.config
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"]
    if getattr(cfg, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
        return DynamicCache(config=cfg)  # sliding-window / hybrid layers: the stock cache knows them
    try:
        from models.generation.kv_cache import preallocated_cache
    except ImportError:  # another internal layout of transformers' cache: the stock cache is slower but right
        return DynamicCache(config=cfg)
    return preallocated_cache(cfg.num_hidden_layers, max_len, max_rows)


def _append_rows(cache, src: torch.Tensor, rows: int) -> None:
    """Copies of cache rows `src` after the first `rows` rows (any cache: a full re-select if need be)."""
    for layer in cache.layers:
        if hasattr(layer, "append_rows"):
            layer.append_rows(src)
        else:
            layer.batch_select_indices(torch.cat([torch.arange(rows, device=src.device), src]))


DECODE_ATTENTION = "posttrain_decode"
FAST_DECODE = os.environ.get("POSTTRAIN_FAST_DECODE", "1") != "0"  # 0: SDPA for decoding steps too


def _decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention of one new token per row over the cache: two small matmuls and a softmax, the same math
    as transformers' eager attention (softmax in fp32), with the query heads grouped by key/value head
    instead of repeating the keys (GQA). On CPU this is faster per decoding step than SDPA's flash
    kernel with a padding mask. Anything else
    (prefill, soft-capping, attention sinks, position bias, dropout) goes to SDPA unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (query.shape[2] != 1 or (dropout and module.training) or kwargs.get("softcap") is not None
            or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    b, h, _, d = query.shape
    hk = key.shape[1]
    scale = scaling if scaling is not None else d**-0.5
    q = query.reshape(b, hk, h // hk, d)  # query head j reads key/value head j // (h // hk), as repeat_kv does
    scores = torch.matmul(q, key.transpose(2, 3)) * scale  # (b, hk, g, kv)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[2]]  # (b, 1, 1, kv) broadcasts
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).reshape(b, 1, h, value.shape[-1]), None


def _register_decode_attention() -> bool:
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(DECODE_ATTENTION, _decode_attention)
        return True
    except Exception:  # noqa: BLE001 - an older/newer transformers without the interface: SDPA stays
        return False


@contextlib.contextmanager
def _decode_attention_for(model):
    """Use `_decode_attention` for the decoding steps of `model` (SDPA/eager models only); restored after."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if not FAST_DECODE or current not in ("sdpa", "eager") or not _register_decode_attention():
        yield
        return
    with attention_implementation(config, DECODE_ATTENTION):
        yield


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def _draw(logits: torch.Tensor, k: int, params: SamplingParams, generator: torch.Generator):
    """k independent draws per row from the sampling distribution of `logits` (U, V), with their
    behaviour log-probs: ((U, k) tokens, (U, k) log-probs). Greedy: the argmax, k times."""
    if params.greedy:
        logp = torch.log_softmax(logits.float(), dim=-1)
        draws = logp.argmax(-1, keepdim=True).expand(-1, k)
    else:
        logp = filtered_logprobs(logits, params.temperature, params.top_k, params.top_p)
        draws = torch.multinomial(logp.exp(), k, replacement=True, generator=generator)
    return draws, logp.gather(-1, draws)


def _generate_chunk(model, rows, params, stop_ids, eos_ids, text_stop_check, generator, pad_id, cache_kw):
    """Decode one chunk of left-padded prompts. Returns per row (tokens, logprobs, finish_reason).

    Rows whose histories are identical so far share one *slot* of the batch and of the KV cache: the
    samples of one prompt (adjacent rows) start as a single slot after a single prefill, and a slot
    forks when its members draw different tokens. Every member draws its own token, independently,
    from its slot's distribution, which is the distribution of its own history: each row is sampled
    exactly as it would be alone, and each distinct history is computed once (a policy that agrees
    with itself across the G samples of a prompt, as RL policies soon do, decodes far fewer rows).
    Finished slots leave the batch once they are an eighth of it."""
    device = next(model.parameters()).device
    n = len(rows)
    is_first = [i == 0 or rows[i] != rows[i - 1] for i in range(n)]
    members: list[list[int]] = []
    for i in range(n):
        if is_first[i]:
            members.append([])
        members[-1].append(i)
    ids, mask = _left_pad([rows[m[0]] for m in members], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    # HF Llama's generate derives positions from the mask; do the same so left padding is invisible
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = _make_cache(model, ids.shape[1] + params.max_new_tokens, max_rows=n)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **{cache_kw: cache}
    )
    logits = out.logits[:, -1, :]
    next_pos = positions[:, -1:] + 1  # (slots, 1)
    # additive mask over the cached keys, (slots, 1, 1, kv); 0 = attend. finfo.min, not -inf: no NaNs.
    # Allocated once for every position to come (new tokens are attended: 0); each step passes a view.
    neg = torch.finfo(model.dtype if model.dtype.is_floating_point else torch.float32).min
    kv_len = mask.shape[1]
    add_mask = mask.new_zeros((len(members), 1, 1, kv_len + params.max_new_tokens), dtype=model.dtype)
    add_mask[:, 0, 0, :kv_len] = (1 - mask).to(model.dtype) * neg

    tokens: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    reasons = ["length"] * n
    alive = [True] * len(members)  # per slot: still decoding
    stop_t = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    eos_t = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    with _decode_attention_for(model):
        for step in range(params.max_new_tokens):
            k = max(len(m) for m, a in zip(members, alive) if a)
            draws, draw_lp = _draw(logits, k, params, generator)
            draws_l, lp_l = draws.tolist(), draw_lp.tolist()
            stop_l, eos_l = torch.isin(draws, stop_t).tolist(), torch.isin(draws, eos_t).tolist()
            feed = [0] * len(members)  # next input token per slot (a finished slot's is never read)
            forks: list[tuple[int, int, list[int]]] = []  # (source slot, token, members)
            for u, rows_u in enumerate(members):
                if not alive[u]:
                    continue
                groups: dict[int, list[int]] = {}
                for j, row in enumerate(rows_u):
                    t = draws_l[u][j]
                    tokens[row].append(t)
                    logps[row].append(lp_l[u][j])
                    groups.setdefault(t, []).append(j)
                kept = False
                for t, js in groups.items():
                    group = [rows_u[j] for j in js]
                    j0 = js[0]
                    why = ("stop" if stop_l[u][j0] else "eos" if eos_l[u][j0] else
                           "stop" if text_stop_check is not None and text_stop_check(tokens[group[0]]) else None)
                    if why is not None:
                        for row in group:
                            reasons[row] = why
                    elif not kept:  # the first group that goes on keeps the slot
                        members[u], feed[u], kept = group, t, True
                    else:  # the others fork: a copy of the slot's cache, fed their own token
                        forks.append((u, t, group))
                if not kept:
                    alive[u] = False
            live = [u for u in range(len(members)) if alive[u]]
            if (not live and not forks) or step == params.max_new_tokens - 1:
                break
            # drop finished slots once they are an eighth of the batch: fewer copies of the cache, less compute
            if len(live) <= len(members) * 7 // 8:
                src = live + [u for u, _, _ in forks]
                idx = torch.tensor(src, dtype=torch.long, device=device)
                for layer in cache.layers:
                    layer.batch_select_indices(idx)
                members = [members[u] for u in live] + [g for _, _, g in forks]
                feed = [feed[u] for u in live] + [t for _, t, _ in forks]
                next_pos, add_mask = next_pos[idx], add_mask[idx]
                alive = [True] * len(members)
            elif forks:
                idx = torch.tensor([u for u, _, _ in forks], dtype=torch.long, device=device)
                _append_rows(cache, idx, len(members))
                members += [g for _, _, g in forks]
                feed += [t for _, t, _ in forks]
                next_pos, add_mask = torch.cat([next_pos, next_pos[idx]]), torch.cat([add_mask, add_mask[idx]])
                alive += [True] * len(forks)
            kv_len += 1
            out = model(
                input_ids=torch.tensor(feed, dtype=torch.long, device=device)[:, None],
                attention_mask=add_mask[..., :kv_len],
                position_ids=next_pos,
                use_cache=True,
                **{cache_kw: cache},
            )
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
    return tokens, logps, reasons


def _prompt_ids(tokenizer, prompts) -> list[list[int]]:
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    out = [None if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    if texts:
        encoded = tokenizer([prompts[i] for i in texts], add_special_tokens=True)["input_ids"]
        for i, ids in zip(texts, encoded):
            out[i] = [int(t) for t in ids]
    return out


def sample(
    model, tokenizer, prompts: list[str] | list[list[int]], num_samples: int, params: SamplingParams, *, seed: int,
    batch_size: int = 64,
) -> list[Rollout]:
    """Sample `num_samples` completions of every prompt.

    Returns len(prompts) * num_samples rollouts in group-contiguous order (prompt 0's samples first).
    A prompt is token ids (what `models.modeling.chat.encode_prompt` gives: the stages pass these, rendered
    with the chat template where it applies) or plain text, tokenized with the tokenizer's own special
    tokens (its post-processor adds BOS). Prompts are left padded and decoded `batch_size` sequences
    at a time. The same `seed` gives the same rollouts for the
    same `batch_size`; the global torch RNG is not touched. The model is put in eval mode. A model with
    LoRA adapters decodes on merged weights (`models.modeling.lora.merged_for_inference`), left as it
    was on return.
    """
    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    model.eval()
    eos_ids = _eos_ids(model, tokenizer)
    token_stops, text_stops = _split_stop_strings(tokenizer, params.stop_strings)
    strip = _strip_ids(tokenizer, keep=set(token_stops))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos_ids) if eos_ids else 0)
    cache_kw = _cache_kwarg(model)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode([i for i in ids if i not in strip], skip_special_tokens=False)

    text_stop_check = None
    if text_stops:
        # a stop string of c characters spans at most c non-empty tokens; a margin covers empty ones.
        # Only occurrences ending in the newest token are new: older ones would have stopped earlier.
        window = max(len(s) for s in text_stops) + 4

        def text_stop_check(ids: list[int]) -> bool:
            tail = decode(ids[-window:])
            return any(s in tail for s in text_stops)

    prompt_ids = _prompt_ids(tokenizer, prompts)
    order = [(p, s) for p in range(len(prompts)) for s in range(num_samples)]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    rollouts: list[Rollout] = []
    # a LoRA policy decodes on merged weights (one matmul per linear layer, not three); restored after
    with merged_for_inference(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            rows = [prompt_ids[p] for p, _ in chunk]
            toks, lps, reasons = _generate_chunk(
                model, rows, params, set(token_stops), eos_ids, text_stop_check, generator, pad_id, cache_kw
            )
            for (p, s), t, lp, why in zip(chunk, toks, lps, reasons):
                text = decode(t)
                if why == "stop" and text_stops:
                    # cut after the first stop string (the last token may carry text beyond it)
                    ends = [text.find(x) + len(x) for x in text_stops if x in text]
                    if ends:
                        text = text[: min(ends)]
                rollouts.append(Rollout(p, s, list(prompt_ids[p]), t, text, lp, why))
    return rollouts
