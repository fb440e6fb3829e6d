"""The sequential pipeline: calibrate and compress one decoder layer at a time.

The inputs of the first decoder layer are captured once (the hidden states and every other
argument the model passes it: attention mask, position ids, position embeddings). Then for
each layer ``i``:

1. its cached inputs run through it with the modifiers' hooks live (calibration; when no
   modifier reads module outputs, each forward stops once the layer's last module has its
   inputs, see ``_calibrate``);
2. ``session.sequential_epoch_end(layer)`` lets modifiers compress it (GPTQ does so here);
3. it runs again with hooks disabled, and its outputs, computed with the compressed
   weights, become the inputs of layer ``i + 1``.

Modifiers that change a layer's weights without changing its function before the others
calibrate it (``CalibrationTraits.transforms_first``: SmoothQuant, AWQ) get a pass of their own
first, with every quantized forward of the layer off, and their own SEQUENTIAL_EPOCH_END; the
other modifiers then calibrate the transformed layer in steps 1 to 3. That pass ends each
forward once the last module they hook has returned (``_calibrate_until_hooks_done``).

When every modifier calibrates in stages (``CalibrationTraits.in_stages``: GPTQ's
``true_sequential``; or accepts them, ``accepts_stages``: SparseGPT, when one asks) and the
layers have Llama's form, steps 1 to 3 run instead as stages
within each layer, one group of modules at a time (``compressor.calibration.pipelines.staged``).

No graph tracing is needed, so any model whose decoder layers ``find_decoder_layers`` finds
works. Only the current layer and the cached activations sit on the compute device.

Cached calls that differ only in their hidden states (equal-length batches, the usual case)
run through a layer together (``layer_calls.MergedCalls``), up to ``MERGE_TOKENS`` tokens and
``MERGE_ELEMENTS`` hidden-state values per forward: larger matrix products run markedly
faster on CPU, and the result is the same (checked once, on the first layer, against the
calls run one by one). Calls merge only when every modifier allows it
(``CalibrationTraits.merges_batches``).

The other arguments are taken from the first layer and reused for every layer, which holds
for architectures whose layers all see the same mask (Llama-family, GPT-2, OPT, BERT; not
models that alternate sliding-window and full attention per layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
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
    run_until_stopped,
    stop_forward_after,
    stop_forward_at,
    to_device,
)
from compressor.calibration.pipelines.layer_calls import (
    LayerInputs,
    MergedCalls,
    merge_calls,
    merging_is_exact,
    unmerge,
)
from compressor.calibration.pipelines.staged import (
    StageMemory,
    StagePlan,
    calibrate_in_stages,
    plan_stages,
)
from compressor.core.session import CompressionSession
from compressor.modifiers.hooks import HooksMixin
from compressor.modifiers.moe import LinearExperts
from compressor.modifiers.transform.smoothing import quantized_forwards_off
from compressor.utils.memory import keep_freed_tensors_in_heap, release_free_memory
from compressor.utils.merged_batches import merged_batches
from compressor.utils.offload import check_device_unset, is_offloaded, layer_onloaded

__all__ = [
    "MERGE_ELEMENTS",
    "MERGE_TOKENS",
    "capture_layer_inputs",
    "run_sequential",
    "transforming_first",
]

MERGE_TOKENS = 1024
"""Most tokens per merged forward of a layer: bounds the attention's memory (which grows with
the number of sequences) on narrow models, whose hidden states alone would allow many more."""

MERGE_ELEMENTS = 1024 * 576
"""Most hidden-state values (tokens x hidden size) per merged forward of a layer (see the module
doc): 1024 tokens at width 576 (SmolLM2-135M), 512 at width 1024, none merged from width 2304
up with 256-token calls, whose matrix products are large enough already. This bounds the
extra activation memory of merging (what it gained and cost when chosen:
bench/results/2026-12-01-notes-pipelines.md)."""


@dataclass(frozen=True)
class _Shortcuts:
    """What every modifier of the run allows (``CalibrationTraits``)."""

    cut_short: bool
    """No modifier reads past a module's inputs: calibration forwards may stop early."""
    merge: bool
    """Cached calls may run merged."""
    in_stages: bool
    """Llama-style layers may be calibrated in stages."""
    light: bool
    """Every modifier calibrating here compresses a module with little memory beyond its
    weights (``CalibrationTraits.compresses_lightly``)."""

    @classmethod
    def of(cls, modifiers: Iterable[Any]) -> _Shortcuts:
        """The shortcuts of every modifier's traits; those that transform first
        (``transforms_first``) calibrate in a pass of their own, so only merging concerns
        them."""
        traits = [modifier.calibration_traits() for modifier in modifiers]
        rest = [t for t in traits if not t.transforms_first]
        cut_short = not any(t.reads_outputs for t in rest)
        return cls(
            cut_short=cut_short,
            merge=all(t.merges_batches for t in traits),
            # stages when every modifier takes them and one asks (or none calibrates here)
            in_stages=cut_short
            and all(t.in_stages or t.accepts_stages for t in rest)
            and (not rest or any(t.in_stages for t in rest)),
            light=all(t.compresses_lightly for t in rest),
        )


