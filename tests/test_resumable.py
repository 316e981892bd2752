"""pipeline.io.resumable, the one resumable output directory, and its three users: the plan compared field
by field (an older record's missing fields taking their implied values) and refused in one line naming the
fields, a DIR holding files but no plan record refused, commit records written, read back and listed, and a
killed run's temporary files removed only once the plan check has passed."""

import dataclasses
import json
import types

import fsspec
import pytest
from shardmaker import real_jpegs

from pipeline.io.resumable import PlanMismatch, ResumableDir, check_plan, differing, with_implied
from pipeline.pack.folder_shards import ShardingSettings, make_shards
from pipeline.tokenize.plan import prepare_output
from pipeline.tokens.records import RunMismatch, read_run, write_run
from pipeline.train.config import TrainSettings
from pipeline.train.run import write_run_json

TEMPORARY = ".x.json." + "0123456789abcdef" * 2 + ".tmp"  # atomic_open's name for a killed write of x.json


def test_plan_compared_field_by_field_with_implied_values():
    old = {"a": 1, "b": [1, 2]}  # a record from before "c" and "d" existed
    now = {"a": 1, "b": [1, 2], "c": "center", "d": 5}
    implied = {"c": "center", "d": 4, "e": 0}
    assert with_implied(old, now, implied) == {
        "a": 1,
        "b": [1, 2],
        "c": "center",
        "d": 4,
    }  # no "e": now lacks it
    assert differing(old, now, implied=implied) == ["d"]
    assert differing(old, now) == ["c", "d"]  # without implied values, absent is None
    assert differing(old, now, fields=["a", "b"]) == []
    check_plan(None, now, "never {detail}")  # no record: nothing to compare
    check_plan(old, now | {"d": 4}, "never {detail}", implied=implied)
    with pytest.raises(PlanMismatch) as caught:
        check_plan(old | {"d": 3}, now | {"a": 2}, "DIR holds another plan ({detail}): no", implied=implied)
    message = str(caught.value)
    assert message == "DIR holds another plan (a: 1 != 2; d: 3 != 5): no" and "\n" not in message
    with pytest.raises(ValueError, match=r"^\(a: <1> != <2>\)$"):  # limit and brief
        check_plan({"a": 1, "b": 1}, {"a": 2, "b": 2}, "({detail})", limit=1, brief=lambda v: f"<{v}>")


def test_plan_record_written_atomically_and_read_back(tmp_path):
    directory = ResumableDir(str(tmp_path / "out"), "_plan.json", "_done")
    assert directory.read_plan() is None
    plan = {"z": 1, "name": "é"}
    directory.write_plan(plan, sort_keys=True, ensure_ascii=False)
    assert (tmp_path / "out" / "_plan.json").read_text() == json.dumps(
        plan, indent=1, sort_keys=True, ensure_ascii=False
    )
    directory.write_plan(plan, end="\n", indent=2)
    assert (tmp_path / "out" / "_plan.json").read_text() == json.dumps(plan, indent=2) + "\n"
    assert directory.read_plan() == plan
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_plan.json"]  # no temporary left


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_commit_records_round_trip_and_listing(tmp_path, scheme):
    url = str(tmp_path / "out") if scheme == "local" else f"memory://{tmp_path.name}/out"
    directory = ResumableDir(url, "_plan.json", "_done")
    assert directory.committed() == set() and directory.read_record("a") is None
    records = {"shard-000001": {"rows": 1, "skipped": []}, "shard-000000": {"rows": 0, "x": [1.5, None]}}
    for name, record in records.items():
        directory.write_record(name, record)
    assert directory.committed() == set(records)
    assert {n: directory.read_record(n) for n in records} == records
    fs, path = fsspec.core.url_to_fs(directory.record_url("shard-000000"))
    assert json.loads(fs.cat_file(path)) == records["shard-000000"]
    fs.pipe_file(path.rsplit("/", 1)[0] + "/" + TEMPORARY, b"{")  # half a record, never a commit
    fs.pipe_file(path.rsplit("/", 1)[0] + "/_index-000000000.parquet", b"")  # not a record
    assert directory.committed() == set(records)
    with pytest.raises(ValueError, match="no commit records"):
        ResumableDir(url, "_plan.json").record_url("a")


def test_foreign_directory_is_told_by_its_plan_record(tmp_path):
    out = tmp_path / "out"
    directory = ResumableDir(str(out), "_plan.json", "_done")
    assert directory.foreign_entries() == []  # absent
    out.mkdir()
    assert directory.foreign_entries() == []  # empty
    (out / TEMPORARY).write_bytes(b"{")  # a killed first run's half-written plan record: ours
    assert directory.foreign_entries() == []
    (out / "mine.tar").write_bytes(b"user data")
    (out / "b.txt").write_bytes(b"")
    assert directory.foreign_entries() == ["b.txt", "mine.tar"]
    directory.write_plan({"a": 1})
    assert directory.foreign_entries() == []


