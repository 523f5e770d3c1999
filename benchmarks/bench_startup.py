"""Start-up cost of the CLI: ``phenoscope --help`` wall time and ``phenoscope segment``'s overhead on one image.

Every figure is the median over ``--repeats`` fresh subprocesses (1 torch thread):

- ``--help``: wall time of ``python -m phenoscope --help``;
- ``segment``: wall time of ``python -m phenoscope segment IMAGE --out NEW_DIR`` with the default model;
- ``load+segment``: in a fresh process, after its imports, the time of ``load_model("default")`` plus
  ``model.segment(image)`` (the segmentation itself, its first call as in the CLI);
- ``overhead`` = ``segment`` − ``load+segment``: interpreter start, imports, argument parsing, checks,
  reading and writing files;
- ``imports``: in that same process, the imports of the segmentation stack (torch, numba, scipy,
  pandas ...), and ``python -c pass``: the interpreter's start. These two are the part of the overhead
  no CLI design removes; ``rest`` = ``overhead`` − ``imports`` − ``python`` is the CLI's own cost.

The image is a 256×256 real DSB 2018 image when the shared data is there, else a generated one.
``--peer PATH`` times another checkout (e.g. the tree before a change) in the same run, side by side:

    python benchmarks/bench_startup.py --repeats 5 --peer /work/wt-base
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IN_PROCESS = """
import time
t0 = time.perf_counter()
import sys
import phenoscope.segment.outputs
from phenoscope.core.io import imread
from phenoscope.segment import load_model
t1 = time.perf_counter()
image = imread(sys.argv[1])
t2 = time.perf_counter()
model = load_model("default")
model.segment(image)
print(t1 - t0, time.perf_counter() - t2)
"""


def wall(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    """Seconds a subprocess takes (it must succeed)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def sample_image(folder: Path) -> Path:
    """A 256×256 image: the first DSB 2018 image of that size, else a generated one, as a TIFF."""
    from phenoscope.core.io import imwrite_tiff
    from phenoscope.datasets import data_root, dsb_image, dsb_index, synthetic_nuclei

    dsb = data_root() / "dsb2018_train"
    if dsb.exists():
        idx = dsb_index(dsb)
        image_id = idx[(idx.height == 256) & (idx.width == 256)].image_id.iloc[0]
        image, what = dsb_image(dsb, image_id), f"DSB {image_id[:12]}…"
    else:
        image, what = synthetic_nuclei((256, 256), n=20)[0], "generated"
    path = folder / "sample.tif"
    imwrite_tiff(path, image)
    print(f"image: {what}, shape {image.shape}")
    return path


def measure_once(tree: Path, image: Path, out: Path) -> dict[str, float]:
    """Seconds of each figure, once, for the checkout at ``tree``."""
    # run in the tree (``python -m`` puts the working directory first on sys.path)
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    py = sys.executable
    run = {"python": wall([py, "-c", "pass"], env, tree),
           "help": wall([py, "-m", "phenoscope", "--help"], env, tree),
           "segment": wall([py, "-m", "phenoscope", "segment", str(image), "--out", str(out)], env, tree)}
    inner = subprocess.run([py, "-c", IN_PROCESS, str(image)], env=env, cwd=tree, check=True, capture_output=True,
                           text=True)
    run["imports"], run["load+segment"] = map(float, inner.stdout.split()[-2:])
    run["overhead"] = run["segment"] - run["load+segment"]
    run["rest"] = run["overhead"] - run["imports"] - run["python"]
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer", type=Path, default=None, help="another checkout to time in the same run")
    args = parser.parse_args()
    trees = [ROOT] + ([args.peer.resolve()] if args.peer else [])
    runs: dict[Path, list[dict[str, float]]] = {tree: [] for tree in trees}
    with tempfile.TemporaryDirectory() as tmp:
        image = sample_image(Path(tmp))
        for n in range(args.repeats):  # trees interleaved, so a change in the machine's load hits both
            for k, tree in enumerate(trees):
                runs[tree].append(measure_once(tree, image, Path(tmp) / f"out_{k}_{n}"))
    print(f"median of {args.repeats} fresh processes, 1 thread, seconds; goals: --help < 1, overhead < 1.5")
    keys = ("help", "segment", "load+segment", "overhead", "imports", "python", "rest")
    print(f"{'tree':<20}" + "".join(f"{k:>13}" for k in keys))
    for tree, rows in runs.items():
        print(f"{str(tree):<20}" + "".join(f"{statistics.median(r[k] for r in rows):>13.2f}" for k in keys))


if __name__ == "__main__":
    main()
