"""A deterministic, resumable sampler over dataset indices.

Epoch ``e`` visits a permutation of ``range(num_items)`` drawn from ``Random(seed, e)`` (or the identity
when ``shuffle=False``); batches run across epoch boundaries. The whole state is ``(epoch, position)``:
``state_dict()`` after k batches and ``load_state_dict`` in a fresh sampler give exactly the batches an
uninterrupted run would have given next. Data-parallel ranks take disjoint strided slices of a global batch
(``rank`` / ``world_size``), so resuming with the same global batch size is rank-count independent.
"""

from __future__ import annotations

import random
from typing import Any


class ResumableSampler:
    def __init__(self, num_items: int, *, seed: int, shuffle: bool = True):
        if num_items <= 0:
            raise ValueError(f"sampler needs at least one item, got num_items={num_items}")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order: list[int] | None = None

    def permutation(self, epoch: int) -> list[int]:
        order = list(range(self.num_items))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def _current(self) -> list[int]:
        if self._order is None:
            self._order = self.permutation(self.epoch)
        return self._order

    def next_batch(self, batch_size: int) -> list[int]:
        """The next ``batch_size`` indices (continuing into the next epoch when this one runs out)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        out: list[int] = []
        while len(out) < batch_size:
            order = self._current()
            take = min(batch_size - len(out), self.num_items - self.position)
            out.extend(order[self.position : self.position + take])
            self.position += take
            if self.position == self.num_items:
                self.epoch += 1
                self.position = 0
                self._order = None
        return out

    def next_shard(self, global_batch_size: int, *, rank: int, world_size: int) -> list[int]:
        """This rank's strided share of the next global batch (every rank must call it every step)."""
        if not 0 <= rank < world_size or global_batch_size % world_size:
            raise ValueError(f"need 0 <= rank < world_size dividing the batch, got rank {rank}, "
                             f"world_size {world_size}, batch {global_batch_size}")
        return self.next_batch(global_batch_size)[rank::world_size]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "num_items": self.num_items,
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_items", "seed", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state.get(key)!r} but this sampler has {getattr(self, key)!r}: "
                    "the data or seed changed since the checkpoint"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_items:
            raise ValueError(f"invalid sampler state epoch={epoch} position={position} for {self.num_items} items")
        self.epoch, self.position, self._order = epoch, position, None
