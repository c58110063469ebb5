"""HF <-> Megatron conversion of tiny random Qwen2 models written by transformers.

One 4-rank job does every layout (TP1, TP2, PP2, TP2xPP2): import from HF, logits, save; load
each checkpoint at another layout, logits; export every checkpoint back to HF. Two command runs
(``megatron-less convert-hf``, ``tools/convert_megatron_to_hf.py``) cover the commands. Everything
else here runs in the pytest process.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megatron_less.checkpoints import convert, files, hf
from megatron_less.checkpoints import model as megatron_ckpt
from megatron_less.checkpoints.files import CheckpointError
from megatron_less.models.qwen2 import ConfigError
from megatron_less.parallel.spawn import run_distributed
from tests import tiny

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
# vocab 250 pads to 256 rows at TP1 and TP2; vocab 300 pads to 384 at TP1 but 512 at TP2, so
# loading across those layouts must re-pad. The untied model is saved as 9 sharded files.
MODELS = {
    "tied": dict(tie_word_embeddings=True, vocab_size=250),
    "untied": dict(tie_word_embeddings=False, vocab_size=300, seed=1, max_shard_size="100KB"),
}
SEQ = 16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _logits(model, tokens):
    """Full-vocabulary logits on the rank holding them (last stage, TP rank 0), else None."""
    from megatron.core import parallel_state as ps

    from megatron_less.models.schedule import forward_logits

    local = forward_logits([model], tokens)
    if not ps.is_pipeline_last_stage():
        return None
    parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
    keep = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    return torch.cat(parts, dim=-1) if keep else None


def _padding_rows(model, arch):
    """This rank's embedding/output rows beyond the real vocabulary."""
    from megatron.core import parallel_state as ps

    out = []
    for name, p in model.named_parameters():
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            start = ps.get_tensor_model_parallel_rank() * p.shape[0]
            out.append(p.detach()[max(0, arch.vocab_size - start):])
    return out


def _job(root, tokens):
    from megatron_less.models import qwen2
    from megatron_less.parallel import runtime

    res = {"logits": {}, "cross": {}, "padding_zero": []}

    def ckpt(name, lay):
        return f"{root}/meg_{name}_{lay[0]}x{lay[1]}"

    for i, lay in enumerate(LAYOUTS):
        runtime.initialize(*lay, seed=11 + i)
        for name in MODELS:
            src_hf = hf.HFCheckpoint(f"{root}/hf_{name}")
            config = qwen2.transformer_config(src_hf.arch, tp=lay[0], pp=lay[1])
            model = qwen2.build_model(src_hf.arch, config)
            hf.load_hf_checkpoint(model, src_hf, src_hf.arch)
            res["logits"][(name, lay)] = _logits(model, tokens)
            # what training leaves in the padding rows: a later load must not depend on it
            for rows in _padding_rows(model, src_hf.arch):
                rows.fill_(0.5)
            megatron_ckpt.save_checkpoint(model, ckpt(name, lay), src_hf.arch, hf_config=src_hf.config,
                                          generation_config=src_hf.generation_config, source=src_hf.folder)
            if i:  # the previous layout's checkpoint into a fresh random model of this layout
                src = LAYOUTS[i - 1]
                config = qwen2.transformer_config(src_hf.arch, tp=lay[0], pp=lay[1])
                model = qwen2.build_model(src_hf.arch, config)
                megatron_ckpt.load_checkpoint(model, ckpt(name, src), src_hf.arch)
                res["cross"][(name, lay, src)] = _logits(model, tokens)
                res["padding_zero"] += [bool((r == 0).all()) for r in _padding_rows(model, src_hf.arch)]
    for name in MODELS:
        for lay in LAYOUTS:  # loads at TP1 x PP4 (a fifth layout): one stage (one layer) per rank
            convert.export_hf(ckpt(name, lay), f"{root}/back_{name}_{lay[0]}x{lay[1]}",
                                 max_shard_size="60KB" if name == "untied" else "5GB")
    runtime.destroy()
    return res


