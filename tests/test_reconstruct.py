"""`uika reconstruct`: face framing of photos, the avatar against a direct forward pass,
the view mask's padding, the coverage picture, video input and every bad-input message.

The checkpoint is the session's tiny run (`training_fixtures.shared_run`, 32 x 32 images,
3 views); the photos are renders of the built-in synthetic head at 256 pixels.
"""

import json
import shutil

import numpy as np
import pytest
import training_fixtures as tf
from PIL import Image

from uika_jax.data.framing import crop_square
from uika_jax.evaluation.trained_model import load_trained_model
from uika_jax.head.uv_raster import uv_rasterize
from uika_jax.synthetic.head import synthetic_head_model
from uika_jax.synthetic.views import BACKGROUND, render_identity
from uika_jax.tools import cli, coverage_png
from uika_jax.tools.avatar_file import read_avatar
from uika_jax.tools.photo_inputs import FaceFramer, SourceImage, frame_inputs, head_crop, read_photo
from uika_jax.video import write_video

pytest.importorskip("dlib")

SIZE = 256
VIEWS = ((0.0, 0.0), (-25.0, 0.0), (25.0, 0.0))
"""The photos: identity 3 from the front and 25 degrees to each side."""

FIELDS = ("means", "offsets", "quats", "log_scales", "opacity_logits", "colors")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, worker_id) -> tf.SharedRun:
    return tf.shared_run(tmp_path_factory, worker_id)


@pytest.fixture(scope="module")
def renders() -> list[tuple[np.ndarray, np.ndarray]]:
    """(image uint8 (256, 256, 3), head mask bool) per view."""
    model = synthetic_head_model()
    out = []
    for yaw, pitch in VIEWS:
        render = render_identity(model, 3, yaw_deg=yaw, pitch_deg=pitch, size=SIZE)
        image = np.round(np.clip(np.asarray(render.image), 0, 1) * 255).astype(np.uint8)
        out.append((image, np.asarray(render.mask, bool)))
    return out


@pytest.fixture(scope="module")
def photos(renders, tmp_path_factory):
    """A folder with the renders as view0.png .. view2.png."""
    folder = tmp_path_factory.mktemp("photos")
    for k, (image, _) in enumerate(renders):
        Image.fromarray(image).save(folder / f"view{k}.png")
    return folder


@pytest.fixture(scope="module")
def model(trained_run):
    return load_trained_model(trained_run.workdir)


@pytest.fixture(scope="module")
def framer(model):
    return FaceFramer(int(model.config.model.image_size))


def reconstruct(capsys, *argv) -> tuple[int, str, str]:
    """Runs `uika reconstruct argv...`; (exit status, stdout, stderr)."""
    code = cli.main(["reconstruct", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def framed_photo(framer: FaceFramer, path) -> np.ndarray:
    """A photo file framed as `uika reconstruct` frames it."""
    return framer.frame(SourceImage(str(path), read_photo(path))).image


def direct_forward(model, views: list[np.ndarray], padding: np.ndarray | None = None):
    """The model's output on views padded by hand to num_views (padding: what fills the
    padded slots, zeros by default)."""
    num_views = int(model.config.model.num_views)
    size = views[0].shape[0]
    images = np.zeros((1, num_views, size, size, 3), np.float32)
    if padding is not None:
        images[0, len(views) :] = padding
    for k, view in enumerate(views):
        images[0, k] = view.astype(np.float32) / 255.0
    mask = np.zeros((1, num_views), bool)
    mask[0, : len(views)] = True
    return model.reconstruct_fn()(images, mask)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def shrink_off_centre(image, mask, scale: float, canvas: int, at: tuple[int, int]):
    """The picture (and its mask) shrunk by `scale` and pasted at (left, top) on a larger
    canvas of the background colour: a photo framed smaller and off-centre."""
    side = round(SIZE * scale)
    small = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.LANCZOS))
    small_mask = np.asarray(
        Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side), Image.Resampling.BILINEAR)
    )
    background = np.round(np.asarray(BACKGROUND) * 255).astype(np.uint8)
    big = np.tile(background, (canvas, canvas, 1))
    big_mask = np.zeros((canvas, canvas), np.uint8)
    left, top = at
    big[top : top + side, left : left + side] = small
    big_mask[top : top + side, left : left + side] = small_mask
    return big, big_mask


