"""The benchmark runs: `tests/bench/run.py --quick` completes, prints its table and writes JSON
with every scenario. No timing is asserted here: numbers belong to the benchmark's report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).parent / "bench" / "run.py"
SCENARIOS = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15")
ROWS = (
    "1",
    "2",
    "3",
    "4a",
    "4b",
    "4c",
    "4d",
    "5",
    "6a",
    "6b",
    "7",
    "8",
    "9a",
    "9b",
    "9c",
    "10",
    "11",
    "11b",
    "12a",
    "12b",
    "13",
    "14",
    "15a",
    "15b",
    "15c",
    "15d",
)


def test_quick_benchmark_completes(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = next((line for line in lines if line.startswith("#  ")), None)
    assert header is not None, done.stdout
    for column in ("scenario", "gcfs", "baseline", "ratio", "target", "met?"):
        assert column in header
    assert any(line.startswith("machine: ") for line in lines), done.stdout

    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["machine"]["cores"] >= 1
    for scenario in SCENARIOS:
        assert scenario in results["scenarios"], scenario
        assert "error" not in results["scenarios"][scenario], results["scenarios"][scenario]
        assert "skipped" not in results["scenarios"][scenario]
    rows = {row["scenario"]: row for row in results["table"]}
    for scenario in ROWS:
        assert scenario in rows, scenario
        assert rows[scenario]["what"] != "failed to run", rows[scenario]
    # rclone's row says when rclone is missing instead of vanishing (.ci/install installs it).
    peer = results["scenarios"]["4"]["uncapped"]["rclone"]
    assert ("missing" in peer) == (results["machine"]["rclone"] is None)
    assert ("rclone not installed" in rows["4c"]["baseline"]) == ("missing" in peer)
    # Issue 15's rows ran at their quick sizes and listed every generated item.
    config = results["config"]
    twelve = results["scenarios"]["12"]["runs"]
    assert sorted(twelve) == sorted(
        str(n) for n in (config["scale_items"], config["scale_items_max"])
    )
    for count, run in twelve.items():
        assert run["stopped"] is None, run
        assert run["entries"] == int(count)
        assert run["rss_peak_mib"] > 0
    assert results["scenarios"]["13"]["all"][0]["entries"] == config["scale_items"]
    assert results["scenarios"]["13"]["first"][0]["entries"] == 1
    restart = results["scenarios"]["14"]["runs"][0]
    assert restart["cold"]["entries"] == restart["restart"]["entries"] == config["scale_items"]
    for mode in ("down", "blackhole"):
        run = results["scenarios"]["15"]["modes"][mode]
        assert run["first_listing"]["entries"] == config["down_items"], run
        assert {"seen", "unseen", "unseen_again"} <= set(run["fault"])
