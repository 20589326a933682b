"""Data tests of the ingest stage: a corpus of bad inputs and the shipped TalkingData files.

Each corpus case is a few small files written by the test itself, run through the real
entry point (``jobs.ingest.main``), with its expected outcome: accepted rows, quarantine
reasons with counts and result fields, or the fatal message and exit code.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from jobs import ingest
from jobs.common import storage
from jobs.common.datasets import TALKINGDATA, TALKINGDATA_CSV_COLUMNS

# Logging is configured by main(); tests keep pytest's own handlers instead.
CONFIGURE_LOGGING = "jobs.ingest.cli.configure_logging"

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "talkingdata"
ORIGINAL = SHARED_DATA / "train_sample.csv"
RESAVED = SHARED_DATA / "train_sample_resaved.csv"

HEADER = ",".join(TALKINGDATA_CSV_COLUMNS)
R1 = "87540,12,1,13,497,2017-11-07 09:30:38,,0"
R2 = "105560,25,1,17,259,2017-11-07 13:40:27,,0"
R3 = "224120,19,0,29,213,2017-11-08 02:22:13,2017-11-08 02:22:38,1"
R4 = "101424,12,1,19,212,2017-11-07 18:05:24,,0"
ROWS = (R1, R2, R3, R4)
# The header of TalkingData's unlabelled test file.
TEST_HEADER = "click_id,ip,app,device,os,channel,click_time"
CANONICAL = "YYYY-MM-DD HH:MM:SS"
# Bad-row cases raise the share limit so the quarantine itself can be checked.
TOLERANT = ("--max-quarantine-share", "1")


def csv_bytes(*lines: str, header: str = HEADER, eol: str = "\n") -> bytes:
    """A CSV file: the header, then ``lines``, each ended by ``eol``."""
    return "".join(line + eol for line in (header, *lines)).encode()


@dataclass(frozen=True)
class Case:
    """One corpus file set and what ingesting it must give.

    :param id: the test id; the main file is written as ``<id>.csv``.
    :param content: the main file's bytes (ignored when ``files`` is given).
    :param files: several files by name, for directory and glob inputs.
    :param input: what ``--input`` names, relative to the case directory.
    :param args: extra flags.
    :param rows: accepted rows expected (None for fatal cases).
    :param quarantined: expected ``quarantined_by_reason``.
    :param result: other result fields and their expected values.
    :param notes: substrings expected in ``header_notes``.
    :param error: substrings expected in the fatal message (exit code 2).
    """

    id: str
    content: bytes = b""
    files: dict[str, bytes] = field(default_factory=dict)
    input: str | None = None
    args: tuple[str, ...] = ()
    rows: int | None = None
    quarantined: dict[str, int] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    error: tuple[str, ...] = ()


def _large_with_bad_byte() -> bytes:
    """Over 64 KiB of good rows, then one line that is not UTF-8, then one more good row."""
    good = [f"{1000 + i},12,1,13,497,2017-11-07 09:{i % 60:02d}:{i % 59:02d},,0" for i in range(2000)]
    return csv_bytes(*good) + b"5,12,1,13,497,2017-11-07 09:30:38,,0\xff\n" + (R2 + "\n").encode()


CASES = [
    # Headers.
    Case("clean", csv_bytes(*ROWS), rows=4, result={"timestamp_formats": {CANONICAL: 5}, "positives": 1}),
    Case("bom", b"\xef\xbb\xbf" + csv_bytes(*ROWS), rows=4, notes=("byte-order mark",)),
    Case(
        "stray_chars_before_header",
        "\u00ef\u00bb\u00bf".encode() + csv_bytes(*ROWS),
        rows=4,
        notes=("stray characters 'ï»¿' before the first column name",),
    ),
    Case("stray_hash_before_header", b"# " + csv_bytes(*ROWS), rows=4, notes=("stray characters '# '",)),
    Case(
        "repeated_header_mid_file",
        csv_bytes(R1, R2, HEADER, R3, R4),
        rows=4,
        result={"skipped_lines": {"repeated_header": 1}},
        notes=("line 4: header repeated inside the data",),
    ),
    Case(
        "repeated_header_with_bom",
        csv_bytes(R1, R2) + b"\xef\xbb\xbf" + csv_bytes(R3, R4),
        rows=4,
        result={"skipped_lines": {"repeated_header": 1}},
    ),
    Case(
        "reordered_columns",
        csv_bytes("12,87540,1,13,497,2017-11-07 09:30:38,,0", header=HEADER.replace("ip,app", "app,ip")),
        rows=1,
        notes=("columns in a different order",),
    ),
    Case(
        "wrong_header",
        csv_bytes(*ROWS, header=HEADER.replace("channel", "chan")),
        error=(
            "wrong_header.csv: line 1",
            "expected columns",
            "missing: ['channel']",
            "unexpected: ['chan']",
        ),
    ),
    Case(
        "missing_label_column",
        csv_bytes("1,87540,12,1,13,497,2017-11-07 09:30:38", header=TEST_HEADER),
        error=("missing_label_column.csv: line 1", "label column 'is_attributed' is missing", "click_id"),
    ),
    Case(
        "wrong_header_mid_file",
        csv_bytes(R1, TEST_HEADER, "1,2,3,4,5,6,2017-11-07 09:30:38"),
        error=("wrong_header_mid_file.csv: line 3", "repeated inside the data", "'is_attributed' is missing"),
    ),
    Case(
        "cr_only_line_endings",
        csv_bytes(*ROWS, eol="\r"),
        error=("cr_only_line_endings.csv: line 1", "CR-only line endings"),
    ),
    Case("empty_file", b"", error=("empty_file.csv: the file is empty",)),
    Case("blank_lines_only", b"\n \n\r\n", error=("blank_lines_only.csv: the file is empty",)),
    Case("header_only", csv_bytes(), error=("no data rows", "header_only.csv")),
    Case("binary_file", bytes(range(256)) * 16, error=("binary_file.csv: not a text CSV file", "NUL byte")),
    Case("gzip_file", gzip.compress(csv_bytes(*ROWS), mtime=0), error=("gzip_file.csv", "gzip-compressed")),
    Case("utf16_file", csv_bytes(*ROWS).decode().encode("utf-16"), error=("utf16_file.csv", "UTF-16")),
    Case(
        "latin1_file",
        csv_bytes(*ROWS, header=HEADER.replace("os", "ös")).decode().encode("latin-1"),
        error=("latin1_file.csv: not a UTF-8 text CSV file", "0xf6"),
    ),
    # Line endings and blank lines.
    Case("crlf_line_endings", csv_bytes(*ROWS, eol="\r\n"), rows=4, notes=("CRLF line endings",)),
    Case(
        "trailing_blank_lines",
        csv_bytes(*ROWS) + b"\n\n  \n",
        rows=4,
        result={"skipped_lines": {"blank": 3}},
    ),
    Case("no_final_newline", csv_bytes(*ROWS)[:-1], rows=4),
    Case("blank_line_mid_file", csv_bytes(R1, "", R2), rows=2, result={"skipped_lines": {"blank": 1}}),
    # Timestamps.
    Case(
        "bad_timestamp",
        csv_bytes(R1, "1,2,3,4,5,2017-13-45 25:00:00,,0", "1,2,3,4,5,yesterday,,0", R2),
        args=TOLERANT,
        rows=2,
        quarantined={"bad_timestamp": 2},
    ),
    Case(
        "minute_resolution",
        csv_bytes(
            "87540,12,1,13,497,11/7/2017 9:30,,0",
            "224120,19,0,29,213,11/8/2017 2:22,11/8/2017 2:22,1",
        ),
        rows=2,
        result={"lost_seconds_rows": 2, "timestamp_formats": {"M/D/YYYY H:MM": 3}},
    ),
    Case(
        "mixed_formats",
        csv_bytes(
            R1,
            "105560,25,1,17,259,2017-11-07T13:40:27,,0",
            "224120,19,0,29,213,11/8/2017 2:22:13,11/8/2017 2:22:38,1",
            "101424,12,1,19,212,11/7/2017 18:05,,0",
        ),
        rows=4,
        result={
            "lost_seconds_rows": 1,
            "timestamp_formats": {
                CANONICAL: 1,
                "YYYY-MM-DDTHH:MM:SS": 1,
                "M/D/YYYY H:MM:SS": 2,
                "M/D/YYYY H:MM": 1,
            },
        },
    ),
    Case(
        "day_first_date",
        csv_bytes(R1, "1,2,3,4,5,13/11/2017 9:30,,0"),
        args=TOLERANT,
        rows=1,
        quarantined={"bad_timestamp": 1},
    ),
    # Types, nulls and ranges.
    Case(
        "non_integer_id",
        csv_bytes(
            R1,
            "87a40,12,1,13,497,2017-11-07 09:30:38,,0",
            "87540,12.0,1,13,497,2017-11-07 09:30:38,,0",
        ),
        args=TOLERANT,
        rows=1,
        quarantined={"bad_type": 2},
    ),
    Case(
        "null_in_required_column",
        csv_bytes(
            R1,
            "87540,,1,13,497,2017-11-07 09:30:38,,0",
            "1,2,NA,4,5,2017-11-07 09:30:38,,0",
            "1,2,3,4,5,,,0",
        ),
        args=TOLERANT,
        rows=1,
        quarantined={"null_value": 3},
    ),
    Case("null_marker_in_attributed_time", csv_bytes("1,2,3,4,5,2017-11-07 09:30:38,NA,0"), rows=1),
    Case(
        "negative_id",
        csv_bytes(R1, "-5,12,1,13,497,2017-11-07 09:30:38,,0", "5,12,-1,13,497,2017-11-07 09:30:38,,0"),
        args=TOLERANT,
        rows=1,
        quarantined={"out_of_range": 2},
    ),
    Case(
        "label_2",
        csv_bytes(R1, "5,12,1,13,497,2017-11-07 09:30:38,2017-11-07 09:31:00,2"),
        args=TOLERANT,
        rows=1,
        quarantined={"out_of_range": 1},
    ),
    Case(
        "id_overflow",
        csv_bytes(
            R1,
            "5,2147483648,1,13,497,2017-11-07 09:30:38,,0",
            "123456789012345678901,1,1,1,1,2017-11-07 09:30:38,,0",
        ),
        args=TOLERANT,
        rows=1,
        quarantined={"out_of_range": 2},
    ),
    Case(
        "label_and_download_disagree",
        csv_bytes(
            R1,
            "5,12,1,13,497,2017-11-07 09:30:38,,1",
            "6,12,1,13,497,2017-11-07 09:30:38,2017-11-07 09:31:00,0",
            "7,12,1,13,497,2017-11-07 09:30:38,2017-11-07 09:29:00,1",
        ),
        args=TOLERANT,
        rows=1,
        quarantined={"inconsistent": 3},
    ),
    Case(
        "wrong_field_count",
        csv_bytes(R1, "5,12,1,13,497,2017-11-07 09:30:38,0", R1 + ",extra", R2),
        args=TOLERANT,
        rows=2,
        quarantined={"bad_field_count": 2},
    ),
    Case(
        "quoted_and_padded_fields",
        csv_bytes(
            '"87540","12","1","13","497","2017-11-07 09:30:38","","0"',
            " 5 , 12,1 ,13,497, 2017-11-07 09:30:38 ,,0",
        ),
        rows=2,
    ),
    Case(
        "invalid_utf8_after_first_64k",
        _large_with_bad_byte(),
        args=TOLERANT,
        rows=2001,
        quarantined={"bad_encoding": 1},
    ),
    # Duplicates.
    Case(
        "exact_repeat_in_one_file_kept",
        csv_bytes(R1, R2, R1),
        args=("--chunk-rows", "1"),
        rows=3,
        result={"exact_repeat_rows": 1},
    ),
    Case(
        "exact_repeat_quarantined_by_policy",
        csv_bytes(R1, R1, R2),
        args=("--duplicates", "rows", *TOLERANT),
        rows=2,
        quarantined={"duplicate": 1},
    ),
    Case(
        "minute_resolution_repeat_kept_by_rows_policy",
        csv_bytes("87540,12,1,13,497,11/7/2017 9:30,,0", "87540,12,1,13,497,11/7/2017 9:30,,0"),
        args=("--duplicates", "rows"),
        rows=2,
        result={"exact_repeat_rows": 1, "lost_seconds_rows": 2},
    ),
    Case(
        "same_click_different_time_kept",
        csv_bytes(R1, R1.replace("09:30:38", "09:30:39"), R1.replace("09:30:38", "09:31:38")),
        args=("--duplicates", "rows"),
        rows=3,
        result={"exact_repeat_rows": 0},
    ),
    Case(
        "duplicate_across_files",
        files={"a.csv": csv_bytes(R1, R2), "b.csv": csv_bytes(R2, R3), "notes.txt": b"not read"},
        input=".",
        args=TOLERANT,
        rows=3,
        quarantined={"duplicate": 1},
    ),
    Case(
        "duplicate_after_repeated_header",
        csv_bytes(R1, R2, HEADER, R2, R3),
        args=TOLERANT,
        rows=3,
        quarantined={"duplicate": 1},
        result={"skipped_lines": {"repeated_header": 1}},
    ),
    # Inputs and the share limit.
    Case("glob_input", files={"b.csv": csv_bytes(R3, R4), "a.csv": csv_bytes(R1, R2)}, input="*.csv", rows=4),
    Case(
        "missing_input",
        files={"a.csv": csv_bytes(R1)},
        input="nope.csv",
        error=("nope.csv", "no such file"),
    ),
    Case("directory_without_csv", files={"a.txt": csv_bytes(R1)}, input=".", error=("no .csv files",)),
    Case(
        "quarantine_share_over_limit",
        csv_bytes(R1, R2, "1,2,3,4,5,2017-13-45 25:00:00,,0", R3),
        error=(
            "quarantined 1 of 4 rows (25.00%)",
            "--max-quarantine-share 1.00%",
            "bad_timestamp: 1 (first at",
            "quarantine_share_over_limit.csv line 4: click_time: '2017-13-45 25:00:00'",
        ),
    ),
]


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the stage in-process; returns its exit code and stderr."""
    try:
        code = ingest.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def write_case(case: Case, root: Path) -> str:
    """Write the case's files under ``root``; returns the ``--input`` value."""
    files = case.files or {f"{case.id}.csv": case.content}
    for name, content in files.items():
        (root / name).write_bytes(content)
    return str(root / (case.input or f"{case.id}.csv"))


