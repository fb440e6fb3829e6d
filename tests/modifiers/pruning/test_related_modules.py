"""related_modules: checked against the structure mapping, or defining it where none is known."""

from __future__ import annotations

import pytest
import torch
from transformers import BertForSequenceClassification

from compressor import Recipe, create_session
from compressor.modifiers import ChannelPruningModifier, HeadPruningModifier, RowPruningModifier
from conftest import tiny_bert


def _bert() -> BertForSequenceClassification:
    return tiny_bert()


def _run(model: torch.nn.Module, recipe, inputs: dict, steps: int = 2) -> None:
    """A session loop; ``recipe``: a Recipe, or a modifier."""
    recipe = recipe if isinstance(recipe, Recipe) else [recipe]
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    with create_session() as session:
        session.initialize(model, recipe, optimizer=optimizer)
        for _ in range(steps):
            session.batch_start()
            out = model(**inputs)
            loss = session.loss_calculated(out.pow(2).mean() if torch.is_tensor(out) else out.loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            session.batch_end()
        session.finalize()


def _initialize(model: torch.nn.Module, recipe) -> None:
    with create_session() as session:
        session.initialize(model, recipe if isinstance(recipe, Recipe) else [recipe])


def _rows(**fields) -> Recipe:
    """Row pruning in a recipe group named as the DeepSpeed converter names them."""
    return Recipe.from_dict(
        {
            "prune_stage": {
                "row_pruning_rp1_modifiers": {
                    "RowPruningModifier": {"density": 0.5, "start": 0, **fields}
                }
            }
        }
    )


# ---------------------------------------------------------------- checked against the mapping
def test_related_modules_that_agree_with_the_mapping_prune_as_usual():
    model = _bert()
    modifier = _rows(related_modules=["re:.*layer.\\d+.output.dense"])
    _run(
        model, modifier, {"input_ids": torch.randint(0, 64, (2, 8)), "labels": torch.ones(2).long()}
    )
    layer = model.bert.encoder.layer[1]
    assert (layer.intermediate.dense.out_features, layer.output.dense.in_features) == (32, 32)


@pytest.mark.parametrize(
    ("related", "needle"),
    [
        # the attention output reads no MLP row
        (["re:.*attention.output.dense"], "does not couple"),
        (["re:.*no_such_layer"], "matches no Linear"),
        # only layer 0's reader: layer 1's rows would leave their reader at full size
        (["re:.*layer.0.output.dense"], "matches nothing coupled to the pruned"),
        # the producer itself, but not the layer reading the rows
        (["re:.*intermediate.dense"], "also shrinks the inputs of"),
    ],
)
def test_related_modules_disagreeing_with_the_mapping_name_modifier_group_and_pattern(
    related, needle
):
    modifier = _rows(related_modules=related)
    with pytest.raises(ValueError) as info:
        _initialize(_bert(), modifier)
    message = str(info.value)
    assert "RowPruningModifier (recipe group 'row_pruning_rp1')" in message
    assert repr(related[0]) in message  # the pattern
    assert needle in message


def test_head_related_modules_include_the_output_projection():
    related = ["re:.*self.query", "re:.*self.key", "re:.*self.value"]
    modifier = HeadPruningModifier(density=0.5, start=0, related_modules=related)
    with pytest.raises(ValueError, match=r"attention.output.dense.*no related_modules pattern"):
        _initialize(_bert(), modifier)
    modifier = HeadPruningModifier(
        density=0.5, start=0, related_modules=[*related, "re:.*attention.output.dense"]
    )
    _initialize(_bert(), modifier)


def test_related_modules_round_trip_through_yaml():
    recipe = _rows(related_modules=["re:.*output.dense"])
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe and again.modifiers[0].related_modules == ["re:.*output.dense"]


# ---------------------------------------------------------------- defining the coupling
class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Net(torch.nn.Module):
    """No config, no built-in mapping: only related_modules can say what fc1's rows feed."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_without_a_mapping_related_modules_define_the_coupling():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="no rows mapping"):
        _initialize(_Net(), RowPruningModifier(density=0.5, start=0, targets=["re:.*fc1"]))
    fields = {"density": 0.5, "start": 0, "targets": ["re:.*fc1"], "related_modules": ["re:.*fc2"]}
    masked = _Net()
    _run(masked, RowPruningModifier(**fields, shrink=False), {"x": x})
    for block in masked.blocks:
        dead = block.fc1.weight.abs().sum(dim=1) == 0
        assert dead.sum().item() == 8  # half of the 16 rows
        assert torch.all(block.fc2.weight[:, dead] == 0)  # and the columns that read them
    shrunk = _Net()
    _run(shrunk, RowPruningModifier(**fields), {"x": x})
    assert [b.fc1.out_features for b in shrunk.blocks] == [8, 8]
    assert [b.fc2.in_features for b in shrunk.blocks] == [8, 8]
    assert shrunk(x).shape == (4, 8)


def test_related_modules_pair_in_order_so_counts_must_agree():
    modifier = RowPruningModifier(
        density=0.5, start=0, targets=["re:.*fc1"], related_modules=["re:.*blocks.0.fc2"]
    )
    with pytest.raises(ValueError, match=r"'re:\.\*blocks\.0\.fc2' matches 1 module.*match 2"):
        _initialize(_Net(), modifier)


def test_heads_need_mappings_not_related_modules():
    modifier = HeadPruningModifier(
        density=0.5, start=0, targets=["re:.*fc1"], related_modules=["re:.*fc2"]
    )
    with pytest.raises(ValueError, match="cannot define a heads mapping"):
        _initialize(_Net(), modifier)


class _ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn1(self.conv1(x))))


def test_channel_coupling_from_related_modules_on_a_custom_conv_net():
    torch.manual_seed(0)
    model, x = _ConvNet(), torch.randn(2, 3, 10, 10)
    with pytest.raises(ValueError, match="or related_modules"):
        _initialize(_ConvNet(), ChannelPruningModifier(density=0.5, start=0, targets=["conv1"]))
    modifier = ChannelPruningModifier(
        density=0.5, start=0, targets=["conv1"], related_modules=["bn1", "conv2"]
    )
    _run(model, modifier, {"x": x})
    assert (model.conv1.out_channels, model.bn1.num_features, model.conv2.in_channels) == (4, 4, 4)
    assert model(x).shape == (2, 4, 6, 6)
