"""Post-training calibration: the scales of compressed-tensors quantized modules set from
observed ranges, and ``PostTrainingPathway``, which observes them over calibration batches."""

from __future__ import annotations

from typing import Any

import torch
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)
from compressed_tensors.quantization.quant_args import DynamicType
from loguru import logger

from compressor.core.events import Event, EventType
from compressor.modifiers.hooks import HooksMixin
from compressor.modifiers.quantization.calibration_forward import CalibrationForwards
from compressor.modifiers.quantization.kv_cache import KVCacheCalibration
from compressor.modifiers.quantization.matching import apply_quantization
from compressor.modifiers.quantization.observers import (
    ActivationObservers,
    check_finite_range,
    global_scale,
    observe_activation,
    qparams_from_range,
    weight_range,
)
from compressor.utils.threads import one_cpu_thread

__all__ = [
    "PostTrainingPathway",
    "bake_convolutions",
    "bake_quantized_weight",
    "freeze_quantization",
    "held_by_compressed_tensors",
    "set_qparams",
    "share_fused_global_scales",
    "static_activation_roles",
    "update_weight_qparams",
]

_ROLE_TO_BASE = {"input_activations": "input", "output_activations": "output"}


def set_qparams(
    module: torch.nn.Module,
    base_name: str,
    lo: torch.Tensor,
    hi: torch.Tensor,
    args: QuantizationArgs,
    where: str,
    shared_global_scale: torch.Tensor | None = None,
) -> None:
    """Write the scale (and zero point, when the module has one) for a range in place.

    tensor_group (NVFP4) also writes the tensor's global scale, from the same range, and
    the group scales are computed under it; activations whose group scales are dynamic
    (``dynamic: local``) take only that global scale.

    :param base_name: ``weight``, ``input`` or ``output``
    :param where: the module's name, for errors about NaN or inf ranges
    :param shared_global_scale: tensor_group: this global scale instead of the range's own
        (one shared by projections a runtime fuses, see ``share_fused_global_scales``)
    """
    label = f"{where} ({base_name})"
    tensor_scale = None
    if hasattr(module, f"{base_name}_global_scale"):
        check_finite_range(lo, hi, label)
        tensor_scale = global_scale(lo, hi) if shared_global_scale is None else shared_global_scale
        update_offload_parameter(module, f"{base_name}_global_scale", tensor_scale)
    if args.dynamic == DynamicType.LOCAL:
        return
    scale, zero_point = qparams_from_range(lo, hi, args, label, global_scale=tensor_scale)
    # through update_offload_parameter: an offloaded module is updated where it lives
    param = getattr(module, f"{base_name}_scale")
    update_offload_parameter(
        module, f"{base_name}_scale", scale.reshape(param.shape).to(param.dtype)
    )
    zp_param = getattr(module, f"{base_name}_zero_point", None)
    if zp_param is not None:
        update_offload_parameter(
            module,
            f"{base_name}_zero_point",
            zero_point.reshape(zp_param.shape).to(zp_param.dtype),
        )


def update_weight_qparams(
    module: torch.nn.Module,
    name: str,
    args: QuantizationArgs | None = None,
    shared_global_scale: torch.Tensor | None = None,
) -> None:
    """Scales and zero points of a module's weight from its current values.

    :param args: the weight's quantization args (the module's scheme when None)
    :param shared_global_scale: NVFP4: the global scale to use instead of the weight's own
    """
    if args is None:
        args = module.quantization_scheme.weights
    if args is None:
        return
    lo, hi = weight_range(module.weight, args)
    set_qparams(module, "weight", lo, hi, args, name, shared_global_scale)


# projections a runtime fuses into one matrix (vLLM: qkv_proj, gate_up_proj), which then
# has one NVFP4 global scale
_FUSED_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@torch.no_grad()
def share_fused_global_scales(modules: dict[str, torch.nn.Module]) -> int:
    """Give projections that runtimes fuse (q/k/v, gate/up of one layer) one NVFP4 weight
    global scale, the smallest of theirs (so every member's group scales stay within fp8's
    range), and recompute their group scales under it. vLLM loads such a checkpoint into
    one fused matrix with a single global scale; llm-compressor writes it this way too.

    :param modules: the quantized modules by name (those without a weight global scale, and
        groups not wholly among them, are left alone)
    :return: how many fused groups now share a global scale
    """
    shared = 0
    for name in modules:
        parent, _, leaf = name.rpartition(".")
        for fused in _FUSED_PROJECTIONS:
            if leaf != fused[0]:
                continue
            members = [f"{parent}.{p}" if parent else p for p in fused]
            if not all(hasattr(modules.get(m), "weight_global_scale") for m in members):
                continue
            scales: list[torch.Tensor] = [modules[m].weight_global_scale for m in members]  # type: ignore[misc]
            scale = torch.stack([s.float() for s in scales]).amin(0)
            for member in members:
                update_weight_qparams(modules[member], member, shared_global_scale=scale)
            shared += 1
    return shared


