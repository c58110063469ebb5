"""Load a tokenizer once per process and share it (rollout, reward masking and eval all need
the same one, and ``from_pretrained`` re-reads and re-parses the files each time)."""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.lru_cache(maxsize=8)
def _load(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_file() and p.suffix == ".model":
        return _from_sentencepiece_file(p)
    if not p.exists() and ("/" not in path or path.startswith((".", "/"))):
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist")
    if p.is_dir() and not trust_remote_code:  # remote code may read files of its own
        _check_tokenizer_files(p)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # batched generation and padding need one
    return tok


# Any one of these makes a tokenizer (fast JSON, SentencePiece, byte-level BPE, WordPiece).
_TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))


def _check_tokenizer_files(folder: Path) -> None:
    """transformers builds an empty tokenizer from a folder with only config.json (a converted
    checkpoint, an export without --tokenizer): every text then encodes to no tokens at all.
    Refuse such a folder by name instead."""
    if any(all((folder / f).is_file() for f in group) for group in _TOKENIZER_FILES):
        return
    expected = ", ".join(" + ".join(group) for group in _TOKENIZER_FILES)
    raise FileNotFoundError(
        f"{folder} has no tokenizer files (none of: {expected}); pass --tokenizer DIR with the "
        f"tokenizer of the model (e.g. the HF folder it was converted from)"
    )


def _from_sentencepiece_file(model: Path):
    """A bare SentencePiece ``.model``: load it as Llama-family checkpoints ship one (the
    tokenizer is converted in memory, so the temporary folder can go afterwards)."""
    import json
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        os.symlink(model.resolve(), os.path.join(d, "tokenizer.model"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer"}, f)
        return AutoTokenizer.from_pretrained(d)


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """A HF tokenizer from a folder (tokenizer.json, or SentencePiece tokenizer.model with its
    config), a bare ``.model`` SentencePiece file, or a hub id. Cached by resolved path."""
    p = Path(path)
    key = str(p.resolve()) if p.exists() else str(path)
    return _load(key, trust_remote_code)


def clear_tokenizer_cache() -> None:
    _load.cache_clear()


def stop_token_ids(tokenizer, model_dir: str | os.PathLike | None = None) -> tuple[int, ...]:
    """The tokenizer's EOS and those of the model's generation_config.json (Qwen2.5 lists two)."""
    import json

    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    gen = Path(model_dir) / "generation_config.json" if model_dir else None
    if gen is not None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return tuple(sorted(ids))
