"""What a base pretrained on the R1-Zero corpus can do: answer directly, and work a chain out.

Pretrains the built-in tiny model in a plain torch loop (AdamW, 20 warm-up steps, then a constant
learning rate: the point is *when* a skill appears, not the best final model) on
`builtin_task.pretrain_corpus` with the worked docs after their question, and every `--every`
steps evaluates 128 held-out problems greedily, twice:

- as prompted (`4-0+2-7=`): which form the base picks (direct / worked / checked) and how often it
  is right in each;
- forced to work it out (`4-0+2-7= `, the space that starts a worked doc): accuracy, and for every
  worked step whether its operand is the question's (copy) and its result right (arithmetic).

`--packing blocks` concatenates documents into 128-token blocks that attend across documents (the
pretraining default); `--packing documents` restarts positions at every document and masks attention
to it (what `fetch.pretrain.packing: documents` does through the trainer's padding-free layouts).
`--draw docs` takes `--batch` documents a step one by one, as the flow does, instead of 32 blocks;
`--loop engine` runs the flow's own pretraining (`models/recipes/pretrain.py:train_pretrain` with
`packing: documents`: the DeepSpeed loop, `lm_step_fn`, the padding-free layouts), to tell the loop
from the data.

    .venv/bin/python -m benchmarks.probe_r1_zero_base --packing documents --worked 0.15 --check 0.15 \
        --steps 1000 --every 250
    .venv/bin/python -m benchmarks.probe_r1_zero_base --loop engine --worked 0.25 --check 0.15 \
        --steps 1000 --every 250

Not part of `make bench`: it measures what the base learns, at about 0.5 s a step on 2 cores (0.7 s
on one thread with `--loop engine`).
Numbers and what they were used for: docs/measurements.md, "R1-Zero: the pretraining corpus".
"""

from __future__ import annotations

import argparse
import collections
import random
import re
import time


def _masks(batch, pad_id, bos_id):
    import torch

    width = max(map(len, batch))
    seg = torch.full((len(batch), width), -1, dtype=torch.long)
    pos = torch.zeros((len(batch), width), dtype=torch.long)
    for r, ids in enumerate(batch):
        s, p = 0, 0
        for j, t in enumerate(ids):
            if t == bos_id and j > 0:
                s, p = s + 1, 0
            seg[r, j], pos[r, j] = s, p
            p += 1
    allowed = (seg[:, :, None] == seg[:, None, :]) & torch.tril(torch.ones(width, width, dtype=torch.bool))[None]
    allowed |= torch.eye(width, dtype=torch.bool)[None]  # padding rows attend to themselves (no NaN)
    return torch.zeros(len(batch), 1, width, width).masked_fill(~allowed[:, None], float("-inf")), pos


def _generate(model, tok, prompts, max_new_tokens=128):
    import torch

    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return [tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True) for o in out]


