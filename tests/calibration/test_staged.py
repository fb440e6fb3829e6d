"""The sequential pipeline's staged ("true sequential") calibration of Llama-style layers."""

import weakref

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM

import compressor.calibration.pipelines.sequential as sequential
import compressor.calibration.pipelines.staged as staged
from compressor import oneshot
from compressor.modifiers import GPTQModifier
from compressor.modifiers.hooks import HooksMixin
from conftest import tiny_llama_config, tiny_opt

GROUP16 = {
    "g": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "strategy": "group", "group_size": 16, "symmetric": True},
    }
}


def random_ids(count=8, length=32, vocab=128):
    gen = torch.Generator().manual_seed(1)
    return Dataset.from_dict({"input_ids": torch.randint(0, vocab, (count, length), generator=gen)})


def llama(**overrides):
    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=64, intermediate_size=128, **overrides)
    return LlamaForCausalLM(config).eval()


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}


def whole_layer_once_per_group(
    layer, inputs, plan, session, index, outputs=True, memory=None, light=False
):
    """The GPTQ authors' scheme, the reference: the whole layer runs over every call once
    per group, only that group's hooks live, then the group is compressed."""
    groups = [
        plan.attention_readers,
        (plan.attention_output,),
        plan.mlp_readers,
        (plan.mlp_output,),
    ]
    for names in groups:
        modules = [layer.get_submodule(name) for name in names]
        with HooksMixin.hooks_only_on(modules):
            for merged in inputs:
                layer(*merged.call.args, **merged.call.kwargs)
        session.sequential_epoch_end(modules)
    if outputs:
        with HooksMixin.disable_hooks():
            for position, merged in enumerate(inputs):
                out = layer(*merged.call.args, **merged.call.kwargs)
                out = out[0] if isinstance(out, tuple) else out
                inputs[position] = merged.with_hidden_states(out)


@pytest.mark.parametrize(
    ("merge_elements", "keep_fraction"),
    [(sequential.MERGE_ELEMENTS, 1.0), (0, 1.0), (0, 0.5), (0, 0.0)],
)
def test_stages_equal_the_whole_layer_run_once_per_group_bit_for_bit(
    monkeypatch, merge_elements, keep_fraction
):
    """Each group is calibrated on the outputs of the groups compressed before it, exactly
    as if the whole layer ran again for every group, whether what one stage reads from the
    one before was kept or is computed again. Unmerged, with the whole budget, every
    o_proj input is kept but only half the down-projection inputs (twice the hidden
    states' width); with half the budget, half the o_proj inputs and a quarter of the
    others; with none, nothing."""
    monkeypatch.setattr(sequential, "MERGE_ELEMENTS", merge_elements)
    monkeypatch.setattr(staged, "KEEP_ATTENTION", keep_fraction)
    monkeypatch.setattr(staged, "KEEP_MLP", keep_fraction)
    monkeypatch.setattr(staged, "resident_headroom", lambda: 0)  # the fixed budgets alone
    results, counts = [], []
    for stages in (staged.calibrate_in_stages, whole_layer_once_per_group):
        calls = []

        def spy(*args, _calls=calls, _stages=stages, **kwargs):
            _calls.append(args[4])
            return _stages(*args, **kwargs)

        monkeypatch.setattr(sequential, "calibrate_in_stages", spy)
        model = llama(num_hidden_layers=3)
        oneshot(model, [GPTQModifier(config_groups=GROUP16)], random_ids(), pipeline="sequential")
        results.append(weights(model))
        counts.append(calls)
    assert counts[0] == counts[1] == [0, 1, 2]
    ours, reference = results
    assert ours.keys() == reference.keys()
    for name in ours:
        assert torch.equal(ours[name], reference[name]), name


