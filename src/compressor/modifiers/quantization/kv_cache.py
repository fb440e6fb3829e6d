"""Quantized key/value cache: which attention modules hold it, attaching it, calibrating it.

A ``kv_cache_scheme`` (compressed-tensors' ``QuantizationConfig.kv_cache_scheme``) quantizes
the keys and values an attention module writes to its cache, after the rotary embedding,
with static scales: one per tensor or one per key-value head. The checkpoint is
compressed-tensors': ``<attention>.k_scale`` / ``.v_scale`` beside the weights and
``kv_cache_scheme`` in ``config.json``'s ``quantization_config``, which vLLM reads.

compressed-tensors 0.20 hooks an attention module only when its forward takes
``past_key_values``; transformers 5.24 renamed that argument ``cache``, so compressed-tensors
hooks no Llama-style attention there (in calibration or when transformers loads the
checkpoint). This module attaches the same thing itself, by whichever name the forward
uses: ``k_scale`` / ``v_scale`` parameters on the attention module and a ``kv_cache``
submodule (``KVCacheQuantizer``) that a forward pre-hook passes in place of the model's
cache; it fake-quantizes the keys and values with those scales and hands them on to the real
cache (or back, when there is none), so the quantized cache also acts in evaluation.
``KVCacheCalibration`` observes the keys and values over the calibration batches and sets
the scales; ``attach_kv_cache_quantization`` re-attaches it to a reloaded model (see
``compressor.checkpoint.kv_cache``).
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStrategy,
    QuantizationType,
    fake_quantize,
)
from compressed_tensors.quantization.lifecycle.initialize import initialize_qparams

from compressor.modifiers.hooks import HooksMixin
from compressor.modifiers.quantization.observers import ActivationObservers, qparams_from_range

__all__ = [
    "KV_CACHE_ATTR",
    "KV_CACHE_STRATEGIES",
    "KVCacheCalibration",
    "KVCacheQuantizer",
    "attach_kv_cache_quantization",
    "check_kv_cache_args",
    "kv_cache_scheme_of",
    "kv_range",
    "match_kv_cache_modules",
]

KV_CACHE_ATTR = "kv_cache"  # compressed-tensors' name for the submodule
KV_CACHE_STRATEGIES = ("tensor", "attn_head")
_ROLES = {"k": "key_states", "v": "value_states"}
# what transformers has called an attention forward's cache argument, newest first
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")
_PROJECTIONS = ("k_proj", "v_proj")


def check_kv_cache_args(args: QuantizationArgs) -> None:
    """Raise ValueError when ``args`` is not a key/value cache scheme this library calibrates:
    8-bit (int or float), symmetric, static, per tensor or per key-value head."""
    strategy = QuantizationStrategy(args.strategy).value
    where = "kv_cache_scheme"
    if args.num_bits != 8 or args.type not in (QuantizationType.INT, QuantizationType.FLOAT):
        raise ValueError(
            f"{where}: type={args.type!r} num_bits={args.num_bits} is not supported; "
            "use num_bits 8 with type int or float"
        )
    if strategy not in KV_CACHE_STRATEGIES:
        raise ValueError(
            f"{where}: strategy {strategy!r} is not supported; use one of "
            f"{list(KV_CACHE_STRATEGIES)} (one scale per tensor, or per key-value head)"
        )
    if args.dynamic is not False:
        raise ValueError(
            f"{where}: dynamic={args.dynamic!r} is not supported; the cache's scales are "
            "static (dynamic: false), calibrated and saved with the model"
        )
    if not args.symmetric:
        raise ValueError(
            f"{where}: symmetric=false is not supported; runtimes (vLLM) read symmetric "
            "key/value scales only"
        )


def _cache_argument(module: torch.nn.Module) -> str | None:
    """The name of the cache argument of an attention module's forward, if it has one."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in _CACHE_ARGUMENTS if name in parameters), None)


