"""Prompt tokenization as CogVideoXPipeline does it: T5 SentencePiece, pad to 226, no mask."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def load_tokenizer(folder: str | Path):
    """transformers' T5 tokenizer from a checkpoint's ``tokenizer/`` folder (offline)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} not found")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenize(tokenizer, prompts: list[str], max_length: int = 226) -> np.ndarray:
    """(B, max_length) int32 ids: ``</s>`` appended, right-padded with 0, truncated with a warning."""
    out = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="np")
    full = tokenizer(prompts, padding="longest", return_tensors="np").input_ids
    if full.shape[1] > max_length:
        for p, ids in zip(prompts, full):
            n = int((ids != tokenizer.pad_token_id).sum())
            if n > max_length:
                warnings.warn(f"prompt truncated to {max_length} T5 tokens: {n - max_length} token(s) dropped "
                              f"from {p[:60]!r}...", stacklevel=2)
    return np.asarray(out.input_ids, np.int32)
