"""Scale: status, plan, the resume decision and the executor's scheduling on a finished output of
N shards per stage (LAION-400M plans about 41,300), on local disk and on a loopback S3 server.

    python bench/scale.py --template demo-output --shards 1000 10000 --store local s3
    python bench/scale.py --template demo-output --shards 41000 --store local --no-executor

The output is built, not run: manifests/demo.yaml is planned (dry run) for N x shard_size
synthetic images, and every planned shard of every stage gets the template's (a finished demo
run's) marker for its stage, with its shard, fingerprint and output names set, and its files: on
local disk sparse files of the template's sizes (no disk space used), on S3 16-byte objects (the
marker records 16 bytes). No `_dgaug/index/` is written: the first status reads an output as
dgaug before the index left it; the first rerun splits the url list into N input files (once
per output), writes the index and the mix/ view. With `--indexed` the builder writes the index
a run leaves, and only status is timed (S3 at 41,000 without 164,000 marker reads first).

Each step runs in its own process (`dgaug status|plan|run MANIFEST`, as a user runs them); its
wall time and peak RSS (wait4) are recorded. The rerun must find nothing to do. The executor
step runs two chained no-op stages of N shards each through RayExecutor.execute (2 actors per
stage; each task commits a 1-byte file and its marker): seconds per task is its scheduling and
commit cost. The S3 server is moto in server mode, as the tests run it, in this process (s3_endpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    REPO_ROOT,
    RESULTS_DIR,
    describe_machine,
    format_table,
    machine_line,
    write_json,
)

S3_BODY = b"0123456789abcdef"  # every shard object on S3: the marker records its 16 bytes


def manifest_dict(output: str, shards: int, sources: Path) -> dict[str, Any]:
    """manifests/demo.yaml over a parquet url list of N x shard_size rows (as a LAION run reads
    one): the synthetic source would first draw every image, and a `shards` source puts the
    list of its N tars in every download marker's fingerprint record."""
    import yaml

    d = yaml.safe_load((REPO_ROOT / "manifests/demo.yaml").read_text())
    d.pop("train", None)
    d["output"] = output
    rows = shards * int(d["shard_size"])
    path = sources / f"urls-{rows}.parquet"
    if not path.is_file():
        import pyarrow as pa
        import pyarrow.parquet as pq

        urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(rows)]
        pq.write_table(pa.table({"url": urls, "caption": ["a photo"] * rows}), path)
    d["source"] = {"kind": "url_list", "path": str(path), "input_format": "parquet"}
    return d


def build(
    output: str, shards: int, template: Path, manifest: Path, work: Path, *, indexed: bool = False
) -> dict[str, int]:
    """Write a finished output of `shards` shards per stage at `output`; returns markers per stage.
    `indexed`: also the marker index a run leaves (each marker's summary and listing stamp)."""
    import hashlib

    from dgaug.core.storage import Storage
    from dgaug.job.manifest import validate
    from dgaug.job.run import plan_stages
    from dgaug.pipeline.run import write_plan
    from dgaug.pipeline.scan import StageScan, summarize, write_index

    m = validate(manifest_dict(output, shards, work))
    storage = Storage(output)
    plans = plan_stages(m, storage, dry_run=True)
    tplan = json.loads((template / "_dgaug/plan.json").read_text())
    counts = {}

    def put(path: str, body: bytes) -> None:
        if _S3_PUT is None:
            storage.fs.pipe_file(path, body)
        else:  # the in-process server's store: "bucket/key"
            bucket, key = path.split("/", 1)
            _S3_PUT(bucket, key, body)

    for name, p in plans.items():
        tdir = template / tplan[name]["output_dir"]
        tmarker = json.loads((tdir / "_state" / f"{tplan[name]['shards'][0]:05d}.json").read_text())
        touts = list(tmarker["outputs"].values())
        stage_dir = p.stage.output_dir

        def one(
            task: Any,
            p: Any = p,
            tmarker: dict = tmarker,
            touts: list = touts,
            stage_dir: str = stage_dir,
        ) -> tuple[int, dict[str, Any]]:
            outputs = {}
            for i, out_name in enumerate(task.outputs):
                t = touts[min(i, len(touts) - 1)]
                size = t["bytes"] if storage.is_local else len(S3_BODY)
                outputs[out_name] = {"bytes": size, "sha256": t["sha256"]}
                rel = f"{stage_dir}/{out_name}"
                if storage.is_local:
                    path = storage.path(rel)
                    with open(path, "wb") as f:
                        f.truncate(size)  # sparse: the size a listing reports, no disk used
                else:
                    put(storage.path(rel), S3_BODY)
            marker = {
                **tmarker,
                "shard": task.shard_id,
                "outputs": outputs,
                "fingerprint": p.fingerprint,
                "fingerprint_record": p.fp_record,
            }
            rel = f"{stage_dir}/_state/{task.shard_id:05d}.json"
            data = json.dumps(marker, indent=1, sort_keys=True).encode()
            if storage.is_local:
                Path(storage.path(rel)).write_bytes(data)
                st = os.stat(storage.path(rel))
                stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
            else:
                put(storage.path(rel), data)
                stamp = hashlib.md5(data).hexdigest()  # the ETag of a single-part PUT
            return task.shard_id, {**summarize(marker), "stamp": stamp}

        storage.makedirs(f"{stage_dir}/_state")
        with ThreadPoolExecutor(1 if storage.is_local or _S3_PUT else 32) as pool:
            summaries = dict(pool.map(one, p.tasks))
        if indexed:
            scan = StageScan(stage_dir, markers=summaries, records={p.fingerprint: p.fp_record})
            write_index(storage, scan)
        counts[name] = len(p.tasks)
    write_plan(storage, plans)
    storage.write_text("_dgaug/manifest.yaml", manifest.read_text())
    return counts