def transforming_first(modifiers: Iterable[Any]) -> tuple[list[Any], list[Any]]:
    """The modifiers that transform a layer before the others calibrate it
    (``CalibrationTraits.transforms_first``), and the others."""
    first: list[Any] = []
    rest: list[Any] = []
    for modifier in modifiers:
        (first if modifier.calibration_traits().transforms_first else rest).append(modifier)
    return first, rest


def capture_layer_inputs(
    model: torch.nn.Module, layer: torch.nn.Module, batches: Sequence[Batch], device: torch.device
) -> list[LayerInputs]:
    """Run each batch through the model up to ``layer`` and record the layer's arguments."""
    captured: list[LayerInputs] = []
    # stopped before the layer's own hooks (the modifiers'): they must not see this call
    with stop_forward_at(layer, before_other_hooks=True):
        for position, batch in enumerate(tqdm(batches, desc="capturing layer inputs", leave=False)):
            caught = run_until_stopped(call_model, model, to_device(batch, device))
            if caught is None:
                raise RuntimeError(
                    f"batch {position} ran through the whole model without calling its first "
                    f"decoder layer ({type(layer).__name__}); the sequential pipeline cannot "
                    "capture its inputs (use pipeline='basic')"
                )
            args, kwargs = caught
            captured.append(LayerInputs(tuple(args), dict(kwargs)))
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
    shortcuts = _Shortcuts.of(session.modifiers)
    first, rest = transforming_first(session.modifiers)
    staged = False
    plans: dict[tuple[tuple[str, str], ...], StagePlan | None] = {}
    memory = StageMemory()  # what each staged layer measured, for the next one's budgets
    keep_freed_tensors_in_heap()  # no page faults for every activation (glibc)
    session.calibration_epoch_start(batches)
    with calibration_mode(model):
        inputs = _cached_calls(model, path, layers[0], batches, target, home, shortcuts.merge)
        for index, layer in enumerate(tqdm(layers, desc="layers")):
            outputs = keep_outputs or index < len(layers) - 1
            # an offloaded layer's weights stay in memory for its turn only
            with _on_device(layer, target, home), layer_onloaded(offloaded):
                if index == 0:  # checked once, before the first layer changes
                    inputs = _unmerged_unless_exact(layer, inputs, path)
                    # transforms alone (AWQ with its own scheme) calibrate whole layers
                    staged = shortcuts.in_stages and (bool(rest) or not first)
                plan = None
                if staged:  # planned once per layer form (a model may mix dense and MoE layers)
                    form = _layer_form(layer)
                    if form not in plans:
                        plans[form] = _stage_plan(layer, inputs, rest)
                    plan = plans[form]
                if first:
                    _transform_first(layer, inputs, session, first, index)
                with HooksMixin.hooks_only_of(rest) if first else contextlib.nullcontext():
                    if plan is not None:
                        calibrate_in_stages(
                            layer,
                            inputs,
                            plan,
                            session,
                            index,
                            outputs,
                            memory=memory,
                            light=shortcuts.light,
                        )
                    else:
                        _calibrate_whole(
                            layer, inputs, session, shortcuts.cut_short, index, outputs
                        )
                if not outputs:
                    inputs = []  # nothing reads the last layer's outputs
    session.calibration_epoch_end()
    return [call.hidden_states for merged in inputs for call in merged.calls()]