def test_down_inputs_are_kept_within_the_memory_headroom_with_the_same_result(monkeypatch):
    """With room under the process's peak memory, stage 4 keeps every down_proj input and
    stage 5 runs no gate/up again; without room and without a budget, it runs them again for
    every call; the weights and scales come out the same."""
    from compressor.modifiers import QuantizationModifier

    static = {
        "g": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "strategy": "channel", "symmetric": True},
            "input_activations": {"num_bits": 8, "strategy": "tensor", "dynamic": False},
        }
    }
    monkeypatch.setattr(sequential, "MERGE_ELEMENTS", 0)  # each row its own call
    monkeypatch.setattr(staged, "KEEP_MLP", 0.0)
    monkeypatch.setattr(staged, "KEEP_MLP_WITHIN_HEADROOM", True)
    runs = []
    for headroom in (10**12, 0):
        monkeypatch.setattr(staged, "resident_headroom", lambda room=headroom: room)
        model = llama(num_hidden_layers=3)
        gate_calls = []
        for layer in model.model.layers:
            layer.mlp.gate_proj.register_forward_pre_hook(
                lambda m, a, seen=gate_calls: seen.append(m)
            )
        quant = QuantizationModifier(config_groups=static, ignore=["lm_head"])
        oneshot(model, [quant], random_ids(), pipeline="sequential")
        runs.append((model.state_dict(), len(gate_calls)))
    (roomy, roomy_calls), (tight, tight_calls) = runs
    calls = 8  # rows, each its own call
    # stage 4 on every call; stage 5 again on every call of the second layer only without
    # room (the first keeps nothing beyond KEEP_MLP before a layer has measured what
    # down_proj's compression adds; the last layer's outputs are not computed); plus the
    # plan's checks, alike
    assert tight_calls - roomy_calls == calls
    assert roomy.keys() == tight.keys()
    assert all(torch.equal(roomy[key], tight[key]) for key in roomy)


@pytest.mark.parametrize(
    ("recipe", "within"),
    [("rtn", True), ("gptq", False), ("rtn_then_gptq", False), ("forced_off", False)],
)
def test_down_inputs_are_kept_within_the_headroom_only_when_every_compression_is_light(
    monkeypatch, recipe, within
):
    """By default stage 4 keeps down_proj inputs within the memory headroom when every
    modifier compresses lightly (post-training quantization's rounding), never with GPTQ in
    the run (its Hessian solve on down_proj needs the room), and never when the rule is
    forced off: seen by whether the headroom is asked and stage 4 runs with freed memory
    returned; the weights come out the same as with the rule forced either way."""
    import contextlib

    from compressor.modifiers import QuantizationModifier

    static = {
        "g": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "strategy": "channel", "symmetric": True},
            "input_activations": {"num_bits": 8, "strategy": "tensor", "dynamic": False},
        }
    }

    def modifiers():
        rtn = QuantizationModifier(config_groups=static, ignore=["lm_head"])
        gptq = GPTQModifier(config_groups=GROUP16, ignore=["lm_head"])
        return {"rtn": [rtn], "forced_off": [rtn], "gptq": [gptq], "rtn_then_gptq": [
            QuantizationModifier(config_groups={"g": {**static["g"], "targets": [
                "re:.*mlp.*"]}}),
            GPTQModifier(config_groups={"g": {**GROUP16["g"], "targets": [
                "re:.*self_attn.*"]}}),
        ]}[recipe]  # fmt: skip

    asked, returning = [], []
    real_headroom = staged._Stages.mlp_headroom

    def headroom_spy(self, tokens, compression=0):
        asked.append(self.index)
        return real_headroom(self, tokens, compression)

    @contextlib.contextmanager
    def returned():
        returning.append(True)
        yield

    monkeypatch.setattr(staged._Stages, "mlp_headroom", headroom_spy)
    monkeypatch.setattr(staged, "freed_memory_returned", returned)
    if recipe == "forced_off":
        monkeypatch.setattr(staged, "KEEP_MLP_WITHIN_HEADROOM", False)
    model = llama(num_hidden_layers=3)
    oneshot(model, modifiers(), random_ids(), pipeline="sequential")
    # the first layer measures down_proj's compression, the last computes no outputs
    assert asked == ([1] if within else [])
    assert returning == ([True] if within else [])
    monkeypatch.setattr(staged, "KEEP_MLP_WITHIN_HEADROOM", not within)
    monkeypatch.setattr(staged, "KEEP_MLP", 0.0)
    reference = llama(num_hidden_layers=3)
    oneshot(reference, modifiers(), random_ids(), pipeline="sequential")
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_true_sequential_changes_what_later_modules_are_calibrated_on():
    """Off, every Linear of a layer is calibrated on the unquantized layer (llm-compressor's
    way); on, o/gate/up/down see their quantized predecessors: q/k/v of the first layer,
    calibrated first either way, come out equal; the modules after them do not."""
    runs = []
    for true_sequential in (True, False):
        model = llama()
        gptq = GPTQModifier(config_groups=GROUP16, true_sequential=true_sequential)
        oneshot(model, [gptq], random_ids(), pipeline="sequential")
        runs.append(weights(model))
    on, off = runs
    first = "model.layers.0."
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert torch.equal(on[first + name + ".weight"], off[first + name + ".weight"]), name
    for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert not torch.equal(on[first + name + ".weight"], off[first + name + ".weight"]), name


