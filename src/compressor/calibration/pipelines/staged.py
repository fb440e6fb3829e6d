"""Calibrating a Llama-style decoder layer in stages ("true sequential").

GPTQ's authors' code and AutoGPTQ quantize a decoder layer's Linears in the order the layer
calls them, each group on the inputs it receives once the groups before it are quantized:
q/k/v, then o (on the quantized attention), then gate/up, then down. Their implementations
run the whole layer over all the calibration data once per group. Here each stage runs only
what its group needs, reusing what the stage before it computed:

1. **attention inputs**: ``input_layernorm(x)``, handed to the pre-hooks of the modules that
   read it (q/k/v) without running them; those modules are compressed
   (``sequential_epoch_end``);
2. **attention output projection**: the attention on the compressed q/k/v, stopped at
   ``o_proj``'s inputs, which are kept (within ``KEEP_ATTENTION``); ``o_proj`` is
   compressed;
3. **MLP inputs**: ``h = x + o_proj(kept)`` replaces ``x`` (the kept inputs are freed one
   call at a time; a call whose inputs were not kept runs its attention again);
   ``post_attention_layernorm(h)`` goes to the pre-hooks of gate/up; they are compressed;
4. **MLP output projection**: the MLP on the compressed gate/up, stopped at ``down_proj``'s
   inputs, which are kept within ``KEEP_MLP`` (the rest are computed again in stage 5);
   ``down_proj`` is compressed;
5. **outputs**: ``h + down_proj(kept)`` (or ``h + mlp(post_attention_layernorm(h))``)
   replaces ``h``: the next layer's inputs.

Calibrating the layer whole and then running it again for its outputs computes the
attention twice and the MLP's gate/up twice. The stages compute the attention once, and
gate/up once for the calls whose down-projection inputs are kept: fewer multiply-adds in the
Linears and one attention fewer per layer (counted for SmolLM2-135M in
bench/results/2026-12-01-notes-pipelines.md). Besides the layer's hidden states, the kept
tensors take at most as much memory again (``x`` and the kept ``o_proj`` inputs), then half
as much (``h`` and the kept ``down_proj`` inputs).

The layer must have the pre-norm residual form of Llama, Mistral, Qwen2/3 and their kin::

    h = x + self_attn(input_layernorm(x))[0];  out = h + mlp(post_attention_layernorm(h))

with ``o_proj``'s output being the attention's first output and ``down_proj``'s the MLP's.
``plan_stages`` checks this on the first call of the first layer, before anything is
compressed: the decomposed forward must give the layer's output exactly. Any other layer is
calibrated whole (``compressor.calibration.pipelines.sequential``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger
from tqdm.auto import tqdm

from compressor.calibration.pipelines.common import (
    first_output,
    run_until_stopped,
    stop_forward_at,
)
from compressor.calibration.pipelines.layer_calls import LayerInputs, MergedCalls
from compressor.core.session import CompressionSession
from compressor.modifiers.hooks import HooksMixin
from compressor.utils.memory import (
    freed_memory_returned,
    release_free_memory,
    resident_bytes,
    resident_headroom,
)
from compressor.utils.merged_batches import merged_batches

__all__ = ["StageMemory", "StagePlan", "calibrate_in_stages", "gated_down_input", "plan_stages"]

_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass(frozen=True)
class StagePlan:
    """The modules of a Llama-style layer that bound its stages, named relative to it."""

    attention_readers: tuple[str, ...]
    """Modules reading the attention's input (q/k/v)."""
    attention_output: str
    """The attention's last module (o_proj)."""
    mlp_readers: tuple[str, ...]
    """Modules reading the MLP's input (gate/up)."""
    mlp_output: str
    """The MLP's last module (down_proj)."""
    gated_mlp: tuple[str, str, str] | None = None
    """The gate, up and activation modules when the MLP computes ``down_proj``'s input as
    ``act(gate(x)) * up(x)`` (Llama's), checked exactly: stage 4 then computes it with the
    activation and the product in place (``gated_down_input``)."""


