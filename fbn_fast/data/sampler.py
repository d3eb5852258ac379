"""Batch samplers: datasets mixed in every batch by configured ratios, and a sharded sequential sampler.

:class:`MixingBatchSampler` (training) builds each *global* batch of ``batch_size * world_size`` rows:

1. how many rows each dataset contributes is drawn by systematic sampling around ``ratio * global_batch``
   (each count is the floor or the ceiling of its target, and its expectation is exactly the target);
2. each dataset's rows come, without replacement, from an endless stream of seeded permutations of that
   dataset (a dataset is reshuffled when exhausted; the stream carries on across epochs, so a large corpus
   drawn at a small ratio is still covered over several epochs);
3. rank ``r`` takes every ``world_size``-th row of the dataset-grouped global batch starting at ``r``, so the
   ranks' batches are disjoint and each holds its share of every dataset (within about one row).

Everything is a pure function of ``(seed, epoch, batch index)``, so a saved position ``(epoch, batch)``
restores the exact sequence: a batch is computed directly from that key (the per-epoch counts are replayed,
the dataset permutations are derived from cached ones when iterating in order). Iterating a sampler through
to the end moves it on to the next epoch; :meth:`set_epoch` selects one explicitly.

:class:`ShardedEvalSampler` (evaluation) splits the rows into ``world_size`` contiguous, balanced shards
(sizes differ by at most one row) and batches each shard in order: every row is seen exactly once per pass
across ranks, with no padding and a partial last batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

_STATE_KEYS = ("epoch", "batch")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def systematic_counts(weights: np.ndarray, total: int, u: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total`` per row of ``u``, each within one of ``total * weights``.

    ``u`` (shape (B,)) holds one uniform in [0, 1) per draw; the result has shape (B, D). The fractional parts
    of the targets tile ``[0, r)`` (``r`` leftover rows); the points ``u, u + 1, ..., u + r - 1`` hit dataset
    ``d``'s interval with probability exactly its fractional part, so ``E[count_d] = total * weight_d``.
    """
    target = total * np.asarray(weights, np.float64)
    base = np.floor(target + 1e-9).astype(np.int64)
    frac = np.clip(target - base, 0.0, None)
    left = int(total - base.sum())
    counts = np.broadcast_to(base, (len(u), len(base))).copy()
    if left > 0:
        edges = np.concatenate([[0.0], np.cumsum(frac)])
        edges[-1] = max(edges[-1], float(left))  # float rounding must not lose the last point
        points = u[:, None] + np.arange(left)[None, :]
        hit = np.searchsorted(edges, points, side="right") - 1
        np.add.at(counts, (np.repeat(np.arange(len(u)), left), np.clip(hit, 0, len(base) - 1).ravel()), 1)
    return counts


class _EpochBatches:
    """A position ``(epoch, batch)`` in a sequence of ``epoch_size`` batches per epoch, saved and restored by
    :meth:`state_dict` / :meth:`load_state_dict`; a subclass computes :meth:`batch` from that key alone."""

    #: Attributes saved with the position, which a restored state must match.
    _MATCHED: tuple[str, ...] = ("world_size", "batch_size", "epoch_size")
    epoch: int
    position: int
    epoch_size: int

    def __len__(self) -> int:
        return self.epoch_size

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch``; the position goes back to its start unless ``epoch`` is the current one (so a loop that
        calls ``set_epoch`` after :meth:`load_state_dict` resumes mid-epoch)."""
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.position, **{k: getattr(self, k) for k in self._MATCHED}}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"sampler state lacks {missing}")
        for k in self._MATCHED:
            if k in state and int(state[k]) != getattr(self, k):
                raise ValueError(f"sampler state has {k}={state[k]}, this sampler has {getattr(self, k)}")
        if not 0 <= int(state["batch"]) <= self.epoch_size:
            raise ValueError(f"sampler state batch {state['batch']} is outside [0, {self.epoch_size}]")
        self.epoch, self.position = int(state["epoch"]), int(state["batch"])

    def batch(self, epoch: int, b: int) -> np.ndarray:
        raise NotImplementedError

    def __iter__(self) -> Iterator[np.ndarray]:
        while self.position < self.epoch_size:
            b = self.position
            self.position += 1
            yield self.batch(self.epoch, b)
        self.epoch, self.position = self.epoch + 1, 0  # a completed pass moves on to the next epoch

    def iter_from(self, epoch: int, start: int) -> Iterator[np.ndarray]:
        """Batches ``start ..`` of ``epoch`` without touching the sampler's own position."""
        for b in range(start, self.epoch_size):
            yield self.batch(epoch, b)


