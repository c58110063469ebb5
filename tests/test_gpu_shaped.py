"""GPU-shaped construction on CPU: the model, DDP, optimizer and the trainer's state are built
with "CUDA present" and "TE / apex importable" as the config logic sees them, so the config-only
GPU branches (fused-kernel flags such as persist_layer_norm, the spec choice of `auto`) run
somewhere without a GPU.

The project's own probes are patched (``qwen2.cuda_available``, ``qwen2.have_te``,
``qwen2.fused_softmax_available``: apex's CUDA extensions), never torch: where the weights live stays the real device (CPU here), and
the modules megatron-core builds are the real ones. Construction only: a forward would run the
CUDA-only kernels the flags select."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_less.models import qwen2
from megatron_less.parallel import runtime
from tests import tiny, train_fixtures

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "configs" / "tiny_cpu.yaml"
# (model.attention, TE importable, apex importable): the NGC image (both), apex without TE, TE
# without apex, neither (a plain CUDA build).
SHAPES = [
    ("sdpa", True, True),
    ("local", True, True),
    ("auto", False, True),
    ("local", True, False),
    ("sdpa", False, False),
]


def _gpu_shaped(monkeypatch, te: bool, apex: bool) -> None:
    monkeypatch.setattr(qwen2, "cuda_available", lambda: True)
    monkeypatch.setattr(qwen2, "have_te", lambda: te)
    monkeypatch.setattr(qwen2, "fused_softmax_available", lambda: apex)


@pytest.fixture
def world():
    """One in-process rank (gloo), torn down even when the build fails."""
    yield runtime.initialize()
    runtime.destroy()


def _check_local_spec(module, config, attention: str, apex: bool) -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_less.models.attention import SDPAttention

    assert config.bias_activation_fusion and config.bias_dropout_fusion  # the GPU branch ran
    assert config.masked_softmax_fusion == apex  # apex's kernels, not TE's
    assert not config.persist_layer_norm  # no norm of these specs takes it (megatron's WrappedTorchNorm refuses it)
    layer = module.decoder.layers[0]
    assert isinstance(layer.input_layernorm, torch.nn.RMSNorm)
    core = type(layer.self_attention.core_attention)
    assert core is (DotProductAttention if attention == "local" else SDPAttention)
    assert all(p.device.type == "cpu" for p in module.parameters())


@pytest.mark.parametrize("attention, te, apex", SHAPES)
def test_policy_builds_gpu_shaped(monkeypatch, world, attention, te, apex):
    from megatron_less.models.policy import build_frozen, build_policy

    _gpu_shaped(monkeypatch, te, apex)
    arch = qwen2.Qwen2Arch.from_hf(dict(tiny.BASE))
    policy = build_policy(arch, attention=attention)
    _check_local_spec(policy.module, policy.config, attention, apex)
    assert policy.optimizer.param_groups and policy.model[0].buffers  # megatron DDP grad buffers
    ref = build_frozen(arch, attention=attention)
    _check_local_spec(ref[0], ref[0].config, attention, apex)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_fixtures.run_inputs(tmp_path_factory, "gpu_shaped", steps=1)


@pytest.mark.parametrize("attention, te, apex", [("sdpa", True, True), ("auto", False, True)])
def test_trainer_state_builds_gpu_shaped(monkeypatch, tmp_path, tiny_run, attention, te, apex):
    """build_run as `megatron-less train` calls it: policy, KL reference, scheduler, engine."""
    from megatron_less.trainer.config import load_config
    from megatron_less.trainer.setup import build_run

    _gpu_shaped(monkeypatch, te, apex)
    cfg = load_config(CONFIG, [
        f"model.hf_dir={tiny_run['hf']}", f"data.train_file={tiny_run['data']}", f"output_dir={tmp_path / 'out'}",
        f"model.attention={attention}", "algo.kl_coef=0.01", "log.tensorboard=false"])  # fmt: skip
    try:
        run = build_run(cfg)
        _check_local_spec(run.policy.module, run.policy.config, attention, apex)
        _check_local_spec(run.ref_model[0], run.ref_model[0].config, attention, apex)
        assert run.scheduler is not None and run.engine is not None and run.step == 0
        run.logger.close()
    finally:
        runtime.destroy()
