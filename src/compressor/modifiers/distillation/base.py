"""OutputDistillationModifier: train a student towards its teacher's outputs."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, PrivateAttr

from compressor.architectures import find_decoder_layers
from compressor.core import Event, EventType, State
from compressor.modifiers.base import Modifier
from compressor.modifiers.distillation.losses import distillation_loss, hidden_state_loss

__all__ = ["OutputDistillationModifier"]


@Modifier.register("OutputDistillation")
class OutputDistillationModifier(Modifier):
    """Knowledge distillation from the session's ``teacher_model`` (Hinton et al. 2015,
    "Distilling the Knowledge in a Neural Network", arXiv:1503.02531).

    On LOSS_CALCULATED, while active, the loss becomes
    ``(1 - hardness) * task_loss + hardness * T^2 * KL(teacher / T || student / T)``, plus
    ``hidden_weight`` times the mean squared error between each student layer's output and
    the output of its teacher layer. The student's logits and hidden states are captured by
    forward hooks during the training loop's own forward; the teacher runs once per batch on
    ``state.batch_data`` under ``no_grad`` (``labels`` are not passed to it).

    **Lifecycle**

    - ``on_initialize``: check that the session has a teacher (and the layer map)
    - ``on_start``: hooks on the student (logits, and layer outputs when ``hidden_weight``)
    - ``on_event`` (LOSS_CALCULATED, while active): replace ``state.loss``
    - ``on_end``/``on_finalize``: hooks removed

    :param temperature: softens both distributions
    :param hardness: weight of the distillation term; 1 ignores the task loss
    :param hidden_weight: weight of the hidden-state term (0: off)
    :param teacher_layer: for the hidden-state term: student layer k is compared with teacher
        layer ``teacher_layer[k]``; unset means the same index (same depth)
    """

    temperature: float = Field(default=2.0, gt=0)
    hardness: float = Field(default=1.0, ge=0, le=1)
    hidden_weight: float = Field(default=0.0, ge=0)
    teacher_layer: list[int] | None = None

    _student_logits: torch.Tensor | None = PrivateAttr(default=None)
    _student_hidden: dict[int, torch.Tensor] = PrivateAttr(default_factory=dict)

    def on_initialize(self, state: State) -> None:
        if state.teacher_model is None:
            raise ValueError(
                "OutputDistillationModifier needs a teacher: pass teacher_model= to "
                "session.initialize (or to CompressionCallback)"
            )
        if self.hidden_weight > 0:
            _, student = find_decoder_layers(state.model)
            _, teacher = find_decoder_layers(state.teacher_model)
            mapping = self.teacher_layer or list(range(len(student)))
            if len(mapping) != len(student):
                raise ValueError(
                    f"teacher_layer has {len(mapping)} entries but the student has "
                    f"{len(student)} layers"
                )
            bad = [i for i in mapping if not 0 <= i < len(teacher)]
            if bad:
                raise ValueError(
                    f"teacher_layer: {bad} out of range; the teacher has layers 0..{len(teacher) - 1}"
                )
        state.teacher_model.eval()
        for param in state.teacher_model.parameters():
            param.requires_grad_(False)

    def on_start(self, state: State, event: Event) -> None:
        def keep_logits(_module: Any, _args: Any, output: Any) -> None:
            self._student_logits = output.logits if hasattr(output, "logits") else output[0]

        self.register_hook(state.model, keep_logits, "forward")
        if self.hidden_weight > 0:
            _, layers = find_decoder_layers(state.model)
            for index, layer in enumerate(layers):
                self.register_hook(layer, self._keep_hidden(self._student_hidden, index), "forward")

    @staticmethod
    def _keep_hidden(store: dict[int, torch.Tensor], index: int):
        def hook(_module: Any, _args: Any, output: Any) -> None:
            store[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def on_event(self, state: State, event: Event) -> None:
        if event.type_ != EventType.LOSS_CALCULATED or not self.started or self.ended:
            return
        if self._student_logits is None:
            raise RuntimeError(
                "OutputDistillationModifier saw no student forward before loss_calculated"
            )
        teacher_logits, teacher_hidden = self._run_teacher(state)
        distill = distillation_loss(self._student_logits, teacher_logits, self.temperature)
        loss = (1 - self.hardness) * state.loss + self.hardness * distill
        if self.hidden_weight > 0:
            mapping = self.teacher_layer or list(range(len(self._student_hidden)))
            pairs = [(self._student_hidden[k], teacher_hidden[t]) for k, t in enumerate(mapping)]
            loss = loss + self.hidden_weight * hidden_state_loss(pairs)
        state.loss = loss
        self._student_logits = None
        self._student_hidden.clear()

    @torch.no_grad()
    def _run_teacher(self, state: State) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        batch = state.batch_data
        if not isinstance(batch, dict):
            raise TypeError(
                "OutputDistillationModifier needs the batch as a dict of model inputs "
                f"(session.batch_start(batch_data=...)), got {type(batch).__name__}"
            )
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden: dict[int, torch.Tensor] = {}
        handles = []
        if self.hidden_weight > 0:
            _, layers = find_decoder_layers(state.teacher_model)
            handles = [
                layer.register_forward_hook(self._keep_hidden(hidden, i))
                for i, layer in enumerate(layers)
            ]
        try:
            output = state.teacher_model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        logits = output.logits if hasattr(output, "logits") else output[0]
        return logits, hidden