def test_the_plan_names_the_stage_modules_of_a_llama_layer():
    model = llama()
    layer = model.model.layers[0]
    captured = sequential.capture_layer_inputs(
        model, layer, [{"input_ids": torch.randint(0, 128, (2, 16))}], torch.device("cpu")
    )
    plan = staged.plan_stages(layer, captured[0])
    assert plan == staged.StagePlan(
        attention_readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attention_output="self_attn.o_proj",
        mlp_readers=("mlp.gate_proj", "mlp.up_proj"),
        mlp_output="mlp.down_proj",
        gated_mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.act_fn"),
    )


def test_hooks_of_modifiers_calibrating_in_a_pass_of_their_own_do_not_stop_the_stages():
    """AWQ's and SmoothQuant's hooks sit on the attention and the MLP (their whole inputs),
    which no stage calibrates; they run in a pass of their own, so the stages are planned for
    the other modifiers' hooks alone (counted with them, the layer would be calibrated
    whole, and GPTQ after AWQ would lose its stages)."""
    model = llama()
    layer = model.model.layers[0]
    captured = sequential.capture_layer_inputs(
        model, layer, [{"input_ids": torch.randint(0, 128, (2, 16))}], torch.device("cpu")
    )
    staging, first = HooksMixin(), HooksMixin()
    staging.register_hook(layer.self_attn.q_proj, lambda *_: None, "forward_pre")
    first.register_hook(layer.self_attn, lambda *_: None, "forward_pre", with_kwargs=True)
    try:
        assert staged.plan_stages(layer, captured[0]) is None  # every owner's hooks counted
        plan = staged.plan_stages(layer, captured[0], [staging])
        assert plan is not None and plan.attention_output == "self_attn.o_proj"
    finally:
        staging.remove_hooks()
        first.remove_hooks()


def _opt():
    torch.manual_seed(0)
    return tiny_opt(num_hidden_layers=2).eval()


def _llama_with_scaled_residual():
    """Llama names, but a forward the decomposition does not reproduce."""
    model = llama()
    for layer in model.model.layers:
        plain = layer.forward

        def forward(*args, _plain=plain, **kwargs):
            return _plain(*args, **kwargs) * 0.5

        layer.forward = forward
    return model


