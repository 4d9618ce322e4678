"""The scenarios of the benchmark (run.py is the command line): each returns what it measured
as a dict for the JSON file, and `rows_*` turn that into lines of the table."""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from gcfs.fakegc import FakeGC, demo_world
from tests.bench.harness import (
    API_PAGE_MAX,
    BenchFiles,
    CostModel,
    MiB,
    Mounts,
    RssSampler,
    Tracker,
    api_client,
    distribution,
    drop_caches,
    gcapi_iterate_all,
    median,
    reader_command,
    request_summary,
    run_readers,
    signed_url,
    timed_run,
)

RANDOM_READ_SIZE = 64 * 1024
BASELINE_RANDOM_READS = 100
LIST_TIMEOUT = 300.0
READ_TIMEOUT = 600.0


@dataclass
class Row:
    scenario: str
    what: str
    gcfs: str
    baseline: str
    ratio: str
    target: str
    met: bool | None  # None: nothing to judge (or the scenario failed to run)


@dataclass
class Bench:
    args: argparse.Namespace
    cost: CostModel
    fake: FakeGC
    files: BenchFiles
    mounts: Mounts
    tracker: Tracker
    sampler: RssSampler
    work: Path
    fakes: list[FakeGC]
    warm_cache: Path | None = None  # a cache dir holding the whole large file (scenario 4b)
    local_file: Path | None = None

    @property
    def reps(self) -> range:
        return range(max(1, self.args.repeat))


def fmt_s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def fmt_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / MiB:.0f} MiB/s"


def fmt_x(x: float) -> str:
    return "n/a" if math.isnan(x) or math.isinf(x) else f"{x:.2f}x"


# -- 1 and 2: listing -----------------------------------------------------------------------


def scenario_listing(b: Bench) -> tuple[dict[str, Any], dict[str, Any]]:
    fake, files = b.fake, b.files
    archive_pk = next(a.pk for a in fake.world.archives.values() if a.slug == files.items_slug)
    pages_needed = max(1, math.ceil(files.item_count / API_PAGE_MAX))
    cold: list[float] = []
    cold_requests: list[int] = []
    cold_peaks: list[int] = []
    cold_summaries: list[dict[str, Any]] = []
    entries: list[int] = []
    warm: list[float] = []
    warm_requests: list[int] = []
    base: list[float] = []
    base_requests: list[int] = []
    for _ in b.reps:
        with b.mounts.mount(fake, "s1") as mount:
            items = files.items_dir(mount.path)
            os.stat(items.parent)  # the archive is resolved beforehand: only items/ is timed
            fake.reset_counts()
            b.tracker.reset()
            elapsed, done = timed_run(
                ["ls", "-l", str(items)], LIST_TIMEOUT, stdout=subprocess.PIPE
            )
            cold.append(elapsed)
            entries.append(max(0, done.stdout.count(b"\n") - 1))  # minus the "total" line
            records = fake.requests
            cold_requests.append(len(records))
            cold_peaks.append(b.tracker.api_peak)
            cold_summaries.append(request_summary(records))
            for _ in range(3):  # scenario 2: again, within the TTL, on the same mount
                fake.reset_counts()
                elapsed, _ = timed_run(
                    ["ls", "-l", str(items)], LIST_TIMEOUT, stdout=subprocess.DEVNULL
                )
                warm.append(elapsed)
                warm_requests.append(fake.count())
        fake.reset_counts()
        with api_client(fake) as client:
            started = time.perf_counter()
            results, requests = gcapi_iterate_all(
                client, "archives/items/", {"archive": archive_pk}
            )
            base.append(time.perf_counter() - started)
        base_requests.append(requests)
        if len(results) != files.item_count:
            raise RuntimeError(f"baseline listed {len(results)} items, not {files.item_count}")
    one = {
        "items": files.item_count,
        "entries_listed": entries,
        "gcfs_s": cold,
        "baseline_s": base,
        "gcfs_median_s": median(cold),
        "baseline_median_s": median(base),
        "speedup": median(base) / median(cold),
        "gcfs_requests": cold_requests,
        "baseline_requests": base_requests,
        "pages_needed": pages_needed,
        "gcfs_peak_concurrent_api_requests": cold_peaks,
        "gcfs_request_summary": cold_summaries[-1],
    }
    two = {
        "gcfs_s": warm,
        "gcfs_median_s": median(warm),
        "gcfs_max_s": max(warm),
        "requests": warm_requests,
    }
    return one, two


