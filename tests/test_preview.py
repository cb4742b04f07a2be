"""The synthetic head reads as a face to an off-the-shelf detector; the preview CLI works.

The detector is dlib's HOG frontal face detector (`dlib-bin` ships its weights);
it must find the face in at least 90% of frontal renders of random identities
on random backgrounds, with the box around the face, and must stay silent on
images without a face (a blank or noisy image, the background alone, the back
of the head).
"""

import numpy as np
import pytest
from conftest import require_oracle
from PIL import Image

from uika_jax.render.camera import HEAD_FRACTION, project, world_to_camera
from uika_jax.synthetic import mesh as mesh
from uika_jax.synthetic.head import (
    framing_landmarks,
    identity_coefficients,
    synthetic_head_model,
    synthetic_layout,
)
from uika_jax.synthetic.preview import COLUMNS, main
from uika_jax.synthetic.views import identity_camera, render_identity

NUM_IDENTITIES = 12
SIZE = 256


@pytest.fixture(scope="module")
def detector():
    dlib = require_oracle("dlib")
    return dlib.get_frontal_face_detector()


@pytest.fixture(scope="module")
def model():
    return synthetic_head_model()


def _background(seed: int) -> np.ndarray:
    """A mild random background: a vertical gradient between two colours, plus noise."""
    rng = np.random.default_rng([seed, 7])
    top, bottom = rng.uniform(0.15, 0.95, size=(2, 3))
    t = np.linspace(0.0, 1.0, SIZE)[:, None, None]
    noise = rng.normal(0.0, 0.02, size=(SIZE, SIZE, 3))
    return np.clip(top * (1.0 - t) + bottom * t + noise, 0.0, 1.0)


def _photo(model, seed: int, **kwargs) -> np.ndarray:
    render = render_identity(model, seed, size=SIZE, **kwargs)
    image = np.where(np.asarray(render.mask)[..., None], render.image, _background(seed))
    return np.round(image * 255.0).astype(np.uint8)


def _face_centre(model, seed: int) -> np.ndarray:
    """Image position (x, y) halfway between the eyes' midpoint and the mouth."""
    layout, _ = synthetic_layout()
    shape = identity_coefficients(seed, model.num_shape)
    vertices = model.v_template + model.shapedirs @ shape
    eyes = (model.j_regressor @ vertices)[3:].mean(0)
    mouth = vertices[layout.grid[layout.mouth_row, mesh.NUM_COLUMNS // 2]]
    viewmat, K = identity_camera(model, shape, SIZE)
    return np.asarray(project(world_to_camera(0.5 * (eyes + mouth), viewmat), K))


def test_face_detector_finds_the_synthetic_faces(detector, model):
    found = []
    for seed in range(NUM_IDENTITIES):
        x, y = _face_centre(model, seed)
        boxes = detector(_photo(model, seed), 1)
        on_face = [
            b
            for b in boxes
            if b.left() <= x <= b.right()
            and b.top() <= y <= b.bottom()
            and 0.25 * SIZE <= b.width() <= 0.8 * SIZE
        ]
        found.append(len(on_face) > 0)
    assert np.mean(found) >= 0.9, f"faces found in {sum(found)} of {NUM_IDENTITIES} identities"


def test_face_detector_stays_silent_without_a_face(detector, model):
    rng = np.random.default_rng(0)
    blank = np.full((SIZE, SIZE, 3), 200, np.uint8)
    noise = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    background = np.round(_background(1) * 255.0).astype(np.uint8)
    back_of_head = _photo(model, 1, yaw_deg=180.0)
    for image in (blank, noise, background, back_of_head):
        assert len(detector(image, 1)) == 0


def test_render_identity_follows_the_face_framing(model):
    size = 128
    render = render_identity(model, 5, size=size)
    np.testing.assert_array_equal(render.image, render_identity(model, 5, size=size).image)
    shape = identity_coefficients(5, model.num_shape)
    vertices = model.v_template + model.shapedirs @ shape
    viewmat, K = identity_camera(model, shape, size)
    crown, chin = np.asarray(
        project(world_to_camera(vertices[list(framing_landmarks())], viewmat), K)
    )
    assert abs((chin[1] - crown[1]) / size - HEAD_FRACTION) < 0.01
    assert abs(0.5 * (chin[1] + crown[1]) / size - 0.5) < 0.02 and abs(crown[0] / size - 0.5) < 0.01
    rows = np.nonzero(np.asarray(render.mask).any(axis=1))[0]
    assert abs(rows[0] - crown[1]) <= 1.5  # the crown is the top of the silhouette
    face = (vertices[:, 2] > 0.04) & (vertices[:, 1] > -0.12)
    assert vertices[framing_landmarks()[1], 1] - vertices[face, 1].min() < 0.002  # chin bottom


def test_cli_writes_a_contact_sheet(tmp_path, capsys):
    out = tmp_path / "sheet" / "head.png"
    with pytest.raises(SystemExit):  # a missing folder is refused, not created
        main(["--out", str(out), "--identities", "2", "--size", "48"])
    assert not out.parent.exists()
    out.parent.mkdir()
    main(["--out", str(out), "--identities", "2", "--size", "48"])
    sheet = np.asarray(Image.open(out))
    assert sheet.shape == (2 * 48, len(COLUMNS) * 48, 3)
    assert sheet.std() > 10  # not blank
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--identities", "0"])
