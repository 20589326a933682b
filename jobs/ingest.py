"""Ingest TalkingData AdTracking click logs (CSV) into the pipeline's raw layout.

``python -m jobs.ingest --input train.csv --output var/raw/talkingdata`` reads one CSV,
a directory of CSVs or a glob (files concatenated in sorted order) and writes two
parquet datasets: the accepted events, with exactly ``TALKINGDATA.arrow_schema()``, and
the quarantined rows, with their raw text, where they came from and why they were
rejected. The input is streamed in chunks of ``--chunk-rows`` lines and validated with
vectorized pandas operations.

The data contract, by reason code (each quarantined row carries exactly one, the first
that applies in this order):

* ``bad_encoding``: the line is not valid UTF-8 (only past the first 64 KiB of a file;
  a file that is not UTF-8 text from its start is rejected whole).
* ``bad_field_count``: the line does not have one field per header column.
* ``null_value``: a required column is empty (or holds a null marker such as ``NA``).
  Only ``attributed_time`` may be empty.
* ``bad_type``: an id column or the label is not a plain integer.
* ``bad_timestamp``: a time matches none of :data:`TIMESTAMP_FORMATS`.
* ``out_of_range``: a negative id, an id beyond its column's integer type, a label other
  than 0 or 1.
* ``inconsistent``: the label and ``attributed_time`` disagree (``is_attributed=1``
  without a download time, a download time with ``is_attributed=0``) or the download
  comes before the click.
* ``duplicate``: an event repeated from an earlier *source*, that is, from another input
  file or from an earlier part of a file made by concatenating files (the parts are
  separated by repeated headers). The first occurrence is kept. Exact repeats inside one
  source are kept and counted as ``exact_repeat_rows``: TalkingData times have
  one-second resolution, so two identical rows are two clicks in the same second, which
  is signal (``--duplicates rows`` quarantines them too, except for rows whose
  timestamps lost their seconds; ``--duplicates off`` checks nothing).

Header lines are checked, not quarantined: a UTF-8 byte-order mark, stray
non-alphanumeric characters before the first column name, CRLF line endings and a
different column order are accepted and noted in ``header_notes``; a header repeated
inside the data (concatenated files) and blank lines are skipped and counted in
``skipped_lines``; a wrong header, a missing label column, an empty file and a file that
is not text stop the stage at once with a message naming the file and line.

``event_id`` is the 0-based position of a row among the data rows of the whole input,
files taken in sorted order, where a data row is every line that is neither blank nor a
header (the first line of a file or a header repeated inside it). Quarantined rows take
their ids too, so an accepted row's id depends only on the lines before it, not on
whether they were accepted. For one file with a single header and no blank lines it is
the physical line number minus 2.

Times are read as UTC. Spreadsheet-resaved files (``M/D/YYYY H:MM``) have lost their
seconds; they are accepted, and such rows are counted in ``lost_seconds_rows``.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import io
import logging
import posixpath
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from itertools import islice
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from jobs.common import cli, settings, storage
from jobs.common.datasets import TALKINGDATA, TALKINGDATA_CSV_COLUMNS

logger = logging.getLogger(__name__)

# Largest share of data rows that may be quarantined before the stage fails.
DEFAULT_MAX_QUARANTINE_SHARE = 0.01

# Lines read and validated at once; bounds the memory of the pandas string columns.
DEFAULT_CHUNK_ROWS = 250_000

# Data rows read with --smoke-test.
SMOKE_TEST_ROWS = 1_000

# Bytes at the start of each file checked for binary content and UTF-8 before parsing.
SNIFF_BYTES = 64 * 1024

# Longest accepted header line, in bytes.
MAX_HEADER_BYTES = 64 * 1024

# Suffix of the default quarantine output, appended to --output.
QUARANTINE_SUFFIX = "_quarantine"

# Reason codes, in the order they are checked.
BAD_ENCODING = "bad_encoding"
BAD_FIELD_COUNT = "bad_field_count"
NULL_VALUE = "null_value"
BAD_TYPE = "bad_type"
BAD_TIMESTAMP = "bad_timestamp"
OUT_OF_RANGE = "out_of_range"
INCONSISTENT = "inconsistent"
DUPLICATE = "duplicate"
REASONS = (
    BAD_ENCODING,
    BAD_FIELD_COUNT,
    NULL_VALUE,
    BAD_TYPE,
    BAD_TIMESTAMP,
    OUT_OF_RANGE,
    INCONSISTENT,
    DUPLICATE,
)

# Lines that are not data rows, skipped and counted.
SKIPPED_BLANK = "blank"
SKIPPED_REPEATED_HEADER = "repeated_header"

# Duplicate policies: across sources only, also exact repeats inside a source, none.
DUPLICATES_SOURCES = "sources"
DUPLICATES_ROWS = "rows"
DUPLICATES_OFF = "off"
DUPLICATE_POLICIES = (DUPLICATES_SOURCES, DUPLICATES_ROWS, DUPLICATES_OFF)

# Field values read as missing. Spreadsheets and other tools write these for empty cells.
NULL_TOKENS = frozenset(
    {"", "NA", "na", "N/A", "n/a", "#N/A", "NaN", "nan", "NAN", "null", "NULL", "Null", "None", "none"}
)

ID_COLUMNS = ("ip", "app", "device", "os", "channel")
TIME_COLUMNS = ("click_time", "attributed_time")
LABEL = TALKINGDATA.label

_BOM = "\ufeff"
# 18 digits always fit an int64; longer integers are out of range for every column.
_MAX_DIGITS = 18
_STRAY_PREFIX = re.compile(r"([^A-Za-z0-9_]+)([A-Za-z_][A-Za-z0-9_]*)")

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("line_number", pa.int64(), nullable=False),
        pa.field("event_id", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("raw_line", pa.string(), nullable=False),
    ]
    + [pa.field(name, pa.string(), nullable=True) for name in TALKINGDATA_CSV_COLUMNS]
)


@dataclass(frozen=True)
class TimestampFormat:
    """One accepted way of writing a time.

    :param name: the format as shown in results and messages.
    :param pattern: the ``strptime`` pattern handed to ``pd.to_datetime``.
    :param has_seconds: False when the format drops seconds (spreadsheet re-saves).
    """

    name: str
    pattern: str
    has_seconds: bool = True


# Accepted time formats; the first is the published one. A value matches at most one, so
# the order they are tried in only affects speed. Day-first dates (D/M/YYYY) are not
# accepted: they cannot be told apart from M/D/YYYY.
TIMESTAMP_FORMATS = (
    TimestampFormat("YYYY-MM-DD HH:MM:SS", "%Y-%m-%d %H:%M:%S"),
    TimestampFormat("YYYY-MM-DDTHH:MM:SS", "%Y-%m-%dT%H:%M:%S"),
    TimestampFormat("YYYY-MM-DDTHH:MM:SSZ", "%Y-%m-%dT%H:%M:%SZ"),
    TimestampFormat("M/D/YYYY H:MM:SS", "%m/%d/%Y %H:%M:%S"),
    TimestampFormat("M/D/YYYY H:MM", "%m/%d/%Y %H:%M", has_seconds=False),
    TimestampFormat("YYYY-MM-DD HH:MM", "%Y-%m-%d %H:%M", has_seconds=False),
)


class IngestError(Exception):
    """A problem with the input or the configuration that stops the stage.

    The message is meant for the user: it names the file, line and column at fault.
    """


@dataclass(frozen=True)
class IngestConfig:
    """What one ingest run reads, writes and tolerates.

    :param input: CSV file, directory of ``*.csv`` files or glob; a path or URI.
    :param output: parquet dataset directory for the accepted events.
    :param quarantine_output: parquet dataset directory for quarantined rows; empty for
        ``output`` + ``_quarantine``.
    :param max_quarantine_share: the stage fails when a larger share of data rows is
        quarantined.
    :param chunk_rows: lines read and validated at once.
    :param duplicates: duplicate policy: ``sources``, ``rows`` or ``off``.
    :param max_rows: stop after this many data rows (``None``: read everything).
    """

    input: str
    output: str
    quarantine_output: str = ""
    max_quarantine_share: float = DEFAULT_MAX_QUARANTINE_SHARE
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    duplicates: str = DUPLICATES_SOURCES
    max_rows: int | None = None

    @property
    def quarantine_uri(self) -> str:
        """Where quarantined rows go: ``quarantine_output`` or the output's sibling."""
        return self.quarantine_output or self.output.rstrip("/") + QUARANTINE_SUFFIX

    def validate(self) -> None:
        """Raise :class:`IngestError` for values no run can use."""
        if not self.input:
            raise IngestError("no input given (--input)")
        if not self.output:
            raise IngestError("no output given (--output)")
        if not 0.0 <= self.max_quarantine_share <= 1.0:
            raise IngestError(f"max_quarantine_share={self.max_quarantine_share} is not between 0 and 1")
        if self.chunk_rows < 1:
            raise IngestError(f"chunk_rows={self.chunk_rows} must be at least 1")
        if self.duplicates not in DUPLICATE_POLICIES:
            choices = ", ".join(DUPLICATE_POLICIES)
            raise IngestError(f"duplicates={self.duplicates!r}; choose one of {choices}")
        if self.max_rows is not None and self.max_rows < 1:
            raise IngestError(f"max_rows={self.max_rows} must be at least 1")

    @classmethod
    def from_file(cls, uri: str, **overrides: Any) -> IngestConfig:
        """Load a config from a JSON object of field values; ``overrides`` win."""
        try:
            values = storage.read_json(uri)
        except (OSError, ValueError) as exc:
            raise IngestError(f"cannot read config {uri}: {exc}") from None
        if not isinstance(values, dict):
            raise IngestError(f"config {uri} is not a JSON object")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise IngestError(f"config {uri}: unknown keys {unknown}")
        return cls.from_values({**values, **overrides})

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> IngestConfig:
        """A config from field values; the output defaults to the raw layout under home."""
        if not values.get("input"):
            raise IngestError("no input given (--input or a --config file)")
        values = {"output": storage.join(settings.home(), "raw", TALKINGDATA.name), **values}
        return cls(**values)


