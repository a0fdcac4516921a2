"""Initial weights that do not depend on the mesh, at a cost proportional to the local shard.

:class:`KeyedInit` initialises the parameters and buffers of one model. Every random value is
keyed by (seed, the tensor's name in the model, the element's flat index in the whole tensor)
through the counter-based generator of :mod:`ucfvit.models.rng` (:func:`~ucfvit.models.rng.keyed_elements`),
so a fresh model is bitwise the same in one process and on any ``ddp x fsdp x tp`` mesh, and
``torch.manual_seed(s)`` before ``init_weights()`` picks the weights, as it always did. The
distributions are torch's own (uniform, normal, truncated normal by the inverse CDF, the default
``reset_parameters`` of convolutions, constants); only the random source differs.

Sharded (DTensor) parameters: each rank computes the elements of its own shard only, in chunks of
at most :data:`CHUNK` elements, so memory and time are proportional to the shard and a model that
does not fit on one device never exists whole. Which global elements a shard holds is the
parallel layer's knowledge: ``ucfvit.parallel`` registers it with :func:`register_shard_index`
(model code imports nothing from ``torch.distributed``).

``init.check_complete()`` raises if some parameter or buffer was not initialised through the
``KeyedInit``: a module whose values would come from torch's global RNG (per rank, per shard)
fails loudly instead of breaking mesh invariance.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .rng import MAX_KEYED_NUMEL, keyed_elements

__all__ = ["CHUNK", "KeyedInit", "ShardIndex", "register_shard_index"]

CHUNK = {"cpu": 1 << 16}
"""Elements drawn at once per device type (default ``1 << 22``): bounds the int64 intermediates of
the generator (about 40 bytes per element); small on CPUs, where they then stay in cache."""
_DEFAULT_CHUNK = 1 << 22

ShardIndex = Callable[[torch.Tensor], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]
"""``index(dtensor) -> (local tensor, per-dim global indices)``: the local part (unpadded) and, for
each dim, the ascending global indices (int64) it holds along that dim."""

_shard_index: ShardIndex | None = None

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def register_shard_index(index: ShardIndex) -> None:
    """Tell :class:`KeyedInit` how to find the global elements of a DTensor's local shard
    (``ucfvit.parallel`` does this when imported)."""
    global _shard_index
    _shard_index = index


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")  # duck-typed: no torch.distributed here


def _local(t: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """The local part of ``t`` and its per-dim global indices (None: the whole tensor)."""
    if not _is_dtensor(t):
        return t, None
    if _shard_index is None:
        raise TypeError(
            "initialising a DTensor needs to know which elements each rank holds: import ucfvit.parallel "
            "(it registers that with ucfvit.models.init.register_shard_index)"
        )
    return _shard_index(t)


def _is_range(index: torch.Tensor) -> bool:
    n = index.numel()
    return n == 0 or (int(index[-1]) - int(index[0]) == n - 1 and bool((index.diff() == 1).all()))


def _split_dim(shape: tuple[int, ...], local_shape: tuple[int, ...]) -> int:
    """The last dim whose local part is not the whole dim (0 if none): the rows/columns split of
    :func:`_segments`."""
    return max((d for d in range(len(shape)) if local_shape[d] != shape[d]), default=0)


def _segments(
    shape: tuple[int, ...], local_shape: tuple[int, ...], index: tuple[torch.Tensor, ...] | None, chunk: int
) -> Iterator[tuple[tuple[int, int, int, int], torch.Tensor, int]]:
    """Walk a local shard in chunks of at most ``chunk`` elements.

    The shard is viewed as (rows, cols), the columns being dims ``k:`` (``k``: :func:`_split_dim`),
    so that a row is one run of consecutive flat indices of the whole tensor when dim ``k``'s
    indices are consecutive (always, for FSDP and TP shards). Yields ``((r0, r1, c0, c1), starts,
    length)``: rows ``r0:r1`` and columns ``c0:c1`` hold the elements at flat indices ``starts[i] ..
    starts[i] + length - 1`` (one entry of ``starts`` per element where a run is broken). Index
    arithmetic is on the CPU, O(rows + chunk)."""
    k = _split_dim(shape, local_shape)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    index = index or tuple(torch.arange(n) for n in shape)
    rows, cols = math.prod(local_shape[:k]), math.prod(local_shape[k:])
    inner = strides[k]  # elements of the (whole) dims after k per index of dim k
    dim_k = index[k].cpu()
    contiguous = _is_range(dim_k)
    width = min(cols, chunk)
    per_chunk = max(1, chunk // max(1, width))
    for r0 in range(0, rows if cols else 0, per_chunk):
        r1 = min(rows, r0 + per_chunk)
        # flat index of the first element of each row, from the leading dims of the row number
        row, base = torch.arange(r0, r1), torch.zeros(r1 - r0, dtype=torch.int64)
        for d in reversed(range(k)):
            base += index[d].cpu()[row % local_shape[d]] * strides[d]
            row = row // local_shape[d]
        for c0 in range(0, cols, width):
            c1 = min(cols, c0 + width)
            if contiguous:
                yield (r0, r1, c0, c1), base + (int(dim_k[0]) * inner + c0), c1 - c0
            else:  # a broken run: one counter row per element
                column = torch.arange(c0, c1)
                flat = dim_k[column // inner] * inner + column % inner
                yield (r0, r1, c0, c1), (base.unsqueeze(1) + flat).flatten(), 1


class KeyedInit:
    """Initialises the parameters and buffers of ``model``, each value keyed by (seed, the
    tensor's name in ``model``, its global element index); see the module doc.

    Args:
        model: the module whose tensors are initialised (names are relative to it).
        seed: default ``torch.initial_seed()``, the seed of the last ``torch.manual_seed``.
    """

    def __init__(self, model: nn.Module, seed: int | None = None):
        self.seed = torch.initial_seed() if seed is None else int(seed)
        tensors = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers())
        self._names: dict[int, str] = {}
        self._tensors: dict[int, torch.Tensor] = {}
        for name, t in tensors:
            self._names.setdefault(id(t), name)
            self._tensors[id(t)] = t
        self._done: set[int] = set()

    def name(self, t: torch.Tensor) -> str:
        """``t``'s name in the model: the key of its random stream."""
        if id(t) not in self._names:
            raise ValueError(f"a tensor of shape {tuple(t.shape)} is neither a parameter nor a buffer of this model")
        return self._names[id(t)]

    # ------------------------------------------------------------------ distributions
    @torch.no_grad()
    def _draw_(self, t: torch.Tensor, normal: bool, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Fill ``t``'s local elements with ``transform(noise)``, chunk by chunk."""
        name = self.name(t)
        self._done.add(id(t))
        local, index = _local(t)
        if local.is_meta or local.numel() == 0:
            return
        if t.numel() > MAX_KEYED_NUMEL:
            raise ValueError(f"{name} has {t.numel()} elements; keyed initialisation covers up to 2**34")
        shape, local_shape = tuple(t.shape) or (1,), tuple(local.shape) or (1,)
        target = local if local.is_contiguous() else torch.empty(local.shape, dtype=local.dtype, device=local.device)
        grid = target.view(math.prod(local_shape[: _split_dim(shape, local_shape)]), -1)
        chunk = CHUNK.get(local.device.type, _DEFAULT_CHUNK)
        for (r0, r1, c0, c1), starts, length in _segments(shape, local_shape, index, chunk):
            noise = keyed_elements(self.seed, name, starts.to(local.device), length, normal)
            grid[r0:r1, c0:c1].copy_(transform(noise.view(r1 - r0, c1 - c0)))
        if target is not local:
            local.copy_(target)

    def uniform_(self, t: torch.Tensor, low: float = 0.0, high: float = 1.0) -> None:
        """``nn.init.uniform_``: U(low, high)."""
        self._draw_(t, False, lambda u: u * (high - low) + low)

    def normal_(self, t: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> None:
        """``nn.init.normal_``: N(mean, std**2)."""
        self._draw_(t, True, lambda z: z * std + mean)

    def trunc_normal_(
        self, t: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0
    ) -> None:
        """``nn.init.trunc_normal_``: N(mean, std**2) truncated to [a, b] (absolute bounds), by the
        inverse CDF of a uniform on [cdf(a), cdf(b)] as torch does."""

        def cdf(x: float) -> float:
            return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

        low, high = 2 * cdf((a - mean) / std) - 1, 2 * cdf((b - mean) / std) - 1

        def transform(u: torch.Tensor) -> torch.Tensor:
            return (u * (high - low) + low).erfinv_().mul_(std * math.sqrt(2.0)).add_(mean).clamp_(a, b)

        self._draw_(t, False, transform)

    @torch.no_grad()
    def constant_(self, t: torch.Tensor, value: float) -> None:
        self.name(t)
        self._done.add(id(t))
        _local(t)[0].fill_(value)

    def zeros_(self, t: torch.Tensor) -> None:
        self.constant_(t, 0.0)

    def ones_(self, t: torch.Tensor) -> None:
        self.constant_(t, 1.0)

    @torch.no_grad()
    def copy_(self, t: torch.Tensor, value: torch.Tensor) -> None:
        """Set ``t`` to ``value`` (the whole tensor, e.g. a sin-cos table); a shard takes its part."""
        self.name(t)
        self._done.add(id(t))
        local, index = _local(t)
        if local.is_meta:
            return
        value = value.to(local.device)
        for d, idx in enumerate(index or ()):
            if value.shape[d] != local.shape[d]:
                value = value.index_select(d, idx.to(local.device))
        local.copy_(value)

    # ------------------------------------------------------------------ modules
    def reset_(self, module: nn.Module) -> None:
        """Initialise ``module``'s own parameters as its ``reset_parameters`` does, keyed: torch's
        defaults for convolutions (kaiming_uniform(a=sqrt(5)) weight, U(+-1/sqrt(fan_in)) bias, fans
        of the whole weight) and norms (ones, zeros); a ``reset_parameters(init)`` of ucfvit's own
        modules gets this ``KeyedInit``. Other modules are left alone (see :meth:`check_complete`)."""
        if isinstance(module, _CONVS):
            shape = module.weight.shape  # (out, in/groups, *k) or, transposed, (in, out/groups, *k)
            fan_in = shape[1] * math.prod(shape[2:])
            gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
            bound = math.sqrt(3.0) * gain / math.sqrt(fan_in) if fan_in else 0.0
            self.uniform_(module.weight, -bound, bound)
            if module.bias is not None:  # torch leaves the bias of an empty weight unset: zeros here
                bias_bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
                self.uniform_(module.bias, -bias_bound, bias_bound)
        elif isinstance(module, _NORMS):
            if getattr(module, "weight", None) is not None:
                self.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                self.zeros_(module.bias)
        elif "init" in _parameters_of(getattr(module, "reset_parameters", None)):
            module.reset_parameters(self)

    def check_complete(self) -> None:
        """Raise if a parameter or buffer of the model was not initialised through this object."""
        missing = [self._names[i] for i in self._tensors if i not in self._done]
        if missing:
            raise RuntimeError(
                f"init_weights left {missing} to torch's defaults, which differ per rank and per mesh: give "
                "their module a rule in ucfvit.models.init.KeyedInit.reset_ or a reset_parameters(init) method"
            )


def _parameters_of(method) -> tuple[str, ...]:
    return tuple(inspect.signature(method).parameters) if callable(method) else ()
