"""Attention computed per sequence over the one-row prefix tree of `models.training.layouts.segment_pack`
(the *segments* layout; see `models.training.packing`'s docstring), as a transformers attention function, plus
the row-gather ops it uses, and the context manager that switches a model's attention function for
a few forwards (also used by the sampler's decode attention in `models/generation/rollouts.py`)."""

from __future__ import annotations

import contextlib

import torch

SEGMENTS_ATTENTION = "posttrain_segments"  # the transformers attention function name of `segment_attention`


# Row gathers as opaque ops under torch.compile: inductor lowers the backward of index_select (a
# scatter-add) to a generic accumulate loop far slower than ATen's index_add_ kernel, which does
# the same sum. So inside a compiled graph the gather
# and its backward stay ATen calls. (Eager uses index_select itself: no custom-op dispatch cost.)
@torch.library.custom_op("posttrain::take_rows", mutates_args=())
def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] along dim 0 (index_select), with `put_rows` as its backward."""
    return x.index_select(0, index)


@take_rows.register_fake
def _(x, index):
    return x.new_empty((index.shape[0], *x.shape[1:]))


@torch.library.custom_op("posttrain::put_rows", mutates_args=())
def put_rows(grad: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """zeros(n, ...) with grad's rows summed into rows `index` (the backward of take_rows)."""
    return grad.new_zeros((n, *grad.shape[1:])).index_add_(0, index, grad)


@put_rows.register_fake
def _(grad, index, n):
    return grad.new_empty((n, *grad.shape[1:]))


def _take_rows_setup(ctx, inputs, output):
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.n = x.shape[0]


def _take_rows_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return put_rows(grad.contiguous(), index, ctx.n), None


def _put_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _put_rows_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return take_rows(grad, index), None, None


take_rows.register_autograd(_take_rows_backward, setup_context=_take_rows_setup)
put_rows.register_autograd(_put_rows_backward, setup_context=_put_rows_setup)


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, *,
                      segment_gather: torch.Tensor | None = None, segment_scatter: torch.Tensor | None = None,
                      **kwargs):
    """Attention over the one-row prefix tree of `segment_pack`, computed per sequence.

    query/key/value (1, H, N, D) hold every node; `segment_gather` (B, L) names the nodes of each
    sequence's path, `segment_scatter` (N,) the path position whose output each node keeps. Returns
    ((1, N, H, D), None) as transformers' attention functions do. Each path is a whole causal
    sequence, so causal SDPA on the gathered (B, H, L, D) batch gives every node the attention of
    its own sequence (the padded positions past a path's end read only what precedes them and are
    never scattered back). The backward of the gathers sums the gradient of a shared node's key and
    value over the paths that read it, as the tree mask does."""
    if segment_gather is None or segment_scatter is None:
        raise RuntimeError(f"{SEGMENTS_ATTENTION} attention runs only inside models.training.packing's segments forward")
    for unsupported in ("sliding_window", "softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"{SEGMENTS_ATTENTION}: {unsupported} is not supported")
    _, h, n, d = query.shape
    b, length = segment_gather.shape
    if key.shape[1] != h:  # grouped-query attention: key/value head j serves query heads j*r .. j*r+r-1
        key = key.repeat_interleave(h // key.shape[1], dim=1)
        value = value.repeat_interleave(h // value.shape[1], dim=1)
    flat = segment_gather.reshape(-1)
    compiling = torch.compiler.is_compiling()

    def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # eager: plain index_select is faster
        return take_rows(x.contiguous(), index) if compiling else x.index_select(0, index)

    def paths(x: torch.Tensor) -> torch.Tensor:  # (1, H, N, D) -> (B, H, L, D)
        return take(x[0].transpose(0, 1), flat).view(b, length, h, -1).transpose(1, 2)

    p_drop = dropout if module.training else 0.0
    if compiling and not p_drop:  # matmul-softmax beats the CPU flash kernel once inductor fuses it
        q, k = paths(query), paths(key)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
        ar = torch.arange(length, device=q.device)
        scores = scores.masked_fill(ar[None, :] > ar[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # in fp32 under bf16 too
        out = torch.matmul(probs, paths(value))
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            paths(query), paths(key), paths(value), dropout_p=p_drop, is_causal=True, scale=scaling,
        )
    out = take(out.transpose(1, 2).reshape(b * length, h, -1), segment_scatter)
    return out.unsqueeze(0), None


def register_segment_attention() -> bool:
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(SEGMENTS_ATTENTION, segment_attention)
        return True
    except Exception:  # noqa: BLE001 - a transformers without the attention interface: no segments layout
        return False


@contextlib.contextmanager
def attention_implementation(config, name: str):
    """Run the forwards of the model whose config this is with attention function `name` (the old one
    restored after). An implementation with no mask function registered makes transformers build no
    mask (the segments forward needs none)."""
    current = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = current
