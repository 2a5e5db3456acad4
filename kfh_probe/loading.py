"""Loading a local Hugging Face causal LM and its tokenizer, the same way for every command.

A model is a Hugging Face folder (``config.json``, weights, tokenizer) or a GGUF file (llama.cpp's
format; ``--model FILE.gguf``, or ``--model DIR --gguf-file NAME``). A GGUF file is dequantized once by
transformers' GGUF support (the ``gguf`` package) and saved as a float32 safetensors folder in the
cache, keyed by the file's SHA-256; every later load reads that folder, so the weights every command
sees, and the manifest's fingerprint, are those of the dequantized model. The cache lives in
``$KFH_ATTNPO_CACHE``, else ``$XDG_CACHE_HOME/kfh-attnpo``, else ``~/.cache/kfh-attnpo``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .errors import InputError, NotInstalledError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when available; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"`device` {device!r}: CUDA is not available on this machine", settings=("device",))
    return torch.device(device)


GGUF_FILE_HELP = "a GGUF file inside the --model folder (or pass the .gguf file itself as --model)"


def model_path(model: str | None, gguf_file: str | None = None) -> str | None:
    """The ``--model`` argument of a command, with ``--gguf-file NAME`` joined to it (``DIR/NAME``)."""
    if gguf_file is None:
        return model
    if model is None or not Path(model).is_dir():
        raise InputError(f"`gguf_file` {gguf_file} needs `model` to be the folder that holds it; {model} is not a folder",
                         settings=("gguf_file", "model"))
    return str(Path(model) / gguf_file)


def cache_root() -> Path:
    """Where converted models are kept (module docstring)."""
    if os.environ.get("KFH_ATTNPO_CACHE"):
        return Path(os.environ["KFH_ATTNPO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kfh-attnpo"


class ModelFolderError(InputError):
    """A ``--model`` that is no loadable causal LM; the message names the folder or file at fault."""


def model_folder(path: str | Path) -> Path:
    """The Hugging Face folder of ``path``: the folder itself, or a GGUF file's converted copy.

    The one model-folder check of every command: the folder must hold a ``config.json`` that is a JSON
    object whose ``model_type`` this transformers version knows as a causal language model.

    Raises:
        ModelFolderError: ``path`` is neither a ``.gguf`` file nor a folder with such a ``config.json``
            (the message names the path, or the ``config.json`` and what is wrong with it).
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        return _converted(path.resolve(), stat.st_size, stat.st_mtime_ns)
    if not (path / "config.json").is_file():
        what = "no such file or folder" if not path.exists() else "no config.json, and not a .gguf file"
        raise ModelFolderError(f"{path} is not a Hugging Face model folder or a GGUF file ({what})")
    _check_config(path / "config.json")
    return path


def _check_config(config: Path) -> None:
    """Refuse a ``config.json`` that transformers could not turn into a causal LM, naming the file."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .io import read_json

    data = read_json(config, ModelFolderError)
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise ModelFolderError(f"{config}: no 'model_type' (a JSON object with e.g. \"model_type\": \"qwen2\" is expected)")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ModelFolderError(f"{config}: unknown model_type {model_type!r}: this transformers version has no such architecture")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelFolderError(f"{config}: model_type {model_type!r} is not a causal language model")


def _from_pretrained(auto_class, path: str | Path, **kwargs):
    """``auto_class.from_pretrained`` on the checked folder of ``path``; what transformers refuses in it
    (missing or unreadable weight or tokenizer files, settings it rejects) becomes a
    :class:`ModelFolderError` naming the folder."""
    folder = model_folder(path)
    try:
        return auto_class.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelFolderError(f"{folder}: transformers cannot load it ({' '.join(str(err).split())})") from err


@functools.lru_cache(maxsize=None)
def _converted(gguf: Path, size: int, mtime_ns: int) -> Path:
    """``convert_gguf`` once per process for an unchanged file (the model and its tokenizer both ask)."""
    return convert_gguf(gguf)


def convert_gguf(gguf: Path) -> Path:
    """Dequantize ``gguf`` into a float32 safetensors folder in the cache, once per file content.

    The folder is built under a temporary name beside its final one and renamed when complete, so an
    interrupted conversion leaves nothing that a later load would take for finished. It holds the
    model, the tokenizer (chat template included) and ``kfh_source.json`` (the file and its SHA-256).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io import file_sha256

    sha = file_sha256(gguf)
    target = cache_root() / "gguf" / f"{gguf.stem}-{sha[:16]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"converting {gguf} to a safetensors folder (once): {target}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except ImportError as err:
            raise NotInstalledError(f"loading {gguf} needs the gguf package: pip install gguf ({err})") from None
        # The weights are dequantized already: save them as the plain float32 model they now are.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "kfh_source.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "sha256": sha}) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same conversion first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """``AutoModelForCausalLM.from_pretrained`` on a local folder or a GGUF file, in eval mode.

    The attention implementation is the model's default (sdpa where supported); capture never needs
    eager. Answer rows are computed in float32 whatever ``dtype`` the weights have.

    Raises:
        ModelFolderError: ``path`` fails :func:`model_folder`, or transformers cannot load the weights.
        InputError: an unknown ``dtype``, or a CUDA ``device`` on a machine without CUDA.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise InputError(f"`dtype` must be one of {sorted(DTYPES)}, got {dtype!r}", settings=("dtype",))
    model = _from_pretrained(AutoModelForCausalLM, path, dtype=DTYPES[dtype])
    return model.to(resolve_device(device)).eval()


def load_tokenizer(path: str | Path):
    """``AutoTokenizer.from_pretrained`` on a local folder or a GGUF file; it must return offsets.

    Raises:
        ModelFolderError: ``path`` fails :func:`model_folder`, has no loadable tokenizer, or only a slow one.
    """
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, path)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelFolderError(f"the tokenizer in {path} is not a fast tokenizer, so it cannot return character offsets")
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """The id used for right padding (masked out, so any id works; EOS when there is no pad token)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0
