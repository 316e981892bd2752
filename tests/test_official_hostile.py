"""The converter under hostile input: bounded configs, shapes checked before building, damaged zips, equal
outputs, one-line errors, and an unpickler that imports nothing (docs/BAD_INPUT.md, "Converter")."""

import copy
import io
import json
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import gq
import gq.official
from gq.checkpoint import CheckpointError
from gq.official import from_official, model_config_from_official, read_config
from jobs.convert import main as convert

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "official-gq"
CKPT, YAML = str(FIXTURE / "official-a.ckpt"), str(FIXTURE / "official-a.yaml")


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURE / "official-a.expected.pt", weights_only=True)


def _one_line_error(capsys, argv: list[str]) -> str:
    """Run jobs/convert.py in-process: exit 2 and exactly one `error:` line on stderr."""
    assert convert(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def _laughs(levels: int, width: int = 10) -> str:
    """Billion laughs: each level a list of `width` aliases of the level before (width^levels values)."""
    lines = ["a0: &a0 [lol]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def _chain(steps: int, inline: bool) -> dict:
    """`a{i}` = twice `a{i-1}`: as text (`${a}${a}`) or as a list of two whole-value interpolations."""
    config = {"a0": "lol"}
    for i in range(1, steps + 1):
        ref = f"${{a{i - 1}}}"
        config[f"a{i}"] = ref + ref if inline else [ref, ref]
    return config


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (_laughs(9), "expands past 100000 values"),  # 10^9 values in 1 KB
        (_laughs(5), "expands past 100000 values"),  # 111,111: small enough to expand, still refused
        ("a: &a [x]\nb: [" + ", ".join(["*a"] * 101) + "]\n", "more than 100 aliases"),
        ("a: &a [*a]\n", "contains itself"),  # a recursive alias
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 64 levels"),
        ("a: " + "x" * (1 << 20) + "\n", "larger than 1048576 bytes"),
        ("a: !!timestamp 2024-01-01\n", "a date value"),
        ("a: !!binary aGVsbG8=\n", "a bytes value"),
        ("? [1, 2]\n: x\n", "not valid YAML"),
        ("1: x\nb: y\n", "key 1 is not text"),
    ],
)
def test_hostile_yaml_is_refused_before_expanding(tmp_path, text, reason):
    path = _write(tmp_path, "bomb.yaml", text)
    with pytest.raises(CheckpointError, match=reason) as error:
        read_config(path)
    assert str(error.value).startswith(f"config {path}: ") and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (_chain(16, inline=True), "expands past 65536 characters"),  # 2^17 characters
        (_chain(30, inline=True), "expands past 65536 characters"),  # 2^31: minutes before the bound
        (_chain(17, inline=False), "expand past 100000 values"),
        ({"a": "${b}", "b": "${a}"}, "refers to itself"),
        ({"a": "${b.c}", "b": 3}, "names no field"),
    ],
)
def test_interpolations_are_bounded(config, reason):
    with pytest.raises(CheckpointError, match=reason):
        read_config(config)


def test_interpolation_resolves_once_per_path_and_through_interpolations():
    config = {"a": {"b": [1, 2]}, "c": "${a}", "d": "${c.b}", "e": "x${c.b}"}
    assert read_config(config) == {"a": {"b": [1, 2]}, "c": {"b": [1, 2]}, "d": [1, 2], "e": "x[1, 2]"}
    plain = yaml.safe_load(Path(YAML).read_text())  # the published layout, read by PyYAML alone
    params = plain["model"]["params"]
    params["decoder_config"]["params"] = copy.deepcopy(params["encoder_config"]["params"])
    resolved = read_config(YAML)
    assert resolved == plain
    params = resolved["model"]["params"]
    assert params["decoder_config"]["params"] is not params["encoder_config"]["params"]  # copies, as before


def test_alias_bomb_through_the_job_is_one_line(tmp_path, capsys):
    bomb = _write(tmp_path, "bomb.yaml", _laughs(9))
    out = str(tmp_path / "out.safetensors")
    line = _one_line_error(capsys, ["from-official", "--checkpoint", CKPT, "--config", bomb, "--output", out])
    assert "expands past" in line and not Path(out).exists()


def _both(**fields):
    def change(params):
        for part in ("encoder_config", "decoder_config"):
            params[part]["params"].update(fields)

    return change