@dataclass
class _Tally:
    """Counts accumulated over the whole input."""

    rows_read: int = 0
    rows: int = 0
    positives: int = 0
    lost_seconds_rows: int = 0
    exact_repeat_rows: int = 0
    by_reason: Counter = field(default_factory=Counter)
    first_example: dict[str, str] = field(default_factory=dict)
    timestamp_formats: Counter = field(default_factory=Counter)
    skipped_lines: Counter = field(default_factory=Counter)
    header_notes: list[str] = field(default_factory=list)

    @property
    def rows_quarantined(self) -> int:
        """Rows quarantined for any reason."""
        return sum(self.by_reason.values())


class _SeenEvents:
    """Hashes of the events accepted so far, each with the source it first came from.

    Kept as a few sorted runs of hashes whose sizes shrink geometrically (a run is merged
    into the one before it once it reaches half its size), so a lookup costs a handful of
    binary searches and memory stays at 16 bytes per distinct event. Two different events
    share a 64-bit hash with negligible probability at the sizes this stage handles.
    """

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """The source of each hash's first occurrence, or -1 where it was not seen."""
        found = np.full(len(hashes), -1, dtype=np.int64)
        for keys, sources in self._runs:
            index = np.minimum(np.searchsorted(keys, hashes), len(keys) - 1)
            hit = (keys[index] == hashes) & (found < 0)
            found[hit] = sources[index[hit]]
        return found

    def add(self, hashes: np.ndarray, sources: np.ndarray) -> None:
        """Remember ``hashes`` (not seen before, distinct) as first seen in ``sources``."""
        if len(hashes) == 0:
            return
        order = np.argsort(hashes, kind="stable")
        self._runs.append((hashes[order], sources[order]))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (keys_a, sources_a), (keys_b, sources_b) = self._runs.pop(-2), self._runs.pop()
            keys = np.concatenate([keys_a, keys_b])
            order = np.argsort(keys, kind="stable")
            self._runs.append((keys[order], np.concatenate([sources_a, sources_b])[order]))

    def __len__(self) -> int:
        return sum(len(keys) for keys, _ in self._runs)