def rows_listing(one: dict[str, Any], two: dict[str, Any]) -> list[Row]:
    extra = max(one["gcfs_requests"]) - one["pages_needed"]
    return [
        Row(
            "1",
            f"cold ls -l items/ ({one['items']} items)",
            fmt_s(one["gcfs_median_s"]),
            fmt_s(one["baseline_median_s"]),
            fmt_x(one["speedup"]),
            ">= 8x faster",
            one["speedup"] >= 8,
        ),
        Row(
            "1",
            "requests of that ls -l",
            str(max(one["gcfs_requests"])),
            str(max(one["baseline_requests"])),
            "",
            f"<= {one['pages_needed']} pages + 2",
            extra <= 2,
        ),
        Row(
            "2",
            "ls -l again within TTL",
            f"{fmt_s(two['gcfs_median_s'])}, {max(two['requests'])} req",
            "",
            "",
            "0 requests, < 0.5 s",
            max(two["requests"]) == 0 and two["gcfs_max_s"] < 0.5,
        ),
    ]


# -- 3: find over the demo tree --------------------------------------------------------------


def api_walk(fake: FakeGC) -> tuple[int, int]:
    """List each collection, each archive's items, each study's display sets, each
    algorithm's jobs; one request at a time, gcapi's pages of 100. (objects, requests)"""
    objects = requests = 0
    with api_client(fake) as client:

        def walk(path: str, params: dict[str, str] | None = None) -> list[Any]:
            nonlocal objects, requests
            found, n = gcapi_iterate_all(client, path, params)
            objects += len(found)
            requests += n
            return found

        for archive in walk("archives/"):
            walk("archives/items/", {"archive": archive["pk"]})
        for algorithm in walk("algorithms/"):
            walk("algorithms/jobs/", {"algorithm_image__algorithm": algorithm["pk"]})
        for study in walk("reader-studies/"):
            walk("reader-studies/display-sets/", {"reader_study": study["pk"]})
    return objects, requests


def scenario_find(b: Bench) -> dict[str, Any]:
    demo = FakeGC(demo_world()).start()
    b.fakes.append(demo)
    b.cost.apply(demo)
    tracker = Tracker(demo)
    times: list[float] = []
    summaries: list[dict[str, Any]] = []
    entries: list[int] = []
    peaks: list[int] = []
    stderr = ""
    base: list[float] = []
    base_requests = base_objects = 0
    try:
        for _ in b.reps:
            with b.mounts.mount(demo, "s3") as mount:
                demo.reset_counts()
                tracker.reset()
                started = time.perf_counter()
                done = subprocess.run(
                    ["find", str(mount.path)],
                    capture_output=True,
                    timeout=LIST_TIMEOUT,
                    check=False,
                )
                times.append(time.perf_counter() - started)
                entries.append(done.stdout.count(b"\n"))
                if done.returncode != 0:
                    stderr = done.stderr.decode(errors="replace")[-1000:]
                summaries.append(request_summary(demo.requests))
                peaks.append(tracker.api_peak)
            demo.reset_counts()
            started = time.perf_counter()
            base_objects, base_requests = api_walk(demo)
            base.append(time.perf_counter() - started)
    finally:
        demo.stop()
        b.fakes.remove(demo)
    last = summaries[-1]
    return {
        "gcfs_s": times,
        "baseline_s": base,
        "gcfs_median_s": median(times),
        "baseline_median_s": median(base),
        "entries_found": entries,
        "find_stderr": stderr,
        "gcfs_requests": [s["total"] for s in summaries],
        "gcfs_site_requests": [s["site"] for s in summaries],
        "gcfs_storage_requests": [s["storage"] for s in summaries],
        "gcfs_peak_concurrent_api_requests": peaks,
        "site_duplicates": last["site_duplicates"],
        "storage_duplicates": last["storage_duplicates"],
        "gcfs_request_summary": last,
        "baseline_requests": base_requests,
        "baseline_objects": base_objects,
    }


