"""Training-aware compression with the Hugging Face ``Trainer``.

``CompressionCallback`` runs a recipe's modifiers during ``Trainer.train()``; offsets count
optimizer steps (or epochs). ``CompressionTrainer`` (or ``CompressionTrainerMixin`` for your own
Trainer subclass) also emits LOSS_CALCULATED, for modifiers that change the loss.

When each Trainer callback fires (transformers 5.x ``Trainer._run_epoch``), for one optimizer
step of ``gradient_accumulation_steps`` micro-batches, and the events they become::

    on_step_begin                       -> BATCH_START   (first micro-batch)
      compute_loss (CompressionTrainer) -> LOSS_CALCULATED
    on_substep_end (each micro-batch    -> BATCH_END, BATCH_START (the next micro-batch)
                    but the last)
      compute_loss                      -> LOSS_CALCULATED
    on_pre_optimizer_step               -> OPTIM_PRE_STEP
    optimizer.step()
    on_optimizer_step                   -> OPTIM_POST_STEP (carries global_step + 1: the
                                           Trainer counts the step right after this callback)
    on_step_end                         -> BATCH_END

so every micro-batch is one BATCH_START .. BATCH_END pair, ``global_batch`` counts
micro-batches, ``global_step`` counts optimizer steps, and the events match those of a plain
loop with the same accumulation.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from loguru import logger
from torch.nn.utils import parametrize
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from compressor.core.events import EventType
from compressor.core.session import CompressionSession
from compressor.recipe import resolve_recipe
from compressor.utils import distributed
from compressor.utils.optim import add_param_group, extend_lr_scheduler
from compressor.utils.sharding import has_sharded_parameters

__all__ = [
    "COMPRESSOR_STATE_NAME",
    "CompressionCallback",
    "CompressionTrainer",
    "CompressionTrainerMixin",
]

COMPRESSOR_STATE_NAME = "compressor_state.pt"
_OFFSETS = ("steps", "epochs")


class CompressionCallback(TrainerCallback):
    """Runs a recipe during ``Trainer.train()``: ``Trainer(..., callbacks=[callback])``.

    **Lifecycle**

    - ``on_init_end`` (the Trainer built with this callback) and ``on_train_begin``: a model
      sharded with DTensors (FSDP2 ``fully_shard``, tensor parallelism) is refused
      (``_refuse_sharded_model``)
    - ``on_train_begin``: a new session is initialized with the model, the optimizer (whose
      events this callback sends), ``batches_per_step`` = gradient accumulation steps and,
      with ``offsets="epochs"``, ``steps_per_epoch``, and the train dataloader (read by
      modifiers that learn from data when they start: learned rotations); parameters the
      modifiers added join the optimizer; a resumed run restores the modifiers' state from
      the checkpoint
    - each step: BATCH_START / OPTIM_PRE_STEP / OPTIM_POST_STEP / BATCH_END carrying the
      Trainer's ``global_step`` (see the module docstring for the exact order)
    - ``on_save``: the session's state goes to ``compressor_state.pt`` in the checkpoint
    - ``on_train_end``: the session finalizes; the model is in its compressed form and
      ``trainer.save_model()`` writes it

    :param recipe: a Recipe, a list of modifiers, a dict or a ``pathlib.Path`` to YAML
    :param teacher_model: the teacher for distillation modifiers
    :param offsets: ``steps`` (optimizer steps) or ``epochs``
    :param resume_from: the checkpoint folder to restore the modifiers from, only needed with
        a plain ``Trainer`` resuming from a checkpoint outside ``args.output_dir``
        (``CompressionTrainer.train(resume_from_checkpoint=...)`` tells the callback itself)
    """

    def __init__(
        self,
        recipe: Any,
        teacher_model: torch.nn.Module | None = None,
        offsets: Literal["steps", "epochs"] = "steps",
        resume_from: str | os.PathLike[str] | None = None,
    ) -> None:
        if offsets not in _OFFSETS:
            raise ValueError(f"offsets must be one of {', '.join(_OFFSETS)}; got {offsets!r}")
        self._recipe = resolve_recipe(recipe)
        self.teacher_model = teacher_model
        self.offsets = offsets
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.session: CompressionSession | None = None
        self._checkpoint_hint: Path | None = None  # set by CompressionTrainer.train
        self._known_params: set[int] = set()
        self._grad_hooks: list[Any] = []
        self._model: torch.nn.Module | None = None
        self._optimizer: Any = None
        self._lr_scheduler: Any = None
        # set by CompressionTrainerMixin: loads the checkpoint's optimizer and scheduler state
        # once the modifiers' parameter groups exist
        self._deferred_optimizer_load: Callable[[], None] | None = None

    @property
    def modifiers(self) -> list[Any]:
        """The modifiers of the current (or last) training run."""
        return self.session.modifiers if self.session is not None else []

    @property
    def active(self) -> bool:
        """Whether a session is running (between train begin and train end)."""
        return self.session is not None and not self.session.finalized

    # ---------------------------------------------------------------- begin
    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is not None:
            _refuse_sharded_model(model)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.active:
            raise RuntimeError("CompressionCallback: training began while a run was still active")
        if model is None or optimizer is None:
            raise ValueError("CompressionCallback needs the Trainer's model and optimizer")
        _refuse_sharded_model(model)
        accumulation = args.gradient_accumulation_steps
        steps_per_epoch = None
        if self.offsets == "epochs":
            steps_per_epoch = _steps_per_epoch(train_dataloader, accumulation)
        start: float | None = None
        if state.global_step > 0:
            start = state.global_step / steps_per_epoch if steps_per_epoch else state.global_step
        self._model, self._optimizer, self._lr_scheduler = model, optimizer, lr_scheduler
        self._known_params = {id(p) for p in model.parameters()}
        # a fresh copy of the recipe for every run: modifiers keep runtime state
        recipe = copy.deepcopy(self._recipe)
        self.session = CompressionSession()
        self.session.initialize(
            model=model,
            recipe=recipe,
            optimizer=optimizer,
            watch_optimizer=False,
            teacher_model=self.teacher_model,
            steps_per_epoch=steps_per_epoch,
            batches_per_step=accumulation,
            start=start,
            # offered to modifiers that learn from data when they start (learned rotations)
            batches=train_dataloader if train_dataloader is not None else (),
        )
        if state.global_step > 0:
            self._restore(args, state.global_step)
        self._sync_parameters()
        if self._deferred_optimizer_load is not None:
            load, self._deferred_optimizer_load = self._deferred_optimizer_load, None
            load()
        logger.info(
            "compression callback: {} modifier(s), offsets in {}, {} batch(es) per step{}",
            len(self.session.modifiers),
            self.offsets,
            accumulation,
            f", {steps_per_epoch} step(s) per epoch" if steps_per_epoch else "",
        )

    def _restore(self, args: TrainingArguments, global_step: int) -> None:
        folder = (
            self.resume_from
            or self._checkpoint_hint
            or Path(args.output_dir) / f"checkpoint-{global_step}"
        )
        path = folder / COMPRESSOR_STATE_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"resuming at step {global_step}, but {path} does not exist: the checkpoint was "
                "not saved with a CompressionCallback, or it lies outside args.output_dir "
                "(then pass CompressionCallback(..., resume_from=checkpoint_folder))"
            )
        assert self.session is not None
        self.session.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logger.info("compression state restored from {} at step {}", path, global_step)

    def _sync_parameters(self) -> None:
        """Give parameters that modifiers added since the last call to the optimizer.

        Under several processes, DDP (which wrapped the model before) does not know them: every
        rank starts from rank 0's values, and each backward pass averages their gradients over
        the ranks (before the Trainer clips the gradient norm, so every rank clips alike).
        """
        assert self._model is not None
        new = [p for p in self._model.parameters() if id(p) not in self._known_params]
        self._known_params.update(id(p) for p in new)
        trainable = [p for p in new if p.requires_grad]
        # a modifier may have added its parameters to the optimizer itself; either way the
        # learning-rate schedule must cover every group
        add_param_group(self._optimizer, trainable, self._lr_scheduler)
        extend_lr_scheduler(self._optimizer, self._lr_scheduler)
        if not trainable:
            return
        if distributed.is_distributed():
            distributed.broadcast_(trainable)
            for param in trainable:
                self._grad_hooks.append(param.register_hook(_average_over_ranks))
        logger.info("{} parameter(s) added by modifiers are trained", len(trainable))

    # ---------------------------------------------------------------- steps
    def _require_session(self) -> CompressionSession:
        if self.session is None or self.session.finalized:
            raise RuntimeError("CompressionCallback: an event arrived outside train()")
        return self.session

    def on_step_begin(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        self._require_session().batch_start(global_step=state.global_step)
        self._sync_parameters()

    def on_substep_end(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        session = self._require_session()
        session.batch_end(global_step=state.global_step)
        session.batch_start(global_step=state.global_step)
        self._sync_parameters()

    def on_pre_optimizer_step(
        self, args: Any, state: TrainerState, control: Any, **kwargs: Any
    ) -> None:
        self._require_session().optim_pre_step(global_step=state.global_step)

    def on_optimizer_step(
        self, args: Any, state: TrainerState, control: Any, **kwargs: Any
    ) -> None:
        self._require_session().optim_post_step(global_step=state.global_step + 1)

    def on_step_end(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        self._require_session().batch_end(global_step=state.global_step)

    def on_epoch_end(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        self._close_open_batch(state)

    def _close_open_batch(self, state: TrainerState) -> None:
        # a micro-batch opened by on_substep_end whose epoch ended before it ran
        # (an iterable dataset that ran out, or a callback that stopped the epoch)
        session = self.session
        if session is not None and not session.finalized and session.last_event in _OPEN:
            session.batch_end(global_step=state.global_step)

    # ---------------------------------------------------------------- save and end
    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: Any, **kw: Any
    ) -> None:
        if not self.active or not args.should_save:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            logger.warning("no checkpoint folder {} to save the compression state in", folder)
            return
        assert self.session is not None
        torch.save(self.session.state_dict(), folder / COMPRESSOR_STATE_NAME)

    def on_train_end(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        if not self.active:
            return
        self._close_open_batch(state)
        assert self.session is not None
        try:
            self.session.finalize()
        finally:
            while self._grad_hooks:
                self._grad_hooks.pop().remove()


_OPEN = (EventType.BATCH_START, EventType.LOSS_CALCULATED)


def _refuse_sharded_model(model: torch.nn.Module) -> None:
    """Refuse a model whose parameters are DTensors (FSDP2 ``fully_shard`` or tensor
    parallelism, applied before the Trainer or by it), when the Trainer is built and again
    when training begins.

    On CPU (gloo) neither accelerate nor transformers trains such a model: accelerate ignores
    the Trainer's FSDP options on CPU and wraps the model in DistributedDataParallel, which
    fails on DTensors. On GPUs the Trainer's own FSDP2 is untested with this callback, whose
    handling of the parameters modifiers add (broadcast, gradients averaged over the ranks)
    is DDP's. Sharded training runs with a ``CompressionSession`` in your own loop
    (docs/distributed.md).

    :raises ValueError: naming the model and what is unsupported
    """
    if has_sharded_parameters(model):
        raise ValueError(
            "model: its parameters are DTensors (sharded with FSDP2 fully_shard or tensor "
            "parallelism), which the Hugging Face Trainer with CompressionCallback does not "
            "support: on CPU the Trainer wraps the model in DistributedDataParallel, which "
            "cannot take DTensors, and its FSDP options are ignored there; its FSDP2 on GPUs "
            "is untested with this callback. Train a sharded model with CompressionSession "
            "in your own loop (docs/distributed.md), or give the Trainer the unsharded model "
            "(DDP)"
        )


def _average_over_ranks(grad: torch.Tensor) -> torch.Tensor:
    return distributed.all_reduce_(grad.clone(), "mean")


def _steps_per_epoch(train_dataloader: Any, accumulation: int) -> int:
    """Optimizer steps per epoch, as the Trainer counts them."""
    try:
        batches = len(train_dataloader)
    except TypeError:
        raise ValueError(
            "offsets='epochs' needs a train dataloader with a length (an iterable dataset has "
            "no epochs); use offsets='steps'"
        ) from None
    return max(math.ceil(batches / accumulation), 1)


class CompressionTrainerMixin:
    """What a Trainer needs beyond the callback for every modifier. Mix it in before your
    Trainer class: ``class MyTrainer(CompressionTrainerMixin, Trainer)``; a
    ``CompressionCallback`` must be among the Trainer's callbacks.

    - Loss: ``compute_loss`` emits LOSS_CALCULATED, for modifiers that change the loss
      (distillation). The batch reaches modifiers as ``state.batch_data`` before the forward
      pass, and the loss they return is the one the Trainer back-propagates. Evaluation
      losses are left alone.
    - Checkpoints during training: weights that modifiers parametrize (fake quantization,
      TopK scores) are saved under their own names with their latent values, so a checkpoint
      loads into the plain model when training resumes.
    - Resuming: the checkpoint's optimizer and learning-rate scheduler state is loaded after
      the callback has restored the modifiers and given their parameters (TopK scores) to the
      optimizer, so the saved parameter groups, Adam moments included, match the optimizer's.
      (A plain ``Trainer`` loads it before the callback runs, and fails when modifiers added
      parameter groups: resume such runs with this mixin.)
    - ``save_model`` after training: a quantized model is written in compressed-tensors
      format (``compressor.checkpoint.compressed.save_compressed``), which reloads with
      ``from_pretrained``.
    """

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        callback = self._compression_callback()
        training = model.training and callback.active
        if training:
            assert callback.session is not None and callback.session.state is not None
            callback.session.state.batch_data = inputs
        loss, outputs = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if training:
            assert callback.session is not None
            loss = callback.session.loss_calculated(loss)
        return (loss, outputs) if return_outputs else loss

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; a checkpoint folder given here is where the callback finds the
        modifiers' state."""
        callback = self._compression_callback()
        callback._checkpoint_hint = (
            Path(resume_from_checkpoint)
            if isinstance(resume_from_checkpoint, str | os.PathLike)
            else None
        )
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        load = super()._load_optimizer_and_scheduler  # type: ignore[misc]
        self._compression_callback()._deferred_optimizer_load = lambda: load(checkpoint)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.model  # type: ignore[attr-defined]
        args = self.args  # type: ignore[attr-defined]
        if state_dict is None and _is_parametrized(model):
            state_dict = latent_state_dict(model)
        callback = self._compression_callback()
        if state_dict is None and not callback.active and _is_quantized(model):
            if args.should_save:
                from compressor.checkpoint.compressed import save_compressed

                recipe = callback.session.recipe if callback.session is not None else None
                save_compressed(
                    model,
                    output_dir or args.output_dir,
                    recipe=recipe,
                    tokenizer=self.processing_class,  # type: ignore[attr-defined]
                )
            return
        super()._save(output_dir, state_dict=state_dict)  # type: ignore[misc]

    def _compression_callback(self) -> CompressionCallback:
        handler = self.callback_handler  # type: ignore[attr-defined]
        found = [cb for cb in handler.callbacks if isinstance(cb, CompressionCallback)]
        if len(found) != 1:
            raise RuntimeError(
                f"{type(self).__name__} needs exactly one CompressionCallback in callbacks; "
                f"found {len(found)}"
            )
        return found[0]


def _is_parametrized(model: torch.nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())


def _is_quantized(model: torch.nn.Module) -> bool:
    from compressed_tensors.quantization.utils import is_model_quantized

    return bool(is_model_quantized(model))


def latent_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with parametrized tensors under their plain names, holding the
    latent (un-parametrized) values; tensors owned by the parametrizations themselves (such as
    TopK scores) are left out: modifiers save those in their own ``state_dict``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".parametrizations." not in key:
            out[key] = value
            continue
        prefix, rest = key.split(".parametrizations.", 1)
        name, _, tail = rest.partition(".")
        if tail == "original":
            out[f"{prefix}.{name}"] = value
    return out


class CompressionTrainer(CompressionTrainerMixin, Trainer):
    """A ``Trainer`` whose loss passes through the recipe (LOSS_CALCULATED)."""
