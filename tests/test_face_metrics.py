"""Face metrics (CSIM, AKD, APD, AED) and their backends, on renders of the synthetic head.

The backends (dlib + face-recognition-models, OpenCV, onnx / onnxruntime) come with
the `eval` extra; without them these tests skip, and under UIKA_REQUIRE_ORACLES=1
they fail. Renders are 256 px, shared by the module.
"""

import dataclasses
import os

import jax
import numpy as np
import pytest
from conftest import require_oracle

from uika_jax.evaluation import face_metrics as fm
from uika_jax.evaluation import face_models, head_pose
from uika_jax.head.lbs import flame_forward
from uika_jax.head.model import ModelFingerprint
from uika_jax.synthetic.head import identity_coefficients, synthetic_head_model
from uika_jax.synthetic.views import BACKGROUND, identity_camera, render_identity

SIZE = 256
YAW_DEG = 20.0


@pytest.fixture(scope="module")
def dlib_models():
    require_oracle("cv2")
    try:
        return face_models.DlibFaceModels()
    except face_models.FaceBackendError as e:
        if os.environ.get("UIKA_REQUIRE_ORACLES") == "1":
            pytest.fail(f"the dlib face backend is required (UIKA_REQUIRE_ORACLES=1): {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def model():
    return synthetic_head_model()


@pytest.fixture(scope="module")
def renders(model):
    """{name: (256, 256, 3) float image}: identity 0 frontal and turned, identity 4 frontal."""
    views = {"frontal": (0, 0.0), "turned": (0, YAW_DEG), "other": (4, 0.0)}
    return {
        name: np.asarray(render_identity(model, seed, yaw_deg=yaw, size=SIZE).image)
        for name, (seed, yaw) in views.items()
    }


@pytest.fixture(scope="module")
def embedding(model, dlib_models):
    return head_pose.synthetic_landmark_embedding(model, dlib_models)


@pytest.fixture(scope="module")
def landmark_points(model, embedding):
    return head_pose.landmark_points(embedding, model)


def _shift(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The image moved right by dx and down by dy pixels, uncovered pixels the background."""
    out = np.empty_like(image)
    out[...] = np.asarray(BACKGROUND, image.dtype)
    height, width = image.shape[:2]
    out[dy:, dx:] = image[: height - dy, : width - dx]
    return out


def _blank() -> np.ndarray:
    return np.broadcast_to(np.asarray(BACKGROUND, np.float32), (SIZE, SIZE, 3)).copy()


def test_detects_the_synthetic_face_and_counts_a_blank_image_as_failed(renders, dlib_models):
    observed = fm.observe_faces([renders["frontal"], _blank()], dlib_models)
    face, blank = observed
    assert blank is None
    assert face is not None and face.landmarks.shape == (68, 2)
    # Landmarks inside the framed face: eyes above the mouth, the nose tip between the eyes.
    eyes_y, mouth_y = face.landmarks[36:48, 1].mean(), face.landmarks[48:68, 1].mean()
    assert 0.25 * SIZE < eyes_y < mouth_y < 0.85 * SIZE
    assert face.landmarks[36, 0] < face.landmarks[30, 0] < face.landmarks[45, 0]

    backends = fm.FaceBackends(dlib_models)
    predictions = np.stack([renders["frontal"], _blank(), renders["frontal"]])
    references = np.stack([renders["frontal"], renders["frontal"], _blank()])
    metrics = fm.face_metrics(predictions, references, backends)
    for metric in metrics.values():
        assert metric.total == 3 and metric.detected_pairs == 1
        assert metric.failed_prediction == 1 and metric.failed_reference == 1
        assert metric.detection_rate == pytest.approx(1 / 3)
    csim = metrics["CSIM"]
    assert np.isnan(csim.values[1:]).all() and csim.valid == 1
    assert csim.mean == pytest.approx(1.0, abs=1e-6)
    assert csim.as_dict()["values"][1] is None
    assert "dlib" in csim.backend and "1/3 pairs" in fm.summary_text(csim)
    assert metrics["APD"].mean is None and metrics["APD"].backend.startswith("n/a")
    assert metrics["AED"].mean is None and "n/a" in fm.summary_text(metrics["AED"])


def test_csim_is_one_for_the_same_image_and_lower_for_another_identity(renders, dlib_models):
    """dlib's embedding scores the same synthetic head seen 20 degrees apart at about 0.98,
    two synthetic identities at 0.90-0.96 (they share one base sculpt)."""
    names = ["frontal", "frontal", "turned", "other"]
    observed = fm.observe_faces([renders[name] for name in names], dlib_models)
    values = fm.csim(observed[:1] * 3, observed[1:], dlib_models).values
    same_image, same_identity, other_identity = values
    assert same_image == pytest.approx(1.0, abs=1e-6)
    assert other_identity < same_identity - 0.04
    assert other_identity < 0.95


@pytest.mark.parametrize("downsample", [1, 2])
def test_akd_of_a_shifted_image_is_the_shift_in_input_pixels(renders, dlib_models, downsample):
    cv2 = require_oracle("cv2")

    image = renders["frontal"]
    if downsample > 1:  # a 128 px input: detection upsamples it, AKD is in 128 px units
        small = SIZE // downsample
        image = cv2.resize(image, (small, small), interpolation=cv2.INTER_AREA)
    dx, dy = 6 // downsample, 4 // downsample
    shifted = _shift(image, dx, dy)
    metric = fm.face_metrics(shifted[None], image[None], fm.FaceBackends(dlib_models))["AKD"]
    assert metric.unit == f"px at {image.shape[0]}x{image.shape[1]}"
    assert metric.mean == pytest.approx(np.hypot(dx, dy), abs=0.6 / downsample + 0.2)


def test_pnp_recovers_a_known_head_pose(landmark_points):
    cv2 = require_oracle("cv2")

    rng = np.random.default_rng(0)
    K = fm.default_intrinsics(SIZE, SIZE)
    rotation = cv2.Rodrigues(np.deg2rad([-8.0, 17.0, 5.0]))[0]
    translation = np.array([0.01, -0.015, 0.75])
    camera_points = landmark_points @ rotation.T + translation
    pixels = camera_points[:, :2] / camera_points[:, 2:] * K[0, 0] + K[:2, 2]
    noisy = pixels + rng.normal(0.0, 0.5, pixels.shape)
    solved, solved_translation, rms = head_pose.solve_head_pose(noisy, landmark_points, K)
    assert head_pose.rotation_angle_deg(solved, rotation) < 1.0
    np.testing.assert_allclose(solved_translation, translation, atol=0.03)
    assert rms < 1.0
    identity = np.eye(3)
    assert head_pose.rotation_angle_deg(rotation, identity) == pytest.approx(
        np.degrees(np.linalg.norm(np.deg2rad([-8.0, 17.0, 5.0]))), abs=1e-6
    )


def test_apd_between_renders_yawed_apart_is_the_yaw(tmp_path, renders, embedding, model):
    """Through `build_face_backends` with a FLAME-layout file holding the measured embedding."""
    np.savez(
        tmp_path / "embedding.npz",
        lmk_face_idx=embedding.face_ids,
        lmk_b_coords=embedding.barycentrics,
    )
    backends = fm.build_face_backends(model, landmark_embedding=tmp_path / "embedding.npz")
    _, K = identity_camera(model, np.zeros(model.num_shape, np.float32), SIZE)
    predictions = np.stack([renders["turned"], renders["frontal"]])
    references = np.stack([renders["frontal"], renders["frontal"]])
    apd = fm.face_metrics(predictions, references, backends, K=K)["APD"]
    assert "embedding.npz" in apd.backend and apd.unit == "degrees"
    assert apd.values[0] == pytest.approx(YAW_DEG, abs=4.0)
    assert apd.values[1] == pytest.approx(0.0, abs=1e-3)


def test_build_face_backends_measures_the_synthetic_embedding_only_for_the_synthetic_head(
    model, embedding, dlib_models
):
    backends = fm.build_face_backends(model)
    np.testing.assert_allclose(backends.points, head_pose.landmark_points(embedding, model))
    assert "synthetic head" in backends.pose_source
    assert backends.identity is None and backends.expression is None
    flame = dataclasses.replace(model, fingerprint=ModelFingerprint("flame2020", "0", "0"))
    assert fm.build_face_backends(flame).points is None


def test_the_synthetic_embedding_reprojects_onto_a_turned_head(
    renders, dlib_models, embedding, model
):
    """Independent of PnP: the embedded points on identity 0's mesh, projected with the
    turned view's true camera, land on dlib's detections in that view."""
    shape = identity_coefficients(0, model.num_shape)
    zero_pose = np.zeros((5, 3), np.float32)
    expression = np.zeros(model.num_expression, np.float32)
    vertices = np.asarray(jax.jit(flame_forward)(model, shape, expression, zero_pose)[0])
    points = embedding.points(vertices, model.faces)
    viewmat, K = identity_camera(model, shape, SIZE, YAW_DEG)
    camera_points = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    projected = camera_points[:, :2] / camera_points[:, 2:] * K[0, 0] + K[:2, 2]
    detected = fm.observe_faces([renders["turned"]], dlib_models)[0].landmarks
    inner = list(head_pose.POSE_LANDMARKS)
    errors = np.linalg.norm(projected[inner] - detected[inner], axis=1)
    assert np.median(errors) < 3.0, errors


def _linear_onnx(path, size: int, dim: int, layout: str = "NCHW", seed: int = 0) -> np.ndarray:
    """Writes a tiny ONNX model: an image flattened (in its layout) times a random matrix."""
    onnx = require_oracle("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(seed).normal(size=(3 * size * size, dim)).astype(np.float32)
    shape = [1, 3, size, size] if layout == "NCHW" else [1, size, size, 3]
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "weight"], ["output"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, dim])],
        initializer=[numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return weight


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_onnx_arcface_aligns_normalises_and_embeds(tmp_path, renders, dlib_models, layout):
    require_oracle("onnxruntime")
    weight = _linear_onnx(tmp_path / "arcface.onnx", 112, 8, layout)
    arcface = face_models.OnnxArcFace(
        tmp_path / "arcface.onnx", face_models.ImageInput(layout=layout)
    )
    frontal, other = fm.observe_faces([renders["frontal"], renders["other"]], dlib_models)
    crop = arcface.align(frontal.image, frontal.detected)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    # The 5 points land on insightface's template in the least-squares sense: centroids
    # agree, residuals are a few pixels (the synthetic nose tip sits lower than a real one).
    matrix = face_models.similarity_transform(
        face_models.five_points(frontal.detected), face_models.ARCFACE_TEMPLATE
    )
    five = face_models.five_points(frontal.detected) @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(five.mean(0), face_models.ARCFACE_TEMPLATE.mean(0), atol=1e-9)
    assert np.abs(five - face_models.ARCFACE_TEMPLATE).max() < 6.0
    # ArcFace's input: RGB, (x - 127.5) / 127.5, in the model's layout.
    normalised = (crop.astype(np.float32) - 127.5) / 127.5
    flat = (normalised.transpose(2, 0, 1) if layout == "NCHW" else normalised).reshape(-1)
    embedding = arcface.embed(frontal.image, frontal.detected)
    np.testing.assert_allclose(embedding, flat @ weight, rtol=1e-4, atol=1e-3)
    assert not np.allclose(embedding, (crop.reshape(-1) / 255.0) @ weight, atol=1.0)
    other_embedding = arcface.embed(other.image, other.detected)
    assert np.abs(other_embedding - embedding).max() > 1.0
    csim = fm.csim([frontal, frontal], [frontal, other], arcface)
    assert csim.backend == "ArcFace ONNX (arcface.onnx)"
    assert csim.values[0] == pytest.approx(1.0, abs=1e-6) and csim.values[1] < 0.999


def test_onnx_models_with_the_wrong_input_are_refused(tmp_path):
    require_oracle("onnxruntime")
    _linear_onnx(tmp_path / "small.onnx", 96, 4)
    with pytest.raises(ValueError, match=r"small.onnx.*not 112 x 112"):
        face_models.OnnxArcFace(tmp_path / "small.onnx")
    _linear_onnx(tmp_path / "nchw.onnx", 112, 4)
    with pytest.raises(ValueError, match=r"no 3 channels.*layout NHWC"):
        face_models.OnnxArcFace(tmp_path / "nchw.onnx", face_models.ImageInput(layout="NHWC"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"junk.onnx: not a loadable ONNX model"):
        face_models.OnnxArcFace(tmp_path / "junk.onnx")
    with pytest.raises(FileNotFoundError, match=r"missing.onnx"):
        face_models.OnnxArcFace(tmp_path / "missing.onnx")


def test_similarity_transform_matches_opencv():
    cv2 = require_oracle("cv2")

    rng = np.random.default_rng(1)
    source = rng.uniform(0, 200, (5, 2))
    angle, scale, shift = 0.3, 0.6, np.array([12.0, -7.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    target = scale * source @ rotation.T + shift
    exact = face_models.similarity_transform(source, target)
    np.testing.assert_allclose(exact, np.c_[scale * rotation, shift], atol=1e-9)
    noisy = target + rng.normal(0, 2.0, target.shape)
    reference, _ = cv2.estimateAffinePartial2D(
        source, noisy, method=cv2.RANSAC, ransacReprojThreshold=1e6, refineIters=100
    )
    np.testing.assert_allclose(
        face_models.similarity_transform(source, noisy), reference, atol=1e-4
    )


def test_aed_with_an_onnx_expression_regressor(tmp_path, renders, dlib_models):
    require_oracle("onnxruntime")
    weight = _linear_onnx(tmp_path / "expression.onnx", 32, 5, seed=2)
    regressor = face_models.OnnxExpressionRegressor(tmp_path / "expression.onnx", size=32)
    frontal, turned = fm.observe_faces([renders["frontal"], renders["turned"]], dlib_models)
    crop = regressor.crop(frontal.image, frontal.detected)
    expected = (crop.astype(np.float32) / 255.0).transpose(2, 0, 1).reshape(-1) @ weight
    np.testing.assert_allclose(
        regressor.coefficients(frontal.image, frontal.detected), expected, rtol=1e-4, atol=1e-4
    )
    aed = fm.aed([frontal, turned, None], [frontal, frontal, frontal], regressor)
    assert aed.backend == "expression ONNX (expression.onnx)"
    assert aed.values[0] == pytest.approx(0.0, abs=1e-9) and aed.values[1] > 0.0
    assert aed.valid == 2 and aed.failed_prediction == 1 and aed.detection_rate == 2 / 3


def test_detection_image_upsamples_to_256_and_refuses_bad_images():
    require_oracle("cv2")
    image = np.full((100, 80, 3), 0.5, np.float32)
    upsampled, scale = face_models.detection_image(image)
    assert scale == 4.0 and upsampled.shape == (400, 320, 3) and upsampled.dtype == np.uint8
    assert upsampled[0, 0, 0] == 128
    assert face_models.detection_image(np.zeros((300, 300, 3), np.uint8))[1] == 1.0
    with pytest.raises(ValueError, match="NaN"):
        face_models.detection_image(np.full((8, 8, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        face_models.detection_image(np.zeros((8, 8), np.float32))


def test_a_missing_face_recognition_models_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(face_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(face_models.FaceBackendError, match="face-recognition-models"):
        face_models.dlib_model_dir()


def _embedding_arrays(num_faces: int = 100, points: int = 68, seed: int = 0):
    rng = np.random.default_rng(seed)
    bary = rng.uniform(0.1, 1.0, (points, 3))
    return rng.integers(0, num_faces, points), bary / bary.sum(1, keepdims=True)


def test_landmark_embedding_files_in_the_flame_layouts(tmp_path):
    ids, bary = _embedding_arrays()
    np.savez(tmp_path / "full.npz", full_lmk_faces_idx=ids[None], full_lmk_bary_coords=bary[None])
    full = head_pose.read_landmark_embedding(tmp_path / "full.npz")
    np.testing.assert_array_equal(full.face_ids, ids)
    np.testing.assert_allclose(full.barycentrics, bary)

    dynamic_ids = np.stack([ids[:17], ids[:17][::-1]] + [ids[:17]] * 77)
    dynamic_bary = np.stack([bary[:17], bary[:17][::-1]] + [bary[:17]] * 77)
    np.savez(
        tmp_path / "static_dynamic.npz",
        static_lmk_faces_idx=ids[17:],
        static_lmk_bary_coords=bary[17:],
        dynamic_lmk_faces_idx=dynamic_ids,
        dynamic_lmk_bary_coords=dynamic_bary,
    )
    combined = head_pose.read_landmark_embedding(tmp_path / "static_dynamic.npz")
    np.testing.assert_array_equal(combined.face_ids, ids)  # the frontal contour is row 0
    np.testing.assert_allclose(combined.barycentrics, bary)

    vertices = np.random.default_rng(3).normal(size=(60, 3))
    faces = np.random.default_rng(4).integers(0, 60, (100, 3))
    expected = np.stack([bary[k] @ vertices[faces[ids[k]]] for k in range(68)])
    np.testing.assert_allclose(full.points(vertices, faces), expected, atol=1e-12)
    with pytest.raises(ValueError, match="has 50 faces"):
        full.points(vertices, faces[:50])


def test_bad_landmark_embedding_files_are_refused(tmp_path):
    ids, bary = _embedding_arrays()
    np.save(tmp_path / "landmark_embedding.npy", {"full_lmk_faces_idx": ids}, allow_pickle=True)
    with pytest.raises(ValueError, match=r"pickled dict.*np.savez"):
        head_pose.read_landmark_embedding(tmp_path / "landmark_embedding.npy")
    np.savez(tmp_path / "static.npz", lmk_face_idx=ids[17:], lmk_b_coords=bary[17:])
    with pytest.raises(ValueError, match=r"static.npz.*needs 68 face ids"):
        head_pose.read_landmark_embedding(tmp_path / "static.npz")
    np.savez(tmp_path / "sums.npz", lmk_face_idx=ids, lmk_b_coords=bary * 2)
    with pytest.raises(ValueError, match="sum to 1"):
        head_pose.read_landmark_embedding(tmp_path / "sums.npz")
    np.savez(tmp_path / "negative.npz", lmk_face_idx=ids - 200, lmk_b_coords=bary)
    with pytest.raises(ValueError, match="negative face id"):
        head_pose.read_landmark_embedding(tmp_path / "negative.npz")
    np.savez(tmp_path / "other.npz", something=ids)
    with pytest.raises(ValueError, match=r"no landmark embedding layout.*something"):
        head_pose.read_landmark_embedding(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk.npz: not an .npz"):
        head_pose.read_landmark_embedding(tmp_path / "junk.npz")
