"""The README demo (jobs/demo.py): the bundled photos through the real Ray pipeline and back."""

import re

import numpy as np
import pytest
import torch

import gq
from gq.metrics import psnr, to_uint8
from jobs.demo import SAMPLES, main
from pipeline.data.decode import Decoded, decode_sample
from pipeline.data.stages import shard_samples

pytestmark = pytest.mark.slow


def test_demo_tokenizes_decodes_and_reports(tmp_path, small_checkpoint, capsys):
    assert main(["--checkpoint", small_checkpoint, "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1/1 committed" in out and "images: 8, 1024 tokens each (32x32x1, K = 65536)" in out
    reported = float(re.search(r"PSNR, GQ tokens decoded: +([0-9.]+) dB", out).group(1))
    # Independently: the same preprocessed photos tokenized and decoded in-process.
    images = [decode_sample(s, image_size=256) for s in shard_samples(str(SAMPLES))]
    x = torch.from_numpy(np.stack([d.image for d in images if isinstance(d, Decoded)]))
    model = gq.load(small_checkpoint)
    expected = psnr(x, to_uint8(model.detokenize(model.tokenize(x)))).mean().item()
    assert reported == pytest.approx(expected, abs=0.01)
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert len(list((tmp_path / "tokens").glob("*.parquet"))) == 1
