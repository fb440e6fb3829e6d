"""``QuantizeOnForward`` (quantization-aware training of weights FSDP2 manages) in one process:
on an ordinary Linear it computes what the parametrization computes, forward and backward, and
leaves the module's own weight in place outside its forward. (Under FSDP2 itself:
tests/entrypoints/test_fully_sharded.py.)"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs

from compressor.modifiers.quantization.fake_quant import WeightFakeQuantizer
from compressor.modifiers.quantization.fully_sharded import QuantizeOnForward
from compressor.utils.parametrize import register_parametrization

ARGS = {
    "channel": {"num_bits": 4, "strategy": "channel", "symmetric": True},
    "tensor": {"num_bits": 8, "strategy": "tensor", "symmetric": False},
    "group": {"num_bits": 4, "strategy": "group", "group_size": 8, "symmetric": True},
}


def _linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(16, 8)


@pytest.mark.parametrize("key", sorted(ARGS))
def test_it_computes_what_the_parametrization_computes(key):
    args = QuantizationArgs(**ARGS[key])
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    hooked, parametrized = _linear(), _linear()
    weight = hooked.weight
    handle = QuantizeOnForward(hooked, WeightFakeQuantizer(args, where="h"), "h")
    register_parametrization(parametrized, "weight", WeightFakeQuantizer(args), unsafe=True)
    outputs = [net(x) for net in (hooked, parametrized)]
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], torch.nn.functional.linear(x, weight, hooked.bias))
    for out in outputs:
        out.square().sum().backward()
    original = parametrized.parametrizations.weight.original
    assert torch.equal(weight.grad, original.grad)  # straight through, to the latent weight
    assert hooked.weight is weight  # the module's own Parameter outside the forward
    handle.remove()
    assert torch.equal(hooked(x), torch.nn.functional.linear(x, weight, hooked.bias))


def test_the_weight_is_put_back_when_the_forward_fails():
    net = _linear()
    weight = net.weight
    QuantizeOnForward(net, WeightFakeQuantizer(QuantizationArgs(**ARGS["channel"])), "h")
    with pytest.raises(RuntimeError):
        net(torch.randn(3, 5))  # the wrong width
    assert net.weight is weight