@pytest.mark.parametrize("make", [_opt, _llama_with_scaled_residual], ids=["opt", "other-forward"])
def test_layers_of_another_form_are_calibrated_whole(monkeypatch, make):
    """A layer that is not Llama-style (OPT's names) or whose forward the decomposition does
    not reproduce is calibrated whole, as with true_sequential off, and says so."""
    from loguru import logger

    def never(*args, **kwargs):
        raise AssertionError("calibrated in stages")

    monkeypatch.setattr(sequential, "calibrate_in_stages", never)
    runs = []
    messages: list[str] = []
    handle = logger.add(lambda m: messages.append(str(m)), level="INFO", format="{message}")
    try:
        for true_sequential in (True, False):
            model = make()
            gptq = GPTQModifier(config_groups=GROUP16, true_sequential=true_sequential)
            oneshot(model, [gptq], random_ids(), pipeline="sequential")
            runs.append(weights(model))
    finally:
        logger.remove(handle)
    assert any("calibrated whole" in m for m in messages)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_hooks_only_on_pauses_the_other_modules_hooks_and_pre_hooks_can_be_fed():
    seen = []

    class Watcher(HooksMixin):
        pass

    watcher = Watcher()
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    for name, module in (("first", first), ("second", second)):
        watcher.register_hook(module, lambda m, a, name=name: seen.append(name), "forward_pre")
    x = torch.randn(2, 4)
    with HooksMixin.hooks_only_on([second]):
        first(x)
        second(x)
    assert seen == ["second"]
    foreign = []
    first.register_forward_pre_hook(lambda m, a: foreign.append(1))
    HooksMixin.call_forward_pre_hooks(first, x)  # ours only, and the module does not run
    assert seen == ["second", "first"] and foreign == []
    watcher.remove_hooks()


def test_sparsegpt_calibrates_whole_layers_unless_gptq_in_the_run_needs_stages():
    from compressor.calibration.pipelines.sequential import _Shortcuts
    from compressor.modifiers import GPTQModifier, SparseGPTModifier

    sparsegpt = SparseGPTModifier(sparsity=0.5)
    gptq = GPTQModifier(scheme="W4A16", ignore=["lm_head"])
    assert not _Shortcuts.of([sparsegpt]).in_stages  # the paper's order
    assert _Shortcuts.of([sparsegpt, gptq]).in_stages  # GPTQ's Hessians on pruned inputs
    whole = GPTQModifier(scheme="W4A16", ignore=["lm_head"], true_sequential=False)
    assert not _Shortcuts.of([sparsegpt, whole]).in_stages
    assert _Shortcuts.of([gptq]).in_stages and not _Shortcuts.of([whole]).in_stages


def test_each_layer_form_gets_its_own_plan():
    """A model whose first layer is dense and the other a mixture of experts (Qwen2-MoE's
    ``mlp_only_layers``, as DeepSeek-V3's ``first_k_dense_replace``): the dense layer runs in
    stages, the expert layer is planned on its own form (calibrated whole: not Llama-style),
    and every Linear is quantized. It failed when the first layer's plan was reused for every
    layer."""
    from loguru import logger

    from moe_models import tiny_moe

    model = tiny_moe("qwen2_moe", mlp_only_layers=[0])
    staged_layers: list[int] = []
    real = sequential.calibrate_in_stages

    def record(layer, inputs, plan, session, index, outputs, memory=None, light=False):
        staged_layers.append(index)
        return real(layer, inputs, plan, session, index, outputs, memory, light)

    messages: list[str] = []
    handle = logger.add(lambda m: messages.append(str(m)), level="INFO", format="{message}")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sequential, "calibrate_in_stages", record)
            gptq = GPTQModifier(config_groups=GROUP16, ignore=["lm_head", "re:.*gate$"])
            oneshot(model, [gptq], random_ids(), pipeline="sequential")
    finally:
        logger.remove(handle)
    assert staged_layers == [0]
    assert any("calibrated whole" in m for m in messages)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    unquantized = [
        n
        for n in linears
        if n != "lm_head"
        and not n.endswith("gate")  # routers, ignored
        and not hasattr(model.get_submodule(n), "weight_scale")
    ]
    assert not unquantized


