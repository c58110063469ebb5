"""Bad model/layout settings fail up front, naming the field, before any process group exists."""

import pytest
import torch.distributed as dist

from megatron_less.models.qwen2 import ConfigError, Qwen2Arch
from megatron_less.parallel.runtime import ParallelLayout
from tests import tiny


def arch(**kw):
    return Qwen2Arch.from_hf(dict(tiny.BASE, **kw))


@pytest.mark.parametrize(
    "kw, tp, pp, field",
    [
        ({}, 3, 1, "num_attention_heads"),
        ({"num_attention_heads": 8, "num_key_value_heads": 2}, 4, 1, "num_key_value_heads"),
        ({}, 1, 3, "num_hidden_layers"),
        ({"intermediate_size": 130, "num_attention_heads": 8, "num_key_value_heads": 4}, 4, 1, "intermediate_size"),
        ({}, 0, 1, "tensor_parallel"),
    ],
)
def test_layout_errors_name_the_field(kw, tp, pp, field):
    a = arch(**kw)
    with pytest.raises(ConfigError, match=field):
        a.check(tp, pp)
    assert not dist.is_initialized()


def test_unknown_activation():
    with pytest.raises(ConfigError, match="hidden_act 'gelu_new'"):
        arch(hidden_act="gelu_new")


def test_not_qwen2():
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        Qwen2Arch.from_hf(dict(tiny.BASE, model_type="llama"))


def test_missing_field_and_file(tmp_path):
    d = dict(tiny.BASE)
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        Qwen2Arch.from_hf(d)
    with pytest.raises(ConfigError, match="no config.json"):
        Qwen2Arch.from_hf(tmp_path)


def test_rope_scaling_refused():
    with pytest.raises(ConfigError, match="rope"):
        arch(rope_scaling={"type": "yarn", "factor": 4.0})


def test_world_size_must_fit_layout():
    with pytest.raises(ValueError, match="world size 6 .* 4"):
        ParallelLayout(2, 2).validate(6)
    assert ParallelLayout(2, 2).validate(8) == 2


def test_reads_hf_config_objects_and_folders(tmp_path):
    cfg = tiny.hf_config(tie_word_embeddings=False)
    cfg.save_pretrained(tmp_path)
    for src in (cfg, tmp_path, tmp_path / "config.json"):
        a = Qwen2Arch.from_hf(src)
        assert (a.head_dim, a.num_key_value_heads, a.tie_word_embeddings) == (16, 2, False)
        assert a.rope_theta == 10000.0


def test_vocab_padding():
    a = arch()
    assert a.padded_vocab_size(1) == 256 and a.padded_vocab_size(2) == 256 and a.padded_vocab_size(4) == 512
    assert Qwen2Arch.from_hf(dict(tiny.BASE, vocab_size=151936)).padded_vocab_size(2) == 152064
