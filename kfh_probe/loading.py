"""Loading a local Hugging Face causal LM and its tokenizer, the same way for every command."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when available; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """``AutoModelForCausalLM.from_pretrained`` on a local folder, in eval mode.

    The attention implementation is the model's default (sdpa where supported); capture never needs
    eager. Answer rows are computed in float32 whatever ``dtype`` the weights have.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    return model.to(resolve_device(device)).eval()


def load_tokenizer(path: str | Path):
    """``AutoTokenizer.from_pretrained`` on a local folder; it must return offsets."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(path))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"the tokenizer in {path} is not a fast tokenizer, so it cannot return character offsets")
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """The id used for right padding (masked out, so any id works; EOS when there is no pad token)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0