def _gated_parts(model):
    mlp = model.model.layers[0].mlp
    return mlp, (mlp.gate_proj, mlp.up_proj, mlp.act_fn)


@torch.no_grad()  # as calibration runs
def test_the_gated_down_input_is_the_mlps_own_bit_for_bit_with_two_temporaries_fewer():
    """``act(gate(x)) * up(x)`` as Llama's MLP hands it to down_proj, bit for bit, whether
    written into a given slot or into the activated gate (the activation in place: the
    result is the gate's own output tensor, no MLP-wide temporary besides gate and up)."""
    model = llama()
    mlp, (gate, up, act) = _gated_parts(model)
    x = torch.randn(3, 5, 64) * 4
    seen = []
    mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    gate_outputs = []
    gate.register_forward_hook(lambda m, a, out: gate_outputs.append(out))
    mlp(x)
    in_place = staged.gated_down_input(gate, up, act, x)
    assert torch.equal(in_place, seen[0])
    assert in_place.data_ptr() == gate_outputs[-1].data_ptr()
    slot = torch.full((3, 5, 128), float("nan"))
    placed = staged.gated_down_input(gate, up, act, x, lambda like: slot)
    assert placed is slot and torch.equal(slot, seen[0])
    refused = staged.gated_down_input(gate, up, act, x, lambda like: None)
    assert torch.equal(refused, seen[0])


def test_an_mlp_of_another_forward_is_not_planned_as_gated_and_gives_the_same_weights():
    """An MLP with Llama's module names but another forward (here its product halved) keeps
    the MLP's own forward in stage 4 (no gated plan); the weights are those of the whole
    layer run once per group."""
    import types

    def halved(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 0.5)

    def make():
        model = llama(num_hidden_layers=2)
        for layer in model.model.layers:
            layer.mlp.forward = types.MethodType(halved, layer.mlp)
        return model

    model = make()
    layer = model.model.layers[0]
    captured = sequential.capture_layer_inputs(
        model, layer, [{"input_ids": torch.randint(0, 128, (2, 16))}], torch.device("cpu")
    )
    plan = staged.plan_stages(layer, captured[0])
    assert plan is not None and plan.gated_mlp is None
    results = []
    with pytest.MonkeyPatch.context() as patch:
        for stages in (staged.calibrate_in_stages, whole_layer_once_per_group):
            patch.setattr(sequential, "calibrate_in_stages", stages)
            model = make()
            oneshot(
                model, [GPTQModifier(config_groups=GROUP16)], random_ids(), pipeline="sequential"
            )
            results.append(weights(model))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_kept_slots_are_reserved_in_one_block_allocated_first_within_the_budget():
    """``allocate`` sizes one block for the calls the budget keeps, before any of them;
    ``reserve`` hands out its pieces in order, None past the budget (a smaller later call
    that fits is kept)."""
    tokens = [4, 4, 4, 2]
    width = 3
    kept = staged._Kept(budget=(4 + 4 + 2) * width * 4, tokens=tokens)
    kept.allocate(width, torch.float32, torch.device("cpu"))
    block = kept._block
    assert block is not None and block.numel() == (4 + 4 + 2) * width
    slots = [kept.reserve(torch.empty(n, width)) for n in tokens]
    assert [s is None for s in slots] == [False, False, True, False]
    for slot in (slots[0], slots[1], slots[3]):
        assert slot.untyped_storage().data_ptr() == block.untyped_storage().data_ptr()
    assert slots[3].data_ptr() == block.data_ptr() + 8 * width * 4
    assert kept.take(2) is None and kept.take(3) is slots[3]
    block_alive = weakref.ref(block)
    del block, slots, slot
    kept.take(0)
    assert block_alive() is not None  # a kept piece not taken yet
    kept.take(1)
    assert block_alive() is None  # every piece taken and dropped: the block is freed


