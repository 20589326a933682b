"""Unit tests of ``jobs.ingest``: header rules, time parsing, event ids, chunking and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from jobs import ingest
from jobs.common import settings, storage
from jobs.common.datasets import TALKINGDATA, TALKINGDATA_CSV_COLUMNS

REPO = Path(__file__).resolve().parents[2]
# Logging is configured by main(); tests keep pytest's own handlers instead.
CONFIGURE_LOGGING = "jobs.ingest.cli.configure_logging"

HEADER = ",".join(TALKINGDATA_CSV_COLUMNS)
R1 = "87540,12,1,13,497,2017-11-07 09:30:38,,0"
R2 = "105560,25,1,17,259,2017-11-07 13:40:27,,0"
R3 = "224120,19,0,29,213,2017-11-08 02:22:13,2017-11-08 02:22:38,1"


def write_csv(path: Path, *lines: str, header: str = HEADER) -> Path:
    path.write_text("".join(line + "\n" for line in (header, *lines)))
    return path


def run(
    tmp_path: Path, input_uri: Path | str, name: str = "raw", **overrides
) -> tuple[dict, pa.Table, pa.Table]:
    """Ingest with the library call; returns the result, accepted and quarantined tables."""
    config = ingest.IngestConfig(input=str(input_uri), output=str(tmp_path / name), **overrides)
    result = ingest.ingest(config)
    return result, storage.read_table(result["raw_uri"]), storage.read_table(result["quarantine_uri"])


@pytest.mark.parametrize(
    ("line", "names", "note"),
    [
        (HEADER, list(TALKINGDATA_CSV_COLUMNS), None),
        ("\ufeff" + HEADER, list(TALKINGDATA_CSV_COLUMNS), "byte-order mark"),
        ("#!" + HEADER, list(TALKINGDATA_CSV_COLUMNS), "stray characters '#!'"),
        ('"ip", "app",' + HEADER.split(",", 2)[2], list(TALKINGDATA_CSV_COLUMNS), None),
        ("zip," + HEADER.split(",", 1)[1], ["zip", *TALKINGDATA_CSV_COLUMNS[1:]], None),
    ],
    ids=["plain", "bom", "stray", "quoted_and_spaced", "letter_prefix_is_not_stray"],
)
def test_split_header(line: str, names: list[str], note: str | None):
    """Only a BOM and non-alphanumeric characters before the first name are stripped."""
    found, notes = ingest.split_header(line)
    assert found == names
    if note is None:
        assert notes == []
    else:
        assert len(notes) == 1 and note in notes[0]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (list(TALKINGDATA_CSV_COLUMNS[:-1]), "label column 'is_attributed'"),
        ([*TALKINGDATA_CSV_COLUMNS, "click_id"], "unexpected: ['click_id']"),
        (["ip", *TALKINGDATA_CSV_COLUMNS[2:], "ip"], "missing: ['app']; repeated: ['ip']"),
    ],
    ids=["no_label", "extra_column", "repeated_column"],
)
def test_check_header_rejects(names: list[str], message: str):
    """A header that is not the TalkingData columns fails naming the place, expected and found columns."""
    with pytest.raises(ingest.IngestError) as info:
        ingest.check_header(names, "f.csv: line 1", ",".join(names))
    assert str(info.value).startswith("f.csv: line 1: ")
    assert message in str(info.value)
    assert str(list(TALKINGDATA_CSV_COLUMNS)) in str(info.value)


def test_check_header_accepts_any_order():
    """A permutation of the columns is a valid header (fields are mapped by name)."""
    ingest.check_header(list(reversed(TALKINGDATA_CSV_COLUMNS)), "f.csv: line 1", "")


def test_times_are_utc_microseconds_in_every_format(tmp_path: Path):
    """Each accepted format gives the same instant (to its resolution), as timestamp[us, UTC]."""
    stamps = {
        "YYYY-MM-DD HH:MM:SS": "2017-11-07 09:30:38",
        "YYYY-MM-DDTHH:MM:SS": "2017-11-07T09:30:38",
        "YYYY-MM-DDTHH:MM:SSZ": "2017-11-07T09:30:38Z",
        "M/D/YYYY H:MM:SS": "11/7/2017 9:30:38",
        "M/D/YYYY H:MM": "11/7/2017 9:30",
        "YYYY-MM-DD HH:MM": "2017-11-07 09:30",
    }
    assert set(stamps) == {fmt.name for fmt in ingest.TIMESTAMP_FORMATS}
    lines = [f"{i},1,1,1,1,{stamp},,0" for i, stamp in enumerate(stamps.values())]
    result, table, _ = run(tmp_path, write_csv(tmp_path / "t.csv", *lines))
    assert result["timestamp_formats"] == {name: 1 for name in stamps}
    assert result["lost_seconds_rows"] == 2
    assert table.schema.field("click_time").type == pa.timestamp("us", tz="UTC")
    seconds = table["click_time"].cast(pa.int64()).to_numpy() // 1_000_000
    full, minute = 1510047038, 1510047000
    np.testing.assert_array_equal(seconds, [full, full, full, full, minute, minute])


def test_event_id_counts_data_rows_across_files(tmp_path: Path):
    """Event ids count data rows across sorted files: blank and header lines take none, bad rows do."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_csv(folder / "b.csv", R3)
    write_csv(folder / "a.csv", R1, "", "1,2,3,4,5,bad time,,0", HEADER, R2)
    result, table, quarantine = run(tmp_path, folder, max_quarantine_share=1.0)
    assert result["input_files"] == [
        {"file": str(folder / "a.csv"), "rows_read": 3, "rows_quarantined": 1},
        {"file": str(folder / "b.csv"), "rows_read": 1, "rows_quarantined": 0},
    ]
    assert table["event_id"].to_pylist() == [0, 2, 3]
    assert table["ip"].to_pylist() == [87540, 105560, 224120]
    assert quarantine.select(["event_id", "line_number"]).to_pylist() == [{"event_id": 1, "line_number": 4}]
    assert result["skipped_lines"] == {"blank": 1, "repeated_header": 1}


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 7])
def test_chunking_does_not_change_the_output(tmp_path: Path, chunk_rows: int):
    """Any chunk size gives the same tables and counts as reading the input in one piece."""
    lines = [R1, R2, "", HEADER, R2, R1, "x,1,1,1,1,2017-11-07 09:30:38,,0", R3, R3, HEADER, R1, R2]
    path = write_csv(tmp_path / "c.csv", *lines)
    whole = run(tmp_path, path, "whole", max_quarantine_share=1.0)
    chunked = run(tmp_path, path, "chunked", max_quarantine_share=1.0, chunk_rows=chunk_rows)
    assert chunked[1].equals(whole[1])
    assert chunked[2].equals(whole[2])
    keys = ["rows_read", "rows", "quarantined_by_reason", "skipped_lines", "header_notes"]
    keys.append("exact_repeat_rows")
    assert {k: chunked[0][k] for k in keys} == {k: whole[0][k] for k in keys}
    # R2 and R1 repeat the first part after each repeated header; R3 repeats inside its part.
    assert whole[0]["quarantined_by_reason"] == {"bad_type": 1, "duplicate": 4}
    assert whole[0]["exact_repeat_rows"] == 1


