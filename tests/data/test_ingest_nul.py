"""A NUL byte inside a data line is quarantined, never cut off and accepted."""

from __future__ import annotations

import json
import subprocess
import sys

HEADER = "ip,app,device,os,channel,click_time,attributed_time,is_attributed\n"
GOOD = "87540,12,1,13,497,2017-11-07 09:30:38,,0\n"


def test_nul_after_the_sniffed_head_is_quarantined(tmp_path):
    rows = [f"{i},12,1,13,497,2017-11-07 09:30:{i % 60:02d},,0\n" for i in range(5_000)]
    rows[4_000] = "1\x002,1,1,1,1,2017-11-07 09:31:00,,0\n"
    rows[4_500] = "7,1,1,1,1,2017-11-07 09:31:00,,0\x00\n"
    source = tmp_path / "nul.csv"
    source.write_bytes((HEADER + "".join(rows)).encode())
    result = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "jobs.ingest", "--input", str(source), "--output",
                           str(tmp_path / "raw"), "--result-path", str(result)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(result.read_text())
    assert out["rows_read"] == 5_000
    assert out["rows"] == 4_998
    assert out["quarantined_by_reason"] == {"bad_encoding": 2}