def rows_find(three: dict[str, Any]) -> list[Row]:
    dupes = sum(n - 1 for n in three["site_duplicates"].values())
    return [
        Row(
            "3",
            "cold find over the demo tree",
            f"{fmt_s(three['gcfs_median_s'])}, {max(three['gcfs_requests'])} req",
            f"{fmt_s(three['baseline_median_s'])}, {three['baseline_requests']} req",
            fmt_x(three["baseline_median_s"] / three["gcfs_median_s"]),
            "no request twice",
            dupes == 0 and three["storage_duplicates"] == 0,
        )
    ]


# -- 4: sequential read ---------------------------------------------------------------------


def curl_command(url: str) -> list[str]:
    if shutil.which("curl"):
        return ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}", url]
    return reader_command("url", url, "0")


def scenario_sequential(b: Bench, capped: bool) -> dict[str, Any]:
    fake, files = b.fake, b.files
    size = len(files.big_content)
    label = "s4b" if capped else "s4a"
    gcfs: list[float] = []
    base: list[float] = []
    summaries: list[dict[str, Any]] = []
    sent: list[int] = []
    storage_peaks: list[int] = []
    try:
        b.cost.apply(fake, bandwidth=capped)
        url = signed_url(fake, files.big_image)
        for _ in b.reps:
            cache = b.mounts.fresh_cache()
            with b.mounts.mount(fake, label, cache) as mount:
                path = files.big_path(mount.path)
                if os.stat(path).st_size != size:
                    raise RuntimeError(f"{path}: wrong size")
                fake.reset_counts()
                b.tracker.reset()
                elapsed, _ = timed_run(["cat", str(path)], READ_TIMEOUT, stdout=subprocess.DEVNULL)
                gcfs.append(elapsed)
                sent.append(fake.storage_bytes_sent)
                summaries.append(request_summary(fake.requests))
                storage_peaks.append(b.tracker.storage_peak())
            if capped:
                b.warm_cache = cache
            fake.reset_counts()
            elapsed, done = timed_run(curl_command(url), READ_TIMEOUT, capture_output=True)
            base.append(elapsed)
            if shutil.which("curl") and int(done.stdout or 0) != size:
                raise RuntimeError(f"curl fetched {done.stdout!r} bytes, not {size}")
    finally:
        b.cost.apply(fake)
    gcfs_rate, base_rate = size / median(gcfs), size / median(base)
    return {
        "bandwidth_cap_mib_s": (b.cost.storage_bandwidth or 0) / MiB if capped else None,
        "file_bytes": size,
        "gcfs_s": gcfs,
        "baseline_s": base,
        "baseline_tool": "curl" if shutil.which("curl") else "http.client",
        "gcfs_mib_s": gcfs_rate / MiB,
        "baseline_mib_s": base_rate / MiB,
        "ratio": gcfs_rate / base_rate,
        "storage_bytes_sent": sent,
        "storage_peak_concurrent_connections": storage_peaks,
        "gcfs_request_summary": summaries[-1],
    }