def _merge(per_rank, key):
    out = {}
    for r in per_rank:
        out.update({k: v for k, v in r[key].items() if v is not None})
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("convert"))
    refs, tokens = {}, torch.randint(0, 250, (2, SEQ), generator=torch.Generator().manual_seed(3))
    for name, kw in MODELS.items():
        kw = dict(kw)
        seed, shard = kw.pop("seed", 0), kw.pop("max_shard_size", None)
        model = tiny.hf_model(seed, **kw)
        model.save_pretrained(f"{root}/hf_{name}", **({"max_shard_size": shard} if shard else {}))
        with torch.no_grad():
            refs[name] = model(tokens).logits
    per_rank = run_distributed(_job, 4, (root, tokens), timeout=600)
    return dict(root=root, tokens=tokens, refs=refs, logits=_merge(per_rank, "logits"),
                cross=_merge(per_rank, "cross"),
                padding_zero=[z for r in per_rank for z in r["padding_zero"]])


def _json(path):
    with open(path) as f:
        return json.load(f)


def _put_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def _hf_tensors(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def test_sharded_hf_input_is_read_through_its_index(run):
    folder = f"{run['root']}/hf_untied"
    assert os.path.exists(f"{folder}/{hf.INDEX_FILE}")
    src = hf.HFCheckpoint(folder)
    assert len(set(src.weight_map.values())) > 1
    assert torch.equal(src["lm_head.weight"], _hf_tensors(folder)["lm_head.weight"])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda l: f"tp{l[0]}pp{l[1]}")
def test_logits_match_transformers(run, name, lay):
    ref = run["refs"][name]
    got = run["logits"][(name, lay)]
    assert got.shape[-1] >= ref.shape[-1] and got.shape[:-1] == ref.shape[:-1]
    diff = (got[..., : ref.shape[-1]] - ref).abs().max().item()
    print(f"{name} tp{lay[0]}pp{lay[1]}: max |logits - HF| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("lay", LAYOUTS[1:], ids=lambda l: f"tp{l[0]}pp{l[1]}")
def test_checkpoint_loads_at_another_layout(run, name, lay):
    # TP1 -> TP2 (untied: 384 -> 512 vocab rows), TP2 -> PP2 (512 -> 384), PP2 -> TP2xPP2
    src = LAYOUTS[LAYOUTS.index(lay) - 1]
    got = run["cross"][(name, lay, src)]
    ref = run["logits"][(name, src)]
    v = run["refs"][name].shape[-1]
    diff = (got[..., :v] - ref[..., :v]).abs().max().item()
    print(f"{name} saved tp{src[0]}pp{src[1]} -> loaded tp{lay[0]}pp{lay[1]}: max diff {diff:.2e}")
    assert diff < 1e-5
    assert (got[..., :v] - run["refs"][name]).abs().max().item() < 1e-4
    # padded rows are zero after a load, so padded logits are exactly 0 at every layout
    assert (got[..., v:] == 0).all()


def test_padding_rows_are_zeroed_on_load(run):
    assert run["padding_zero"] and all(run["padding_zero"])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda l: f"tp{l[0]}pp{l[1]}")
def test_roundtrip_is_bit_identical(run, name, lay):
    orig = _hf_tensors(f"{run['root']}/hf_{name}")
    back = _hf_tensors(f"{run['root']}/back_{name}_{lay[0]}x{lay[1]}")
    assert set(back) == set(orig)
    assert ("lm_head.weight" in back) == (name == "untied")
    for k in orig:
        assert back[k].dtype == orig[k].dtype and torch.equal(back[k], orig[k]), k