def static_activation_roles(module: torch.nn.Module) -> dict[str, QuantizationArgs]:
    """``{"input": args, "output": args}`` for the activations that need observed ranges:
    static ones, and NVFP4's (``dynamic: local``), whose global scale is static."""
    scheme = getattr(module, "quantization_scheme", None)
    roles = {}
    for role, base in _ROLE_TO_BASE.items():
        args = getattr(scheme, role, None) if scheme is not None else None
        if args is not None and args.dynamic in (False, DynamicType.LOCAL):
            roles[base] = args
    return roles


def freeze_quantization(module: torch.nn.Module) -> None:
    """Mark a calibrated module frozen: its forward uses its fixed scales from now on."""
    module.quantization_status = QuantizationStatus.FROZEN


@torch.no_grad()
def bake_quantized_weight(
    module: torch.nn.Module, args: QuantizationArgs, name: str, levels: str | None = None
) -> None:
    """Replace a weight by its quantized values, for modules compressed-tensors cannot hold
    (convolutions): the forward then computes with exactly the quantized weight.

    :param levels: ``ternary`` or ``binary`` instead of ``args``' integer grid
    """
    from compressor.modifiers.quantization.fake_quant import (
        fake_quantize_weight,
        is_per_tensor,
        low_bit_weight,
    )

    if levels is not None:
        values, _ = low_bit_weight(module.weight, levels, is_per_tensor(args))  # type: ignore[arg-type]
    else:
        values = fake_quantize_weight(module.weight, args, where=name)
    update_offload_parameter(module, "weight", values.to(module.weight.dtype))


