"""The sequential pipeline: calibrate and compress one decoder layer at a time.

The inputs of the first decoder layer are captured once (the hidden states and every other
argument the model passes it: attention mask, position ids, position embeddings). Then for
each layer ``i``:

1. its cached inputs run through it with the modifiers' hooks live (calibration; when no
   modifier reads module outputs, each forward stops once the layer's last module has its
   inputs, see ``_CalibrationCutter``);
2. ``session.sequential_epoch_end(layer)`` lets modifiers compress it (GPTQ does so here);
3. it runs again with hooks disabled, and its outputs, computed with the compressed
   weights, become the inputs of layer ``i + 1``.

No graph tracing is needed, so any model whose decoder layers ``find_decoder_layers`` finds
works. Only the current layer and the cached activations sit on the compute device.

The other arguments are taken from the first layer and reused for every layer, which holds
for architectures whose layers all see the same mask (Llama-family, GPT-2, OPT, BERT; not
models that alternate sliding-window and full attention per layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from loguru import logger
from tqdm.auto import tqdm

from compressor.core.session import CompressionSession
from compressor.entrypoints.data import Batch
from compressor.entrypoints.pipelines.common import calibration_mode, model_device, to_device
from compressor.modifiers.hooks import HooksMixin
from compressor.utils.architecture import find_decoder_layers
from compressor.utils.memory import release_free_memory
from compressor.utils.offload import check_device_unset, is_offloaded, layer_onloaded

__all__ = ["LayerInputs", "capture_layer_inputs", "run_sequential"]


@dataclass
class LayerInputs:
    """The positional and keyword arguments of one call of a decoder layer."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_states(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden_states(self, hidden_states: torch.Tensor) -> LayerInputs:
        """The same call with other hidden states (the other arguments are shared)."""
        if self.args:
            return LayerInputs((hidden_states, *self.args[1:]), self.kwargs)
        return LayerInputs(self.args, {**self.kwargs, "hidden_states": hidden_states})


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first decoder layer needs to run."""


class _StopLayer(Exception):
    """Raised once a layer's last module has received its inputs, when no modifier reads
    what comes after (the calibration forward's outputs are discarded anyway)."""


class _CalibrationCutter:
    """Ends a layer's calibration forwards at its last module's inputs.

    The first forward runs whole, recording the order in which the layer's leaf modules are
    called. From then on a forward pre-hook on the last of them, registered after every
    modifier's hooks (so they still see its inputs), stops the forward: what that module
    and the layer would compute is discarded by calibration anyway (on a Llama layer this
    skips the down projection, a quarter of its matrix products).
    """

    def __init__(self, layer: torch.nn.Module) -> None:
        self.layer = layer
        self.last: torch.nn.Module | None = None
        self.handle: Any = None

    def __call__(self, call: LayerInputs) -> None:
        if self.last is None:
            order: list[torch.nn.Module] = []
            leaves = [m for m in self.layer.modules() if not any(m.children())]
            handles = [
                leaf.register_forward_pre_hook(lambda m, _a: order.append(m)) for leaf in leaves
            ]
            try:
                self.layer(*call.args, **call.kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            if order:
                self.last = order[-1]
                self.handle = self.last.register_forward_pre_hook(_raise_stop_layer)
            return
        with contextlib.suppress(_StopLayer):
            self.layer(*call.args, **call.kwargs)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _raise_stop_layer(_module: torch.nn.Module, _args: Any) -> None:
    raise _StopLayer


def capture_layer_inputs(
    model: torch.nn.Module, layer: torch.nn.Module, batches: Sequence[Batch], device: torch.device
) -> list[LayerInputs]:
    """Run each batch through the model up to ``layer`` and record the layer's arguments."""
    captured: list[LayerInputs] = []

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(LayerInputs(tuple(args), dict(kwargs)))
        raise _StopForward

    # prepended: the layer's own hooks (the modifiers') must not see this call
    handle = layer.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        for position, batch in enumerate(tqdm(batches, desc="capturing layer inputs", leave=False)):
            try:
                model(**to_device(batch, device))
            except _StopForward:
                continue
            raise RuntimeError(
                f"batch {position} ran through the whole model without calling its first "
                f"decoder layer ({type(layer).__name__}); the sequential pipeline cannot capture "
                "its inputs (use pipeline='basic')"
            )
    finally:
        handle.remove()
    return captured


def run_sequential(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    session: CompressionSession,
    device: str | torch.device | None = None,
    keep_outputs: bool = True,
) -> list[torch.Tensor]:
    """Calibrate, compress and propagate one decoder layer at a time (see the module doc).

    :param model: a model whose decoder layers ``find_decoder_layers`` finds
    :param batches: calibration batches
    :param session: the initialized session whose modifiers calibrate
    :param device: where to compute; each layer is moved there for its turn and back after.
        Unset: the model's own device
    :param keep_outputs: return the last layer's compressed outputs; when False its re-run is
        skipped (nothing reads it), which saves one layer's forward over all the data
    :return: the outputs of the last decoder layer, one tensor per batch (empty when
        ``keep_outputs`` is False)
    """
    path, layers = find_decoder_layers(model)
    _check_uniform_layers(model)
    check_device_unset(model, device)
    offloaded = is_offloaded(model)
    home = model_device(model)
    target = torch.device(device) if device is not None else home
    logger.info("sequential pipeline over {} layers of {} on {}", len(layers), path, target)
    # stop each calibration forward early when no modifier reads past a module's inputs
    cut_short = not any(m.calibration_reads_outputs() for m in session.modifiers)
    session.calibration_epoch_start()
    with calibration_mode(model):
        moved = _move_outside(model, path, target) if target != home else []
        try:
            inputs = capture_layer_inputs(model, layers[0], batches, target)
        finally:
            _move_back(moved, home)
        for index, layer in enumerate(tqdm(layers, desc="layers")):
            if target != home:
                layer.to(target)
            try:
                # an offloaded layer's weights stay in memory for its turn only
                with layer_onloaded(offloaded):
                    _calibrate(layer, inputs, cut_short, index)
                    release_free_memory()  # the calibration forwards' temporaries
                    session.sequential_epoch_end(layer)
                    if index < len(layers) - 1 or keep_outputs:
                        _propagate(layer, inputs, index)
                    else:
                        inputs = []  # nothing reads the last layer's outputs
                    release_free_memory()
            finally:
                if target != home:
                    layer.to(home)
    session.calibration_epoch_end()
    return [call.hidden_states for call in inputs]


def _calibrate(
    layer: torch.nn.Module, inputs: list[LayerInputs], cut_short: bool, index: int
) -> None:
    """Run every cached call through ``layer`` with the modifiers' hooks live; with
    ``cut_short``, each forward stops at the layer's last module (``_CalibrationCutter``)."""
    cutter = _CalibrationCutter(layer) if cut_short else None
    try:
        for call in tqdm(inputs, desc=f"layer {index} calibration", leave=False):
            if cutter is not None:
                cutter(call)
            else:
                layer(*call.args, **call.kwargs)
    finally:
        if cutter is not None:
            cutter.remove()


def _propagate(layer: torch.nn.Module, inputs: list[LayerInputs], index: int) -> None:
    """Replace each cached call's hidden states by ``layer``'s (compressed) outputs, in place
    and one call at a time, so the old activations are freed as the new ones appear."""
    with HooksMixin.disable_hooks():
        for position in tqdm(range(len(inputs)), desc=f"layer {index} outputs", leave=False):
            call = inputs[position]
            inputs[position] = call.with_hidden_states(
                _hidden_states(layer(*call.args, **call.kwargs))
            )


def _check_uniform_layers(model: torch.nn.Module) -> None:
    """Refuse models whose layers get different masks (the first layer's are reused)."""
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    if isinstance(layer_types, list | tuple) and len(set(layer_types)) > 1:
        raise ValueError(
            f"the sequential pipeline reuses the first layer's attention mask for every layer, "
            f"but this model's layers differ (config.layer_types: {sorted(set(layer_types))}); "
            "use pipeline='basic'"
        )


def _hidden_states(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


def _move_outside(
    model: torch.nn.Module, layers_path: str, device: torch.device
) -> list[tuple[torch.nn.Module, str, bool]]:
    """Move every parameter and buffer outside the decoder layers to ``device``.

    :return: what was moved, as (module, name, is_parameter), for ``_move_back``
    """
    moved = []
    for name, module in model.named_modules():
        if name == layers_path or name.startswith(layers_path + "."):
            continue
        for key, param in module.named_parameters(recurse=False):
            if param.device != device:
                param.data = param.data.to(device)
                moved.append((module, key, True))
        for key, buffer in module.named_buffers(recurse=False):
            if buffer.device != device:
                module._buffers[key] = buffer.to(device)
                moved.append((module, key, False))
    return moved


def _move_back(moved: list[tuple[torch.nn.Module, str, bool]], device: torch.device) -> None:
    for module, key, is_parameter in moved:
        if is_parameter:
            param = module._parameters[key]
            assert param is not None
            param.data = param.data.to(device)
        else:
            buffer = module._buffers[key]
            assert buffer is not None
            module._buffers[key] = buffer.to(device)
