"""Convert CurricularFace's published IR-101 into the file ``python -m mm_jax.evaluate --curricularface`` reads.

    python tools/convert_weights/curricularface_save.py \\
        CKPTS/face_encoder/glint360k_curricular_face_r101_backbone.bin weights/curricularface_ir101.safetensors

Reads the torch file strictly with ``tools/convert_weights/curricularface.py`` (every key and shape
checked) and writes our parameters and BatchNorm statistics with ``mm_jax.metrics.facesim_cur.save``
(safetensors, the config in its metadata), so the evaluation needs no torch. Exit 2 when the source is
absent or the destination is not a ``.safetensors`` path (nothing written).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.convert_weights import curricularface as conv  # noqa: E402


def convert(src: str | Path, dst: str | Path, config=None) -> int:
    """``src`` (.bin) -> ``dst`` (.safetensors); returns the tensor count. ``config``: a non-release
    ``CurricularFaceConfig`` (tests)."""
    from mm_jax.metrics import facesim_cur

    return facesim_cur.save(conv.load(src, config), dst)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or any(a.startswith("-") for a in argv):
        print(f"usage: python tools/convert_weights/curricularface_save.py PATH/{conv.FILE_NAME} OUT.safetensors",
              file=sys.stderr)
        return 2
    src, dst = Path(argv[0]), Path(argv[1])
    if not src.is_file():
        print(f"{src}: no such file (ConsisID publishes it as face_encoder/{conv.FILE_NAME})", file=sys.stderr)
        return 2
    if dst.suffix != ".safetensors":
        print(f"{dst}: the destination must end in .safetensors", file=sys.stderr)
        return 2
    dst.parent.mkdir(parents=True, exist_ok=True)
    n = convert(src, dst)
    print(f"wrote {dst}: {n} tensors of CurricularFace IR-101")
    return 0


if __name__ == "__main__":
    sys.exit(main())