def test_framing_recovers_the_head_of_a_shrunk_off_centre_photo(renders):
    framer = FaceFramer(SIZE)
    for image, mask in renders:
        for scale, canvas, at in (
            (1.0, SIZE, (0, 0)),
            (0.6, 420, (30, 190)),
            (0.8, 360, (140, 20)),
        ):
            big, big_mask = shrink_off_centre(image, mask, scale, canvas, at)
            landmarks = framer.landmarks(big)
            assert landmarks is not None
            crop = head_crop(landmarks)
            recovered = crop_square(big_mask, crop, SIZE, is_mask=True) > 127
            assert iou(recovered, mask) > 0.8, (scale, at, iou(recovered, mask))
            # the square's side within 15% of the true one (the render's, scaled)
            assert abs(crop.side / (SIZE * scale) - 1) < 0.15


def test_avatar_equals_a_direct_forward_pass_on_two_padded_photos(
    trained_run, model, framer, photos, tmp_path, capsys
):
    files = [photos / "view0.png", photos / "view2.png"]
    out = tmp_path / "two.npz"
    code, stdout, stderr = reconstruct(capsys, *files, "--ckpt", trained_run.workdir, "--out", out)
    assert code == 0, stderr
    assert "from 2 view(s)" in stdout
    avatar = read_avatar(out)
    views = [framed_photo(framer, f) for f in files]
    direct = direct_forward(model, views).gaussians
    for name in FIELDS:
        np.testing.assert_allclose(
            getattr(avatar, name), np.asarray(getattr(direct, name))[0], atol=1e-5, err_msg=name
        )
    assert avatar.fingerprint == model.fingerprint
    assert avatar.config["model"]["num_views"] == 3
    np.testing.assert_array_equal(avatar.anchors.texels, np.asarray(model.anchors.texels))
    # the mask really masks: noise in the padded slot changes nothing
    noisy = direct_forward(model, views, np.random.default_rng(0).random((32, 32, 3))).gaussians
    for name in FIELDS:
        np.testing.assert_allclose(
            np.asarray(getattr(noisy, name)), np.asarray(getattr(direct, name)), atol=1e-5
        )
    # ... while a third real view changes the avatar
    three = direct_forward(model, [*views, views[0][:, ::-1].copy()]).gaussians
    assert not np.allclose(np.asarray(three.colors), np.asarray(direct.colors), atol=1e-4)


