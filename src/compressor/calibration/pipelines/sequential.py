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

When every modifier calibrates in stages (``Modifier.calibration_in_stages``: GPTQ's
``true_sequential``) and the layers have Llama's form, steps 1 to 3 run instead as stages
within each layer, one group of modules at a time (``compressor.calibration.pipelines.staged``).

No graph tracing is needed, so any model whose decoder layers ``find_decoder_layers`` finds
works. Only the current layer and the cached activations sit on the compute device.

Cached calls that differ only in their hidden states (equal-length batches, the usual case)
run through a layer together, up to ``MERGE_TOKENS`` tokens and ``MERGE_ELEMENTS``
hidden-state values per forward: larger matrix products run markedly faster on CPU, and the
result is the same (checked once, on the first layer, against the calls run one by one).
Calls merge only when every modifier allows it (``Modifier.calibration_merges_batches``).

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

from compressor.architectures import find_decoder_layers
from compressor.calibration.data import Batch
from compressor.calibration.pipelines.common import (
    calibration_mode,
    call_model,
    first_output,
    model_device,
    to_device,
)
from compressor.calibration.pipelines.staged import StagePlan, calibrate_in_stages, plan_stages
from compressor.core.session import CompressionSession
from compressor.modifiers.hooks import HooksMixin
from compressor.utils.memory import keep_freed_tensors_in_heap, release_free_memory
from compressor.utils.offload import check_device_unset, is_offloaded, layer_onloaded

__all__ = [
    "MERGE_ELEMENTS",
    "MERGE_TOKENS",
    "LayerInputs",
    "capture_layer_inputs",
    "run_sequential",
]

MERGE_TOKENS = 1024
"""Most tokens per merged forward of a layer: bounds the attention's memory (which grows with
the number of sequences) on narrow models, whose hidden states alone would allow many more."""

MERGE_ELEMENTS = 1024 * 576
"""Most hidden-state values (tokens x hidden size) per merged forward of a layer (see the module
doc): 1024 tokens of SmolLM2-135M (width 576), 512 of a model of width 1024, none merged from
width 2304 up with 256-token calls, whose matrix products are large enough already. This bounds
the extra activation memory of merging; on 2 CPU cores it made a SmolLM2-135M GPTQ run 15%
faster than one 256-token call at a time, for about 10 MB more peak memory."""


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


@dataclass
class _Merged:
    """Consecutive cached calls run as one: ``call`` holds their hidden states concatenated
    along the batch dimension and their shared other arguments; ``sizes`` are the calls'
    batch sizes (one entry: a call on its own)."""

    call: LayerInputs
    sizes: list[int]

    @classmethod
    def alone(cls, call: LayerInputs) -> _Merged:
        """A call on its own."""
        return cls(call, [call.hidden_states.shape[0]])

    def calls(self) -> list[LayerInputs]:
        """The calls one by one (views into the merged hidden states)."""
        if len(self.sizes) == 1:
            return [self.call]
        hidden = self.call.hidden_states.split(self.sizes)
        return [self.call.with_hidden_states(h) for h in hidden]


def _merge_calls(inputs: list[LayerInputs], max_tokens: int, max_elements: int) -> list[_Merged]:
    """Group consecutive calls whose hidden states have the same shape past the batch
    dimension and whose other arguments are equal, up to ``max_tokens`` tokens and
    ``max_elements`` hidden-state values a group.

    ``inputs`` is emptied group by group as the merged copies are made, so the cache is never
    held twice (it can be the largest thing in memory)."""
    groups: list[list[int]] = []
    tokens = elements = 0
    for position, call in enumerate(inputs):
        hidden = call.hidden_states
        size, length = hidden.numel(), hidden.shape[:-1].numel()
        if (
            groups
            and tokens + length <= max_tokens
            and elements + size <= max_elements
            and _same_but_hidden(inputs[groups[-1][0]], call)
        ):
            groups[-1].append(position)
            tokens, elements = tokens + length, elements + size
        else:
            groups.append([position])
            tokens, elements = length, size
    merged = []
    for group in groups:
        calls = [inputs[position] for position in group]
        if len(calls) == 1:
            merged.append(_Merged.alone(calls[0]))
        else:
            hidden = torch.cat([call.hidden_states for call in calls])
            sizes = [call.hidden_states.shape[0] for call in calls]
            merged.append(_Merged(calls[0].with_hidden_states(hidden), sizes))
        for position in group:  # release the calls' own hidden states now
            inputs[position] = merged[-1].call
        del calls
    inputs.clear()
    return merged


def _unmerge(merged: list[_Merged]) -> list[_Merged]:
    return [_Merged.alone(call) for m in merged for call in m.calls()]


