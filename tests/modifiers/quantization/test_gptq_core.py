"""The GPTQ numeric core on random and real layers: Hessians, error feedback, grids, actorder."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from loguru import logger
from transformers import AutoTokenizer, LlamaForCausalLM

from compressor.modifiers.quantization.gptq import (
    accumulate_hessian,
    gptq_quantize_weight,
    inverse_hessian_cholesky,
    round_to_nearest,
)

ARGS = {
    "channel-sym": QuantizationArgs(num_bits=4, strategy="channel"),
    "group-sym": QuantizationArgs(num_bits=4, strategy="group", group_size=16),
    "group-asym": QuantizationArgs(num_bits=4, strategy="group", group_size=16, symmetric=False),
    "tensor-sym": QuantizationArgs(num_bits=4, strategy="tensor"),
    "channel-3bit-asym": QuantizationArgs(num_bits=3, strategy="channel", symmetric=False),
}


def correlated_layer(n_in=96, n_out=48, tokens=1024, seed=0):
    """A weight and inputs whose features are correlated, as real activations are."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=gen) / n_in**0.5
    scales = torch.rand(n_in, generator=gen) * 3 + 0.1
    x = (torch.randn(tokens, n_in, generator=gen) @ mix) * scales
    w = torch.randn(n_out, n_in, generator=gen) * 0.05
    return w, x


def output_error(w, q, x):
    return float(((w - q) @ x.T).norm())


@pytest.fixture
def warnings():
    messages = []
    handle = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    yield messages
    logger.remove(handle)


def test_hessian_is_the_mean_of_outer_products_over_any_batching():
    _, x = correlated_layer(tokens=300)
    reference = 2 * x.double().T @ x.double() / x.shape[0]
    h, n = accumulate_hessian(x[:100].reshape(4, 25, -1))
    h, n = accumulate_hessian(x[100:101], h, n)
    h, n = accumulate_hessian(x[101:], h, n)
    assert n == 300
    torch.testing.assert_close(h.double(), reference, rtol=1e-5, atol=1e-5)
    h64, _ = accumulate_hessian(x, dtype=torch.float64)
    assert h64.dtype == torch.float64
    torch.testing.assert_close(h64, reference)
    with pytest.raises(ValueError, match="95 features"):
        accumulate_hessian(x[:, :95], h, n)


@pytest.mark.parametrize("name", list(ARGS))
@pytest.mark.parametrize("actorder", [None, "static"])
def test_gptq_beats_round_to_nearest(name, actorder):
    args = ARGS[name]
    w, x = correlated_layer()
    h, _ = accumulate_hessian(x)
    rtn, _, _ = round_to_nearest(w, args)
    result = gptq_quantize_weight(w, h, args, block_size=32, actorder=actorder)
    assert result.weight.shape == w.shape and result.weight.dtype == w.dtype
    assert output_error(w, result.weight, x) < 0.85 * output_error(w, rtn, x)


def per_column_qparams(result, args, columns):
    """Scale and zero point of every column, shaped (rows, columns)."""
    scale, zero = result.scale, result.zero_point
    if scale.dim() == 1:
        scale, zero = scale.reshape(1, 1), zero.reshape(1, 1)
    if args.strategy == "group":
        index = torch.arange(columns) // args.group_size
        return scale[:, index], zero[:, index]
    return scale.expand(-1, columns), zero.expand(-1, columns)


@pytest.mark.parametrize("name", list(ARGS))
@pytest.mark.parametrize("actorder", [None, "static"])
def test_result_lies_on_the_returned_grid(name, actorder):
    args = ARGS[name]
    w, x = correlated_layer()
    h, _ = accumulate_hessian(x)
    result = gptq_quantize_weight(w, h, args, block_size=32, actorder=actorder)
    scale, zero = per_column_qparams(result, args, w.shape[1])
    codes = torch.round(result.weight / scale + zero.float())
    low, high = (-(2 ** (args.num_bits - 1)), 2 ** (args.num_bits - 1) - 1)
    assert codes.min() >= low and codes.max() <= high
    torch.testing.assert_close((codes - zero.float()) * scale, result.weight)
    # at most 2^bits distinct values in every row of every group
    group = args.group_size if args.strategy == "group" else w.shape[1]
    for row in result.weight.unflatten(1, (-1, group)).reshape(-1, group):
        assert row.unique().numel() <= 2**args.num_bits
    # the checkpoint format: compressed-tensors' own quantizer
    assert result.zero_point.dtype == torch.int8
    if args.strategy in ("channel", "group"):
        assert result.scale.shape[0] == w.shape[0]
    torch.testing.assert_close(
        fake_quantize(result.weight, result.scale, result.zero_point, args), result.weight
    )


