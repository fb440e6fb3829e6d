"""ChannelPruningModifier: output channels of convolutions, with the coupled BatchNorm and the
next convolution's input channels."""

from __future__ import annotations

import torch
from compressed_tensors.utils import is_match
from loguru import logger

from compressor.architectures import sequential_conv_mappings
from compressor.modifiers.base import Modifier
from compressor.modifiers.pruning.coupling import Coupling
from compressor.modifiers.pruning.mappings import build_couplings
from compressor.modifiers.pruning.structured import StructuredPruningModifier

__all__ = ["ChannelPruningModifier"]


@Modifier.register("ChannelPruning")
class ChannelPruningModifier(StructuredPruningModifier):
    """Prunes output channels of Conv2d layers, with the BatchNorm statistics and affine
    vectors of those channels and the input channels of the next convolution (Li et al.,
    "Pruning Filters for Efficient ConvNets", 2017, arXiv:1608.08710). The couplings of a plain
    ``nn.Sequential`` conv net are read from its module order; other nets pass ``mappings``.

    A channel's ``l1`` score is the summed magnitude of its filter and of the next conv's
    weights that read it.

    **Lifecycle**: see ``StructuredPruningModifier``.

    :param density: the fraction of output channels kept in every targeted conv
    :param targets: convs to prune (default: every conv whose output feeds another conv);
        naming a conv without a coupled conv is an error
    """

    kind = "channels"

    def resolve_couplings(self, model: torch.nn.Module) -> list[Coupling]:
        couplings = self._channel_couplings(model)
        self.check_related(model, couplings)
        return couplings

    def _channel_couplings(self, model: torch.nn.Module) -> list[Coupling]:
        if self.mappings is not None:
            return build_couplings(model, self.mappings, self.targets, self.ignore)
        try:
            mappings, unpaired = sequential_conv_mappings(model)
        except ValueError as err:
            if self.related_modules is not None:
                return build_couplings(model, self.structure_mappings(model), self.targets)
            raise ValueError(
                f"{type(self).__name__}: {err}. Pass mappings: [{{producers: [<conv>], "
                "norms: [<batchnorm>], consumers: [<next conv>]}}, ...], or related_modules"
            ) from None
        if self.targets:
            for name, reason in unpaired.items():
                module = model.get_submodule(name)
                if is_match(name, module, self.targets) and not is_match(name, module, self.ignore):
                    raise ValueError(
                        f"{type(self).__name__}: cannot find the layer coupled to conv {name} "
                        f"({reason}); add it to ignore, or pass mappings for it"
                    )
        elif unpaired:
            logger.info("{}: left unpruned (no coupled conv): {}", type(self).__name__, unpaired)
        return build_couplings(model, mappings, self.targets, self.ignore)