def _looks_like_attention(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("Attention")


def match_kv_cache_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The attention modules whose key/value cache can be quantized, by name.

    An attention module (a class named ``*Attention``) qualifies when it has ``k_proj`` and
    ``v_proj`` and its forward takes the cache (``cache``, ``past_key_values`` or
    ``past_key_value``), whose ``update`` receives the keys and values. Any other attention
    module is an error naming it: its cache would stay unquantized, and nothing is skipped
    silently.
    """
    hooked: dict[str, torch.nn.Module] = {}
    refused: list[str] = []
    for name, module in model.named_modules():
        if not _looks_like_attention(module):
            continue
        if any(_looks_like_attention(m) and m is not module for m in module.modules()):
            continue  # a wrapper around the attention block
        missing = [
            p for p in _PROJECTIONS if not isinstance(getattr(module, p, None), torch.nn.Module)
        ]
        if missing:
            refused.append(f"{name} ({type(module).__name__}: no {'/'.join(missing)})")
        elif _cache_argument(module) is None:
            refused.append(f"{name} ({type(module).__name__}: its forward takes no cache)")
        else:
            hooked[name] = module
    if refused:
        raise ValueError(
            "kv_cache_scheme: the key/value cache of these attention modules cannot be hooked: "
            f"{', '.join(refused[:4])}{' ...' if len(refused) > 4 else ''}. The cache is "
            "quantized in attention modules with k_proj and v_proj whose forward takes "
            f"one of {list(_CACHE_ARGUMENTS)}; drop kv_cache_scheme for this model"
        )
    if not hooked:
        raise ValueError(
            f"kv_cache_scheme: {type(model).__name__} has no attention module (a *Attention "
            "module with k_proj and v_proj) whose key/value cache could be quantized; drop "
            "kv_cache_scheme for this model"
        )
    return hooked


class KVCacheQuantizer(torch.nn.Module):
    """Stands in for the model's cache in one attention module's forward: fake-quantizes the
    keys and values with the module's ``k_scale`` / ``v_scale``, then passes them to the real
    cache's ``update`` (or returns them, without a cache). It holds no parameters, so a
    checkpoint does not change. Its forward takes the keys and values, so a pre-hook on it
    observes them (``KVCacheCalibration``).

    :param args: the kv_cache_scheme
    :param attention: the attention module that holds the scales
    """

    def __init__(self, args: QuantizationArgs, attention: torch.nn.Module) -> None:
        super().__init__()
        self.args = args
        self.enabled = True
        self._attention = weakref.ref(attention)  # no reference cycle through the module tree
        self._cache: Any = None

    def wrap(self, cache: Any) -> KVCacheQuantizer:
        """Stand in for ``cache`` (None: no cache) in the coming forward."""
        self._cache = weakref.ref(cache) if cache is not None else None
        return self

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        return self(key_states, value_states, *args, **kwargs)

    def forward(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        attention = self._attention()
        if self.enabled and attention is not None:
            # fake_quantize returns the scale's dtype; attention wants the states' own
            key_states = fake_quantize(key_states, attention.k_scale, None, self.args).to(
                key_states.dtype
            )
            value_states = fake_quantize(value_states, attention.v_scale, None, self.args).to(
                value_states.dtype
            )
        cache = self._cache() if self._cache is not None else None
        self._cache = None
        if cache is not None:
            return cache.update(key_states, value_states, *args, **kwargs)
        return key_states, value_states

    def __getattr__(self, name: str) -> Any:
        # a model may read the cache's other attributes (its layers, its length)
        try:
            return super().__getattr__(name)
        except AttributeError:
            ref = self.__dict__.get("_cache")
            cache = ref() if ref is not None else None
            if cache is not None:
                return getattr(cache, name)
            raise


def _swap_in_quantizer(argument: str, position: int | None) -> Any:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        quantizer: KVCacheQuantizer = getattr(module, KV_CACHE_ATTR)
        if position is not None and position < len(args):
            args = (*args[:position], quantizer.wrap(args[position]), *args[position + 1 :])
        else:
            kwargs[argument] = quantizer.wrap(kwargs.get(argument))
        return args, kwargs

    return hook


def attach_kv_cache_quantization(
    model: torch.nn.Module, modules: dict[str, torch.nn.Module], args: QuantizationArgs
) -> None:
    """Give each attention module ``k_scale`` / ``v_scale`` parameters (uninitialized; shape
    (1,) per tensor, (key-value heads, 1, 1) per head) and a ``kv_cache`` quantizer that its
    forward uses in place of the model's cache. The hook stays with the model, as
    compressed-tensors' quantized forwards do: evaluation and saving see the quantized cache.

    :param model: the model (its config gives the number of key-value heads)
    :param modules: the attention modules (``match_kv_cache_modules``)
    :param args: the kv_cache_scheme
    """
    config = model.config.get_text_config(decoder=True)  # type: ignore[union-attr, operator]
    for name, module in modules.items():
        if isinstance(getattr(module, KV_CACHE_ATTR, None), KVCacheQuantizer):
            raise RuntimeError(f"{name}: its key/value cache is already quantized")
        head_dim = (
            getattr(module, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        kv_heads = int(getattr(module.k_proj, "out_features")) // head_dim  # noqa: B009
        # the activations' dtype (a compressed k_proj may hold fp8 or int8 weights)
        dtype = getattr(model, "dtype", torch.float32)
        for role in _ROLES:
            initialize_qparams(
                module,
                role,
                args,
                observed_shape=(kv_heads, None, head_dim),
                observed_dtype=dtype,
                force_zero_point=False,
            )
        module.register_module(KV_CACHE_ATTR, KVCacheQuantizer(args, module))
        argument = _cache_argument(module)
        assert argument is not None
        names = list(inspect.signature(module.forward).parameters)
        position = names.index(argument)
        # first among the module's pre-hooks: one that wraps the cache too (SpinQuant's R3,
        # which rotates the keys) then wraps the quantizer, so the quantizer sees its result
        module.register_forward_pre_hook(
            _swap_in_quantizer(argument, position), with_kwargs=True, prepend=True
        )


def kv_cache_scheme_of(model: torch.nn.Module) -> QuantizationArgs | None:
    """The kv_cache_scheme a model's attention modules quantize their cache with, if any."""
    schemes: list[QuantizationArgs] = []
    for module in model.modules():
        quantizer = getattr(module, KV_CACHE_ATTR, None)
        if isinstance(quantizer, KVCacheQuantizer) and quantizer.args not in schemes:
            schemes.append(quantizer.args)
    if len(schemes) > 1:
        raise ValueError(
            "the attention modules quantize their cache with different schemes; a checkpoint "
            "holds one kv_cache_scheme"
        )
    return schemes[0] if schemes else None


def kv_range(states: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The min and max of a batch of keys or values (batch, heads, tokens, head_dim): (1,)
    per tensor, or (heads,) per key-value head (``attn_head``)."""
    x = states.detach().float()
    if args.strategy == QuantizationStrategy.ATTN_HEAD:
        per_head = x.transpose(0, 1).flatten(1)
        return per_head.amin(dim=1), per_head.amax(dim=1)
    lo, hi = torch.aminmax(x)
    return lo.reshape(1), hi.reshape(1)


class KVCacheCalibration:
    """Observes the keys and values each attention module writes to its cache over the
    calibration batches and sets their static scales (``k_scale``, ``v_scale``).

    ``start`` attaches the quantized cache (``attach_kv_cache_quantization``). Until the end, each batch's
    forward quantizes with the range observed so far (a Linear's static activations, by
    contrast, are observed with its quantized forward off until its layer's calibration
    ends, see ``PostTrainingPathway``).

    :param model: the model
    :param modules: the attention modules (``match_kv_cache_modules``)
    :param args: the kv_cache_scheme
    :param observers: where the ranges accumulate, keyed by module name and ``k`` / ``v``
        (its own: the attention modules are not among the quantized Linears)
    :param hooks: registers the observing hooks (the modifier, which removes them)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        modules: dict[str, torch.nn.Module],
        args: QuantizationArgs,
        observers: ActivationObservers,
        hooks: HooksMixin,
    ) -> None:
        self.model, self.modules, self.args = model, modules, args
        self.observers, self.hooks = observers, hooks
        self._handles: list[Any] = []

    def start(self) -> None:
        """Attach the quantized cache and observe what every attention module writes to it."""
        attach_kv_cache_quantization(self.model, self.modules, self.args)
        for name, module in self.modules.items():
            cache = getattr(module, KV_CACHE_ATTR, None)
            if not isinstance(cache, KVCacheQuantizer):
                raise RuntimeError(
                    f"{name}: no key/value cache quantizer is attached to this attention "
                    "module; call attach_kv_cache_quantization first"
                )
            for role in _ROLES:
                self.observers.add(name, role, self.args)
            hook = self._observer(name, module, cache)
            self._handles.append(
                self.hooks.register_hook(cache, hook, "forward_pre", with_kwargs=True)
            )

    def _observer(self, name: str, module: torch.nn.Module, cache: torch.nn.Module) -> Any:
        signature = inspect.signature(cache.forward)

        def observe(_cache: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            bound = signature.bind(*args, **kwargs)
            for role, argument in _ROLES.items():
                observer = self.observers.get(name, role)
                assert observer is not None
                lo, hi = kv_range(bound.arguments[argument], self.args)
                qparams_from_range(lo, hi, self.args, f"{name} ({argument})")  # finite check
                observer.update(lo, hi)
                self._write(name, module, role)

        return observe

    def _write(self, name: str, module: torch.nn.Module, role: str) -> None:
        observer = self.observers.get(name, role)
        assert observer is not None
        scale, _ = qparams_from_range(*observer.range, self.args, f"{name} ({_ROLES[role]})")
        param = getattr(module, f"{role}_scale")
        # symmetric: compressed-tensors gives the cache no zero point
        update_offload_parameter(
            module, f"{role}_scale", scale.reshape(param.shape).to(param.dtype)
        )

    def end(self) -> None:
        """Stop observing; set every scale from its whole range (reduced over DDP ranks)."""
        while self._handles:
            self._handles.pop().remove()
        unseen = self.observers.unseen()
        if unseen:
            raise RuntimeError(
                "calibration ended but no batch reached the key/value cache of "
                f"{', '.join(unseen)}, so its scales are unknown"
            )
        for name, module in self.modules.items():
            for role in _ROLES:
                observer = self.observers.get(name, role)
                assert observer is not None
                observer.reduce_across_ranks(device=next(module.parameters()).device)
                self._write(name, module, role)