def test_coverage_picture_shows_inputs_and_the_views_per_texel(
    trained_run, model, framer, photos, tmp_path, capsys
):
    out = tmp_path / "avatar.npz"
    code, stdout, stderr = reconstruct(capsys, photos, "--ckpt", trained_run.workdir, "--out", out)
    assert code == 0, stderr
    picture = np.asarray(Image.open(tmp_path / "avatar.png").convert("RGB"))
    views = [framed_photo(framer, photos / f"view{k}.png") for k in range(3)]
    reprojection = direct_forward(model, views).reprojection
    hits = np.asarray(reprojection.hits[0])
    # coverage counted independently: views with at least one face pixel in the texel
    counts = (hits > 0).sum(0)
    np.testing.assert_array_equal(np.asarray(reprojection.n_views[0]), counts)
    resolution = counts.shape[0]
    (height, width), boxes = coverage_png.figure_layout(3, resolution)
    assert picture.shape == (height, width, 3)
    assert set(boxes) == {"input 1", "input 2", "input 3", *coverage_png.MAP_PANELS}
    for k in range(3):  # the inputs as framed, enlarged
        box = boxes[f"input {k + 1}"]
        shown = picture[box.top : box.top + box.height, box.left : box.left + box.width]
        enlarged = np.asarray(Image.fromarray(views[k]).resize((box.width, box.height), 0))
        np.testing.assert_array_equal(shown, enlarged)
    on_layout = np.asarray(uv_rasterize(model.head, resolution).mask)
    box = boxes[coverage_png.MAP_PANELS[1]]
    texel = box.height // resolution
    centres = box.top + texel // 2 + texel * np.arange(resolution)
    shown = picture[centres][:, box.left + texel // 2 + texel * np.arange(resolution)]
    unseen = on_layout & (counts == 0)
    assert unseen.any() and (on_layout & (counts > 0)).any()
    assert np.all(shown[unseen] == coverage_png.UNSEEN_COLOUR)
    want = coverage_png.coverage_colours(counts, 3)
    np.testing.assert_array_equal(shown[on_layout], want[on_layout])
    off_colours = {tuple(c) for c in shown[~on_layout].tolist()}
    assert off_colours <= set(coverage_png.OFF_LAYOUT)
    seen = (counts[on_layout] > 0).mean()
    assert f"{100 * seen:.0f}% of the head's texels seen" in stdout


def test_a_video_is_subsampled_to_the_models_views(trained_run, renders, framer, tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    frames = [renders[k % 3][0] for k in range(7)]
    assert write_video(video, frames) == 7
    framed = frame_inputs([video], framer, max_views=3)
    assert len(framed.views) == 3 and not framed.no_face
    assert [v.name for v in framed.views] == [f"{video} (kept frame {k} of 3)" for k in (1, 2, 3)]
    every_third = frame_inputs([video], framer, max_views=3, every=3)  # frames 0, 3, 6
    for view in every_third.views:
        np.testing.assert_allclose(
            view.image.astype(float).mean(), framed.views[0].image.astype(float).mean(), atol=2
        )
    out, picture = tmp_path / "video.npz", tmp_path / "pictures" / "video_coverage.png"
    picture.parent.mkdir()
    code, stdout, stderr = reconstruct(
        capsys, video, "--ckpt", trained_run.workdir, "--out", out, "--coverage", picture
    )
    assert code == 0, stderr
    assert "from 3 view(s)" in stdout and out.is_file() and picture.is_file()
    assert not (tmp_path / "video.png").exists()


def assert_one_line_error(code: int, stdout: str, stderr: str, *fragments: str) -> None:
    assert code == 2 and stdout == ""
    line = stderr.strip()
    assert "\n" not in line and "Traceback" not in line, stderr
    assert line.startswith("uika reconstruct: ")
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_bad_inputs_give_one_line_messages_naming_them(trained_run, photos, tmp_path, capsys):
    run = ("--ckpt", trained_run.workdir, "--out", tmp_path / "a.npz")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    assert_one_line_error(*reconstruct(capsys, empty, *run), str(empty), "holds no photos")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png" * 20)
    assert_one_line_error(*reconstruct(capsys, junk, *run), str(junk), "not a readable image")
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(grey)
    assert_one_line_error(*reconstruct(capsys, grey, *run), f"no face found in {grey}")
    missing = tmp_path / "no_run"
    assert_one_line_error(
        *reconstruct(capsys, photos, "--ckpt", missing, "--out", tmp_path / "a.npz"),
        f"--ckpt {missing}: no such folder",
    )
    assert_one_line_error(*reconstruct(capsys, tmp_path / "nope.jpg", *run), "nope.jpg: no such")
    assert_one_line_error(
        *reconstruct(capsys, photos, *run, "--max-views", 4), "--max-views 4", "1 to 3 views"
    )
    assert_one_line_error(
        *reconstruct(capsys, photos, *run, "--step", 99), "no checkpoint 99", "checkpoints"
    )
    assert_one_line_error(
        *reconstruct(capsys, photos, *run, "--coverage", tmp_path / "a.npz"),
        "is the avatar file (--out)",
    )
    assert not (tmp_path / "a.npz").exists()
    # a picture without a face among others is skipped with a warning naming it
    code, stdout, stderr = reconstruct(capsys, grey, photos / "view0.png", *run)
    assert code == 0, stderr
    assert f"no face found in 1 picture(s), skipped: {grey}" in stderr
    assert "from 1 view(s)" in stdout


def test_a_checkpoint_of_another_head_model_is_refused(trained_run, photos, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run.workdir / "checkpoints", run / "checkpoints")
    changed = 0
    for meta in (run / "checkpoints").glob("*/meta/*"):
        try:
            data = json.loads(meta.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and "fingerprint" in data:
            data["fingerprint"] = "another-head"
            meta.write_text(json.dumps(data))
            changed += 1
    assert changed
    result = reconstruct(capsys, photos, "--ckpt", run, "--out", tmp_path / "a.npz")
    assert_one_line_error(*result, "another-head", str(run / "checkpoints"))
