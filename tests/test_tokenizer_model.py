import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from models.data.builtin_task import TASK_VERSION, make_problem
from models.modeling.tiny_model import build_tiny_model, save_hf, tiny_config
from models.modeling.tokenizer import build_tokenizer

SAMPLE = make_problem("x", "4-0+2-7")
TEXT = SAMPLE.prompt + SAMPLE.solution


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_special_ids(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "left"
    assert tok.convert_tokens_to_ids(["<think>", "</think>", "<answer>", "</answer>"]) == [4, 5, 6, 7]


def test_round_trip_and_one_token_per_char(tok):
    ids = tok(TEXT)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert tok.decode(ids) == "<bos>" + TEXT
    # "Q: 4-0+2-7\nA:" is 13 characters, then <think>, "4-0=4\n4+2=6\n6-7=-1" (5+1+5+1+6 = 18), </think>,
    # <answer>, "-1" (2), </answer>: 13 + 1 + 18 + 1 + 1 + 2 + 1 = 37, plus BOS
    assert len(ids) == 38
    assert tok.tokenize("<answer>") == ["<answer>"]
    odd = "Hello, World? (a*b)/c: yes! x\n"
    assert tok.decode(tok(odd)["input_ids"], skip_special_tokens=True) == odd
    assert tok("a  b")["input_ids"][1:] == [tok.convert_tokens_to_ids(c) for c in "a  b"]


def test_unknown_char_is_unk(tok):
    assert tok("a\u00e9")["input_ids"] == [1, tok.convert_tokens_to_ids("a"), tok.unk_token_id]


def test_left_padding(tok):
    batch = tok(["1+2", "1+2+3"], padding=True)
    assert batch["input_ids"][0][:2] == [0, 0] and batch["input_ids"][0][2] == tok.bos_token_id
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1]
    assert batch["input_ids"][1][0] == tok.bos_token_id


def test_chat_template(tok):
    msgs = [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "4-0+2-7"},
        {"role": "assistant", "content": SAMPLE.solution},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<bos>Be exact.\nQ: 4-0+2-7\nA:" + SAMPLE.solution + "<eos>"
    prompt = tok.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos>" + SAMPLE.prompt
    ids = tok.apply_chat_template(msgs[1:], tokenize=True, return_dict=True)["input_ids"]
    assert ids == tok(TEXT)["input_ids"] + [tok.eos_token_id]  # exactly one BOS


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [TEXT, "a b\nc", "1+2"]
    assert loaded(texts, padding=True)["input_ids"] == tok(texts, padding=True)["input_ids"]
    assert loaded.padding_side == "left"
    assert loaded.decode(loaded(TEXT)["input_ids"], skip_special_tokens=True) == TEXT


def test_tiny_config_overrides():
    cfg = tiny_config(85, num_layers=2, rope_theta=500.0)
    assert cfg.num_hidden_layers == 2 and cfg.tie_word_embeddings and cfg.hidden_size == 192


def test_model_size_and_determinism(tok):
    m1, m2, m3 = build_tiny_model(tok, seed=0), build_tiny_model(tok, seed=0), build_tiny_model(tok, seed=1)
    n = sum(p.numel() for p in m1.parameters())
    assert 1_000_000 <= n <= 5_000_000  # ~1.79M with the defaults
    assert m1.config.pad_token_id == 0 and m1.config.bos_token_id == 1 and m1.config.eos_token_id == 2
    assert m1.lm_head.weight.data_ptr() == m1.model.embed_tokens.weight.data_ptr()  # tied
    sd1, sd2, sd3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert not torch.equal(sd1["model.embed_tokens.weight"], sd3["model.embed_tokens.weight"])
    assert all(p.dtype == torch.float32 for p in m1.parameters())


def test_save_hf_round_trip(tok, tmp_path):
    model = build_tiny_model(tok, seed=3).eval()
    save_hf(model, tok, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ltok = AutoTokenizer.from_pretrained(tmp_path)
    batch = ltok([SAMPLE.prompt, "Q: 1+2\nA:"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == tok([SAMPLE.prompt, "Q: 1+2\nA:"], padding=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert (tmp_path / "model.safetensors").exists()
    gen = GenerationConfig.from_pretrained(tmp_path)
    assert gen.top_k == 0 and gen.top_p == 1.0 and gen.temperature == 1.0 and gen.do_sample
    assert gen.eos_token_id == [2, 7] and gen.pad_token_id == 0
    assert loaded.generation_config.top_k == 0
    meta = json.loads((tmp_path / "posttrain.json").read_text())
    assert meta == {
        "prompt_template": "Q: {question}\nA:",
        "stop_strings": ["</answer>"],
        "task": "builtin",
        "task_version": TASK_VERSION,
    }
    out = loaded.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2
