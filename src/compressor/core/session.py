"""The session: holds the state and the modifiers and dispatches every event to them."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from loguru import logger

from compressor.core.events import Event, EventType
from compressor.core.lifecycle import Lifecycle
from compressor.core.state import State
from compressor.utils.fsdp import check_fully_sharded, fully_sharded_modules
from compressor.utils.sharding import gather_sharded_model

__all__ = ["CompressionSession", "active_session", "create_session"]

RecipeResolver = Callable[[Any], Any]
FinalizeStep = Callable[["CompressionSession"], None]


class CompressionSession:
    """Runs a recipe's modifiers over a training or calibration run.

    Call ``initialize`` once, then one method per event, then ``finalize``. The session owns
    the counters: every event it sends carries ``global_step`` (optimizer steps) and
    ``global_batch`` (batches). When an optimizer is given, OPTIM_PRE_STEP and
    OPTIM_POST_STEP fire around ``optimizer.step()`` through torch's step hooks, unless
    ``watch_optimizer=False``: then the caller (a Trainer callback) sends them itself.
    ``state_dict()`` / ``load_state_dict()`` save and restore the counters and every
    modifier's state, so a resumed run continues its schedule.

    The session knows modifiers only by their lifecycle methods, and a recipe only as an
    object with a ``modifiers`` list. The package root (``compressor/__init__.py``, which may
    import every layer) plugs in what belongs to higher layers: ``recipe_resolver`` turns the
    forms a user passes (a path, a dict, a list of modifiers) into a Recipe, and
    ``finalize_steps`` run after every successful ``finalize`` (the checkpoint layer's
    compressed ``save_pretrained``).
    """

    recipe_resolver: ClassVar[RecipeResolver | None] = None
    finalize_steps: ClassVar[list[FinalizeStep]] = []

    def __init__(self) -> None:
        self.state: State | None = None
        self.recipe: Any = None
        self._lifecycle: Lifecycle | None = None
        self._optim_handles: list[Any] = []
        self._finalized = False
        self._fully_sharded_at_initialize = False

    # ---------------------------------------------------------------- properties
    @property
    def modifiers(self) -> list[Any]:
        return list(self.recipe.modifiers) if self.recipe is not None else []

    @property
    def initialized(self) -> bool:
        return self._lifecycle is not None

    @property
    def finalized(self) -> bool:
        return self._finalized

    @property
    def event(self) -> Event:
        """The current counters (still readable after finalize)."""
        if self._lifecycle is None:
            raise RuntimeError("session is not initialized: call initialize(model, recipe) first")
        return self._lifecycle.event

    @property
    def last_event(self) -> EventType | None:
        """The type of the last event sent (None right after initialize)."""
        if self._lifecycle is None:
            raise RuntimeError("session is not initialized: call initialize(model, recipe) first")
        return self._lifecycle.last

    # ---------------------------------------------------------------- setup
    def initialize(
        self,
        model: torch.nn.Module,
        recipe: Any,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        watch_optimizer: bool = True,
        teacher_model: torch.nn.Module | None = None,
        steps_per_epoch: int | None = None,
        batches_per_step: int | None = None,
        start: float | None = None,
        batches: Iterable[Any] = (),
    ) -> State:
        """Attach a recipe to a model and initialize every modifier.

        :param model: the model to compress
        :param recipe: a Recipe, a list of Modifier objects, a dict, a ``pathlib.Path``, or a
            str: resolved by ``recipe_resolver`` (the package root plugs in
            ``compressor.recipe.resolve_recipe``, the same rules as ``oneshot``: a str naming
            an existing file is that file, a str with a newline is YAML text, any other str
            is refused with both readings shown)
        :param optimizer: the training optimizer; its steps then advance the schedule
        :param watch_optimizer: fire the optimizer events from torch's step hooks; False when
            the caller sends them itself with ``optim_pre_step`` / ``optim_post_step``
        :param teacher_model: the teacher for distillation modifiers
        :param steps_per_epoch: optimizer steps per epoch; offsets are then in epochs
        :param batches_per_step: batches per optimizer step (gradient accumulation)
        :param start: the step (or epoch) the run starts at, for resumed runs
        :param batches: training data the INITIALIZE event offers modifiers that optimise on
            data when they start (``Event.batches``; a Trainer's train dataloader)
        :return: the state the modifiers share
        """
        if self._lifecycle is not None:
            raise RuntimeError("session is already initialized; call finalize() or use a new one")
        if model is None:
            raise ValueError("model is required")
        if isinstance(model, torch.nn.Module):
            check_fully_sharded(model)  # FSDP2 layouts not supported: refused before any work
            self._fully_sharded_at_initialize = bool(fully_sharded_modules(model))
        self.recipe = self._resolve_recipe(recipe)
        state = self._create_state_and_lifecycle(
            model,
            optimizer=optimizer,
            watch_optimizer=watch_optimizer,
            teacher_model=teacher_model,
            steps_per_epoch=steps_per_epoch,
            batches_per_step=batches_per_step,
            start=start,
        )
        initialized = self._initialize_modifiers(batches)
        logger.info(
            "session initialized with {} modifier(s): {}",
            len(initialized),
            ", ".join(type(m).__name__ for m in initialized) or "none",
        )
        return state

    def _create_state_and_lifecycle(
        self,
        model: torch.nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None,
        watch_optimizer: bool,
        teacher_model: torch.nn.Module | None,
        steps_per_epoch: int | None,
        batches_per_step: int | None,
        start: float | None,
    ) -> State:
        """The state the modifiers share and the counters of the run (see ``initialize``
        for the parameters); the optimizer's steps are watched from here on."""
        self.state = State().update(model=model, teacher_model=teacher_model, optimizer=optimizer)
        self._lifecycle = Lifecycle(
            steps_per_epoch=steps_per_epoch,
            batches_per_step=batches_per_step,
            start=start,
            counts_optimizer_steps=optimizer is not None,
        )
        if optimizer is not None and watch_optimizer:
            self._watch_optimizer(optimizer)
        return self.state

    def _initialize_modifiers(self, batches: Iterable[Any] = ()) -> list[Any]:
        """Initialize the recipe's modifiers in order, at the INITIALIZE event.

        When one fails, the ones already initialized are finalized, the optimizer is no
        longer watched and the session is left uninitialized, then the error propagates.

        :return: the modifiers initialized (all of them)
        """
        assert self.state is not None and self._lifecycle is not None
        event = self._lifecycle.event.new_instance(type_=EventType.INITIALIZE, batches=batches)
        initialized: list[Any] = []
        try:
            for modifier in self.recipe.modifiers:
                modifier.initialize(self.state, event)
                initialized.append(modifier)
        except BaseException:
            self._roll_back_initialize(initialized)
            raise
        return initialized

    def _roll_back_initialize(self, initialized: list[Any]) -> None:
        for modifier in initialized:
            with contextlib.suppress(Exception):  # the initialize error is the one to raise
                modifier.finalize(self.state)
        self._unwatch_optimizer()
        self._lifecycle = None

    @classmethod
    def _resolve_recipe(cls, recipe: Any) -> Any:
        if cls.recipe_resolver is not None:
            return cls.recipe_resolver(recipe)
        if not isinstance(getattr(recipe, "modifiers", None), list):
            raise TypeError(f"recipe must have a list of modifiers, got {type(recipe).__name__}")
        return recipe

    def _watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        def pre(_opt: Any, _args: Any, _kwargs: Any) -> None:
            self._dispatch(EventType.OPTIM_PRE_STEP)

        def post(_opt: Any, _args: Any, _kwargs: Any) -> None:
            self._dispatch(EventType.OPTIM_POST_STEP)

        self._optim_handles = [
            optimizer.register_step_pre_hook(pre),
            optimizer.register_step_post_hook(post),
        ]

    def _unwatch_optimizer(self) -> None:
        while self._optim_handles:
            self._optim_handles.pop().remove()

    # ---------------------------------------------------------------- events
    def _require_lifecycle(self) -> Lifecycle:
        if self._lifecycle is None:
            raise RuntimeError("session is not initialized: call initialize(model, recipe) first")
        if self._finalized:
            raise RuntimeError("session is finalized: create a new session for another run")
        return self._lifecycle

    def _dispatch(
        self,
        type_: EventType,
        global_step: int | None = None,
        modules: tuple[torch.nn.Module, ...] = (),
        only: Sequence[Any] | None = None,
        batches: Iterable[Any] | None = None,
    ) -> Event:
        event = self._require_lifecycle().advance(type_, global_step=global_step)
        if modules:
            event = event.new_instance(modules=modules)
        if batches is not None:
            event = event.new_instance(batches=batches)
        assert self.state is not None and self.recipe is not None
        for modifier in self.recipe.modifiers:
            if only is None or any(modifier is chosen for chosen in only):
                modifier.update_event(self.state, event)
        return event

    def batch_start(self, batch_data: Any = None, *, global_step: int | None = None) -> Event:
        """A batch begins; ``global_step`` lets a trainer impose its own count."""
        if batch_data is not None:
            self._require_state().batch_data = batch_data
        return self._dispatch(EventType.BATCH_START, global_step)

    def loss_calculated(self, loss: Any) -> Any:
        """The loss is known; returns it, possibly changed by modifiers (distillation)."""
        self._require_state().loss = loss
        self._dispatch(EventType.LOSS_CALCULATED)
        return self._require_state().loss

    def optim_pre_step(self, *, global_step: int | None = None) -> Event:
        """Before the optimizer steps; only for optimizers the session does not watch."""
        self._require_unwatched("optim_pre_step")
        return self._dispatch(EventType.OPTIM_PRE_STEP, global_step)

    def optim_post_step(self, *, global_step: int | None = None) -> Event:
        """After the optimizer steps; only for optimizers the session does not watch.

        :param global_step: the step count after this step (the session adds one otherwise)
        """
        self._require_unwatched("optim_post_step")
        return self._dispatch(EventType.OPTIM_POST_STEP, global_step)

    def _require_unwatched(self, name: str) -> None:
        if self._optim_handles:
            raise RuntimeError(
                f"{name}() was called, but the session watches the optimizer and sends this "
                "event by itself; initialize with watch_optimizer=False to send it yourself"
            )

    def batch_end(self, *, global_step: int | None = None) -> Event:
        """A batch ended; ``global_step`` lets a trainer impose its own count."""
        return self._dispatch(EventType.BATCH_END, global_step)

    def calibration_epoch_start(self, batches: Sequence[Any] = ()) -> Event:
        """Calibration begins; ``batches`` (the pipeline's calibration data) reach modifiers
        that optimise on the data before the others calibrate (``Event.batches``)."""
        return self._dispatch(EventType.CALIBRATION_EPOCH_START, batches=batches)

    def sequential_epoch_end(
        self,
        modules: torch.nn.Module | Sequence[torch.nn.Module] = (),
        only: Sequence[Any] | None = None,
    ) -> Event:
        """One part of the model (a decoder layer, a stage of one) finished calibrating.

        :param modules: the module or modules just calibrated, which the event carries
            (``Event.modules``) to the modifiers that compress them now
        :param only: the recipe's modifiers that calibrated it (all when None): a pipeline
            that calibrates some modifiers before the others sends each group its own event
        """
        if isinstance(modules, torch.nn.Module):
            modules = (modules,)
        return self._dispatch(EventType.SEQUENTIAL_EPOCH_END, modules=tuple(modules), only=only)

    def calibration_epoch_end(self) -> Event:
        return self._dispatch(EventType.CALIBRATION_EPOCH_END)

    def finalize(self) -> State:
        """Finalize every modifier (all of them, even when one fails) and detach.

        A tensor-parallel model (DTensor parameters, ``parallelize_module``) is first gathered
        into an ordinary model on every rank (``utils.sharding.gather_sharded_model``), so that
        the modifiers finalize (scales, masks, compressed-tensors quantization) on whole
        weights exactly as in one process, and the model saves and reloads as one. A model
        sharded with FSDP2 (``fully_shard``) is released from FSDP2 and gathered the same
        way; one that ``fully_shard`` reached only after ``initialize`` is refused here (its
        modifiers set up their hooks and parametrizations for an unsharded model).
        """
        self._require_lifecycle()
        state = self._require_state()
        assert self.recipe is not None
        if state.model is not None:
            self._check_not_sharded_since_initialize(state.model)
            gather_sharded_model(state.model)
        errors: list[BaseException] = []
        for modifier in self.recipe.modifiers:
            try:
                modifier.finalize(state)
            except Exception as err:  # finalize the others, then raise the first
                errors.append(err)
        self._unwatch_optimizer()
        self._finalized = True
        if errors:
            raise errors[0]
        for step in self.finalize_steps:
            step(self)
        logger.info("session finalized")
        return state

    def _check_not_sharded_since_initialize(self, model: torch.nn.Module) -> None:
        sharded = fully_sharded_modules(model)
        if sharded and not self._fully_sharded_at_initialize:
            raise ValueError(
                f"{sharded[0][0] or 'the model'} was sharded with FSDP2 (fully_shard) "
                "after the compression session was initialized, which is not supported: the "
                "modifiers set up quantization-aware training and masks for an unsharded "
                "model; apply fully_shard first, then build the optimizer and initialize the "
                "session"
            )

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The counters and each modifier's ``state_dict()``, for a checkpoint."""
        event = self.event
        return {
            "global_step": event.global_step,
            "global_batch": event.global_batch,
            "modifiers": [
                {"type": type(m).__name__, "state": m.state_dict()} for m in self.modifiers
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict()`` saved into this initialized session (same recipe)."""
        lifecycle = self._require_lifecycle()
        saved = state_dict.get("modifiers")
        if not isinstance(saved, list):
            raise ValueError("session state_dict has no 'modifiers' list")
        names = [type(m).__name__ for m in self.modifiers]
        saved_names = [entry.get("type") for entry in saved]
        if saved_names != names:
            raise ValueError(
                f"session state_dict was saved for modifiers {saved_names}, but this recipe "
                f"has {names}; resume with the recipe the checkpoint was trained with"
            )
        for modifier, entry in zip(self.modifiers, saved, strict=True):
            modifier.load_state_dict(entry.get("state", {}))
        lifecycle.set_counters(int(state_dict["global_step"]), int(state_dict["global_batch"]))

    def _require_state(self) -> State:
        self._require_lifecycle()
        assert self.state is not None
        return self.state


_local = threading.local()
_default_lock = threading.Lock()
_default: dict[str, CompressionSession] = {}


def active_session() -> CompressionSession:
    """The session of this thread's innermost ``create_session`` block, else a shared one."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    with _default_lock:
        if "session" not in _default:
            _default["session"] = CompressionSession()
        return _default["session"]


@contextlib.contextmanager
def create_session() -> Iterator[CompressionSession]:
    """A fresh session, active for this thread inside the block."""
    session = CompressionSession()
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(session)
    try:
        yield session
    finally:
        stack.pop()
