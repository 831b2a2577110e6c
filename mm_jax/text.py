"""Prompt tokenization as CogVideoXPipeline does it: T5 SentencePiece, pad to 226, no mask.

    tok = load_tokenizer(ckpt / "tokenizer")
    ids = tokenize(tok, prompts)                      # (B, 226) int32
    emb = encode_prompts(t5, tok, prompts)            # (B, 226, d_model)
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from flax import nnx


def load_tokenizer(folder: str | Path):
    """transformers' T5 tokenizer from a checkpoint's ``tokenizer/`` folder (offline)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} not found")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenize(tokenizer, prompts: str | list[str], max_length: int = 226) -> np.ndarray:
    """(B, max_length) int32 ids: ``</s>`` appended, right-padded with 0, truncated with a warning.

    The call is ``_get_t5_prompt_embeds``'s; no attention mask is made, since the pipeline passes none.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if max_length < 1:
        raise ValueError(f"max_length={max_length}: must be >= 1 (CogVideoX uses 226)")
    out = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="np")
    lengths = np.asarray(tokenizer(prompts, padding="longest", return_tensors="np").attention_mask).sum(-1)
    for p, n in zip(prompts, lengths):
        if n > max_length:  # n counts the </s>, which truncation keeps
            warnings.warn(f"prompt truncated to {max_length} T5 tokens: {n - max_length} token(s) dropped "
                          f"from {p[:60]!r}...", stacklevel=2)
    return np.asarray(out.input_ids, np.int32)


@nnx.jit
def _encode(encoder, ids):
    return encoder(ids)


def encode_prompts(encoder, tokenizer, prompts: list[str], max_length: int = 226):
    """``encoder`` (a ``T5Encoder``) over ``tokenize(tokenizer, prompts, max_length)`` with no
    attention mask, as the pipeline does -> (B, max_length, d_model) in the encoder's dtype."""
    return _encode(encoder, tokenize(tokenizer, prompts, max_length=max_length))
