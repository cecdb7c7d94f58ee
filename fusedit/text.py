"""Frozen text encoders: prompt tokenisation, the LLM hidden states that condition the DiT, and the
pooled CLIP text embedding that modulates a "fuse-dit-clip" FuseDiT (:class:`ClipTextEncoder`).

Two decisions differ from the reference (which always pads to 256 tokens):

* Prompts are right-padded only to the batch's longest prompt, rounded up to a small multiple.
  The encoder is a *causal* LLM and padding is on the right, so a real token never attends to a
  pad token: its hidden state is the same however much padding follows. Trimming the padding is
  therefore exact (up to float rounding: GEMMs over a different number of rows may sum in a
  different order, ~1 ulp), and it removes up to ~90% of the text keys every DiT layer attends over.
* :meth:`TextEncoder.encode` runs under ``torch.no_grad`` rather than ``inference_mode``: its
  output feeds a trainable projection, and autograd refuses to save inference tensors for backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from fusedit.config import TrainConfig


def _with_bos(ids: list[int], bos: int, max_length: int) -> list[int]:
    """Make sure a row starts with BOS (some tokenizers do not add it) and respects ``max_length``.

    Every prompt needs a first token even when the caption is empty (CFG dropout): BOS is the
    one token a causal LLM can always attend to.
    """
    if not ids or ids[0] != bos:
        ids = [bos, *ids]
    return ids[:max_length]


def padded_length(longest: int, max_length: int, pad_to_multiple_of: int | None) -> int:
    """Batch length: the longest row rounded up to the multiple (kernel-friendly), capped."""
    if pad_to_multiple_of:
        longest = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    return min(longest, max_length)


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    captions: list[str],
    max_length: int,
    pad_to_multiple_of: int | None = 8,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Token ids and attention mask (both int64, shape (B, L)) for ``BOS + caption``.

    Rows are truncated at ``max_length`` (BOS included) and right-padded, whatever the tokenizer's
    own ``padding_side``, to the longest row of the batch rounded up to ``pad_to_multiple_of``
    (never beyond ``max_length``). Right padding keeps positions 0..n-1 for the real tokens, as
    the reference does.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pad_token_rows(token_rows(tokenizer, captions, max_length), max_length, pad_to_multiple_of, pad)


def token_rows(tokenizer: PreTrainedTokenizerBase, captions: list[str], max_length: int) -> list[list[int]]:
    """Each caption's ``BOS + caption`` ids, truncated at ``max_length``: the per-row half of
    :func:`tokenize` (a data-loader worker tokenises its samples, the batch is padded later)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token; prompts are encoded as BOS + caption")
    encoded = tokenizer(list(captions), add_special_tokens=True, truncation=True, max_length=max_length)
    return [_with_bos(list(ids), bos, max_length) for ids in encoded["input_ids"]]


