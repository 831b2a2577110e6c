"""``mm_jax.consisid_face`` gives the images of diffusers' ``consisid_utils.process_face_embeddings``
(facexlib's FaceRestoreHelper with RetinaFace-R50 and BiSeNet, random weights converted to ours)
on a real photo: the landmarks, the FFHQ-512 crop, the colour face on white (the pipeline's
``image``) and the greyscale face on white (the EVA-CLIP input, caught before its resize)."""
import numpy as np
import pytest

from tests.torch_refs import facexlib_nets as nets

pytestmark = pytest.mark.slow  # ~40 s of CPU: a full-size ResNet-50 in torch and in JAX


@pytest.fixture(scope="module")
def runs():
    import cv2
    import torch
    import facexlib.detection.retinaface as fx_rf
    import facexlib.utils.face_restoration_helper as frh
    from diffusers.pipelines.consisid import consisid_utils as cu

    from mm_jax import consisid_face as cf

    bgr = nets.photo("Tom_Hanks_54745.png")
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    det_ref = nets.retinaface_ref(bgr)
    big = cv2.resize(rgb, (512, 512), interpolation=cv2.INTER_CUBIC) / 255.0
    x = torch.from_numpy(((big - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).astype(np.float32).transpose(2, 0, 1))
    parse_ref = nets.bisenet_ref(x[None])

    mp = pytest.MonkeyPatch()
    caught = {}
    real_resize, real_process = cu.resize, cu.process_face_embeddings

    def resize_spy(img, *a, **k):
        caught["grey"] = img.clone()
        return real_resize(img, *a, **k)

    def process_spy(*a, **k):
        caught["out"] = real_process(*a, **k)
        return caught["out"]

    class App:  # insightface's antelopev2: not part of this comparison
        def get(self, img):
            return [{"bbox": np.array([0.0, 0.0, 10.0, 10.0]), "embedding": np.zeros(512, np.float32),
                     "kps": np.zeros((5, 2), np.float32)}]

    class Eva:  # EVA-CLIP: only its input is compared here
        image_size = 336

        def __call__(self, x, **kwargs):
            return torch.ones(1, 768), []

    try:
        mp.setattr(frh, "init_detection_model", lambda *a, **k: det_ref)
        mp.setattr(frh, "init_parsing_model", lambda *a, **k: None)
        mp.setattr(fx_rf, "py_cpu_nms", nets.torchvision_nms)  # torchvision.ops.nms cannot load here
        mp.setattr(cu, "resize", resize_spy)
        mp.setattr(cu, "process_face_embeddings", process_spy)
        helper = frh.FaceRestoreHelper(upscale_factor=1, face_size=512, crop_ratio=(1, 1),
                                       det_model="retinaface_resnet50", save_ext="png", device="cpu")
        helper.face_parse = parse_ref
        with torch.no_grad():
            _, _, image, _ = cu.process_face_embeddings_infer(helper, Eva(), None, (0.5,) * 3, (0.5,) * 3, App(),
                                                              "cpu", torch.float32, rgb, True)
    finally:
        mp.undo()
    detector, parser = nets.converted("retinaface", det_ref), nets.converted("bisenet", parse_ref)
    want = dict(landmarks=helper.all_landmarks_5[0], crop=helper.cropped_faces[0],
                colour=caught["out"][2][0].numpy().transpose(1, 2, 0), grey=caught["grey"][0].numpy().transpose(1, 2, 0),
                image=np.asarray(image))
    ours = cf.prepare_face(detector, parser, rgb)
    colour, grey = cf.parse_to_white(parser, want["crop"])  # our parsing on the reference's crop
    return want, ours, dict(colour=colour, grey=grey, crop=cf.align_face(bgr, want["landmarks"]))


def test_alignment_of_the_reference_landmarks_is_exact(runs):
    want, _, on_ref = runs
    np.testing.assert_array_equal(on_ref["crop"], want["crop"])


def test_parsing_to_white_and_grey_of_the_reference_crop_are_exact(runs):
    from mm_jax.consisid_face import to_uint8

    want, _, on_ref = runs
    white = (want["colour"] == 1).all(-1).mean()
    print("white fraction", white)
    assert 0.1 < white < 0.9  # the random parser puts both sides of the mask in the picture
    np.testing.assert_array_equal(on_ref["colour"], want["colour"])
    np.testing.assert_array_equal(on_ref["grey"], want["grey"])
    np.testing.assert_array_equal(to_uint8(on_ref["colour"]), want["image"])


def test_prepare_face_matches_consisid_utils_end_to_end(runs):
    # our detector's heads differ from facexlib's by ~1e-6 relative, which moves the landmarks by
    # ~1e-5 px; cv2's fixed-point bilinear warp then rounds a few crop pixels the other way
    want, ours, _ = runs
    lm_err = np.abs(ours.landmarks - want["landmarks"]).max()
    crop_diff = np.abs(ours.crop_bgr.astype(int) - want["crop"]).max(-1)
    off = {k: int((np.abs(getattr(ours, k) - want[k]).max(-1) > 1e-5).sum()) for k in ("colour", "grey")}
    image_off = int((ours.image != want["image"]).any(-1).sum())
    print(f"landmarks max abs err {lm_err:.2e} px; crop pixels off by one level {int((crop_diff > 0).sum())}; "
          f"colour/grey/image pixels off {off['colour']}/{off['grey']}/{image_off} of {crop_diff.size}")
    assert lm_err <= 1e-3
    assert crop_diff.max() <= 1 and (crop_diff > 0).mean() <= 0.005
    assert max(off.values()) / crop_diff.size <= 0.005 and image_off / crop_diff.size <= 0.005
