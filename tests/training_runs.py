"""Tiny training runs shared by the Trainer and distributed tests: the model, the data, a
Trainer builder, and two test modifiers (a data-dependent mask and a learnable scale)."""

from __future__ import annotations

import torch
from pydantic import PrivateAttr
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from compressor import CompressionSession, Modifier
from compressor.utils import distributed
from conftest import tiny_llama_config

STEPS, ROWS, SEQ = 6, 4, 16  # each step trains on ROWS rows, split over the ranks


@Modifier.register()
class InputRmsMaskModifier(Modifier):
    """Test modifier: while active, gathers the RMS of each input channel of the first layer's
    ``down_proj``; at its end keeps the ``keep`` loudest channels (zeroing the other weight
    columns, held at zero by a gradient mask). The statistic is reduced over every rank."""

    keep: int = 32

    _sum: torch.Tensor | None = PrivateAttr(default=None)
    _count: int = PrivateAttr(default=0)
    _local_mask: torch.Tensor | None = PrivateAttr(default=None)
    _mask: torch.Tensor | None = PrivateAttr(default=None)

    def _layer(self, state):
        return state.model.model.layers[0].mlp.down_proj

    def on_start(self, state, event):
        layer = self._layer(state)
        self._sum = torch.zeros(layer.in_features, dtype=torch.float64)

        def gather(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            self._sum += x.double().pow(2).sum(0)
            self._count += x.shape[0]

        self.register_hook(layer, gather, "forward_pre")

    def on_end(self, state, event):
        self.remove_hooks()
        assert self._sum is not None
        local = self._sum / self._count
        self._local_mask = _top(local, self.keep)
        rms = distributed.all_reduce_mean_(self._sum.clone(), self._count)
        self._mask = _top(rms, self.keep)
        weight = self._layer(state).weight
        with torch.no_grad():
            weight.mul_(self._mask.to(weight.dtype))
        mask = self._mask.to(weight.dtype)
        self.register_hook(weight, lambda grad: grad * mask, "tensor")


def _top(values: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros_like(values, dtype=torch.bool)
    mask[values.topk(keep).indices] = True
    return mask


def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


SAMPLES, BATCH = 8, 2  # 4 micro-batches per epoch


def dataset():
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 128, (16,), generator=gen) for _ in range(SAMPLES)]
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


def make_trainer(model, callback, tmp_path, cls=Trainer, accumulation=1, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=2,
        learning_rate=1e-2,
        weight_decay=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return cls(
        model=model,
        args=TrainingArguments(**values),
        train_dataset=dataset(),
        callbacks=[callback],
    )


@Modifier.register()
class OutputScaleModifier(Modifier):
    """Test modifier: a learnable scale on the LM head output, added when it starts."""

    _scale: torch.nn.Parameter | None = PrivateAttr(default=None)

    def on_start(self, state, event):
        head = state.model.lm_head
        self._scale = torch.nn.Parameter(torch.ones(1))
        head.register_parameter("compress_scale", self._scale)
        self.register_hook(head, lambda _m, _i, out: out * self._scale, "forward")

    def on_finalize(self, state):
        if self._scale is not None:
            with torch.no_grad():
                state.model.lm_head.weight.mul_(self._scale)
            del state.model.lm_head.compress_scale


def data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (STEPS, ROWS, SEQ), generator=gen)


