"""Ranges of weights and activations, reduced to the shape of their quantization scales.

Pure functions, a stateful observer per range and ``ActivationObservers``, the ranges a
quantizing pathway observes by module; compressed-tensors turns ranges into scales
and zero points (``calculate_qparams``), which also keeps an all-zero group's scale away
from zero (it becomes the dtype's epsilon, so nothing divides by zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStrategy,
)
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

from compressor.utils import distributed
from compressor.utils.merged_batches import split_into_batches

__all__ = [
    "LLMCOMPRESSOR_AVERAGING_CONSTANT",
    "OBSERVER_KWARGS",
    "ActivationObservers",
    "ObserverKind",
    "RangeKind",
    "RangeObserver",
    "activation_range",
    "averages_over_batches",
    "check_finite_range",
    "dynamic_per_forward",
    "global_scale",
    "make_observer",
    "observe_activation",
    "qparams_from_range",
    "reads_outputs",
    "weight_range",
]

ObserverKind = Literal["minmax", "moving_average"]
#: how a range accumulates over batches: the extremes, a moving average, or the last batch's
RangeKind = Literal["minmax", "moving_average", "last"]
#: llm-compressor's default ``averaging_constant`` for its ``minmax`` observer
LLMCOMPRESSOR_AVERAGING_CONSTANT = 0.01
#: the observer names a config group's args may give, and the ``observer_kwargs`` each reads
OBSERVER_KWARGS: dict[str | None, tuple[str, ...]] = {
    None: (),
    "static_minmax": (),
    "memoryless_minmax": (),
    "minmax": ("averaging_constant",),
    "moving_average": ("momentum",),
}


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Weights as (output rows, input columns); a convolution's kernel is flattened."""
    return weight.flatten(1) if weight.dim() > 2 else weight