def test_static_actorder_keeps_contiguous_groups_with_round_to_nearest_scales():
    args = ARGS["group-sym"]
    w, x = correlated_layer()
    h, _ = accumulate_hessian(x)
    _, rtn_scale, _ = round_to_nearest(w, args)
    static = gptq_quantize_weight(w, h, args, actorder="static")
    torch.testing.assert_close(static.scale, rtn_scale)


def test_lazy_block_updates_equal_column_by_column_updates():
    args = ARGS["channel-sym"]
    w, x = correlated_layer()
    h, _ = accumulate_hessian(x)
    one = gptq_quantize_weight(w, h, args, block_size=1)
    blocked = gptq_quantize_weight(w, h, args, block_size=40)  # not a divisor of 96
    mismatched = (one.weight != blocked.weight).float().mean()
    assert mismatched < 0.005  # float rounding may flip a rare tie, nothing more
    assert one.loss == pytest.approx(blocked.loss, rel=0.02)


def test_dead_columns_are_zeroed():
    w, x = correlated_layer()
    x[:, [3, 50]] = 0
    h, _ = accumulate_hessian(x)
    result = gptq_quantize_weight(w, h, ARGS["group-asym"])
    assert (result.weight[:, [3, 50]] == 0).all()
    assert torch.isfinite(result.weight).all()


def test_singular_hessian_gets_more_dampening_and_a_warning(warnings):
    w, x = correlated_layer(tokens=20)  # 20 samples, 96 features: rank 20
    h, _ = accumulate_hessian(x)
    rtn, _, _ = round_to_nearest(w, ARGS["channel-sym"])
    result = gptq_quantize_weight(w, h, ARGS["channel-sym"], dampening_frac=0.0)
    assert result.dampening_frac > 0
    assert any("not positive definite" in m for m in warnings)
    assert torch.isfinite(result.weight).all()
    assert output_error(w, result.weight, x) < output_error(w, rtn, x)


def test_indefinite_and_broken_hessians():
    h = torch.diag(torch.tensor([1.0, 1.0, -0.5, 1.0]))
    upper, frac = inverse_hessian_cholesky(h, 0.01)
    assert frac >= 1.0 and torch.isfinite(upper).all()
    inverse = torch.linalg.inv(h.double() + frac * h.diagonal().abs().mean() * torch.eye(4))
    torch.testing.assert_close((upper.T @ upper).double(), inverse, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="NaN or infinite"):
        inverse_hessian_cholesky(torch.full((4, 4), float("nan")))


def test_bad_arguments_name_the_problem():
    w, x = correlated_layer()
    h, _ = accumulate_hessian(x)
    with pytest.raises(ValueError, match="group_size=40 does not divide the 96"):
        gptq_quantize_weight(w, h, QuantizationArgs(num_bits=4, group_size=40))
    with pytest.raises(ValueError, match="actorder must be"):
        gptq_quantize_weight(w, h, ARGS["channel-sym"], actorder="weird")
    with pytest.raises(ValueError, match="actorder must be None or 'static'; got 'group'"):
        gptq_quantize_weight(w, h, ARGS["group-sym"], actorder="group")  # no g_idx format
    with pytest.raises(ValueError, match="strategy"):
        gptq_quantize_weight(w, h, QuantizationArgs(num_bits=8, strategy="token", dynamic=True))
    with pytest.raises(ValueError, match="Hessian is"):
        gptq_quantize_weight(w, h[:10, :10], ARGS["channel-sym"])
    with pytest.raises(ValueError, match="block_size must be positive, got 0"):
        gptq_quantize_weight(w, h, ARGS["channel-sym"], block_size=0)


