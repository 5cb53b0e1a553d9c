"""Prep's reading speed and memory: one huge file, and many small ones, against the whole-file reader.

Writes two corpora of `--megabytes` MB each into a temporary folder: one single-line text file
(no paragraph breaks: the worst case for cutting documents) and `--files` small JSON Lines files.
For each, two readers collect the documents in a fresh process (so each has its own peak memory):
- kdflow: `FileSource` as the prep stage uses it (streamed, linear-time cutting);
- whole-file: read each file whole, decode it, cut it with the reference `whole_text_pieces`
  (tests/test_own_data.py; kdflow's reader before it streamed).
Prints MB/s and peak resident memory side by side with the ratios, and appends the run (machine,
date, versions) to benchmarks/results/prep_throughput.jsonl.

    .venv/bin/python benchmarks/prep_throughput.py                    # 30 MB each
    .venv/bin/python benchmarks/prep_throughput.py --megabytes 100    # the size the issue measured
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_log import append_result

RESULTS = Path(__file__).resolve().parent / "results" / "prep_throughput.jsonl"
REPO = Path(__file__).resolve().parents[1]
WORDS = "teacher student distill cache shard token layer model python data loss batch step".split()


def write_corpora(folder: Path, megabytes: float, files: int, seed: int = 0) -> dict[str, list[Path]]:
    rng = random.Random(seed)
    vocabulary = [f"{word}{number}" for word in WORDS for number in range(50)]
    target = int(megabytes * 1e6)
    huge = folder / "huge.txt"
    with huge.open("w", encoding="utf-8") as handle:
        written = 0
        while written < target:
            line = " ".join(rng.choices(vocabulary, k=20_000)) + " "
            handle.write(line)
            written += len(line)
    small_folder = folder / "small"
    small_folder.mkdir()
    small = []
    per_file = target // files
    for index in range(files):
        records, size = [], 0
        while size < per_file:
            text = f"record {index}-{len(records)} " + " ".join(rng.choices(vocabulary, k=rng.randrange(40, 400)))
            records.append(json.dumps({"text": text}))
            size += len(records[-1]) + 1
        path = small_folder / f"part-{index:05d}.jsonl"
        path.write_text("\n".join(records) + "\n", encoding="utf-8")
        small.append(path)
    return {"one huge file": [huge], f"{files} small files": small}


def measure(reader: str, paths: list[str]) -> dict:
    """Runs in a child process: collect every document of `paths`; seconds, pieces, peak RSS."""
    from kd_core.config import StorageConfig
    from kd_core.data.sources import FileSource, SourceCounts

    sys.path.insert(0, str(REPO / "tests"))
    from test_own_data import whole_text_pieces

    started = time.perf_counter()  # imports above, so both readers are timed alike
    if reader == "kdflow":
        pieces = sum(1 for _ in FileSource(paths, "text", StorageConfig()).documents(SourceCounts()))
    else:
        pieces = 0
        for path in paths:
            data = Path(path).read_bytes().decode("utf-8")
            texts = [json.loads(line)["text"] for line in data.splitlines() if line.strip()] if path.endswith(".jsonl") else [data]
            pieces += sum(len(whole_text_pieces(text, 4000)) for text in texts)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "pieces": pieces, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(reader: str, paths: list[Path]) -> dict:
    list_file = Path(tempfile.mkstemp(suffix=".json")[1])
    list_file.write_text(json.dumps([str(path) for path in paths]))
    done = subprocess.run([sys.executable, __file__, "--measure", reader, str(list_file)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=30.0, help="size of each corpus")
    parser.add_argument("--files", type=int, default=2000, help="files in the many-small-files corpus")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file the run is appended to")
    parser.add_argument("--measure", nargs=2, metavar=("READER", "LIST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], json.loads(Path(args.measure[1]).read_text()))))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="kdflow-prep-bench-") as folder:
        for case, paths in write_corpora(Path(folder), args.megabytes, args.files).items():
            megabytes = sum(path.stat().st_size for path in paths) / 1e6
            kdflow, whole = run_child("kdflow", paths), run_child("whole-file", paths)
            if kdflow["pieces"] != whole["pieces"]:
                raise SystemExit(f"{case}: kdflow cut {kdflow['pieces']} documents, the reference {whole['pieces']}")
            rows.append({"case": case, "megabytes": round(megabytes, 1), "documents": kdflow["pieces"],
                         "kdflow": _rates(kdflow, megabytes), "whole_file": _rates(whole, megabytes)})
    print(f"\n{'case':<20}{'MB':>7}{'kdflow MB/s':>13}{'whole-file MB/s':>17}{'speed':>8}{'kdflow peak MB':>16}{'whole-file peak MB':>20}")
    for row in rows:
        kdflow, whole = row["kdflow"], row["whole_file"]
        print(f"{row['case']:<20}{row['megabytes']:>7}{kdflow['mb_per_s']:>13}{whole['mb_per_s']:>17}"
              f"{kdflow['mb_per_s'] / whole['mb_per_s']:>7.1f}x{kdflow['peak_mb']:>16}{whole['peak_mb']:>20}")
    command = f"python benchmarks/prep_throughput.py --megabytes {args.megabytes:g} --files {args.files}"
    append_result(args.results, command, {"results": rows})


def _rates(measured: dict, megabytes: float) -> dict:
    return {"seconds": round(measured["seconds"], 2), "mb_per_s": round(megabytes / measured["seconds"], 1),
            "peak_mb": round(measured["peak_mb"])}


if __name__ == "__main__":
    main()