def rows_sequential(four: dict[str, Any], capped: bool) -> list[Row]:
    target = 3.0 if capped else 0.8
    what = "capped" if capped else "no bandwidth cap"
    if capped:
        what = f"cap {four['bandwidth_cap_mib_s']:.0f} MiB/s/conn"
    return [
        Row(
            "4b" if capped else "4a",
            f"cat {four['file_bytes'] // MiB} MiB, {what}",
            fmt_rate(four["gcfs_mib_s"] * MiB),
            fmt_rate(four["baseline_mib_s"] * MiB),
            fmt_x(four["ratio"]),
            f">= {target:g}x {four['baseline_tool']}",
            four["ratio"] >= target,
        )
    ]


# -- 5: random reads ------------------------------------------------------------------------


def scenario_random(b: Bench) -> dict[str, Any]:
    fake, files = b.fake, b.files
    count = b.args.random_reads
    latencies: list[float] = []
    ratios: list[float] = []
    sent: list[int] = []
    read: list[int] = []
    summaries: list[dict[str, Any]] = []
    base: list[float] = []
    for rep in b.reps:
        with b.mounts.mount(fake, "s5") as mount:
            path = files.big_path(mount.path)
            os.stat(path)
            fake.reset_counts()
            result = run_readers(
                [reader_command("random", str(path), str(count), str(RANDOM_READ_SIZE), str(rep))],
                READ_TIMEOUT,
            )[0]
            sent.append(fake.storage_bytes_sent)
            read.append(result["bytes"])
            ratios.append(fake.storage_bytes_sent / max(1, result["bytes"]))
            latencies += result["latencies"]
            summaries.append(request_summary(fake.requests))
        base += direct_random_reads(b, min(count, BASELINE_RANDOM_READS), rep)
    lat = distribution(latencies)
    return {
        "reads_per_rep": count,
        "read_size": RANDOM_READ_SIZE,
        "bytes_read": read,
        "storage_bytes_sent": sent,
        "bytes_ratio": ratios,
        "bytes_ratio_median": median(ratios),
        "latency_s": lat,
        "baseline_latency_s": distribution(base),
        "target_latency_s": b.cost.storage_latency + 0.010,
        "gcfs_request_summary": summaries[-1],
    }


def direct_random_reads(b: Bench, count: int, seed: int) -> list[float]:
    """Ranged GETs of 64 KiB straight from storage on one keep-alive connection."""
    url = signed_url(b.fake, b.files.big_image)
    size = len(b.files.big_content)
    rng = random.Random(1000 + seed)
    out = []
    with httpx.Client(timeout=60) as client:
        for _ in range(count):
            offset = rng.randrange(0, size - RANDOM_READ_SIZE)
            headers = {"Range": f"bytes={offset}-{offset + RANDOM_READ_SIZE - 1}"}
            started = time.perf_counter()
            response = client.get(url, headers=headers)
            out.append(time.perf_counter() - started)
            if response.status_code != 206 or len(response.content) != RANDOM_READ_SIZE:
                raise RuntimeError(f"direct ranged GET answered {response.status_code}")
    return out


def rows_random(five: dict[str, Any]) -> list[Row]:
    p50 = five["latency_s"]["p50"]
    base = five["baseline_latency_s"]["p50"]
    return [
        Row(
            "5",
            f"{five['reads_per_rep']} random 64 KiB reads: storage bytes / bytes read",
            f"{five['bytes_ratio_median']:.2f}",
            "1.00",
            "",
            "<= 2",
            five["bytes_ratio_median"] <= 2,
        ),
        Row(
            "5",
            "median latency of one 64 KiB read",
            f"{p50 * 1000:.1f} ms",
            f"{base * 1000:.1f} ms direct",
            fmt_x(base / p50),
            f"< {five['target_latency_s'] * 1000:.0f} ms",
            p50 < five["target_latency_s"],
        ),
    ]


# -- 6: block cache -------------------------------------------------------------------------