@pytest.fixture(scope="module")
def stories_inputs(stories_model_path, tinystories_text):
    """Inputs of three Linears of the real model's second layer, on real text."""
    model = LlamaForCausalLM.from_pretrained(stories_model_path).eval()
    tok = AutoTokenizer.from_pretrained(stories_model_path)
    ids = tok(tinystories_text[:20000], return_tensors="pt").input_ids[:, :1024]
    layer = model.model.layers[1]
    linears = {"q": layer.self_attn.q_proj, "up": layer.mlp.up_proj, "down": layer.mlp.down_proj}
    seen = {}

    def keep(key):
        def hook(module, inputs, output):
            seen[key] = inputs[0].reshape(-1, inputs[0].shape[-1])

        return hook

    hooks = [m.register_forward_hook(keep(k)) for k, m in linears.items()]
    with torch.no_grad():
        model(ids.reshape(2, 512))
    for hook in hooks:
        hook.remove()
    return {k: (linears[k].weight.detach().clone(), seen[k]) for k in linears}


@pytest.mark.parametrize("name", ["q", "up", "down"])
@pytest.mark.parametrize(
    "args",
    [
        QuantizationArgs(num_bits=4, strategy="channel"),
        QuantizationArgs(num_bits=4, strategy="group", group_size=4, symmetric=False),
    ],
    ids=["channel", "group4"],
)
def test_gptq_beats_round_to_nearest_on_the_real_model(stories_inputs, name, args):
    w, x = stories_inputs[name]  # down_proj has 172 input columns
    h, _ = accumulate_hessian(x)
    rtn, _, _ = round_to_nearest(w, args)
    result = gptq_quantize_weight(w, h, args, actorder="static")
    assert output_error(w, result.weight, x) < 0.9 * output_error(w, rtn, x)


@pytest.mark.parametrize("strategy", ["channel", "group"])
def test_rows_of_weights_sharing_a_hessian_can_be_solved_as_one_stacked_weight(strategy):
    """GPTQ treats rows independently given H: stacking q/k/v-like weights (as GPTQModifier
    does for Linears with one Hessian) gives each the result it would get alone."""
    torch.manual_seed(0)
    x = torch.randn(512, 64) * torch.rand(64) * 3
    h, _ = accumulate_hessian(x)
    weights = [torch.randn(rows, 64) for rows in (32, 16, 48)]
    kwargs = {"group_size": 16} if strategy == "group" else {}
    args = QuantizationArgs(num_bits=4, strategy=strategy, **kwargs)
    stacked = gptq_quantize_weight(torch.cat(weights), h, args, block_size=32)
    alone = [gptq_quantize_weight(w, h, args, block_size=32) for w in weights]
    torch.testing.assert_close(stacked.weight, torch.cat([r.weight for r in alone]))
    torch.testing.assert_close(stacked.scale, torch.cat([r.scale for r in alone]))
    assert stacked.loss == pytest.approx(sum(r.loss for r in alone), rel=1e-4)
    # given as a list, stacked inside (no concatenated copy by the caller): the same result
    listed = gptq_quantize_weight(weights, h, args, block_size=32)
    assert torch.equal(listed.weight, stacked.weight)
    assert torch.equal(listed.scale, stacked.scale)
    with pytest.raises(ValueError, match="same input columns"):
        gptq_quantize_weight([weights[0], torch.randn(4, 32)], h, args)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_the_inline_column_rounding_equals_compressed_tensors_bit_for_bit(symmetric, bits):
    """GPTQ rounds single columns inline for speed; it must stay compressed-tensors' grid."""
    from compressor.modifiers.quantization.gptq.gptq import _column_rounder, _qparams

    torch.manual_seed(0)
    args = QuantizationArgs(num_bits=bits, strategy="channel", symmetric=symmetric)
    w = torch.randn(300, 48) * 3
    scale, zero = _qparams(w, args)
    expected = fake_quantize(w, scale[:, None], zero[:, None], args)
    rounder = _column_rounder(args)
    got = torch.stack(
        [rounder(w[:, j].contiguous(), scale, zero.to(w.dtype)) for j in range(48)], 1
    )
    assert torch.equal(got, expected)


def test_the_callers_hessian_is_left_alone_unless_it_gives_it_up():
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    h, _ = accumulate_hessian(x)
    h[3, 3] = 0.0  # a dead column, which GPTQ edits in its copy
    kept = h.clone()
    w = torch.randn(8, 32)
    args = QuantizationArgs(num_bits=4, strategy="channel")
    alone = gptq_quantize_weight(w, h, args, block_size=8)
    assert torch.equal(h, kept)
    given = gptq_quantize_weight(w, h, args, block_size=8, overwrite_hessian=True)
    assert torch.equal(given.weight, alone.weight)


