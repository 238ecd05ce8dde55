"""Download stage vs plain img2dataset: images/s on the same url list served over loopback HTTP."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402  (bench/ is not a package: the path above makes it importable)
    REPO_ROOT,
    RESULTS_DIR,
    describe_machine,
    format_table,
    machine_line,
    median,
    write_json,
)

PACKAGES = (
    "dgaug",
    "img2dataset",
    "torch",
    "webdataset",
    "pyarrow",
    "pillow",
    "opencv-python-headless",
    "albumentations",
    "numpy",
)
I2D = "img2dataset"
DGAUG = "dgaug"
DGAUG_SPAWN = "dgaug, i2d spawning"  # img2dataset left to spawn its pool and logger per shard

# albumentations (imported by img2dataset) asks the network for updates on import; offline that is
# a stall in whichever system imports it first, so both get the same switch.
CHILD_ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}

# (a) plain img2dataset, as a user runs it: one download() over the whole url list.
I2D_CHILD = """
import json, sys
from img2dataset import download
download(**json.load(open(sys.argv[1])))
"""

# (b) dgaug's pipeline. The wrappers only read a clock around the stage's own functions (a few
# calls per shard), so the breakdown comes from the measured run itself, not from a second one.
DGAUG_CHILD = """
import glob, json, os, sys, time
t_main = time.perf_counter()
spec = json.load(open(sys.argv[1]))
from dgaug.pipeline import attempt
from dgaug.pipeline.executors import local
from dgaug.job.manifest import validate
from dgaug.job.run import run_pipeline
from dgaug.core.storage import Storage
from dgaug.stages.download import stage
phases, calls, spans = {}, [], []
def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            phases.setdefault(name, []).append(time.perf_counter() - t)
    return wrapper
run_i2d = stage.DownloadStage._run_img2dataset
def call_i2d(self, kwargs, log_path):
    t = time.time()
    try:
        return run_i2d(self, kwargs, log_path)
    finally:
        calls.append((t, time.time()))
def with_spans(fn):
    def wrapper(i2d_dir, *a, **k):
        # img2dataset's per-sub-shard clock, read before the merge drops it from the stats.
        st = [json.load(open(p)) for p in glob.glob(os.path.join(i2d_dir, "*_stats.json"))]
        spans.append([(s["start_time"], s["end_time"]) for s in st])
        return fn(i2d_dir, *a, **k)
    return wrapper
def patch(owner, attr, name, fn):
    # Fail loudly if the code moved: a wrapper set on a name nobody calls would time nothing.
    assert hasattr(owner, attr), f"{owner.__name__}.{attr} is gone: update bench/download.py"
    setattr(owner, attr, timed(name, fn))
patch(stage.DownloadStage, "_run_img2dataset", "img2dataset", call_i2d)
# The merge streams sub-shards into the tar while img2dataset runs (stream_tar, overlapped);
# what remains after the call (the tar's last sub-shards, merge_status) is fetch_and_merge - call.
patch(stage, "merge_status", "merge_status", with_spans(stage.merge_status))
patch(stage, "merge_shards", "merge_whole", with_spans(stage.merge_shards))
patch(stage, "stream_tar", "stream_tar", stage.stream_tar)
patch(stage.DownloadStage, "_fetch_and_merge", "fetch_and_merge", stage.DownloadStage._fetch_and_merge)
patch(stage.DownloadStage, "setup", "setup", stage.DownloadStage.setup)
patch(stage.DownloadStage, "plan", "plan", stage.DownloadStage.plan)
patch(stage.DownloadStage, "process", "process", stage.DownloadStage.process)
patch(attempt, "sha256_file", "sha256", attempt.sha256_file)
patch(Storage, "commit_file", "commit_file", Storage.commit_file)
patch(local, "run_attempt", "attempt", attempt.run_attempt)
if spec["spawn"]:
    # The stage as it was before 1a1aa78: img2dataset spawns its pool and logger on every call.
    # A renamed hook would otherwise silently measure the current stage under the old label.
    assert hasattr(stage, "_skip_img2dataset_process_start_up"), "stage hook renamed"
    stage._skip_img2dataset_process_start_up = lambda: None
