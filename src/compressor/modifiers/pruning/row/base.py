"""RowPruningModifier: whole output neurons with the coupled input columns."""

from __future__ import annotations

from compressor.modifiers.base import Modifier
from compressor.modifiers.pruning.structured import StructuredPruningModifier

__all__ = ["RowPruningModifier"]


@Modifier.register("RowPruning")
class RowPruningModifier(StructuredPruningModifier):
    """Prunes output rows of Linear layers (MLP neurons) together with the input columns of
    the layer that reads them: in Llama the rows of ``gate_proj`` and ``up_proj`` and the
    columns of ``down_proj``; in BERT ``intermediate.dense`` and ``output.dense``. After the
    clean-up ``intermediate_size`` is the kept count.

    A row's ``l1`` score is the summed magnitude of its weights in every coupled module;
    ``activation`` weighs each weight by its input's norm over the calibration data.

    **Lifecycle**: see ``StructuredPruningModifier``.

    :param density: the fraction of rows kept in every layer
    :param targets: producing modules whose couplings are pruned (default: every MLP)
    """

    kind = "rows"
