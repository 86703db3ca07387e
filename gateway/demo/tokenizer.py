"""The demo tokenizer: a small byte-level BPE trained locally the way Qwen2 tokenizers are built.

The pipeline (NFC, Qwen's split regex isolated, byte-level without its own regex) is the one
``transformers.Qwen2Tokenizer`` rebuilds from ``vocab``/``merges`` on load, so the saved folder tokenizes the same
whether it is read as ``Qwen2Tokenizer`` or as a plain ``PreTrainedTokenizerFast`` from ``tokenizer.json``.
With a ~1k vocabulary most CJK characters stay split into byte pieces, which is what the gateway's incremental
detokenizer must cope with.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Real Qwen tokenizers carry these as added, non-special tokens: one id each, and kept by skip_special_tokens.
ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>")
VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 2048


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train the byte-level BPE on ``texts``; special tokens get ids 0-2, the added tokens the next ids after
    the learned vocabulary. Deterministic for the same texts."""
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(ADDED_TOKENS),
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The special and added tokens are whole ids of their own: keep their pieces out of the merges.
    pattern = re.compile("|".join(re.escape(token) for token in (*SPECIAL_TOKENS, *ADDED_TOKENS)))
    pieces = [piece for text in texts for piece in pattern.split(text) if piece]
    tokenizer.train_from_iterator(pieces, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tokenizer


def token_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of a token that must exist (the special and added tokens)."""
    found = tokenizer.token_to_id(token)
    if found is None:
        raise KeyError(f"token {token!r} is not in the demo tokenizer")
    return found


def save_tokenizer(tokenizer: Tokenizer, directory: Path, chat_template: str) -> None:
    """Write the files a Qwen2 model folder has: ``tokenizer.json``, ``vocab.json``, ``merges.txt``,
    ``tokenizer_config.json`` (with the chat template) and ``chat_template.jinja``.

    ``tokenizer_class`` is ``PreTrainedTokenizerFast`` with ``additional_special_tokens`` and the added-token
    table, so transformers 4.x and vLLM's pinned transformers load ``tokenizer.json`` as is; next to a ``qwen2``
    ``config.json``, transformers 5 still picks ``Qwen2Tokenizer`` (rebuilt from vocab+merges: same pipeline).
    """
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer.model.save(str(directory), prefix=None)  # vocab.json + merges.txt
    added = {
        str(tokenizer.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token in SPECIAL_TOKENS,
        }
        for token in (*SPECIAL_TOKENS, *ADDED_TOKENS)
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    text = json.dumps(config, ensure_ascii=False, indent=2) + "\n"
    (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")
    (directory / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
