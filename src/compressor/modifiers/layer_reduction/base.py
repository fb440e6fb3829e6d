"""LayerReductionModifier: a shallower model that keeps chosen decoder layers."""

from __future__ import annotations

from typing import Any, Literal

import torch
from loguru import logger
from pydantic import Field, PrivateAttr, model_validator

from compressor.architectures import find_decoder_layers_path
from compressor.core import Event, State
from compressor.modifiers.base import CalibrationTraits, Modifier
from compressor.modifiers.layer_reduction.surgery import angular_distance, keep_decoder_layers
from compressor.utils import distributed
from compressor.utils.finite import check_finite_weights

__all__ = ["LayerReductionModifier"]


@Modifier.register("LayerReduction")
class LayerReductionModifier(Modifier):
    """Removes whole decoder layers, chosen by index or by how little they change the
    hidden state (angular distance, Gromov et al. 2024, "The Unreasonable Ineffectiveness of
    the Deeper Layers", arXiv:2403.17887). The result is a real smaller model whose config
    says so; train it back with ``OutputDistillationModifier`` and the original model as the
    session's teacher.

    **Lifecycle**

    - ``on_initialize``: check the fields against the model; with ``strategy: index`` the
      layers are removed now (training: the student starts from the kept layers; create the
      optimizer after ``session.initialize``)
    - ``on_start`` on CALIBRATION_EPOCH_START (``angular``): record each layer's input and
      output hidden states on every calibration batch
    - ``on_end`` on CALIBRATION_EPOCH_END (``angular``): drop the block of
      ``num_layers_to_drop`` consecutive layers whose input and output are closest in angle;
      the chosen indices are logged and kept as ``dropped_layers``; ``recipe_args`` then
      reports them as ``drop_layers`` with ``strategy: index``, so the saved recipe
      reproduces the run without calibration data; under a process group the mean distances
      are over every rank's batches (their sums and counts added over the ranks)

    :param keep_number_layer: how many layers are kept (DeepSpeed's name); must match
        ``teacher_layer``
    :param teacher_layer: indices of the layers kept (DeepSpeed's name)
    :param drop_layers: indices of the layers removed (instead of ``teacher_layer``)
    :param strategy: ``index`` (the fields above) or ``angular`` (chosen from data)
    :param num_layers_to_drop: ``angular``: size of the block of consecutive layers removed
        (or give ``keep_number_layer``: the block is then all the layers it does not keep)
    :param module_name_prefix: dotted name of the decoder layer list (DeepSpeed's name);
        inferred for Llama, Mistral, Qwen2/3, GPT-2, OPT and BERT
    :param other_module_name: modules DeepSpeed copies from teacher to student; the layers
        are removed in place here, so these are only checked to exist
    """

    keep_number_layer: int | None = Field(default=None, ge=1)
    teacher_layer: list[int] | None = None
    drop_layers: list[int] | None = None
    strategy: Literal["index", "angular"] = "index"
    num_layers_to_drop: int | None = Field(default=None, ge=1)
    module_name_prefix: str | None = None
    other_module_name: list[str] | None = None

    _path: str | None = PrivateAttr(default=None)
    _states: dict[int, list[torch.Tensor]] = PrivateAttr(default_factory=dict)
    _dropped: list[int] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self) -> LayerReductionModifier:
        for name in ("teacher_layer", "drop_layers"):
            values = getattr(self, name)
            valid = values is None or (
                values and min(values) >= 0 and len(set(values)) == len(values)
            )
            if not valid:
                raise ValueError(f"{name} must be distinct layer indices >= 0, got {values}")
        if self.strategy == "index":
            if (self.teacher_layer is None) == (self.drop_layers is None):
                raise ValueError(
                    "strategy 'index' needs exactly one of teacher_layer (layers kept) or "
                    "drop_layers (layers removed)"
                )
            if self.num_layers_to_drop is not None:
                raise ValueError("num_layers_to_drop is for strategy 'angular'")
        else:
            if (self.num_layers_to_drop is None) == (self.keep_number_layer is None):
                raise ValueError(
                    "strategy 'angular' needs exactly one of num_layers_to_drop or "
                    "keep_number_layer"
                )
            if self.teacher_layer is not None or self.drop_layers is not None:
                raise ValueError(
                    "strategy 'angular' chooses the layers itself: leave teacher_layer and "
                    "drop_layers unset"
                )
            if self.start is not None:
                raise ValueError(
                    "strategy 'angular' runs on calibration data (post-training): leave start "
                    "unset, or use strategy 'index' in training"
                )
        if (
            self.keep_number_layer is not None
            and self.teacher_layer is not None
            and self.keep_number_layer != len(self.teacher_layer)
        ):
            raise ValueError(
                f"keep_number_layer ({self.keep_number_layer}) differs from the number of "
                f"teacher_layer entries ({len(self.teacher_layer)})"
            )
        return self

    def requires_calibration_data(self) -> bool:
        return self.strategy == "angular"

    def calibration_traits(self) -> CalibrationTraits:
        """The angular distances are means over batches, reduced over the ranks of a process
        group as their sums and counts."""
        return CalibrationTraits(reduces_across_ranks=True)

    @property
    def dropped_layers(self) -> list[int] | None:
        """The layers the angular strategy chose and removed (None until it has chosen)."""
        return None if self._dropped is None else list(self._dropped)

    def recipe_args(self) -> dict[str, Any]:
        """The recipe's arguments; after an angular run, the layers it chose, as
        ``drop_layers`` with ``strategy: index``, so the saved recipe reproduces the run."""
        if self._dropped is None:
            return super().recipe_args()
        # The choice is a result of the run, kept privately: the public fields stay the
        # recipe as given (and could not be reassigned one by one under validate_assignment,
        # each half-way state failing the validator). The resolved form is validated whole.
        chosen = {"strategy": "index", "num_layers_to_drop": None, "drop_layers": self._dropped}
        return type(self).model_validate({**self.model_dump(), **chosen}).recipe_args()

    # ---------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State) -> None:
        model = state.model
        self._path = self.module_name_prefix or find_decoder_layers_path(model)
        try:
            layers = model.get_submodule(self._path)
        except AttributeError:
            raise ValueError(f"module_name_prefix={self._path!r}: no such module") from None
        count = len(layers)
        for name in self.other_module_name or []:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"other_module_name: {name!r} is not a module of the model"
                ) from None
        if self.strategy == "angular":
            # the angles compare hidden states, which a NaN or inf weight poisons
            check_finite_weights(model.named_modules(), type(self).__name__)
            if self.keep_number_layer is not None and self.keep_number_layer >= count:
                raise ValueError(
                    f"keep_number_layer={self.keep_number_layer} must be below the model's "
                    f"{count} layers"
                )
            drop = self._block_size(count)
            if not 0 < drop < count:
                raise ValueError(
                    f"num_layers_to_drop={drop} must be below the model's {count} layers"
                )
            return
        keep = self._kept(count)
        before = sum(p.numel() for p in model.parameters())
        keep_decoder_layers(model, keep, self._path)
        after = sum(p.numel() for p in model.parameters())
        logger.info(
            "LayerReductionModifier kept layers {} of {} ({:.1f}% of the parameters)",
            keep,
            count,
            100 * after / before,
        )

    def _block_size(self, count: int) -> int:
        if self.num_layers_to_drop is not None:
            return self.num_layers_to_drop
        assert self.keep_number_layer is not None
        return count - self.keep_number_layer

    def _kept(self, count: int) -> list[int]:
        field = "teacher_layer" if self.teacher_layer is not None else "drop_layers"
        values = self.teacher_layer if self.teacher_layer is not None else self.drop_layers
        assert values is not None
        bad = [v for v in values if v >= count]
        if bad:
            raise ValueError(
                f"{field}: indices {bad} out of range; the model has layers 0..{count - 1}"
            )
        if self.teacher_layer is not None:
            return sorted(self.teacher_layer)
        keep = [i for i in range(count) if i not in set(values)]
        if not keep:
            raise ValueError("drop_layers removes every layer")
        if self.keep_number_layer is not None and self.keep_number_layer != len(keep):
            raise ValueError(
                f"keep_number_layer ({self.keep_number_layer}) differs from the {len(keep)} "
                f"layers that drop_layers leaves of {count}"
            )
        return keep

    def on_start(self, state: State, event: Event) -> None:
        if self.strategy != "angular":
            return
        assert self._path is not None
        layers = state.model.get_submodule(self._path)
        # states[0]: layer 0's input per batch; states[i + 1]: layer i's output per batch.
        # Kept per batch (on the CPU) so that any pipeline works: the basic one runs each
        # batch through every layer, the sequential one every batch through one layer.
        self._states = {i: [] for i in range(len(layers) + 1)}

        def record(index: int, hidden: torch.Tensor) -> None:
            self._states[index].append(hidden.detach().to("cpu", torch.float32))

        def first_input(_module: Any, args: tuple, kwargs: dict) -> None:
            record(0, args[0] if args else kwargs["hidden_states"])

        def output_of(index: int):
            def hook(_module: Any, _args: Any, output: Any) -> None:
                record(index + 1, output[0] if isinstance(output, tuple) else output)

            return hook

        self.register_hook(layers[0], first_input, "forward_pre", with_kwargs=True)
        for index, layer in enumerate(layers):
            self.register_hook(layer, output_of(index), "forward")

    def _mean_block_distances(self, count: int) -> torch.Tensor:
        """Mean angular distance between the input of layer i and the output of layer
        i + n - 1, for every block start i, over the calibration batches."""
        batches = {len(v) for v in self._states.values()}
        if batches == {0}:
            raise RuntimeError(
                "LayerReductionModifier (angular) saw no calibration batch: run it through "
                "oneshot with a dataset and the basic or sequential pipeline"
            )
        if len(batches) != 1:
            raise RuntimeError(
                f"LayerReductionModifier (angular): layers saw different numbers of batches "
                f"({sorted(batches)})"
            )
        n = self._block_size(count)
        per_batch = [
            torch.stack(
                [
                    angular_distance(self._states[i][b], self._states[i + n][b])
                    for i in range(count - n + 1)
                ]
            )
            for b in range(batches.pop())
        ]
        if not distributed.is_distributed():
            return torch.stack(per_batch).mean(dim=0)
        # the mean over every rank's batches: their sum and number, added over the ranks
        total = torch.stack(per_batch).double().sum(dim=0)
        batches_seen = torch.tensor([len(per_batch)], dtype=torch.float64)
        distributed.all_reduce_(total, "sum")
        distributed.all_reduce_(batches_seen, "sum")
        return (total / batches_seen).float()

    def on_end(self, state: State, event: Event) -> None:
        if self.strategy != "angular":
            return
        self.remove_hooks()
        assert self._path is not None
        count = len(state.model.get_submodule(self._path))
        mean = self._mean_block_distances(count)
        self._states = {}
        first = int(torch.argmin(mean))
        dropped = list(range(first, first + self._block_size(count)))
        logger.info(
            "LayerReductionModifier (angular): mean distance per block start {}; drops {}",
            [round(float(d), 4) for d in mean],
            dropped,
        )
        keep_decoder_layers(state.model, [i for i in range(count) if i not in dropped], self._path)
        self._dropped = dropped