def test_in_place_dampening_retries_like_the_copying_path():
    """A Hessian that needs more dampening gives the same factor whether it is dampened in
    place (the caller gave it up) or in a copy."""
    torch.manual_seed(0)
    v = torch.randn(16, 1)
    h = v @ v.T - 0.5 * v.square().mean() * torch.eye(16)  # indefinite: needs more than 1%
    copied, frac = inverse_hessian_cholesky(h.clone(), 0.01)
    in_place, frac_in_place = inverse_hessian_cholesky(h.clone(), 0.01, overwrite=True)
    assert frac == frac_in_place > 0.01
    torch.testing.assert_close(in_place, copied)


@pytest.mark.parametrize("size", [1, 7, 64])
def test_the_in_place_flip_of_a_square_matrix_equals_flip(size):
    from compressor.modifiers.quantization.gptq.hessian import _flip_square_

    matrix = torch.randn(size, size)
    expected = matrix.flip(0, 1)
    storage = matrix.data_ptr()
    flipped = _flip_square_(matrix, chunk=5)  # chunks that do not divide the halves
    assert flipped.data_ptr() == storage
    assert torch.equal(flipped, expected)


def test_a_given_up_hessian_holds_the_factor_of_its_inverse():
    """With ``overwrite`` the factor is written into the Hessian's own memory (for the widest
    layers, two fewer Hessian-sized matrices), and it is the right factor."""
    torch.manual_seed(0)
    h, _ = accumulate_hessian(torch.randn(512, 48))
    expected, _ = inverse_hessian_cholesky(h.clone(), 0.01)
    given = h.clone()
    upper, _ = inverse_hessian_cholesky(given, 0.01, overwrite=True)
    assert upper.data_ptr() == given.data_ptr()
    torch.testing.assert_close(upper, expected, rtol=0, atol=0)
    assert torch.equal(upper, upper.triu())
    dampened = h + 0.01 * h.diagonal().mean() * torch.eye(48)
    torch.testing.assert_close(upper.t() @ upper, torch.linalg.inv(dampened), rtol=1e-3, atol=1e-4)


def test_upper_triangle_accumulation_then_symmetrize_equals_the_full_hessian():
    from compressor.modifiers.quantization.gptq import symmetrize_upper_

    torch.manual_seed(0)
    batches = [torch.randn(2, 40, 300) for _ in range(3)]  # 300: a partial last block row
    full, upper = (None, 0), (None, 0)
    for x in batches:
        full = accumulate_hessian(x, *full)
        upper = accumulate_hessian(x, *upper, upper_only=True)
    assert upper[1] == full[1]
    assert not torch.allclose(upper[0], full[0])  # the lower triangle was left stale
    symmetrize_upper_(upper[0])
    assert torch.equal(upper[0], upper[0].t())
    torch.testing.assert_close(upper[0], full[0], rtol=1e-5, atol=1e-5)


def test_shared_hessians_compute_one_product_per_tensor_and_split_when_readers_part():
    """Linears reading one tensor share one Hessian; one that later reads something else
    gets its own copy from then on, and every Hessian equals the one of its own inputs."""
    from compressor.modifiers.quantization.gptq import SharedHessians

    gen = torch.Generator().manual_seed(0)
    width = 300  # wider than two update blocks: upper-triangle accumulation, then filled in
    batches = [torch.randn(2, 7, width, generator=gen) for _ in range(4)]
    other = [torch.randn(2, 7, width, generator=gen) for _ in range(4)]
    own: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "v": [], "o": []}
    shared = SharedHessians()
    for step, (x, y) in enumerate(zip(batches, other, strict=True)):
        calls = [("q", x), ("k", x), ("v", x if step < 2 else y), ("o", y)]
        for name, inputs in calls:
            shared.observe(name, inputs)
            own[name].append(inputs)
    assert sorted(shared) == ["k", "o", "q", "v"]
    assert shared.same_set("q", "k") and not shared.same_set("q", "v")
    for name, inputs in own.items():
        expected, count = None, 0
        for x in inputs:
            expected, count = accumulate_hessian(x, expected, count)
        hessian, their_count = shared[name]
        assert their_count == count == 56
        torch.testing.assert_close(hessian, expected, rtol=1e-5, atol=1e-6, msg=name)
    # popping part of a set hands out a copy; the last member gets the set's own tensor
    q_copy, _ = shared.pop(["q"])
    k_own, _ = shared.pop(["k"])
    assert q_copy.data_ptr() != k_own.data_ptr() and torch.equal(q_copy, k_own)
    assert "q" not in shared and len(shared) == 2


