"""The toy world's tokenizer and tiny Gemma-architecture text encoder (``from_pretrained``-loadable).

A word-level tokenizer with Gemma's special-token ids and a tiny Gemma encoder left at its seeded
initialisation: loaded through ``AutoTokenizer`` / ``AutoModel.from_pretrained(dir)`` exactly
like ``google/gemma-2b`` in a real run.
"""

from __future__ import annotations

from toyworld.world import SPECIAL_TOKENS


# --------------------------------------------------------------------------------------------
# Tokenizer and text encoder
# --------------------------------------------------------------------------------------------
def build_tokenizer(captions: list[str], model_max_length: int = 128):
    """Word-level fast tokenizer trained on the captions, with Gemma's special-token ids.

    A ``tokenizer.json`` (rather than a sentencepiece model) is what loads reliably through
    ``AutoTokenizer`` in transformers 5; the post-processor prepends ``<bos>`` and adds no EOS,
    matching how Gemma-2B is used by the reference pipeline.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(captions, trainer)
    bos = SPECIAL_TOKENS.index("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=model_max_length,
    )


def text_encoder_config(vocab_size: int):
    """A Gemma config with the real model's structure (multi-query attention, GeGLU) at toy size."""
    from transformers import GemmaConfig

    return GemmaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def train_text_encoder(tokenizer, captions: list[str], seed: int, steps: int, progress: bool):
    """Seeded tiny Gemma, optionally trained as a next-token model on the training captions.

    The default is ``steps=0``: the seeded random network. Next-token training on these captions
    is harmful here: colour, shape and background words are interchangeable in context, so with
    Gemma's tied input/output embeddings they collapse to nearly the same vector (measured: 300
    steps shrank the hidden-state difference between "red ... white" and "blue ... black"
    captions from 40% to 2-5% of their norm), and a DiT conditioned on it could not tell the
    prompts apart. A random network keeps every word distinct, which is all the DiT needs.
    Returns (GemmaModel, final loss; NaN when untrained).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GemmaForCausalLM

    torch.manual_seed(seed)
    lm = GemmaForCausalLM(text_encoder_config(len(tokenizer)))
    generator = torch.Generator().manual_seed(seed)
    batch = tokenizer(captions, padding=True, return_tensors="pt")
    ids = torch.cat([batch["input_ids"], torch.zeros_like(batch["input_ids"][:, :1])], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.zeros_like(batch["attention_mask"][:, :1])], dim=1)
    lengths = mask.sum(1)
    ids[torch.arange(len(ids)), lengths] = tokenizer.eos_token_id  # learn where captions end
    mask[torch.arange(len(ids)), lengths] = 1
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    lm.train()
    for _ in tqdm(range(steps), desc="toy text encoder", disable=not progress):
        rows = torch.randint(len(ids), (64,), generator=generator)
        loss = lm(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model = lm.model.eval()
    return model, loss.item()