def split_header(text: str) -> tuple[list[str], list[str]]:
    """The column names of a header line and notes on what was tolerated in it.

    A leading byte-order mark, whitespace and quotes around names, and stray
    non-alphanumeric characters before a known first column name are removed.
    """
    notes = []
    if text.startswith(_BOM):
        notes.append("UTF-8 byte-order mark before the header (ignored)")
        text = text[1:]
    names = [_unquote(name.strip()) for name in text.split(",")]
    match = _STRAY_PREFIX.fullmatch(names[0])
    if names[0] not in TALKINGDATA_CSV_COLUMNS and match and match.group(2) in TALKINGDATA_CSV_COLUMNS:
        notes.append(f"stray characters {match.group(1)!r} before the first column name (ignored)")
        names[0] = match.group(2)
    return names, notes


def check_header(names: list[str], where: str, text: str) -> None:
    """Raise :class:`IngestError` unless ``names`` are the TalkingData columns in any order.

    :param names: column names from :func:`split_header`.
    :param where: ``<file>: line <n>``, for the message.
    :param text: the header line as read, for hints.
    """
    expected = list(TALKINGDATA_CSV_COLUMNS)
    if sorted(names) == sorted(expected):
        return
    hint = " (the file seems to use CR-only line endings)" if "\r" in text else ""
    if LABEL not in names:
        raise IngestError(
            f"{where}: the label column {LABEL!r} is missing from the header; "
            f"expected columns {expected}, found {names}{hint}"
        )
    missing = [name for name in expected if name not in names]
    unexpected = [name for name in names if name not in expected]
    repeated = sorted({name for name in names if names.count(name) > 1})
    problems = [
        f"{label}: {values}"
        for label, values in (("missing", missing), ("unexpected", unexpected), ("repeated", repeated))
        if values
    ]
    raise IngestError(
        f"{where}: the header does not match the TalkingData layout: expected columns {expected}, "
        f"found {names} ({'; '.join(problems)}){hint}"
    )


def list_input_files(uri: str) -> list[str]:
    """The CSV files named by ``uri``: the file itself, a directory's ``*.csv`` or a glob.

    Directory listings skip hidden files and names starting with ``_``; the result is
    sorted, which is the order the files are read in and event ids are given.
    """
    fs, path = storage.filesystem(uri)
    if any(char in path for char in "*?["):
        paths = [p for p in fs.glob(path) if fs.isfile(p)]
        if not paths:
            raise IngestError(f"{uri}: no files match")
    elif fs.isdir(path):
        paths = [
            p
            for p in fs.find(path, maxdepth=1)
            if p.lower().endswith(".csv") and not posixpath.basename(p).startswith((".", "_"))
        ]
        if not paths:
            raise IngestError(f"{uri}: the directory holds no .csv files")
    elif fs.isfile(path):
        paths = [path]
    else:
        raise IngestError(f"{uri}: no such file or directory")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return sorted(posixpath.normpath(p) for p in paths)
    return sorted(f"{protocol}://{p}" for p in paths)


def ingest(config: IngestConfig) -> dict[str, Any]:
    """Ingest ``config.input``, write both outputs and return the stage result.

    Raises :class:`IngestError` when the input is unusable or too much of it is
    quarantined (the quarantine output is written first, for inspection).
    """
    config.validate()
    started = time.monotonic()
    files = list_input_files(config.input)
    logger.info("ingesting %d file(s) from %s", len(files), config.input)
    run = _Ingestion(config)
    per_file = [run.read_file(uri) for uri in files if not run.full]
    tally = run.tally
    if tally.rows_read == 0:
        raise IngestError(f"{config.input}: no data rows in {', '.join(files)}")

    # Quarantine first: when the share check fails, the rejected rows are there to inspect.
    quarantine = _concat(run.quarantine_tables, QUARANTINE_SCHEMA)
    storage.write_table(quarantine, config.quarantine_uri)
    share = tally.rows_quarantined / tally.rows_read
    _log_summary(tally, share)
    if share > config.max_quarantine_share:
        raise IngestError(_share_message(tally, share, config))

    # Accepted events.
    accepted = _concat(run.accepted_tables, TALKINGDATA.arrow_schema())
    storage.write_table(accepted, config.output)
    logger.info(
        "wrote %d events to %s and %d quarantined rows to %s in %.2fs",
        accepted.num_rows,
        config.output,
        quarantine.num_rows,
        config.quarantine_uri,
        time.monotonic() - started,
    )
    return {
        "dataset": TALKINGDATA.name,
        "dataset_fingerprint": TALKINGDATA.fingerprint(),
        "input": config.input,
        "input_files": per_file,
        "raw_uri": config.output,
        "quarantine_uri": config.quarantine_uri,
        "rows_read": tally.rows_read,
        "rows": tally.rows,
        "rows_quarantined": tally.rows_quarantined,
        "quarantine_share": share,
        "quarantined_by_reason": dict(sorted(tally.by_reason.items())),
        "skipped_lines": dict(sorted(tally.skipped_lines.items())),
        "header_notes": tally.header_notes,
        "timestamp_formats": dict(sorted(tally.timestamp_formats.items())),
        "lost_seconds_rows": tally.lost_seconds_rows,
        "exact_repeat_rows": tally.exact_repeat_rows,
        "positives": tally.positives,
        "duplicates_policy": config.duplicates,
        "max_rows": config.max_rows,
    }