t_run = time.perf_counter()
summary = run_pipeline(validate(spec["manifest"]))
t_end = time.perf_counter()
json.dump({"ok": summary.ok, "imports_s": t_run - t_main, "run_pipeline_s": t_end - t_run,
           "phases": phases, "i2d_calls": calls, "i2d_spans": spans}, open(spec["timings"], "w"))
sys.exit(0 if summary.ok else 1)
"""


# ------------------------------------------------------------------------------- the HTTP server


def _serve(root: str, rel_paths: list[str], latency_s: float, conn: Any) -> None:
    """Serve root/<rel> from memory until killed; sends the port, then a request count on demand."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    # Bytes held in memory: the server's cost per request is then Python's HTTP handling only,
    # the same for both systems, with no disk in the measured path.
    files = {rel: Path(root, rel).read_bytes() for rel in rel_paths}
    served = [0]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if latency_s:
                time.sleep(latency_s)
            # The query (`?copy=n`) makes a repeated source image a distinct URL (--source-images).
            body = files.get(self.path.lstrip("/").partition("?")[0])
            if body is None:
                self.send_error(404)
                return
            with lock:
                served[0] += 1
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        # The default backlog of 5 overflows when 2 x 16 threads connect at once; the kernel then
        # drops SYNs and clients wait a second for the retry, which would measure the server.
        request_queue_size = 1024

    srv = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    conn.send(srv.server_address[1])
    while True:
        conn.recv()  # any message asks for the count so far
        conn.send(served[0])


class LoopbackServer:
    """ThreadingHTTPServer in its own process rather than a thread of the bench: its threads never
    share a GIL with the bench, and its CPU time can be read per run from /proc, which matters on a
    small machine where the server competes with the measured system for the same cores."""

    def __init__(self, root: Path, rel_paths: list[str], latency_s: float):
        ctx = multiprocessing.get_context("fork")  # the bench process has no threads yet
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_serve, args=(str(root), rel_paths, latency_s, child), daemon=True
        )
        self.proc.start()
        if not self._conn.poll(120):
            raise RuntimeError("the HTTP server did not start")
        self.port: int = self._conn.recv()

    def requests(self) -> int:
        self._conn.send(None)
        return self._conn.recv()

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def close(self) -> None:
        self.proc.terminate()
        self.proc.join(10)


# ------------------------------------------------------------------------------------ the runs


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all processes, all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9]
        )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(max_wait_s: float, threshold: float = 0.25) -> tuple[float, float]:
    """Wait (up to max_wait_s) for a second in which other processes use < threshold of the cores.

    On a shared machine other people's jobs would otherwise be measured too. Returns
    (seconds waited, busy fraction of the last sample).
    """
    cores = len(os.sched_getaffinity(0))
    t0 = time.perf_counter()
    while True:
        b0 = _machine_busy_s()
        time.sleep(1.0)
        busy = (_machine_busy_s() - b0) / cores
        waited = time.perf_counter() - t0
        if busy < threshold or waited >= max_wait_s:
            return waited, busy


def _run_child(code: str, spec: dict[str, Any], workdir: Path, name: str) -> dict[str, float]:
    """Run a python child on `spec`: its wall s, the CPU s of it and of everything it started,
    and the CPU s the whole machine was busy meanwhile (the excess is someone else's work)."""
    spec_path = workdir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = workdir / f"{name}.log"
    cpu0, busy0 = _children_cpu_s(), _machine_busy_s()
    t0, epoch0 = time.perf_counter(), time.time()
    with open(log, "w") as f:
        r = subprocess.run(
            [sys.executable, "-c", code, str(spec_path)],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=CHILD_ENV,
        )
    wall = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu0
    machine = _machine_busy_s() - busy0
    if r.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-20:])
        raise RuntimeError(f"{name} exited with {r.returncode}; end of {log}:\n{tail}")
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "machine_busy_s": machine,
        "started_at": epoch0,
        "ended_at": epoch0 + wall,
    }


