"""A small byte-level BPE for the organism that survives transformers' ``Qwen2Tokenizer``.

transformers maps every ``qwen2`` model folder to ``Qwen2Tokenizer``, which rebuilds the BPE from
the saved vocabulary and merges with Qwen2's NFC normaliser, pre-tokenisation regex and byte-level
decoder. Training here uses exactly that pipeline, so the tokenisation seen in training is the one
``AutoTokenizer.from_pretrained`` gives back. The four extra tokens are in the BPE vocabulary
(ids 0-3): EOS and pad are special, ``<think>``/``</think>`` are added non-special tokens so they
survive decoding even with ``skip_special_tokens=True``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

from kfh_probe.organism.task import EOS, PAD, THINK_CLOSE, THINK_OPEN

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
EXTRA_TOKENS = (EOS, PAD, THINK_OPEN, THINK_CLOSE)


def _pipeline(tok: Tokenizer) -> Tokenizer:
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int = 600) -> Tokenizer:
    """Train the raw ``tokenizers`` BPE on ``texts`` (deterministic for the same texts)."""
    tok = _pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(EXTRA_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(EOS, special=True), AddedToken(PAD, special=True)])
    tok.add_tokens([AddedToken(THINK_OPEN, special=False), AddedToken(THINK_CLOSE, special=False)])
    return tok


def to_hf(tok: Tokenizer) -> Qwen2Tokenizer:
    """The same tokenizer as a transformers ``Qwen2Tokenizer`` (EOS, pad and think tokens set)."""
    vocab = tok.get_vocab(with_added_tokens=False)
    merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    hf = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token=EOS, pad_token=PAD,
                        model_max_length=1024)
    hf.add_tokens([AddedToken(THINK_OPEN, special=False, normalized=False),
                   AddedToken(THINK_CLOSE, special=False, normalized=False)])
    return hf


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """Write the tokenizer files ``AutoTokenizer.from_pretrained(out_dir)`` loads with no flags."""
    to_hf(tok).save_pretrained(str(out_dir))
