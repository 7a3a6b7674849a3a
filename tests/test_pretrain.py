"""Pretraining examples: packed blocks (documents attend across their boundaries) and `packing:
documents` (each document its own example, attending only to itself)."""

import pytest
import torch

from models.config import PretrainConfig
from models.modeling.tiny_model import build_tiny_model
from models.modeling.tokenizer import build_tokenizer
from models.recipes.pretrain import document_examples, pack_documents
from models.training.lm_loss import causal_lm_nll_sum, collate

DOCS = ["4-0+2-7=-1", "1+1+1= 1+1 is 2, 2+1 is 3, so the result is 3.", "9-9-9=-9"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_document_examples_are_whole_documents(tok):
    ex = document_examples(DOCS, tok, 128)
    assert len(ex) == 3
    for (ids, labels), doc in zip(ex, DOCS):
        assert ids == labels
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == doc
    assert len(document_examples(DOCS, tok, 8)[1][0]) == 8  # cut at seq_len
    # blocks put all three into one 128-token block
    assert len(pack_documents(DOCS, tok, 128)) == 1


def test_documents_attend_only_to_themselves(tok):
    torch.manual_seed(0)
    model = build_tiny_model(tok, seed=0).eval()
    alone = [causal_lm_nll_sum(model, collate([e], tok.pad_token_id))[0] for e in document_examples(DOCS, tok, 128)]
    with torch.no_grad():
        together, n = causal_lm_nll_sum(model, collate(document_examples(DOCS, tok, 128), tok.pad_token_id))
        block, _ = causal_lm_nll_sum(model, collate(pack_documents(DOCS, tok, 128), tok.pad_token_id))
    assert n == sum(len(d) + 1 for d in DOCS)  # every token after BOS, EOS included
    assert torch.allclose(together, sum(alone), rtol=1e-5)
    assert not torch.allclose(block, sum(alone), rtol=1e-3)  # a block's later documents see the earlier ones


def test_packing_setting():
    assert PretrainConfig().packing == "blocks"
    assert PretrainConfig(packing="documents").packing == "documents"
    with pytest.raises(ValueError):
        PretrainConfig(packing="rows")
