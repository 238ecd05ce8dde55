"""Peak RSS growth and time of splitting a large generated tsv url list (dry run or written)."""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, describe_machine, machine_line  # noqa: E402

WORDS = [
    "photo",
    "of",
    "a",
    "dog",
    "cat",
    "red",
    "house",
    "tree",
    "on",
    "the",
    "beach",
    "city",
    "night",
    "view",
    "man",
    "woman",
    "car",
    "blue",
]

# Run in a fresh interpreter: the growth is the peak RSS over the RSS after the imports. A dry
# run keeps its count in ~/.cache/dgaug/splits: DGAUG_CACHE_DIR points at a fresh folder.
CHILD = """
import json, resource, sys, time
from dgaug.core.storage import Storage
from dgaug.sources.url_list import UrlListSource
from dgaug.stages.download.urls import split_url_list
import pyarrow.csv, pyarrow.parquet  # noqa: F401  (imported before the baseline)

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS"))

path, out, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "dry"
base = rss_mb()
t = time.perf_counter()
_, shards = split_url_list(
    UrlListSource(kind="url_list", path=path, input_format="tsv"), 10_000, Storage(out), dry_run=dry
)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"shards": shards, "s": time.perf_counter() - t, "growth_mb": peak - base}))
"""


def write_tsv(path: Path, rows: int) -> None:
    """CC12M-like rows (a 90-character URL, an 8-14 word caption), about 118 bytes each."""
    rnd = random.Random(0)
    with open(path, "w") as f:
        f.write("url\tcaption\n")
        for start in range(0, rows, 100_000):
            lines = []
            for i in range(start, min(start + 100_000, rows)):
                cap = " ".join(rnd.choice(WORDS) for _ in range(8 + i % 7))
                lines.append(
                    f"https://img{i % 97}.example.com/path/to/images/{i:09d}/"
                    f"photo_{i * 7919 % 1000003}.jpg\t{cap}\n"
                )
            f.write("".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 8_000_000])
    p.add_argument("--workdir", type=Path, default=RESULTS_DIR / "url-lists")
    p.add_argument("--write", action="store_true", help="write the split (default: a dry run)")
    args = p.parse_args(argv)
    print(machine_line(describe_machine(("dgaug", "pyarrow"))), flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    for rows in args.rows:
        tsv = args.workdir / f"urls-{rows}.tsv"
        if not tsv.exists():
            write_tsv(tsv, rows)
        with tempfile.TemporaryDirectory(dir=args.workdir) as out:
            env = {**os.environ, "DGAUG_CACHE_DIR": os.path.join(out, "cache")}
            r = subprocess.run(
                [sys.executable, "-c", CHILD, str(tsv), out, "write" if args.write else "dry"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                cwd=args.workdir,  # not the repo: PYTHONPATH may name another dgaug tree
            )
        print(f"{rows:>11,} rows ({tsv.stat().st_size / 2**20:,.0f} MB): {r.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