def train_plain(rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """Train with the recipe on this rank's share of every step's rows; return the result."""
    net = model().train()
    runner = net
    if world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    session = CompressionSession()
    session.initialize(model=net, recipe=[InputRmsMaskModifier(start=1, end=4)], optimizer=opt)
    share = ROWS // world
    for batch in data():
        ids = batch[rank * share : (rank + 1) * share]
        session.batch_start()
        loss = session.loss_calculated(runner(input_ids=ids, labels=ids).loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        session.batch_end()
    session.finalize()
    (modifier,) = session.modifiers
    return {
        "mask": modifier._mask,
        "local_mask": modifier._local_mask,
        **{k: v.detach().clone() for k, v in net.state_dict().items()},
    }


def _train_shares(callback, tmp_path, world: int, epochs: int, dtype=torch.float32):
    """Train the tiny Llama with ``callback``, each of ``world`` processes taking its share
    of a batch of 4 (gloo when several)."""
    settings = dict(per_device_train_batch_size=4 // world, num_train_epochs=epochs)
    if world > 1:
        settings["ddp_backend"] = "gloo"
    trainer = make_trainer(model().to(dtype), callback, tmp_path, **settings)
    trainer.train()
    return trainer


def train_with_trainer(tmp_path, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """The Trainer with both test modifiers; each process takes its share of a batch of 4."""
    from compressor import CompressionCallback

    recipe = [InputRmsMaskModifier(start=1, end=3), OutputScaleModifier(start=1)]
    callback = CompressionCallback(recipe)
    trainer = _train_shares(callback, tmp_path / f"rank{rank}", world, epochs=3)
    mask = callback.modifiers[0]._mask
    return {"mask": mask, **{k: v.detach().clone() for k, v in trainer.model.state_dict().items()}}


def train_parametrized_with_trainer(tmp_path, rank: int = 0, world: int = 1) -> dict:
    """The Trainer with modifiers that parametrize weights after it has wrapped the model in
    DistributedDataParallel: quantization-aware training of the attention projections and
    learnable TopK scores on the MLP (released at step 2, masks held after)."""
    from compressor import CompressionCallback
    from compressor.modifiers import QuantizationModifier, SparsePruningModifier

    recipe = [
        QuantizationModifier(scheme="W8A8", targets=["re:.*self_attn\\.(q|k|v|o)_proj"], start=0),
        SparsePruningModifier(
            density=0.5, method="topk", start=0, end=2, targets=["re:.*mlp\\..*_proj"]
        ),
    ]
    callback = CompressionCallback(recipe)
    # float64: the ranks average gradients in another order than one process, and in float32
    # such a last-bit difference can round a fake-quantized weight the other way, after which
    # the runs drift apart by an amount that depends on the CPU's kernels (1.4e-4 on an AVX2
    # machine); in float64 a rounding tie that close is too rare to meet
    trainer = _train_shares(callback, tmp_path / f"qat-rank{rank}", world, epochs=2,
                            dtype=torch.float64)  # fmt: skip
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# static input ranges of the first layer's q/k/v projections: their inputs come from the
# embeddings alone, so no earlier fake quantization makes the ranges depend on batch order,
# and the ranges over the ranks' data must equal those over the union exactly
STATIC_INPUTS = {
    "qkv": {
        "targets": ["re:.*layers\\.0\\.self_attn\\.(q|k|v)_proj"],
        "weights": {"num_bits": 8, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "strategy": "tensor", "observer": "static_minmax"},
    },
}
MLP_TARGETS = ["re:.*mlp\\.(gate|up|down)_proj"]


def calibration_rows() -> torch.Tensor:
    """24 rows of 16 tokens; the first half draws from tokens 0-63, the second from 64-127, so
    the two ranks' activation ranges differ."""
    rows = data().reshape(-1, SEQ) % 64
    rows[rows.shape[0] // 2 :] += 64
    return rows


@torch.no_grad()
def calibrate_on_share(recipe, rows: torch.Tensor, rank: int = 0, world: int = 1) -> dict:
    """Post-training calibration of a fresh model on this rank's share of ``rows``; returns the
    quantization parameters and pruning masks that came out."""
    net = model().eval()
    session = CompressionSession()
    session.initialize(model=net, recipe=recipe)
    share = rows.shape[0] // world
    session.calibration_epoch_start()
    for batch in rows[rank * share : (rank + 1) * share].split(2):
        net(input_ids=batch)
    session.calibration_epoch_end()
    session.finalize()
    out = {k: v.clone() for k, v in net.state_dict().items() if "input_" in k}
    out.update({n: m.weight != 0 for n, m in net.named_modules() if n.endswith("_proj")})
    return out


def calibration_recipes() -> dict[str, list]:
    """Static activation ranges, and activation-aware (Wanda) pruning of the MLPs."""
    from compressor.modifiers import QuantizationModifier, SparsePruningModifier

    return {
        "ranges": [QuantizationModifier(config_groups=STATIC_INPUTS)],
        "wanda": [SparsePruningModifier(density=0.5, method="activation", targets=MLP_TARGETS)],
    }


def train_static_qat(rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """QAT with static input ranges that freeze after 3 steps, in a plain DDP loop; returns the
    final quantization parameters and weights."""
    from compressor.modifiers import QuantizationModifier

    net = model().train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    session = CompressionSession()
    recipe = [QuantizationModifier(config_groups=STATIC_INPUTS, start=0, end=3)]
    session.initialize(model=net, recipe=recipe, optimizer=opt)
    # DDP wraps the model once the fake quantization is in place: registering a
    # parametrization replaces the weight's gradient accumulator, where DDP hooks in
    runner = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    share = ROWS // world
    for batch in data():
        ids = batch[rank * share : (rank + 1) * share]
        session.batch_start()
        runner(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        session.batch_end()
    session.finalize()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}