def _other_kwargs(call: LayerInputs) -> dict[str, Any]:
    return {key: value for key, value in call.kwargs.items() if key != "hidden_states"}


def plan_stages(
    layer: torch.nn.Module, call: LayerInputs, owners: Iterable[object] | None = None
) -> StagePlan | None:
    """The stages of ``layer`` (see the module doc), or None when it does not have the
    Llama-style form: checked by running ``call`` through the layer both whole and
    decomposed, with every hook paused, and comparing the outputs exactly.

    Every module of the layer with a modifier's hook must be one of the stages' modules.

    :param owners: the modifiers that calibrate in the stages; unset: every modifier with a
        hook on the layer (the hooks of modifiers that calibrate in a pass of their own, such
        as AWQ's on the attention and the MLP, do not run in the stages)
    """
    if len(call.args) > 1 or not all(hasattr(layer, part) for part in _PARTS):
        return None
    norm1, attention, norm2, mlp = (getattr(layer, part) for part in _PARTS)
    names = {id(module): name for name, module in layer.named_modules()}
    owners = None if owners is None else list(owners)
    hooked = {
        name for name, module in layer.named_modules() if HooksMixin.has_hooks(module, owners)
    }
    inputs: list[tuple[str, Any]] = []
    outputs: dict[str, Any] = {}

    def record_input(module: torch.nn.Module, args: tuple) -> None:
        inputs.append((names[id(module)], args[0] if args else None))

    def record_output(module: torch.nn.Module, _args: tuple, output: Any) -> None:
        outputs[names[id(module)]] = output

    try:
        with HooksMixin.disable_hooks():
            whole = first_output(layer(*call.args, **call.kwargs))
            handles = []
            for part in (attention, mlp):
                for leaf in part.modules():
                    if not any(leaf.children()):
                        handles.append(leaf.register_forward_pre_hook(record_input))
                        handles.append(leaf.register_forward_hook(record_output))
            try:
                x = call.hidden_states
                normed = norm1(x)
                attended = first_output(attention(hidden_states=normed, **_other_kwargs(call)))
                attention_calls = list(inputs)
                hidden = x + attended
                normed2 = norm2(hidden)
                inputs.clear()
                mlp_out = first_output(mlp(normed2))
                mlp_calls = list(inputs)
                out = hidden + mlp_out
            finally:
                for handle in handles:
                    handle.remove()
            gated = _gated_form(mlp, names, normed2, mlp_calls[-1][1] if mlp_calls else None)
    except Exception as error:  # a signature or structure other than Llama's
        logger.debug("{} cannot be calibrated in stages: {}", type(layer).__name__, error)
        return None
    if not attention_calls or not mlp_calls:
        return None
    attention_output, mlp_output = attention_calls[-1][0], mlp_calls[-1][0]
    plan = StagePlan(
        attention_readers=tuple(name for name, arg in attention_calls if arg is normed),
        attention_output=attention_output,
        mlp_readers=tuple(name for name, arg in mlp_calls if arg is normed2),
        mlp_output=mlp_output,
        gated_mlp=gated,
    )
    staged = {*plan.attention_readers, attention_output, *plan.mlp_readers, mlp_output}
    checks = {
        "the attention's output is its last module's": outputs.get(attention_output) is attended,
        "the MLP's output is its last module's": outputs.get(mlp_output) is mlp_out,
        "the last modules do not read the parts' inputs": not (
            {attention_output, mlp_output} & {*plan.attention_readers, *plan.mlp_readers}
        ),
        "every hooked module is in a stage": hooked <= staged,
        "the decomposed forward gives the layer's output": (
            isinstance(whole, torch.Tensor) and torch.equal(out, whole)
        ),
    }
    failed = [check for check, ok in checks.items() if not ok]
    if failed:
        logger.debug("{} cannot be calibrated in stages: not {}", type(layer).__name__, failed)
        return None
    return plan


