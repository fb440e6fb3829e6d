"""Modifiers for pipeline tests: one that records what each decoder layer sees during
calibration, and one that also changes each layer's weights when its turn ends."""

from __future__ import annotations

import torch
from pydantic import PrivateAttr

from compressor.architectures import find_decoder_layers
from compressor.core import Event, EventType, State
from compressor.modifiers import Modifier


@Modifier.register()
class LayerInputRecorder(Modifier):
    """Needs calibration data; records the hidden states each decoder layer is called with
    while hooks are live, and which modules each SEQUENTIAL_EPOCH_END carried."""

    _inputs: dict[int, list[torch.Tensor]] = PrivateAttr(default_factory=dict)
    _epoch_ends: list[object] = PrivateAttr(default_factory=list)
    _events: list[str] = PrivateAttr(default_factory=list)

    def requires_calibration_data(self) -> bool:
        return True

    def on_start(self, state: State, event: Event) -> None:
        _, layers = find_decoder_layers(state.model)
        for index, layer in enumerate(layers):
            self.register_hook(layer, self._recorder(index), "forward_pre", with_kwargs=True)

    def _recorder(self, index: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._inputs.setdefault(index, []).append(hidden.detach().clone())

        return hook

    def on_event(self, state: State, event: Event) -> None:
        assert event.type_ is not None
        self._events.append(event.type_.value)
        if event.type_ == EventType.SEQUENTIAL_EPOCH_END:
            (module,) = event.modules  # a decoder layer, or the whole model
            self._epoch_ends.append(module)
            self.compress(module)

    def compress(self, module: torch.nn.Module) -> None:
        """Nothing here; subclasses change the layer."""


@Modifier.register()
class LayerShrinker(LayerInputRecorder):
    """Like LayerInputRecorder, and halves every Linear weight of a layer at its epoch end."""

    def compress(self, module: torch.nn.Module) -> None:
        with torch.no_grad():
            for sub in module.modules():
                if isinstance(sub, torch.nn.Linear | torch.nn.modules.conv.Conv1d) or (
                    type(sub).__name__ == "Conv1D"
                ):
                    sub.weight.mul_(0.5)


@Modifier.register()
class FailAtLayer(LayerInputRecorder):
    """Raises at the SEQUENTIAL_EPOCH_END of layer ``layer`` (a run that fails midway)."""

    layer: int = 0

    def compress(self, module: torch.nn.Module) -> None:
        if len(self._epoch_ends) > self.layer:
            raise RuntimeError(f"failing on purpose at layer {self.layer}")
