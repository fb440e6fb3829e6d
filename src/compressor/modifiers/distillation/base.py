"""OutputDistillationModifier: train a student towards its teacher's outputs."""

from __future__ import annotations

from typing import Any

import torch
from compressed_tensors.utils.match import is_match
from loguru import logger
from pydantic import Field, PrivateAttr, model_validator

from compressor.architectures import find_decoder_layers
from compressor.core import Event, EventType, State
from compressor.modifiers.base import Modifier
from compressor.modifiers.distillation.losses import (
    distillation_loss,
    hidden_state_loss,
    square_head_loss,
)
from compressor.utils.patterns import MatchPattern

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

    **llm-compressor's layer-wise form.** With ``targets`` (llm-compressor's fields, from its
    releases that trained), the outputs of the student modules that ``targets`` names are
    compared with the teacher's modules of the same names, over the tokens of the batch's
    ``attention_mask``: the loss becomes ``orig_scale * task_loss + distill_scale * mean over
    the modules of sum((t - s)^2) / sum(t^2)`` (``comparison: square_head``, the one
    comparison of llm-compressor's that compares raw layer outputs meaningfully; it is
    required). As there, ``distill_scale`` left at 1.0 becomes the number of modules, so the
    term weighs like the cross-entropy. This form replaces the logit term: the fields
    ``temperature``, ``hardness``, ``hidden_weight`` and ``teacher_layer`` cannot be combined
    with it::

        finetuning_stage:
          distillation_modifiers:
            OutputDistillationModifier:
              targets: ["re:model.layers.\\d+$"]
              comparison: square_head
              start: 0
              orig_scale: 1.0
              distill_scale: 1.0

    :param targets: modules whose outputs are distilled (names, class names or ``re:``
        patterns, matched in the student and looked up by name in the teacher)
    :param comparison: ``square_head`` (with ``targets``)
    :param orig_scale: weight of the task loss (with ``targets``)
    :param distill_scale: weight of the layer-wise term (with ``targets``)
    """

    temperature: float = Field(default=2.0, gt=0)
    hardness: float = Field(default=1.0, ge=0, le=1)
    hidden_weight: float = Field(default=0.0, ge=0)
    teacher_layer: list[int] | None = None
    targets: list[MatchPattern] | None = None
    comparison: str | None = None
    orig_scale: float = Field(default=1.0, ge=0)
    distill_scale: float = Field(default=1.0, ge=0)

    _student_logits: torch.Tensor | None = PrivateAttr(default=None)
    _student_hidden: dict[int, torch.Tensor] = PrivateAttr(default_factory=dict)
    _student_outputs: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)
    _target_names: list[str] = PrivateAttr(default_factory=list)
    _teacher_targets: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _one_form(self) -> OutputDistillationModifier:
        layerwise = ("targets", "comparison", "orig_scale", "distill_scale")
        ours = ("temperature", "hardness", "hidden_weight", "teacher_layer")
        if self.targets is None:
            given = sorted(set(layerwise) & self.model_fields_set)
            if given:
                raise ValueError(
                    f"{given}: llm-compressor's layer-wise distillation fields need targets "
                    "(the modules whose outputs are compared, e.g. ['re:model.layers.\\d+$'])"
                )
            return self
        if not self.targets:
            raise ValueError("targets: empty; name the modules whose outputs are compared")
        mixed = sorted(set(ours) & self.model_fields_set)
        if mixed:
            raise ValueError(
                f"{mixed} cannot be combined with targets: with targets the loss is "
                "llm-compressor's orig_scale * task loss + distill_scale * layer-wise term; "
                "without them it is ours (logits, optional hidden states)"
            )
        if self.comparison != "square_head":
            raise ValueError(
                f"comparison: got {self.comparison!r}; with targets, the supported "
                "comparison is 'square_head' (llm-compressor's default, kl_divergence, "
                "compares raw layer outputs as if they were probabilities and is not "
                "supported)"
            )
        return self

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
        if self.targets is not None:
            self._target_names = self._check_targets(state)
        state.teacher_model.eval()
        for param in state.teacher_model.parameters():
            param.requires_grad_(False)

    def _check_targets(self, state: State) -> list[str]:
        """The student modules ``targets`` names, each present in the teacher too."""
        assert self.targets is not None and state.teacher_model is not None
        names = [
            name
            for name, module in state.model.named_modules()
            if name and any(is_match(name, module, target) for target in self.targets)
        ]
        if not names:
            raise ValueError(
                f"targets {self.targets} match no module of {type(state.model).__name__}"
            )
        teacher = dict(state.teacher_model.named_modules())
        missing = [name for name in names if name not in teacher]
        if missing:
            raise ValueError(
                f"targets {self.targets}: the teacher has no module {missing[:3]} "
                f"(of {len(missing)}); student and teacher modules are paired by name"
            )
        self._target_names = names
        self._teacher_targets = {name: teacher[name] for name in names}
        scale = self._layerwise_scale()
        logger.info(
            "OutputDistillationModifier: square-head distillation of {} modules ({} ...), "
            "loss = {} * task + {} * mean layer term{}",
            len(names),
            names[0],
            self.orig_scale,
            scale,
            " (distill_scale 1.0 becomes the number of modules, as in llm-compressor)"
            if scale != self.distill_scale
            else "",
        )
        return names

    def _layerwise_scale(self) -> float:
        return float(len(self._target_names)) if self.distill_scale == 1.0 else self.distill_scale

    def on_start(self, state: State, event: Event) -> None:
        if self.targets is not None:
            modules = dict(state.model.named_modules())
            for name in self._target_names:
                self.register_hook(
                    modules[name], self._keep_output(self._student_outputs, name), "forward"
                )
            return

        def keep_logits(_module: Any, _args: Any, output: Any) -> None:
            self._student_logits = output.logits if hasattr(output, "logits") else output[0]

        self.register_hook(state.model, keep_logits, "forward")
        if self.hidden_weight > 0:
            _, layers = find_decoder_layers(state.model)
            for index, layer in enumerate(layers):
                self.register_hook(layer, self._keep_hidden(self._student_hidden, index), "forward")

    @staticmethod
    def _keep_output(store: dict[str, torch.Tensor], name: str):
        def hook(_module: Any, _args: Any, output: Any) -> None:
            store[name] = output[0] if isinstance(output, tuple) else output

        return hook

    @staticmethod
    def _keep_hidden(store: dict[int, torch.Tensor], index: int):
        def hook(_module: Any, _args: Any, output: Any) -> None:
            store[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def on_event(self, state: State, event: Event) -> None:
        if event.type_ != EventType.LOSS_CALCULATED or not self.started or self.ended:
            return
        if self.targets is not None:
            self._layerwise_loss(state)
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

    def _layerwise_loss(self, state: State) -> None:
        missing = [name for name in self._target_names if name not in self._student_outputs]
        if missing:
            raise RuntimeError(
                f"OutputDistillationModifier saw no student output of {missing[:3]} before "
                "loss_calculated"
            )
        batch = self._batch(state)
        teacher: dict[str, torch.Tensor] = {}
        handles = [
            module.register_forward_hook(self._keep_output(teacher, name))
            for name, module in self._teacher_targets.items()
        ]
        try:
            with torch.no_grad():
                state.teacher_model(**{k: v for k, v in batch.items() if k != "labels"})  # type: ignore[misc]
        finally:
            for handle in handles:
                handle.remove()
        mask = batch.get("attention_mask")
        pairs = [(self._student_outputs[name], teacher[name]) for name in self._target_names]
        distill = square_head_loss(pairs, None if mask is None else mask == 1)
        state.loss = self.orig_scale * state.loss + self._layerwise_scale() * distill
        self._student_outputs.clear()

    @staticmethod
    def _batch(state: State) -> dict[str, Any]:
        batch = state.batch_data
        if not isinstance(batch, dict):
            raise TypeError(
                "OutputDistillationModifier needs the batch as a dict of model inputs "
                f"(session.batch_start(batch_data=...)), got {type(batch).__name__}"
            )
        return batch

    @torch.no_grad()
    def _run_teacher(self, state: State) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        batch = self._batch(state)
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
