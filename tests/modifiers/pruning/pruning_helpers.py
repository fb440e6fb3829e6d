"""Training and calibration loops that drive a session, shared by the pruning tests."""

from __future__ import annotations

import torch


def train(model, session, optimizer, batches, accumulate=1, after_step=None):
    """A plain loop: the session watches ``optimizer``; ``after_step`` runs after each step."""
    model.train()
    for i, batch in enumerate(batches):
        session.batch_start(batch_data=batch)
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        loss = session.loss_calculated(out.loss)
        (loss / accumulate).backward()
        if (i + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
            if after_step is not None:
                after_step()
        session.batch_end()


@torch.no_grad()
def calibrate(model, session, batches):
    """One-shot calibration: the events a calibration pipeline sends, data run in between."""
    model.eval()
    session.calibration_epoch_start()
    for batch in batches:
        model(**batch)
    session.calibration_epoch_end()


def zero_fraction(tensor: torch.Tensor) -> float:
    return (tensor == 0).float().mean().item()
