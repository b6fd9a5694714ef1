"""Soak test: many detections in one process and many cancelled trainings, checking that memory stays flat and no
process is left behind (docs/SECURITY.md, "How it is measured").

1. `ra detect` in-process (`ra_engine.detect_files`) on SCANS scans with the bundled brain-t1-demo model, in batches
   whose outputs are removed after each batch; the resident memory (RSS) after each batch.
2. `RALogic(scene).detect` (slicer-core, headless) DETECTIONS times in one scene: re-runs on one input (its output
   nodes updated) and scans loaded, detected and removed again, as a user who opens one scan after another; the RSS of
   this process (the one Slicer would be) after each detection.
3. The Slicer panel's training launcher (`RALogic.launcher.TrainingProcess`) started and cancelled CYCLES times on
   tiny radiographs: after each cancel, no process of its group and no child of this process is left.

Memory growth is measured from the end of the warm-up (the first 30% of the batches or detections: caches, allocator
pools, the first kept results) to the end; it must stay within --max-growth (default 5%). Writes benchmarks/results/soak[_small].json and prints a summary;
exit status 1 when a check fails.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak.py            # 200 scans, 200 logic detections, 20 cycles
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak.py --small    # 20, 9, 4: a quick check (minutes)

Memory growth does not depend on other load on the machine; the seconds do (the JSON records the load average).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing"))


import ra_engine  # noqa: E402
from ra_engine.core.resources import VERSION  # noqa: E402

MODEL = "brain-t1-demo"
SCANS = [REPO / "ra_engine" / "resources" / "reference" / "head.nii.gz",
         REPO / "ra_engine" / "resources" / "samples" / "mni152_2009a_t1.nii.gz"]
TINY_TRAINING = {"image_size": 16, "widths": (4, 8), "latent_dim": 4, "batch_size": 2, "device": "cpu",
                 "calibrate": False, "checkpoint_every": 1}


def rss_mb() -> float:
    """This process's resident memory now (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


WARMUP = 0.3  # the share of a series taken as warm-up (caches, allocator pools, the first kept results)


def growth(series: list[float]) -> float:
    """Relative growth from the end of the warm-up (the first WARMUP of the values, one at least) to the end."""
    start = series[max(1, round(WARMUP * len(series))) - 1]
    return (series[-1] - start) / start if len(series) > 1 else 0.0


def children_of(pid: int) -> list[int]:
    """Living processes whose parent is `pid` (Linux /proc; [] elsewhere)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def soak_detect_files(scans: int, batch: int, work: Path) -> dict:
    """detect_files in batches of `batch` inputs (links to the bundled heads), outputs removed after each."""
    inputs = work / "inputs"
    inputs.mkdir(parents=True)
    links = []
    for i in range(scans):
        link = inputs / f"scan{i:04d}.nii.gz"
        link.symlink_to(SCANS[i % len(SCANS)])
        links.append(link)
    out = work / "out"
    rss, seconds, done, failed = [], [], 0, 0
    for start in range(0, scans, batch):
        began = time.perf_counter()
        result = ra_engine.detect_files(MODEL, links[start:start + batch], out, device="cpu", overwrite=True)
        seconds.append(time.perf_counter() - began)
        done, failed = done + result.done, failed + len(result.failed)
        shutil.rmtree(out, ignore_errors=True)
        rss.append(round(rss_mb(), 1))
    return {"scans": scans, "batch": batch, "done": done, "failed": failed, "rss_mb": rss,
            "seconds_per_scan": round(sum(seconds) / scans, 3), "growth_after_warmup": round(growth(rss), 4)}


def remove_with_its_nodes(scene, node) -> None:
    """Removes `node` with its display and storage nodes, as Slicer's Data module deletes a node."""
    for i in reversed(range(node.GetNumberOfDisplayNodes())):
        scene.RemoveNode(node.GetNthDisplayNode(i))
    if node.GetStorageNode() is not None:
        scene.RemoveNode(node.GetStorageNode())
    scene.RemoveNode(node)


def soak_logic(detections: int, every_new: int) -> dict:
    """RALogic.detect `detections` times in one scene: on one input, and every `every_new`-th time on a newly loaded
    scan removed again afterwards (with its outputs)."""
    from fixtures_mrml import ViewScene, load_volume
    from RALogic import RALogic

    views = ViewScene()
    scene = views.scene
    logic = RALogic(scene)
    kept = load_volume(scene, SCANS[0], "kept")
    rss, seconds, nodes = [], [], []
    for i in range(detections):
        began = time.perf_counter()
        if every_new and i % every_new == every_new - 1:
            node = load_volume(scene, SCANS[1], f"opened{i}")
            result = logic.detect(node, model=MODEL, device="cpu")
            for output in (result.pseudoHealthyNode, result.anomalyMapNode, result.detectionsNode,
                           result.segmentationNode, node):
                remove_with_its_nodes(scene, output)
        else:
            logic.detect(kept, model=MODEL, device="cpu")
        seconds.append(time.perf_counter() - began)
        rss.append(round(rss_mb(), 1))
        nodes.append(scene.GetNumberOfNodes())
    logic.cleanup()
    return {"detections": detections, "rss_mb": rss, "scene_nodes": nodes,
            "seconds_per_detection": round(sum(seconds) / detections, 3), "growth_after_warmup": round(growth(rss), 4),
            "nodes_grew": nodes[-1] > nodes[0]}


