"""Start-up of the command line: `twa --version` and `twa --help` against `import torch`, side by side.

Each command runs in a fresh interpreter, alternately, for --rounds rounds; the script prints the median wall
time and peak resident memory of each and their ratios to `import torch`. The command line imports torch only
when a command runs, so these ratios are well below 1.

    python scripts/bench_startup.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

PROBE = """
import resource, sys
argv = {argv!r}
if argv is None:
    import torch  # noqa: F401
else:
    from twa_cli.cli import main
    try:
        main(argv)
    except SystemExit:
        pass
sys.stderr.write("PEAK %d\\n" % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

CASES = {"import torch": None, "twa --version": ["--version"], "twa --help": ["--help"],
         "twa train-subspace --help": ["train-subspace", "--help"]}


def measure(argv: list[str] | None) -> tuple[float, float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    peak_kib = int(proc.stderr.strip().splitlines()[-1].split()[1])
    return seconds, peak_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, argv in CASES.items():  # alternating, so a busy moment of the machine hits every case alike
            results[name].append(measure(argv))
    base_time = statistics.median(t for t, _ in results["import torch"])
    base_mem = statistics.median(m for _, m in results["import torch"])
    print(f"{'':28s} {'median s':>9s} {'peak MiB':>9s} {'time ratio':>11s} {'memory ratio':>13s}")
    for name, runs in results.items():
        seconds = statistics.median(t for t, _ in runs)
        mib = statistics.median(m for _, m in runs)
        print(f"{name:28s} {seconds:9.3f} {mib:9.1f} {seconds / base_time:11.2f} {mib / base_mem:13.2f}")


if __name__ == "__main__":
    main()
