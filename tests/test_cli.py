"""Options generated from config dataclasses: every field, its documentation as help, values round trip."""

import argparse
import dataclasses

import pytest

from gq.losses import LossConfig
from jobs import train_vae
from pipeline.cli import add_dataclass_arguments, field_docs
from pipeline.train.config import TrainSettings


def test_train_vae_options_are_the_settings_fields():
    args, s = train_vae.parse_args(
        ["--preset", "small-f8c16", "--data", "d/*.tar", "--output", "out", "--bpp", "1.0", "--gpu",
         "--no-keep-step-exports", "--disc-start", "7", "--disc-lr", "3e-5", "--val-data", "v.tar"]
    )  # fmt: skip
    expected = TrainSettings(
        preset="small-f8c16", data="d/*.tar", output="out", bpp=1.0, gpu=True, keep_step_exports=False,
        val_data="v.tar", loss=LossConfig(disc_start=7, disc_lr=3e-5),
    )  # fmt: skip
    assert s == expected
    defaults = train_vae.parse_args(["--preset", "paper-f8c16", "--data", "x", "--output", "o"])[1]
    assert defaults == TrainSettings(preset="paper-f8c16", data="x", output="o")
    with pytest.raises(SystemExit):
        train_vae.parse_args(["--preset", "small-f8c16", "--data", "x", "--output", "o", "--bpp", "0.3"])


def test_help_is_each_fields_documentation():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainSettings, skip=("loss",))
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    names = {f.name for f in dataclasses.fields(TrainSettings)} - {"loss"}
    assert set(helps) == names
    docs = field_docs(TrainSettings)
    assert helps["max_failures"] == docs["max_failures"] and "Ray Train" in helps["max_failures"]
    assert all(helps[n] for n in names)  # every field is documented