def _edited(*changes) -> dict:
    config = copy.deepcopy(read_config(YAML))
    for change in changes:
        change(config["model"]["params"])
    return config


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ch": 4096}, "ch = 4096 does not match the checkpoint"),
        ({"num_res_blocks": 1e6}, "num_res_blocks = 1000000 does not match the checkpoint"),
        ({"ch_mult": [1] * 1000, "attn_resolutions": []}, r"len\(ch_mult\) = 1000 does not match"),
        ({"ch_mult": [1, 2, 4]}, r"ch \* ch_mult\[2\] = 128 does not match"),
        ({"z_channels": 64}, "2 \\* z_channels = 128 does not match"),
    ],
)
def test_config_is_checked_against_the_checkpoint_before_building(monkeypatch, fields, message):
    def never(*args, **kwargs):
        raise AssertionError("the network was built before the checkpoint's shapes were checked")

    monkeypatch.setattr(gq.official.checkpoint, "GQVAE", never)
    with pytest.raises(CheckpointError, match=message):
        from_official(CKPT, _edited(_both(**fields)))


def _flipped(tmp_path: Path, member: str, count: int = 64) -> str:
    """The fixture with `count` bytes inverted inside one zip member's stored data."""
    data = bytearray(Path(CKPT).read_bytes())
    at = zipfile.ZipFile(CKPT).getinfo(member).header_offset
    name_length, extra_length = struct.unpack_from("<HH", data, at + 26)  # the local header's own
    start = at + 30 + name_length + extra_length + 64
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    (tmp_path / "flipped.ckpt").write_bytes(data)
    return str(tmp_path / "flipped.ckpt")


def test_damaged_tensor_in_a_zip_checkpoint_is_refused(tmp_path, capsys):
    member = "official-a/data/0"
    flipped = _flipped(tmp_path, member)
    assert torch.load(flipped, weights_only=True)  # torch alone reads the damaged weight without a word
    out = str(tmp_path / "out.safetensors")
    line = _one_line_error(
        capsys, ["from-official", "--checkpoint", flipped, "--config", YAML, "--output", out]
    )
    assert "damaged" in line and f"Bad CRC-32 for file '{member}'" in line and not Path(out).exists()


def test_checkpoint_saved_without_crcs_still_converts(tmp_path, expected):
    checkpoint = torch.load(CKPT, weights_only=True)
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(checkpoint, tmp_path / "no-crc.ckpt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert {i.CRC for i in zipfile.ZipFile(tmp_path / "no-crc.ckpt").infolist()} == {0}
    model = from_official(str(tmp_path / "no-crc.ckpt"), YAML)
    assert torch.equal(model.tokenize(expected["images"]), expected["indices"].permute(0, 2, 3, 1))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    path = tmp_path_factory.mktemp("ours") / "a.safetensors"
    model = from_official(CKPT, YAML)
    gq.save(model, str(path), model.provenance)
    return path


@pytest.mark.parametrize(
    ("output", "config_output"),
    [
        ("m.ckpt", "m.ckpt"),
        ("m.ckpt", "./sub/../m.ckpt"),
        ("m.ckpt", "{tmp}/m.ckpt"),
        ("m.ckpt", "link/m.ckpt"),  # `link` is a symbolic link to the folder
        ("m.yaml", None),  # the default config path is the output's with .yaml: the same file
    ],
)
def test_to_official_refuses_one_file_for_both_outputs(
    tmp_path, monkeypatch, capsys, converted, output, config_output
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path)
    (tmp_path / output).write_bytes(b"the user's file")
    argv = ["to-official", "--checkpoint", str(converted), "--output", output, "--force"]
    if config_output:
        argv += ["--config-output", config_output.format(tmp=tmp_path)]
    assert "the same file as" in _one_line_error(capsys, argv)
    assert (tmp_path / output).read_bytes() == b"the user's file"


def test_from_official_refuses_its_input_as_output(tmp_path, capsys):
    config = tmp_path / "a.yaml"
    config.write_bytes(Path(YAML).read_bytes())
    argv = ["from-official", "--checkpoint", CKPT, "--config", str(config), "--output", str(config)]
    argv += ["--force"]
    assert "the same file as" in _one_line_error(capsys, argv)
    assert config.read_bytes() == Path(YAML).read_bytes()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda p: p["regularizer_config"]["params"].update(group=0), "group = 0"),
        (lambda p: p["regularizer_config"]["params"].update(group=-4), "group = -4"),
        (lambda p: p["regularizer_config"].update(params=[1, 2]), "regularizer_config.params is a list"),
        (lambda p: p.update(loss_config=[1]), "model.params.loss_config is a list"),
        (lambda p: p["loss_config"]["params"].update(regularization_weights=[1]), "weights is a list"),
        (lambda p: p["encoder_config"].update(params=[1]), "encoder_config.params is a list"),
        (lambda p: p["loss_config"]["params"]["regularization_weights"].update(kl_loss=[1]), "TypeError"),
    ],
)
def test_wrong_types_are_one_line_config_errors(change, field):
    with pytest.raises(CheckpointError, match=field) as error:
        model_config_from_official(_edited(change))
    assert str(error.value).startswith("config: ") and "\n" not in str(error.value)
    assert str(error.value).count("config: ") == 1  # worded once


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("group: 4", "group: 0", "group = 0"),
        ("ch: 32", "ch: 2024-01-01", r"params: invalid literal .*'2024-01-01'"),
    ],
)
def test_yaml_text_errors_through_the_job_are_one_line(tmp_path, capsys, old, new, message):
    config = _write(tmp_path, "bad.yaml", Path(YAML).read_text().replace(old, new))
    argv = ["from-official", "--checkpoint", CKPT, "--config", config, "--output", str(tmp_path / "o")]
    assert re.search(message, _one_line_error(capsys, argv))


