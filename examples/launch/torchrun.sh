#!/usr/bin/env bash
# `megatron-less train` under torchrun: one node, or this node's share of a multi-node job (run
# it once on every node). Every rank runs the same command; the config's TP/PP split the world.
#
#   one node:    bash examples/launch/torchrun.sh CONFIG.yaml [key=value ...]
#   many nodes, static rendezvous (one call per node, NODE_RANK 0..NNODES-1):
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 bash examples/launch/torchrun.sh CONFIG.yaml
#   many nodes, c10d rendezvous (torchrun assigns node ranks; a node may join late):
#     NNODES=2 RDZV_ENDPOINT=node0:29400 RDZV_ID=job42 bash examples/launch/torchrun.sh CONFIG.yaml
#
# GPUS_PER_NODE (default 8) processes start on this node. TORCHRUN_ARGS adds torchrun options.
#
# Network interface (many nodes): the job talks over two libraries, gloo (the world group's CPU
# side: object gathers, vLLM's CPU groups) and NCCL (GPU tensors). Each picks an interface on its
# own, gloo from the hostname's address - on many clusters a loopback (127.0.1.1) or a slow
# management port, which hangs the first collective or fails with "Connection refused". Name the
# interface that reaches the other nodes, the same on every node, before calling this script:
#     export GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=ib0   # or eth0, ens..., bond0: see `ip -br addr`
# (NCCL_SOCKET_IFNAME is NCCL's bootstrap and socket transport; with InfiniBand, NCCL_IB_HCA picks
# the adapters for the data.) Both are inherited by every rank.
set -euo pipefail

die() { echo "torchrun.sh: error: $*" >&2; exit 2; }
need() {  # need VAR "what it is": fail before torchrun starts, naming the variable
  [ -n "${!1:-}" ] || die "$1 is not set: $2"
}
is_count() { [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"; }
is_positive() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }

[ $# -ge 1 ] || die "usage: torchrun.sh CONFIG.yaml [key=value ...]"
[ -f "$1" ] || die "config file $1 does not exist"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
is_positive GPUS_PER_NODE "$GPUS_PER_NODE"

if [ -n "${RDZV_ENDPOINT:-}" ]; then
  # c10d also takes an elastic range MIN:MAX of nodes
  [[ $NNODES =~ ^[0-9]+(:[0-9]+)?$ ]] || die "NNODES must be a count or MIN:MAX, got '$NNODES'"
  need RDZV_ID "a job id shared by all nodes of this run (e.g. \$SLURM_JOB_ID)"
  rdzv=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
elif is_positive NNODES "$NNODES" && [ "$NNODES" -gt 1 ]; then
  need NODE_RANK "this node's rank, 0..$((NNODES - 1)) (or set RDZV_ENDPOINT for c10d rendezvous)"
  need MASTER_ADDR "the address of the node with NODE_RANK=0, reachable from every node"
  is_count NODE_RANK "$NODE_RANK"
  [ "$NODE_RANK" -lt "$NNODES" ] || die "NODE_RANK ($NODE_RANK) must be below NNODES ($NNODES)"
  # Megatron-LM's example script defines NODE_RANK and never passes it; torchrun then starts
  # every node as node 0. It is passed here.
  rdzv=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
else
  rdzv=(--standalone)
fi

# torchrun's default of 1 thread per process is right for GPUs; on CPU it also keeps ranks from
# oversubscribing the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options, split on purpose
exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" "${rdzv[@]}" ${TORCHRUN_ARGS:-} \
  -m megatron_less.cli train "$@"