def check_outputs(result: dict[str, Any]) -> tuple[pa.Table, pa.Table]:
    """Invariants of every accepted run: counts, schemas and event ids."""
    assert result["rows_read"] == result["rows"] + result["rows_quarantined"]
    assert result["rows_quarantined"] == sum(result["quarantined_by_reason"].values())
    raw = storage.read_table(result["raw_uri"])
    quarantine = storage.read_table(result["quarantine_uri"])
    assert raw.schema == TALKINGDATA.arrow_schema()
    assert quarantine.schema == ingest.QUARANTINE_SCHEMA
    assert raw.num_rows == result["rows"]
    assert quarantine.num_rows == result["rows_quarantined"]
    reasons, counts = np.unique(quarantine["reason"].to_numpy(zero_copy_only=False), return_counts=True)
    assert dict(zip(reasons.tolist(), counts.tolist(), strict=True)) == result["quarantined_by_reason"]
    ids = np.sort(np.concatenate([raw["event_id"].to_numpy(), quarantine["event_id"].to_numpy()]))
    np.testing.assert_array_equal(ids, np.arange(result["rows_read"]))
    assert raw.column("is_attributed").to_numpy().sum() == result["positives"]
    return raw, quarantine


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_corpus(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    """Each corpus case is accepted with its expected counts or fails with its message."""
    monkeypatch.setattr(CONFIGURE_LOGGING, lambda verbose=False: None)
    source = tmp_path / "in"
    source.mkdir()
    input_uri = write_case(case, source)
    result_path = tmp_path / "result.json"
    output = tmp_path / "raw"
    code, err = run_main(
        ["--input", input_uri, "--output", str(output), "--result-path", str(result_path), *case.args], capsys
    )

    # Fatal cases: a one-line message, exit code 2, no accepted output.
    if case.error:
        assert code == 2, err
        assert "Traceback" not in err
        message = err.strip().splitlines()[-1]
        assert message.startswith("error: ")
        for part in case.error:
            assert part in message
        assert not output.exists()
        assert not result_path.exists()
        # Only a run that got as far as the share check leaves its quarantine to inspect.
        assert (tmp_path / "raw_quarantine").exists() == ("--max-quarantine-share" in message)
        return

    # Accepted cases: the counts, the result fields and the notes.
    assert code == 0, err
    result = json.loads(result_path.read_text())
    assert result["rows"] == case.rows
    assert result["quarantined_by_reason"] == case.quarantined
    for key, expected in case.result.items():
        assert result[key] == expected, key
    for note in case.notes:
        assert any(note in line for line in result["header_notes"]), (note, result["header_notes"])
    if not case.notes:
        assert not any("stray" in line or "byte-order" in line for line in result["header_notes"])
    check_outputs(result)


def test_quarantine_keeps_raw_text_and_location(tmp_path: Path, capsys, monkeypatch):
    """A quarantined row keeps its raw fields, file, line, event id, reason and a detail naming the column."""
    monkeypatch.setattr(CONFIGURE_LOGGING, lambda verbose=False: None)
    path = tmp_path / "mixed.csv"
    path.write_bytes(csv_bytes(R1, "", " -5 ,12,1,13,497,2017-11-07 09:30:38,,0", "short,line", R2))
    result_path = tmp_path / "result.json"
    argv = ["--input", str(path), "--output", str(tmp_path / "raw"), "--result-path", str(result_path)]
    code, err = run_main([*argv, *TOLERANT], capsys)
    assert code == 0, err
    _, quarantine = check_outputs(json.loads(result_path.read_text()))
    rows = quarantine.sort_by("line_number").to_pylist()
    assert [(r["line_number"], r["event_id"], r["reason"]) for r in rows] == [
        (4, 1, "out_of_range"),
        (5, 2, "bad_field_count"),
    ]
    assert rows[0]["source_file"] == str(path)
    assert rows[0]["ip"] == " -5 "
    assert rows[0]["detail"] == "ip: ' -5 ' is outside [0, 9223372036854775807]"
    assert rows[1]["raw_line"] == "short,line"
    assert rows[1]["ip"] is None
    assert rows[1]["detail"] == "2 fields, expected 8"


def test_rerun_gives_identical_output(tmp_path: Path, capsys, monkeypatch):
    """Ingesting the same input twice writes byte-identical parquet parts and the same result."""
    monkeypatch.setattr(CONFIGURE_LOGGING, lambda verbose=False: None)
    path = tmp_path / "in.csv"
    path.write_bytes(csv_bytes(R1, R2, "1,2,3,4,5,bad,,0", R3, HEADER, R4, R1))
    runs = []
    for attempt in range(2):
        result_path = tmp_path / f"result-{attempt}.json"
        argv = ["--input", str(path), "--output", str(tmp_path / "raw"), "--result-path", str(result_path)]
        code, err = run_main([*argv, *TOLERANT], capsys)
        assert code == 0, err
        parts = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.glob("raw*/*.parquet")}
        runs.append((result_path.read_text(), parts))
    assert runs[0] == runs[1]
    assert len(runs[0][1]) == 2


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], pa.Table]]:
    """Both shipped files ingested once with the defaults (result and accepted table)."""
    if not (ORIGINAL.is_file() and RESAVED.is_file()):
        pytest.skip(f"TalkingData sample not found in {SHARED_DATA.resolve()} (the shared data directory)")
    root = tmp_path_factory.mktemp("shipped")
    out = {}
    for path in (ORIGINAL, RESAVED):
        config = ingest.IngestConfig(input=str(path), output=str(root / path.stem))
        result = ingest.ingest(config)
        out[path.stem] = (result, storage.read_table(result["raw_uri"]))
    return out


