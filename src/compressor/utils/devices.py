"""Which compute devices this torch build can use, checked before any work."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["available_devices", "check_device"]

# accelerator back-ends whose torch module answers is_available() and device_count()
_ACCELERATORS = ("cuda", "xpu", "mps")


def _backend(kind: str) -> Any:
    backend = getattr(torch, kind, None)
    if backend is None or not callable(getattr(backend, "is_available", None)):
        return None
    return backend


def _count(kind: str) -> int:
    backend = _backend(kind)
    if backend is None or not backend.is_available():
        return 0
    count = getattr(backend, "device_count", None)
    return int(count()) if callable(count) else 1


def available_devices() -> list[str]:
    """The device names this process can compute on: ``cpu`` and each accelerator found.

    :return: e.g. ``["cpu", "cuda", "cuda:0", "cuda:1"]``
    """
    names = ["cpu"]
    for kind in _ACCELERATORS:
        count = _count(kind)
        if count:
            names += [kind] + [f"{kind}:{index}" for index in range(count)]
    return names


def check_device(device: str) -> torch.device:
    """``device`` parsed, when this process can compute on it.

    :param device: a device name such as ``cpu``, ``cuda`` or ``cuda:1``
    :return: the device
    :raises ValueError: naming the device and the available ones
    """
    available = ", ".join(available_devices())
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(
            f"device={device!r} is not a device name; available here: {available}"
        ) from err
    if parsed.type == "cpu":
        return parsed
    if parsed.type not in _ACCELERATORS:
        raise ValueError(
            f"device={device!r}: calibration cannot compute on {parsed.type!r} devices; "
            f"available here: {available}"
        )
    count = _count(parsed.type)
    if count == 0:
        raise ValueError(
            f"device={device!r}: this torch build sees no {parsed.type} device; "
            f"available here: {available}"
        )
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(
            f"device={device!r}: there are {count} {parsed.type} device(s); "
            f"available here: {available}"
        )
    return parsed