def _union_s(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one span: time in which some process was fetching."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _i2d_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    # The same settings as dgaug's download stage with its defaults (config.py and stage.py).
    return {
        "input_format": "parquet",
        "url_col": "url",
        "caption_col": "caption",
        "output_format": "webdataset",
        "image_size": args.out_size,
        "resize_mode": "border",
        "encode_quality": 95,
        "processes_count": args.processes,
        "thread_count": args.threads,
        "timeout": 10,
        "retries": 0,
        "compute_hash": "sha256",
        "distributor": "multiprocessing",
        "enable_wandb": False,
        "incremental_mode": "incremental",
        "max_shard_retry": 1,
    }


def run_img2dataset(
    args: argparse.Namespace, urls: Path, shard_size: int, out: Path, workdir: Path, name: str
) -> dict[str, Any]:
    spec = {
        **_i2d_kwargs(args),
        "url_list": str(urls),
        "output_folder": str(out),
        "number_sample_per_shard": shard_size,
    }
    timing = _run_child(I2D_CHILD, spec, workdir, name)
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    spans = [(s["start_time"], s["end_time"]) for s in stats]
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    return {
        **timing,
        "samples": sum(int(s["successes"]) for s in stats),
        "failed": sum(int(s["count"]) - int(s["successes"]) for s in stats),
        "shards": len(stats),
        "fetch_s": _union_s(spans),
        "phases": {
            "start-up: interpreter, imports, sharding, spawn pool": first - timing["started_at"],
            "fetch + resize + write (some shard running)": _union_s(spans),
            "gaps between shards": (last - first) - _union_s(spans),
            "teardown: pool, logger, exit": timing["ended_at"] - last,
        },
    }


def run_dgaug(
    args: argparse.Namespace,
    urls: Path,
    shard_size: int,
    out: Path,
    workdir: Path,
    name: str,
    *,
    spawn: bool = False,
) -> dict[str, Any]:
    manifest = {
        "name": "bench-download",
        "output": str(out),
        "shard_size": shard_size,
        "source": {
            "kind": "url_list",
            "path": str(urls),
            "input_format": "parquet",
            "url_col": "url",
            "caption_col": "caption",
        },
        "executor": {"kind": "local", "max_attempts": 1},
        "stages": {
            "download": {
                "image_size": args.out_size,
                "processes": args.processes,
                "threads": args.threads,
            }
        },
    }
    timings = workdir / f"{name}.timings.json"
    spec = {"manifest": manifest, "timings": str(timings), "spawn": spawn}
    timing = _run_child(DGAUG_CHILD, spec, workdir, name)
    t = json.loads(timings.read_text())
    markers = [json.loads(p.read_text()) for p in sorted((out / "real" / "_state").glob("*.json"))]
    markers = [m for m in markers if m.get("status") == "done"]
    return {
        **timing,
        "samples": sum(int(m["samples"]) for m in markers),
        "failed": sum(sum(m.get("failures", {}).values()) for m in markers),
        "shards": len(markers),
        "markers": [
            {"shard": m["shard"], "duration_s": m["duration_s"], "samples": m["samples"]}
            for m in markers
        ],
        "phases": dgaug_phases(timing, t),
        "fetch_s": sum(_union_s(spans) for spans in t["i2d_spans"]),
        "raw_timings": t,
    }


def dgaug_phases(timing: dict[str, Any], t: dict[str, Any]) -> dict[str, float]:
    """Seconds of one dgaug run by phase; they add up to its wall time."""
    ph = {k: sum(v) for k, v in t["phases"].items()}
    start_up = teardown = fetch = gaps = 0.0
    for (c0, c1), spans in zip(t["i2d_calls"], t["i2d_spans"], strict=True):
        first, last = min(a for a, _ in spans), max(b for _, b in spans)
        start_up += first - c0
        fetch += _union_s(spans)
        gaps += (last - first) - _union_s(spans)
        teardown += c1 - last
    i2d, process = ph.get("img2dataset", 0), ph.get("process", 0)
    # Merge work left once img2dataset's call has ended (its own clock, not the overlapped part).
    merge = ph.get("fetch_and_merge", 0) - i2d
    sha, commit = ph.get("sha256", 0), ph.get("commit_file", 0)
    out = {
        "start-up: interpreter, dgaug imports": timing["wall_s"] - t["run_pipeline_s"],
        "plan: split the url list": ph.get("plan", 0),
        "setup: import img2dataset once": ph.get("setup", 0),
        "per shard: img2dataset start-up (fork, reader, pool)": start_up,
        "per shard: fetch + resize + write (some sub-shard running)": fetch,
        "per shard: gaps between sub-shards": gaps,
        "per shard: img2dataset teardown (pool, exit)": teardown,
        "per shard: merge after the download (last sub-shards, status parquet)": merge,
        "per shard: write/read url parquets": process - i2d - merge,
        "per shard: sha256 of outputs": sha,
        "per shard: commit (fsync, rename)": commit,
        "per shard: markers, scratch": ph.get("attempt", 0) - process - sha - commit,
    }
    out["rest: lock, sizes.json, exit"] = timing["wall_s"] - sum(out.values())
    return out


# ---------------------------------------------------------------------------------- the source


def prepare_images(args: argparse.Namespace) -> tuple[Path, list[tuple[str, str]]]:
    """Procedural JPEGs at the source size, cached across bench runs; (root, [(rel path, caption)])."""
    import pyarrow.parquet as pq

    from dgaug.sources.imageset import write_synthetic_dataset

    root = args.cache / f"synthetic-{args.image_size}px-seed{args.seed}"
    t0 = time.perf_counter()
    distinct = min(args.source_images or args.images, args.images)
    url_list = write_synthetic_dataset(
        root, num_images=distinct, seed=args.seed, image_size=args.image_size
    )
    took = time.perf_counter() - t0
    if took > 5:
        print(f"source images ready in {took:.0f} s ({root})", flush=True)
    table = pq.read_table(url_list, columns=["url", "caption"]).to_pydict()
    prefix = root.resolve().as_uri() + "/"
    items = [
        (u.removeprefix(prefix), c) for u, c in zip(table["url"], table["caption"], strict=True)
    ]
    # Fewer distinct images than URLs: each further URL names one again, with its own query.
    items += [
        (f"{items[i % distinct][0]}?copy={i // distinct}", items[i % distinct][1])
        for i in range(distinct, args.images)
    ]
    return root, items


def write_url_list(items: list[tuple[str, str]], port: int, path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"http://127.0.0.1:{port}/{rel}" for rel, _ in items]
    pq.write_table(pa.table({"url": urls, "caption": [c for _, c in items]}), path)
    return path


# ---------------------------------------------------------------------------------- reporting


def summarize(args: argparse.Namespace, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summary = []
    for shard_size in args.shard_size:
        base = None
        for system in (I2D, DGAUG, DGAUG_SPAWN):
            rs = [r for r in runs if r["system"] == system and r["shard_size"] == shard_size]
            if not rs:
                continue
            wall = median([r["wall_s"] for r in rs])
            row = {
                "system": system,
                "shard_size": shard_size,
                "shards": rs[0]["shards"],
                "samples": sorted({r["samples"] for r in rs}),
                "wall_s_median": wall,
                "wall_s": [r["wall_s"] for r in rs],
                "images_per_s": rs[0]["samples"] / wall,
                # Throughput while img2dataset's workers run, start-up and merges left out.
                "images_per_s_fetching": rs[0]["samples"] / median([r["fetch_s"] for r in rs]),
                "cpu_s_median": median([r["cpu_s"] for r in rs]),
                "foreign_cpu_s_median": median([r["foreign_cpu_s"] for r in rs]),
            }
            base = base or row
            row["ratio_vs_img2dataset"] = row["images_per_s"] / base["images_per_s"]
            if system != I2D:
                # A shard's marker duration_s beyond what img2dataset's workers need to fetch
                # the same images: what dgaug adds per shard (merge, commit, its img2dataset call).
                durations = [m["duration_s"] for r in rs for m in r["markers"]]
                images = [m["samples"] for r in rs for m in r["markers"]]
                row["marker_duration_s_median"] = median(durations)
                row["per_shard_overhead_s"] = median(
                    [
                        d - n / base["images_per_s_fetching"]
                        for d, n in zip(durations, images, strict=True)
                    ]
                )
            summary.append(row)
    return summary


def median_run(runs: list[dict[str, Any]], system: str, shard_size: int) -> dict[str, Any] | None:
    """The run whose wall time is the median one, so its breakdown adds up to the table's figure."""
    rs = [r for r in runs if r["system"] == system and r["shard_size"] == shard_size]
    if not rs:
        return None
    mid = median([r["wall_s"] for r in rs])
    return min(rs, key=lambda r: abs(r["wall_s"] - mid))


def print_report(args: argparse.Namespace, summary: list[dict[str, Any]], runs: list) -> None:
    headers = [
        "system",
        "shard size",
        "shards",
        "samples ok",
        f"wall s (median of {args.repeats})",
        "images/s",
        "vs img2dataset",
        "images/s while fetching",
        "CPU s",
        "others' CPU s",
    ]
    rows = [
        [
            s["system"],
            s["shard_size"],
            s["shards"],
            "/".join(str(n) for n in s["samples"]),
            f"{s['wall_s_median']:.1f}",
            f"{s['images_per_s']:.0f}",
            f"{s['ratio_vs_img2dataset']:.2f}",
            f"{s['images_per_s_fetching']:.0f}",
            f"{s['cpu_s_median']:.0f}",
            f"{s['foreign_cpu_s_median']:.0f}",
        ]
        for s in summary
    ]
    print()
    print(format_table(headers, rows))
    for s in summary:
        if "per_shard_overhead_s" in s:
            print(
                f"{s['system']}, shard size {s['shard_size']}: a shard's marker duration_s is "
                f"{s['marker_duration_s_median']:.2f} s (median); img2dataset fetches as many "
                f"images in {s['marker_duration_s_median'] - s['per_shard_overhead_s']:.2f} s, "
                f"so dgaug adds {s['per_shard_overhead_s']:.2f} s per shard"
            )
    for shard_size in args.shard_size:
        for system in (I2D, DGAUG, DGAUG_SPAWN):
            run = median_run(runs, system, shard_size)
            if run is None:
                continue
            n = max(run["shards"], 1)
            print(
                f"\n{system}, shard size {shard_size}: where the {run['wall_s']:.1f} s of run "
                f"{run['repeat']} went ({run['shards']} shards)"
            )
            print(
                format_table(
                    ["phase", "s", "per shard s"],
                    [
                        (p, f"{s:.2f}", f"{s / n:.2f}" if p.startswith("per shard") else "")
                        for p, s in run["phases"].items()
                    ],
                )
            )
            if "markers" in run:
                print(
                    "marker duration_s: "
                    + ", ".join(f"{m['duration_s']:.1f}" for m in run["markers"])
                    + f" s for {run['markers'][0]['samples']} images each"
                )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=4000, help="URLs in the list (default 4000)")
    p.add_argument("--image-size", type=int, default=256, help="side of the source JPEGs")
    p.add_argument(
        "--source-images",
        type=int,
        default=0,
        help="distinct source JPEGs (0: one per URL); fewer are generated faster, and each is "
        "then served under several URLs (`?copy=n`), every URL fetched and resized once",
    )
    p.add_argument("--out-size", type=int, default=128, help="image_size both systems resize to")
    p.add_argument(
        "--shard-size",
        type=int,
        nargs="+",
        default=[1000],
        help="samples per shard, the same for both; several values give one row pair each",
    )
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="runs of each system, alternating")
    p.add_argument("--latency-ms", type=float, default=0.0, help="server delay per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--with-spawn",
        action="store_true",
        help="also run dgaug with img2dataset spawning its pool and logger for every shard, "
        "as the stage did before 1a1aa78 (patched in the bench's child only)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60,
        help="before each run, wait up to this many s for other processes to go quiet (0: never)",
    )
    p.add_argument("--cache", type=Path, default=RESULTS_DIR / "cache")
    p.add_argument("--workdir", type=Path, default=RESULTS_DIR / "download-work")
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "download.json")
    p.add_argument("--keep", action="store_true", help="keep each run's output folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python bench/download.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    machine = describe_machine(PACKAGES)
    print(machine_line(machine), flush=True)

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    root, items = prepare_images(args)
    server = LoopbackServer(
        root, sorted({rel.partition("?")[0] for rel, _ in items}), args.latency_ms / 1000
    )
    runs: list[dict[str, Any]] = []
    try:
        urls = write_url_list(items, server.port, args.workdir / "urls.parquet")
        # Untimed: brings the libraries' files into the page cache, so run 1 is not the cold one.
        subprocess.run(
            [sys.executable, "-c", "import img2dataset, dgaug.pipeline.run"],
            env=CHILD_ENV,
            check=True,
            capture_output=True,
        )
        systems = [I2D, DGAUG] + ([DGAUG_SPAWN] if args.with_spawn else [])
        for shard_size in args.shard_size:
            for rep in range(args.repeats):
                # Alternate the order, so drift (page cache, neighbours) falls on both alike.
                order = systems if rep % 2 == 0 else systems[::-1]
                for system in order:
                    tag = {I2D: "i2d", DGAUG: "dgaug", DGAUG_SPAWN: "dgaug-spawn"}[system]
                    name = f"{tag}-s{shard_size}-r{rep}"
                    out = args.workdir / name
                    waited, busy_before = wait_until_quiet(args.quiet_wait)
                    req0, srv0 = server.requests(), server.cpu_s()
                    if system == I2D:
                        r = run_img2dataset(args, urls, shard_size, out, args.workdir, name)
                    else:
                        r = run_dgaug(
                            args, urls, shard_size, out, args.workdir, name, spawn=system != DGAUG
                        )
                    server_cpu = server.cpu_s() - srv0
                    r.update(
                        system=system,
                        shard_size=shard_size,
                        repeat=rep,
                        requests=server.requests() - req0,
                        server_cpu_s=server_cpu,
                        # Busy CPU s of processes that are neither the system nor the server.
                        foreign_cpu_s=max(r["machine_busy_s"] - r["cpu_s"] - server_cpu, 0.0),
                        waited_for_quiet_s=waited,
                        busy_before=busy_before,
                        images_per_s=r["samples"] / r["wall_s"],
                    )
                    runs.append(r)
                    print(
                        f"  {system:>21}, shard {shard_size}, run {rep}: {r['wall_s']:6.1f} s, "
                        f"{r['samples']} ok, {r['images_per_s']:5.0f} images/s, "
                        f"CPU {r['cpu_s']:.0f} s, server {server_cpu:.1f} s, "
                        f"others {r['foreign_cpu_s']:.1f} s",
                        flush=True,
                    )
                    if not args.keep:
                        shutil.rmtree(out, ignore_errors=True)
    finally:
        server.close()

    summary = summarize(args, runs)
    print_report(args, summary, runs)
    result = {
        "benchmark": "download",
        "command": command,
        "machine": machine,
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "server": "http.server.ThreadingHTTPServer on 127.0.0.1 in its own process, files in memory",
        "summary": summary,
        "runs": runs,
    }
    path = write_json(args.json, result)
    print(f"\nwrote {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    bad = [r for r in runs if r["samples"] != args.images or r["requests"] != args.images]
    if bad:
        print(
            f"warning: {len(bad)} run(s) did not fetch every image exactly once: "
            + ", ".join(f"{r['system']} run {r['repeat']}: {r['samples']} ok" for r in bad)
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
