"""ConsisID's face encoder on its published ``face_encoder/`` folder: a photo -> ``ConsisIDIdentity``.

diffusers' ``consisid_utils.process_face_embeddings_infer`` step for step, with every network in JAX
but insightface's (onnxruntime, as ``mm_jax.face``), reading the folder as published
(HF ``BestWishYsh/ConsisID-preview``, ``face_encoder/``; see ``LAYOUT``) without torch:

``analyze`` (host work, before any large model is placed):
  1. the photo as RGB, EXIF-transposed; a long side over 1024 shrunk to 1024 (Lanczos-4);
  2. insightface antelopev2 at det_size 640: the largest face and its **raw** (un-normalised)
     glintr100 embedding;
  3. facexlib's RetinaFace-R50 (score > 0.97), the most central face, FFHQ-512 alignment and BiSeNet
     parsing to a white background (``mm_jax.consisid_face.prepare_face``); no face -> ``NoFaceError``;
  4. when antelopev2 found no face: glintr100 on the aligned 512 crop resized to 112 (bilinear, as
     insightface's ``get_feat`` blob), with a warning, as the reference does;
``embed``: the EVA02-CLIP vision tower on the greyscale crop (antialiased bicubic resize to its input
  size, OpenAI CLIP mean/std): the hidden states entering blocks 4, 8, 12, 16, 20 (``id_vit_hidden``)
  and the L2-normalised head vector; ``id_cond = [raw antelopev2 512 | normalised EVA 768]``; the
  pipeline's ``image`` is the colour crop on white.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from mm_jax import consisid_face as cf
from mm_jax.consisid_identity import ConsisIDIdentity
from mm_jax.face import ImageSizeError, NoFaceError

ANTELOPE = "models/antelopev2"
FILES = {  # what FaceEncoder reads, relative to the folder (parsing_parsenet.pth is published too, unused)
    "retinaface": "detection_Resnet50_Final.pth",
    "bisenet": "parsing_bisenet.pth",
    "eva_clip": "EVA02_CLIP_L_336_psz14_s6B.pt",
    "detector": f"{ANTELOPE}/scrfd_10g_bnkps.onnx",
    "recognizer": f"{ANTELOPE}/glintr100.onnx",
}
LAYOUT = """face_encoder/                          (HF BestWishYsh/ConsisID-preview, face_encoder/)
  detection_Resnet50_Final.pth         facexlib RetinaFace-R50
  parsing_bisenet.pth                  facexlib BiSeNet
  EVA02_CLIP_L_336_psz14_s6B.pt        EVA02-CLIP-L-14-336
  models/antelopev2/scrfd_10g_bnkps.onnx, glintr100.onnx   insightface antelopev2"""
ANTELOPE_DET_SIZE = 640
REC_SIZE = 112


def missing_files(folder: str | Path) -> list[str]:
    """The files of ``FILES`` that ``folder`` lacks, as relative paths."""
    folder = Path(folder)
    return [rel for rel in FILES.values() if not (folder / rel).is_file()]


def check_folder(folder: str | Path, flag: str = "--face-models") -> Path:
    """``folder`` if it holds every file ``FaceEncoder`` reads; else ``FileNotFoundError`` naming
    every missing file and the expected layout."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder}: no such folder; expected ConsisID's face folder:\n{LAYOUT}")
    missing = missing_files(folder)
    if missing:
        raise FileNotFoundError(f"{flag} {folder}: missing {', '.join(missing)}; expected ConsisID's face "
                                f"folder:\n{LAYOUT}")
    return folder


PIPELINE_FACE_FOLDER = "face_encoder"


def check_pipeline_folder(src: str | Path) -> Path | None:
    """For ConsisID's published folder (``model_index.json`` names ``ConsisIDPipeline``) that has a
    ``face_encoder/``: that folder, checked to hold every file ``FaceEncoder`` reads
    (``FileNotFoundError`` naming each missing one); ``None`` for any other folder, or one without
    ``face_encoder/`` (its face files may live elsewhere). The converter calls this before writing."""
    import json

    src = Path(src)
    index = src / "model_index.json"
    try:
        cls = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        return None  # the converter names a bad index itself
    if cls != "ConsisIDPipeline" or not (src / PIPELINE_FACE_FOLDER).exists():
        return None
    return check_folder(src / PIPELINE_FACE_FOLDER, flag=f"--src {src} (a ConsisIDPipeline folder):")