def weight_range(weight: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The min and max of a weight, one per scale, in the shape compressed-tensors expects.

    tensor: (1,); channel: (rows, 1); group and tensor_group: (rows, columns / group_size)
    (tensor_group's global scale comes from the whole weight's range, see ``global_scale``);
    block: (row blocks, column blocks).
    """
    w = _as_matrix(weight.detach()).float()
    strategy = args.strategy
    if strategy == QuantizationStrategy.TENSOR:
        lo, hi = torch.aminmax(w)
        return lo.reshape(1), hi.reshape(1)
    if strategy == QuantizationStrategy.CHANNEL:
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    if strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        size = args.group_size
        if w.shape[1] % size:
            raise ValueError(f"group_size={size} does not divide {w.shape[1]} weight columns")
        grouped = w.unflatten(1, (w.shape[1] // size, size))
        return grouped.amin(dim=-1), grouped.amax(dim=-1)
    if strategy == QuantizationStrategy.BLOCK:
        rows, cols = args.block_structure
        pad_rows = -w.shape[0] % rows
        if w.shape[1] % cols:
            raise ValueError(f"block columns {cols} do not divide {w.shape[1]} weight columns")
        if pad_rows:  # padded rows repeat the last one, which changes no block's range
            w = torch.cat([w, w[-1:].expand(pad_rows, -1)])
        blocks = w.unflatten(0, (w.shape[0] // rows, rows)).unflatten(2, (w.shape[1] // cols, cols))
        return blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
    raise ValueError(f"weight strategy {strategy!r} has no range reduction")


def activation_range(x: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The min and max of a batch of activations for a static scale.

    tensor: (1,); group: (features / group_size,), reduced over every token; tensor_group
    (NVFP4 activations, whose group scales are dynamic): (1,), for their global scale.
    """
    x = x.detach().float()
    if args.strategy in (QuantizationStrategy.TENSOR, QuantizationStrategy.TENSOR_GROUP):
        lo, hi = torch.aminmax(x)
        return lo.reshape(1), hi.reshape(1)
    if args.strategy == QuantizationStrategy.GROUP:
        size = args.group_size
        grouped = x.reshape(-1, x.shape[-1] // size, size)
        return grouped.amin(dim=(0, 2)), grouped.amax(dim=(0, 2))
    raise ValueError(f"static activation strategy {args.strategy!r} has no range reduction")


def check_finite_range(lo: torch.Tensor, hi: torch.Tensor, where: str) -> None:
    """Raise ValueError naming ``where`` when a range holds NaN or inf."""
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError(
            f"{where}: the observed range contains NaN or inf (min={lo.min().item()}, "
            f"max={hi.max().item()}); quantization needs finite values. Check the model's "
            "weights and the calibration data"
        )


def qparams_from_range(
    lo: torch.Tensor,
    hi: torch.Tensor,
    args: QuantizationArgs,
    where: str,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for a finite range (an all-zero range gets epsilon scales).

    :param global_scale: tensor_group (NVFP4): the tensor's global scale, which the group
        scales are multiplied by before they are rounded to their fp8 grid
    """
    check_finite_range(lo, hi, where)
    return calculate_qparams(lo, hi, args, global_scale=global_scale)


def global_scale(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-tensor global scale from the tensor's range, shape (1,): it maps the
    tensor's largest magnitude to the largest fp8 (E4M3) group scale times the largest FP4
    (E2M1) value, so the fp8 group scales use their whole range. A zero range gives 1."""
    return generate_gparam(lo.amin().reshape(1), hi.amax().reshape(1))


@dataclass
class RangeObserver:
    """Accumulates an activation range over batches.

    :param kind: ``minmax`` keeps the extreme min and max seen; ``moving_average`` keeps
        ``momentum * running + (1 - momentum) * batch`` (the first batch initialises it);
        ``last`` keeps the last batch's range
    :param momentum: weight of the running value in the moving average
    """

    kind: RangeKind = "moving_average"
    momentum: float = 0.95
    lo: torch.Tensor | None = field(default=None, repr=False)
    hi: torch.Tensor | None = field(default=None, repr=False)
    batches: int = 0

    def update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo.clone(), hi.clone()
        elif self.kind == "minmax":
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        elif self.kind == "last":
            self.lo, self.hi = lo.clone(), hi.clone()
        else:
            m = self.momentum
            self.lo = m * self.lo + (1 - m) * lo
            self.hi = m * self.hi + (1 - m) * hi
        self.batches += 1

    def reduce_across_ranks(self, device: torch.device | str | None = None) -> None:
        """Make the range the one over every rank's batches, identical on every rank.

        ``minmax``: the extremes over all ranks, which is what one process seeing the union of
        the data would keep. ``moving_average``: the mean of the running ranges of the ranks
        that saw a batch (an average of averages; a moving average depends on batch order, so
        no reduction reproduces a single process exactly). ``batches`` becomes the total over
        the ranks. A rank that saw no batch takes the others' range. Nothing changes in one
        process, or when no rank saw a batch. Call it at the same point on every rank, and
        once per range: a second call would count the batches again.

        :param device: where the reduction runs when this rank has no range yet (the
            backend's device: CUDA for NCCL); otherwise the range's own device
        """
        if not distributed.is_distributed():
            return
        local = self.batches > 0 and self.lo is not None and self.hi is not None
        numel = self.lo.numel() if self.lo is not None else 0
        where = self.lo.device if self.lo is not None else torch.device(device or "cpu")
        counts = torch.tensor([self.batches, numel], dtype=torch.int64, device=where)
        total = int(distributed.all_reduce_(counts[:1].clone(), "sum").item())
        if total == 0:
            return
        numel = int(distributed.all_reduce_(counts[1:].clone(), "max").item())
        if local:
            assert self.lo is not None and self.hi is not None
            lo, hi = self.lo.float().clone(), self.hi.float().clone()
        elif self.kind == "minmax":  # the neutral elements of min and max
            lo = torch.full((numel,), torch.inf, device=where)
            hi = torch.full((numel,), -torch.inf, device=where)
        else:
            lo, hi = torch.zeros(numel, device=where), torch.zeros(numel, device=where)
        if self.kind == "minmax":
            distributed.all_reduce_(lo, "min")
            distributed.all_reduce_(hi, "max")
        else:  # ranks without a batch add zero and count zero
            distributed.all_reduce_mean_(lo, float(local))
            distributed.all_reduce_mean_(hi, float(local))
        shape = self.lo.shape if self.lo is not None else (numel,)
        self.lo, self.hi = lo.reshape(shape), hi.reshape(shape)
        self.batches = total

    @property
    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None or self.hi is None:
            raise RuntimeError("the observer has seen no batch")
        return self.lo, self.hi


def observe_activation(
    observer: RangeObserver, value: torch.Tensor, args: QuantizationArgs, where: str
) -> None:
    """Update ``observer`` with an activation a forward saw. A range that depends on the
    batches (a moving average, the last batch's) takes each calibration batch the forward
    stacked on its own, as if the batches had run one by one (``utils.merged_batches``).

    :param where: the module and role, for errors
    """
    parts = [value] if observer.kind == "minmax" else split_into_batches(value, where)
    for part in parts:
        lo, hi = activation_range(part, args)
        check_finite_range(lo, hi, where)
        observer.update(lo, hi)


def make_observer(
    args: QuantizationArgs, kind: ObserverKind, momentum: float, prefer_args: bool = True
) -> RangeObserver:
    """An observer for ``args``.

    A config group's ``observer`` names mean what they mean in llm-compressor, whose recipes
    write them: ``static_minmax`` keeps the extremes over every batch; ``minmax`` is a
    moving average of each batch's range, ``running + c * (batch - running)`` with
    ``observer_kwargs.averaging_constant`` c (default 0.01, so the first batches weigh
    most; c = 1 keeps the last batch's range); ``memoryless_minmax`` keeps the last batch's
    range. ``moving_average`` is ours (``observer_kwargs.momentum``, default the modifier's).

    :param kind: the observer when ``args`` names none (the modifier's ``observer``:
        ``minmax`` keeps the extremes, ``moving_average`` averages with ``momentum``)
    :param prefer_args: whether ``args.observer`` / ``observer_kwargs`` win over ``kind``
        and ``momentum`` (they do for explicit config groups, not for a preset's defaults)
    """
    named = args.observer if prefer_args else None
    if named not in OBSERVER_KWARGS:
        raise ValueError(f"observer={named!r} is not supported; use one of {list(OBSERVER_KWARGS)}")
    kwargs = dict(args.observer_kwargs or {}) if prefer_args else {}
    unknown = sorted(set(kwargs) - set(OBSERVER_KWARGS[named]))
    if unknown:
        raise ValueError(
            f"observer={named!r}: observer_kwargs {unknown} are not read by this observer; "
            f"it reads {list(OBSERVER_KWARGS[named]) or 'none'}"
        )
    if named is None:
        return RangeObserver(kind=kind, momentum=momentum)
    if named == "static_minmax":
        return RangeObserver(kind="minmax")
    if named == "memoryless_minmax":
        return RangeObserver(kind="last")
    if named == "minmax":
        constant = float(kwargs.get("averaging_constant", LLMCOMPRESSOR_AVERAGING_CONSTANT))
        if not 0.0 < constant <= 1.0:
            raise ValueError(
                f"observer='minmax': observer_kwargs.averaging_constant={constant!r} must lie "
                "in (0, 1] (the weight of each new batch's range)"
            )
        if constant == 1.0:
            return RangeObserver(kind="last")
        return RangeObserver(kind="moving_average", momentum=1.0 - constant)
    chosen = float(kwargs.get("momentum", momentum))
    if not 0.0 < chosen < 1.0:
        raise ValueError(
            f"observer='moving_average': observer_kwargs.momentum={chosen!r} must lie in (0, 1)"
        )
    return RangeObserver(kind="moving_average", momentum=chosen)


def averages_over_batches(
    config: QuantizationConfig, kind: ObserverKind, prefer_args: bool
) -> bool:
    """Whether a static activation range of ``config`` (inputs, outputs, the key/value cache)
    depends on how the tokens fall into batches and in which order (a moving average, or the
    last batch's range), as ``make_observer`` chooses: then batches must run one at a time,
    and no reduction over ranks reproduces what one process computes."""
    static = [
        args
        for scheme in config.config_groups.values()
        if isinstance(scheme, QuantizationScheme)
        for args in (scheme.input_activations, scheme.output_activations)
        if args is not None and not args.dynamic
    ]
    if config.kv_cache_scheme is not None and not config.kv_cache_scheme.dynamic:
        static.append(config.kv_cache_scheme)
    chosen = (make_observer(args, kind, 0.5, prefer_args).kind for args in static)
    return any(c != "minmax" for c in chosen)


def _activation_args(config: QuantizationConfig) -> list[QuantizationArgs]:
    return [
        args
        for scheme in config.config_groups.values()
        if isinstance(scheme, QuantizationScheme)
        for args in (scheme.input_activations, scheme.output_activations)
        if args is not None
    ]


def dynamic_per_forward(config: QuantizationConfig) -> bool:
    """Whether an activation of ``config`` is quantized with one dynamic scale per forward
    (strategy tensor): its values then depend on which rows share the forward."""
    return any(
        args.dynamic is True and args.strategy == QuantizationStrategy.TENSOR
        for args in _activation_args(config)
    )


def reads_outputs(config: QuantizationConfig) -> bool:
    """Whether calibrating ``config`` observes something computed after a quantized module's
    inputs: static output activations, or the key/value cache."""
    static_outputs = any(
        isinstance(scheme, QuantizationScheme)
        and scheme.output_activations is not None
        and scheme.output_activations.dynamic is not True
        for scheme in config.config_groups.values()
    )
    return static_outputs or config.kv_cache_scheme is not None


class ActivationObservers:
    """The static activation ranges observed for a model's modules, one ``RangeObserver`` per
    module name and role (``input`` or ``output``).

    :param kind: the observer for args that name none (and for presets' args)
    :param momentum: the moving average's momentum for those args
    :param prefer_args: whether an args' own ``observer`` / ``observer_kwargs`` win over
        ``kind`` and ``momentum`` (explicit config groups: yes; a preset's defaults: no)
    """

    def __init__(self, kind: ObserverKind, momentum: float, prefer_args: bool) -> None:
        self.kind, self.momentum, self.prefer_args = kind, momentum, prefer_args
        self._by_role: dict[tuple[str, str], RangeObserver] = {}

    def add(self, name: str, role: str, args: QuantizationArgs) -> RangeObserver:
        """A new observer for module ``name``'s ``role`` activations."""
        observer = make_observer(args, self.kind, self.momentum, prefer_args=self.prefer_args)
        self._by_role[(name, role)] = observer
        return observer

    def get(self, name: str, role: str) -> RangeObserver | None:
        return self._by_role.get((name, role))

    def items(self) -> list[tuple[tuple[str, str], RangeObserver]]:
        """``((module name, role), observer)`` pairs, in the order they were added."""
        return list(self._by_role.items())

    def __len__(self) -> int:
        return len(self._by_role)

    def unseen(self) -> list[str]:
        """``"name (role)"`` of every observer that no batch reached."""
        return [f"{name} ({role})" for (name, role), obs in self.items() if obs.batches == 0]

    def reduce_across_ranks(self, modules: dict[str, torch.nn.Module]) -> None:
        """Under DDP, every range becomes the range over all ranks' data, the same on every
        rank (a no-op in one process). Call it once, when the ranges are final.

        :param modules: the observed modules by name (a reduction runs on its weight's device)
        """
        for (name, _role), observer in self._by_role.items():
            weight = modules[name].weight
            assert isinstance(weight, torch.Tensor)
            observer.reduce_across_ranks(device=weight.device)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Every range by ``"name|role"``: ``{"lo", "hi", "batches"}``."""
        return {
            f"{name}|{role}": {"lo": obs.lo, "hi": obs.hi, "batches": obs.batches}
            for (name, role), obs in self._by_role.items()
        }

    def load_state_dict(self, saved: dict[str, dict[str, Any]]) -> None:
        """Restore ``state_dict()``; ValueError when it holds a range this run does not observe."""
        observers = {f"{name}|{role}": obs for (name, role), obs in self._by_role.items()}
        unknown = sorted(set(saved) - set(observers))
        if unknown:
            raise ValueError(
                f"the checkpoint has observers {unknown} that this run does not have (was it "
                "saved with another scheme or targets?)"
            )
        for key, saved_range in saved.items():
            observer = observers[key]
            observer.lo, observer.hi = saved_range["lo"], saved_range["hi"]
            observer.batches = saved_range["batches"]
