"""What the pipelines share: ending a forward at a module whose inputs are all that is needed."""

import torch

from compressor.calibration.pipelines.common import run_until_stopped, stop_forward_at


class Chain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second, self.third = (torch.nn.Linear(4, 4) for _ in range(3))
        self.ran: list[str] = []
        for name in ("first", "second", "third"):
            getattr(self, name).register_forward_hook(lambda *a, n=name: self.ran.append(n))

    def forward(self, x, scale=1.0):
        return self.third(self.second(self.first(x) * scale))


def test_a_stopped_forward_ends_at_the_module_and_hands_back_its_arguments():
    model = Chain()
    x = torch.randn(2, 4)
    with stop_forward_at(model.second):
        caught = run_until_stopped(model, x, scale=2.0)
    assert model.ran == ["first"]  # neither the module nor anything after it ran
    args, kwargs = caught
    torch.testing.assert_close(args[0], model.first(x) * 2.0, rtol=0, atol=0)
    assert kwargs == {}
    model.ran.clear()
    assert run_until_stopped(model, x) is None  # the block removed its hook
    assert model.ran == ["first", "second", "third"]


def test_the_other_pre_hooks_see_the_call_unless_the_stop_comes_first():
    seen = []
    model = Chain()
    model.second.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    x = torch.randn(3, 4)
    with stop_forward_at(model.second):
        assert run_until_stopped(model, x) is not None
    assert seen == [torch.Size([3, 4])]
    with stop_forward_at(model.second, before_other_hooks=True):
        assert run_until_stopped(model, x) is not None
    assert seen == [torch.Size([3, 4])]  # stopped before the hook ran


def test_keyword_arguments_of_the_stopping_module_are_handed_back():
    layer = torch.nn.Linear(4, 4)
    hidden = torch.randn(1, 4)
    with stop_forward_at(layer):
        args, kwargs = run_until_stopped(lambda: layer(input=hidden))
    assert args == () and kwargs["input"] is hidden
