import pytest
import torch
from torch import nn

from compressor import CompressionSession
from compressor.modifiers import ChannelPruningModifier
from compressor.modifiers.pruning import StructureMapping
from compressor.modifiers.pruning.removal import remove_pruned_structure


def _convnet():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    with torch.no_grad():  # give BatchNorm real running statistics
        net.train()
        for _ in range(3):
            net(torch.randn(4, 3, 8, 8))
    return net.eval()


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _train_channels(net, modifier, steps=4):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    session = CompressionSession()
    session.initialize(model=net, recipe=[modifier], optimizer=opt)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        session.batch_start()
        x = torch.randn(4, 3, 8, 8, generator=gen)
        loss = net(x).pow(2).mean()
        session.loss_calculated(loss).backward()
        opt.step()
        opt.zero_grad()
        session.batch_end()
    return session


def test_channels_pruned_in_training_shrink_convs_and_batchnorm():
    net = _convnet()
    dense = _count(net)
    session = _train_channels(net, ChannelPruningModifier(density=0.5, start=0, shrink=False))
    net.eval()
    # both coupled pairs pruned; the last conv (read by a pool + Linear) is left alone
    assert int((net[0].weight == 0).flatten(1).all(1).sum()) == 4
    assert int((net[3][0].weight == 0).flatten(1).all(1).sum()) == 8
    assert (net[1].weight[(net[0].weight == 0).flatten(1).all(1)] == 0).all()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        masked = net(x)
    session.finalize()
    remove_pruned_structure(net)
    assert net[0].out_channels == 4 and net[1].num_features == 4 and net[1].running_var.numel() == 4
    assert net[3][0].in_channels == 4 and net[3][0].out_channels == 8
    assert net[5].in_channels == 8 and net[5].out_channels == 8
    # conv0 4 filters (3*9 + bias) + bn0 4*2 + conv3 in 4*16*9 + 8 filters (4*9 + bias)
    # + bn 8*2 + conv5 in 8*8*9
    removed = 4 * 28 + 8 + 4 * 16 * 9 + 8 * (4 * 9 + 1) + 16 + 8 * 8 * 9
    assert dense - _count(net) == removed
    with torch.no_grad():
        torch.testing.assert_close(net(x), masked, rtol=0, atol=1e-5)


def test_shrink_at_finalize_matches_the_masked_net():
    net = _convnet()
    x = torch.randn(2, 3, 8, 8)
    modifier = ChannelPruningModifier(density=0.25, targets=["0"])
    session = CompressionSession()
    session.initialize(model=net, recipe=[modifier])
    session.calibration_epoch_start()
    session.calibration_epoch_end()
    with torch.no_grad():
        masked = net(x)
    session.finalize()
    assert net[0].out_channels == 2 and net[3][0].in_channels == 2 and net[3][0].out_channels == 16
    with torch.no_grad():
        torch.testing.assert_close(net(x), masked, rtol=0, atol=1e-5)


def test_a_conv_without_a_coupled_layer_is_named():
    with pytest.raises(ValueError, match=r"conv 5 \(the next layer 7 is a AdaptiveAvgPool2d\)"):
        CompressionSession().initialize(
            model=_convnet(), recipe=[ChannelPruningModifier(density=0.5, targets=["5"])]
        )


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


def test_a_net_with_its_own_forward_needs_mappings():
    with pytest.raises(ValueError, match="not a plain nn.Sequential.*Pass mappings"):
        CompressionSession().initialize(
            model=_Residual(), recipe=[ChannelPruningModifier(density=0.5)]
        )
    net = _Residual()
    x = torch.randn(1, 3, 4, 4)
    modifier = ChannelPruningModifier(
        density=0.5, mappings=[StructureMapping(producers=["a"], consumers=["b"])]
    )
    session = CompressionSession()
    session.initialize(model=net, recipe=[modifier])
    session.calibration_epoch_start()
    session.calibration_epoch_end()
    with torch.no_grad():
        masked = net(x)
    session.finalize()
    assert net.a.out_channels == 3 and net.b.in_channels == 3
    with torch.no_grad():
        torch.testing.assert_close(net(x), masked, rtol=0, atol=1e-6)


def test_oneshot_prunes_a_sequential_convnet_by_activations_from_tensor_batches():
    from torch.utils.data import DataLoader

    from compressor import oneshot

    net = _convnet()
    images = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = net(images)
    pruned = oneshot(net, [ChannelPruningModifier(density=0.5, method="activation")],
                     DataLoader(images, batch_size=4))  # fmt: skip
    assert [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)] == [4, 8, 8]
    with torch.no_grad():
        assert pruned(images).shape == dense.shape
    keyed = DataLoader([{"input_ids": x, "attention_mask": x} for x in images], batch_size=4)
    with pytest.raises(TypeError, match=r"Sequential.forward\(input\) takes no keyword.*"
                       r"'attention_mask', 'input_ids'.*one input tensor per batch"):  # fmt: skip
        oneshot(_convnet(), [ChannelPruningModifier(density=0.5, method="activation")], keyed)
