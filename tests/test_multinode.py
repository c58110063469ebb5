"""The multi-node launch path on one machine: two "nodes" on 127.0.0.1, each a torchrun of 2
processes started by the real examples/launch/torchrun.sh (static rendezvous: NNODES, NODE_RANK,
MASTER_ADDR, MASTER_PORT), train the tiny model for 2 steps at TP2 x DP2 (each node one TP group,
data parallel across the nodes) and write one checkpoint from all 4 ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

from megatron_less.parallel.spawn import free_port
from tests import train_fixtures

REPO = Path(__file__).resolve().parent.parent


def test_two_nodes_on_loopback_train_and_checkpoint(tmp_path):
    # a short warm-up: this test is about the launch path, not about learning
    hf_dir, train_file = train_fixtures.make_model(tmp_path, steps=30)
    out = tmp_path / "run"
    overrides = [f"model.hf_dir={hf_dir}", f"data.train_file={train_file}", f"output_dir={out}", "train.steps=2",
                 "parallel.tp=2", "rollout.n=4", "batch.prompts_per_step=2", "batch.mini_batch_prompts=2",
                 "batch.micro_batch_tokens=64", "log.tensorboard=false", "checkpoint.every=0"]  # fmt: skip
    env = dict(os.environ, NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GPUS_PER_NODE="2",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MLESS_WARNINGS="")  # fmt: skip
    cmd = ["bash", "examples/launch/torchrun.sh", "examples/configs/tiny_cpu.yaml", *overrides]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=dict(env, NODE_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]  # fmt: skip
    try:
        logs = [n.communicate(timeout=600)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    for r, (n, log) in enumerate(zip(nodes, logs)):
        assert n.returncode == 0, f"node {r} exited {n.returncode}:\n{log[-4000:]}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss/total"]) for r in rows)
    ckpt = out / "checkpoints" / "step_000002"
    # one RNG file per rank: the job had 4 ranks, 2 from each node's torchrun
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == [f"rank_{r}.pt" for r in range(4)]
    assert "resolved config" in logs[0] and "resolved config" not in logs[1]  # only global rank 0 prints it
