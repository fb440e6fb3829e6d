"""SpinQuantModifier: R1 and R2 rotations fused into the weights, ahead of quantization."""

from __future__ import annotations

from typing import Any, Literal

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme
from compressed_tensors.utils import (
    TorchDtype,
    get_head_dim,
    match_modules_set,
    match_named_modules,
)
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator

from compressor.core.events import Event
from compressor.core.state import State
from compressor.modifiers.base import CalibrationTraits, Modifier
from compressor.modifiers.quantization.kv_cache import kv_cache_scheme_of
from compressor.modifiers.transform.spinquant.apply import (
    apply_fused_transforms,
    check_fused_config,
)
from compressor.modifiers.transform.spinquant.centring import (
    centre_residual_writers,
    check_centrable,
    fuse_layer_norm_into_linears,
    is_layer_norm,
    ones_preserving,
    rotate_norm_bias,
)
from compressor.modifiers.transform.spinquant.fusion import (
    fuse_norm_into_linears,
    untie_word_embeddings,
)
from compressor.modifiers.transform.spinquant.learned import (
    LearnedRotations,
    check_learning_arguments,
    learn_and_fuse,
)
from compressor.modifiers.transform.spinquant.mappings import (
    NormMapping,
    SpinQuantMapping,
    infer_mapping_from_model,
    infer_norm_mappings_from_model,
)
from compressor.modifiers.transform.spinquant.matrices import hadamard_supported, rotation_matrix
from compressor.modifiers.transform.spinquant.online import (
    check_online_scheme,
    is_online_scheme,
    online_hadamard_type,
    r4_scheme,
    split_transform_config,
)
from compressor.modifiers.transform.spinquant.online_attention import (
    apply_online_rotations,
    is_r3_scheme,
    r3_scheme,
)
from compressor.modifiers.transform.spinquant.rotated_model import LoopQuantizers
from compressor.utils.finite import check_finite_weights

__all__ = ["SpinQuantModifier"]

