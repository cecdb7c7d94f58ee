"""Tokenisation (BOS, right padding to the batch maximum) and the frozen text encoder."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GemmaConfig, GemmaModel, PreTrainedTokenizerFast

from fusedit.text import TextEncoder, tokenize

WORDS = "a red blue green cat dog on the table sitting photo of small big".split()
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def make_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer, <pad>=0 <eos>=1 <bos>=2 <unk>=3, optionally BOS-prepending."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("llm")
    torch.manual_seed(0)
    config = GemmaConfig(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    GemmaModel(config).save_pretrained(root / "text_encoder")
    make_tokenizer().save_pretrained(root / "text_encoder")
    return str(root)


def test_tokenize_bos_known_words_and_right_padding():
    tok = make_tokenizer()
    ids, mask = tokenize(tok, ["a red cat", "the big dog sitting on a table", ""], max_length=64)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == (3, 8)  # longest = 1 + 7 tokens, already a multiple of 8
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert not (ids == tok.unk_token_id).any()
    assert mask.sum(1).tolist() == [4, 8, 1]
    # Right padding: a run of ones followed by pad ids under a run of zeros.
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert (ids[mask == 0] == tok.pad_token_id).all()


def test_tokenize_pads_to_batch_max_rounded_and_truncates():
    tok = make_tokenizer()
    ids, _ = tokenize(tok, ["a cat on the table", "a"], max_length=64)
    assert ids.shape[1] == 8
    ids, _ = tokenize(tok, ["a cat on the table", "a"], max_length=64, pad_to_multiple_of=None)
    assert ids.shape[1] == 6
    ids, _ = tokenize(tok, ["a cat " * 20], max_length=64, pad_to_multiple_of=16)
    assert ids.shape[1] == 48  # 41 tokens -> 48
    ids, mask = tokenize(tok, ["a cat " * 20], max_length=10)
    assert ids.shape == (1, 10) and mask.all() and ids[0, 0] == tok.bos_token_id


def test_tokenize_adds_bos_when_tokenizer_does_not():
    tok = make_tokenizer(add_bos=False)
    ids, mask = tokenize(tok, ["a red cat", ""], max_length=3, pad_to_multiple_of=None)
    assert ids.tolist() == [[2, 4, 5], [2, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_encoder_is_frozen_and_padding_invariant(encoder_dir):
    enc = TextEncoder(encoder_dir, subfolder="text_encoder")
    assert enc.hidden_size == 32
    assert not enc.model.training
    assert all(not p.requires_grad for p in enc.model.parameters())

    captions = ["a red cat on the table", "a dog", ""]
    ids8, mask8 = enc.tokenize(captions, max_length=64)
    ids40, mask40 = enc.tokenize(captions, max_length=64, pad_to_multiple_of=40)
    assert ids8.shape[1] == 8 and ids40.shape[1] == 40
    h8 = enc.encode(ids8, mask8)
    h40 = enc.encode(ids40, mask40)
    assert h8.dtype == torch.float32 and h8.shape == (3, 8, 32)
    assert not h8.requires_grad and not h8.is_inference()
    # Mathematically identical (causal + right padding); bitwise equality is not guaranteed
    # because GEMMs of different row counts may block their sums differently (~1 ulp here).
    for i, n in enumerate(mask8.sum(1).tolist()):
        torch.testing.assert_close(h8[i, :n], h40[i, :n], rtol=1e-6, atol=1e-6)


def test_encoder_last_index_is_final_norm_and_feeds_backward(encoder_dir):
    enc = TextEncoder(encoder_dir, subfolder="text_encoder")
    ids, mask = enc.tokenize(["a small blue cat"], max_length=16)
    hidden = enc.encode(ids, mask)
    with torch.no_grad():
        last = enc.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(hidden, last.float(), rtol=0, atol=0)

    proj = torch.nn.Linear(32, 4)
    proj(hidden).square().sum().backward()  # no "inference tensor" error
    assert proj.weight.grad is not None
    assert all(p.grad is None for p in enc.model.parameters())


def test_encoder_loads_in_the_requested_dtype(encoder_dir):
    enc = TextEncoder(encoder_dir, subfolder="text_encoder", torch_dtype=torch.bfloat16)
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    ids, mask = enc.tokenize(["a cat"], max_length=16)
    assert enc.encode(ids, mask).dtype == torch.float32
