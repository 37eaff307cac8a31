"""Directory benchmark (issue 5): import, re-import and lookup figures beside their baselines.

    .venv/bin/python bench/directory_bench.py [--scale 1.0] [--workdir DIR]

At scale 1 it needs about 5 GB of disk in the work directory (deleted at the end unless
--workdir is given) and some minutes.

At scale 1: a generated 2,000,000-row PS_LibreAcces_Personne_activite file and a 550,000-row
MSSanté file. Baseline: the sqlite3 command-line `.import` of the same files plus the same
indexes, in the same run. Each import runs in a child process so that its peak RSS is its own.
The baseline and the full import run in turn --runs times (default 3), as do the 1 %-changed
re-imports (the second file, then the first again, ...): the figures are their medians, so that
a machine that slows down or speeds up for a while moves both sides alike.
The lookups run in --lookup-passes passes (default 5) of their own addresses: the figure is their
median, the latencies those of every lookup of the async passes.
A large extract is parsed in a worker process (directory_sync/pipeline.py): its CPU
is printed apart from the importer's. Targets: full import <= 1.5x `.import`; peak RSS < 300 MB; the 1 %-changed re-import >= 4x
faster than the full import; 50,000 lookups/s on one core; async lookup p99 < 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from directory_sync.synthetic import (
    mssante_lines,
    personne_activite_lines,
    write_extract,
)

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from directory_sync.database import make_engine, migrate
from directory_sync.sync import import_paths
engine = make_engine("sqlite:///" + {db!r})
migrate(engine)
t0 = time.perf_counter()
cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
kids0 = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])
reports = import_paths(engine, {files!r}, force=True)
took = time.perf_counter() - t0
use = resource.getrusage(resource.RUSAGE_SELF)
kids = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({{"seconds": took, "rss_mb": use.ru_maxrss / 1024, "cpu": use.ru_utime + use.ru_stime - cpu0,
                  "worker_cpu": kids.ru_utime + kids.ru_stime - kids0, "worker_rss_mb": kids.ru_maxrss / 1024,
                  "rows": sum(r.rows_read for r in reports), "summaries": [r.summary() for r in reports]}}))
"""

BASELINE_INDEXES = {
    "pa": ['"Identification nationale PP"', '"Identifiant technique de la structure"'],
    "mss": ['"Adresse BAL"', '"Identification nationale PP"', '"Identification Structure"'],
}


def run_child(db: Path, files: list[Path]) -> dict[str, object]:
    code = CHILD.format(root=str(ROOT), db=str(db), files=[str(f) for f in files])
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def fresh(db: Path) -> Path:
    for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        f.unlink(missing_ok=True)
    return db


