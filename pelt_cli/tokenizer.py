"""Loading a tokenizer for training, evaluation and prediction: refuse a directory without one instead of letting
transformers build an empty tokenizer (special tokens only) from ``config.json``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pelt_cli.errors import UsageError

VOCAB_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def load_tokenizer(
    src: str | os.PathLike[str], hint: str = "save the tokenizer beside the model: tokenizer.save_pretrained(DIR)"
) -> Any:
    """``AutoTokenizer`` of a directory, with ``pad_token`` set (to eos, else unk) when it has none.

    Raises:
        UsageError: no tokenizer there, or one without pad, eos and unk tokens.
    """
    import transformers

    if not any((Path(src) / f).is_file() for f in VOCAB_FILES):
        # transformers would build an empty tokenizer (special tokens only) from config.json alone
        raise UsageError(
            f"{src}: no tokenizer found (none of {', '.join(VOCAB_FILES[:3])}, …)",
            hint=hint,
        )
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(
            f"{src}: no tokenizer found ({str(e).splitlines()[0][:120]})",
            hint=hint,
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if tok.pad_token is None:
        raise UsageError(f"{src}: the tokenizer has no pad, eos or unk token; expected one to pad with")
    return tok