class _Ingestion:
    """The state of one run: counts, seen events and the tables built so far."""

    def __init__(self, config: IngestConfig) -> None:
        self.config = config
        self.tally = _Tally()
        self.seen = _SeenEvents()
        self.accepted_tables: list[pa.Table] = []
        self.quarantine_tables: list[pa.Table] = []
        self.next_event_id = 0
        self.next_source = 0

    @property
    def full(self) -> bool:
        """Whether ``max_rows`` data rows have been read."""
        return self.config.max_rows is not None and self.tally.rows_read >= self.config.max_rows

    def read_file(self, uri: str) -> dict[str, Any]:
        """Read one CSV file in chunks; returns its per-file counts."""
        before = (self.tally.rows_read, self.tally.rows_quarantined)
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as handle:
            # Header.
            _sniff(handle, uri)
            order, line_number = self._read_header(handle, uri)
            self.next_source += 1

            # Data, chunk by chunk.
            while not self.full:
                raw = list(islice(handle, self.config.chunk_rows))
                if not raw:
                    break
                order = self._process_chunk(raw, line_number, uri, order)
                line_number += len(raw)

        rows_read = self.tally.rows_read - before[0]
        quarantined = self.tally.rows_quarantined - before[1]
        if rows_read == 0:
            self._note(uri, 1, "no data rows")
        logger.info("%s: %d rows read, %d quarantined", uri, rows_read, quarantined)
        return {"file": uri, "rows_read": rows_read, "rows_quarantined": quarantined}

    def _note(self, uri: str, line_number: int, note: str) -> None:
        self.tally.header_notes.append(f"{uri}: line {line_number}: {note}")
        logger.warning("%s: line %d: %s", uri, line_number, note)

    def _read_header(self, handle: Any, uri: str) -> tuple[tuple[str, ...], int]:
        """Check the first non-blank line; returns the column order and the next line number."""
        line_number = 0
        while True:
            raw = handle.readline(MAX_HEADER_BYTES)
            line_number += 1
            if not raw:
                raise IngestError(f"{uri}: the file is empty (no header line)")
            if len(raw) == MAX_HEADER_BYTES and not raw.endswith(b"\n"):
                raise IngestError(
                    f"{uri}: line {line_number} is longer than {MAX_HEADER_BYTES} bytes; not a CSV header"
                )
            text = raw.decode("utf-8", errors="replace")
            if text.strip(_BOM + " \t\r\n"):
                break
            self.tally.skipped_lines[SKIPPED_BLANK] += 1
        if text.endswith("\r\n"):
            self._note(uri, line_number, "CRLF line endings")
        text = text.rstrip("\n").removesuffix("\r")
        names, notes = split_header(text)
        where = f"{uri}: line {line_number}"
        check_header(names, where, text)
        for note in notes:
            self._note(uri, line_number, note)
        if names != list(TALKINGDATA_CSV_COLUMNS):
            self._note(uri, line_number, f"columns in a different order: {names}")
        return tuple(names), line_number + 1

    def _process_chunk(
        self, raw: list[bytes], first_line: int, uri: str, order: tuple[str, ...]
    ) -> tuple[str, ...]:
        """Split a chunk into runs between repeated headers and validate each run.

        Returns the column order in force at the end of the chunk.
        """
        # Decoding: the whole chunk at once; line by line only when it is not valid UTF-8.
        lines, bad_encoding = _decode_lines(raw)
        text = pd.Series(lines, dtype=object)
        line_numbers = np.arange(first_line, first_line + len(lines), dtype=np.int64)

        # Blank lines and headers: neither starts with a digit, so only other lines are looked at.
        blank = np.zeros(len(lines), dtype=bool)
        headers = []
        for position in np.flatnonzero(~text.str[:1].str.isdigit().to_numpy(dtype=bool)):
            if not text.iat[position].strip():
                blank[position] = True
                continue
            names, _ = split_header(text.iat[position])
            if sum(name in TALKINGDATA_CSV_COLUMNS for name in names) < 2:
                continue
            where = f"{uri}: line {line_numbers[position]}"
            check_header(names, f"{where} (a header repeated inside the data)", text.iat[position])
            headers.append((int(position), tuple(names)))
        if blank.any():
            self.tally.skipped_lines[SKIPPED_BLANK] += int(blank.sum())

        # Runs of data lines between headers, each a source of its own.
        start = 0
        for position, names in [*headers, (len(lines), order)]:
            keep = start + np.flatnonzero(~blank[start:position])
            self._process_run(text.iloc[keep], line_numbers[keep], bad_encoding[keep], uri, order)
            if position < len(lines):
                header_line = int(line_numbers[position])
                self.tally.skipped_lines[SKIPPED_REPEATED_HEADER] += 1
                self._note(uri, header_line, "header repeated inside the data (skipped)")
                if names != order:
                    self._note(uri, header_line, f"columns in a different order: {list(names)}")
                self.next_source += 1
                order = names
            start = position + 1
            if self.full:
                break
        return order

    def _process_run(
        self,
        text: pd.Series,
        line_numbers: np.ndarray,
        bad_encoding: np.ndarray,
        uri: str,
        order: tuple[str, ...],
    ) -> None:
        """Validate data lines of one source and keep their accepted and quarantined parts."""
        if self.config.max_rows is not None:
            room = self.config.max_rows - self.tally.rows_read
            text, line_numbers, bad_encoding = text.iloc[:room], line_numbers[:room], bad_encoding[:room]
        n = len(text)
        if n == 0:
            return
        text = text.reset_index(drop=True)
        event_ids = np.arange(self.next_event_id, self.next_event_id + n, dtype=np.int64)
        self.next_event_id += n
        self.tally.rows_read += n
        checked = _Checked(text, bad_encoding, order)
        checked.check_duplicates(self.seen, self.next_source, self.config.duplicates)

        # Accepted rows.
        ok = checked.open
        accepted = checked.accepted_table(event_ids)
        self.accepted_tables.append(accepted)
        self.tally.rows += accepted.num_rows
        self.tally.positives += int(checked.label[ok].sum())
        self.tally.exact_repeat_rows += int(checked.exact_repeats[ok].sum())
        lost = np.zeros(accepted.num_rows, dtype=bool)
        for column in TIME_COLUMNS:
            formats = checked.formats[column][ok]
            for index, fmt in enumerate(TIMESTAMP_FORMATS):
                count = int((formats == index).sum())
                if count:
                    self.tally.timestamp_formats[fmt.name] += count
                    if not fmt.has_seconds:
                        lost |= formats == index
        self.tally.lost_seconds_rows += int(lost.sum())

        # Quarantined rows.
        bad = ~ok
        if not bad.any():
            return
        reasons = checked.reason[bad]
        details = checked.detail[bad]
        for reason, count in Counter(reasons.tolist()).items():
            self.tally.by_reason[reason] += count
            if reason not in self.tally.first_example:
                first = int(np.flatnonzero(reasons == reason)[0])
                self.tally.first_example[reason] = f"{uri} line {line_numbers[bad][first]}: {details[first]}"
        columns = {
            "source_file": pa.array(np.full(int(bad.sum()), uri, dtype=object), pa.string()),
            "line_number": pa.array(line_numbers[bad], pa.int64()),
            "event_id": pa.array(event_ids[bad], pa.int64()),
            "reason": pa.array(reasons, pa.string()),
            "detail": pa.array(details, pa.string()),
            "raw_line": pa.array(text[bad].to_numpy(), pa.string()),
        }
        for name in TALKINGDATA_CSV_COLUMNS:
            value = checked.raw_fields[name][bad].to_numpy()
            columns[name] = pa.array(value, pa.string(), mask=~checked.well_formed[bad])
        self.quarantine_tables.append(pa.Table.from_pydict(columns, schema=QUARANTINE_SCHEMA))