def test_original_sample_is_accepted_whole(shipped):
    """The published sample: 100,000 rows, 227 positives, nothing quarantined, seconds kept."""
    result, table = shipped["train_sample"]
    assert (result["rows_read"], result["rows"], result["rows_quarantined"]) == (100_000, 100_000, 0)
    assert result["positives"] == 227
    assert result["timestamp_formats"] == {CANONICAL: 100_227}
    assert result["lost_seconds_rows"] == 0
    assert result["header_notes"] == []
    # One pair of identical rows (same ip, app, device, os, channel and second): kept as two clicks.
    assert result["exact_repeat_rows"] == 1
    assert table.schema == TALKINGDATA.arrow_schema()
    np.testing.assert_array_equal(table["event_id"].to_numpy(), np.arange(100_000))
    assert table["attributed_time"].null_count == 100_000 - 227
    assert table["click_time"].null_count == 0
    first = table.slice(0, 1).to_pylist()[0]
    assert [first[name] for name in ("ip", "app", "device", "os", "channel")] == [87540, 12, 1, 13, 497]
    assert first["click_time"].isoformat() == "2017-11-07T09:30:38+00:00"


def test_resaved_sample_keeps_every_row_and_reports_lost_seconds(shipped):
    """The spreadsheet copy: every row kept and flagged as minute resolution, at its original minute."""
    result, table = shipped["train_sample_resaved"]
    original = shipped["train_sample"][1]
    assert (result["rows_read"], result["rows"], result["rows_quarantined"]) == (100_000, 100_000, 0)
    assert result["positives"] == 227
    assert result["lost_seconds_rows"] == 100_000
    assert result["timestamp_formats"] == {"M/D/YYYY H:MM": 100_227}
    assert any("CRLF" in note for note in result["header_notes"])
    assert table.schema == TALKINGDATA.arrow_schema()
    for name in ("event_id", "ip", "app", "device", "os", "channel", "is_attributed"):
        assert table[name].equals(original[name]), name
    minute_us = 60 * 1_000_000
    for name in ("click_time", "attributed_time"):
        assert table[name].is_null().equals(original[name].is_null()), name
        resaved = table[name].drop_null().cast(pa.int64()).to_numpy()
        expected = original[name].drop_null().cast(pa.int64()).to_numpy() // minute_us * minute_us
        np.testing.assert_array_equal(resaved, expected)
