"""OutputDistillationModifier with llm-compressor's layer-wise fields (targets, square_head)."""

from __future__ import annotations

import copy

import pytest
import torch

from compressor import CompressionSession
from compressor.modifiers.distillation.losses import square_head_loss
from compressor.recipe import Recipe
from compressor.recipe.recipe import RecipeError

RECIPE = """
finetuning_stage:
  distillation_modifiers:
    OutputDistillationModifier:
      targets: ["re:model.layers.\\\\d+$"]
      comparison: square_head
      start: 0
      orig_scale: 1.0
      distill_scale: 1.0
      transforms: identity
      offload_layer_output: false
"""


def test_square_head_is_the_relative_squared_error_over_the_masked_tokens():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 4, generator=gen)
    student = teacher + 0.1 * torch.randn(2, 5, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]) == 1
    s, t = student[mask], teacher[mask]
    expected = ((t - s) ** 2).sum() / (t**2).sum()
    assert square_head_loss([(student, teacher)], mask) == pytest.approx(expected.item())
    other = torch.randn(2, 5, 4, generator=gen)
    both = square_head_loss([(student, teacher), (other, teacher)], mask)
    assert both == pytest.approx(
        (expected + ((teacher[mask] - other[mask]) ** 2).sum() / (teacher[mask] ** 2).sum())
        .div(2)
        .item()
    )


def _step(student, session, batch):
    session.batch_start(batch_data=batch)
    task = student(**batch).loss
    return task, session.loss_calculated(task)


def test_the_loss_is_orig_scale_task_plus_layers_times_the_square_head_term(tiny_llama):
    teacher = tiny_llama
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for param in student.model.layers[1].parameters():
            param.add_(0.05 * torch.randn_like(param))
    session = CompressionSession()
    session.initialize(model=student, recipe=Recipe.from_yaml(RECIPE), teacher_model=teacher)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    # the term computed independently: each decoder layer's output, student vs teacher
    outputs = {}
    for who, model in (("s", student), ("t", teacher)):
        hooks = [
            layer.register_forward_hook(
                lambda _m, _a, out, who=who, i=i: outputs.__setitem__(
                    (who, i), out[0] if isinstance(out, tuple) else out
                )
            )
            for i, layer in enumerate(model.model.layers)
        ]
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"})
        for hook in hooks:
            hook.remove()
    keep = mask == 1
    terms = [
        ((outputs["t", i][keep] - outputs["s", i][keep]) ** 2).sum()
        / (outputs["t", i][keep] ** 2).sum()
        for i in range(2)
    ]
    task, loss = _step(student, session, batch)
    # distill_scale 1.0 becomes the number of modules (two layers), as in llm-compressor
    expected = task + 2 * torch.stack(terms).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms[0] == 0 < terms[1]  # layer 0 is the teacher's; layer 1 was perturbed
    session.finalize()


def test_training_on_the_layer_term_brings_the_student_to_the_teacher(tiny_llama):
    teacher = tiny_llama
    student = copy.deepcopy(teacher).train()
    with torch.no_grad():
        for param in student.model.layers[0].mlp.parameters():
            param.mul_(1.5)
    recipe = Recipe.from_yaml(RECIPE.replace("orig_scale: 1.0", "orig_scale: 0.0"))
    session = CompressionSession()
    session.initialize(model=student, recipe=recipe, teacher_model=teacher)
    opt = torch.optim.Adam(student.model.layers.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(12):
        _, loss = _step(student, session, {"input_ids": ids, "labels": ids})
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
        session.batch_end()
    session.finalize()
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(
    "old, new, needles",
    [
        ("comparison: square_head", "", ["comparison: got None", "square_head"]),
        ("comparison: square_head", "comparison: kl_divergence", ["kl_divergence"]),
        ("transforms: identity", "transforms: softmax", ["transforms: got 'softmax'"]),
        (
            "start: 0",
            "start: 0\n      temperature: 2.0",
            ["temperature", "cannot be combined with targets"],
        ),
    ],
)
def test_what_cannot_be_honoured_is_refused_by_name(old, new, needles):
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(RECIPE.replace(old, new))
    for needle in needles:
        assert needle in str(info.value)


def test_layerwise_fields_without_targets_and_targets_missing_in_the_teacher(tiny_llama):
    with pytest.raises(RecipeError, match="need targets"):
        Recipe.from_yaml(
            "s_stage:\n  d_modifiers:\n    OutputDistillationModifier:\n      distill_scale: 2.0\n"
        )
    recipe = Recipe.from_yaml(RECIPE.replace("re:model.layers.\\\\d+$", "re:.*nothing$"))
    with pytest.raises(ValueError, match="match no module"):
        CompressionSession().initialize(
            model=tiny_llama, recipe=recipe, teacher_model=copy.deepcopy(tiny_llama)
        )
