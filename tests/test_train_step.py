"""The Ray-free training step on the small preset: its losses add up, and the first five of a seeded run
equal the golden file's (a silent change of numbers fails here; regenerate with GQ_UPDATE_GOLDEN=1)."""

import json
import os
from pathlib import Path

import torch

import gq
from gq.losses import LossConfig
from pipeline.train.step import SCALARS, build_trainee, train_step

GOLDEN = Path(__file__).resolve().parent / "golden" / "train_step_first5.json"
LOSS = LossConfig(l2_weight=0.5, disc_start=3, disc_channels=16, disc_layers=2)  # the GAN from step 3


def images(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 40, 40, generator=g), 9, stride=1)
    return smooth * 2 - 1  # (2, 3, 32, 32) in [-1, 1], some structure to reconstruct


def test_first_five_steps_match_the_golden_losses_and_add_up():
    t = build_trainee(gq.model_config("small-f8c16", 0.25), LOSS, lr=1e-3, seed=0, device=torch.device("cpu"))
    rows = []
    for step in range(1, 6):
        values, kl = train_step(t, images(step), step, LOSS)
        row = dict(zip(SCALARS, values.tolist(), strict=True))
        assert abs(
            row["loss"] - (row["rec"] + row["kl_loss"] + row["d_weight"] * row["g_loss"])
        ) < 1e-6 * abs(row["loss"])
        assert (row["g_loss"] != 0) == (step >= 3) and (row["d_loss"] != 0) == (step >= 3)
        rows.append(row)
    assert int(t.model.tdc.updates) == 5 and float(t.model.tdc.lam) != 1.0  # TDC stepped once per step
    if os.environ.get("GQ_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(rows, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    for got, want in zip(rows, golden, strict=True):
        for name in SCALARS:  # float32 kernels differ a little between CPUs (AVX2 / AVX-512)
            assert abs(got[name] - want[name]) <= 1e-3 * max(1.0, abs(want[name])), (name, got, want)
