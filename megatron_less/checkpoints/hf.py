"""HF Qwen2 folders on disk: a lazy, validated safetensors reader and a sharded writer.

The reader checks every tensor's name and shape against config.json from the safetensors
headers alone (no data is read), so a wrong file fails before any process group or model exists.
The writer produces what ``transformers.AutoModelForCausalLM.from_pretrained`` expects.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from collections.abc import Iterable
from typing import Any

import torch

from megatron_less.checkpoints.files import CheckpointError, dtype_name, read_json, write_json
from megatron_less.models import hf_mapping
from megatron_less.models.qwen2 import ConfigError, Qwen2Arch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# What a tokenizer folder may hold; copied verbatim on export.
TOKENIZER_PATTERNS = ("tokenizer*.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                      "added_tokens.json", "*.model", "*.tiktoken", "chat_template*.jinja",
                      "chat_template.json")


def expected_shapes(arch: Qwen2Arch) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a Qwen2ForCausalLM with this config has, and its shape."""
    h, i, hd = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_key_value_heads * hd
    out = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = (arch.vocab_size, h)
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, h), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
    }
    for layer in range(arch.num_hidden_layers):
        out.update({f"model.layers.{layer}.{k}": s for k, s in per_layer.items()})
    return out


def _shape_hint(name: str, arch: Qwen2Arch) -> str:
    fields = ["hidden_size"]
    if "embed" in name or "lm_head" in name:
        fields.append("vocab_size")
    if "self_attn" in name:
        fields += ["num_attention_heads", "num_key_value_heads", "head_dim"]
    if "mlp" in name:
        fields.append("intermediate_size")
    return ", ".join(f"{f}={getattr(arch, f)}" for f in fields)


class HFCheckpoint:
    """Read-only view of an HF Qwen2 folder: ``ckpt[name]`` loads one tensor on demand.

    Opening validates config.json (Qwen2 only) and the name and shape of every tensor the
    model needs. A tied checkpoint that also stores lm_head.weight is accepted; transformers
    ignores that copy too, so it is never read."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        if not os.path.isdir(self.folder):
            raise CheckpointError(f"HF checkpoint folder {self.folder} does not exist")
        cfg_path = os.path.join(self.folder, "config.json")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"no config.json in {self.folder}")
        self.config: dict[str, Any] = read_json(cfg_path)
        try:
            self.arch = Qwen2Arch.from_hf(self.config)
        except ConfigError as e:
            raise ConfigError(f"{cfg_path}: {e}") from None
        gen = os.path.join(self.folder, "generation_config.json")
        self.generation_config = read_json(gen) if os.path.isfile(gen) else None
        self._handles: dict[str, Any] = {}
        self.weight_map = self._weight_map()
        self._validate()

    def _weight_map(self) -> dict[str, str]:
        index = os.path.join(self.folder, INDEX_FILE)
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map'")
            missing = sorted({f for f in weight_map.values()
                              if not os.path.isfile(os.path.join(self.folder, f))})
            if missing:
                raise CheckpointError(f"{index} lists shard file(s) missing from {self.folder}: "
                                      f"{', '.join(missing)}")
            return dict(weight_map)
        single = os.path.join(self.folder, SINGLE_FILE)
        if not os.path.isfile(single):
            found = sorted(os.listdir(self.folder))
            hint = (" (PyTorch .bin checkpoints are not supported: re-save with "
                    "save_pretrained(safe_serialization=True))"
                    if any(f.endswith(".bin") for f in found) else "")
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.folder}{hint}; "
                                  f"found: {', '.join(found) or 'nothing'}")
        return {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}  # noqa: SIM118 (not a dict)

    def _open(self, file: str):
        from safetensors import safe_open

        if file not in self._handles:
            path = os.path.join(self.folder, file)
            try:
                self._handles[file] = safe_open(path, framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors' errors do not name the file
                raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        return self._handles[file]

    def _validate(self) -> None:
        expected = expected_shapes(self.arch)
        missing = [n for n in expected if n not in self.weight_map]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            tie = (" (config.json says tie_word_embeddings=false)"
                   if "lm_head.weight" in missing else "")
            raise CheckpointError(f"{self.folder} lacks tensor(s) {', '.join(missing[:5])}{more}"
                                  f"{tie}")
        for name in self.weight_map:
            m = re.match(r"model\.layers\.(\d+)\.", name)
            if m and int(m.group(1)) >= self.arch.num_hidden_layers:
                raise CheckpointError(f"{self.folder} holds {name} but config.json has "
                                      f"num_hidden_layers={self.arch.num_hidden_layers}")
        for name, shape in expected.items():
            got = tuple(self._open(self.weight_map[name]).get_slice(name).get_shape())
            if got != shape:
                raise CheckpointError(
                    f"shape mismatch for {name} in {self.weight_map[name]}: the file has "
                    f"{got}, config.json ({_shape_hint(name, self.arch)}) implies {shape}")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{name} is not in {self.folder}")
        return self._open(self.weight_map[name]).get_tensor(name)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> list[str]:
        return list(expected_shapes(self.arch))

    def dtype(self) -> torch.dtype:
        """The dtype the tensors are stored in (that of the embedding), from the file header."""
        name = "model.embed_tokens.weight"
        code = self._open(self.weight_map[name]).get_slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name} is stored as {code}; expected BF16, F16 or F32")
        return _SAFETENSORS_DTYPES[code]


def load_hf_checkpoint(model, hf: str | os.PathLike | HFCheckpoint, arch: Qwen2Arch | None = None
                       ) -> HFCheckpoint:
    """Fill this rank's stage/shard of ``model`` from an HF folder, one tensor at a time."""
    ckpt = hf if isinstance(hf, HFCheckpoint) else HFCheckpoint(hf)
    if arch is not None:
        check_same_arch(arch, ckpt.arch, ckpt.folder)
    hf_mapping.load_hf_weights(model, ckpt, ckpt.arch)
    return ckpt