def _cached_calls(
    model: torch.nn.Module,
    layers_path: str,
    first_layer: torch.nn.Module,
    batches: Sequence[Batch],
    target: torch.device,
    home: torch.device,
    merge: bool,
) -> list[MergedCalls]:
    """The first decoder layer's calls for every batch, computed on ``target`` (what lies
    outside the decoder layers goes there for the capture, and back ``home`` after); merged
    up to ``MERGE_TOKENS`` and ``MERGE_ELEMENTS`` when ``merge``, else each on its own."""
    moved = _move_outside(model, layers_path, target) if target != home else []
    try:
        captured = capture_layer_inputs(model, first_layer, batches, target)
    finally:
        _move_back(moved, home)
    if merge:
        return merge_calls(captured, MERGE_TOKENS, MERGE_ELEMENTS)
    return [MergedCalls.alone(call) for call in captured]


@contextlib.contextmanager
def _on_device(layer: torch.nn.Module, target: torch.device, home: torch.device) -> Iterator[None]:
    """``layer`` on ``target`` for its turn, back ``home`` after."""
    if target == home:
        yield
        return
    layer.to(target)
    try:
        yield
    finally:
        layer.to(home)


def _unmerged_unless_exact(
    layer: torch.nn.Module, inputs: list[MergedCalls], layers_path: str
) -> list[MergedCalls]:
    """``inputs``, or each call on its own when ``layer`` computes something else for merged
    calls (``merging_is_exact``)."""
    if merging_is_exact(layer, inputs):
        return inputs
    logger.info("{} does not take merged calls: one at a time", layers_path)
    return unmerge(inputs)


def _layer_form(layer: torch.nn.Module) -> tuple[tuple[str, str], ...]:
    """A decoder layer's submodules by name and class: layers of one form share a stage
    plan."""
    return tuple((name, type(module).__name__) for name, module in layer.named_modules())


def _stage_plan(
    layer: torch.nn.Module, inputs: list[MergedCalls], modifiers: list[Any]
) -> StagePlan | None:
    """The stages of the layers of ``layer``'s form, planned on its first call for the
    ``modifiers`` that calibrate in them (not those that transform first: their hooks run in
    a pass of their own); None (each layer calibrated whole) when the layers are not
    Llama-style."""
    if not inputs:
        return None
    plan = plan_stages(layer, inputs[0].call, modifiers)
    if plan is None:
        logger.info("{} layers are not Llama-style: each is calibrated whole", type(layer).__name__)
    return plan


def _calibrate_whole(
    layer: torch.nn.Module,
    inputs: list[MergedCalls],
    session: CompressionSession,
    cut_short: bool,
    index: int,
    outputs: bool,
) -> None:
    """Calibrate ``layer`` on every cached call, let the modifiers compress it, and (with
    ``outputs``) replace each call's hidden states by the compressed layer's outputs."""
    _calibrate(layer, inputs, cut_short, index)
    # the calibration forwards' temporaries go back to the system before the modifiers' own
    # work; once per layer: trimming again after the outputs made the next layer's forwards
    # fault their memory in again (bench/results/2026-12-01-notes-pipelines.md)
    release_free_memory()
    session.sequential_epoch_end(layer)
    if outputs:
        _propagate(layer, inputs, index)


def _transform_first(
    layer: torch.nn.Module,
    inputs: list[MergedCalls],
    session: CompressionSession,
    modifiers: list[Any],
    index: int,
) -> None:
    """Calibrate ``layer`` with only the hooks of ``modifiers`` (those that transform first)
    live and its quantized forwards off, and send them alone the layer's
    SEQUENTIAL_EPOCH_END, at which they change its weights (not its function)."""
    with HooksMixin.hooks_only_of(modifiers), quantized_forwards_off(layer):
        _calibrate_until_hooks_done(layer, inputs, modifiers, index)
    release_free_memory()
    session.sequential_epoch_end(layer, only=modifiers)