def _problem(rows, columns, seed, dead=None):
    w, x = correlated_layer(n_in=columns, n_out=rows, tokens=512, seed=seed)
    if dead is not None:
        x[:, dead] = 0.0  # inputs that are always zero: a dead column
    h, _ = accumulate_hessian(x)
    return w, h


@pytest.mark.parametrize("name", ["channel-sym", "group-sym", "group-asym", "tensor-sym"])
@pytest.mark.parametrize("actorder", [None, "static"])
def test_problems_solved_in_lockstep_equal_each_solved_alone_bit_for_bit(name, actorder):
    """A layer's q/k/v, o and gate/up problems share their column loop (one rounding per
    position for all of them); each keeps its own Hessian, order, scales and loss."""
    from compressor.modifiers.quantization.gptq import gptq_quantize_weights

    args = ARGS[name]
    problems = [_problem(24, 64, 1), _problem(8, 64, 2, dead=5), _problem(40, 64, 3)]
    problems[0] = ([problems[0][0][:16], problems[0][0][16:]], problems[0][1])  # stacked rows
    alone = [
        gptq_quantize_weight(w, h, args, block_size=32, actorder=actorder) for w, h in problems
    ]
    together = gptq_quantize_weights(problems, args, block_size=32, actorder=actorder)
    assert len(together) == 3
    for one, joint in zip(alone, together, strict=True):
        assert torch.equal(one.weight, joint.weight)
        assert torch.equal(one.scale, joint.scale)
        assert torch.equal(one.zero_point, joint.zero_point)
        assert one.loss == pytest.approx(joint.loss, rel=1e-6)
    assert not together[1].weight[:, 5].any()  # the dead column of the second problem
    with pytest.raises(ValueError, match="same input columns"):
        gptq_quantize_weights([problems[1], _problem(8, 32, 4)], args)
    with pytest.raises(ValueError, match="no problem"):
        gptq_quantize_weights([], args)