def scenario_block_cache(b: Bench) -> dict[str, Any]:
    fake, files = b.fake, b.files
    size = len(files.big_content)
    cache = b.warm_cache
    if cache is None:  # scenario 4 did not run: fill a cache dir once
        cache = b.mounts.fresh_cache()
        with b.mounts.mount(fake, "s6-fill", cache) as mount:
            timed_run(
                ["cat", str(files.big_path(mount.path))], READ_TIMEOUT, stdout=subprocess.DEVNULL
            )
        b.warm_cache = cache
    local = b.work / "local.bin"
    local.write_bytes(files.big_content)
    b.local_file = local
    dropped = drop_caches()
    cold_gcfs: list[float] = []
    cold_local: list[float] = []
    warm_gcfs: list[float] = []
    warm_local: list[float] = []
    storage_bytes: list[int] = []

    def cat(path: Path) -> float:
        return timed_run(["cat", str(path)], READ_TIMEOUT, stdout=subprocess.DEVNULL)[0]

    for _ in b.reps:
        for warm, gcfs_list, local_list in (
            (False, cold_gcfs, cold_local),
            (True, warm_gcfs, warm_local),
        ):
            with b.mounts.mount(fake, "s6", cache) as mount:
                path = files.big_path(mount.path)
                os.stat(path)
                if not warm:
                    drop_caches()
                fake.reset_counts()
                gcfs_list.append(cat(path))
                storage_bytes.append(fake.storage_bytes_sent)
            if not warm:
                drop_caches()
            else:
                cat(local)  # make sure it is in the page cache
            local_list.append(cat(local))
    return {
        "file_bytes": size,
        "drop_caches": dropped,
        "cold": {
            "gcfs_s": cold_gcfs,
            "local_s": cold_local,
            "gcfs_mib_s": size / median(cold_gcfs) / MiB,
            "local_mib_s": size / median(cold_local) / MiB,
            "ratio": median(cold_local) / median(cold_gcfs),
        },
        "warm": {
            "gcfs_s": warm_gcfs,
            "local_s": warm_local,
            "gcfs_mib_s": size / median(warm_gcfs) / MiB,
            "local_mib_s": size / median(warm_local) / MiB,
            "ratio": median(warm_local) / median(warm_gcfs),
        },
        "storage_bytes_sent": storage_bytes,
    }


def rows_block_cache(six: dict[str, Any]) -> list[Row]:
    rows = []
    for key, name, what in (
        ("cold", "6a", "page cache dropped before both"),
        ("warm", "6b", "warm vs warm"),
    ):
        part = six[key]
        if key == "cold" and not six["drop_caches"]:
            what = "drop_caches refused: both warm"
        rows.append(
            Row(
                name,
                f"re-read from block cache, {what}",
                fmt_rate(part["gcfs_mib_s"] * MiB),
                fmt_rate(part["local_mib_s"] * MiB) + " local",
                fmt_x(part["ratio"]),
                ">= 0.5x local cat",
                part["ratio"] >= 0.5,
            )
        )
    return rows


# -- 7: memory ------------------------------------------------------------------------------


def scenario_memory(b: Bench) -> dict[str, Any]:
    peaks = {label: rss / MiB for label, rss in sorted(b.sampler.peak.items())}
    through = [v for k, v in peaks.items() if k.startswith(("s1", "s3", "s4", "s5", "s6"))]
    return {
        "peak_rss_mib_by_scenario": peaks,
        "samples_by_scenario": dict(sorted(b.sampler.samples.items())),
        "peak_rss_mib_s1_to_s6": max(through) if through else float("nan"),
    }


def rows_memory(seven: dict[str, Any]) -> list[Row]:
    peak = seven["peak_rss_mib_s1_to_s6"]
    worst = max(
        (k for k in seven["peak_rss_mib_by_scenario"] if not k.startswith("s8")),
        key=lambda k: seven["peak_rss_mib_by_scenario"][k],
        default="-",
    )
    return [
        Row(
            "7",
            f"daemon peak VmRSS, scenarios 1-6 (worst: {worst})",
            f"{peak:.0f} MiB",
            "",
            "",
            "< 150 MiB",
            None if math.isnan(peak) else peak < 150,
        )
    ]


