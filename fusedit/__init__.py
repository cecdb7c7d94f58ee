"""Text-to-image stage: Fuse-DiT-style DiT conditioned on a frozen LLM, trained with flow matching."""