def evaluate(model, tok, problems, max_new_tokens=128) -> str:
    from models.data import builtin_task as bt

    model.eval()
    forms, right = collections.Counter(), collections.Counter()
    for p, c in zip(problems, _generate(model, tok, [p.prompt for p in problems], max_new_tokens)):
        form = "checked" if "check" in c else ("worked" if " is " in c else "direct")
        forms[form] += 1
        right[form] += bt.verify_lenient(p.prompt, c, p.answer) == 1.0
    steps = collections.Counter()
    solved = 0
    for p, c in zip(problems, _generate(model, tok, [p.prompt + " " for p in problems], max_new_tokens)):
        solved += bt.verify_lenient(p.prompt, c, p.answer) == 1.0
        ops = [(p.question[i], p.question[i + 1]) for i in range(1, len(p.question), 2)]
        for j, (a, op, d, r) in enumerate(re.findall(r"(-?\d+)([+-])(\d) is (-?\d+)", c.split(" Wait")[0])):
            steps["steps"] += 1
            steps["wrong_operand"] += j >= len(ops) or (op, d) != ops[j]
            steps["wrong_result"] += (int(a) + int(d) if op == "+" else int(a) - int(d)) != int(r)
    model.train()
    n = len(problems)
    prompted = " ".join(f"{f} {forms[f]} ({right[f]} right)" for f in ("direct", "worked", "checked"))
    return (f"as prompted: {sum(right.values()) / n:.3f} [{prompted}] | worked: {solved / n:.3f} "
            f"[{steps['steps']} steps, {steps['wrong_operand']} wrong operand, {steps['wrong_result']} wrong result]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packing", choices=("blocks", "documents"), default="documents")
    ap.add_argument("--worked", type=float, default=0.15, help="task.worked_fraction")
    ap.add_argument("--check", type=float, default=0.15, help="task.check_fraction")
    ap.add_argument("--seq-len", type=int, default=160,
                    help="longest document with --draw docs / --loop engine; evaluation generates seq_len - 32 tokens")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--docs", type=int, default=60000)
    ap.add_argument("--seed", type=int, default=0, help="the model's init and the batch order (the corpus is seed 0's)")
    ap.add_argument("--draw", choices=("blocks", "docs"), default="blocks",
                    help="blocks: 32 packed 128-token blocks a step (documents masked by hand with --packing "
                    "documents); docs: --batch documents a step, drawn one by one as the flow's "
                    "`packing: documents` does (document_examples, --seq-len, EpochSampler)")
    ap.add_argument("--batch", type=int, default=96, help="documents a step with --draw docs")
    ap.add_argument("--loop", choices=("plain", "engine"), default="plain",
                    help="plain: this file's torch loop; engine: the flow's own pretraining (train_pretrain, "
                    "packing: documents)")
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()
    if args.loop == "engine":
        return _engine(args)

    import torch

    from models.modeling.tiny_model import build_tiny_model
    from models.recipes.pretrain import document_examples, pack_documents
    from models.training.batching import EpochSampler

    torch.manual_seed(args.seed)
    test, docs, tok = _data(args)
    if args.draw == "docs":
        examples = [ids for ids, _ in document_examples(docs, tok, args.seq_len)]
        sampler = EpochSampler(len(examples), args.seed)
    else:
        blocks = [ids for ids, _ in pack_documents(docs, tok, 128)]
    model = build_tiny_model(tok, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng, order, t0 = random.Random(args.seed), [], time.time()
    for step in range(1, args.steps + 1):
        if args.draw == "docs":
            batch = [examples[i] for i in sampler.indices((step - 1) * args.batch, args.batch)]
        else:
            if len(order) < 32:
                idx = list(range(len(blocks)))
                rng.shuffle(idx)
                order += idx
            batch = [blocks[i] for i in order[:32]]
            del order[:32]
        width = max(map(len, batch))
        ids = torch.tensor([b + [tok.pad_token_id] * (width - len(b)) for b in batch])
        labels = torch.tensor([b + [-100] * (width - len(b)) for b in batch])
        kw = {}
        if args.draw == "docs":  # one document a row: the padding mask is the document mask
            kw["attention_mask"] = (torch.arange(width)[None] < torch.tensor([len(b) for b in batch])[:, None]).long()
        elif args.packing == "documents":
            kw["attention_mask"], kw["position_ids"] = _masks(batch, tok.pad_token_id, tok.bos_token_id)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / args.warmup)
        loss = model(input_ids=ids, labels=labels, **kw).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % args.every == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s | {evaluate(model, tok, test[:128], args.seq_len - 32)}",
                  flush=True)


def _engine(args) -> None:
    """The flow's own pretraining (`train_pretrain`, packing: documents) with this file's evaluation."""
    import tempfile

    import torch

    from models.config import PretrainConfig, TaskConfig
    from models.recipes.pretrain import train_pretrain

    test, _, tok = _data(args, corpus=False)
    cfg = PretrainConfig(lr=args.lr, max_steps=args.steps, batch_size=args.batch, micro_batch_size=args.batch,
                         seq_len=args.seq_len, packing="documents", lr_schedule="constant", warmup_steps=args.warmup,
                         save_every=10**6, seed=args.seed, num_threads=torch.get_num_threads())
    task = TaskConfig(seed=0, n_test=256, min_operands=3, max_operands=6, pretrain_docs=args.docs,
                      worked_fraction=args.worked, check_fraction=args.check, worked_after_question=True)
    t0 = time.time()

    def after(engine, step):
        if (step + 1) % args.every == 0:
            print(f"step {step + 1} {time.time() - t0:.0f}s | {evaluate(engine.module, tok, test[:128], args.seq_len - 32)}",
                  flush=True)

    with tempfile.TemporaryDirectory() as d:
        train_pretrain({"config": cfg.model_dump(), "task": task.model_dump(), "workdir": d}, after_step=after)


def _data(args, corpus: bool = True):
    """The held-out problems (seed 0's), the pretraining corpus the flow builds for them, the tokenizer."""
    from models.data import builtin_task as bt
    from models.modeling.tokenizer import build_tokenizer

    _, test = bt.make_problems(0, 1, 256, 3, 6, "plain")
    docs = bt.pretrain_corpus(0, args.docs, {p.question for p in test}, args.worked, 3, 6,
                              check_fraction=args.check, worked_after_question=True) if corpus else None
    return test, docs, build_tokenizer()


if __name__ == "__main__":
    main()
