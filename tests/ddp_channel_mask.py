"""A data-dependent test modifier and the training run that the distributed tests repeat in
one process and in two (gloo) processes."""

from __future__ import annotations

import torch
from pydantic import PrivateAttr

from compressor import CompressionSession, Modifier
from compressor.utils import distributed

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


def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config)


def data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (STEPS, ROWS, SEQ), generator=gen)


def train(rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """Train with the recipe on this rank's share of every step's rows; return the result."""
    model = make_model().train()
    runner = model
    if world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = CompressionSession()
    session.initialize(model=model, recipe=[InputRmsMaskModifier(start=1, end=4)], optimizer=opt)
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
        **{k: v.detach().clone() for k, v in model.state_dict().items()},
    }
