"""Encoder precision: `auto` is bfloat16 only on CPUs with native bf16; _run.json keeps the resolved one."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from pipeline.tokenize import precision
from pipeline.tokenize.precision import cpu_flags, native_bf16, resolve_encoder_precision

REPO = Path(__file__).resolve().parents[1]
SHARD = REPO / "assets/samples/photos-000000.tar"


def test_native_bf16_needs_the_flag_and_avx512_kernels():
    assert native_bf16({"avx2", "avx512f", "avx512_bf16"}, "AVX512")
    assert native_bf16({"avx512f", "amx_bf16", "amx_tile"}, "AVX512")
    assert not native_bf16({"avx2", "fma"}, "AVX2")  # the AVX2 EPYC
    assert not native_bf16({"avx512f", "avx512bw"}, "AVX512")  # AVX-512 without BF16 (e.g. Skylake-X)
    assert not native_bf16({"avx512f", "avx512_bf16"}, "AVX2")  # ATEN_CPU_CAPABILITY=avx2 on a bf16 CPU


def test_cpu_flags_read_proc_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t\t: none\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == set()


def test_auto_resolves_by_cpu_and_explicit_bf16_warns_only_where_emulated():
    assert resolve_encoder_precision("auto", gpu=False, native=True) == ("bfloat16", None)
    assert resolve_encoder_precision("auto", gpu=False, native=False) == ("float32", None)
    assert resolve_encoder_precision("auto", gpu=True, native=True) == ("float32", None)
    assert resolve_encoder_precision("float32", gpu=False, native=True) == ("float32", None)
    assert resolve_encoder_precision("bfloat16", gpu=False, native=True) == ("bfloat16", None)
    assert resolve_encoder_precision("bfloat16", gpu=True, native=False) == ("bfloat16", None)
    chosen, warning = resolve_encoder_precision("bfloat16", gpu=False, native=False)
    assert chosen == "bfloat16" and "6.6x slower" in warning and "native bf16" in warning
    with pytest.raises(ValueError, match="precision"):
        resolve_encoder_precision("float16", gpu=False)


def run_without_ray(monkeypatch, tmp_path, checkpoint, native: bool, *extra: str) -> int:
    """jobs/tokenize.py's main up to its run record, with Ray and the actors stubbed out."""
    from jobs import tokenize

    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    monkeypatch.setattr(tokenize, "run_job", lambda *a: types.SimpleNamespace(format=str, exit_code=0))
    monkeypatch.setitem(
        sys.modules, "ray", types.SimpleNamespace(init=lambda **k: None, shutdown=lambda: None)
    )
    args = ["--input", str(SHARD), "--output", str(tmp_path / "out"), "--checkpoint", checkpoint, *extra]
    return tokenize.main(args)


def test_the_run_record_pins_the_resolved_precision_and_a_resume_cannot_mix(
    monkeypatch, tmp_path, small_checkpoint, capsys
):
    assert run_without_ray(monkeypatch, tmp_path, small_checkpoint, native=True) == 0
    record = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert record["preprocessing"]["encoder_precision"] == "bfloat16"
    assert record["preprocessing"]["batch_size"] == 32  # bf16 tokens depend on the batch: pinned too
    capsys.readouterr()
    # resumed on a CPU without native bf16, auto keeps the recorded precision (warned), never mixes
    assert run_without_ray(monkeypatch, tmp_path, small_checkpoint, native=False) == 0
    assert "6.6x slower" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "_run.json").read_text())["preprocessing"]["encoder_precision"] == (
        "bfloat16"
    )
    # an explicit other precision is refused, not mixed
    assert (
        run_without_ray(monkeypatch, tmp_path, small_checkpoint, True, "--encoder-precision", "float32") == 2
    )
    assert "encoder_precision" in capsys.readouterr().err
    # so is another batch size: the same images would get other bf16 tokens (issue 26, item 13)
    assert run_without_ray(monkeypatch, tmp_path, small_checkpoint, True, "--batch-size", "10") == 2
    err = capsys.readouterr().err
    assert "different run" in err and "'batch_size': 10" in err and err.count("\n") == 1


def test_bf16_token_files_record_their_batch_size_and_float32_ones_need_not(
    monkeypatch, tmp_path, small_checkpoint
):
    from pipeline.tokenize.processor import ShardTokenizer, TokenizeOptions
    from pipeline.tokens.records import check_run

    for chosen, want in (("bfloat16", 5), ("float32", None)):
        opts = TokenizeOptions(image_size=64, batch_size=5, encoder_precision=chosen)
        meta = ShardTokenizer(small_checkpoint, opts).file_metadata()  # every token file's `gq` metadata
        assert meta["preprocessing"].get("batch_size") == want
    # float32: the batch size stays a throughput knob, a resume may change it
    assert (
        run_without_ray(monkeypatch, tmp_path, small_checkpoint, True, "--encoder-precision", "float32") == 0
    )
    assert "batch_size" not in json.loads((tmp_path / "out" / "_run.json").read_text())["preprocessing"]
    args = ("--encoder-precision", "float32", "--batch-size", "7")
    assert run_without_ray(monkeypatch, tmp_path, small_checkpoint, True, *args) == 0
    # a bf16 record from before the batch size was recorded: its settings say which it was
    pre = TokenizeOptions(image_size=64, batch_size=8, encoder_precision="bfloat16").preprocessing()
    old = {
        "preprocessing": {k: v for k, v in pre.items() if k != "batch_size"},
        "settings": {"batch_size": 8},
    }
    check_run(old, {"preprocessing": pre})
    with pytest.raises(ValueError, match="different run"):
        check_run(old, {"preprocessing": pre | {"batch_size": 16}})


def test_auto_keeps_the_precision_of_a_run_it_resumes():
    # a directory written before auto existed (float32) resumes on a bf16 CPU, instead of being refused
    assert resolve_encoder_precision("auto", gpu=False, native=True, recorded="float32") == ("float32", None)
    assert resolve_encoder_precision("auto", gpu=True, recorded="bfloat16") == ("bfloat16", None)
    assert resolve_encoder_precision("float32", gpu=False, native=True, recorded="bfloat16") == (
        "float32",
        None,
    )
