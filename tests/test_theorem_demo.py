from jobs.theorem import main


def test_theorem_demo_runs_and_round_trips(capsys):
    assert main(["--codebook-size", "1024", "--dim", "8", "--queries", "256", "--offsets", "-2", "2"]) == 0
    out = capsys.readouterr().out
    assert "equals the selected codebook vectors: True" in out
    assert "10.0" in out and "8.0" in out and "12.0" in out  # target and both rates are reported