def _calibrate_until_hooks_done(
    layer: torch.nn.Module, inputs: list[MergedCalls], owners: list[Any], index: int
) -> None:
    """Run every cached call through ``layer`` for the hooks of ``owners`` alone: the first
    call whole, to find the hooked module that returns last; every later one ends once that
    module has returned and its hooks have run. Nothing reads the layer's output here, so
    what comes after is not needed: SmoothQuant's statistics (the norms' outputs) are all in
    once the post-attention norm has run, which skips the MLP, three quarters of a Llama
    layer's multiply-adds (bench/results/2026-12-02-w8a8-speed.md). Run whole when that
    module returns more than once per call, or when routed experts may run in another order
    from call to call."""
    progress = tqdm(inputs, desc=f"layer {index} transform calibration", leave=False)
    last: torch.nn.Module | None = None
    with contextlib.ExitStack() as stopping:
        for position, merged in enumerate(progress):
            call = merged.call
            with merged_batches(merged.batch_sizes):
                if position == 0:
                    last = _last_hooked_module(layer, call, owners)
                    if last is not None:
                        stopping.enter_context(stop_forward_after(last))
                elif last is not None:
                    run_until_stopped(layer, *call.args, **call.kwargs)
                else:
                    layer(*call.args, **call.kwargs)


def _last_hooked_module(
    layer: torch.nn.Module, call: LayerInputs, owners: list[Any]
) -> torch.nn.Module | None:
    """Run ``call`` through ``layer`` whole; the module with a hook of ``owners`` that
    returned last, or None (see ``_calibrate_until_hooks_done``)."""
    routed = any(
        isinstance(m, LinearExperts) and m.all_experts_requests == 0 for m in layer.modules()
    )
    if routed or HooksMixin.has_hooks(layer, owners):  # a hook on the layer reads it whole
        layer(*call.args, **call.kwargs)
        return None
    hooked = [m for m in layer.modules() if HooksMixin.has_hooks(m, owners)]
    returned: list[torch.nn.Module] = []
    handles = [m.register_forward_hook(lambda m, _a, _o: returned.append(m)) for m in hooked]
    try:
        layer(*call.args, **call.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if not returned or returned.count(returned[-1]) > 1:
        return None
    return returned[-1]


def _calibrate(
    layer: torch.nn.Module, inputs: list[MergedCalls], cut_short: bool, index: int
) -> None:
    """Run every cached (merged) call through ``layer`` with the modifiers' hooks live; the
    hooks can tell which calibration batches a merged call stacks (``merged_batches``).

    With ``cut_short``, the first forward runs whole to find the last module the layer calls;
    every later one stops at that module, once the modifiers' hooks have seen its inputs:
    what it and the layer would compute is discarded by calibration anyway (on a Llama layer
    this skips the down projection, a quarter of its matrix products).
    """
    progress = tqdm(inputs, desc=f"layer {index} calibration", leave=False)
    if not cut_short:
        for merged in progress:
            with merged_batches(merged.batch_sizes):
                layer(*merged.call.args, **merged.call.kwargs)
        return
    last: torch.nn.Module | None = None
    with contextlib.ExitStack() as stopping:
        for merged in progress:
            call = merged.call
            with merged_batches(merged.batch_sizes):
                if last is not None:
                    run_until_stopped(layer, *call.args, **call.kwargs)
                    continue
                last = _last_module_called(layer, call)
            if last is not None:
                # registered after the modifiers' hooks, so they still see its inputs
                stopping.enter_context(stop_forward_at(last))


def _last_module_called(layer: torch.nn.Module, call: LayerInputs) -> torch.nn.Module | None:
    """Run ``call`` through ``layer`` whole; the last of its leaf modules it called. None
    when the layer routes tokens to experts that run only when chosen: which module comes
    last then differs from call to call, and stopping at one would hide later experts'
    tokens from the hooks."""
    if any(isinstance(m, LinearExperts) and m.all_experts_requests == 0 for m in layer.modules()):
        layer(*call.args, **call.kwargs)
        return None
    order: list[torch.nn.Module] = []
    leaves = [m for m in layer.modules() if not any(m.children())]
    handles = [leaf.register_forward_pre_hook(lambda m, _a: order.append(m)) for leaf in leaves]
    try:
        layer(*call.args, **call.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return order[-1] if order else None


def _propagate(layer: torch.nn.Module, inputs: list[MergedCalls], index: int) -> None:
    """Replace each cached (merged) call's hidden states by ``layer``'s (compressed) outputs,
    in place and one at a time, so the old activations are freed as the new ones appear."""
    with HooksMixin.disable_hooks():
        for position in tqdm(range(len(inputs)), desc=f"layer {index} outputs", leave=False):
            merged = inputs[position]
            call = merged.call
            output = first_output(layer(*call.args, **call.kwargs))
            inputs[position] = merged.with_hidden_states(output)


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
