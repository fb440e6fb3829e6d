import pytest
import torch
from pydantic import PrivateAttr
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)

from calibration_modifiers import LayerInputRecorder, LayerShrinker
from compressor import create_session
from compressor.architectures import find_decoder_layers
from compressor.calibration.data import collate
from compressor.calibration.pipelines import (
    resolve_pipeline,
    run_basic,
    run_datafree,
    run_sequential,
)
from compressor.modifiers import Modifier
from compressor.modifiers.base import CalibrationTraits
from conftest import tiny_llama_config, tiny_opt


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=128))


def _bert():
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertForMaskedLM(config)


def _llama():
    return LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3))


ARCHITECTURES = {"llama": _llama, "gpt2": _gpt2, "opt": tiny_opt, "bert": _bert}


def _build(name):
    torch.manual_seed(0)
    return ARCHITECTURES[name]().eval()


def _batches():
    # the second batch holds sequences of two lengths, so it is padded with an attention mask
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(3, 128, (n,), generator=generator) for n in (12, 12, 9, 12)]
    batches = collate(sequences, batch_size=2, pad_id=0)
    assert "attention_mask" in batches[1] and "attention_mask" not in batches[0]
    return batches


def _layer_inputs_of_plain_forward(model, batches):
    """Per layer, the hidden states it receives in an ordinary forward, plus the last
    layer's outputs."""
    _, layers = find_decoder_layers(model)
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []
    for index, layer in enumerate(layers):

        def hook(_m, args, kwargs, index=index):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(index, []).append(hidden.clone())

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    handles.append(
        layers[-1].register_forward_hook(
            lambda _m, _a, out: seen.setdefault(len(layers), []).append(
                (out[0] if isinstance(out, tuple) else out).clone()
            )
        )
    )
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_sequential_with_an_idle_modifier_reproduces_the_plain_forward(arch):
    model = _build(arch)
    batches = _batches()
    expected = _layer_inputs_of_plain_forward(model, batches)
    recorder = LayerInputRecorder()
    with create_session() as session:
        session.initialize(model=model, recipe=[recorder])
        final = run_sequential(model, batches, session)
        session.finalize()
    n_layers = len(find_decoder_layers(model)[1])
    assert len(final) == len(batches)
    for got, want in zip(final, expected[n_layers], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # calibration ran every batch through every layer exactly once (the replay had hooks off)
    assert sorted(recorder._inputs) == list(range(n_layers))
    for index in range(n_layers):
        assert len(recorder._inputs[index]) == len(batches)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_each_layer_calibrates_on_the_outputs_of_the_compressed_layers_before_it(arch):
    model = _build(arch)
    batches = _batches()
    original = _layer_inputs_of_plain_forward(model, batches)
    shrinker = LayerShrinker()
    with create_session() as session:
        session.initialize(model=model, recipe=[shrinker])
        run_sequential(model, batches, session)
        session.finalize()
    _, layers = find_decoder_layers(model)
    # one epoch end per layer, carrying that layer, in order
    assert [id(m) for m in shrinker._epoch_ends] == [id(layer) for layer in layers]
    # every layer is now halved; a plain forward of the final model gives, at layer i, the
    # inputs computed by the changed layers 0..i-1, which is what calibration must have seen
    compressed = _layer_inputs_of_plain_forward(model, batches)
    for index in range(len(layers)):
        for got, want in zip(shrinker._inputs[index], compressed[index], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and for the layers after the first, those inputs differ from the original model's
    for index in range(1, len(layers)):
        assert not torch.allclose(shrinker._inputs[index][0], original[index][0], atol=1e-4)


def test_without_kept_outputs_every_layer_still_calibrates_and_its_hooks_see_no_replay(
    tiny_llama, token_batches
):
    """oneshot skips the last layer's re-run (nothing reads it): the calibration is the same."""
    kept, skipped = LayerInputRecorder(), LayerInputRecorder()
    for recorder, keep in ((kept, True), (skipped, False)):
        with create_session() as session:
            session.initialize(model=tiny_llama, recipe=[recorder])
            final = run_sequential(tiny_llama, token_batches, session, keep_outputs=keep)
            session.finalize()
        assert len(final) == (len(token_batches) if keep else 0)
    assert skipped._events == kept._events
    assert [id(m) for m in skipped._epoch_ends] == [id(m) for m in kept._epoch_ends]
    for index, inputs in kept._inputs.items():
        for got, want in zip(skipped._inputs[index], inputs, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


class InputsOnly(Modifier):
    """Records every Linear's inputs with forward pre-hooks; ``reads_outputs`` says whether it
    claims to need more (which decides whether the pipeline may stop forwards early)."""

    reads_outputs: bool = True
    _inputs: dict = PrivateAttr(default_factory=dict)

    def calibration_traits(self) -> CalibrationTraits:
        return CalibrationTraits(reads_outputs=self.reads_outputs)

    def on_start(self, state, event):
        for name, module in state.model.named_modules():
            if isinstance(module, torch.nn.Linear):

                def hook(module, args, name=name):
                    self._inputs.setdefault(name, []).append(args[0].clone())

                self.register_hook(module, hook, "forward_pre")

    def on_end(self, state, event):
        self.remove_hooks()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_calibration_stops_at_the_last_module_only_when_no_modifier_reads_outputs(arch):
    """Modifiers that read only inputs see exactly the same inputs when each calibration
    forward stops at the layer's last module, and the output (unchanged model) is the same."""
    runs = {}
    for reads in (True, False):
        model = _build(arch)
        finished = {"count": 0}
        layers = find_decoder_layers(model)[1]
        recorder = InputsOnly(reads_outputs=reads)
        with create_session() as session:
            session.initialize(model=model, recipe=[recorder])
            # count whole forwards of the first layer (its forward hook runs only at the end)
            handle = layers[0].register_forward_hook(
                lambda *a, f=finished: f.update(count=f["count"] + 1)
            )
            try:
                final = run_sequential(model, _batches(), session)
            finally:
                handle.remove()
            session.finalize()
        runs[reads] = (recorder._inputs, final, finished["count"])
    (full, full_out, full_count), (cut, cut_out, cut_count) = runs[True], runs[False]
    assert sorted(cut) == sorted(full)
    for name in full:
        for got, want in zip(cut[name], full[name], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(cut_out, full_out, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    batches = len(_batches())
    # every calibration forward plus the re-run completed in full; cut short: only the first
    # calibration forward (which finds the last module) and the re-run
    assert full_count == 2 * batches
    assert cut_count == 1 + batches


def test_datafree_and_basic_send_the_calibration_events(tiny_llama, token_batches):
    recorder = LayerInputRecorder()
    with create_session() as session:
        session.initialize(model=tiny_llama, recipe=[recorder])
        run_datafree(tiny_llama, token_batches, session)
        session.finalize()
    assert recorder._events == [
        "calibration_epoch_start",
        "sequential_epoch_end",
        "calibration_epoch_end",
    ]
    assert recorder._epoch_ends == [tiny_llama] and recorder._inputs == {}

    basic = LayerInputRecorder()
    with create_session() as session:
        session.initialize(model=tiny_llama, recipe=[basic])
        run_basic(tiny_llama, token_batches, session)
        session.finalize()
    assert basic._events == recorder._events
    assert [len(basic._inputs[i]) for i in (0, 1)] == [len(token_batches)] * 2
    assert tiny_llama.config.use_cache is True  # restored after calibration


def test_auto_picks_the_pipeline_from_the_modifiers(tiny_llama):
    from compressor.modifiers import SpinQuantModifier
    from recording import RecordingModifier

    A4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}

    assert resolve_pipeline("auto", [RecordingModifier()], tiny_llama) == "datafree"
    assert resolve_pipeline("auto", [LayerInputRecorder()], tiny_llama) == "sequential"
    assert resolve_pipeline("auto", [LayerInputRecorder()], torch.nn.Linear(2, 2)) == "basic"
    assert resolve_pipeline("basic", [], tiny_llama) == "basic"
    # learned rotations need data only at calibration start: no pass unless another observes
    learned = SpinQuantModifier(learnable=True, learn_activations=A4)
    assert resolve_pipeline("auto", [learned, RecordingModifier()], tiny_llama) == "datafree"
    assert resolve_pipeline("auto", [learned, LayerInputRecorder()], tiny_llama) == "sequential"
    with pytest.raises(ValueError, match="pipeline='layered' is unknown"):
        resolve_pipeline("layered", [], tiny_llama)


def test_sequential_refuses_layers_with_different_masks():
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    model.config.layer_types = ["sliding_attention", "full_attention"]
    with create_session() as session:
        session.initialize(model=model, recipe=[LayerInputRecorder()])
        with pytest.raises(ValueError, match="layer_types.*use pipeline='basic'"):
            run_sequential(model, [], session)


class MergingRecorder(InputsOnly):
    """InputsOnly that lets the pipeline calibrate on merged calls."""

    def calibration_traits(self) -> CalibrationTraits:
        return CalibrationTraits(reads_outputs=self.reads_outputs, merges_batches=True)


def _equal_length_batches(count=5, length=12):
    generator = torch.Generator().manual_seed(2)
    sequences = [torch.randint(3, 128, (length,), generator=generator) for _ in range(count)]
    return collate(sequences, batch_size=1, pad_id=0)


def _batch_sizes_reaching(layer):
    """Record the batch size of every call of ``layer`` (a plain hook: replays included)."""
    sizes: list[int] = []

    def hook(_m, args, kwargs):
        sizes.append((args[0] if args else kwargs["hidden_states"]).shape[0])

    return sizes, layer.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize(("merges", "cap"), [(False, "tokens"), (True, "tokens"), (True, "values")])
def test_equal_length_calls_run_merged_with_the_outputs_of_one_by_one(
    arch, merges, cap, monkeypatch
):
    """Equal-length batches run through each layer together (up to MERGE_TOKENS tokens and
    MERGE_ELEMENTS values), calibration and re-runs alike, with the plain forward's outputs;
    only when every modifier accepts it: else each batch runs alone, as the user batched it."""
    import compressor.calibration.pipelines.sequential as sequential

    model = _build(arch)
    # two 12-token calls per forward, whichever bound decides
    if cap == "tokens":
        monkeypatch.setattr(sequential, "MERGE_TOKENS", 24)
    else:
        monkeypatch.setattr(sequential, "MERGE_ELEMENTS", 24 * model.config.hidden_size)
    batches = _equal_length_batches()
    expected = _layer_inputs_of_plain_forward(model, batches)
    recorder = MergingRecorder(reads_outputs=False) if merges else InputsOnly(reads_outputs=False)
    layers = find_decoder_layers(model)[1]
    sizes, handle = _batch_sizes_reaching(layers[1])
    with create_session() as session:
        session.initialize(model=model, recipe=[recorder])
        try:
            final = run_sequential(model, batches, session)
        finally:
            handle.remove()
        session.finalize()
    assert len(final) == len(batches)
    for got, want in zip(final, expected[len(layers)], strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # layer 1: calibration calls, then the re-run, merged two by two (5 = 2 + 2 + 1)
    calibration = [2, 2, 1] if merges else [1] * 5
    assert sizes == calibration + calibration
    # every Linear saw every token once, grouped as the layer's calls were
    for name, seen in recorder._inputs.items():
        tokens = [x.shape[:-1].numel() for x in seen]
        assert tokens == [12 * n for n in calibration] * (len(seen) // len(calibration)), name


@pytest.mark.parametrize("mismatch", ["raises", "differs"])
def test_layers_that_do_not_take_merged_calls_run_one_call_at_a_time(mismatch):
    """A layer whose other arguments do not broadcast over a merged batch (it raises, or
    silently computes something else) is detected on the first layer: the pipeline falls
    back to one call at a time and the outputs are exactly those of the plain forward."""
    model = _build("llama")
    layers = find_decoder_layers(model)[1]
    for layer in layers:
        original = layer.forward

        def forward(hidden_states, *args, _original=original, **kwargs):
            batch = kwargs["position_embeddings"][0].shape[0]
            if mismatch == "raises" and hidden_states.shape[0] != batch:
                raise ValueError("position embeddings are for another batch size")
            out = _original(hidden_states, *args, **kwargs)
            if mismatch == "differs":  # depends on how many sequences share the call
                out = out * hidden_states.shape[0]
            return out

        layer.forward = forward
    batches = _equal_length_batches(count=3)
    expected = _layer_inputs_of_plain_forward(model, batches)
    sizes, handle = _batch_sizes_reaching(layers[2])
    with create_session() as session:
        session.initialize(model=model, recipe=[InputsOnly(reads_outputs=False)])
        try:
            final = run_sequential(model, batches, session)
        finally:
            handle.remove()
        session.finalize()
    for got, want in zip(final, expected[len(layers)], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert sizes == [1] * 6  # 3 calibration calls, 3 re-runs


def test_merging_never_holds_the_cached_inputs_twice(monkeypatch):
    """The capture cache can be the largest thing in memory: each call's own hidden states are
    released as soon as its group's merged copy exists, not after all groups are made."""
    import gc
    import weakref

    from compressor.calibration.pipelines.layer_calls import LayerInputs, merge_calls

    shared = {"attention_mask": None, "position_ids": torch.arange(12)[None]}
    calls = [LayerInputs((torch.randn(1, 12, 8),), dict(shared)) for _ in range(6)]
    originals = [weakref.ref(call.hidden_states) for call in calls]
    alive_at_each_cat = []
    cat = torch.cat

    def spy(tensors, *args, **kwargs):
        gc.collect()
        alive_at_each_cat.append(sum(ref() is not None for ref in originals))
        return cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", spy)
    merged = merge_calls(calls, max_tokens=24, max_elements=10**9)
    monkeypatch.setattr(torch, "cat", cat)
    assert [m.batch_sizes for m in merged] == [(1, 1)] * 3
    assert calls == []  # the caller's list was emptied
    # at the k-th merge, the calls of the k-1 groups before are already gone
    assert alive_at_each_cat == [6, 4, 2]
    gc.collect()
    assert all(ref() is None for ref in originals)