# -- 8: concurrent readers ------------------------------------------------------------------


def reader_rates(results: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["bytes"] / max(1e-9, r["end"] - r["start"]) for r in results]
    total = sum(r["bytes"] for r in results)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "aggregate_mib_s": total / span / MiB,
        "per_reader_mib_s": [x / MiB for x in rates],
        "min_mib_s": min(rates) / MiB,
        "max_mib_s": max(rates) / MiB,
        "fairness_min_over_max": min(rates) / max(rates),
        "elapsed_s": span,
    }


def scenario_concurrent(b: Bench) -> dict[str, Any]:
    fake, files = b.fake, b.files
    gcfs_runs: list[dict[str, Any]] = []
    base_runs: list[dict[str, Any]] = []
    peak_rss: list[float] = []
    summaries: list[dict[str, Any]] = []
    storage_peaks: list[int] = []
    n = len(files.reader_items)
    for _ in b.reps:
        with b.mounts.mount(fake, "s8") as mount:
            paths = [
                files.item_path(mount.path, item, name) for item, _, name in files.reader_items
            ]
            for path in paths:
                os.stat(path)
            fake.reset_counts()
            b.tracker.reset()
            start_at = time.monotonic() + 1.0 + 0.05 * n
            results = run_readers(
                [reader_command("seq", str(p), repr(start_at)) for p in paths], READ_TIMEOUT
            )
            gcfs_runs.append(reader_rates(results))
            summaries.append(request_summary(fake.requests))
            storage_peaks.append(b.tracker.storage_peak())
        peak_rss.append(b.sampler.peak.get("s8", 0) / MiB)
        urls = [signed_url(fake, image) for _, image, _ in files.reader_items]
        start_at = time.monotonic() + 1.0 + 0.05 * n
        results = run_readers(
            [reader_command("url", u, repr(start_at)) for u in urls], READ_TIMEOUT
        )
        base_runs.append(reader_rates(results))

    def mid(runs: list[dict[str, Any]], key: str) -> float:
        return median([r[key] for r in runs])

    return {
        "readers": n,
        "file_bytes": len(files.big_content) if n == 0 else None,
        "reader_file_mib": b.args.reader_mib,
        "gcfs": gcfs_runs,
        "baseline": base_runs,
        "gcfs_aggregate_mib_s": mid(gcfs_runs, "aggregate_mib_s"),
        "baseline_aggregate_mib_s": mid(base_runs, "aggregate_mib_s"),
        "gcfs_fairness": mid(gcfs_runs, "fairness_min_over_max"),
        "baseline_fairness": mid(base_runs, "fairness_min_over_max"),
        "gcfs_min_mib_s": mid(gcfs_runs, "min_mib_s"),
        "gcfs_max_mib_s": mid(gcfs_runs, "max_mib_s"),
        "peak_rss_mib": max(peak_rss),
        "storage_peak_concurrent_connections": storage_peaks,
        "gcfs_request_summary": summaries[-1],
    }


def rows_concurrent(eight: dict[str, Any]) -> list[Row]:
    n, size = eight["readers"], eight["reader_file_mib"]
    return [
        Row(
            "8",
            f"{n} readers x {size} MiB: aggregate",
            f"{eight['gcfs_aggregate_mib_s']:.0f} MiB/s",
            f"{eight['baseline_aggregate_mib_s']:.0f} MiB/s direct",
            fmt_x(eight["gcfs_aggregate_mib_s"] / eight["baseline_aggregate_mib_s"]),
            "(reported)",
            None,
        ),
        Row(
            "8",
            "fairness: slowest / fastest reader",
            f"{eight['gcfs_fairness']:.2f} ({eight['gcfs_min_mib_s']:.0f}-"
            f"{eight['gcfs_max_mib_s']:.0f} MiB/s)",
            f"{eight['baseline_fairness']:.2f}",
            "",
            ">= 0.5",
            eight["gcfs_fairness"] >= 0.5,
        ),
    ]
