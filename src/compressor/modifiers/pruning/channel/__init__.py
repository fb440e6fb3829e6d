from compressor.modifiers.pruning.channel.base import ChannelPruningModifier

__all__ = ["ChannelPruningModifier"]