def held_by_compressed_tensors(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """The modules compressed-tensors holds quantized: all but convolutions."""
    return {n: m for n, m in modules.items() if not isinstance(m, torch.nn.Conv2d)}


def bake_convolutions(
    modules: dict[str, torch.nn.Module],
    schemes: dict[str, QuantizationScheme],
    levels: str | None = None,
) -> None:
    """``bake_quantized_weight`` for every convolution among ``modules``.

    :param schemes: each module's scheme, by name
    :param levels: ``ternary`` or ``binary`` instead of the schemes' integer grids
    """
    for name, module in modules.items():
        if isinstance(module, torch.nn.Conv2d):
            args = schemes[name].weights
            assert args is not None
            bake_quantized_weight(module, args, name, levels)


class PostTrainingPathway:
    """QuantizationModifier after training: compressed-tensors quantization attached with
    scales from the weights, static activation ranges observed over the calibration batches,
    and everything frozen at the end, ready to save.

    A part of the model is calibrated in full precision: its quantized forwards stay off
    while its ranges are observed (only their extremes are gathered, per batch). When the
    part's calibration ends (the sequential pipeline's SEQUENTIAL_EPOCH_END for a decoder
    layer, or the end of calibration for what no such event carried), its static scales are
    set from the ranges over all its batches and its quantized forwards are switched on, so
    the pipeline's re-run of the layer hands the next layer quantized outputs. This is what
    GPTQModifier does with static inputs; the ranges are sums of extremes, so batches may
    run stacked (``merges_batches``). The key/value cache is the exception: it quantizes with
    the range observed so far from the first batch on (``KVCacheCalibration``).

    :param model: the model
    :param config: what to quantize
    :param modules: the modules to quantize, by name (convolutions included)
    :param schemes: each module's scheme (``schemes_by_module``)
    :param observers: where the static activation ranges accumulate
    :param hooks: registers the observing hooks (the modifier, which removes them at the end)
    :param owner: the modifier's name, for messages
    :param kv_cache: calibrates the key/value cache's scales, when the config quantizes it
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: QuantizationConfig,
        modules: dict[str, torch.nn.Module],
        schemes: dict[str, QuantizationScheme],
        observers: ActivationObservers,
        hooks: HooksMixin,
        owner: str,
        kv_cache: KVCacheCalibration | None = None,
    ) -> None:
        self.model, self.config, self.modules, self.schemes = model, config, modules, schemes
        self.observers, self.hooks, self.owner = observers, hooks, owner
        self.kv_cache = kv_cache
        self._handles: list[Any] = []
        # the fast quantized forward while calibrating (compressed-tensors' own after)
        self._forwards = CalibrationForwards()
        # modules whose calibration has not ended: quantized forwards off, scales not set
        self._calibrating: dict[str, torch.nn.Module] = {}

    def start(self, event: Event) -> None:
        """Attach quantization, set the weight scales, hook the static activations, and
        switch the quantized forwards off until each module's calibration ends."""
        apply_quantization(self.model, self.config, self.modules)
        held = held_by_compressed_tensors(self.modules)
        # a min, a max and a rounding per weight: exact on any thread count, and on one they
        # do not stall when other processes share the cores (utils.threads)
        with one_cpu_thread():
            for name, module in held.items():
                update_weight_qparams(module, name)
            share_fused_global_scales(held)
        self._forwards.install(held.values())
        for name, module in held.items():
            for role, args in static_activation_roles(module).items():
                self._observe(name, module, role, args)
            module.quantization_enabled = False
            self._calibrating[name] = module
        if self.kv_cache is not None:
            self.kv_cache.start()

    def _observe(
        self, name: str, module: torch.nn.Module, role: str, args: QuantizationArgs
    ) -> None:
        observer = self.observers.add(name, role, args)
        label = f"{name} ({role} activations)"

        def update(value: torch.Tensor) -> None:
            observe_activation(observer, value, args, label)

        if role == "input":

            def observe_input(_module: torch.nn.Module, inputs: tuple) -> None:
                update(inputs[0])

            self._handles.append(self.hooks.register_hook(module, observe_input, "forward_pre"))
        else:

            def observe_output(_module: torch.nn.Module, _inputs: tuple, output: Any) -> None:
                update(output)

            self._handles.append(self.hooks.register_hook(module, observe_output, "forward"))

    def _finish(self, names: list[str]) -> None:
        """End the calibration of the modules ``names``: their static scales from the ranges
        over every batch (reduced over DDP ranks), and their quantized forwards on."""
        unseen = []
        for name in names:
            module = self._calibrating.pop(name)
            for role, args in static_activation_roles(module).items():
                observer = self.observers.get(name, role)
                assert observer is not None
                weight = module.weight
                assert isinstance(weight, torch.Tensor)
                observer.reduce_across_ranks(device=weight.device)
                if observer.batches == 0:
                    unseen.append(f"{name} ({role})")
                    continue
                set_qparams(module, role, *observer.range, args, name)
            module.quantization_enabled = True
        if unseen:
            raise RuntimeError(
                "calibration ended but no batch reached these modules, so their static "
                f"activation ranges are unknown: {', '.join(unseen)}"
            )

    def update(self, event: Event) -> None:
        """At SEQUENTIAL_EPOCH_END: end the calibration of the modules the event carries."""
        if event.type_ != EventType.SEQUENTIAL_EPOCH_END:
            return
        inside = {id(m) for part in event.modules for m in part.modules()}
        self._finish([name for name, m in self._calibrating.items() if id(m) in inside])

    def end(self, event: Event) -> None:
        """End the calibration of every module still calibrating, and freeze every module."""
        while self._handles:
            self._handles.pop().remove()
        if self.kv_cache is not None:
            self.kv_cache.end()
        self._finish(list(self._calibrating))
        self._forwards.remove()
        bake_convolutions(self.modules, self.schemes)
        for module in held_by_compressed_tensors(self.modules).values():
            freeze_quantization(module)
        logger.info(
            "{}: {} module(s) quantized and frozen ({} activation range(s) observed)",
            self.owner,
            len(self.modules),
            len(self.observers),
        )

    def finalize(self) -> None:
        """Nothing: the modules were frozen at the end of calibration."""

    def state_dict(self) -> dict[str, Any]:
        """The observed ranges, in the modifier's checkpoint format (no bit schedule here)."""
        return {"start_step": 0, "ranges_frozen": False, "observers": self.observers.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.observers.load_state_dict(state_dict.get("observers", {}))