class MixingBatchSampler(_EpochBatches):
    """Yields per-rank batches (int64 arrays of manifest rows) mixing datasets by ratio.

    Args:
        rows: manifest rows to draw from.
        groups: dataset code of each of ``rows``.
        weights: ``{dataset code: weight}``; weights are normalised, codes absent or at 0 are not drawn.
        batch_size: rows per rank per batch.
        epoch_size: batches per epoch (default: ``len(rows) // (batch_size * world_size)``, at least 1).
        seed, rank, world_size: determinism and sharding.
    """

    def __init__(self, rows: np.ndarray, groups: np.ndarray, weights: Mapping[int, float], *, batch_size: int,
                 epoch_size: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        rows = np.asarray(rows, np.int64)
        groups = np.asarray(groups)
        if rows.ndim != 1 or groups.shape != rows.shape:
            raise ValueError(f"rows {rows.shape} and groups {groups.shape} must be 1-D of equal length")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        codes = sorted(int(c) for c, w in weights.items() if w > 0)
        if not codes:
            raise ValueError(f"no dataset has a positive weight in {dict(weights)}")
        for c, w in weights.items():
            if not np.isfinite(w) or w < 0:
                raise ValueError(f"weight of dataset {c} must be finite and >= 0, got {w}")
        self.codes = np.array(codes, np.int64)
        self.pools = []
        for c in codes:
            pool = rows[groups == c]
            if len(pool) == 0:
                raise ValueError(f"dataset {c} has weight {weights[c]} but no rows to draw from")
            self.pools.append(pool)
        w = np.array([weights[c] for c in codes], np.float64)
        self.weights = w / w.sum()
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.global_batch = self.batch_size * self.world_size
        self.epoch_size = int(epoch_size) if epoch_size is not None else max(1, len(rows) // self.global_batch)
        if self.epoch_size < 1:
            raise ValueError(f"epoch_size must be >= 1, got {epoch_size}")
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._counts_cache: dict[int, np.ndarray] = {}
        self._start_cache: tuple[int, np.ndarray] = (0, np.zeros(len(codes), np.int64))
        self._perm_cache: dict[int, dict[int, np.ndarray]] = {}

    _MATCHED = ("seed", *_EpochBatches._MATCHED)  # the draw depends on the seed too

    # ------------------------------------------------------------------ epoch bookkeeping
    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        super().set_epoch(epoch)

    # ------------------------------------------------------------------ the draw
    def _counts(self, epoch: int) -> np.ndarray:
        """(epoch_size, D) rows per dataset in each global batch of ``epoch``."""
        hit = self._counts_cache.get(epoch)
        if hit is None:
            u = _rng(self.seed, 0x5EED, epoch).random(self.epoch_size)
            hit = systematic_counts(self.weights, self.global_batch, u)
            if len(self._counts_cache) > 4:
                self._counts_cache.clear()
            self._counts_cache[epoch] = hit
        return hit

    def _epoch_start(self, epoch: int) -> np.ndarray:
        """Position of each dataset's stream at the start of ``epoch`` (rows drawn in all earlier epochs)."""
        e0, start = self._start_cache
        if epoch < e0:
            e0, start = 0, np.zeros(len(self.codes), np.int64)
        start = start.copy()
        for e in range(e0, epoch):
            start += self._counts(e).sum(0)
        self._start_cache = (epoch, start)
        return start

    def _raw_perm(self, d: int, cycle: int) -> np.ndarray:
        return _rng(self.seed, 0xC7C1E, d, cycle).permutation(len(self.pools[d]))

    def _perm(self, d: int, cycle: int) -> np.ndarray:
        """Cycle ``cycle`` of dataset ``d``'s stream: a seeded permutation of its pool indices.

        A batch that straddles a reshuffle takes at most ``m`` rows of the dataset (``m``: the largest per-batch
        count), so the new cycle's first ``m`` places are filled, in permutation order, with rows that are not among
        the previous cycle's last ``m``: a reshuffle never repeats a row within a batch. Each cycle thus depends on
        the one before; cycles are computed forward from the nearest cached one (from cycle 0 after a jump back,
        e.g. on resume). Pools smaller than ``2 m`` cannot avoid repeats and use the raw permutations.
        """
        cache = self._perm_cache.setdefault(d, {})
        hit = cache.get(cycle)
        if hit is not None:
            return hit
        n, m = len(self.pools[d]), int(np.ceil(self.global_batch * self.weights[d] - 1e-9))
        if cycle == 0 or 2 * m > n:
            perm = self._raw_perm(d, cycle)
        else:
            below = [c for c in cache if c < cycle]
            c = max(below) if below else 0
            perm = cache[c] if below else self._raw_perm(d, 0)
            while c < cycle:
                c += 1
                raw = self._raw_perm(d, c)
                first = np.flatnonzero(~np.isin(raw, perm[n - m:]))[:m]
                rest = np.ones(n, bool)
                rest[first] = False
                perm = np.concatenate([raw[first], raw[rest]])
        if len(cache) >= 3:  # a batch reads at most two consecutive cycles
            del cache[min(cache)]
        cache[cycle] = perm
        return perm

    def _stream(self, d: int, lo: int, hi: int) -> np.ndarray:
        """Positions ``[lo, hi)`` of dataset ``d``'s endless stream of cycles (pool indices)."""
        n = len(self.pools[d])
        out = []
        pos = lo
        while pos < hi:
            cycle, off = divmod(pos, n)
            take = min(hi - pos, n - off)
            out.append(self._perm(d, cycle)[off:off + take])
            pos += take
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def global_batch_rows(self, epoch: int, b: int) -> np.ndarray:
        """All ``batch_size * world_size`` manifest rows of global batch ``b`` of ``epoch``, grouped by dataset."""
        if not 0 <= b < self.epoch_size:
            raise IndexError(f"batch {b} is outside [0, {self.epoch_size})")
        counts = self._counts(epoch)
        before = self._epoch_start(epoch) + counts[:b].sum(0)
        parts = []
        for d in range(len(self.codes)):
            c = int(counts[b, d])
            if c:
                lo = int(before[d])
                parts.append(self.pools[d][self._stream(d, lo, lo + c)])
        return np.concatenate(parts)

    def batch(self, epoch: int, b: int) -> np.ndarray:
        """This rank's rows of global batch ``b`` of ``epoch``."""
        return self.global_batch_rows(epoch, b)[self.rank::self.world_size].copy()


class ShardedEvalSampler(_EpochBatches):
    """Every row exactly once per pass across ranks, in order, without padding; the last batch may be partial.

    Rank ``r`` gets rows ``[r * N // W + min(r, N % W) ...)`` (``np.array_split`` shards) cut into batches.
    ``drop_last`` drops each rank's partial last batch (then rows are skipped: use it for training only).
    """

    def __init__(self, rows: np.ndarray, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rows = np.array_split(np.asarray(rows, np.int64), world_size)[rank]
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.position = 0
        self.seed = 0
        n = len(self.rows)
        self.epoch_size = n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch(self, epoch: int, b: int) -> np.ndarray:
        if not 0 <= b < self.epoch_size:
            raise IndexError(f"batch {b} is outside [0, {self.epoch_size})")
        return self.rows[b * self.batch_size:(b + 1) * self.batch_size].copy()
