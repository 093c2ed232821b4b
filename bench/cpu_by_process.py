"""CPU per transfer by process, before/after: one stack per source tree, the trees alternating.

For each round and each tree (this checkout unless --tree is given, e.g. a `git worktree`
of an older commit with its own `make venv`), that tree's own Python starts that tree's
stack on fresh Postgres databases (BENCH_DATABASE_URL's server) with --replicas wallet
processes, funds 100 wallets and drives transfers through the gateway with wrk
(`bench/scale.py`'s transfers(): CPU of every process from /proc, per transfer), --points
times. Each point prints as a JSON line; the means per tree come last. Figures only.

    .venv/bin/python bench/cpu_by_process.py [--tree PATH ...] [--rounds 2] [--points 2]
        [--seconds 12] [--connections 32] [--replicas 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

# The tree measured: this checkout, or the one main() runs this file for (an older tree
# without this script).
ROOT = Path(os.environ.get("CPU_BY_PROCESS_ROOT") or Path(__file__).resolve().parents[1])
ADMIN = os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def measure(args: argparse.Namespace) -> None:
    """In the tree's own Python: one stack, --points transfer runs, a JSON line each."""
    sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]
    os.environ["TEST_DATABASE_URL"] = ADMIN
    import bench as b
    import httpx
    import scale
    from e2e.conftest import postgres_stack_env
    from sqlalchemy.engine import make_url

    work = Path(tempfile.mkdtemp(prefix="cpu-by-process-"))
    env = postgres_stack_env(f"cpubp{os.getpid()}")
    if env is None:
        sys.exit("cpu_by_process: needs BENCH_DATABASE_URL's Postgres")
    stack = b.start_load_stack(work / "var", WALLET_REPLICAS=str(args.replicas), **env)
    try:
        with httpx.Client(base_url=stack.url, timeout=30) as api:
            users = b.fund(api, b.WALLETS)
        wallets = work / "wallets.txt"
        wallets.write_text("".join(f"{t} {w}\n" for t, w, _ in users))
        database = make_url(env["WALLET_DATABASE_URL"]).database or ""
        for _ in range(args.points):
            point = scale.transfers(stack, wallets, ADMIN, database, args.seconds, args.connections)
            us = point["cpu_us_per_transfer"]
            print(json.dumps({"rps": point["rps"], "p99": point["p99"], "all": sum(us.values()), **us}), flush=True)
    finally:
        stack.stop()
        b.drop_databases(env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", help="a checkout with its own .venv (repeatable)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--points", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return
    trees = [Path(t).resolve() for t in args.tree or [str(ROOT)]]
    points: dict[Path, list[dict[str, float]]] = defaultdict(list)
    passed = ["--points", str(args.points), "--seconds", str(args.seconds)]
    passed += ["--connections", str(args.connections), "--replicas", str(args.replicas)]
    for n in range(1, args.rounds + 1):
        for tree in trees:
            print(f"# round {n}: {tree}", file=sys.stderr, flush=True)
            # This script, run by the tree's own Python from the tree: its stack, its code.
            script = tree / "bench" / "cpu_by_process.py"
            if not script.exists():  # an older tree: this file, pointed at that tree
                script = Path(__file__).resolve()
            done = subprocess.run(
                [str(tree / ".venv" / "bin" / "python"), str(script), "--measure", *passed],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "CPU_BY_PROCESS_ROOT": str(tree)},
            )
            for line in done.stdout.splitlines():
                if line.startswith("{"):
                    print(f"{tree.name}: {line}", flush=True)
                    points[tree].append(json.loads(line))
    for tree, found in points.items():
        keys = sorted({k for p in found for k in p}, key=lambda k: (k != "rps", k != "all", k))
        means = {k: round(sum(p.get(k, 0.0) for p in found) / len(found)) for k in keys}
        print(f"mean of {len(found)} points, {tree}: {json.dumps(means)}")


if __name__ == "__main__":
    main()