class _Checked:
    """The vectorized checks of one run of data lines, in reason order.

    After construction, ``reason`` and ``detail`` hold the first failed check of each
    row (``None`` where all passed) and ``open`` marks the rows still accepted. Values
    are checked as read first; only those that fail are stripped of whitespace and
    quotes and checked again, which keeps clean input on the fast paths.
    """

    def __init__(self, text: pd.Series, bad_encoding: np.ndarray, order: tuple[str, ...]) -> None:
        n = len(text)
        self.n = n
        self.reason = np.full(n, None, dtype=object)
        self.detail = np.full(n, None, dtype=object)
        self.open = np.ones(n, dtype=bool)
        self.exact_repeats = np.zeros(n, dtype=bool)

        # Encoding and field count.
        self._flag(BAD_ENCODING, bad_encoding, "the line is not valid UTF-8 text or holds a NUL byte")
        raw, well_formed = _split_fields(text, order)
        expected_fields = len(TALKINGDATA_CSV_COLUMNS)
        if not well_formed.all():
            field_count = text.str.count(",").to_numpy() + 1
            self._flag(
                BAD_FIELD_COUNT,
                ~well_formed,
                lambda hit: [f"{count} fields, expected {expected_fields}" for count in field_count[hit]],
            )
        self.raw_fields = raw
        self.well_formed = well_formed
        ascii_only = "".join(text).isascii()

        # Values: integers (ids, label) and times; each also says which values are missing.
        self.ints: dict[str, np.ndarray] = {}
        self.times: dict[str, np.ndarray] = {}
        self.formats: dict[str, np.ndarray] = {}
        nulls: dict[str, np.ndarray] = {}
        is_int: dict[str, np.ndarray] = {}
        in_range: dict[str, np.ndarray] = {}
        for name in (*ID_COLUMNS, LABEL):
            self.ints[name], is_int[name], fits, nulls[name] = _integers(raw[name], ascii_only)
            in_range[name] = fits & _within(name, self.ints[name])
        for name in TIME_COLUMNS:
            self.times[name], self.formats[name], nulls[name] = _parse_times(raw[name])

        # Nulls in required columns.
        for name in TALKINGDATA_CSV_COLUMNS:
            if not TALKINGDATA.column(name).nullable:
                self._flag(NULL_VALUE, nulls[name], f"{name} is empty")

        # Types.
        for name in (*ID_COLUMNS, LABEL):
            not_int = ~is_int[name] & ~nulls[name]
            self._flag(BAD_TYPE, not_int, _describe(name, raw[name], "is not an integer"))
        accepted = ", ".join(fmt.name for fmt in TIMESTAMP_FORMATS)
        for name in TIME_COLUMNS:
            unparsed = (self.formats[name] < 0) & ~nulls[name]
            self._flag(BAD_TIMESTAMP, unparsed, _describe(name, raw[name], f"matches none of: {accepted}"))

        # Ranges.
        for name in (*ID_COLUMNS, LABEL):
            column = TALKINGDATA.column(name)
            allowed = f"is outside [{_bound(column.min_value)}, {_type_max(name, column.max_value)}]"
            self._flag(OUT_OF_RANGE, ~in_range[name], _describe(name, raw[name], allowed))
        self.label = self.ints[LABEL]

        # Label against download time.
        click, attributed = self.times["click_time"], self.times["attributed_time"]
        has_download = ~nulls["attributed_time"]
        positive = self.label == 1
        self._flag(INCONSISTENT, positive & ~has_download, "is_attributed=1 but attributed_time is empty")
        self._flag(INCONSISTENT, ~positive & has_download, "attributed_time is set but is_attributed=0")
        self._flag(INCONSISTENT, has_download & (attributed < click), "attributed_time is before click_time")

    def _flag(self, reason: str, mask: np.ndarray, detail: Any) -> None:
        """Give ``reason`` to the rows in ``mask`` that have none yet.

        :param detail: a string, or a function of the hit mask returning one per hit.
        """
        hit = mask & self.open
        if not hit.any():
            return
        self.reason[hit] = reason
        self.detail[hit] = detail if isinstance(detail, str) else list(detail(hit))
        self.open &= ~hit

    def check_duplicates(self, seen: _SeenEvents, source: int, policy: str) -> None:
        """Flag events repeated from another source (and, by policy, inside this one)."""
        if policy == DUPLICATES_OFF or not self.open.any():
            return
        rows = np.flatnonzero(self.open)
        frame = pd.DataFrame({name: self.ints[name][rows] for name in (*ID_COLUMNS, LABEL)})
        for name in TIME_COLUMNS:
            missing = self.formats[name][rows] < 0
            frame[name] = np.where(missing, np.iinfo(np.int64).min, self.times[name][rows])
        hashes = pd.util.hash_pandas_object(frame, index=False).to_numpy()
        first_source = seen.lookup(hashes)
        repeated_here = pd.Series(hashes).duplicated().to_numpy()
        unseen = first_source < 0
        seen.add(hashes[unseen & ~repeated_here], np.full(int((unseen & ~repeated_here).sum()), source))

        # Repeats from another source are duplicates; repeats inside this one, by policy.
        from_other = ~unseen & (first_source != source)
        within = (unseen & repeated_here) | (first_source == source)
        if policy == DUPLICATES_ROWS:
            lost_seconds = np.zeros(len(rows), dtype=bool)
            for name in TIME_COLUMNS:
                for index, fmt in enumerate(TIMESTAMP_FORMATS):
                    if not fmt.has_seconds:
                        lost_seconds |= self.formats[name][rows] == index
            from_other |= within & ~lost_seconds
        mask = np.zeros(self.n, dtype=bool)
        mask[rows[from_other]] = True
        repeats = np.zeros(self.n, dtype=bool)
        repeats[rows[within & ~from_other]] = True
        self.exact_repeats = repeats
        self._flag(DUPLICATE, mask, "repeats an event of an earlier file or concatenated part")

    def accepted_table(self, event_ids: np.ndarray) -> pa.Table:
        """The accepted rows in the raw layout."""
        ok = self.open
        schema = TALKINGDATA.arrow_schema()
        arrays = []
        for column in schema:
            name = column.name
            if name == TALKINGDATA.event_id:
                arrays.append(pa.array(event_ids[ok], column.type))
            elif name in TIME_COLUMNS:
                missing = self.formats[name][ok] < 0
                mask = missing if missing.any() else None
                arrays.append(pa.array(self.times[name][ok], column.type, mask=mask))
            else:
                values = self.ints[name][ok].astype(column.type.to_pandas_dtype())
                arrays.append(pa.array(values, column.type))
        return pa.Table.from_arrays(arrays, schema=schema)


