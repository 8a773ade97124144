"""Drawing from a SWAG posterior: θ̄ + √scale·(σ⊙z₁ + D z₂/√(K−1)), and the one D·z₂ kernel that
every caller uses (a posterior's own pass over its log, a sharded posterior, a dask worker's
share), with D centred on the final mean or on the running means (`coefficients`)."""

from __future__ import annotations

import math
import numbers
import operator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from nvmlib.backends.base import Store
from nvmlib.errors import InputError


def check_sampling(S: Any, scale: Any) -> tuple[int, float]:
    """(S, scale) as int and float (numpy scalars welcome), or an InputError naming the bad one:
    every layer that draws from a posterior checks its arguments here."""
    if isinstance(S, bool) or not isinstance(S, numbers.Integral) or S < 1:
        raise InputError(f"S={S!r}: the number of draws must be an integer >= 1 (e.g. 30)")
    if (
        isinstance(scale, bool)
        or not isinstance(scale, numbers.Real)
        or not math.isfinite(scale)
        or scale < 0
    ):
        raise InputError(
            f"scale={scale!r}: the covariance scale must be a finite number >= 0 "
            "(0.5 in Maddox et al.)"
        )
    return int(S), float(scale)


def low_rank(
    batches: Iterable[tuple[int, np.ndarray]], coef: torch.Tensor, mean: np.ndarray, first: int
) -> torch.Tensor:
    """Σ_k cₖ (θ_k − θ̄) over the rows of `batches` ((first iterate, rows) pairs, rows in any
    order; iterate t takes row t − first of coef (K, S)), (S, n_params) in coef's dtype. The rows
    are centred in place, in mean's dtype. coef is z₂ for D centred on the final mean, and
    `coefficients(z2, count, "running")` for D centred on the running means: either way D z₂."""
    acc = torch.zeros((coef.shape[1], len(mean)), dtype=coef.dtype)
    for t, rows in batches:
        rows = rows.astype(mean.dtype, copy=False)
        rows -= mean
        c = coef[t - first : t - first + len(rows)]
        acc.addmm_(c.T, torch.from_numpy(rows))  # += cᵀ·rows
    return acc


def running(first: int, count: int) -> np.ndarray:
    """M (K, K) float64 with D_running = M·D_final for the kept iterates first..count−1 (global
    indices t): θ_k − θ̄_k = (θ_k − θ̄) + Σ_{kept j>k} (θ_j − θ̄)/(k+1), where θ̄_k, the mean of
    iterates 0..k, is (count·θ̄ − Σ_{j>k} θ_j)/(k+1) and every j > k is kept."""
    K = count - first
    inverse = 1.0 / np.arange(first + 1, count + 1, dtype=np.float64)  # 1/(k+1)
    return np.eye(K) + np.triu(np.ones((K, K)), 1) * inverse[:, None]


def coefficients(z2: torch.Tensor, count: int, deviations: str) -> torch.Tensor:
    """The coefficients (K, S) for `low_rank` that give D z₂ of the K = len(z2) iterates kept
    after `count` updates: z₂ itself for D centred on the final mean ("final"), Mᵀz₂ (`running`)
    for D centred on each row's running mean ("running"), i.e. cⱼ = z₂ⱼ + Σ_{kept k<j}
    z₂ₖ/(k+1). The mean term needs no coefficient of its own: Σ_k z₂ₖ(θ_k − θ̄_k) = Σⱼ cⱼθⱼ − bθ̄
    with b = Σ_k z₂ₖ·count/(k+1) = Σⱼ cⱼ (the running deviations do not move when every θ
    does), so the kernel's Σⱼ cⱼ(θⱼ − θ̄) is it exactly."""
    if deviations == "final":
        return z2
    if deviations != "running":
        raise InputError(f"deviations={deviations!r} is not one of final, running")
    K = z2.shape[0]
    if count < K:
        raise ValueError(f"{K} kept iterates cannot follow {count} updates")
    m = running(count - K, count)
    return torch.from_numpy((m.T @ z2.numpy().astype(np.float64)).astype(z2.numpy().dtype))


BLOCK = 1 << 16  # parameters per block: of the diagonal noise's stream and of a block-wise pass
Sink = Callable[[int, int, np.ndarray], None]  # takes the draws' parameters a..b−1, (S, b − a)


def blocks(n: int) -> list[tuple[int, int]]:
    """The [a, b) blocks of BLOCK parameters (the last one shorter) of an n-parameter vector."""
    return [(a, min(a + BLOCK, n)) for a in range(0, n, BLOCK)]