def _gated_form(
    mlp: torch.nn.Module,
    names: dict[int, str],
    normed: torch.Tensor,
    down_input: Any,
) -> tuple[str, str, str] | None:
    """The names of ``mlp``'s gate, up and activation when ``gated_down_input`` gives
    ``down_input`` (what the MLP's forward handed its down projection) exactly; else None.
    Called with every hook paused."""
    parts = [getattr(mlp, part, None) for part in ("gate_proj", "up_proj", "act_fn")]
    modules = [p for p in parts if isinstance(p, torch.nn.Module) and id(p) in names]
    if not isinstance(down_input, torch.Tensor) or len(modules) != len(parts):
        return None
    gate, up, act = modules
    try:
        ours = gated_down_input(gate, up, act, normed)
    except Exception as error:  # an activation or projection of another signature
        logger.debug("{}: not a gated MLP: {}", type(mlp).__name__, error)
        return None
    if not torch.equal(ours, down_input):
        return None
    return names[id(gate)], names[id(up)], names[id(act)]


def _silu_(tensor: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(tensor, inplace=True)


def _activation_in_place(act: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``act`` applied in place, for activations whose forward is known to be SiLU's (the
    plan compares the result with the module's own forward exactly); None for the others."""
    if type(act).forward in (torch.nn.SiLU.forward, _TRANSFORMERS_SILU_FORWARD):
        return _silu_
    return None


def _transformers_silu_forward() -> Any:
    try:
        from transformers.activations import SiLUActivation
    except ImportError:  # an older transformers: its SiLU is torch's
        return None
    return SiLUActivation.forward


_TRANSFORMERS_SILU_FORWARD = _transformers_silu_forward()


def gated_down_input(
    gate: torch.nn.Module,
    up: torch.nn.Module,
    act: torch.nn.Module,
    x: torch.Tensor,
    place: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """``act(gate(x)) * up(x)``, in the order Llama's MLP computes it, with the activation
    in place (when ``_activation_in_place`` knows it) and the product written into
    ``place(activated)`` when that gives a tensor (a kept slot), else into the activation:
    two MLP-wide temporaries fewer than the MLP's own forward, and no copy into the kept
    block (bench/results/2026-12-02-w8a8-peak.md).

    :param place: where the product goes, asked with the activated gate (its shape and
        dtype); None or returning None: in place of the activated gate
    """
    in_place = _activation_in_place(act)
    gated = gate(x)
    gated = in_place(gated) if in_place is not None else act(gated)
    out = place(gated) if place is not None else None
    upped = up(x)
    if out is None:
        return gated.mul_(upped)
    return torch.mul(gated, upped, out=out)


KEEP_ATTENTION = 1.0
"""How much memory the ``o_proj`` inputs kept from stage 2 for stage 3 may take, as a fraction
of the layer's cached hidden states; past it, stage 3 runs the calls' attention again."""

KEEP_MLP = 0.5
"""The same for the ``down_proj`` inputs kept from stage 4 for stage 5 (past it, stage 5 runs
gate/up again), or more, up to what the process can hold without raising its peak memory
(``_Stages.mlp_headroom``): recomputing gate/up for every call costs a fifth of the stages'
multiply-adds, as much time as keeping every input saves in W8A8 calibration
(bench/results/2026-12-02-w8a8-speed.md). Less than for the attention: each kept value saves fewer multiply-adds
(gate/up's outputs are wider), and stage 4's own temporaries are larger (the peak memory and
time it was chosen on: bench/results/2026-12-01-notes-pipelines.md)."""


KEEP_MLP_WITHIN_HEADROOM: bool | None = None
"""Whether stage 4 may keep more ``down_proj`` inputs than ``KEEP_MLP``, up to the process's
headroom under its peak memory (``_Stages.mlp_headroom``), saving stage 5 the gate/up
products of the calls it keeps (up to a fifth of the stages' multiply-adds:
bench/results/2026-12-02-w8a8-speed.md). When on, stage 4 returns its temporaries to the
system as they are freed, and the headroom also leaves room for down_proj's compression as
measured on the layers before (``StageMemory``; nothing is kept within the headroom on the
first staged layer). None (the default): on when every modifier calibrating in stages
compresses lightly (``CalibrationTraits.compresses_lightly``: post-training quantization's
rounding), off otherwise. It holds SmolLM2-135M W8A8 static's peak (1040-1073 MB against
1038-1099 without it, 174-228 of 240 inputs kept) but not GPTQ W4A16's (1196-1224 against
1149-1161: stage 5 runs down_proj's Hessian solve with the whole kept block held, and its
largest temporaries are mapped on their own, where ``StageMemory`` does not see them;
bench/results/2026-12-02-w8a8-peak.md). True or False forces it either way."""


class _Kept:
    """Tensors kept from one stage for the next, one slot per call, within ``budget`` bytes
    (the calls past it get None, and are computed again).

    :param tokens: each call's tokens, when the kept values go into one block (each call's
        tensor is then copied into its slice, or written there by ``reserve``): kept tensors
        allocated one by one between a stage's temporaries leave the heap fragmented, which
        cost as much memory again as they took (bench/results/2026-12-02-w8a8-speed.md). The
        block is allocated at the first offer, or by ``allocate`` before the stage's first
        temporaries
    """

    def __init__(self, budget: float, tokens: list[int] | None = None) -> None:
        self.budget = budget
        self.slots: list[torch.Tensor | None] = []
        self.tokens = tokens
        self._block: torch.Tensor | None = None
        self._used = 0
        self._held = 0  # slots holding a tensor

    def offer(self, tensor: torch.Tensor) -> None:
        if tensor.nbytes > self.budget:
            self.slots.append(None)
            return
        self.budget -= tensor.nbytes
        if self.tokens is None:
            self.slots.append(tensor)
            self._held += 1
            return
        piece = self._piece(tensor.shape, tensor)
        self.slots.append(tensor if piece is None else piece.copy_(tensor))
        self._held += 1

    def reserve(self, like: torch.Tensor) -> torch.Tensor | None:
        """The next call's slot, empty, shaped and typed as ``like``, for the caller to fill;
        None when the budget does not keep it (its slot stays None)."""
        if like.nbytes > self.budget:
            self.slots.append(None)
            return None
        self.budget -= like.nbytes
        piece = None if self.tokens is None else self._piece(like.shape, like)
        slot = torch.empty_like(like) if piece is None else piece
        self.slots.append(slot)
        self._held += 1
        return slot

    def allocate(self, width: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate the block now, before any call is offered, for the calls the budget
        keeps, as tensors of ``width`` values per token (no-op without ``tokens``)."""
        if self.tokens is not None and self._block is None and not self.slots:
            self._block = self._sized_block(width, dtype, device, self.budget)

    def _sized_block(
        self, width: int, dtype: torch.dtype, device: torch.device, budget: float
    ) -> torch.Tensor:
        """One block for the calls from the next one on that ``budget`` keeps, sized as the
        offers will fill it."""
        assert self.tokens is not None
        element = torch.empty((), dtype=dtype).element_size()
        total = 0
        for tokens in self.tokens[len(self.slots) :]:
            nbytes = tokens * width * element
            if nbytes <= budget:
                budget -= nbytes
                total += tokens * width
        return torch.empty(total, dtype=dtype, device=device)

    def _piece(self, shape: torch.Size, like: torch.Tensor) -> torch.Tensor | None:
        """The block's next ``shape`` values, or None when the block cannot hold them (not
        sized by its tokens, or of another dtype). Called once the call's bytes are taken
        from the budget: the block, when not allocated yet, is sized from this call on."""
        assert self.tokens is not None
        if self._block is None:
            width = like.numel() // max(self.tokens[len(self.slots)], 1)
            budget = self.budget + like.nbytes
            self._block = self._sized_block(width, like.dtype, like.device, budget)
        numel = shape.numel()
        if self._block.dtype != like.dtype or self._block.device != like.device:
            return None
        if self._used + numel > self._block.numel():
            return None
        piece = self._block[self._used : self._used + numel]
        self._used += numel
        return piece.view(shape)

    def take(self, position: int) -> torch.Tensor | None:
        """The call's tensor, given up (its memory is freed once the caller drops it; the
        block's, once every kept tensor was taken and dropped)."""
        tensor, self.slots[position] = self.slots[position], None
        if tensor is not None:
            self._held -= 1
            if self._held == 0:
                self._block = None
        return tensor


@dataclass
class StageMemory:
    """What the stages of the layers calibrated so far measured, for the next layers'
    budgets (one per run of the pipeline)."""

    down_compression: int | None = None
    """The most resident memory the compression of a down_proj added (a GPTQ solve's
    Hessian copies), with the kept down_proj inputs held: the headroom must hold it too.
    None until a layer has measured it (until then nothing is kept within the headroom).
    Temporaries mapped on their own and unmapped when freed are not seen (blocks of 32 MB
    and more, ``keep_freed_tensors_in_heap``)."""


def calibrate_in_stages(
    layer: torch.nn.Module,
    inputs: list[MergedCalls],
    plan: StagePlan,
    session: CompressionSession,
    index: int,
    outputs: bool = True,
    memory: StageMemory | None = None,
    light: bool = False,
) -> None:
    """Calibrate and compress ``layer`` stage by stage (see the module doc).

    :param inputs: the layer's cached calls; each one's hidden states are replaced by the
        layer's compressed outputs (when ``outputs``)
    :param outputs: compute the outputs (False for the last layer when nothing reads them)
    :param memory: what earlier layers measured, updated by this one; unset: nothing is
        kept within the headroom (``KEEP_MLP`` alone)
    :param light: every modifier compresses lightly (``CalibrationTraits.compresses_lightly``):
        stage 4 keeps down_proj inputs within the headroom, unless ``KEEP_MLP_WITHIN_HEADROOM``
        says otherwise
    """
    stages = _Stages(layer, plan, inputs, index, outputs)
    hidden_bytes = sum(merged.call.hidden_states.nbytes for merged in inputs)
    tokens = [merged.call.hidden_states.shape[:-1].numel() for merged in inputs]
    stages.feed_attention_readers()
    session.sequential_epoch_end(stages.attention_readers)
    kept_o_inputs = stages.stop_at_attention_output(_Kept(KEEP_ATTENTION * hidden_bytes))
    session.sequential_epoch_end([stages.attention_output])
    stages.add_attention(kept_o_inputs)
    session.sequential_epoch_end(stages.mlp_readers)
    # the heap's holes left by stages 2 and 3 (the freed o_proj inputs, the replaced hidden
    # states) are too small for the MLP's temporaries: returned to the system before stage
    # 4, they no longer count on top of it (bench/results/2026-12-01-notes-pipelines.md)
    release_free_memory()
    measured = None if memory is None else memory.down_compression
    rule = light if KEEP_MLP_WITHIN_HEADROOM is None else KEEP_MLP_WITHIN_HEADROOM
    within = rule and outputs and measured is not None
    headroom = stages.mlp_headroom(tokens, measured or 0) if within else 0.0
    budget = max(KEEP_MLP * hidden_bytes, headroom) if outputs else 0
    # within the headroom, stage 4's temporaries are mapped on their own and returned to the
    # system when freed: kept in the heap, what they left resident grew past the reserve
    # ``mlp_headroom`` counts for them, and the peak with it; otherwise the heap keeps them
    # (no page faults: bench/results/2026-12-02-w8a8-peak.md)
    with freed_memory_returned() if within else contextlib.nullcontext():
        kept_down_inputs = stages.stop_at_mlp_output(_Kept(budget, tokens))
    # the stages' temporaries go back to the system before the layer's largest problem, as
    # the whole-layer path does once per layer
    release_free_memory()
    before = resident_bytes()
    session.sequential_epoch_end([stages.mlp_output])
    if memory is not None:  # what the compression left resident, freed or not (the heap's)
        added = max(0, resident_bytes() - before)
        memory.down_compression = max(memory.down_compression or 0, added)
    if outputs:
        stages.add_mlp(kept_down_inputs)
    stages.progress.close()


class _Stages:
    """The stages of one Llama-style layer over its cached calls, one method each (see the
    module doc); the modifiers compress each stage's modules in between (the caller).

    :param layer: the decoder layer
    :param plan: its stages' modules, by name
    :param inputs: its cached calls, whose hidden states stages 3 and 5 replace
    :param index: the layer's position, for messages
    :param outputs: whether stage 5 runs (it counts in the progress bar)
    """

    def __init__(
        self,
        layer: torch.nn.Module,
        plan: StagePlan,
        inputs: list[MergedCalls],
        index: int,
        outputs: bool,
    ) -> None:
        self.input_norm, self.attention, self.post_attention_norm, self.mlp = (
            getattr(layer, part) for part in _PARTS
        )
        self.attention_readers = [layer.get_submodule(name) for name in plan.attention_readers]
        self.attention_output = layer.get_submodule(plan.attention_output)
        self.mlp_readers = [layer.get_submodule(name) for name in plan.mlp_readers]
        self.mlp_output = layer.get_submodule(plan.mlp_output)
        self.gated = (
            None if plan.gated_mlp is None else [layer.get_submodule(n) for n in plan.gated_mlp]
        )
        self.plan = plan
        self.inputs = inputs
        self.index = index
        steps = len(inputs) * (5 if outputs else 4)
        self.progress = tqdm(total=steps, desc=f"layer {index}", leave=False)

    def feed_attention_readers(self) -> None:
        """Stage 1: the attention's inputs, to q/k/v's hooks without running them."""
        with HooksMixin.hooks_only_on(self.attention_readers):
            for merged in self.inputs:
                with merged_batches(merged.batch_sizes):
                    _feed(self.attention_readers, self.input_norm(merged.call.hidden_states))
                self.progress.update()

    def stop_at_attention_output(self, kept: _Kept) -> _Kept:
        """Stage 2: the attention on the compressed q/k/v, stopped at o_proj's inputs, which
        o_proj's hooks see; they are kept within ``kept``'s budget."""
        return self._stop_at(self.attention_output, self.plan.attention_output, self._attend, kept)

    def add_attention(self, kept_o_inputs: _Kept) -> None:
        """Stage 3: each call's hidden states become the residual stream after the
        attention; its post-attention norm goes to gate/up's hooks."""
        with HooksMixin.hooks_only_on(self.mlp_readers):
            for position in range(len(self.inputs)):
                call = self.inputs[position].call
                attended = self._attention_out(call, kept_o_inputs.take(position))
                hidden = call.hidden_states + attended
                del attended
                self.inputs[position] = self.inputs[position].with_hidden_states(hidden)
                with merged_batches(self.inputs[position].batch_sizes):
                    _feed(self.mlp_readers, self.post_attention_norm(hidden))
                self.progress.update()

    def stop_at_mlp_output(self, kept: _Kept) -> _Kept:
        """Stage 4: the MLP on the compressed gate/up, stopped at down_proj's inputs, which
        down_proj's hooks see; they are kept within ``kept``'s budget. A gated MLP's
        down_proj inputs are computed by ``gated_down_input``, straight into their kept
        slot, in a block allocated before the stage's first temporaries."""
        if self.gated is None:
            return self._stop_at(self.mlp_output, self.plan.mlp_output, self._mlp_on, kept)
        gate, up, act = self.gated
        width = getattr(self.mlp_output, "in_features", None)
        if isinstance(width, int) and self.inputs:
            hidden = self.inputs[0].call.hidden_states
            kept.allocate(width, hidden.dtype, hidden.device)
        with HooksMixin.hooks_only_on([self.mlp_output]):
            for merged in self.inputs:
                with merged_batches(merged.batch_sizes):
                    normed = self.post_attention_norm(merged.call.hidden_states)
                    down_input = gated_down_input(gate, up, act, normed, kept.reserve)
                    del normed
                    HooksMixin.call_forward_pre_hooks(self.mlp_output, down_input)
                del down_input
                self.progress.update()
        return kept

    def add_mlp(self, kept_down_inputs: _Kept) -> None:
        """Stage 5: each call's hidden states become the layer's outputs, every hook paused."""
        with HooksMixin.disable_hooks():
            for position in range(len(self.inputs)):
                call = self.inputs[position].call
                update = self._mlp_out(call, kept_down_inputs.take(position))
                hidden = call.hidden_states + update
                self.inputs[position] = self.inputs[position].with_hidden_states(hidden)
                self.progress.update()

    def mlp_headroom(self, tokens: list[int], compression: int = 0) -> float:
        """Bytes of down_proj inputs stage 4 may keep without raising the process's peak
        memory: its headroom (``resident_headroom``, after the heap was trimmed) less what
        the stage needs besides for the largest call: six tensors as wide as down_proj's
        inputs (gate, up, their product and activation; a gated MLP, ``gated_down_input``,
        holds two, the rest is room for the normed and fake-quantized inputs) and a
        fake-quantized copy of the MLP's weights (compressed-tensors' fake quantization of
        grouped weights, as GPTQ's W4A16 runs it, holds several copies of one weight: with
        a reserve of four MLP-wide temporaries and one weight, GPTQ's peak rose from 1149
        to 1222 MB, bench/results/2026-12-02-w8a8-peak.md). Stage 4 returns its temporaries
        to the system as they are freed (``freed_memory_returned``), so these are all it
        holds besides the kept inputs. The kept inputs are held through down_proj's compression
        too: ``compression`` (bytes it adds, ``StageMemory``) is reserved when larger.

        :param compression: what down_proj's compression adds, as measured on earlier layers
        """
        width = getattr(self.mlp_output, "in_features", None)
        if not isinstance(width, int) or not tokens:
            return 0.0
        element = self.mlp_output.weight.element_size()
        temporaries = 6 * max(tokens) * width * element
        weights = sum(
            weight.nbytes
            for module in self.mlp.modules()
            if isinstance(weight := getattr(module, "weight", None), torch.Tensor)
        )
        return float(resident_headroom() - max(temporaries + weights, compression))

    def _stop_at(
        self,
        module: torch.nn.Module,
        name: str,
        forward: Callable[[LayerInputs], Any],
        kept: _Kept,
    ) -> _Kept:
        """Run ``forward`` on every call until it reaches ``module``, whose hooks alone see
        the inputs; they are kept within ``kept``'s budget."""
        with HooksMixin.hooks_only_on([module]), stop_forward_at(module):
            for merged in self.inputs:
                with merged_batches(merged.batch_sizes):
                    caught = run_until_stopped(forward, merged.call)
                if caught is None:
                    raise RuntimeError(f"layer {self.index}: {name} was not called")
                args, _kwargs = caught
                kept.offer(args[0])
                self.progress.update()
        return kept

    def _attend(self, call: LayerInputs) -> Any:
        return self.attention(
            hidden_states=self.input_norm(call.hidden_states), **_other_kwargs(call)
        )

    def _mlp_on(self, call: LayerInputs) -> Any:
        return self.mlp(self.post_attention_norm(call.hidden_states))

    def _attention_out(self, call: LayerInputs, o_input: torch.Tensor | None) -> torch.Tensor:
        """The attention's output, hooks paused: o_proj on its kept input, or the attention
        run again when that was not kept."""
        with HooksMixin.disable_hooks():
            if o_input is not None:
                return self.attention_output(o_input)
            return first_output(self._attend(call))

    def _mlp_out(self, call: LayerInputs, down_input: torch.Tensor | None) -> torch.Tensor:
        """The MLP's output: down_proj on its kept input, or the MLP run again."""
        if down_input is not None:
            return self.mlp_output(down_input)
        return first_output(self._mlp_on(call))


def _feed(readers: list[torch.nn.Module], normed: torch.Tensor) -> None:
    """Hand ``normed`` to the modifiers' forward pre-hooks of ``readers``, without running them."""
    for module in readers:
        HooksMixin.call_forward_pre_hooks(module, normed)