def _same_but_hidden(a: LayerInputs, b: LayerInputs) -> bool:
    """Whether two calls differ at most in their hidden states' values and batch size."""
    ha, hb = a.hidden_states, b.hidden_states
    if ha.shape[1:] != hb.shape[1:] or ha.dtype != hb.dtype or ha.device != hb.device:
        return False
    rest_a = (a.args[1:], {k: v for k, v in a.kwargs.items() if k != "hidden_states"})
    rest_b = (b.args[1:], {k: v for k, v in b.kwargs.items() if k != "hidden_states"})
    return _equal(rest_a, rest_b)


def _equal(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and torch.equal(a, b)
        )
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if a is None or b is None or isinstance(a, bool | int | float | str):
        return type(a) is type(b) and a == b
    return False  # other objects (a cache, a config): only the very same one is equal


def _merging_is_exact(layer: torch.nn.Module, inputs: list[_Merged]) -> bool:
    """Whether ``layer`` gives the first merged call the outputs of its calls run one by one
    (the other arguments, taken from the first call, must broadcast over the larger batch).
    True when nothing is merged."""
    if not inputs or len(inputs[0].sizes) == 1:
        return True
    merged = inputs[0]
    with HooksMixin.disable_hooks():
        separate = torch.cat([first_output(layer(*c.args, **c.kwargs)) for c in merged.calls()])
        try:
            together = first_output(layer(*merged.call.args, **merged.call.kwargs))
        except Exception as error:  # e.g. a mask whose batch dimension does not broadcast
            logger.debug("merged calls fail on {}: {}", type(layer).__name__, error)
            return False
    if together.shape != separate.shape:
        return False
    return bool((together - separate).abs().max() <= 1e-4 * separate.abs().max().clamp_min(1.0))


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
                call_model(model, to_device(batch, device))
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
    merge = all(m.calibration_merges_batches() for m in session.modifiers)
    in_stages = cut_short and all(m.calibration_in_stages() for m in session.modifiers)
    plan: StagePlan | None = None
    keep_freed_tensors_in_heap()  # no page faults for every activation (glibc)
    session.calibration_epoch_start()
    with calibration_mode(model):
        moved = _move_outside(model, path, target) if target != home else []
        try:
            captured = capture_layer_inputs(model, layers[0], batches, target)
        finally:
            _move_back(moved, home)
        if merge:
            inputs = _merge_calls(captured, MERGE_TOKENS, MERGE_ELEMENTS)
        else:
            inputs = [_Merged.alone(call) for call in captured]
        del captured
        for index, layer in enumerate(tqdm(layers, desc="layers")):
            if target != home:
                layer.to(target)
            try:
                # an offloaded layer's weights stay in memory for its turn only
                with layer_onloaded(offloaded):
                    # merged calls are checked once, on the first layer, before it changes
                    if index == 0 and not _merging_is_exact(layer, inputs):
                        logger.info("{} does not take merged calls: one at a time", path)
                        inputs = _unmerge(inputs)
                    if index == 0 and in_stages and inputs:
                        plan = plan_stages(layer, inputs[0].call)
                        if plan is None:
                            logger.info(
                                "{} layers are not Llama-style: each is calibrated whole",
                                type(layer).__name__,
                            )
                    if plan is not None:
                        last = index == len(layers) - 1
                        outputs = keep_outputs or not last
                        calibrate_in_stages(layer, inputs, plan, session, index, outputs)
                        if not outputs:
                            inputs = []
                        continue
                    _calibrate(layer, [m.call for m in inputs], cut_short, index)
                    # the calibration forwards' temporaries, before the modifiers' own work;
                    # once per layer: a second trim after the outputs made the next layer's
                    # forwards fault their memory in again (SmolLM2 GPTQ: 1.5 s more, the
                    # same peak)
                    release_free_memory()
                    session.sequential_epoch_end(layer)
                    if index < len(layers) - 1 or keep_outputs:
                        _propagate(layer, inputs, index)
                    else:
                        inputs = []  # nothing reads the last layer's outputs
            finally:
                if target != home:
                    layer.to(home)
    session.calibration_epoch_end()
    return [call.hidden_states for merged in inputs for call in merged.calls()]


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


def _propagate(layer: torch.nn.Module, inputs: list[_Merged], index: int) -> None:
    """Replace each cached (merged) call's hidden states by ``layer``'s (compressed) outputs,
    in place and one at a time, so the old activations are freed as the new ones appear."""
    with HooksMixin.disable_hooks():
        for position in tqdm(range(len(inputs)), desc=f"layer {index} outputs", leave=False):
            merged = inputs[position]
            call = merged.call
            output = first_output(layer(*call.args, **call.kwargs))
            inputs[position] = _Merged(call.with_hidden_states(output), merged.sizes)


def _check_uniform_layers(model: torch.nn.Module) -> None:
    """Refuse models whose layers get different masks (the first layer's are reused)."""
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    if isinstance(layer_types, list | tuple) and len(set(layer_types)) > 1:
        raise ValueError(
            f"the sequential pipeline reuses the first layer's attention mask for every layer, "
            f"but this model's layers differ (config.layer_types: {sorted(set(layer_types))}); "
            "use pipeline='basic'"
        )


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
