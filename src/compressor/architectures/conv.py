"""Plain ``nn.Sequential`` conv nets: channel coupling read from the module order."""

from __future__ import annotations

import torch

from compressor.architectures.mappings import StructureMapping

__all__ = ["BATCH_NORMS", "CHANNEL_PRESERVING", "sequential_conv_mappings"]

#: norm layers over channels, whose statistics and affine vectors follow the channels
BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)

#: layers that keep every channel where it is, so a conv's output channels reach the next conv
CHANNEL_PRESERVING = (
    torch.nn.ReLU,
    torch.nn.ReLU6,
    torch.nn.LeakyReLU,
    torch.nn.GELU,
    torch.nn.SiLU,
    torch.nn.Sigmoid,
    torch.nn.Tanh,
    torch.nn.Hardswish,
    torch.nn.Identity,
    torch.nn.Dropout,
    torch.nn.Dropout2d,
    torch.nn.MaxPool2d,
    torch.nn.AvgPool2d,
)


def sequential_conv_mappings(
    model: torch.nn.Module,
) -> tuple[list[StructureMapping], dict[str, str]]:
    """Channel mappings of a plain ``nn.Sequential`` conv net, read in module order.

    Each Conv2d is coupled with the BatchNorm2d after it and the next Conv2d, across
    channel-preserving layers (activations, dropout, pooling).

    :param model: the conv net
    :return: the mappings, and for every Conv2d without a coupled conv the reason
    :raises ValueError: when the model is not built from nested ``nn.Sequential`` only
    """
    for name, module in model.named_modules():
        if any(True for _ in module.children()) and not isinstance(module, torch.nn.Sequential):
            raise ValueError(
                f"{type(model).__name__} is not a plain nn.Sequential conv net "
                f"({name or 'the model'} is a {type(module).__name__} with its own forward), so "
                "its channel coupling cannot be read from the module order"
            )
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    mappings, unpaired = [], {}
    for i, (name, conv) in enumerate(leaves):
        if not isinstance(conv, torch.nn.Conv2d):
            continue
        if conv.groups != 1:
            unpaired[name] = f"it is a grouped convolution (groups={conv.groups})"
            continue
        norms: list[str] = []
        reason = "it is the last layer"
        consumer = None
        for next_name, nxt in leaves[i + 1 :]:
            if isinstance(nxt, torch.nn.BatchNorm2d) and nxt.num_features == conv.out_channels:
                norms.append(next_name)
            elif isinstance(nxt, CHANNEL_PRESERVING):
                continue
            elif (
                isinstance(nxt, torch.nn.Conv2d)
                and nxt.groups == 1
                and nxt.in_channels == conv.out_channels
            ):
                consumer = next_name
                break
            else:
                reason = f"the next layer {next_name} is a {type(nxt).__name__}"
                break
        if consumer is None:
            unpaired[name] = reason
        else:
            mappings.append(StructureMapping(producers=[name], norms=norms, consumers=[consumer]))
    return mappings, unpaired
