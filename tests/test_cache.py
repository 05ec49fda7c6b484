import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlhf_book.cache import cached_artifact, is_complete


def test_builds_once_then_reuses(tmp_path):
    calls = []

    def build(d):
        calls.append(d)
        (d / "weights.bin").write_text("w")
        return {"size": 1}

    p1 = cached_artifact("thing", build, root=tmp_path)
    p2 = cached_artifact("thing", build, root=tmp_path)
    assert p1 == p2 == tmp_path / "thing" and len(calls) == 1
    assert json.loads((p1 / "COMPLETE.json").read_text())["size"] == 1


def test_failed_build_leaves_nothing_loadable_and_next_build_resumes(tmp_path):
    def crash(d):
        (d / "step1.ckpt").write_text("progress")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_artifact("thing", crash, root=tmp_path)
    assert not (tmp_path / "thing").exists()
    seen = []

    def resume(d):
        seen.append((d / "step1.ckpt").read_text())  # the partial work is still there

    assert is_complete(cached_artifact("thing", resume, root=tmp_path))
    assert seen == ["progress"]


_SLOW_BUILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from rlhf_book.cache import cached_artifact
    def build(d):
        (d / "half.bin").write_text("x")
        Path(sys.argv[2]).write_text("started")
        time.sleep(60)
    cached_artifact("model", build, root=Path(sys.argv[1]))
    """
)


def test_sigkilled_build_leaves_no_directory_a_later_run_would_load(tmp_path):
    flag = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, str(tmp_path), str(flag)])
    for _ in range(300):
        if flag.exists():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "model").exists()
    assert (tmp_path / ".model.partial" / "half.bin").exists()
    # the next run takes the lock (the dead process released it) and finishes
    assert is_complete(cached_artifact("model", lambda d: None, root=tmp_path))


def _worker(root, counter):
    def build(d):
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        (d / "w").write_text("ok")

    p = cached_artifact("shared", build, root=Path(root))
    assert (p / "w").read_text() == "ok"


def test_parallel_builders_build_once_and_never_see_half_a_directory(tmp_path):
    counter = tmp_path / "count.txt"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), str(counter))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text().count("built") == 1