def median_run(runs: list[dict[str, object]], key: str = "seconds") -> dict[str, object]:
    """The run of median `key` (the lower middle one for an even count)."""
    ranked = sorted(runs, key=lambda r: float(r[key]))  # type: ignore[arg-type]
    return ranked[(len(ranked) - 1) // 2]


def sqlite_import(db: Path, files: dict[str, Path]) -> tuple[float, float]:
    """Wall and CPU seconds of the sqlite3 shell importing the files and building the indexes."""
    cmds = [".mode list", ".separator |"]
    for table, path in files.items():
        cmds.append(f".import '{path}' {table}")
        cmds += [f"CREATE INDEX ix_{table}_{i} ON {table} ({col});" for i, col in enumerate(BASELINE_INDEXES[table])]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["sqlite3", str(db)], input="\n".join(cmds), text=True, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - t0, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def lookups(db: Path, passes: list[list[str]]) -> tuple[list[float], list[float], float, float]:
    """Per pass, lookups per second and per CPU second of one thread calling `lookup_blocking`; then each pass
    again through the async API, one lookup at a time: the p50 and p99 latencies of all of them, in ms."""
    from directory_sync.database import make_engine
    from directory_sync.lookup import DirectoryLookup

    lookup = DirectoryLookup(make_engine(f"sqlite:///{db}"), threads=1)
    for a in passes[0][:500]:
        lookup.lookup_blocking(a)
    per_second, per_cpu_second = [], []
    for addresses in passes:
        t0, cpu0 = time.perf_counter(), time.thread_time()
        for a in addresses:
            lookup.lookup_blocking(a)
        per_second.append(len(addresses) / (time.perf_counter() - t0))
        per_cpu_second.append(len(addresses) / (time.thread_time() - cpu0))

    async def timed() -> list[float]:
        out = []
        for addresses in passes:
            for a in addresses:
                s = time.perf_counter()
                await lookup.lookup(a)
                out.append(time.perf_counter() - s)
        return out

    lat = sorted(asyncio.run(timed()))
    lookup.close()
    return per_second, per_cpu_second, lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=float(os.environ.get("MSSGW_BENCH_DIRECTORY_SCALE", "1.0")),
                    help="share of the national sizes (default 1.0, or $MSSGW_BENCH_DIRECTORY_SCALE)")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--lookups", type=int, default=20_000, help="published addresses looked up per pass")
    ap.add_argument("--lookup-passes", type=int, default=5, help="passes of lookups, whose median is reported")
    ap.add_argument("--runs", type=int, default=3, help="runs of each import, whose medians are reported (default 3)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mssgw-dirbench-"))
    work.mkdir(parents=True, exist_ok=True)
    pa_rows, mss_rows = int(2_000_000 * args.scale), int(550_000 * args.scale)

    t0 = time.perf_counter()
    pa = write_extract(work / "PS_LibreAcces_Personne_activite.txt", personne_activite_lines(pa_rows))
    mss = write_extract(work / "Extraction_Correspondance_MSSante.txt", mssante_lines(mss_rows))
    pa2 = write_extract(work / "PS_LibreAcces_Personne_activite_2.txt", personne_activite_lines(pa_rows, changed_share=0.01))
    mss2 = write_extract(work / "Extraction_Correspondance_MSSante_2.txt", mssante_lines(mss_rows, changed_share=0.01))
    print(f"generated {pa_rows:,} + {mss_rows:,} rows ({(pa.stat().st_size + mss.stat().st_size) / 1e6:.0f} MB) "
          f"in {time.perf_counter() - t0:.1f} s, in {work}")

    base_db, db = work / "baseline.db", work / "directory.db"
    baselines, fulls = [], []
    for _ in range(args.runs):  # in turn: a slower spell of the machine falls on both
        baselines.append(sqlite_import(fresh(base_db), {"pa": pa, "mss": mss}))
        fulls.append(run_child(fresh(db), [pa, mss]))
    # 1 % changed each time: the second files, then the first ones again, ...
    agains = [run_child(db, [pa2, mss2] if i % 2 == 0 else [pa, mss]) for i in range(args.runs)]
    same = run_child(db, [pa2, mss2] if args.runs % 2 == 1 else [pa, mss])  # the files imported last
    baseline = (statistics.median(b[0] for b in baselines), statistics.median(b[1] for b in baselines))
    full, again = median_run(fulls), median_run(agains)
    print("full import, wall s, each run:", " ".join(f"{float(f['seconds']):.1f}" for f in fulls),  # type: ignore[arg-type]
          "| .import:", " ".join(f"{b[0]:.1f}" for b in baselines),
          "| 1 %-changed re-import:", " ".join(f"{float(a['seconds']):.1f}" for a in agains))  # type: ignore[arg-type]

    rows = pa_rows + mss_rows
    seconds, cpu = float(full["seconds"]), float(full["cpu"])  # type: ignore[arg-type]
    b_wall, b_cpu = baseline
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(CPU seconds are the fairer comparison on a shared machine)")
    print(f"{'figure (median of ' + str(args.runs) + ' runs)':44} {'measured':>12} {'baseline / target':>36}")
    print(f"{'full import, wall s':44} {seconds:12.1f} {b_wall:22.1f} (.import) <= {1.5 * b_wall:.1f}")
    print(f"{'full import, CPU s (importer)':44} {cpu:12.1f} {b_cpu:22.1f} (.import) <= {1.5 * b_cpu:.1f}")
    print(f"{'full import, CPU s (parsing worker)':44} {float(full['worker_cpu']):12.1f}")  # type: ignore[arg-type]
    print(f"{'full import, rows/s (wall)':44} {rows / seconds:12,.0f} {rows / b_wall:22,.0f} (.import)")
    total_cpu = cpu + float(full["worker_cpu"])  # type: ignore[arg-type]
    print(f"{'full import, CPU ratio to .import (importer)':44} {cpu / b_cpu:12.2f} {'<= 1.50':>36}")
    print(f"{'full import, CPU ratio (importer + worker)':44} {total_cpu / b_cpu:12.2f}")
    print(f"{'full import, wall ratio to .import':44} {seconds / b_wall:12.2f} {'<= 1.50':>36}")
    peak = max(float(f["rss_mb"]) for f in fulls)  # type: ignore[arg-type]
    worker_peak = max(float(f["worker_rss_mb"]) for f in fulls)  # type: ignore[arg-type]
    print(f"{'full import, peak RSS MB (of all runs)':44} {peak:12.0f} {'< 300':>36}")
    print(f"{'full import, worker peak RSS MB (of all runs)':44} {worker_peak:12.0f} {'< 300':>36}")
    re_s = float(again["seconds"])  # type: ignore[arg-type]
    re_cpu = float(again["cpu"]) + float(again["worker_cpu"])  # type: ignore[arg-type]
    print(f"{'re-import, 1 % changed, wall s':44} {re_s:12.1f} {seconds / 4:22.1f} (full / 4)")
    print(f"{'re-import, 1 % changed, CPU s':44} {re_cpu:12.1f} {total_cpu / 4:22.1f} (full / 4)")
    print(f"{'re-import speed-up (CPU, importer + worker)':44} {total_cpu / re_cpu:12.1f} {'>= 4':>36}")
    print(f"{'re-import speed-up (wall)':44} {seconds / re_s:12.1f} {'>= 4':>36}")
    print(f"{'re-import, unchanged, CPU s':44} {float(same['cpu']):12.1f}")  # type: ignore[arg-type]
    re_peak = max(float(a["rss_mb"]) for a in agains)  # type: ignore[arg-type]
    print(f"{'re-import, peak RSS MB (of all runs)':44} {re_peak:12.0f} {'< 300':>36}")
    for s in again["summaries"]:  # type: ignore[attr-defined]
        print("   ", s)

    published = [line.split("|", 2)[1] for line in mss.read_text(encoding="utf-8").splitlines()[1:]]
    passes = []
    for n in range(args.lookup_passes):  # each pass its own addresses: published ones and a tenth unknown ones
        addresses = random.Random(5 + n).sample(published, min(args.lookups, mss_rows))
        addresses += [f"inconnu{n}.{i}@medecin.mssante.fr" for i in range(len(addresses) // 10)]
        random.Random(6 + n).shuffle(addresses)
        passes.append(addresses)
    per_second, per_cpu_second, p50, p99 = lookups(db, passes)
    print("lookups per second, each pass:", " ".join(f"{x:,.0f}" for x in per_second))
    print(f"{'lookups per second (one thread, median)':44} {statistics.median(per_second):12,.0f} {'>= 50,000':>36}")
    print(f"{'lookups per CPU second (that thread, median)':44} {statistics.median(per_cpu_second):12,.0f}")
    print(f"{'async lookup p50, ms':44} {p50:12.3f}")
    print(f"{'async lookup p99, ms':44} {p99:12.3f} {'< 1':>36}")
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
