"""The gcfs benchmark: every scenario against its baseline, in one run, on this machine.

    python tests/bench/run.py [--quick] [--out FILE] [--repeat N]
                              [--latency-ms 50] [--per-item-ms 1] [--media-latency-ms 50]
                              [--storage-latency-ms 20] [--bandwidth-mib 100]
                              [--scenarios 1,2,...] [--keep-work] [--daemon-log-level INFO]
                              [sizes: --items, --file-mib, --epoch-files, --prefetch-files, ...]
                              [issue 15: --scale-items, --scale-items-max, --down-items, ...]

It starts the fake Grand Challenge (gcfs.fakegc.FakeGC) in this process with a cost model:
a fixed latency per API request and per /media/ redirect (both round trips to the site), a
cost per serialized result, a storage latency and a per-connection bandwidth cap. It builds
a world with an archive of cheap items (one Value each), a large generated image file,
reader files for scenario 8, three archives of many files (one image per item: the epoch,
small-file and prefetch sets of scenarios 9-11) and (on a second fake) the demo tree, mounts
gcfs in subprocesses (`python -m gcfs mount --foreground`, as the tests do), runs each
scenario against its baseline alternately for `--repeat` repetitions, prints a table with the
medians and writes everything measured to a JSON file. A baseline tool that is missing
(rclone) is named in its row, never skipped quietly.

Scenarios (targets from the issue):
  1  cold `ls -l` of items/ (10,000 items) vs gcapi's iterate_all with httpx: >= 8x faster,
     requests = pages needed (at the API's maximum page of 1000) + a small constant (<= 2)
  2  the same `ls -l` again within the TTL: 0 requests, < 0.5 s
  3  cold `find` over the demo tree vs a sequential API walk (pages of 100): no (path, query)
     requested twice; requests and time reported
  4  `cat` of the large file (cold: fresh mount, fresh cache dir) vs `curl` of its signed URL:
     a) without a bandwidth cap >= 0.8x curl's throughput, b) with the cap >= 4x;
     without the cap also c) vs `cat` through an rclone mount (`rclone mount :http:
     --vfs-cache-mode off`) of the same bytes from the store's plain view: >= 1x, and
     d) the daemon's CPU-seconds per GiB (utime + stime from /proc/<pid>/stat): <= 1.5
  5  random 64 KiB preads (cold cache): storage bytes <= 2x bytes read; median latency <
     storage latency + 10 ms; baseline: direct ranged GETs of 64 KiB
  6  re-read from the block cache (new mount on the warm cache dir) vs `cat` of a local file:
     a) page cache dropped before both reads (disk to disk): >= 1x, b) warm vs warm: >= 0.5x
  7  daemon VmRSS, sampled every 100 ms through every other scenario: < 150 MiB
  8  N processes reading N different files at once: aggregate throughput vs N direct
     streams, fairness min/max per-reader throughput (>= 0.5 taken as "no reader starves")
  9  a training epoch: 500 files of 4 MiB read whole by 4 worker processes from a shuffled
     list, epoch 1 cold, epoch 2 on the same mount with the page cache dropped, vs a
     download of the signed URLs with 8 parallel GETs (curl -Z) then the same 4 workers on
     the local copies (the listing before epoch 1 and the baseline's URLs are untimed):
     a) epoch 1 <= 1.2x the download's time, b) epoch 2 <= 1.5x the local read's time,
     c) 0 requests during epoch 2
 10  re-opening 1,000 cached 4 KiB files one after another (block cache warm, page cache
     dropped, within the TTL) at the API latency: 0 requests, < 1 s; local read beside it
 11  `gcfs prefetch` of 2,000 files of 1 MiB at 50 ms storage latency vs the same files
     fetched one after another (curl, signed URLs): the ratio (reported); 11b the same for
     `gcfs snapshot` of those files into a fresh snapshot directory (issue 11)

Scenarios 12-15 (issue 15, a million items) run on a fake of their own whose archives hold
generated items (World.add_generated_items: one Value each, made per page), at the API latency
and --scale-per-item-ms per result (default 0.05 ms: a page of 1000 then costs 100 ms, so that
a million items take ~100 s of server time, not the ~17 min of scenario 1's 1 ms). Every mount
there is cold unless said otherwise: a fresh --cache-dir and a fresh $XDG_CACHE_HOME (where the
metadata store lives). Every command is bounded: --scale-timeout per listing, --probe-timeout
per probe of 15, and a daemon past --rss-abort-mib is killed (its row says where it stopped).
 12  daemon VmRSS after `ls -l` of items/ of --scale-items (200,000) and --scale-items-max
     (1,000,000; 0 leaves it out) items: before, after, peak (polled every 100 ms), and per
     listed item ((after - before) / items); targets: peak <= 400 MiB and <= 600 MiB
 13  time to the first entry of the --scale-items directory (os.scandir, stopped there) vs
     the time to all its entries, each on a cold mount: the ratio (reported)
 14  restart: `ls -l` of the --scale-items directory (--ttl 600), unmount, mount again on the
     same cache dir and $XDG_CACHE_HOME, `ls -l` again: requests of the second listing
     (target 0) and its time vs the cold listing's
 15  server down: a mount with --ttl --down-ttl (2 s) lists --down-items items; after the TTL
     the fake refuses connections (15a/b: reset on accept) or black-holes them (15c/d: never
     answers); `ls -l` of the seen directory and `stat` of an unseen images/<uuid>, each with
     its outcome, vs the same probes with the server up after the TTL; targets: seen <= 2 s,
     unseen EIO <= 5 s once the server is known down (the second unseen probe)

Timings belong here only; tests/test_bench_smoke.py runs `--quick` and checks the output's
shape, never a number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15")
SCALE_SCENARIOS = ("12", "13", "14", "15")
MiB = 1 << 20
KiB = 1 << 10


# -- the run --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repetition (< 1 min)")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "gcfs-bench.json")
    p.add_argument("--repeat", type=int, help="repetitions per scenario (default 3, quick 1)")
    p.add_argument("--latency-ms", type=float, default=50.0, help="per API request")
    p.add_argument("--per-item-ms", type=float, default=1.0, help="per serialized list result")
    p.add_argument(
        "--media-latency-ms",
        type=float,
        help="per /media/ redirect (default: --latency-ms; it is a request to the same site)",
    )
    p.add_argument("--storage-latency-ms", type=float, default=20.0, help="per storage request")
    p.add_argument(
        "--bandwidth-mib", type=float, default=100.0, help="per storage connection, 0 = no cap"
    )
    p.add_argument("--items", type=int, help="archive items (default 10000, quick 1000)")
    p.add_argument("--file-mib", type=int, help="large file size (default 1024, quick 64)")
    p.add_argument("--random-reads", type=int, help="scenario 5 reads (default 1000, quick 100)")
    p.add_argument("--readers", type=int, help="scenario 8 readers (default 16, quick 4)")
    p.add_argument("--reader-mib", type=int, help="scenario 8 file size (default 64, quick 16)")
    p.add_argument("--epoch-files", type=int, help="scenario 9 files (default 500, quick 24)")
    p.add_argument("--epoch-kib", type=int, help="scenario 9 file size (default 4096, quick 256)")
    p.add_argument("--small-files", type=int, help="scenario 10 files (default 1000, quick 40)")
    p.add_argument("--small-kib", type=int, help="scenario 10 file size (default 4, quick 4)")
    p.add_argument("--prefetch-files", type=int, help="scenario 11 files (default 2000, quick 20)")
    p.add_argument(
        "--prefetch-kib", type=int, help="scenario 11 file size (default 1024, quick 64)"
    )
    p.add_argument(
        "--prefetch-storage-latency-ms",
        type=float,
        default=50.0,
        help="per storage request, scenario 11 only",
    )
    p.add_argument(
        "--prefetch-repeat", type=int, help="scenario 11 repetitions (default 1: it is long)"
    )
    p.add_argument(
        "--scale-items", type=int, help="scenarios 12-14 items (default 200000, quick 300)"
    )
    p.add_argument(
        "--scale-items-max",
        type=int,
        help="scenario 12's second size (default 1000000, quick 600; 0 = leave it out)",
    )
    p.add_argument(
        "--scale-per-item-ms",
        type=float,
        default=0.05,
        help="per serialized list result, scenarios 12-15 only",
    )
    p.add_argument(
        "--scale-timeout", type=float, help="per listing of 12-14, s (default 900, quick 120)"
    )
    p.add_argument(
        "--rss-abort-mib",
        type=int,
        default=4096,
        help="12-15: kill a daemon whose VmRSS passes this (protects the machine)",
    )
    p.add_argument("--down-items", type=int, help="scenario 15 items (default 1000, quick 50)")
    p.add_argument("--down-ttl", type=float, default=2.0, help="scenario 15 mounts' --ttl, s")
    p.add_argument(
        "--down-op-timeout",
        type=float,
        help="scenario 15 mounts' --timeout, s (default: the daemon's own; quick 5)",
    )
    p.add_argument("--probe-timeout", type=float, help="per probe of 15, s (default 90, quick 20)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="e.g. 1,2,4")
    p.add_argument("--keep-work", action="store_true", help="keep the work dir (daemon logs)")
    p.add_argument("--daemon-log-level", default="INFO")
    p.add_argument(
        "--trace-ops",
        action="store_true",
        help="run daemons under trace_ops.py: FUSE calls, read sizes (diagnosis; slower)",
    )
    p.add_argument(
        "--gcfs-ref",
        help="measure gcfs/ as committed at this git ref (default: the working tree as it is now)",
    )
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "repeat": (1, 3),
        "items": (1000, 10_000),
        "file_mib": (64, 1024),
        "random_reads": (100, 1000),
        "readers": (4, 16),
        "reader_mib": (16, 64),
        "epoch_files": (24, 500),
        "epoch_kib": (256, 4096),
        "small_files": (40, 1000),
        "small_kib": (4, 4),
        "prefetch_files": (20, 2000),
        "prefetch_kib": (64, 1024),
        "prefetch_repeat": (1, 1),
        "scale_items": (300, 200_000),
        "scale_items_max": (600, 1_000_000),
        "scale_timeout": (120.0, 900.0),
        "down_items": (50, 1000),
        "down_op_timeout": (5.0, None),
        "probe_timeout": (20.0, 90.0),
    }
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    return args


def file_sets(args: argparse.Namespace) -> dict[str, Any]:
    """The many-file sets of scenarios 9-11 (harness.SetSpec). The epoch's bytes are held in
    memory, as the large file's are, so that the fake serves them with memory copies only
    (GeneratedContent's ~340 MiB/s here would cap the 8 parallel GETs on the fake's side);
    the prefetch set is generated: at 50 ms per request its ~3 ms per MiB does not matter."""
    from tests.bench.harness import SetSpec

    return {
        "epoch": SetSpec(args.epoch_files, args.epoch_kib * KiB, generated=False),
        "small": SetSpec(args.small_files, args.small_kib * KiB, generated=False),
        "prefetch": SetSpec(args.prefetch_files, args.prefetch_kib * KiB, generated=True),
    }


def print_table(rows: list[Any], machine: str) -> None:
    headers = ("#", "scenario", "gcfs", "baseline", "ratio", "target", "met?")
    cells = [
        (
            r.scenario,
            r.what,
            r.gcfs,
            r.baseline,
            r.ratio,
            r.target,
            "-" if r.met is None else ("yes" if r.met else "NO"),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-" * len(line))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())
    print(machine)
    print("ratio: how many times better gcfs is (time: baseline/gcfs; throughput: gcfs/baseline)")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60, check=False
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def snapshot_gcfs(work: Path, ref: str | None) -> dict[str, Any]:
    """Copy the gcfs package to work/src once, so that the fake, every daemon of this run and
    its numbers belong to one version of the code while others edit the checkout: the working
    tree as it is now, or `ref` exported from git."""
    src = work / "src"
    src.mkdir()
    if ref:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", ref, "gcfs"],
            capture_output=True,
            timeout=60,
            check=True,
        )
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, timeout=60, check=True)
    else:
        shutil.copytree(
            REPO / "gcfs", src / "gcfs", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    dirty = _git("status", "--porcelain", "--", "gcfs").splitlines()
    return {
        "path": str(src),
        "from": f"git {ref} ({_git('rev-parse', ref)})" if ref else "working tree",
        "head": _git("rev-parse", "HEAD"),
        "dirty_files_in_working_tree": [line[3:] for line in dirty],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM ends the run through the finally blocks: mounts unmounted, fakes stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="gcfs-bench-"))
    try:
        source = snapshot_gcfs(work, args.gcfs_ref)
    except (OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(work, ignore_errors=True)
        print(f"cannot snapshot gcfs: {exc}", file=sys.stderr)
        return 2
    # The snapshot first (gcfs, gcfs.fakegc), then the checkout (tests.bench).
    sys.path[:0] = [source["path"], str(REPO)]
    from gcfs.fakegc import FakeGC
    from tests.bench import harness, scenarios

    machine = harness.machine_info()
    media_ms = args.latency_ms if args.media_latency_ms is None else args.media_latency_ms
    cost = harness.CostModel(
        latency=args.latency_ms / 1000,
        per_item_latency=args.per_item_ms / 1000,
        storage_latency=args.storage_latency_ms / 1000,
        storage_bandwidth=args.bandwidth_mib * MiB if args.bandwidth_mib > 0 else None,
        media_latency=media_ms / 1000,
    )
    sampler = harness.RssSampler()
    sampler.start()
    env_path = os.pathsep.join(filter(None, [source["path"], os.environ.get("PYTHONPATH")]))
    os.environ["PYTHONPATH"] = env_path  # the daemons and readers import the snapshot too
    daemon = [sys.executable, "-m", "gcfs"]
    if args.trace_ops:
        daemon = [sys.executable, str(Path(__file__).with_name("trace_ops.py"))]
    mounts = harness.Mounts(work, sampler, daemon, args.daemon_log_level)
    fakes: list[Any] = []
    results: dict[str, Any] = {}
    rows: list[Any] = []
    started = time.monotonic()
    try:
        print(
            f"gcfs from {source['from']}; building the world: {args.items} items, "
            f"a {args.file_mib} MiB file, {args.readers} x {args.reader_mib} MiB, "
            f"{args.epoch_files} x {args.epoch_kib} KiB, {args.small_files} x "
            f"{args.small_kib} KiB, {args.prefetch_files} x {args.prefetch_kib} KiB",
            flush=True,
        )
        world, files = harness.bench_world(
            args.items, args.file_mib * MiB, args.readers, args.reader_mib * MiB, file_sets(args)
        )
        fake = FakeGC(world).start()
        fakes.append(fake)
        cost.apply(fake)
        bench = scenarios.Bench(
            args, cost, fake, files, mounts, harness.Tracker(fake), sampler, work, fakes
        )
        if any(n in args.scenarios for n in SCALE_SCENARIOS):
            sizes = {f"bench-scale-{args.scale_items}": args.scale_items}
            if args.scale_items_max:
                sizes[f"bench-scale-{args.scale_items_max}"] = args.scale_items_max
            scale = harness.ScaleFiles(sizes, ("bench-down", args.down_items))
            scale_fake = FakeGC(harness.scale_world(scale.counts)).start()
            fakes.append(scale_fake)
            harness.CostModel(
                cost.latency,
                args.scale_per_item_ms / 1000,
                cost.storage_latency,
                cost.storage_bandwidth,
                cost.media_latency,
            ).apply(scale_fake)
            bench.scale, bench.scale_fake = scale, scale_fake

        def attempt(names: tuple[str, ...], fn: Callable[[], list[Any]]) -> None:
            if not any(n in args.scenarios for n in names):
                for n in names:
                    results.setdefault(n, {"skipped": True})
                return
            print(f"scenario {'/'.join(names)} ...", flush=True)
            t0 = time.monotonic()
            try:
                rows.extend(fn())
            except Exception as exc:
                traceback.print_exc()
                for n in names:
                    results.setdefault(n, {})["error"] = f"{type(exc).__name__}: {exc}"
                    rows.append(scenarios.Row(n, "failed to run", "", "", "", "", None))
            for n in names:
                results.setdefault(n, {})["wall_s"] = time.monotonic() - t0

        def listing() -> list[Any]:
            one, two = scenarios.scenario_listing(bench)
            results["1"], results["2"] = one, two
            return scenarios.rows_listing(one, two)

        def find() -> list[Any]:
            results["3"] = scenarios.scenario_find(bench)
            return scenarios.rows_find(results["3"])

        def sequential() -> list[Any]:
            a = scenarios.scenario_sequential(bench, capped=False)
            b = scenarios.scenario_sequential(bench, capped=cost.storage_bandwidth is not None)
            results["4"] = {"uncapped": a, "capped": b}
            return scenarios.rows_sequential(a, False) + scenarios.rows_sequential(b, True)

        def random_reads() -> list[Any]:
            results["5"] = scenarios.scenario_random(bench)
            return scenarios.rows_random(results["5"])

        def block_cache() -> list[Any]:
            results["6"] = scenarios.scenario_block_cache(bench)
            return scenarios.rows_block_cache(results["6"])

        def memory() -> list[Any]:
            results["7"] = scenarios.scenario_memory(bench)
            return scenarios.rows_memory(results["7"])

        def concurrent() -> list[Any]:
            results["8"] = scenarios.scenario_concurrent(bench)
            return scenarios.rows_concurrent(results["8"])

        def epoch() -> list[Any]:
            results["9"] = scenarios.scenario_epoch(bench)
            return scenarios.rows_epoch(results["9"])

        def reopen() -> list[Any]:
            results["10"] = scenarios.scenario_reopen(bench)
            return scenarios.rows_reopen(results["10"])

        def prefetch() -> list[Any]:
            results["11"] = scenarios.scenario_prefetch(bench)
            return scenarios.rows_prefetch(results["11"])

        def rss_listing() -> list[Any]:
            results["12"] = scenarios.scenario_rss_listing(bench)
            return scenarios.rows_rss_listing(results["12"])

        def first_entry() -> list[Any]:
            results["13"] = scenarios.scenario_first_entry(bench)
            return scenarios.rows_first_entry(results["13"])

        def restart() -> list[Any]:
            results["14"] = scenarios.scenario_restart(bench)
            return scenarios.rows_restart(results["14"])

        def down() -> list[Any]:
            results["15"] = scenarios.scenario_down(bench)
            return scenarios.rows_down(results["15"])

        attempt(("1", "2"), listing)
        attempt(("3",), find)
        attempt(("4",), sequential)
        attempt(("5",), random_reads)
        attempt(("6",), block_cache)
        attempt(("8",), concurrent)
        attempt(("9",), epoch)
        attempt(("10",), reopen)
        attempt(("11",), prefetch)
        attempt(("12",), rss_listing)
        attempt(("13",), first_entry)
        attempt(("14",), restart)
        attempt(("15",), down)
        attempt(("7",), memory)  # last: scenario 7 covers every other one
    finally:
        mounts.close_all()
        for f in fakes:
            f.stop()
        sampler.stop()
        if args.keep_work:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    line = harness.machine_line(machine)
    print()
    print_table(rows, line)
    if mounts.log_problems:
        print(f"daemon log problems ({len(mounts.log_problems)}):")
        for problem in mounts.log_problems[:20]:
            print("  " + problem)
    output = {
        "machine": machine,
        "machine_line": line,
        "gcfs_source": {k: v for k, v in source.items() if k != "path"},
        "config": {
            "quick": args.quick,
            "repeat": args.repeat,
            "cost_model": asdict(cost),
            "items": args.items,
            "file_mib": args.file_mib,
            "random_reads": args.random_reads,
            "readers": args.readers,
            "reader_mib": args.reader_mib,
            "epoch_files": args.epoch_files,
            "epoch_kib": args.epoch_kib,
            "small_files": args.small_files,
            "small_kib": args.small_kib,
            "prefetch_files": args.prefetch_files,
            "prefetch_kib": args.prefetch_kib,
            "prefetch_storage_latency_ms": args.prefetch_storage_latency_ms,
            "prefetch_repeat": args.prefetch_repeat,
            "scale_items": args.scale_items,
            "scale_items_max": args.scale_items_max,
            "scale_per_item_ms": args.scale_per_item_ms,
            "scale_timeout_s": args.scale_timeout,
            "rss_abort_mib": args.rss_abort_mib,
            "down_items": args.down_items,
            "down_ttl_s": args.down_ttl,
            "down_op_timeout_s": args.down_op_timeout,
            "probe_timeout_s": args.probe_timeout,
            "scenarios": args.scenarios,
        },
        "wall_s": time.monotonic() - started,
        "table": [asdict(r) for r in rows],
        "scenarios": results,
        "daemon_log_problems": mounts.log_problems,
        "op_traces": mounts.traces,
    }
    args.out.write_text(json.dumps(output, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"results written to {args.out} ({output['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