def _decode_lines(raw: list[bytes]) -> tuple[list[str], np.ndarray]:
    """Decode lines read in binary, without line endings; marks the lines that are not UTF-8."""
    try:
        lines = b"".join(raw).decode("utf-8").replace("\r\n", "\n").split("\n")
        if len(lines) > len(raw):
            lines.pop()
        # A NUL byte is not text: the CSV tokenizer would cut the field there.
        return lines, np.fromiter(("\x00" in line for line in lines), dtype=bool, count=len(lines))
    except UnicodeDecodeError:
        pass
    lines, bad = [], np.zeros(len(raw), dtype=bool)
    for index, line in enumerate(raw):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", errors="replace")
            bad[index] = True
        bad[index] |= "\x00" in text
        lines.append(text.removesuffix("\n").removesuffix("\r"))
    return lines, bad


def _sniff(handle: Any, uri: str) -> None:
    """Fail at once, with a clear message, on files that are empty or not UTF-8 text."""
    head = handle.read(SNIFF_BYTES)
    handle.seek(0)
    if not head.lstrip(_BOM.encode() + b" \t\r\n"):
        raise IngestError(f"{uri}: the file is empty")
    if head.startswith(b"\x1f\x8b"):
        raise IngestError(f"{uri}: the file is gzip-compressed, not a CSV text file; decompress it first")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise IngestError(f"{uri}: the file is UTF-16 text; re-save it as UTF-8 CSV")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise IngestError(f"{uri}: not a text CSV file (binary content: a NUL byte at offset {nul})")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < SNIFF_BYTES)
    except UnicodeDecodeError as exc:
        raise IngestError(
            f"{uri}: not a UTF-8 text CSV file (invalid byte 0x{head[exc.start]:02x} at offset {exc.start})"
        ) from None


