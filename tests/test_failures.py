"""What a run says of the shards it could not commit: the summary names the first 20 and the failure file,
`DIR/_failed.json` lists them all and goes away once a run commits every shard."""

from pipeline.tokenize.summary import FAILED_NAMED, JobSummary
from pipeline.tokens.records import read_failed, write_failed


def test_summary_names_the_first_failures_and_the_file():
    summary = JobSummary(shards_total=30, failed_file="s3://b/out/_failed.json")
    for i in range(25):
        summary.fail(f"s3://b/in/s-{i:02d}.tar", f"OSError: boom {i}", attempts=4)
    lines = summary.format().splitlines()
    named = [line for line in lines if line.startswith("FAILED s-")]
    assert [line.split()[1] for line in named] == [f"s-{i:02d}:" for i in range(FAILED_NAMED)]
    assert "FAILED ... and 5 more" in lines
    assert lines[-1].startswith("failed shards: 25, each listed in s3://b/out/_failed.json")
    assert summary.exit_code == 1
    assert summary.failure_list()[24] == {
        "url": "s3://b/in/s-24.tar", "stem": "s-24", "error": "OSError: boom 24", "attempts": 4
    }  # fmt: skip


def test_failure_file_round_trip_and_removal(tmp_path):
    failed = [{"url": str(tmp_path / "a.tar"), "stem": "a", "error": "ShardUnreadable: x", "attempts": 1}]
    write_failed(str(tmp_path), failed)
    assert read_failed(str(tmp_path)) == failed
    write_failed(str(tmp_path), [])  # a run that committed every shard: no failure file
    assert not (tmp_path / "_failed.json").exists() and read_failed(str(tmp_path)) == []
    write_failed(str(tmp_path), [])  # (absent already: nothing to do, no error)