def test_o_proj_inputs_kept_in_stage_2_are_freed_before_stage_4(monkeypatch):
    """The block of kept o_proj inputs is freed once stage 3 has read them all, not held
    through the MLP's stages."""
    alive: list[weakref.ref] = []
    real_allocate = staged._Kept.allocate

    def allocate(self, *args):
        real_allocate(self, *args)
        alive.append(weakref.ref(self._block))

    seen_in_stage_4 = []
    real_stage_4 = staged._Stages.stop_at_mlp_output

    def stage_4(self, kept):
        seen_in_stage_4.append([ref() is not None for ref in alive])
        return real_stage_4(self, kept)

    monkeypatch.setattr(staged._Kept, "allocate", allocate)
    monkeypatch.setattr(staged._Stages, "stop_at_mlp_output", stage_4)
    oneshot(llama(num_hidden_layers=2), [GPTQModifier(config_groups=GROUP16)], random_ids(),
            pipeline="sequential")  # fmt: skip
    assert seen_in_stage_4 and all(not any(seen) for seen in seen_in_stage_4)


@pytest.mark.parametrize("compression_calls", [0, 2])
def test_stage_4_keeps_what_the_headroom_leaves_after_its_reserve_and_runs_with_freed_memory_returned(
    monkeypatch, compression_calls
):
    """The down_proj inputs kept within the headroom: exactly as many calls as fit in the
    headroom less the larger of the stage's reserve (six MLP-wide temporaries of the
    largest call and the MLP's weights) and what down_proj's
    compression added on earlier layers (measured; nothing kept beyond KEEP_MLP before the
    first measurement); stage 4 then runs with freed blocks returned to the system (so its
    temporaries hold no memory once freed and the reserve holds), and only then."""
    import contextlib
    import itertools

    monkeypatch.setattr(sequential, "MERGE_ELEMENTS", 0)  # each row (32 tokens) its own call
    monkeypatch.setattr(staged, "KEEP_MLP", 0.0)
    monkeypatch.setattr(staged, "KEEP_MLP_WITHIN_HEADROOM", True)
    call_bytes = 32 * 128 * 4  # tokens x intermediate width x fp32
    reserve = 6 * call_bytes + 3 * 128 * 64 * 4  # and the MLP's three weights
    monkeypatch.setattr(staged, "resident_headroom", lambda: reserve + 3 * call_bytes + 1)
    # resident memory before and after each down_proj compression
    added = reserve + compression_calls * call_bytes if compression_calls else 0
    readings = itertools.cycle([10**9, 10**9 + added])
    monkeypatch.setattr(staged, "resident_bytes", lambda: next(readings))
    returning = []

    @contextlib.contextmanager
    def returned():
        returning.append(True)
        yield
        returning.append(False)

    monkeypatch.setattr(staged, "freed_memory_returned", returned)
    kept, inside = [], []
    real_reserve, real_gated = staged._Kept.reserve, staged.gated_down_input

    def reserve_spy(self, like):
        slot = real_reserve(self, like)
        kept.append(slot is not None)
        return slot

    def gated_spy(*args, **kwargs):
        if len(args) == 5:  # stage 4's calls (the plan's check passes no place)
            inside.append(bool(returning) and returning[-1])
        return real_gated(*args, **kwargs)

    monkeypatch.setattr(staged._Kept, "reserve", reserve_spy)
    monkeypatch.setattr(staged, "gated_down_input", gated_spy)
    oneshot(llama(num_hidden_layers=3), [GPTQModifier(config_groups=GROUP16)], random_ids(),
            pipeline="sequential")  # fmt: skip
    # the second layer keeps 3 of its 8 calls (1 when the compression takes the room of 2
    # beyond the reserve); the first keeps none (nothing measured yet), the last none
    second = 3 - compression_calls
    assert kept == [False] * 8 + [True] * second + [False] * (8 - second) + [False] * 8
    # with freed memory returned only where inputs are kept within the headroom
    assert inside == [False] * 8 + [True] * 8 + [False] * 8