def read_photo(ref) -> tuple[np.ndarray, str]:
    """(RGB uint8 (H, W, 3) EXIF-transposed, a label) from an image path or an RGB uint8 array, as
    ``process_face_embeddings_infer`` reads it (PIL; arrays go through ``Image.fromarray`` too)."""
    from PIL import Image, ImageOps

    if isinstance(ref, np.ndarray):
        if ref.dtype != np.uint8 or ref.ndim not in (2, 3):
            raise ValueError(f"image array of dtype {ref.dtype} and shape {ref.shape}: expected RGB uint8 (H, W, 3)")
        return np.array(ImageOps.exif_transpose(Image.fromarray(ref)).convert("RGB")), "<array>"
    path = Path(ref)
    try:
        with Image.open(path) as im:
            return np.array(ImageOps.exif_transpose(im).convert("RGB")), str(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


@dataclasses.dataclass
class PreparedFace:
    """``FaceEncoder.analyze``'s result: the host-side half of the identity."""
    face: cf.ConsisIDFace     # RetinaFace detection, FFHQ crop, colour and grey faces on white
    antelope: np.ndarray      # (512,) float32 raw glintr100 embedding
    antelope_found: bool      # False: antelopev2 found no face; the embedding is of the aligned crop
    source: str


class FaceEncoder:
    """ConsisID's face models, loaded once for many photos: ``FaceEncoder(folder)(photo) ->
    ConsisIDIdentity`` (``NoFaceError`` naming the photo when RetinaFace finds no face).

    ``analyze`` runs insightface, RetinaFace and BiSeNet (small; the default device) and can check
    every reference before anything large is placed; ``embed`` runs the EVA tower, loaded at its first
    call on ``mesh`` (default: all local devices) in ``dtype``."""

    def __init__(self, face_models: str | Path, *, mesh=None, dtype: str = "float32"):
        from mm_jax.face import FaceAnalyzer

        self.folder = check_folder(face_models)
        self.mesh, self.dtype = mesh, dtype
        self.faces = FaceAnalyzer(self.folder / ANTELOPE, det_size=ANTELOPE_DET_SIZE, normalize=False)
        self._detector = self._parser = self._eva = None

    def _nets(self):
        from mm_jax import face_weights as fw

        if self._detector is None:
            self._detector = fw.load_facexlib("retinaface", self.folder / FILES["retinaface"])
            self._parser = fw.load_facexlib("bisenet", self.folder / FILES["bisenet"])
        return self._detector, self._parser

    @property
    def eva(self):
        """The EVA vision tower (loaded and placed on the first use)."""
        if self._eva is None:
            from mm_jax import face_weights as fw
            from mm_jax import parallel

            tower = fw.load_eva(self.folder / FILES["eva_clip"], self.dtype)
            self._eva = parallel.shard_module(tower, self.mesh or parallel.make_mesh())
        return self._eva

    def _antelope(self, rgb: np.ndarray, label: str) -> np.ndarray | None:
        """The raw glintr100 embedding of antelopev2's largest face, None when it finds none. Ties in
        area go as in ``FaceAnalysis.get`` + ``sorted(..., key=area)[-1]``: the last in detection order."""
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        try:
            boxes, kps = self.faces.detect(bgr)
        except ImageSizeError as e:
            raise ImageSizeError(f"{label}: {e}") from None
        if len(boxes) == 0:
            return None
        areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
        i = sorted(range(len(boxes)), key=lambda j: areas[j])[-1]
        if len(boxes) > 1:
            warnings.warn(f"{len(boxes)} faces found in {label} by antelopev2; using the largest", stacklevel=3)
        return self.faces.embed_crops([self.faces.align(bgr, kps[i], self.faces.models.rec_size)])[0]

    def analyze(self, ref) -> PreparedFace:
        """Steps 1-4 of the module docstring for ``ref`` (an image path or an RGB uint8 array)."""
        import cv2

        rgb, label = read_photo(ref)
        try:
            rgb = cf.resize_long_side(rgb, cf.MAX_LONG_SIDE)
        except ImageSizeError as e:
            raise ImageSizeError(f"{label}: {e}") from None
        antelope = self._antelope(rgb, label)
        found = antelope is not None
        detector, parser = self._nets()
        try:
            face = cf.prepare_face(detector, parser, rgb)
        except NoFaceError as e:
            raise NoFaceError(f"{label}: {e}") from None
        if not found:
            warnings.warn(f"{label}: insightface antelopev2 found no face; embedding the aligned RetinaFace crop "
                          "instead, as ConsisID does", stacklevel=2)
            small = cv2.resize(face.crop_bgr, (REC_SIZE, REC_SIZE), interpolation=cv2.INTER_LINEAR)
            antelope = self.faces.embed_crops([small])[0]
        return PreparedFace(face, np.asarray(antelope, np.float32), found, label)

    def embed(self, prepared: PreparedFace) -> ConsisIDIdentity:
        """The EVA tower on ``prepared``'s grey face -> the identity (every process of a multi-process
        run makes this call and gets the whole result)."""
        from mm_jax.gather import to_host
        from mm_jax.models.eva_clip import preprocess

        eva = self.eva
        pixels = preprocess(prepared.face.grey[None], eva.cfg.image_size)
        feats, hidden = _eva_forward(eva, pixels)
        feats = to_host(feats).astype(np.float32)
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        id_cond = np.concatenate([prepared.antelope[None], feats], axis=1)
        return ConsisIDIdentity(prepared.face.image, id_cond, to_host(hidden).astype(np.float32),
                                source=prepared.source)

    def __call__(self, ref) -> ConsisIDIdentity:
        return self.embed(self.analyze(ref))


# float32 matmuls on every backend, as the reference's float32 tower (TPU defaults to one bf16 pass)
@nnx.jit
def _eva_forward(eva, pixels):
    with jax.default_matmul_precision("highest"):
        return eva(pixels)