@pytest.mark.parametrize("name", MODELS)
def test_export_is_a_transformers_checkpoint(run, name):
    from transformers import AutoModelForCausalLM

    folder = f"{run['root']}/back_{name}_2x2"
    cfg = _json(f"{folder}/config.json")
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["tie_word_embeddings"] == (name == "tied")
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert os.path.exists(f"{folder}/generation_config.json")
    # 4 stages wrote at least one file each, the untied model at most 60KB per file
    index = _json(f"{folder}/{hf.INDEX_FILE}")
    shard_files = set(index["weight_map"].values())
    assert len(shard_files) >= (9 if name == "untied" else 4)
    assert sorted(shard_files) == sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(model(run["tokens"]).logits, run["refs"][name])


def test_checkpoint_metadata(run):
    meta = megatron_ckpt.read_metadata(f"{run['root']}/meg_untied_2x2")
    assert meta["hf_config"]["vocab_size"] == 300 and meta["hf_config"]["tie_word_embeddings"] is False
    info = meta["megatron_less"]
    assert info["format_version"] == megatron_ckpt.FORMAT_VERSION and info["dtype"] == "float32"
    assert info["saved_layout"] == {"tp": 2, "pp": 2} and info["source"].endswith("hf_untied")
    assert not [p for p in os.listdir(run["root"]) if p.endswith(".partial")]


def test_load_refuses_another_architecture(run):
    from megatron_less.models.qwen2 import Qwen2Arch

    other = Qwen2Arch.from_hf(dict(tiny.BASE, vocab_size=300, tie_word_embeddings=True))
    with pytest.raises(ConfigError, match="tie_word_embeddings: model True vs checkpoint False"):
        megatron_ckpt.load_checkpoint(None, f"{run['root']}/meg_untied_1x1", other)


# --- the command-line tools ---------------------------------------------------------------------

def _run(*argv):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300,
                          check=False)


def _tool(name, *args):
    """A thin script in tools/."""
    return _run(os.path.join(REPO, "tools", name), *args)


def _cli(*args):
    """``megatron-less ...`` (the console script runs this module's main)."""
    return _run("-m", "megatron_less.cli", *args)


@pytest.fixture(scope="module")
def cli(run):
    root = run["root"]
    tok = f"{root}/tok"
    os.makedirs(tok)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "chat_template.jinja", "README.md", "model.safetensors"):
        with open(f"{tok}/{f}", "w") as fh:
            fh.write(f"{f}\n")
    os.makedirs(f"{root}/cli_meg.partial")  # what a crashed earlier run leaves: cleaned up
    a = _cli("convert-hf", "--hf-dir", f"{root}/hf_untied", "--out", f"{root}/cli_meg", "--tp", "2")
    assert a.returncode == 0, a.stderr
    b = _tool("convert_megatron_to_hf.py", "--ckpt", f"{root}/cli_meg", "--out", f"{root}/cli_hf",
              "--tokenizer", tok, "--dtype", "bf16", "--max-shard-size", "200KB")
    assert b.returncode == 0, b.stderr
    return root


def test_cli_roundtrip_with_tokenizer_and_dtype(cli):
    assert not [p for p in os.listdir(cli) if p.endswith(".partial")]
    meta = megatron_ckpt.read_metadata(f"{cli}/cli_meg")["megatron_less"]
    assert meta["saved_layout"] == {"tp": 2, "pp": 1} and meta["dtype"] == "float32"
    orig = _hf_tensors(f"{cli}/hf_untied")
    back = _hf_tensors(f"{cli}/cli_hf")
    assert set(back) == set(orig)
    for k in orig:
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], orig[k].bfloat16()), k
    assert _json(f"{cli}/cli_hf/config.json")["torch_dtype"] == "bfloat16"
    copied = sorted(f for f in os.listdir(f"{cli}/cli_hf") if not f.startswith(("model", "config",
                                                                                  "generation")))
    assert copied == ["chat_template.jinja", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                      "vocab.json"]