def test_temporaries_removed_in_dir_and_record_dir_only(tmp_path):
    out = tmp_path / "out"
    (out / "_done" / "deeper").mkdir(parents=True)
    for folder in (out, out / "_done", out / "_done" / "deeper"):
        (folder / TEMPORARY).write_bytes(b"half")
        (folder / "x.json").write_bytes(b"{}")
    assert ResumableDir(str(out), "_plan.json", "_done").clear_temporaries() == [TEMPORARY, TEMPORARY]
    assert not (out / TEMPORARY).exists() and not (out / "_done" / TEMPORARY).exists()
    assert (out / "_done" / "deeper" / TEMPORARY).exists() and (out / "x.json").exists()
    assert ResumableDir(f"memory://{tmp_path.name}", "_plan.json").clear_temporaries() == []


def test_tokens_refuse_another_run_before_removing_temporaries(tmp_path):
    out = tmp_path / "tokens"
    run = {"model_sha256": "m", "codebook_fingerprint": "c", "quantizer": {}, "image_size": 64}
    run["preprocessing"] = {"views": "center", "view_names": ["center"]}
    write_run(str(out), run)
    (out / TEMPORARY).write_bytes(b"half")
    settings = types.SimpleNamespace(output=str(out), on_existing="skip")
    with pytest.raises(RunMismatch, match="image_size: 64 != 128"):
        prepare_output(settings, run | {"image_size": 128})
    assert (out / TEMPORARY).exists() and read_run(str(out)) == run
    old = run | {"preprocessing": {}}  # an older record: no views, which implied the center crop
    write_run(str(out), old)
    prepare_output(settings, run)
    assert not (out / TEMPORARY).exists() and read_run(str(out)) == run


def test_make_shards_refuses_another_plan_before_removing_temporaries(tmp_path):
    src = tmp_path / "img"
    src.mkdir()
    for i, data in enumerate(real_jpegs()[:3]):
        (src / f"{i}.jpg").write_bytes(data)
    out = tmp_path / "shards"
    settings = ShardingSettings(input=str(src), output=str(out), samples_per_shard=2, progress=False)
    assert make_shards(settings).images == 3
    plan = json.loads((out / "_make_shards.json").read_text())
    (out / TEMPORARY).write_bytes(b"half")
    (out / "_make_shards" / TEMPORARY).write_bytes(b"half")
    other = ShardingSettings(input=str(src), output=str(out), samples_per_shard=1, progress=False)
    with pytest.raises(ValueError, match=r"holds shards of another plan \(samples_per_shard: 2 != 1; shards"):
        make_shards(other)
    assert (out / TEMPORARY).exists() and (out / "_make_shards" / TEMPORARY).exists()
    older = {k: v for k, v in plan.items() if k not in ("classes", "max_file_bytes")}
    (out / "_make_shards.json").write_text(json.dumps(older))  # from before those fields: implied
    summary = make_shards(settings)
    assert (summary.shards_before, summary.images) == (2, 3)
    assert not (out / TEMPORARY).exists() and not (out / "_make_shards" / TEMPORARY).exists()
    assert json.loads((out / "_make_shards.json").read_text()) == plan


def test_training_refuses_another_model_before_removing_temporaries(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    settings = TrainSettings.of(preset="small-f8c16", data="d", output=str(out), image_size=64, bpp=0.5)
    write_run_json(out, settings, "abc")
    write_run_json(out, model(settings, kl_weight=0.1), None)  # a restart may change the KL weight
    record = json.loads((out / "run.json").read_text())
    assert [s["git_commit"] for s in record["starts"]] == ["abc", None]
    assert (out / "run.json").read_text().endswith("}\n")
    (out / TEMPORARY).write_bytes(b"half")
    for change, named in (
        ({"kl_mode": "kl"}, "kl_mode='tdc'"),
        ({"bpp": 1.0}, "bpp=0.5, tokens=None, bits=None"),
    ):
        with pytest.raises(ValueError, match=f"holds a run with {named}; use another --output"):
            write_run_json(out, model(settings, **change), None)
    assert (out / TEMPORARY).exists() and json.loads((out / "run.json").read_text()) == record
    write_run_json(out, settings, None)
    assert not (out / TEMPORARY).exists() and len(json.loads((out / "run.json").read_text())["starts"]) == 3


def model(settings: TrainSettings, **change) -> TrainSettings:
    return dataclasses.replace(settings, model=dataclasses.replace(settings.model, **change))