def test_the_column_loop_runs_on_one_thread_and_its_block_updates_on_the_callers():
    """The column loop's small operations run on one thread, each block's update of the later
    columns (a large product) on the caller's threads, and the caller's count comes back."""
    from compressor.modifiers.quantization.gptq.gptq import _few_threads

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = []
        with _few_threads(torch.zeros(1)) as threads:
            seen.append(torch.get_num_threads())
            with threads.all():
                seen.append(torch.get_num_threads())
            seen.append(torch.get_num_threads())
        seen.append(torch.get_num_threads())
        assert seen == [1, 2, 1, 2]
        w, x = correlated_layer()
        h, _ = accumulate_hessian(x)
        gptq_quantize_weight(w, h, ARGS["channel-sym"], block_size=32)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def column_by_column_gptq(w, h, args, actorder=None, dampening_frac=0.01):
    """GPTQ as the paper writes it, one column at a time in float64, no lazy blocks: dead
    columns zeroed (diagonal 1), the Hessian dampened by a fraction of its mean diagonal, each
    column rounded then its error, divided by the inverse Hessian's Cholesky diagonal, taken
    off the later columns. Group scales come from the group's current columns when its first
    column is reached; with ``actorder="static"`` every scale is fixed up front from the
    original columns and the columns are visited by decreasing Hessian diagonal.

    :return: the quantized weight (original column order) and the loss
        ``sum (w - q)^2 / d^2 / 2``
    """
    w, h = w.double().clone(), h.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    columns = w.shape[1]
    group = args.group_size if args.strategy == "group" else columns
    column_args = QuantizationArgs(
        num_bits=args.num_bits, symmetric=args.symmetric, strategy="channel"
    )

    def qparams(part):
        if args.strategy == "tensor":
            lo, hi = part.min().expand(w.shape[0]), part.max().expand(w.shape[0])
        else:
            lo, hi = part.amin(dim=1), part.amax(dim=1)
        scale, zero = calculate_qparams(lo.float(), hi.float(), args)
        return scale.double().unsqueeze(1), zero.unsqueeze(1)

    fixed = None
    order = torch.arange(columns)
    if actorder == "static":
        fixed = [qparams(w[:, g : g + group]) for g in range(0, columns, group)]
        order = torch.argsort(h.diagonal(), descending=True)
    elif args.strategy != "group":
        fixed = [qparams(w)]
    w, h = w[:, order], h[order][:, order]
    h += dampening_frac * h.diagonal().mean() * torch.eye(columns, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    q, loss = torch.zeros_like(w), 0.0
    for j in range(columns):
        if fixed is not None:
            scale, zero = fixed[int(order[j]) // group]
        elif j % group == 0:
            scale, zero = qparams(w[:, j : j + group])
        q[:, j : j + 1] = fake_quantize(w[:, j : j + 1], scale, zero, column_args)
        err = (w[:, j] - q[:, j]) / u[j, j]
        loss += float(err.square().sum()) / 2
        w[:, j + 1 :] -= torch.outer(err, u[j, j + 1 :])
    return q[:, torch.argsort(order)], loss


@pytest.mark.parametrize(
    ("strategy", "group_size", "block_size"),
    [
        ("channel", None, 40),
        ("tensor", None, 24),
        ("group", 16, 32),
        ("group", 16, 40),  # a group straddles two blocks
        ("group", 12, 32),  # groups start inside the column loop's sub-blocks of 16
        ("group", 32, 24),  # a group spans three blocks
        ("group", 4, 128),
    ],
)
@pytest.mark.parametrize("actorder", [None, "static"])
def test_lazy_blocks_compute_gptq_column_by_column(strategy, group_size, block_size, actorder):
    """The blocked, sub-blocked column loop is an exact reorganisation of GPTQ's column by
    column updates: the same weights and loss, also for block sizes that are not multiples of
    the group size and groups smaller than a sub-block (a group's running scale sees every
    error of the columns before it). Asymmetric grids: a symmetric running scale puts the
    group's largest negative weight exactly on a rounding tie (-7.5), which float rounding
    may break either way."""
    kwargs = {"group_size": group_size} if group_size else {}
    args = QuantizationArgs(num_bits=4, strategy=strategy, symmetric=False, **kwargs)
    w, x = correlated_layer(n_out=32)
    x[:, 7] = 0.0  # a dead column
    h, _ = accumulate_hessian(x)
    expected, loss = column_by_column_gptq(w, h, args, actorder)
    result = gptq_quantize_weight(w, h, args, block_size=block_size, actorder=actorder)
    # a rare float tie may round one weight the other way, and its row differs from there on
    differing_rows = ((result.weight.double() - expected).abs() > 1e-5).any(dim=1)
    assert differing_rows.sum() <= 1
    assert result.loss == pytest.approx(loss, rel=1e-3)


@pytest.mark.parametrize("name", ["channel-sym", "group-sym", "group-asym", "tensor-sym"])
def test_the_loss_is_the_added_error_of_the_dampened_quadratic(name):
    """Each GPTQ step is an optimal brain surgeon step, whose added error is exactly its
    column's share of the loss, so the loss is the final ``(W - Q) H' (W - Q)^T / 2`` summed
    over rows, ``H'`` the dampened Hessian: with ``H = 2/n X^T X`` nearly the mean squared
    output error added per token."""
    w, x = correlated_layer()
    h, _ = accumulate_hessian(x)
    result = gptq_quantize_weight(w, h, ARGS[name], block_size=40)
    dampened = h.double() + result.dampening_frac * h.diagonal().double().mean() * torch.eye(96)
    delta = (w - result.weight).double()
    quadratic = float(torch.einsum("ri,ij,rj->", delta, dampened, delta)) / 2
    assert result.loss == pytest.approx(quadratic, rel=1e-3)


def test_dead_columns_need_no_dampening(warnings):
    """A column whose inputs are always zero is handled exactly (zeroed, its Hessian diagonal
    set to one): an otherwise well-conditioned Hessian factorizes with no dampening at all,
    rather than being dampened for every column with a warning."""
    w, x = correlated_layer()
    x[:, [3, 50]] = 0.0
    h, _ = accumulate_hessian(x)
    result = gptq_quantize_weight(w, h, ARGS["channel-sym"], dampening_frac=0.0)
    assert result.dampening_frac == 0.0
    assert not any("not positive definite" in m for m in warnings)
    assert (result.weight[:, [3, 50]] == 0).all()