def _split_fields(text: pd.Series, order: tuple[str, ...]) -> tuple[pd.DataFrame, np.ndarray]:
    """The fields of each line by canonical column name, and which lines have the right count.

    Fields of malformed lines are empty strings. Quotes are kept as read (``QUOTE_NONE``):
    TalkingData fields never need quoting, and a stray quote must not swallow lines.
    """
    n = len(text)
    commas = len(order) - 1
    joined = "\n".join(text)
    if joined.count(",") == commas * n:
        try:
            frame = _read_fields(joined, order)
        except pd.errors.ParserError:
            frame = None
        # Short lines leave the last field missing (long ones then exist too, or the parser fails).
        if frame is not None and len(frame) == n and not frame[order[-1]].isna().any():
            return frame[list(TALKINGDATA_CSV_COLUMNS)], np.ones(n, dtype=bool)
    well_formed = (text.str.count(",") == commas).to_numpy()
    frame = pd.DataFrame("", index=range(n), columns=list(TALKINGDATA_CSV_COLUMNS), dtype=object)
    if well_formed.any():
        good = _read_fields("\n".join(text[well_formed]), order)
        frame.loc[well_formed, :] = good[list(TALKINGDATA_CSV_COLUMNS)].to_numpy()
    return frame, well_formed


def _read_fields(joined: str, order: tuple[str, ...]) -> pd.DataFrame:
    """Lines with one comma-separated field per column, as strings, in the file's column order."""
    frame = pd.read_csv(
        io.StringIO(joined),
        header=None,
        names=list(order),
        dtype=str,
        keep_default_na=False,
        na_filter=False,
        quoting=csv.QUOTE_NONE,
        lineterminator="\n",
        skip_blank_lines=False,
        engine="c",
    )
    return frame


def _clean(value: pd.Series) -> pd.Series:
    """Strip whitespace and one pair of surrounding double quotes."""
    value = value.str.strip()
    quoted = (value.str.len() >= 2) & value.str.startswith('"') & value.str.endswith('"')
    if quoted.any():
        value = value.where(~quoted, value.str[1:-1].str.strip())
    return value


