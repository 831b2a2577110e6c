"""Run under ``python -m mm_jax.launch --processes 2 --devices-per-process 4``: for several meshes,
each process loads only ``step.process_rows`` of a global batch (rows of a known array), and
``step.put_batch`` must assemble the global batch exactly (gathered back on every process), also
when the batch is replicated over a mesh axis that spans the processes. Prints one line per mesh;
process 0 also checks the rows it was given against the expected ones."""
import sys

from mm_jax import distributed

distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from mm_jax import parallel  # noqa: E402
from mm_jax.training.step import process_rows, put_batch  # noqa: E402

G = 8
# mesh -> the rows process 0 must load (devices are ordered by process: 0-3 on process 0)
CASES = {"data=2,fsdp=4": (0, 4),    # 8 batch shards: each process holds half
         "data=1,fsdp=8": (0, 4),
         "data=2,tensor=4": (0, 4),  # 2 batch shards, one per process
         "tensor=8": (0, 8)}         # batch replicated over every device: each process holds all rows

assert jax.process_count() == 2 and len(jax.devices()) == 8, (jax.process_count(), len(jax.devices()))
full = {"e_id": np.arange(G * 3, dtype=np.float32).reshape(G, 3), "has_id": np.arange(G) % 2 == 0}
for spec, expected in CASES.items():
    mesh = parallel.make_mesh(spec)
    start, stop = process_rows(mesh, G)
    if jax.process_index() == 0:
        assert (start, stop) == expected, (spec, (start, stop), expected)
    local = {k: v[start:stop] for k, v in full.items()}
    batch = put_batch(local, mesh, G)
    assert batch["e_id"].shape == (G, 3), batch["e_id"].shape
    back = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in batch.items()}
    for k in full:
        assert np.array_equal(back[k], full[k]), (spec, k, back[k], full[k])
    print(f"ROWS {spec} process {jax.process_index()} rows {start}:{stop} ok", flush=True)
sys.exit(0)
