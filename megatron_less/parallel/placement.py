"""rollout.placement: separate - the torchrun world split into trainer and rollout ranks.

megatron's parallel_state takes the whole default group, and vLLM's external launcher joins the
default group it finds; so each side gets a default group of its own: the first W - R ranks train
(TP/PP/DP as in a colocated run), the last R generate (vLLM, rollout_tp within them). A third
group, the bridge (trainer rank 0 and every rollout rank), carries rollout batches one way and
weight buckets the other. All three rendezvous on torchrun's one store under their own prefix;
the bridge is built as a bare backend (``dist.new_group`` needs one default group over all ranks,
which is what must not exist here).
"""

from __future__ import annotations

import datetime
import math
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_less.parallel.runtime import world_backend

TRAIN, ROLLOUT = "train", "rollout"


@dataclass(frozen=True)
class Placement:
    rank: int  # in the torchrun world
    world: int
    trainers: int  # ranks [0, trainers) train, [trainers, world) generate

    @property
    def role(self) -> str:
        return TRAIN if self.rank < self.trainers else ROLLOUT

    @property
    def bridge_ranks(self) -> list[int]:
        return [0, *range(self.trainers, self.world)]


def of_env(rollout_ranks: int) -> Placement:
    """This process's place, from torchrun's RANK / WORLD_SIZE (before any group exists)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return Placement(rank, world, world - rollout_ranks)  # config.check_layout has checked the numbers


def split(place: Placement, timeout_s: float) -> Bridge | None:
    """Start this rank's side's default group (and, on bridge ranks, the bridge). RANK and
    WORLD_SIZE are rewritten to the side's own: what megatron and vLLM's launcher read."""
    store, _, _ = next(dist.rendezvous("env://", rank=place.rank, world_size=place.world,
                                       timeout=datetime.timedelta(seconds=timeout_s)))  # fmt: skip
    train = place.role == TRAIN
    rank, size = (place.rank, place.trainers) if train else (place.rank - place.trainers, place.world - place.trainers)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(world_backend(cuda), store=dist.PrefixStore(place.role, store), rank=rank,
                            world_size=size, timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), MLESS_GLOBAL_RANK=str(place.rank))
    members = place.bridge_ranks
    if place.rank not in members:
        return None
    return Bridge(store, members.index(place.rank), len(members), timeout_s, cuda)


class Bridge:
    """Broadcasts between trainer rank 0 (bridge rank ``TRAINER``) and the rollout ranks
    (``LEADER`` first). Objects (batches, headers) go through gloo as pickled bytes - they pass
    between this job's own processes only; weight buckets go through NCCL on GPU, gloo on CPU."""

    TRAINER, LEADER = 0, 1

    def __init__(self, store, rank: int, size: int, timeout_s: float, cuda: bool):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.size = rank, size
        self._objects = dist.ProcessGroupGloo(dist.PrefixStore("bridge/objects", store), rank, size, timeout)
        self._tensors = self._objects
        self.device = torch.device("cpu")
        if cuda:
            self._tensors = dist.ProcessGroupNCCL(dist.PrefixStore("bridge/tensors", store), rank, size, timeout)
            self.device = torch.device("cuda", torch.cuda.current_device())
            # NCCL starts its communicator at the first collective: here, before vLLM sizes its
            # KV cache from the free memory, and a failure shows at start-up, not at the first sync
            self.broadcast(torch.zeros(1, device=self.device), self.TRAINER)
            torch.cuda.synchronize()

    def close(self) -> None:
        """Shut the NCCL communicator down before the process groups go (its destructor warns)."""
        if self._tensors is self._objects:
            return
        shutdown = getattr(self._tensors, "shutdown", None) or getattr(self._tensors, "_shutdown", None)
        if shutdown is not None:  # torch versions name it either way
            shutdown()

    def broadcast(self, tensor: torch.Tensor, root: int) -> torch.Tensor:
        """``tensor`` (on ``self.device``) from bridge rank ``root`` into every member's."""
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        self._tensors.broadcast([tensor], opts).wait()
        return tensor

    def objects(self, obj, root: int):
        """``obj`` from ``root`` to every member (the others pass None and get it back)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8) if self.rank == root else None
        n = torch.tensor([data.numel() if data is not None else 0], dtype=torch.int64)
        self._objects.broadcast([n], opts).wait()
        if data is None:
            data = torch.empty(int(n), dtype=torch.uint8)
        self._objects.broadcast([data], opts).wait()
        return obj if self.rank == root else pickle.loads(data.numpy().tobytes())

    # -- weights: trainer rank 0 -> every rollout rank, in buckets ---------------------------------
    def send_tensors(self, named, bucket_bytes: int) -> dict:
        """Stream (name, tensor) pairs to the rollout ranks: buckets of at least ``bucket_bytes``
        (one dtype each), each a header (names, shapes) then one flat tensor; None ends it."""
        counts = {"bytes": 0, "buckets": 0}
        bucket: list = []

        def flush():
            self.objects([(n, tuple(t.shape), t.dtype) for n, t in bucket], self.TRAINER)
            self.broadcast(torch.cat([t.reshape(-1) for _, t in bucket]).to(self.device), self.TRAINER)
            counts["buckets"] += 1
            bucket.clear()

        size = 0
        for name, t in named:
            if bucket and (size >= bucket_bytes or t.dtype != bucket[0][1].dtype):
                flush()
                size = 0
            bucket.append((name, t))
            size += t.numel() * t.element_size()
            counts["bytes"] += t.numel() * t.element_size()
        if bucket:
            flush()
        self.objects(None, self.TRAINER)
        self._synchronize()  # transfer timings measure the transfer, not its queueing (NCCL)
        return counts

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()

    def recv_tensors(self):
        """The rollout ranks' side of ``send_tensors``: (name, tensor) pairs, a bucket at a time
        (views of the bucket; the next bucket is a new tensor)."""
        while (header := self.objects(None, self.TRAINER)) is not None:
            numels = [math.prod(shape) for _, shape, _ in header]
            flat = self.broadcast(torch.empty(sum(numels), dtype=header[0][2], device=self.device), self.TRAINER)
            for (name, shape, _), part in zip(header, flat.split(numels)):
                yield name, part.view(shape)
        self._synchronize()
