"""Prompt tokenization as CogVideoXPipeline does it: T5 SentencePiece, pad to 226, no mask.

    tok = load_tokenizer(ckpt / "tokenizer")
    ids = tokenize(tok, prompts)                      # (B, 226) int32
    emb = encode_prompts(t5, tok, prompts)            # (B, 226, d_model)
    i = find_class_token(tok, prompt, ids[0], CLASS_WORDS)   # where the identity is fused
"""
from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Container, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

# The words that name the subject of a caption or prompt. Magic Mirror fuses the identity into
# the text at the first of them, so every caption of the training data needs one: this is the one
# list the dataset builders, the loaders and the adapter's config default all use.
CLASS_WORDS = ("man", "woman", "person", "boy", "girl", "kid", "child", "lady", "gentleman", "guy", "baby",
               "teenager", "men", "women", "people")


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


def _encode(encoder, ids: jax.Array) -> jax.Array:
    """The compiled T5 call on token ids (B, L) -> (B, L, d_model), no attention mask: what the
    sampler runs and the planner compiles as the ``text_encoder`` phase."""
    return encoder(ids)


encode_ids = jax.jit(_encode)


@functools.lru_cache(maxsize=None)
def encode_ids_on(platform: str):
    """``encode_ids`` for running on ``platform``: on CPU with ``layers.scan_compiler_options``,
    which keep XLA from holding the bf16 weights a second time in f32."""
    from mm_jax.models import layers

    options = layers.scan_compiler_options(platform)
    return jax.jit(_encode, compiler_options=options) if options else encode_ids


def encode_prompts(encoder, tokenizer, prompts: list[str], max_length: int = 226):
    """``encoder`` (a ``T5Encoder``) over ``tokenize(tokenizer, prompts, max_length)`` with no
    attention mask, as the pipeline does -> (B, max_length, d_model) in the encoder's dtype. The
    ids go where the encoder's parameters are (the host CPU when T5 is offloaded)."""
    ids = tokenize(tokenizer, prompts, max_length=max_length)
    where = jax.tree.leaves(nnx.state(encoder, nnx.Param))[0].sharding
    if isinstance(where, NamedSharding):
        where = NamedSharding(where.mesh, PartitionSpec())  # replicated over the encoder's mesh
    platform = next(iter(where.device_set)).platform
    return encode_ids_on(platform)(encoder, jax.device_put(ids, where))


def has_class_word(caption: str, words: Sequence[str] = CLASS_WORDS) -> bool:
    """Whether ``caption`` contains one of ``words`` as a whole word (case-insensitive): the cheap
    check of the dataset builders, before any tokenizer is loaded."""
    return any(re.search(rf"\b{re.escape(w)}\b", caption, re.IGNORECASE) for w in words)


# -- class words: where the identity is fused, and what falls off the end ---------------------

def class_token_index(input_ids: Sequence[int], word_token_ids: Sequence[Sequence[int]],
                      continues_word: Container[int]) -> int | None:
    """First position p where one of ``word_token_ids`` starts in ``input_ids`` as a whole word
    (the token after it is not in ``continues_word``); None when there is none. Pure."""
    ids = [int(i) for i in input_ids]
    words = [list(map(int, w)) for w in word_token_ids if len(w)]
    for p in range(len(ids)):
        for w in words:
            end = p + len(w)
            if ids[p:end] == w and (end >= len(ids) or ids[end] not in continues_word):
                return p
    return None


def find_class_token(tokenizer, prompt: str, input_ids: np.ndarray, class_words: Sequence[str]) -> int:
    """Index into ``input_ids`` of the first T5 token of the first class word of ``prompt``.

    A class word is matched as the token sequence the tokenizer gives the word on its own
    (lower-case, Capitalized or UPPER), starting a word and not continued by the next token
    ("man" does not match "manly"). Raises ValueError listing the words when none is found.
    """
    variants = sorted({v for w in class_words for v in (w.strip(), w.strip().lower(), w.strip().capitalize(),
                                                         w.strip().upper())})
    unk = getattr(tokenizer, "unk_token_id", None)
    # a spelling with unknown pieces would match any unknown text (<unk> stands for many strings)
    word_ids = [ids for ids in (tokenizer(v, add_special_tokens=False).input_ids for v in variants) if unk not in ids]
    present = sorted({int(i) for i in np.asarray(input_ids).reshape(-1)})
    pieces = tokenizer.convert_ids_to_tokens(present)
    # a SentencePiece piece without the word-start mark that begins with a letter/digit continues a word
    continues = {i for i, p in zip(present, pieces) if p and not p.startswith("\u2581") and p[0].isalnum()}
    idx = class_token_index(np.asarray(input_ids).reshape(-1), word_ids, continues)
    if idx is None:
        said = [w for w in class_words if re.search(rf"\b{re.escape(w.strip())}\b", prompt, flags=re.IGNORECASE)]
        where = (f"; {said} appear in the prompt but not within its {len(input_ids)} kept text tokens" if said else "")
        raise ValueError(f"the prompt names no subject class word; it needs one of: {', '.join(class_words)}"
                         f"{where} (prompt: {prompt!r})")
    return idx


def check_dropped_tokens(input_ids: np.ndarray, num_id_tokens: int, pad_token_id: int = 0) -> bool:
    """Warn when fusion drops real tokens: it keeps the length by dropping the last N_id - 1
    positions, which should be padding. input_ids (L,) or (B, L). Returns True when all were padding."""
    n = num_id_tokens - 1
    ids = np.asarray(input_ids)
    if n <= 0:
        return True
    tail = ids[..., -n:]
    if np.all(tail == pad_token_id):
        return True
    warnings.warn(f"the prompt fills the last {n} of its {ids.shape[-1]} text positions (token ids "
                  f"{tail.tolist()}); the identity fusion inserts {num_id_tokens} tokens for the class word and "
                  f"drops them: shorten the prompt", stacklevel=2)
    return False