def test_reordered_columns_give_the_canonical_table(tmp_path: Path):
    """A file with its columns in another order ingests to the same table as the canonical file."""
    canonical = write_csv(tmp_path / "canonical.csv", R1, R3)
    order = [5, 0, 7, 1, 2, 6, 3, 4]

    def permute(line: str) -> str:
        fields = line.split(",")
        return ",".join(fields[i] for i in order)

    reordered = write_csv(tmp_path / "reordered.csv", permute(R1), permute(R3), header=permute(HEADER))
    assert run(tmp_path, reordered, "b")[1].equals(run(tmp_path, canonical, "a")[1])


def test_seen_events_finds_hashes_across_merged_runs():
    """Lookups find every added hash with its source after many adds and merges; others are -1."""
    seen = ingest._SeenEvents()
    rng = np.random.default_rng(0)
    hashes = np.unique(rng.integers(0, np.iinfo(np.uint64).max, size=5100, dtype=np.uint64))[:5000]
    hashes = rng.permutation(hashes)
    for start in range(0, 4000, 250):
        seen.add(hashes[start : start + 250], np.full(250, start // 250, dtype=np.int64))
    assert len(seen) == 4000
    assert len(seen._runs) <= 6
    np.testing.assert_array_equal(seen.lookup(hashes[:4000]), np.repeat(np.arange(16), 250))
    np.testing.assert_array_equal(seen.lookup(hashes[4000:]), np.full(1000, -1))


def test_smoke_test_reads_only_the_first_rows(tmp_path: Path, capsys, monkeypatch):
    """--smoke-test stops after SMOKE_TEST_ROWS data rows."""
    monkeypatch.setattr(CONFIGURE_LOGGING, lambda verbose=False: None)
    lines = [f"{i},1,1,1,1,2017-11-07 09:30:38,,0" for i in range(ingest.SMOKE_TEST_ROWS + 500)]
    path = write_csv(tmp_path / "big.csv", *lines)
    result_path = tmp_path / "result.json"
    argv = ["--input", str(path), "--output", str(tmp_path / "raw"), "--result-path", str(result_path)]
    assert ingest.main([*argv, "--smoke-test", "--chunk-rows", "300"]) == 0
    result = json.loads(result_path.read_text())
    assert (result["rows_read"], result["rows"], result["max_rows"]) == (1000, 1000, 1000)
    assert storage.read_table(result["raw_uri"])["ip"].to_pylist() == list(range(1000))


def test_config_file_with_flag_overrides(tmp_path: Path, monkeypatch):
    """A --config JSON file sets fields, flags given win, and the output defaults to a path under home."""
    monkeypatch.setattr(CONFIGURE_LOGGING, lambda verbose=False: None)
    monkeypatch.setenv(settings.HOME_ENV_VAR, str(tmp_path / "home"))
    path = write_csv(tmp_path / "in.csv", R1, R1)
    config = tmp_path / "ingest.json"
    config.write_text(json.dumps({"input": str(path), "duplicates": "rows", "max_quarantine_share": 0.0}))
    result_path = tmp_path / "result.json"
    argv = ["--config", str(config), "--max-quarantine-share", "0.5", "--result-path", str(result_path)]
    assert ingest.main(argv) == 0
    result = json.loads(result_path.read_text())
    assert result["raw_uri"] == str(tmp_path / "home" / "raw" / "talkingdata")
    assert result["quarantine_uri"] == str(tmp_path / "home" / "raw" / "talkingdata_quarantine")
    assert result["quarantined_by_reason"] == {"duplicate": 1}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-quarantine-share", "1.5"], "max_quarantine_share=1.5 is not between 0 and 1"),
        (["--chunk-rows", "0"], "chunk_rows=0 must be at least 1"),
        ([], "no input given"),
    ],
    ids=["share_above_one", "zero_chunk", "no_input"],
)
def test_bad_settings_fail_with_a_message(argv: list[str], message: str, tmp_path: Path, capsys, monkeypatch):
    """Unusable settings stop the stage with exit code 2 and say which setting is wrong."""
    monkeypatch.setattr(CONFIGURE_LOGGING, lambda verbose=False: None)
    if argv:
        argv = ["--input", str(write_csv(tmp_path / "in.csv", R1)), "--output", str(tmp_path / "raw"), *argv]
    with pytest.raises(SystemExit) as info:
        ingest.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_list_input_files_sorts_and_skips_hidden(tmp_path: Path):
    """A directory gives its .csv files in sorted order, without hidden or underscore files; file:// works."""
    for name in ("b.csv", "a.CSV", ".hidden.csv", "_tmp.csv", "c.txt"):
        (tmp_path / name).write_text(HEADER + "\n")
    assert ingest.list_input_files(str(tmp_path)) == [str(tmp_path / "a.CSV"), str(tmp_path / "b.csv")]
    assert ingest.list_input_files(f"file://{tmp_path}/b*") == [str(tmp_path / "b.csv")]


def test_help_exits_zero():
    """``python -m jobs.ingest --help`` lists every flag and exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "jobs.ingest", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for flag in ("--input", "--output", "--quarantine-output", "--max-quarantine-share", "--chunk-rows"):
        assert flag in done.stdout
    assert "--smoke-test" in done.stdout


def test_accepted_schema_matches_the_spec(tmp_path: Path):
    """The accepted table has exactly the spec's schema, including non-nullable fields."""
    _, table, quarantine = run(tmp_path, write_csv(tmp_path / "s.csv", R1, R3))
    assert table.schema == TALKINGDATA.arrow_schema()
    assert [f.nullable for f in table.schema] == [c.nullable for c in TALKINGDATA.columns]
    assert quarantine.num_rows == 0 and quarantine.schema == ingest.QUARANTINE_SCHEMA
