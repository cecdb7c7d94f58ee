"""The LLMs our configs name, known offline: their transformers config fields.

One table for every place that must size a Gemma without reading the hub: the config loader (a
reference-layout YAML leaves the DiT's sizes to its LLM's own config), the planner (meta-device
builds of the text encoder and of a FuseDiT, which holds its LLM). The numbers are the public
config.json values of each checkpoint. The "-it" checkpoints share their base model's
architecture; PaliGemma's language model is a Gemma-2B decoder whose vocabulary adds 1,024
location and 128 segmentation tokens (257,216).
"""

from __future__ import annotations

GEMMA_2B: dict[str, int | str] = {
    "model_type": "gemma",
    "hidden_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "intermediate_size": 16384,
    "vocab_size": 256000,
}
GEMMA2_2B: dict[str, int | str] = {
    "model_type": "gemma2",
    "hidden_size": 2304,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "intermediate_size": 9216,
    "vocab_size": 256000,
}
_PALIGEMMA_TEXT = {**GEMMA_2B, "vocab_size": 257216}

# lower-case hub name -> architecture
KNOWN_LLMS: dict[str, dict[str, int | str]] = {
    "google/gemma-2b": GEMMA_2B,
    "google/gemma-2b-it": GEMMA_2B,
    "google/gemma-2-2b": GEMMA2_2B,
    "google/gemma-2-2b-it": GEMMA2_2B,
    "google/paligemma-3b-pt-224": _PALIGEMMA_TEXT,
    "google/paligemma-3b-pt-448": _PALIGEMMA_TEXT,
    "google/paligemma-3b-pt-896": _PALIGEMMA_TEXT,
}


def known_llm(name: str) -> dict[str, int | str] | None:
    """The architecture of hub model ``name`` (case-insensitive), or None when it is not known."""
    return KNOWN_LLMS.get(name.lower())
