"""Atomic writes and dataset reads through fsspec."""

from __future__ import annotations

import pyarrow as pa

from jobs.common import storage


def test_write_json_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a" / "result.json"
    storage.write_json(str(target), {"b": 1, "a": [1, 2]})
    storage.write_json(f"file://{target}", {"b": 2})
    assert storage.read_json(str(target)) == {"b": 2}
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_write_table_replaces_previous_output_and_marks_success(tmp_path):
    uri = str(tmp_path / "ds")
    storage.write_table(pa.table({"x": list(range(10))}), uri, rows_per_part=4)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "_SUCCESS", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    storage.write_table(pa.table({"x": [7]}), uri)
    assert storage.read_table(uri).column("x").to_pylist() == [7]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_read_table_ignores_metadata_but_not_underscored_parents(tmp_path):
    uri = str(tmp_path / "_private" / "ds")
    storage.write_table(pa.table({"x": [1, 2]}), uri)
    (tmp_path / "_private" / "ds" / ".part-00000.parquet.crc").write_bytes(b"crc")
    assert storage.read_table(uri).num_rows == 2


def test_join_keeps_the_scheme():
    assert storage.join("s3://bucket/prefix/", "runs", "x") == "s3://bucket/prefix/runs/x"


def test_replace_refuses_a_directory_the_pipeline_did_not_write(tmp_path):
    """A user's folder (or a stage's own input) is never deleted to make room for output."""
    import pytest

    target = tmp_path / "mine"
    target.mkdir()
    (target / "ok.csv").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an output of this pipeline"):
        storage.write_table(pa.table({"x": [1]}), str(target))
    assert (target / "ok.csv").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