def test_cli_reports_bad_layout_without_starting(run, tmp_path):
    r = _tool("convert_hf_to_megatron.py", "--hf-dir", f"{run['root']}/hf_tied", "--out",
              str(tmp_path / "x"), "--tp", "3")
    assert r.returncode == 2 and "tensor_parallel (3) must divide num_attention_heads (4)" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()


# --- bad inputs, in this process: every check runs before a process group exists ----------------

@pytest.fixture
def hf_dir(tmp_path):
    tiny.save_hf_model(tmp_path / "hf", tie_word_embeddings=False)
    return tmp_path / "hf"


def test_missing_config(hf_dir):
    os.remove(hf_dir / "config.json")
    with pytest.raises(CheckpointError, match="no config.json in"):
        hf.HFCheckpoint(hf_dir)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        hf.HFCheckpoint(tmp_path / "nope")


def test_missing_safetensors(hf_dir):
    os.remove(hf_dir / "model.safetensors")
    (hf_dir / "pytorch_model.bin").touch()
    with pytest.raises(CheckpointError, match=r"no model.safetensors or .*\.bin checkpoints are not"):
        hf.HFCheckpoint(hf_dir)


def test_missing_shard_named(tmp_path):
    tiny.hf_model(0).save_pretrained(tmp_path, max_shard_size="100KB")
    gone = sorted(set(_json(tmp_path / hf.INDEX_FILE)["weight_map"].values()))[1]
    os.remove(tmp_path / gone)
    with pytest.raises(CheckpointError, match=f"missing from .*: {gone}"):
        hf.HFCheckpoint(tmp_path)


def test_not_qwen2(hf_dir):
    cfg = _json(hf_dir / "config.json")
    cfg["model_type"] = "llama"
    _put_json(hf_dir / "config.json", cfg)
    with pytest.raises(ConfigError, match="config.json: model_type 'llama' is not supported"):
        hf.HFCheckpoint(hf_dir)


def test_shape_mismatch_names_tensor_and_both_shapes(hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.k_proj.weight in "
                       r"model.safetensors: the file has \(16, 64\), config.json .* implies \(32, 64\)"):
        hf.HFCheckpoint(hf_dir)


def test_untied_config_needs_lm_head(hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks tensor.* lm_head.weight .*tie_word_embeddings=false"):
        hf.HFCheckpoint(hf_dir)


def test_config_with_fewer_layers_than_the_weights(hf_dir):
    cfg = _json(hf_dir / "config.json")
    cfg["num_hidden_layers"] = 2
    _put_json(hf_dir / "config.json", cfg)
    with pytest.raises(CheckpointError, match="model.layers.2.* num_hidden_layers=2"):
        hf.HFCheckpoint(hf_dir)


@pytest.mark.parametrize("tp, pp, field", [(3, 1, "num_attention_heads"), (1, 3, "num_hidden_layers")])
def test_layout_must_divide_the_model(hf_dir, tmp_path, tp, pp, field):
    with pytest.raises(ConfigError, match=field):
        convert.convert_hf_to_megatron(hf_dir, tmp_path / "out", tp=tp, pp=pp)
    assert not dist.is_initialized() and not (tmp_path / "out").exists()


def test_refuses_to_overwrite(hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert.convert_hf_to_megatron(hf_dir, tmp_path / "out")


def test_incomplete_checkpoint_is_refused(tmp_path):
    # what a crash mid-save leaves: megatron's files but no megatron_less.json
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "metadata.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a complete megatron-less checkpoint"):
        convert.convert_megatron_to_hf(str(tmp_path / "ck"), str(tmp_path / "hf"))


def test_bad_dtype_and_shard_size():
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        files.parse_dtype("int8")
    with pytest.raises(ConfigError, match="max shard size"):
        files.parse_size("lots")
    assert files.parse_size("5GB") == 5 * 10**9 and files.parse_size("2MiB") == 2 * 2**20


def test_tokenizer_folder_without_tokenizer_files(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        hf.copy_tokenizer(str(tmp_path), str(tmp_path))