def _integers(raw: pd.Series, ascii_only: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Integer values (0 where not one), which are integers, which fit an int64, which are missing."""
    # Fast path: plain ASCII digits.
    if ascii_only:
        plain = raw.str.isdigit().to_numpy(dtype=bool)
    else:
        plain = raw.str.fullmatch(r"[0-9]+").to_numpy(dtype=bool)
    try:
        number = raw.where(plain, "0").astype(np.int64).to_numpy()
    except (OverflowError, ValueError):
        plain &= (raw.str.len() <= _MAX_DIGITS).to_numpy()
        number = raw.where(plain, "0").astype(np.int64).to_numpy()
    is_int, fits = plain.copy(), plain.copy()
    null = raw.isin(NULL_TOKENS).to_numpy()

    # Slow path: signs, whitespace, quotes, null markers and very long numbers.
    rest = np.flatnonzero(~plain & ~null)
    if len(rest):
        value = _clean(raw.iloc[rest])
        null[rest] = value.isin(NULL_TOKENS).to_numpy()
        signed = value.str.fullmatch(r"[+-]?[0-9]+").to_numpy(dtype=bool)
        short = signed & (value.str.lstrip("+-").str.len() <= _MAX_DIGITS).to_numpy()
        is_int[rest] = signed
        fits[rest] = short
        number[rest] = pd.to_numeric(value.where(short, "0")).to_numpy(dtype=np.int64)
    return number, is_int, fits, null


def _parse_times(raw: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Microseconds since the epoch (UTC), the matching format's index (-1: none), which are missing.

    The formats exclude each other, so the order they are tried in changes only the
    speed: a sample of the values ranks them first.
    """
    micros = np.zeros(len(raw), dtype=np.int64)
    formats = np.full(len(raw), -1, dtype=np.int8)
    null = raw.isin(NULL_TOKENS).to_numpy()
    todo = ~null
    if not todo.any():
        return micros, formats, null
    sample = raw.iloc[np.flatnonzero(todo)[:64]]
    hits = [_to_datetime(sample, fmt).notna().sum() for fmt in TIMESTAMP_FORMATS]
    ranked = sorted(range(len(TIMESTAMP_FORMATS)), key=lambda index: -hits[index])

    # Values as read, then the rest stripped of whitespace and quotes.
    value = raw
    for attempt in range(2):
        if attempt == 1:
            rows = np.flatnonzero(todo)
            if not len(rows):
                break
            value = raw.copy()
            value.iloc[rows] = _clean(raw.iloc[rows]).to_numpy()
            null[rows] = value.iloc[rows].isin(NULL_TOKENS).to_numpy()
            todo &= ~null
        for index in ranked:
            rows = np.flatnonzero(todo)
            if not len(rows):
                break
            parsed = _to_datetime(value.iloc[rows], TIMESTAMP_FORMATS[index])
            good = parsed.notna().to_numpy()
            hit = rows[good]
            micros[hit] = parsed.to_numpy()[good].astype("datetime64[us]").astype(np.int64)
            formats[hit] = index
            todo[hit] = False
    return micros, formats, null


def _to_datetime(value: pd.Series, fmt: TimestampFormat) -> pd.Series:
    """``value`` parsed with exactly ``fmt``; NaT where it does not match."""
    return pd.to_datetime(value, format=fmt.pattern, errors="coerce")


def _within(name: str, number: np.ndarray) -> np.ndarray:
    """Which values lie within the column's bounds and its integer type."""
    column = TALKINGDATA.column(name)
    low = column.min_value if column.min_value is not None else np.iinfo(np.int64).min
    return (number >= low) & (number <= _type_max(name, column.max_value))


def _type_max(name: str, max_value: float | None) -> int:
    """The largest value allowed in ``name``: its spec bound or its integer type's maximum."""
    if max_value is not None:
        return int(max_value)
    return int(np.iinfo(TALKINGDATA.column(name).arrow_type().to_pandas_dtype()).max)


def _bound(value: float | None) -> str:
    """A lower bound as written in messages."""
    return "-inf" if value is None else str(int(value))


def _describe(name: str, value: pd.Series, problem: str) -> Any:
    """A detail function: ``<column>: '<value>' <problem>`` for each hit row."""

    def detail(hit: np.ndarray) -> list[str]:
        return [f"{name}: {text!r} {problem}" for text in value[hit]]

    return detail


def _unquote(name: str) -> str:
    """``name`` without one pair of surrounding quotes."""
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "\"'":
        return name[1:-1].strip()
    return name


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    """The tables one after another, or an empty table of ``schema``."""
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


def _log_summary(tally: _Tally, share: float) -> None:
    """Log the counts a user looks for in the task log."""
    logger.info(
        "rows read %d: %d accepted (%d positives), %d quarantined (%.4f%%)",
        tally.rows_read,
        tally.rows,
        tally.positives,
        tally.rows_quarantined,
        100 * share,
    )
    for reason in REASONS:
        if tally.by_reason[reason]:
            example = tally.first_example[reason]
            logger.info("quarantined %s: %d (first: %s)", reason, tally.by_reason[reason], example)
    if tally.skipped_lines:
        logger.info("skipped lines: %s", dict(tally.skipped_lines))
    if len(tally.timestamp_formats) > 1:
        logger.warning("mixed timestamp formats: %s", dict(tally.timestamp_formats))
    if tally.lost_seconds_rows:
        logger.warning("%d rows have minute-resolution times (seconds lost)", tally.lost_seconds_rows)
    if tally.exact_repeat_rows:
        logger.info("%d rows repeat an earlier row of their source exactly (kept)", tally.exact_repeat_rows)


def _share_message(tally: _Tally, share: float, config: IngestConfig) -> str:
    """The fatal message for too many quarantined rows: how many, why, where the first was."""
    reasons = "; ".join(
        f"{reason}: {tally.by_reason[reason]} (first at {tally.first_example[reason]})"
        for reason in REASONS
        if tally.by_reason[reason]
    )
    return (
        f"quarantined {tally.rows_quarantined} of {tally.rows_read} rows ({100 * share:.2f}%), above "
        f"--max-quarantine-share {100 * config.max_quarantine_share:.2f}%: {reasons}; "
        f"the rows are in {config.quarantine_uri}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ingest stage's flags; config fields left unset keep the config file's value or default."""
    p = cli.parser("jobs.ingest", "Ingest TalkingData AdTracking CSV click logs into the raw parquet layout.")
    unset = argparse.SUPPRESS
    p.add_argument("--config", default=unset, help="JSON file of IngestConfig fields; flags override it")
    p.add_argument(
        "--input", default=unset, help="CSV file, directory of *.csv files or glob (path or URI); required"
    )
    p.add_argument(
        "--output",
        default=unset,
        help="parquet dataset directory for accepted events "
        f"(default: ${settings.HOME_ENV_VAR}/raw/{TALKINGDATA.name})",
    )
    p.add_argument(
        "--quarantine-output",
        default=unset,
        help=f"parquet dataset directory for quarantined rows (default: the output + {QUARANTINE_SUFFIX!r})",
    )
    p.add_argument(
        "--max-quarantine-share",
        type=float,
        default=unset,
        help="fail when a larger share of data rows is quarantined "
        f"(default: {DEFAULT_MAX_QUARANTINE_SHARE})",
    )
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=unset,
        help=f"lines read and validated at once, bounding memory (default: {DEFAULT_CHUNK_ROWS})",
    )
    p.add_argument(
        "--duplicates",
        choices=DUPLICATE_POLICIES,
        default=unset,
        help="which exact repeats to quarantine: 'sources' (from another file or concatenated part), "
        f"'rows' (also inside one source), 'off' (default: {DUPLICATES_SOURCES})",
    )
    p.add_argument(
        "--smoke-test",
        action="store_true",
        default=unset,
        help=f"read only the first {SMOKE_TEST_ROWS} data rows",
    )
    return p


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    """The run's config: the config file (if any), then the flags given."""
    given = {key: value for key, value in vars(args).items() if key not in ("result_path", "verbose")}
    config_uri = given.pop("config", None)
    if given.pop("smoke_test", False):
        given["max_rows"] = SMOKE_TEST_ROWS
    if config_uri is not None:
        return IngestConfig.from_file(config_uri, **given)
    return IngestConfig.from_values(given)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jobs.ingest``."""
    args = build_parser().parse_args(argv)
    cli.configure_logging(args.verbose)
    try:
        config = config_from_args(args)
        logger.debug("config: %s", config)
        result = ingest(config)
    except IngestError as exc:
        cli.fail(str(exc))
    cli.write_result(result, args.result_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
