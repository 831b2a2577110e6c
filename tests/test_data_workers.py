"""The loaders' Grain worker processes: the same rows and states as in-process loading, preemption
signals ignored, no orphans after a kill -9 of the trainer, no leaked shared memory."""
import subprocess
import sys
from pathlib import Path

import pytest

from mm_jax.data.loader import make_loader
from tests.data_fixtures import build_once, data_cfg, same_batch


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_once(tmp_path_factory)


def test_worker_processes_give_the_same_rows_and_restore_the_same_state(built):
    root, _, tok = built
    a = make_loader(data_cfg(root / "out"), tokenizer=tok, global_batch_size=4, seed=3, process_index=0,
                    process_count=1)
    b = make_loader(data_cfg(root / "out", num_workers=2), tokenizer=tok, global_batch_size=4, seed=3, rows=(2, 4))
    whole = [next(a) for _ in range(3)]
    assert same_batch(next(b), {k: v[2:] for k, v in whole[0].items()})
    b.set_state({"global_batch": 2, "global_batch_size": 4})
    assert same_batch(next(b), {k: v[2:] for k, v in whole[2].items()})
    assert b.get_state() == {"global_batch": 3, "global_batch_size": 4}
    b.close()


def test_worker_processes_outlive_a_preemption_signal(built):
    """SLURM's ``--signal=USR1`` reaches every process of the job: the data workers ignore it (and
    SIGTERM), so the trainer can still load batches while it saves its preemption checkpoint."""
    import os
    import signal
    import time

    import psutil

    root, _, tok = built
    ld = make_loader(data_cfg(root / "out", num_workers=1), tokenizer=tok, global_batch_size=2, seed=3)
    first = next(ld)
    workers = [c for c in psutil.Process().children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]
    assert workers
    for w in workers:
        os.kill(w.pid, signal.SIGUSR1)
        os.kill(w.pid, signal.SIGTERM)
    time.sleep(1.0)
    dead = [w.pid for w in workers if not w.is_running() or w.status() == psutil.STATUS_ZOMBIE]
    assert not dead, dead
    assert [next(ld)["class_index"].shape for _ in range(3)] == [first["class_index"].shape] * 3
    ld.close()


def test_worker_processes_die_with_a_killed_trainer(built):
    """kill -9 of the process that owns the loader (a preempted host, the kill -9 test of the
    multi-process training) does not leave its Grain workers running as orphans."""
    import signal

    import psutil

    root, _, tok = built
    code = (f"import os, time\nfrom mm_jax.data.loader import make_loader\nfrom tests.data_fixtures import data_cfg\n"
            f"loader = make_loader(data_cfg({str(root / 'out')!r}, num_workers=2), tokenizer={str(root / 'tok')!r}, "
            f"global_batch_size=2, seed=3)\nfor _ in range(3):\n    next(loader)\nprint('ready', flush=True)\n"
            f"time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    assert p.stdout.readline().strip() == "ready"
    workers = [c for c in psutil.Process(p.pid).children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) == 2
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, [w.pid for w in alive]


def test_a_worker_loader_leaves_no_shared_memory_for_the_resource_tracker(built):
    root, _, tok = built
    code = (f"from mm_jax.data.loader import make_loader\nfrom tests.data_fixtures import data_cfg\n"
            f"def train():\n"  # as in mm_jax.train: a batch is still referenced when the loader closes
            f"    loader = make_loader(data_cfg({str(root / 'out')!r}, num_workers=1), "
            f"tokenizer={str(root / 'tok')!r}, global_batch_size=2, seed=3)\n"
            f"    for _ in range(8):\n        batch = next(loader)\n"
            f"    loader.close()\ntrain()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    assert "leaked shared_memory" not in run.stderr, run.stderr[-2000:]
