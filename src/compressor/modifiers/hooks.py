"""One place through which modifiers add hooks, so that every hook is removed again."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["HooksMixin", "HookKind"]

HookKind = Literal["forward", "forward_pre", "backward", "tensor", "accumulated_grad"]


class HooksMixin:
    """Registers module, parameter and optimizer hooks and removes them all at once.

    Hooks can be paused for a while (``disable_hooks``), for example while a calibration
    pipeline replays a layer to produce its compressed outputs.
    """

    # class-level: a pause applies to every modifier's hooks at once
    _HOOKS_DISABLED: bool = False
    # class-level: when set, only the hooks on these modules (by id) run
    _HOOKS_ONLY_ON: frozenset[int] | None = None
    # class-level: when set, only the hooks registered by these objects (by id) run
    _HOOKS_ONLY_OF: frozenset[int] | None = None

    _handles: list[RemovableHandle]

    def _hook_handles(self) -> list[RemovableHandle]:
        try:
            return self._handles
        except AttributeError:
            self._handles = []
            return self._handles

    def register_hook(
        self,
        target: torch.nn.Module | torch.Tensor,
        hook: Callable[..., Any],
        kind: HookKind,
        **kwargs: Any,
    ) -> RemovableHandle:
        """Register ``hook`` on ``target`` and remember it for ``remove_hooks``.

        :param target: a module (``forward``, ``forward_pre``, ``backward``) or a tensor
            (``tensor``: a gradient hook; ``accumulated_grad``: called with the parameter
            once its ``.grad`` has been accumulated)
        :param hook: the function; it is skipped while hooks are disabled
        :param kind: which torch hook to use
        :param kwargs: passed to torch's register function (``with_kwargs``, ``prepend``)
        """

        target_id, owner_id = id(target), id(self)

        def wrapped(*args: Any, **kw: Any) -> Any:
            if HooksMixin._HOOKS_DISABLED:
                return None
            only = HooksMixin._HOOKS_ONLY_ON
            if only is not None and target_id not in only:
                return None
            owners = HooksMixin._HOOKS_ONLY_OF
            if owners is not None and owner_id not in owners:
                return None
            return hook(*args, **kw)

        wrapped._compressor_hook = True  # type: ignore[attr-defined]
        wrapped._compressor_owner = owner_id  # type: ignore[attr-defined]

        if kind == "tensor":
            if not isinstance(target, torch.Tensor):
                raise TypeError(f"a 'tensor' hook needs a tensor, got {type(target).__name__}")
            handle = target.register_hook(wrapped)
        elif kind == "accumulated_grad":
            if not isinstance(target, torch.Tensor):
                raise TypeError(
                    f"an 'accumulated_grad' hook needs a tensor, got {type(target).__name__}"
                )
            handle = target.register_post_accumulate_grad_hook(wrapped)
        elif isinstance(target, torch.nn.Module):
            register: Any = {
                "forward": target.register_forward_hook,
                "forward_pre": target.register_forward_pre_hook,
                "backward": target.register_full_backward_hook,
            }.get(kind)
            if register is None:
                raise ValueError(
                    "hook kind must be one of forward, forward_pre, backward, tensor, "
                    f"accumulated_grad; got {kind!r}"
                )
            handle = register(wrapped, **kwargs)
        else:
            raise TypeError(f"a {kind!r} hook needs a module, got {type(target).__name__}")
        self._hook_handles().append(handle)
        return handle

    def track_handle(self, handle: RemovableHandle) -> RemovableHandle:
        """Remember a handle registered elsewhere (an optimizer hook, a parametrization)."""
        self._hook_handles().append(handle)
        return handle

    def remove_hooks(self) -> None:
        """Remove every hook this object registered."""
        handles = self._hook_handles()
        while handles:
            handles.pop().remove()

    @property
    def num_hooks(self) -> int:
        return len(self._hook_handles())

    @staticmethod
    @contextlib.contextmanager
    def hooks_only_on(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
        """Inside the block, only the hooks registered on ``modules`` run (through this mixin,
        by any object); the hooks on every other module are paused. A pipeline that calibrates
        a layer in stages uses it: the modules of earlier stages, already compressed, run
        again without their calibration hooks seeing their inputs a second time."""
        previous = HooksMixin._HOOKS_ONLY_ON
        HooksMixin._HOOKS_ONLY_ON = frozenset(id(module) for module in modules)
        try:
            yield
        finally:
            HooksMixin._HOOKS_ONLY_ON = previous

    @staticmethod
    @contextlib.contextmanager
    def hooks_only_of(owners: Iterable[object]) -> Iterator[None]:
        """Inside the block, only the hooks that ``owners`` registered run; every other
        object's hooks are paused. A pipeline that calibrates some modifiers before the others
        (``CalibrationTraits.transforms_first``) uses it for each group's pass."""
        previous = HooksMixin._HOOKS_ONLY_OF
        HooksMixin._HOOKS_ONLY_OF = frozenset(id(owner) for owner in owners)
        try:
            yield
        finally:
            HooksMixin._HOOKS_ONLY_OF = previous

    @staticmethod
    def has_hooks(module: torch.nn.Module, owners: Iterable[object] | None = None) -> bool:
        """Whether any object (one of ``owners``, when given) registered a forward, forward
        pre- or backward hook on ``module`` through this mixin."""
        hooks = [
            *module._forward_pre_hooks.values(),
            *module._forward_hooks.values(),
            *module._backward_hooks.values(),
        ]
        ids = None if owners is None else {id(owner) for owner in owners}
        return any(
            getattr(hook, "_compressor_hook", False)
            and (ids is None or getattr(hook, "_compressor_owner", None) in ids)
            for hook in hooks
        )

    @staticmethod
    def call_forward_pre_hooks(module: torch.nn.Module, *args: Any) -> None:
        """Call the forward pre-hooks registered on ``module`` through this mixin as if
        ``module`` were called on ``args``, without running it (nor any hook registered by
        others). What they return is ignored: for hooks that observe inputs (a Hessian), when
        the module's output would be thrown away."""
        kwargs_hooks = module._forward_pre_hooks_with_kwargs
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "_compressor_hook", False):
                if key in kwargs_hooks:
                    hook(module, args, {})
                else:
                    hook(module, args)

    @staticmethod
    @contextlib.contextmanager
    def disable_hooks() -> Iterator[None]:
        """Pause every hook registered through this mixin, by any object, inside the block."""
        previous = HooksMixin._HOOKS_DISABLED
        HooksMixin._HOOKS_DISABLED = True
        try:
            yield
        finally:
            HooksMixin._HOOKS_DISABLED = previous
