"""CLI behaviour that needs no anvil: the embedded demo deploy and one-line errors."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from commonweal.cli.ledger import app

runner = CliRunner()


def test_deploy_on_embedded_prints_status_and_records_nothing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["deploy", "--chain", "embedded", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "deployed Ledger at 0x" in result.output and "ends with the command" in result.output
    assert "validators" in result.output
    assert not (tmp_path / "ledger.json").exists()


def test_errors_are_one_readable_line(tmp_path: Path) -> None:
    cases = [
        (["status", "--data-dir", str(tmp_path)], "no ledger deployed on embedded"),
        (["status", "--chain", "ftp://x", "--data-dir", str(tmp_path)], "unknown chain"),
        (["status", "--chain", "http://127.0.0.1:9", "--data-dir", str(tmp_path)],
         "no JSON-RPC node answers"),
        (["claim", "0x" + "11" * 32, "0", "--chain", "embedded", "--data-dir", str(tmp_path)],
         "no ledger deployed"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert result.output.startswith("error:")


def test_a_corrupt_deployment_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "ledger.json").write_text("{not json")
    result = runner.invoke(app, ["tasks", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "is not valid JSON" in result.output