class Noise:
    """The draws' randomness, from the seed alone: z₂ (K, S), and z₁ block by block of the
    parameter vector, block g from a generator of its own, seeded with a hash of (seed, g)
    (numpy's SeedSequence), so z₁ does not depend on how a pass cuts the vector, on the tier, or
    on how many processes draw it. The normals are torch's (a vectorised Box-Muller, 2.4x numpy's
    per core here), the one stream torch.Generator takes a seed for."""

    def __init__(self, seed: int | None, S: int, K: int, work: type) -> None:
        seed_z1, seed_z2 = np.random.SeedSequence(seed).spawn(2)
        self.S, self.work = S, work
        self.key = [int(k) for k in seed_z1.generate_state(2, np.uint64)]
        self._dtype = torch.float64 if work == np.float64 else torch.float32
        z2 = np.random.default_rng(seed_z2).standard_normal((K, S)).astype(work) if K >= 2 else None
        self.z2 = None if z2 is None else torch.from_numpy(z2)

    def _block(self, g: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """z₁ of block g, (S, BLOCK)."""
        gen = torch.Generator()
        gen.manual_seed(int(np.random.SeedSequence([*self.key, g]).generate_state(1, np.uint64)[0]))
        return torch.randn((self.S, BLOCK), generator=gen, dtype=self._dtype, out=out)

    def z1(self, a: int, b: int) -> np.ndarray:
        """z₁'s parameters a..b−1, (S, b − a) standard normals."""
        out = np.empty((self.S, b - a), self.work)
        if a % BLOCK == 0 and b - a == BLOCK:  # a whole block, drawn where it goes
            self._block(a // BLOCK, torch.from_numpy(out))
            return out
        for g in range(a // BLOCK, (b - 1) // BLOCK + 1):
            z = self._block(g).numpy()
            lo, hi = max(a, g * BLOCK), min(b, (g + 1) * BLOCK)
            out[:, lo - a : hi - a] = z[:, lo - g * BLOCK : hi - g * BLOCK]
        return out


def _combine(
    z1: np.ndarray,
    mean: np.ndarray,
    variance: np.ndarray,
    acc: np.ndarray | None,
    K: int,
    scale: float,
) -> np.ndarray:
    """The draws' parameters a..b−1, θ̄ + √scale·(σ⊙z₁ + D z₂/√(K−1)), (S, b − a) float32, from
    that block's z₁ (Noise.z1(a, b), scaled in place), θ̄ (in the work dtype), Σ_diag and D z₂
    (None: K < 2)."""
    out = z1
    out *= np.sqrt(variance).astype(out.dtype)
    if acc is not None:
        acc /= math.sqrt(K - 1)
        out += acc
    out *= math.sqrt(scale)
    out += mean
    return out.astype(np.float32, copy=False)


def draw(
    S: int,
    scale: float,
    seed: int | None,
    mean: np.ndarray,
    variance: np.ndarray,
    K: int,
    work: type,
    low_rank: Callable[[torch.Tensor, np.ndarray], torch.Tensor],
    sink: Sink | None = None,
    count: int = 0,
    deviations: str = "final",
) -> np.ndarray | None:
    """S draws θ̄ + √scale·(σ⊙z₁ + D z₂/√(K−1)) with D z₂ of the whole vector from elsewhere:
    low_rank(c, θ̄) gives Σ_k cₖ (θ_k − θ̄), (S, n) (a sharded posterior's ranks, a dask
    cluster), for the coefficients c = coefficients(z₂, count, deviations) (K, S) of the K
    iterates kept after `count` updates. z₁ and z₂ are Noise(seed), so these draws equal a local
    pass's to float32 rounding. Returns the (S, n) float32 draws, or gives them block by block to
    `sink`."""
    S, scale = check_sampling(S, scale)
    noise, n = Noise(seed, S, K, work), len(mean)
    mean = mean.astype(work)
    acc = (
        None
        if noise.z2 is None
        else low_rank(coefficients(noise.z2, count, deviations), mean).numpy()
    )
    out = np.empty((S, n), np.float32) if sink is None else None
    for a, b in blocks(n):
        part = _combine(
            noise.z1(a, b), mean[a:b], variance[a:b], None if acc is None else acc[:, a:b], K, scale
        )
        if out is None:
            sink(a, b, part)
        else:
            out[:, a:b] = part
    return out


def draw_blocks(
    S: int,
    scale: float,
    seed: int | None,
    n: int,
    K: int,
    work: type,
    stats: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
    rows: Callable[[int, int], np.ndarray] | None,
    sink: Sink,
    count: int = 0,
    deviations: str = "final",
) -> None:
    """S draws, as `draw`, in one pass over parameter blocks: for block [a, b), stats(a, b) gives
    its θ̄ and Σ_diag and rows(a, b) the K kept rows' parameters a..b−1 (K, b − a), read in block
    order (None: K < 2), of the iterates kept after `count` updates, centred as `deviations`
    says; the draws' block goes to `sink` while the next block is read and computed on a thread.
    Memory: a few blocks × (K + S), whatever S and n."""
    S, scale = check_sampling(S, scale)
    noise = Noise(seed, S, K, work)
    coef = None if noise.z2 is None else coefficients(noise.z2, count, deviations)

    def block(a: int, b: int, z1: Future) -> np.ndarray:
        mean, variance = stats(a, b)
        mean = mean.astype(work)
        acc = (
            None
            if coef is None or rows is None
            else low_rank([(0, rows(a, b))], coef, mean, 0).numpy()
        )
        return _combine(z1.result(), mean, variance, acc, K, scale)

    edges = blocks(n)
    ahead: dict[int, Future] = {}  # z₁ of the next blocks, drawn on a thread of its own meanwhile

    def noise_for(i: int) -> Future:
        for j in range(i, min(i + 2, len(edges))):
            if j not in ahead:
                ahead[j] = noisy.submit(noise.z1, *edges[j])
        return ahead.pop(i)

    with (
        ThreadPoolExecutor(1, thread_name_prefix="nvmlib-draw") as pool,
        ThreadPoolExecutor(1, thread_name_prefix="nvmlib-noise") as noisy,
    ):
        pending = pool.submit(block, *edges[0], noise_for(0))
        for i, (a, b) in enumerate(edges):
            part = pending.result()
            if i + 1 < len(edges):
                pending = pool.submit(block, *edges[i + 1], noise_for(i + 1))
            sink(a, b, part)


DRAWS = "swag.draws"  # the array sample(out=store) writes by default
SHAPE = ".shape"  # suffix of the array that records a Draws' (rows, n)


class Draws:
    """A (rows, n) matrix on a store, block-major: array `name` of shape (blocks·rows, BLOCK) holds
    row r's parameters [g·BLOCK, (g+1)·BLOCK) in its row g·rows + r (zeros past n), so a pass over
    parameter blocks writes or reads one block of every row with one call; `name`.shape holds
    (rows, n). Read-only to its users: len, shape, dtype, [int or slice] (numpy), iteration row
    by row and np.asarray read the rows on demand."""

    def __init__(self, store: Store, name: str = DRAWS) -> None:
        self.store, self.name = store, name
        self.rows, self.n = (int(v) for v in store.read_rows(name + SHAPE, 0, 2))
        self.dtype = np.dtype(store.dtype(name))
        self.shape = (self.rows, self.n)

    @staticmethod
    def nbytes(rows: int, n: int, dtype: Any = np.float32) -> int:
        """Bytes the arrays of a (rows, n) Draws take on a tier."""
        return len(blocks(n)) * rows * BLOCK * np.dtype(dtype).itemsize + 16

    @classmethod
    def create(cls, store: Store, name: str, rows: int, n: int, dtype: Any = np.float32) -> "Draws":
        """A new (rows, n) matrix of zeros on `store`, replacing one of that name."""
        for old in (name, name + SHAPE):
            if old in store:
                store.delete(old)
        store.create(name + SHAPE, (2,), "int64")
        store.write_rows(name + SHAPE, 0, np.array([rows, n], np.int64))
        store.create(name, (len(blocks(n)) * rows, BLOCK), dtype)
        return cls(store, name)

    def delete(self) -> None:
        """Remove the arrays from the store."""
        for name in (self.name, self.name + SHAPE):
            if name in self.store:
                self.store.delete(name)

    def write_block(self, a: int, b: int, block: np.ndarray) -> None:
        """Parameters a..b−1 (a block of `blocks(n)`) of every row, (rows, b − a)."""
        if b - a < BLOCK:
            whole = np.zeros((self.rows, BLOCK), self.dtype)
            whole[:, : b - a] = block
            block = whole
        block = block.astype(self.dtype, copy=False)
        self.store.write_rows(self.name, a // BLOCK * self.rows, block)

    def write_row(self, r: int, row: np.ndarray) -> None:
        """Row r, (n,)."""
        part = np.zeros((1, BLOCK), self.dtype)
        for a, b in blocks(self.n):
            part[0, : b - a] = row[a:b]
            self.store.write_rows(self.name, a // BLOCK * self.rows + r, part)

    def read_block(self, a: int, b: int) -> np.ndarray:
        """Parameters a..b−1 (a block of `blocks(n)`) of every row, (rows, b − a), a new array."""
        g = a // BLOCK
        return self.store.read_rows(self.name, g * self.rows, (g + 1) * self.rows)[:, : b - a]

    def row(self, r: int) -> np.ndarray:
        """Row r, (n,)."""
        if not -self.rows <= r < self.rows:
            raise IndexError(f"row {r} of {self.rows}")
        r %= self.rows
        out = np.empty(self.n, self.dtype)
        for a, b in blocks(self.n):
            at = a // BLOCK * self.rows + r
            out[a:b] = self.store.read_rows(self.name, at, at + 1)[0, : b - a]
        return out

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, key: int | slice) -> np.ndarray:
        if isinstance(key, slice):
            picked = range(*key.indices(self.rows))
            out = np.empty((len(picked), self.n), self.dtype)
            for i, r in enumerate(picked):
                out[i] = self.row(r)
            return out
        return self.row(operator.index(key))

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.row(r) for r in range(self.rows))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        for a, b in blocks(self.n):
            out[:, a:b] = self.read_block(a, b)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return (
            f"<Draws {self.rows} × {self.n} {self.dtype} as {self.name} on {self.store.describe()}>"
        )
