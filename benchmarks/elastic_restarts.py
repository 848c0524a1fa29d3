"""Killed-worker restarts under torchrun: how often the gloo group re-forms, and how fast.

    python benchmarks/elastic_restarts.py [--reps 20] [--init batteries|torch] [--rdzv c10d|static] [--smoke]

Each repetition launches a minimal script (written to a temporary folder; no model, no data) with
``torchrun --nproc_per_node=2 --max-restarts=1`` and the chosen rendezvous; both workers form a
gloo group and all-reduce in a loop; once they have, rank 1 is killed with SIGKILL. torchrun stops
rank 0 and starts both again; the restarted pair forms its group, checks ten all-reduces and exits
0. A repetition succeeds when torchrun exits 0 within ``--hang-s`` seconds of the kill; otherwise
the cause is taken from its output (``connectFullMesh`` refused, a hang, ...).

``--init batteries`` (default) forms the group with ``batteries.distributed.init_distributed``;
``--init torch`` with a bare ``torch.distributed.init_process_group("gloo")``, the upstream
behaviour (a hang there waits for torch's 1800 s default; ``--hang-s`` stops it earlier). Both import
``torch._dynamo`` before the timed span, so the two times compare. Printed per repetition and as
medians: from the kill to the restarted group formed (torchrun's detection, stop and restart
included), and the formation itself (the init call in the restarted workers). Target: every
repetition succeeds (20 of 20).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import SUMMARY_HEADER, machine, readme_table

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, os, sys, time
import torch
import torch._dynamo  # imported before the timed span by both --init modes (init_distributed imports it)
import torch.distributed as dist

init, folder = sys.argv[1], sys.argv[2]
attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
started = time.time()
if init == "torch":
    dist.init_process_group("gloo")
else:
    from batteries.distributed import init_distributed
    init_distributed(backend="gloo")
formed = time.time()
with open(os.path.join(folder, f"formed-{attempt}-{rank}.json"), "w") as file:
    json.dump({"started": started, "formed": formed}, file)
world_size = dist.get_world_size()
for step in range(10 if attempt else 100000):  # the first attempt runs until rank 1 is killed
    x = torch.ones(1)
    dist.all_reduce(x)
    assert x.item() == world_size, x
    if attempt == 0 and rank == 1 and step == 3:
        with open(os.path.join(folder, "victim.tmp"), "w") as file:
            file.write(str(os.getpid()))
        os.replace(os.path.join(folder, "victim.tmp"), os.path.join(folder, "victim"))
    time.sleep(0.01)
dist.destroy_process_group()
"""

CAUSES = [  # (regular expression on torchrun's output, cause), first match wins
    (r"connectFullMesh failed.*Connection refused", "connectFullMesh: Connection refused"),
    (r"connectFullMesh failed", "connectFullMesh failed"),
    (r"init_distributed: .*(waited|no answer)", "init_distributed timed out"),
    (r"Connection refused", "Connection refused"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(process: subprocess.Popen) -> None:
    for pid in [process.pid, *descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def one_restart(folder: Path, init: str, rdzv: str, hang_s: float) -> dict:
    """One launch, one kill, one restart; the outcome and its times."""
    script = folder / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    if rdzv == "c10d":
        launch = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=bench-{port}"]
    else:  # torchrun's default: a static rendezvous on --master-addr / --master-port
        launch = ["--master-addr=127.0.0.1", f"--master-port={port}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1", *launch]
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    log = folder / "torchrun.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [*command, str(script), init, str(folder)], stdout=output, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 120
        while not (folder / "victim").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                return {"ok": False, "cause": "the first attempt did not start", "log": log.read_text()[-2000:]}
            time.sleep(0.01)
        killed = time.time()
        os.kill(int((folder / "victim").read_text()), signal.SIGKILL)
        try:
            code = process.wait(timeout=hang_s)
        except subprocess.TimeoutExpired:
            code = None
    finally:
        kill_tree(process)
    text = log.read_text()
    formed = [json.loads(path.read_text()) for path in folder.glob("formed-1-*.json")]
    result = {"ok": code == 0 and len(formed) == 2}
    if len(formed) == 2:
        result["reform_s"] = max(record["formed"] for record in formed) - killed
        result["init_s"] = max(record["formed"] for record in formed) - max(record["started"] for record in formed)
    if not result["ok"]:
        cause = f"hang: no exit {hang_s:g} s after the kill" if code is None else f"exit code {code}"
        for pattern, name in CAUSES:
            if re.search(pattern, text):
                cause = name if code is not None else f"{cause} ({name} first)"
                break
        result["cause"], result["log"] = cause, text[-2000:]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20, help="killed-worker restarts (default 20)")
    parser.add_argument(
        "--init", choices=["batteries", "torch"], default="batteries", help="how the workers form the group"
    )
    parser.add_argument(
        "--rdzv", choices=["c10d", "static"], default="c10d", help="torchrun's rendezvous (default c10d)"
    )
    parser.add_argument(
        "--hang-s", type=float, default=60.0, help="seconds after the kill that count as a hang (default 60)"
    )
    parser.add_argument("--smoke", action="store_true", help="one repetition: checks that it runs (and re-forms)")
    parser.add_argument("--verbose", action="store_true", help="print the end of torchrun's output of every failure")
    args = parser.parse_args()
    if args.smoke:
        args.reps = 1
    if args.reps < 1:
        parser.error(f"--reps: must be >= 1, got {args.reps}")
    print(f"machine: {machine()}")
    label = "init_distributed" if args.init == "batteries" else "bare init_process_group"
    launch = f"torchrun --nproc_per_node=2 --max-restarts=1, {args.rdzv} rendezvous"
    print(f"{args.reps} restart(s): {launch}, group formed by {label}, gloo")
    results = []
    for index in range(args.reps):
        with tempfile.TemporaryDirectory(prefix="elastic-") as folder:
            result = one_restart(Path(folder), args.init, args.rdzv, args.hang_s)
        results.append(result)
        times = (
            f"re-formed {result['reform_s']:.2f} s after the kill (formation {result['init_s']:.3f} s)"
            if "reform_s" in result
            else ""
        )
        print(
            f"  {index + 1:>3}: {'ok    ' if result['ok'] else 'FAILED'} {times} {result.get('cause', '')}".rstrip(),
            flush=True,
        )
        if not result["ok"] and args.verbose:
            print("      " + result["log"].replace("\n", "\n      "))
    succeeded = [result for result in results if result["ok"]]
    causes = Counter(result["cause"] for result in results if not result["ok"])
    print(f"\nsucceeded: {len(succeeded)} of {len(results)}")
    for cause, count in causes.most_common():
        print(f"  failed {count}: {cause}")
    if succeeded:
        reform = [result["reform_s"] for result in succeeded]
        init = [result["init_s"] * 1e3 for result in succeeded]
        for name, values, unit in (("kill -> group re-formed", reform, "s"), ("formation (init call)", init, "ms")):
            spread = f"min {min(values):.2f}, max {max(values):.2f}"
            print(f"  {name:<24} median {statistics.median(values):.2f} {unit} ({spread}, n={len(values)})")
    met = len(succeeded) == len(results)
    readme_table(SUMMARY_HEADER, [[
        f"killed-worker restarts re-formed, torchrun {args.rdzv} rendezvous, {label}",
        "", f"{len(succeeded)} of {len(results)}", "all", "smoke run" if args.smoke else ("yes" if met else "no"),
    ]])  # fmt: skip
    return 0 if met or args.init == "torch" else 1


if __name__ == "__main__":
    sys.exit(main())