def soak_launcher(cycles: int, work: Path) -> dict:
    """TrainingProcess started, cancelled once it trains (or after a random moment of its start-up), cycles times."""
    import random

    from fixtures_io import write_radiographs
    from RALogic.launcher import TrainingProcess

    data = write_radiographs(work / "normals")
    rng = random.Random(2109)
    stray, returncodes, seconds, logs = [], [], [], []
    for i in range(cycles):
        began = time.perf_counter()
        process = TrainingProcess(data, "xray", work / f"run{i}", epochs=50, options=TINY_TRAINING).start()
        pgid, wait_for_step = process.pid, rng.random() < 0.5
        deadline = time.monotonic() + (120 if wait_for_step else rng.uniform(0.5, 4.0))
        while process.running and time.monotonic() < deadline:
            if wait_for_step and any(e.get("event") == "step" for e in process.poll()):
                break
            time.sleep(0.05)
        process.cancel(timeout=60)
        returncodes.append(process.wait(120))
        if returncodes[-1] not in (0, 130):  # killed before it set up its signal handlers, or refused: say why
            logs.append({"cycle": i, "returncode": returncodes[-1], "log": process.log.splitlines()[-3:]})
        time.sleep(0.2)
        left = children_of(os.getpid())
        if group_alive(pgid) or left:
            stray.append({"cycle": i, "group_alive": group_alive(pgid), "children": left})
        seconds.append(time.perf_counter() - began)
    return {"cycles": cycles, "returncodes": returncodes, "stray": stray, "not_130": logs,
            "seconds_per_cycle": round(sum(seconds) / cycles, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a quick check: 20 scans, 9 logic detections, 4 cycles")
    parser.add_argument("--scans", type=int, default=None, help="ra detect inputs (default 200; --small 20)")
    parser.add_argument("--batch", type=int, default=None, help="ra detect inputs per batch (default 20; --small 5)")
    parser.add_argument("--detections", type=int, default=None, help="RALogic detections (default 200; --small 9)")
    parser.add_argument("--cycles", type=int, default=None, help="training start/cancel cycles (default 20; "
                                                                 "--small 4)")
    parser.add_argument("--max-growth", type=float, default=0.05, help="allowed RSS growth after warm-up")
    parser.add_argument("--skip", nargs="*", default=[], choices=["detect", "logic", "launcher"])
    parser.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/soak[_small].json)")
    args = parser.parse_args(argv)
    small = args.small
    scans = args.scans or (20 if small else 200)
    batch = args.batch or (5 if small else 20)
    detections = args.detections or (9 if small else 200)
    cycles = args.cycles or (4 if small else 20)
    out = args.out or REPO / "benchmarks" / "results" / f"soak{'_small' if small else ''}.json"

    report = {"command": ["benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])], "version": VERSION,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                          "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
              "max_growth": args.max_growth}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ra-soak-") as tmp:
        work = Path(tmp)
        if "detect" not in args.skip:
            report["detect_files"] = soak_detect_files(scans, batch, work / "detect")
        if "logic" not in args.skip:
            report["ralogic"] = soak_logic(detections, every_new=3)
        if "launcher" not in args.skip:
            (work / "launcher").mkdir()
            report["launcher"] = soak_launcher(cycles, work / "launcher")
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    problems = []
    for part in ("detect_files", "ralogic"):
        if part in report:
            if report[part]["growth_after_warmup"] > args.max_growth:
                problems.append(f"{part}: RSS grew {report[part]['growth_after_warmup']:.1%} after warm-up")
    if report.get("detect_files", {}).get("failed"):
        problems.append(f"detect_files: {report['detect_files']['failed']} input(s) failed")
    if report.get("ralogic", {}).get("nodes_grew"):
        problems.append("ralogic: the scene keeps more nodes than after the first detection")
    if report.get("launcher", {}).get("stray"):
        problems.append(f"launcher: processes left after cancel: {report['launcher']['stray']}")
    report["problems"] = problems
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    print(f"soak ({'small' if small else 'full'}), {report['seconds']:.0f} s, load {report['machine']}")
    if "detect_files" in report:
        d = report["detect_files"]
        print(f"  ra detect: {d['done']}/{d['scans']} scans, {d['seconds_per_scan']} s each, RSS {d['rss_mb'][0]} -> "
              f"{d['rss_mb'][-1]} MB ({d['growth_after_warmup']:+.1%} after the warm-up)")
    if "ralogic" in report:
        r = report["ralogic"]
        print(f"  RALogic.detect: {r['detections']} detections, {r['seconds_per_detection']} s each, RSS "
              f"{r['rss_mb'][0]} -> {r['rss_mb'][-1]} MB ({r['growth_after_warmup']:+.1%} after the warm-up), scene "
              f"nodes {r['scene_nodes'][0]} -> {r['scene_nodes'][-1]}")
    if "launcher" in report:
        t = report["launcher"]
        print(f"  TrainingProcess: {t['cycles']} start/cancel cycles, {t['seconds_per_cycle']} s each, return codes "
              f"{sorted(set(t['returncodes']))}, stray processes: {len(t['stray'])}")
    print("  " + ("; ".join(problems) if problems else "all checks passed") + f" -> {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
