"""The batch runner: input lists, resume, failures, atomic outputs, executors, SIGTERM; the light CLI parser."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from phenoscope.batch import (BatchInterrupted, InputError, Item, ProcessExecutor, SerialExecutor, check_writable,
                              collect_inputs, plan, run_batch)
from phenoscope.core.io import atomic_write

ROOT = Path(__file__).resolve().parents[1]


class CopyJob:
    """Writes the input's text, upper-cased, to its one output; fails on inputs containing 'bad'."""

    def __call__(self, item: Item) -> int:
        text = item.source.read_text()
        with atomic_write(item.outputs[0], "w") as fh:
            fh.write(text.upper())
            if "bad" in text:
                raise ValueError(f"{item.source}: bad content\nsecond line")
        return len(text)


class SlowCopyJob(CopyJob):
    def __call__(self, item: Item) -> int:
        time.sleep(0.3)
        return super().__call__(item)


def make_inputs(folder: Path, texts: dict[str, str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_text(text)
    return [folder / name for name in texts]


def test_collect_inputs_expands_and_refuses_before_work(tmp_path):
    a, b, _ = make_inputs(tmp_path / "in", {"a.png": "", "b.tif": "", "b_masks.tif": ""})
    (tmp_path / "in" / "notes.txt").write_text("")
    # folders list their images (not the excluded outputs), globs expand, repeats are dropped, order is kept
    assert collect_inputs([str(b), str(tmp_path / "in"), str(tmp_path / "in" / "*.png")], exclude=("_masks.tif",)) == [b, a]
    assert collect_inputs([str(tmp_path / "in" / "*.tif")]) == [b, tmp_path / "in" / "b_masks.tif"]
    with pytest.raises(InputError, match="nothing_here: no such file"):
        collect_inputs([str(a), str(tmp_path / "nothing_here")])
    (other,) = make_inputs(tmp_path / "other", {"a.tif": ""})
    with pytest.raises(InputError, match="share the name 'a'") as err:
        collect_inputs([str(a), str(other)])
    assert str(a) in str(err.value) and str(other) in str(err.value)
    assert collect_inputs([str(a), str(other)], unique_stems=False) == [a, other]


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "new" / "out").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="file/out: output folder is not writable"):
        check_writable(tmp_path / "file" / "out")


@pytest.mark.parametrize("executor", [SerialExecutor(), ProcessExecutor(2)], ids=["serial", "process"])
def test_run_batch_collects_failures_and_resumes(tmp_path, executor):
    files = make_inputs(tmp_path / "in", {"a.txt": "one", "b.txt": "bad", "c.txt": "three"})
    items = plan(files, tmp_path / "out", (".up",))
    assert items[0].outputs == (tmp_path / "out" / "a.up",)
    report = run_batch(items, CopyJob(), executor, progress=False)
    assert [i.source for i in report.done] == [files[0], files[2]] and not report.skipped
    assert report.results == {files[0]: 3, files[2]: 5}
    assert report.failure_lines() == [f"{files[1]}: bad content"]  # one line, the file named once
    assert (tmp_path / "out" / "c.up").read_text() == "THREE"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.up", "c.up"]  # no partial b.up
    assert report.summary("copied") == "copied 2, skipped 0 (already done), failed 1"
    # a rerun redoes only the failed item; overwrite redoes everything
    (tmp_path / "in" / "b.txt").write_text("two")
    again = run_batch(items, CopyJob(), executor, progress=False)
    assert [i.source for i in again.done] == [files[1]] and len(again.skipped) == 2
    assert len(run_batch(items, CopyJob(), executor, overwrite=True, progress=False).done) == 3


def test_interrupt_carries_the_report(tmp_path):
    files = make_inputs(tmp_path / "in", {f"{n}.txt": str(n) for n in range(4)})
    items = plan(files, tmp_path / "out", (".up",))

    def stop_at_third(item: Item) -> int:
        if item.source.name == "2.txt":
            raise KeyboardInterrupt
        return CopyJob()(item)

    with pytest.raises(BatchInterrupted) as stop:
        run_batch(items, stop_at_third, progress=False)
    assert stop.value.exit_code == 130
    assert len(stop.value.report.done) == 2 and len(stop.value.report.unfinished) == 2
    assert "not done 2 (interrupted)" in stop.value.report.summary()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: spawns workers twice
def test_sigterm_mid_batch_exits_143_with_the_summary_and_resumes(tmp_path, workers):
    files = make_inputs(tmp_path / "in", {f"{n}.txt": str(n) for n in range(12)})
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_batch import SlowCopyJob
        from phenoscope.batch import BatchInterrupted, collect_inputs, make_executor, plan, run_batch

        if __name__ == "__main__":  # spawned workers import this file
            items = plan(collect_inputs([{str(tmp_path / "in")!r}], suffixes=(".txt",)), {str(tmp_path / "out")!r}, (".up",))
            try:
                report = run_batch(items, SlowCopyJob(), make_executor({workers}), progress=False)
                print(report.summary(), file=sys.stderr)
            except BatchInterrupted as stop:
                print(stop.report.summary() + f"; {{stop}}", file=sys.stderr)
                sys.exit(stop.exit_code)
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not (tmp_path / "out" / "0.up").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err and "(interrupted)" in err
    done = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert 1 <= len(done) < 12 and all(not n.startswith(".") for n in done)  # no temp files left
    rerun = subprocess.run([sys.executable, str(script)], stderr=subprocess.PIPE, text=True, env=env, timeout=60)
    assert rerun.returncode == 0 and f"skipped {len(done)}" in rerun.stderr
    assert [(tmp_path / "out" / f"{f.stem}.up").read_text() for f in files] == [f.read_text().upper() for f in files]


def test_building_the_parser_imports_no_heavy_library():
    code = ("import sys, phenoscope.cli; phenoscope.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'timm', 'torchvision', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]"