def pad_token_rows(
    rows: list[list[int]], max_length: int, pad_to_multiple_of: int | None, pad: int
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """(ids, mask) of :func:`token_rows` right-padded to the batch's longest row (see :func:`tokenize`)."""
    length = padded_length(max((len(r) for r in rows), default=1), max_length, pad_to_multiple_of)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def _pretrained_kwargs(subfolder: str | None) -> dict[str, Any]:
    return {"subfolder": subfolder} if subfolder else {}


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` (transformers >= 4.56) or the older ``torch_dtype=``: the wrong one is ignored silently."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


class TextEncoder:
    """A frozen causal LLM (e.g. Gemma-2B's decoder stack) and its tokenizer.

    ``hidden_states_index`` picks an entry of the model's ``hidden_states`` tuple (embeddings
    first, then one entry per layer). Index -1 is the output of the final RMSNorm: for Gemma,
    transformers overwrites the last entry with ``last_hidden_state``, which is what the
    reference conditions on. Other indices are pre-norm residual-stream states.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        subfolder: str | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        hidden_states_index: int = -1,
        torch_dtype: torch.dtype = torch.float32,
    ) -> None:
        """Load and freeze the model.

        ``tokenizer``: a loaded tokenizer, a path/name to load one from, or None to load it from
        the model's own folder (``pretrained_model_name_or_path`` + ``subfolder``).
        """
        kwargs = _pretrained_kwargs(subfolder)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        elif isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer: PreTrainedTokenizerBase = tokenizer
        self.model = AutoModel.from_pretrained(pretrained_model_name_or_path, **_dtype_kwarg(torch_dtype), **kwargs)
        self.model.eval()
        self.model.requires_grad_(False)
        self.hidden_states_index = hidden_states_index

    @classmethod
    def from_config(cls, cfg: TrainConfig, torch_dtype: torch.dtype) -> TextEncoder:
        """The frozen text encoder a training config names (``model.base``, its subfolder and
        hidden-state index, ``data.tokenizer``): the one place the trainer, the text cache and the
        bench load it, so all three compute the same features."""
        m = cfg.model
        return cls(
            m.base,
            subfolder=m.base_subfolder,
            tokenizer=cfg.data.tokenizer,
            hidden_states_index=m.text_hidden_states_index,
            torch_dtype=torch_dtype,
        )

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, hidden_states_index: int = -1
    ) -> TextEncoder:
        """Wrap an already-built model (e.g. a randomly initialised Gemma-2B for a benchmark)."""
        self = cls.__new__(cls)
        self.tokenizer, self.model, self.hidden_states_index = tokenizer, model, hidden_states_index
        self.model.eval()
        self.model.requires_grad_(False)
        return self

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> TextEncoder:
        """Move the model (not the tokenizer) to ``device``; returns self for chaining."""
        self.model.to(device)
        return self

    def tokenize(
        self, captions: list[str], max_length: int, pad_to_multiple_of: int | None = 8
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """:func:`tokenize` with this encoder's tokenizer."""
        return tokenize(self.tokenizer, captions, max_length, pad_to_multiple_of)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) float32 hidden states; pad keys masked, causal attention, no cache.

        No graph is built (frozen weights, ``no_grad``), yet the result is an ordinary tensor
        that a trainable layer may consume and save for backward.
        """
        device = self.device
        with torch.no_grad():
            out = self.model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                output_hidden_states=True,
                use_cache=False,
            )
        return out.hidden_states[self.hidden_states_index].float()


# --------------------------------------------------------------------------------------------
# CLIP text encoder: the pooled embedding of the "fuse-dit-clip" type
# --------------------------------------------------------------------------------------------
# CLIP's context length. The reference pads every prompt to it (its clip-llm data path and its
# CLIP pipeline); CLIP attends causally, so the padding never changes the pooled (EOS) state.
CLIP_MAX_LENGTH = 77


@dataclass(frozen=True)
class ClipSource:
    """Where a CLIP text model and its tokenizer load from (a hub id or a folder, each with a subfolder).

    Training reads it from the config (:meth:`from_config`), a sampler's ``--clip-l`` from one path
    (:meth:`from_path`); both load through :meth:`ClipTextEncoder.load`.
    """

    model: str
    model_subfolder: str | None = None
    tokenizer: str | None = None
    tokenizer_subfolder: str | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> ClipSource | None:
        """``model.clip_text_encoder[_subfolder]`` and ``data.clip_tokenizer[_subfolder]``; None without CLIP.

        With neither tokenizer field set, the tokenizer sits next to the model (same folder and
        subfolder), as in a plain CLIP checkpoint; SD3's layout names its ``tokenizer`` subfolder.
        """
        m, d = cfg.model, cfg.data
        if not m.clip_text_encoder:
            return None
        model, subfolder = m.clip_text_encoder, m.clip_text_encoder_subfolder
        if d.clip_tokenizer is None and d.clip_tokenizer_subfolder is None:
            return cls(model, subfolder, model, subfolder)
        return cls(model, subfolder, d.clip_tokenizer or model, d.clip_tokenizer_subfolder)

    @classmethod
    def from_path(cls, path: str) -> ClipSource:
        """The reference samplers' ``--clip_l``: a diffusers pipeline holding ``text_encoder/`` and
        ``tokenizer/`` (its default was SD3-medium's), or a local folder holding a CLIP text model
        and its tokenizer. A hub id is read as the pipeline layout, as the reference did."""
        folder = Path(path).expanduser()
        if folder.is_dir() and not (folder / "text_encoder").is_dir():
            return cls(str(folder), None, str(folder), None)
        return cls(path, "text_encoder", path, "tokenizer")

    def describe(self) -> dict[str, str | None]:
        """Plain JSON (what a sampler records in its settings)."""
        return {
            "model": self.model,
            "model_subfolder": self.model_subfolder,
            "tokenizer": self.tokenizer,
            "tokenizer_subfolder": self.tokenizer_subfolder,
        }


def clip_tokenize(tokenizer: PreTrainedTokenizerBase, captions: list[str]) -> torch.LongTensor:
    """(B, 77) int64 CLIP token ids: BOS + caption + EOS, truncated and padded to CLIP's context, as the
    reference tokenises for CLIP. No mask: CLIP attends causally, so the pads after EOS change nothing."""
    encoded = tokenizer(
        list(captions), padding="max_length", truncation=True, max_length=CLIP_MAX_LENGTH, return_tensors="pt"
    )
    return encoded["input_ids"].to(torch.long)


class ClipTextEncoder:
    """A frozen CLIP text model with its projection (``CLIPTextModelWithProjection``) and its tokenizer.

    :meth:`encode` returns the projected pooled embedding (``text_embeds``: the EOS token's final
    state through ``text_projection``), the vector the reference adds to a FuseDiT's timestep
    embedding (``model.text_modulation_embeds_dim``, 768 for CLIP-L). The caller picks the dtype:
    training loads it in the run's frozen-encoder dtype, sampling in fp32.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.model.eval()
        self.model.requires_grad_(False)

    @classmethod
    def load(cls, source: ClipSource, torch_dtype: torch.dtype = torch.float32) -> ClipTextEncoder:
        """Load model and tokenizer. A checkpoint without ``text_projection`` (a bare ``CLIPTextModel``)
        is an ``OSError`` like any unusable model folder: transformers would initialise it at random."""
        from transformers import CLIPTextModelWithProjection

        model, info = CLIPTextModelWithProjection.from_pretrained(
            source.model,
            output_loading_info=True,
            **_dtype_kwarg(torch_dtype),
            **_pretrained_kwargs(source.model_subfolder),
        )
        missing = [k for k in info.get("missing_keys", []) if "text_projection" in k]
        if missing:
            where = f"{source.model}" + (f" (subfolder {source.model_subfolder})" if source.model_subfolder else "")
            raise OSError(f"{where} has no {missing[0]}: a CLIPTextModelWithProjection checkpoint is needed")
        tokenizer = AutoTokenizer.from_pretrained(
            source.tokenizer or source.model, **_pretrained_kwargs(source.tokenizer_subfolder)
        )
        return cls(model, tokenizer)

    @property
    def embed_dim(self) -> int:
        """Width of the pooled embedding (the projection's output)."""
        return int(self.model.config.projection_dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> ClipTextEncoder:
        """Move the model (not the tokenizer) to ``device``; returns self for chaining."""
        self.model.to(device)
        return self

    def tokenize(self, captions: list[str]) -> torch.LongTensor:
        """:func:`clip_tokenize` with this encoder's tokenizer."""
        return clip_tokenize(self.tokenizer, captions)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) float32 pooled embeddings of (B, 77) token ids; no graph is built."""
        with torch.no_grad():
            out = self.model(input_ids=input_ids.to(self.device))
        return out.text_embeds.float()

    def embed(self, captions: list[str]) -> torch.Tensor:
        """(B, embed_dim) float32 pooled embeddings of captions (tokenised here)."""
        return self.encode(self.tokenize(captions))