def check_same_arch(arch: Qwen2Arch, saved: Qwen2Arch, where: str) -> None:
    diff = [f"{k}: model {getattr(arch, k)!r} vs checkpoint {getattr(saved, k)!r}"
            for k in arch.__dataclass_fields__ if getattr(arch, k) != getattr(saved, k)]
    if diff:
        raise ConfigError(f"{where} does not match the model: {'; '.join(diff)}")


# --- writing ------------------------------------------------------------------------------------

def hf_config_for_export(hf_config: dict, arch: Qwen2Arch, dtype: torch.dtype) -> dict:
    cfg = dict(hf_config)
    cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
               tie_word_embeddings=arch.tie_word_embeddings, vocab_size=arch.vocab_size)
    # transformers 5 reads "dtype", 4.x "torch_dtype": write both, same value.
    cfg["torch_dtype"] = cfg["dtype"] = dtype_name(dtype)
    return cfg


def write_shards(tensors: Iterable[tuple[str, torch.Tensor]], folder: str, prefix: str,
                 max_shard_bytes: int, dtype: torch.dtype | None = None) -> list[tuple[str, list[str], int]]:
    """Write (name, tensor) pairs into safetensors files ``{prefix}{k}.safetensors`` of at most
    ``max_shard_bytes`` each (one larger tensor gets a file of its own).

    Returns [(file, names, bytes)] so a caller can rename files and build the index."""
    from safetensors.torch import save_file

    written: list[tuple[str, list[str], int]] = []
    batch: dict[str, torch.Tensor] = {}
    size = 0

    def flush():
        nonlocal batch, size
        if batch:
            file = f"{prefix}{len(written)}.safetensors"
            save_file(batch, os.path.join(folder, file), metadata={"format": "pt"})
            written.append((file, list(batch), size))
            batch, size = {}, 0

    for name, t in tensors:
        t = (t if dtype is None else t.to(dtype)).detach().contiguous().cpu()
        n = t.numel() * t.element_size()
        if batch and size + n > max_shard_bytes:
            flush()
        batch[name] = t.clone() if t.untyped_storage().size() != n else t  # no shared storage
        size += n
    flush()
    return written


def finalize_hf_folder(folder: str, shards: list[tuple[str, list[str], int]], config: dict,
                       generation_config: dict | None, tokenizer_dir: str | None) -> None:
    """Give the shard files their HF names and add the index, configs and tokenizer files."""
    total = len(shards)
    weight_map: dict[str, str] = {}
    for k, (file, names, _) in enumerate(shards):
        final = SINGLE_FILE if total == 1 else f"model-{k + 1:05d}-of-{total:05d}.safetensors"
        os.replace(os.path.join(folder, file), os.path.join(folder, final))
        weight_map.update({n: final for n in names})
    if total > 1:
        index = {"metadata": {"total_size": sum(s for _, _, s in shards)},
                 "weight_map": dict(sorted(weight_map.items()))}
        write_json(os.path.join(folder, INDEX_FILE), index)
    write_json(os.path.join(folder, "config.json"), config)
    gen = dict(generation_config or {"_from_model_config": True})
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k not in gen and config.get(k) is not None:
            gen[k] = config[k]
    write_json(os.path.join(folder, "generation_config.json"), gen)
    if tokenizer_dir:
        copy_tokenizer(tokenizer_dir, folder)


def copy_tokenizer(src: str, dst: str) -> list[str]:
    if not os.path.isdir(src):
        raise CheckpointError(f"tokenizer folder {src} does not exist")
    files = sorted(f for f in os.listdir(src) if os.path.isfile(os.path.join(src, f))
                   and any(fnmatch.fnmatch(f, p) for p in TOKENIZER_PATTERNS))
    if not files:
        raise CheckpointError(f"no tokenizer files in {src} (looked for "
                              f"{', '.join(TOKENIZER_PATTERNS)})")
    for f in files:
        shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    return files