# Peak RSS as the process itself sees it: VmHWM is its own address space's high-water mark,
# where wait4's ru_maxrss also counts the parent's pages from before the exec (vfork).
_HWM = (
    "import atexit, sys\n"
    "def _hwm():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            sys.stderr.write('\\nVMHWM_KB=' + line.split()[1] + '\\n')\n"
    "atexit.register(_hwm)\n"
    "sys.argv = ['dgaug'] + sys.argv[1:]\n"
    "from dgaug.cli.app import main\n"
    "main()\n"
)


def timed(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd`; its wall seconds, peak RSS (MB, VmHWM), exit code and last output lines."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        cwd=REPO_ROOT,
    )
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    text = out.decode(errors="replace")
    hwm = [ln for ln in text.splitlines() if ln.startswith("VMHWM_KB=")]
    text = "\n".join(ln for ln in text.splitlines() if not ln.startswith("VMHWM_KB="))
    return {
        "seconds": round(seconds, 2),
        "rss_mb": round(int(hwm[-1].split("=")[1]) / 1024, 1) if hwm else None,
        # CPU seconds of the process: on a shared machine its wall time includes waiting for a core.
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "rc": proc.returncode,
        "tail": text.strip().splitlines()[-12:],
    }


def dgaug(*args: str, python: str = sys.executable) -> list[str]:
    return [python, "-c", _HWM, *args]


# -- the executor's scheduling, in its own process (`--executor-child`)


def _noop_stages() -> dict[str, Any]:
    from dgaug.pipeline.stage import ShardResult, Stage

    class NoopA(Stage):
        name = "download"
        output_dir = "noop_a"

        def fingerprint_config(self) -> dict[str, Any]:
            return {}

        def process(self, task: Any, ctx: Any) -> ShardResult:
            Path(task.tmp_dir, task.outputs[0]).write_bytes(b"x")
            return ShardResult(samples=1)

    class NoopB(NoopA):
        name = "edsam"
        output_dir = "noop_b"
        upstream = ("download",)
        uses_gpu = False

    return {"download": NoopA, "edsam": NoopB}


def executor_child(output: str, shards: int, work: Path) -> None:
    from dgaug.core.storage import Storage
    from dgaug.job.manifest import validate
    from dgaug.pipeline.executors.base import RunListener
    from dgaug.pipeline.executors.ray import RayExecutor, connect
    from dgaug.pipeline.ledger import fingerprint_record
    from dgaug.pipeline.stage import ShardTask, StageContext

    d = manifest_dict(output, 1, work)
    d["stages"] = {"download": d["stages"]["download"]}
    d["executor"] = {
        "kind": "ray",
        "max_attempts": 1,
        "resources": {
            "download": {"workers": 2, "num_cpus": 0.5},
            "edsam": {"workers": 2, "num_cpus": 0.5, "num_gpus": 0},
        },
    }
    m = validate(d)
    classes = _noop_stages()
    stages = {n: c(m) for n, c in classes.items()}
    tasks = [ShardTask("download", i, outputs=(f"{i:05d}.bin",)) for i in range(shards)]
    tasks += [
        ShardTask("edsam", i, deps=(("download", i),), outputs=(f"{i:05d}.bin",))
        for i in range(shards)
    ]
    records = {n: fingerprint_record(n, {}, {}) for n in stages}
    ctx = StageContext(m, Storage(output), output_dirs={n: s.output_dir for n, s in stages.items()})
    connect(None)
    started = time.perf_counter()
    outcomes = RayExecutor(m.executor).execute(stages, tasks, records, ctx, set(), RunListener())
    seconds = time.perf_counter() - started
    ok = sum(1 for o in outcomes if o.ok)
    print(json.dumps({"tasks": len(tasks), "ok": ok, "execute_s": round(seconds, 2)}))


# -- the steps


def steps(store: str, output: str, manifest: Path, args: argparse.Namespace) -> list[tuple]:
    """(label, command, check) for each step, in order."""
    if args.indexed:  # built as a run leaves it: only what reads it
        return [
            ("startup: dgaug --help (for reference)", dgaug("--help")),
            ("status (index + listings)", dgaug("status", str(manifest))),
        ]
    out: list[tuple] = [
        ("startup: dgaug --help (for reference)", dgaug("--help")),
        ("status (no index: as written before it)", dgaug("status", str(manifest))),
    ]
    if args.compare_with:
        old = str(Path(args.compare_with) / ".venv/bin/python")
        out.append(("status, main's dgaug", dgaug("status", str(manifest), python=old)))
    out += [
        ("rerun 1 (splits the list; index, mix/)", dgaug("run", str(manifest))),
        ("status", dgaug("status", str(manifest))),
        ("rerun 2: nothing to do", dgaug("run", str(manifest))),
        ("plan (dry run)", dgaug("plan", str(manifest))),
    ]
    return out


# Objects the builder writes straight into the in-process server's store (bucket, key, body):
# set while an S3 endpoint of this process is up.
_S3_PUT: Any = None


@contextlib.contextmanager
def s3_endpoint() -> Iterator[str]:
    """moto in server mode, as the tests run it, but in this process (a thread), so that the
    builder fills its store directly: 400,000 objects through HTTP PUTs take the server about
    40 minutes here, in-process about 2. Every dgaug step still talks to it over HTTP."""
    global _S3_PUT
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    from tests.helpers import S3_ENV, _free_port, new_bucket

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
        bucket = new_bucket("dgaug-scale")
        backend = s3_backends["123456789012"]["global"]
        _S3_PUT = lambda b, key, body: backend.put_object(b, key, body)  # noqa: E731
        yield bucket
    finally:
        _S3_PUT = None
        server.stop()


def s3_page_cost(bucket: str, sizes: tuple[int, ...] = (4000, 40000, 160000)) -> list[list]:
    """The loopback server's own cost of a listing request, by bucket size: a full 1,000-key
    page, and a 10-key one (raw HTTP, no client parsing; mean of 3)."""
    import urllib.request

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    rows, have = [], 0
    for total in sizes:
        for i in range(have, total):
            _S3_PUT(bucket, f"pages/{i:06d}.tar", S3_BODY)
        have = total
        for prefix in ("pages/", "pages/00000"):
            t0 = time.perf_counter()
            for _ in range(3):
                url = f"{endpoint}/{bucket}?list-type=2&prefix={prefix}&delimiter=/"
                body = urllib.request.urlopen(url).read()
            rows.append([total, prefix, body.count(b"<Key>"), (time.perf_counter() - t0) / 3])
    return rows


def run_one(store: str, shards: int, args: argparse.Namespace, work: Path, bucket: str | None):
    import yaml

    output = str(work / f"out-{shards}") if store == "local" else f"s3://{bucket}/out-{shards}"
    manifest = work / f"scale-{store}-{shards}.yaml"
    manifest.write_text(yaml.safe_dump(manifest_dict(output, shards, work)))
    t0 = time.perf_counter()
    counts = build(output, shards, Path(args.template), manifest, work, indexed=args.indexed)
    built_s = time.perf_counter() - t0
    print(
        f"[{store} N={shards}] built {sum(counts.values())} markers in {built_s:.0f}s", flush=True
    )
    rows = []
    for label, cmd in steps(store, output, manifest, args):
        r = timed(cmd)
        print(
            f"[{store} N={shards}] {label}: {r['seconds']}s wall, {r['cpu_s']}s CPU, "
            f"{r['rss_mb']} MB, rc {r['rc']}",
            flush=True,
        )
        if r["rc"] not in (0,):
            print("\n".join(r["tail"]))
        rows.append({"step": label, **r})
    if not args.no_executor and store == "local":
        ex_out = str(work / f"noop-{shards}")
        n = min(shards, args.executor_shards or shards)
        cmd = [sys.executable, __file__, "--executor-child", ex_out, str(n), str(work)]
        r = timed(cmd, env={"RAY_DEDUP_LOGS": "0"})
        with contextlib.suppress(ValueError, IndexError):
            got = json.loads(r["tail"][-1])
            r.update(got)
            r["ms_per_task"] = round(1000 * got["execute_s"] / got["tasks"], 2)
        label = f"executor: 2 no-op stages x {n} (Ray)"
        print(f"[{store} N={shards}] {label}: {r}")
        rows.append({"step": label, **r})
        shutil.rmtree(ex_out, ignore_errors=True)
    if store == "local" and not args.keep:
        shutil.rmtree(output, ignore_errors=True)
    return {
        "store": store,
        "shards": shards,
        "markers": sum(counts.values()),
        "build_s": round(built_s, 1),
        "steps": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--template", default="demo-output", help="A finished demo run's output.")
    ap.add_argument("--shards", type=int, nargs="+", default=[1000])
    ap.add_argument("--store", nargs="+", choices=["local", "s3"], default=["local"])
    ap.add_argument("--work", default=None, help="Folder for the local outputs (default: a temp).")
    ap.add_argument("--compare-with", default=None, help="Another checkout (its .venv) for status.")
    ap.add_argument("--no-executor", action="store_true")
    ap.add_argument("--keep", action="store_true", help="Keep the built local outputs.")
    ap.add_argument(
        "--executor-shards", type=int, default=None, help="Shards per no-op stage (default N)."
    )
    ap.add_argument(
        "--indexed",
        action="store_true",
        help="Build the marker index too (as a run leaves it) and time status alone: an S3\n"
        "output of 41,000 shards per stage without reading 164,000 markers one by one.",
    )
    ap.add_argument(
        "--s3-page-cost",
        action="store_true",
        help="Only time the S3 server's listing pages by bucket size (no dgaug step).",
    )
    ap.add_argument("--executor-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.s3_page_cost:
        with s3_endpoint() as bucket:
            rows = s3_page_cost(bucket)
        print(format_table(["keys in bucket", "prefix", "keys listed", "s per request"], rows))
        return
    if args.executor_child:
        executor_child(
            args.executor_child[0], int(args.executor_child[1]), Path(args.executor_child[2])
        )
        return
    if not (Path(args.template) / "_dgaug/plan.json").is_file():
        sys.exit(f"--template {args.template}: not a finished run (run manifests/demo.yaml first)")
    work = Path(args.work or tempfile.mkdtemp(prefix="dgaug-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    machine = describe_machine(("dgaug", "ray", "s3fs", "moto"))
    path = RESULTS_DIR / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    for store in args.store:
        with contextlib.ExitStack() as stack:
            bucket = stack.enter_context(s3_endpoint()) if store == "s3" else None
            for n in args.shards:
                results.append(run_one(store, n, args, work, bucket))
                # After each size: a long run stopped later keeps what it measured.
                write_json(path, {"machine": machine, "results": results})
    rows = [
        [
            r["store"],
            r["shards"],
            r["markers"],
            s["step"],
            s["seconds"],
            s.get("cpu_s"),
            s["rss_mb"],
            s["rc"],
        ]
        for r in results
        for s in r["steps"]
    ]
    print(machine_line(machine))
    print(format_table(["store", "N", "markers", "step", "wall s", "CPU s", "RSS MB", "rc"], rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
