"""The Colab TPU notebook runs top to bottom in TINY mode on CPU.

Executed with nbclient on a kernel spec written into a temporary JUPYTER_PATH whose argv is this
interpreter (``sys.executable``), so a fresh CI venv needs no ``ipykernel install``. Parameters are
injected papermill-style: a cell tagged ``injected-parameters`` right after the ``parameters`` cell.
"""
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "sample_colab_tpu.ipynb"
KERNEL = "mm-jax-test"


def _inject(nb, params: dict):
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    src = "# Parameters injected by tests/test_notebook.py\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx + 1, cell)


@pytest.fixture
def kernel_path(tmp_path, monkeypatch):
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mm_jax test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")


def test_committed_notebook_has_a_parameters_cell_first_and_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert "parameters" in nb.cells[0].metadata.get("tags", [])
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow  # ~1-2 min each on 2 CPU cores: kernel start, tiny checkpoint, compiling the step and the VAE
@pytest.mark.parametrize("mode,devices", [("identity", 8), ("text-to-video", 1), ("image-to-video", 1),
                                          ("consisid", 1)])
def test_notebook_runs_in_tiny_mode_and_writes_the_video(tmp_path, kernel_path, monkeypatch, mode, devices):
    """Each mode of the notebook (MODE in its parameters cell); the identity one on 8 fake CPU
    devices (the mesh it picks from the device count: the CFG pair on data=2, the sequence on
    context=4), as on a v5e-8. Image to video animates a generated first frame with a tiny
    CogVideoX-5B-I2V stand-in (8 input channels, a random learned positional table); consisid reads
    a face photo with the tiny face folder of ``tests/tiny_consisid_faces.py`` (RetinaFace-R50,
    BiSeNet, a 21-layer EVA tower, stand-in antelopev2) into a tiny ConsisID checkpoint."""
    import imageio.v3 as iio

    from tests.conftest import fake_devices_env

    monkeypatch.setenv("XLA_FLAGS", fake_devices_env(devices)["XLA_FLAGS"])
    nb = nbformat.read(NOTEBOOK, as_version=4)
    out = tmp_path / "video.mp4"
    _inject(nb, dict(MODE=mode, TINY=True, WORKDIR=str(tmp_path / "run"), OUT=str(out), FRAMES=9, HEIGHT=64,
                     WIDTH=64, STEPS=2, SEED=0, ADAPTER_REPO="tiny" if mode == "identity" else ""))
    NotebookClient(nb, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert out.is_file()
    frames = iio.imread(out, plugin="pyav")
    assert frames.shape == (9, 64, 64, 3)
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"{mode} mode" in printed
    want = "{'data': 2, 'fsdp': 1, 'context': 4, 'tensor': 1}" if devices == 8 else \
        "{'data': 1, 'fsdp': 1, 'context': 1, 'tensor': 1}"
    assert f"mesh {want}" in printed
    # the progress bar (text tqdm here: no ipywidgets in the test env) reached the last step
    assert "denoising" in printed and "2/2" in printed
    picture = str(tmp_path / "run" / "picture.png")
    if mode in ("image-to-video", "consisid"):  # the memory plan compiled its sampler's phases for a v5e-1 (libtpu)
        assert "sample on v5e-1" in printed and "FAILED" not in printed
    if mode == "image-to-video":
        assert f"first frame: {picture}" in printed
    if mode == "consisid":  # the face encoder's arrays, sized for the tiny transformer: 512 + EVA's 24, width 32
        assert "ConsisID DiT + 1 face cross-attentions" in printed
        assert f"reference: {picture}" in printed
        assert "face: crop (512, 512, 3), id_cond (1, 536), id_vit_hidden (5, 1, 10, 32)" in printed
    last = nb.cells[-1]
    assert any("text/html" in o.get("data", {}) for o in last.outputs)  # the video is shown inline
