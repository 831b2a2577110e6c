"""The README's matrix (``plan --table`` without targets) covers the runtimes and slices the users
run, and every explicit mesh in it fits its target's device count."""
import math

from mm_jax import parallel
from mm_jax.plan import TARGETS
from mm_jax.plan.__main__ import README_ROWS


def test_the_readme_matrix_samples_on_five_runtimes_and_trains_both_stages_on_four_machines():
    sample = {t for t, w, _ in README_ROWS if w == "sample"}
    assert sample == {"v5e-1", "v6e-1", "v5e-8", "h100x1", "a800-80x8"}
    for stage in ("train-image", "train-video"):
        assert {t for t, w, _ in README_ROWS if w == stage} == {"v5p-8", "v5p-32", "a800-80x8", "h100x8"}


def test_every_mesh_in_the_matrix_has_its_targets_device_count():
    for target, _, mesh in README_ROWS:
        if mesh:
            assert math.prod(parallel.parse_mesh_spec(mesh).values()) == TARGETS[target].devices, (target, mesh)