_ROTATIONS = ("R1", "R2", "R3", "R4")
_PRECISIONS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@Modifier.register("SpinQuant")
class SpinQuantModifier(Modifier):
    """Rotate the residual stream (R1) and each attention head's values (R2) by orthogonal
    matrices fused into the weights, so that outliers spread out and quantization loses less,
    at no runtime cost, and optionally down_proj's input (R4) by a Hadamard applied at runtime.
    Without quantization the model computes the same function.

    Paper: Liu et al. 2024, "SpinQuant: LLM quantization with learned rotations"
    (arXiv:2405.16406). The rotations are fixed (Hadamard or random) or, with ``learnable``,
    learned as in the paper: trained by Cayley SGD on calibration data, with the quantizers
    ``learn_weights`` / ``learn_activations`` in the loop, the weights frozen
    (``spinquant.learned``), then fused like fixed ones.

    **Lifecycle**

    - ``on_initialize``: infer the mappings (Llama, Mistral, Qwen2, Qwen3) unless given; build
      the compressed-tensors ``TransformConfig`` (R1, R2) unless given; check that every target
      exists and every rotated size is supported
    - ``on_start`` (CALIBRATION_EPOCH_START in oneshot, or ``start`` in training): untie tied
      embeddings; fuse each norm's scale into the linears it feeds; fuse R1 (embedding and
      residual writers on the output side, residual readers and lm_head on the input side) and
      R2 (per head: v_proj output, o_proj input; one matrix for every head of a layer, so
      grouped-query attention stays exact); then the online R4 (a Hadamard on down_proj's
      input, at runtime, as compressed-tensors transform modules recorded in the model's
      ``transform_config``, with its inverse fused into down_proj's weight; see
      ``spinquant/online.py``) and R3 (per head on queries and keys after RoPE;
      ``spinquant/online_attention.py``)
      With ``learnable``, the online rotations are applied first and R1 and R2 (one per
      layer) are trained with them in place on ``Event.batches``:
      oneshot's calibration batches (the modifier requires calibration data, so oneshot
      refuses a run without a dataset), or under the Trainer the train dataloader offered at
      train begin (``start: 0``), before any optimizer step
    - ``on_finalize``: warn when R3 was applied but no ``kv_cache_scheme`` quantizes the cache
    - ``on_end``: nothing left to undo; the weights are an ordinary checkpoint (online
      rotations are recorded in the model's ``transform_config``, which saving writes)

    Sample recipe (learned rotations ahead of W4A4)::

        SpinQuantModifier:
          rotations: [R1, R2]
          learnable: true
          learn_steps: 100
          learn_batch_size: 8
          learn_weights: {num_bits: 4, type: int, symmetric: true, strategy: channel}
          learn_activations: {num_bits: 4, type: int, symmetric: true, strategy: token,
                              dynamic: true}

    RMSNorm models' embeddings are not centred (it is neither needed nor exact for them).
    LayerNorm models (OPT; pre-norm, Linear projections) are first centred: every residual
    writer's output has its mean removed and each LayerNorm's scale and bias fold into the
    Linears it feeds, so the stream is zero-mean and the LayerNorms act as RMSNorms; R1 is then
    made to map the all-ones vector to itself so the stream stays zero-mean, and the model keeps
    its LayerNorm modules (``spinquant/centring.py``; SliceGPT's conversion, which QuaRot and
    SpinQuant use for OPT). Learned rotations are not supported on them (Cayley steps do not
    keep the all-ones vector fixed); GPT-2's Conv1D layout and post-norm blocks are refused.

    :param rotations: which rotations, case-insensitive: ``R1``, ``R2`` (fused; the default),
        ``R3`` (online, per head on the queries and keys after RoPE, for a quantized key/value
        cache; a warning without one) and ``R4`` (online, on down_proj's input)
    :param transform_type: ``hadamard`` (powers of two and compressed-tensors' known orders
        ``k * 2**m``), ``random-hadamard`` (same sizes, random signs) or ``random-matrix``
        (random orthogonal, any size)
    :param randomize: draw randomised matrices: a permuted Hadamard, and a distinct R2 per
        decoder layer
    :param learnable: learn R1/R2 on calibration data (Cayley SGD) from the fixed start
    :param learn_steps: training steps, one calibration batch each (cycling)
    :param learn_batch_size: sequences per training step, regrouped from the calibration
        batches (SpinQuant's 8: one per GPU); None: each calibration batch as it comes
    :param learn_lr: Cayley SGD's learning rate, decayed linearly to 0 (the paper's 1.5)
    :param learn_momentum: Cayley SGD's momentum, in ``[0, 1)``
    :param learn_weights: the weight quantizer in the loop, on every Linear of the decoder
        layers (compressed-tensors ``QuantizationArgs``; normally the recipe's own)
    :param learn_activations: the input quantizer in the loop, on the same Linears; dynamic
    :param learn_loss: what the rotations are learned on: ``cross_entropy`` (the quantized
        model's next-token loss, the paper's), ``kl_to_full_precision`` (its divergence from
        the full-precision model's predictions: the text's difficulty cancels), or
        ``input_range`` (the expected rounding noise of per-token dynamic activation
        quantization, from the ranges of the rotated inputs, collected once: smooth and
        cheap, activations only; ``spinquant.input_ranges``)
    :param precision: dtype the rotations are built and fused in (float64 by default); online
        rotations run in float32 when this is float64, else in this dtype
    :param transform_block_size: R1 and R4 as block-diagonal Hadamards of this order (it must
        divide the hidden and MLP widths), as llm-compressor's field; None: over the whole width
    :param mappings: which modules play which role; inferred for known architectures
    :param norm_mappings: each norm and the linears it feeds; inferred for known architectures
    :param transform_config: a compressed-tensors ``TransformConfig`` that replaces the one
        built from ``rotations`` and ``mappings`` (norms are still fused): fused schemes
        (``weight_input`` / ``weight_output`` only) and online ones (``input`` with its
        ``weight_input`` inverse)

    .. code-block:: yaml

        transform_stage:
          transform_modifiers:
            SpinQuantModifier:
              rotations: [R1, R2, R4]
              transform_type: hadamard
              transform_block_size: 64
    """

    rotations: list[Literal["R1", "R2", "R3", "R4"]] = Field(default_factory=lambda: ["R1", "R2"])
    transform_type: Literal["hadamard", "random-hadamard", "random-matrix"] = "hadamard"
    randomize: bool = False
    learnable: bool = False
    learn_steps: int = Field(default=100, gt=0)
    learn_lr: float = Field(default=1.5, gt=0)
    learn_momentum: float = Field(default=0.0, ge=0, lt=1)
    learn_batch_size: int | None = Field(default=None, gt=0)
    learn_weights: QuantizationArgs | None = None
    learn_activations: QuantizationArgs | None = None
    learn_loss: Literal["cross_entropy", "kl_to_full_precision", "input_range"] = "cross_entropy"
    precision: TorchDtype = torch.float64
    transform_block_size: int | None = Field(default=None, gt=0)
    mappings: SpinQuantMapping | None = None
    norm_mappings: list[NormMapping] | None = None
    transform_config: TransformConfig | None = None

    _mapping: SpinQuantMapping | None = PrivateAttr(default=None)
    _norm_mappings: list[NormMapping] = PrivateAttr(default_factory=list)
    _config: TransformConfig | None = PrivateAttr(default=None)
    _learned: LearnedRotations | None = PrivateAttr(default=None)
    _layer_norms: bool = PrivateAttr(default=False)

    # ---------------------------------------------------------------- validation
    @field_validator("rotations", mode="before")
    @classmethod
    def _normalise_rotations(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            return value
        names = [v.upper() if isinstance(v, str) else v for v in value]
        unknown = [v for v, n in zip(value, names, strict=True) if n not in _ROTATIONS]
        if unknown:
            raise ValueError(f"rotations must be among {', '.join(_ROTATIONS)}; got {unknown}")
        if len(set(names)) != len(names):
            raise ValueError(f"rotations lists one twice: {list(value)}")
        return names

    @model_validator(mode="after")
    def _check_learning(self) -> SpinQuantModifier:
        check_learning_arguments(
            self.learnable,
            sorted(f for f in self.model_fields_set if f.startswith("learn_")),
            has_transform_config=self.transform_config is not None,
            weights=self.learn_weights,
            activations=self.learn_activations,
            loss=self.learn_loss,
            batch_size=self.learn_batch_size,
        )
        if self.learnable and self.transform_block_size is not None:
            raise ValueError(
                "learnable=True with transform_block_size: learned rotations span the whole "
                "hidden and head dimensions; drop transform_block_size"
            )
        if self.learnable and not {"R1", "R2"} & set(self.rotations):
            raise ValueError(
                f"learnable=True learns R1 and R2, and rotations={self.rotations} has neither; "
                "add R1 and/or R2"
            )
        return self

    @field_validator("precision")
    @classmethod
    def _float_precision(cls, value: torch.dtype) -> torch.dtype:
        if value not in _PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(str(p) for p in _PRECISIONS)}; got {value}"
            )
        return value

    @field_validator("transform_config")
    @classmethod
    def _check_transform_config(cls, value: TransformConfig | None) -> TransformConfig | None:
        if value is None:
            return value
        fused, online = split_transform_config(value)
        check_fused_config(fused)
        for name, scheme in online.config_groups.items():
            check_online_scheme(name, scheme)
        return value

    @property
    def learned(self) -> LearnedRotations | None:
        """With ``learnable``, after start: the learned rotations, each step's loss, the time."""
        return self._learned

    # ---------------------------------------------------------------- calibration needs
    def requires_calibration_data(self) -> bool:
        """Learned rotations train on the calibration batches; fixed ones need no data."""
        return self.learnable

    def calibration_traits(self) -> CalibrationTraits:
        """Learned rotations are trained and fused at calibration start, before any forward
        the pipeline runs, and put no hooks on them: every shortcut is allowed, and alone
        they need no calibration pass at all (``observes_forwards``)."""
        if not self.learnable:
            return super().calibration_traits()
        return CalibrationTraits(
            reads_outputs=False, merges_batches=True, in_stages=True, observes_forwards=False
        )

    # ---------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State) -> None:
        model = state.model
        if model is None:
            raise ValueError("SpinQuantModifier needs a model in the state")
        check_finite_weights(model.named_modules(), "SpinQuantModifier")
        if any(is_layer_norm(m) for m in model.modules()):
            check_centrable(model)  # GPT-2's Conv1D and post-norm layouts, before any lookup
        self._norm_mappings = list(self.norm_mappings or infer_norm_mappings_from_model(model))
        self._check_norms(model)
        if self.transform_config is not None:
            self._config = self.transform_config.model_copy(deep=True)
        else:
            self._mapping = self.mappings or infer_mapping_from_model(model)
            self._config = self._build_config(model, self._mapping)
            if "R1" in self.rotations:
                self._check_r1_readers_fused(model, self._mapping)
        self._check_sizes(model)

    def on_start(self, state: State, event: Event) -> None:
        model = state.model
        assert self._config is not None
        untie_word_embeddings(model)
        if self._layer_norms:
            assert self._mapping is not None
            writers = [*self._mapping.embeddings, *self._mapping.residual_writers]
            centre_residual_writers(
                [m for _, m in match_named_modules(model, writers)], self.precision
            )
            logger.info("centred the residual stream's writers (LayerNorm model)")
        norms, kept_biases = self._fuse_norms(model)
        logger.info("fused {} norm(s) into the linears they feed", len(norms))
        fused, online = split_transform_config(self._config)
        if self.learnable:
            # the fixed online rotations first, so the loop's quantizers see the inputs the
            # deployed model quantizes (down_proj's after R4), as SpinQuant trains R1/R2 with
            # its Hadamards R3/R4 in place
            if online.config_groups:
                apply_online_rotations(model, online)
            self._learn_and_fuse(model, event)
            return
        if self._layer_norms:
            r1: dict[int, torch.Tensor] = {}
            apply_fused_transforms(
                model, fused, self.precision, adjust=lambda n, m: _keep_ones(n, m, r1)
            )
            for norm in kept_biases:  # a bias left in a norm sits in the rotated stream
                if r1:
                    rotate_norm_bias(norm, next(iter(r1.values())), self.precision)
        else:
            apply_fused_transforms(model, fused, self.precision)
        if online.config_groups:
            apply_online_rotations(model, online)

    def on_finalize(self, state: State) -> None:
        r3 = self._config is not None and any(
            is_r3_scheme(s) for s in self._config.config_groups.values()
        )
        if r3 and state.model is not None and kv_cache_scheme_of(state.model) is None:
            logger.warning(
                "R3 rotates the queries and keys after RoPE so that a quantized key/value cache "
                "loses less, but no kv_cache_scheme quantizes this model's cache: R3 changes "
                "nothing and costs two head_dim x head_dim products per head and token in every "
                "attention layer at runtime. Add a kv_cache_scheme to the QuantizationModifier, "
                "or drop R3"
            )

    # ---------------------------------------------------------------- parts
    def _learn_and_fuse(self, model: torch.nn.Module, event: Event) -> None:
        batches = event.batches
        if isinstance(batches, tuple | list) and not batches:
            raise ValueError(
                f"SpinQuantModifier(learnable=True) started on {event.type_} without data: "
                "in oneshot pass a dataset; under the Trainer set start: 0, so the rotations "
                "are learned from the train dataloader at train begin"
            )
        assert self._mapping is not None
        config: Any = model.config
        self._learned = learn_and_fuse(
            model,
            self._mapping,
            [r for r in self.rotations if r in ("R1", "R2")],  # R3 / R4 are online, not learned
            {"R1": config.hidden_size, "R2": get_head_dim(config)},
            batches,
            LoopQuantizers(self.learn_weights, self.learn_activations),
            transform_type=self.transform_type,
            randomize=self.randomize,
            precision=self.precision,
            steps=self.learn_steps,
            lr=self.learn_lr,
            momentum=self.learn_momentum,
            batch_rows=self.learn_batch_size,
            loss=self.learn_loss,
        )

    def _build_config(self, model: torch.nn.Module, mapping: SpinQuantMapping) -> TransformConfig:
        common: dict[str, Any] = {
            "type": self.transform_type,
            "randomize": self.randomize,
            "requires_grad": False,
            "precision": self.precision,
        }
        groups: dict[str, TransformScheme] = {}
        if "R1" in self.rotations:
            groups["R1"] = TransformScheme(
                **common,
                head_dim=self.transform_block_size,
                apply=[
                    TransformArgs(
                        targets=[*mapping.embeddings, *mapping.residual_writers],
                        location="weight_output",
                    ),
                    TransformArgs(
                        targets=mapping.residual_readers, location="weight_input", inverse=True
                    ),
                ],
            )
        if "R2" in self.rotations:
            groups["R2"] = TransformScheme(
                **common,
                head_dim=get_head_dim(model.config),
                apply=[
                    TransformArgs(targets=[mapping.attn_v], location="weight_output"),
                    TransformArgs(targets=[mapping.attn_o], location="weight_input", inverse=True),
                ],
            )
        if "R3" in self.rotations:
            groups["R3"] = r3_scheme(
                _attention_classes(model, mapping),
                self.transform_type,
                get_head_dim(model.config),
                randomize=self.randomize,
                precision=_online_precision(self.precision),
            )
        if "R4" in self.rotations:
            groups["R4"] = r4_scheme(
                model,
                list(mapping.mlp_out),
                self.transform_type,
                block_size=self.transform_block_size,
                randomize=self.randomize,
                precision=_online_precision(self.precision),
            )
        return TransformConfig(config_groups=groups)

    def _norm_groups(self, model: torch.nn.Module) -> list[tuple[torch.nn.Module, list[Any]]]:
        groups = []
        for mapping in self._norm_mappings:
            matched = list(match_modules_set(model, [mapping.norm, *mapping.linears]))
            if not matched:
                raise ValueError(
                    f"norm_mappings: norm {mapping.norm!r} with linears {mapping.linears} "
                    f"matches nothing in {type(model).__name__}"
                )
            for norms, *linears in matched:
                if len(norms) != 1:
                    raise ValueError(f"norm_mappings: {mapping.norm!r} matched {len(norms)} norms")
                groups.append((norms[0], [lin for group in linears for lin in group]))
        return groups

    def _check_norms(self, model: torch.nn.Module) -> None:
        """LayerNorm models: centred at start, which needs the mapping of every residual
        writer and R1 built here (its matrix is made to keep the stream zero-mean)."""
        kinds = {is_layer_norm(norm): type(norm).__name__ for norm, _ in self._norm_groups(model)}
        self._layer_norms = True in kinds
        if not self._layer_norms:
            return
        if False in kinds:
            raise ValueError(
                f"{type(model).__name__} mixes {kinds[True]} and {kinds[False]} on its residual "
                "stream: centring the stream (for the LayerNorms) changes what an RMSNorm "
                "reads; SpinQuant supports models whose norms are all RMSNorms or all LayerNorms"
            )
        check_centrable(model)
        if self.learnable:
            raise ValueError(
                f"learnable=True on {type(model).__name__}, a LayerNorm model: its R1 must map "
                "the all-ones vector to itself to keep the centred stream zero-mean, which "
                "Cayley steps do not preserve; use fixed rotations (learnable: false)"
            )
        if self.transform_config is not None:
            raise ValueError(
                f"transform_config on {type(model).__name__}, a LayerNorm model: its rotations "
                "are built from `rotations` and `mappings` (R1 made to keep the centred stream "
                "zero-mean); drop transform_config"
            )

    def _check_r1_readers_fused(self, model: torch.nn.Module, mapping: SpinQuantMapping) -> None:
        fed = {id(lin) for _, linears in self._norm_groups(model) for lin in linears}
        unfused = [
            name
            for name, module in match_named_modules(model, mapping.residual_readers)
            if id(module) not in fed
        ]
        if unfused:
            raise ValueError(
                f"R1 rotates the input of {unfused[:3]} but no norm_mappings entry feeds them; "
                "their norm's scale must be fused first or the rotation changes the model"
            )

    def _check_sizes(self, model: torch.nn.Module) -> None:
        """Fail at initialize, not at start, on a missing target or an unsupported size."""
        assert self._config is not None
        for name, scheme in self._config.config_groups.items():
            for args in scheme.apply:
                for target in args.targets:
                    if next(match_named_modules(model, [target], args.ignore), None) is None:
                        raise ValueError(
                            f"rotation {name}: target {target!r} matches no module of "
                            f"{type(model).__name__}; pass `mappings` for this architecture"
                        )
                if is_r3_scheme(scheme):
                    assert scheme.head_dim is not None
                    online_hadamard_type(scheme.type, scheme.head_dim, f"{name} (head_dim)")
                    continue
                found = match_named_modules(model, args.targets, args.ignore)
                for module_name, module in found:
                    width = _rotated_width(module, args.location)
                    size = scheme.head_dim or width
                    if width % size != 0:
                        raise ValueError(
                            f"rotation {name}: block size {size} does not divide the width "
                            f"{width} of {module_name} ({args.location})"
                        )
                    if is_online_scheme(scheme):
                        online_hadamard_type(scheme.type, size, f"{name} on {module_name}")
                    elif scheme.type != "random-matrix" and not hadamard_supported(size):
                        rotation_matrix(scheme.type, size)  # type: ignore[arg-type]  # raises

    def _fuse_norms(
        self, model: torch.nn.Module
    ) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
        """Fold every norm's scale (and a LayerNorm's bias) into its linears: the norms, and
        those that kept their bias (it feeds a Linear without one)."""
        groups = self._norm_groups(model)
        kept = []
        for norm, linears in groups:
            if not is_layer_norm(norm):
                fuse_norm_into_linears(norm, linears, self.precision)
            elif fuse_layer_norm_into_linears(norm, linears, self.precision):
                kept.append(norm)
        return [norm for norm, _ in groups], kept


def _keep_ones(name: str, matrix: torch.Tensor, built: dict[int, torch.Tensor]) -> torch.Tensor:
    """R1 of a LayerNorm model: made to fix the all-ones vector, and recorded by size."""
    if name != "R1":
        return matrix
    built[matrix.shape[0]] = ones_preserving(matrix)
    return built[matrix.shape[0]]


def _attention_classes(model: torch.nn.Module, mapping: SpinQuantMapping) -> list[str]:
    """The class names of the modules holding the query projections: the attention modules."""
    parents = {name.rpartition(".")[0] for name, _ in match_named_modules(model, [mapping.attn_q])}
    return sorted({type(model.get_submodule(parent)).__name__ for parent in parents})


def _online_precision(precision: torch.dtype) -> torch.dtype:
    # float64 is for building and fusing; at runtime float32 is exact enough and far cheaper
    return torch.float32 if precision == torch.float64 else precision


def _rotated_width(module: torch.nn.Module, location: str) -> int:
    if isinstance(module, torch.nn.Embedding):
        return module.embedding_dim
    if isinstance(module, torch.nn.Linear):
        return module.in_features if location in ("weight_input", "input") else module.out_features
    raise ValueError(f"cannot rotate a {type(module).__name__}: only Linear and Embedding")