def test_yaml_date_stays_text_and_foreign_epoch_is_ignored(tmp_path, capsys, expected):
    text = (
        Path(YAML).read_text().replace("disc_start: 20001", "disc_start: 20001\n        trained: 2024-01-01")
    )
    config = _write(tmp_path, "dated.yaml", text)
    checkpoint = torch.load(CKPT, weights_only=True)
    checkpoint |= {"epoch": torch.tensor(3), "global_step": {"step": 1.5}}
    torch.save(checkpoint, tmp_path / "foreign.ckpt")
    out = tmp_path / "out.safetensors"
    argv = ["from-official", "--checkpoint", str(tmp_path / "foreign.ckpt"), "--config", config]
    assert convert([*argv, "--output", str(out)]) == 0, capsys.readouterr().err
    model = gq.load(str(out))
    official = model.provenance["official"]
    assert official["config"]["params"]["loss_config"]["params"]["trained"] == "2024-01-01"
    assert official["epoch"] is None and official["global_step"] is None
    assert {"epoch", "global_step"} <= set(official["ignored_entries"])
    assert torch.equal(model.tokenize(expected["images"]), expected["indices"].permute(0, 2, 3, 1))


class _Pid:
    def __init__(self, pid):
        self.pid = pid


class _PidPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Pid) else None


def _with_pickle(path: Path, pickled: bytes) -> str:
    """The fixture's zip with its data.pkl replaced and no tensor data."""
    source = zipfile.ZipFile(CKPT)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            if info.filename.endswith("data.pkl"):
                out.writestr(info.filename, pickled)
            elif "/data/" not in info.filename:
                out.writestr(info.filename, source.read(info))
    return str(path)


@pytest.mark.parametrize("pid", [("foo", 1), 5, (), ("storage",), ("storage", "FloatStorage", "0", "cpu", 1)])
def test_malformed_persistent_id_is_a_damaged_file(tmp_path, pid):
    buffer = io.BytesIO()
    _PidPickler(buffer, protocol=2).dump({"state_dict": {"encoder.conv_in.weight": _Pid(pid)}})
    path = _with_pickle(tmp_path / "pid.ckpt", buffer.getvalue())
    with pytest.raises(CheckpointError, match="damaged or not a PyTorch checkpoint") as error:
        from_official(path, YAML)
    assert "\n" not in str(error.value)


def test_unpickler_resolves_an_allow_list_and_imports_nothing(tmp_path):
    """Globals naming torch's lazily imported submodules stay inert placeholders, and are never imported
    (a fresh interpreter: this one may have imported them already)."""
    globals_ = [
        ("torch", "_dynamo"),
        ("torch", "_inductor"),
        ("torch", "onnx"),
        ("torch._inductor.config", "x"),
    ]
    pickled = (
        b"\x80\x02]q\x00(" + b"".join(f"c{m}\n{n}\n".encode() for m, n in globals_) + b"ctorch\nfloat32\ne."
    )
    path = _with_pickle(tmp_path / "lazy.ckpt", pickled)
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from gq.official.unpickler import Inert, load_checkpoint
        lazy = ["torch._dynamo", "torch._inductor", "torch.onnx"]
        before = [m for m in lazy if m in sys.modules]
        obj, skipped = load_checkpoint(Path({path!r}).read_bytes())
        after = [m for m in lazy if m in sys.modules]
        inert = [isinstance(o, type) and issubclass(o, Inert) for o in obj]
        print(json.dumps(dict(before=before, after=after, skipped=skipped, inert=inert, last=str(obj[-1]))))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["before"] == [] and seen["after"] == []
    assert seen["skipped"] == [f"{m}.{n}" for m, n in globals_]
    assert seen["inert"] == [True] * len(globals_) + [False] and seen["last"] == "torch.float32"
