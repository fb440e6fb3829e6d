"""What a modifier allows the calibration pipelines to do (``Modifier.calibration_traits``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CalibrationTraits"]


@dataclass(frozen=True)
class CalibrationTraits:
    """How a modifier's calibration may be run; the defaults are the conservative answers.

    A pipeline takes a shortcut only when every modifier of the run allows it.

    :param supports_offloaded_models: the modifier works on a model whose weights are
        offloaded (to CPU memory or disk, ``compressor.utils.offload``): every weight it
        changes is written with ``update_offload_parameter``, never into the temporary
        onloaded copy. Default False: ``oneshot`` then refuses an offloaded model with a
        clear error
    :param reads_outputs: the modifier's calibration hooks read something computed after a
        module's inputs (module outputs, a decoder layer's output). When no modifier does,
        the sequential pipeline stops each calibration forward of a layer as soon as its last
        module has received its inputs: the rest would be computed and thrown away (the
        layer's outputs come from the re-run after compression). Default True
    :param merges_batches: the result is unchanged when several calibration batches run
        through a layer as one forward (their rows stacked): the modifier's statistics (true
        of sums and extremes over tokens, like GPTQ's Hessians; false of running averages per
        batch, or of ranges that already quantize the forward while they are being
        observed), and the outputs of the layers it has compressed (false when they quantize
        activations with one dynamic scale per forward). When every modifier says so, the
        sequential pipeline runs stacked batches, whose larger matrix products run faster;
        otherwise each batch runs alone, as the user batched it. Default False
    :param in_stages: the modifier compresses a decoder layer's modules in the order the
        layer calls them, each group calibrated on the outputs of the groups already
        compressed ("true sequential", as the GPTQ authors' code and AutoGPTQ do): q/k/v, then
        o on the compressed attention, then gate/up, then down. Only for modifiers whose
        hooks are forward pre-hooks on the modules they compress and whose
        ``SEQUENTIAL_EPOCH_END`` compresses the modules the event carries. When every
        modifier says so (and none reads outputs), the sequential pipeline calibrates a
        Llama-style layer in those stages, which needs fewer matrix products than calibrating
        it whole and running it again (``compressor.calibration.pipelines.staged``).
        Default False
    :param accepts_stages: the modifier calibrates whole layers when it has the choice, but
        its hooks and ``SEQUENTIAL_EPOCH_END`` work in stages too (as ``in_stages`` describes);
        the pipeline then uses stages when the other modifiers of the run ask for them
        (``in_stages``) and none refuses them. Default False
    :param transforms_first: the modifier changes a layer's weights without changing its
        function (SmoothQuant's and AWQ's scales), from statistics it gathers on that layer,
        and the other modifiers must calibrate the changed layer. The sequential pipeline then
        runs, for each layer, a first pass with only such modifiers' hooks live and every
        quantized forward of the layer off, sends them alone a ``SEQUENTIAL_EPOCH_END`` for
        the layer, and only then calibrates the others on it (the basic pipeline does the same
        for the whole model). Default False
    :param observes_forwards: the modifier's calibration watches the forward passes a pipeline
        runs (its hooks, observers, statistics gathered layer by layer). False for a modifier
        that needs calibration data only as the batches offered at calibration start
        (``Event.batches``) and watches no pipeline forward, as learned rotations, trained
        and fused there, do. When no modifier that needs data watches the forwards, the
        ``auto`` pipeline is the datafree one, still offering the batches at calibration
        start: the layer-by-layer pass would be computed and thrown away. Default True
    :param reduces_across_ranks: under a process group (``oneshot`` under ``torchrun``), where
        each rank calibrates on its share of the rows, every statistic the modifier gathers
        from the data is reduced over the ranks at the point it is used, so every rank
        computes what one process would from all the rows. ``oneshot`` refuses, before any
        work, a modifier that needs calibration data and does not say so (each rank would
        compress differently). Default False
    :param compresses_lightly: the modifier's ``SEQUENTIAL_EPOCH_END`` compresses a module
        with little memory beyond a copy of its weights (rounding them to ranges already
        observed, as post-training quantization does), unlike a solve over the module's
        inputs (GPTQ's and SparseGPT's Hessians). When every modifier calibrating in stages
        says so, the staged pipeline keeps more ``down_proj`` inputs from stage 4 for stage 5,
        up to the process's headroom under its peak memory, instead of running gate/up again
        (``compressor.calibration.pipelines.staged.KEEP_MLP_WITHIN_HEADROOM``). Default False
    """

    supports_offloaded_models: bool = False
    reads_outputs: bool = True
    merges_batches: bool = False
    in_stages: bool = False
    accepts_stages: bool = False
    transforms_first: bool = False
    observes_forwards: bool = True
    reduces_across_ranks: bool = False
    compresses_lightly: bool = False
