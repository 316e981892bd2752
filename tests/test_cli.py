"""Options generated from config dataclasses: every field, its documentation as help, values round trip."""

import argparse
import dataclasses

import pytest

from gq.losses import LossConfig
from jobs import train_vae
from pipeline.cli import add_config_arguments, components, config_from_args, field_docs
from pipeline.data.decode import DecodeLimits
from pipeline.evaluate.audit import AuditSettings
from pipeline.evaluate.report import EvalJob, EvalSettings
from pipeline.train.config import TrainSettings


def test_train_vae_options_are_the_settings_fields():
    args, s = train_vae.parse_args(
        ["--preset", "small-f8c16", "--data", "d/*.tar", "--output", "out", "--bpp", "1.0", "--gpu",
         "--no-keep-step-exports", "--disc-start", "7", "--disc-lr", "3e-5", "--val-data", "v.tar"]
    )  # fmt: skip
    expected = TrainSettings.of(
        preset="small-f8c16", data="d/*.tar", output="out", bpp=1.0, gpu=True, keep_step_exports=False,
        val_data="v.tar", loss=LossConfig(disc_start=7, disc_lr=3e-5),
    )  # fmt: skip
    assert s == expected
    defaults = train_vae.parse_args(["--preset", "paper-f8c16", "--data", "x", "--output", "o"])[1]
    assert defaults == TrainSettings.of(preset="paper-f8c16", data="x", output="o")
    with pytest.raises(SystemExit):
        train_vae.parse_args(["--preset", "small-f8c16", "--data", "x", "--output", "o", "--bpp", "0.3"])


def test_help_is_each_fields_documentation():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainSettings)
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    parts = components(TrainSettings)
    assert set(parts) == {"model", "inputs", "optim", "loss", "scaling", "schedule"}
    docs = field_docs(TrainSettings)
    names = {f.name for f in dataclasses.fields(TrainSettings)} - set(parts)
    for kind in parts.values():
        docs |= field_docs(kind)
        names |= {f.name for f in dataclasses.fields(kind)}
    assert set(helps) == names  # every field of every component is an option, none twice
    assert helps["max_failures"] == docs["max_failures"] and "Ray Train" in helps["max_failures"]
    assert all(helps[n] for n in names)  # every field is documented


def test_flat_records_of_older_runs_read_as_components():
    """run.json and checkpoints written before the components held the 24 settings flat."""
    flat = {
        "preset": "small-f8c16", "data": "d", "output": "o", "val_data": None, "bpp": 0.5, "workers": 2,
        "gpu": False, "cpus_per_worker": 1, "max_steps": 30, "batch_size": 4, "lr": 2e-4, "image_size": 64,
        "kl_mode": "tdc", "kl_weight": 1.0, "loss": LossConfig(disc_start=7).to_dict(),
        "checkpoint_every": 10, "keep_checkpoints": 2, "max_failures": 1, "val_every": 1000,
        "val_images": 256, "log_every": 10, "keep_step_exports": True, "decode_threads": 2, "seed": 3,
    }  # fmt: skip
    s = TrainSettings.from_dict(flat)
    assert (s.model.bpp, s.inputs.batch_size, s.optim.lr, s.scaling.workers, s.schedule.checkpoint_every) == (
        0.5, 4, 2e-4, 2, 10,
    )  # fmt: skip
    assert s.loss.disc_start == 7 and s.seed == 3 and s.scaling.max_failures == 1
    assert TrainSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown"):
        TrainSettings.from_dict(flat | {"no_such_setting": 1})


def test_nested_components_and_declared_spellings_round_trip():
    """EvalJob -> EvalSettings -> DecodeLimits: every depth becomes options and is built back; option(...)
    metadata gives --no-progress, a store_true flag, choices with argparse's own strings."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, EvalJob)
    by_dest = {a.dest: a for a in parser._actions}
    assert {"min_side", "max_aspect", "max_pixels", "max_member_bytes", "image_size", "no_progress"} <= set(
        by_dest
    )
    assert by_dest["no_progress"].option_strings == ["--no-progress"] and by_dest["audit"].nargs == 0
    assert by_dest["rule"].choices == ("posterior", "mean") and by_dest["rule"].type is None
    assert by_dest["max_aspect"].type is float and by_dest["max_aspect"].default == DecodeLimits().max_aspect
    titles = {g.title for g in parser._action_groups}
    assert {"settings", "limits"} <= titles
    argv = ["--checkpoint", "c", "--data", "d", "--output", "o", "--no-progress", "--audit", "--rule", "mean",
            "--min-side", "9", "--max-aspect", "2.5", "--limit", "7"]  # fmt: skip
    job = config_from_args(EvalJob, parser.parse_args(argv))
    assert job == EvalJob(
        checkpoint="c", data="d", output="o", progress=False, audit=True,
        settings=EvalSettings(rule="mean", limit=7, limits=DecodeLimits(min_side=9, max_aspect=2.5)),
    )  # fmt: skip
    assert config_from_args(EvalJob, parser.parse_args(argv[:6])) == EvalJob("c", "d", "o")
    with pytest.raises(ValueError, match="--max-aspect"):  # the component's own check
        config_from_args(EvalJob, parser.parse_args([*argv[:6], "--max-aspect", "0.5"]))


def test_nargs_become_tuples_and_derived_fields_are_no_options():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, AuditSettings)
    dests = {a.dest for a in parser._actions}
    assert "read" not in dests and "limit" not in dests  # `read` is derived in __post_init__
    base = ["--checkpoint", "c", "--input", "i", "--output", "o"]
    s = config_from_args(AuditSettings, parser.parse_args([*base, "--codebook-bits", "8", "12"]))
    assert s.codebook_bits == (8, 12) and s.read == EvalSettings(image_size=256, batch_size=8, limit=256)
    with pytest.raises(ValueError, match="1..20"):
        config_from_args(AuditSettings, parser.parse_args([*base, "--codebook-bits", "21"]))
    with pytest.raises(ValueError, match="--batch-size"):  # EvalSettings' check, through `read`
        config_from_args(AuditSettings, parser.parse_args([*base, "--batch-size", "0"]))


def test_a_field_without_a_command_line_type_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Odd:
        shape: tuple[int, int] = (1, 2)  # no option can hold this without option(type=..., nargs=...)

    with pytest.raises(TypeError, match="Odd.shape"):
        add_config_arguments(argparse.ArgumentParser(), Odd)
