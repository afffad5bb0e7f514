"""The learning-rate schedule against transformers' (the release trained with its Trainer):
`get_cosine_schedule_with_warmup` driving a torch optimizer, with the Trainer's warmup length
`TrainingArguments.get_warmup_steps` (ceil(warmup_ratio * steps)).

Tolerance: 3e-7 of the peak learning rate (optax evaluates the schedule in float32, whose cosine
is good to a few 1e-8; the warmup off by one step would be off by peak / warmup)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

from stjax.train.step import OptimConfig

PEAK = 8e-5


def transformers_lrs(steps: int, warmup_ratio: float) -> np.ndarray:
    """The learning rate of each optimizer step of a Trainer run of `steps` steps."""
    # the Trainer's own rule (called on a stand-in: building TrainingArguments needs accelerate)
    warmup = transformers.TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=warmup_ratio), steps)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=PEAK)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.asarray(lrs)


@pytest.mark.parametrize("warmup_ratio", [0.1, 0.0, 0.03])
@pytest.mark.parametrize("steps", [1, 7, 30, 37, 157, 1000])
def test_schedule_equals_transformers_cosine_with_warmup(steps, warmup_ratio):
    schedule = OptimConfig(learning_rate=PEAK, total_steps=steps, warmup_ratio=warmup_ratio).schedule()
    ours = np.asarray([float(schedule(k)) for k in range(steps)])
    np.testing.assert_allclose(ours, transformers_lrs(steps, warmup_ratio), rtol=0, atol=3e-7 * PEAK)
