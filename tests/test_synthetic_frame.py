"""Synthetic frames: backgrounds, lights and shading, shadows, the rig, anti-aliasing, UV maps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uika_jax.head.uv_raster import corner_image_uv
from uika_jax.render.mesh_render import render_mesh, sample_texture
from uika_jax.synthetic.backgrounds import background_image
from uika_jax.synthetic.frame import (
    ExtraMeshes,
    FrameOptions,
    FrameParams,
    Identity,
    Scene,
    render_frame,
)
from uika_jax.synthetic.head import framing_landmarks, identity_coefficients, synthetic_head_model
from uika_jax.synthetic.lighting import (
    DIFFUSE_WRAP,
    MAX_LIGHTS,
    Lights,
    ambient_lights,
    sample_lights,
    shade,
    shadow_maps,
    shadow_visibility,
    to_display,
    to_linear,
)
from uika_jax.synthetic.materials import vertex_occlusion
from uika_jax.synthetic.rig import FIXED_VIEWS, NO_JITTER, fixed_view_rig
from uika_jax.synthetic.views import _posed_vertices

SIZE = 32
SEED = 3


@pytest.fixture(scope="module")
def model():
    return synthetic_head_model()


@pytest.fixture(scope="module")
def identity(model):
    """A smooth random texture (so albedo checks need no procedural painting), no occlusion."""
    rng = np.random.default_rng(0)
    texture = jax.image.resize(rng.uniform(0.2, 0.9, (8, 8, 3)), (64, 64, 3), "linear")
    materials = np.broadcast_to(np.float32([0.2, 20.0, 1.0]), (16, 16, 3))
    shape = identity_coefficients(SEED, model.num_shape)
    return Identity(shape, np.asarray(texture, np.float32), np.array(materials))


@pytest.fixture(scope="module")
def rig(model, identity):
    return fixed_view_rig(model, identity.shape, SIZE, SEED)


def _params(model):
    pose = np.zeros((5, 3), np.float32)
    pose[2, 0] = 0.2
    return FrameParams(np.zeros(model.num_expression, np.float32), pose, np.zeros(3, np.float32))


def _quad_in_front(model):
    """A coloured quad 5 cm in front of the face's centre, facing the camera."""
    centre = np.asarray(model.v_template).mean(axis=0) + np.array([0.0, 0.0, 0.15])
    corners = centre + np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]]) * 0.02
    return ExtraMeshes(
        corners.astype(np.float32),
        np.array([[0, 1, 2], [0, 2, 3]], np.int32),
        np.full((4, 3), 0.5, np.float32),
    )


@pytest.fixture(scope="module")
def frames(model, identity, rig):
    """Frontal frames, 2x2 supersampling, shadows from the key light, a grey quad before the face.

    (random lights, the same again, a uniform ambient of 1 without lights), extras, background.
    """
    options = FrameOptions(size=SIZE, supersample=2, shadow_lights=1, shadow_size=32)
    background = background_image(SEED, SIZE)
    extras = _quad_in_front(model)
    renders = [
        render_frame(
            model,
            identity,
            _params(model),
            rig[0][0],
            rig[1][0],
            Scene(lights, background),
            options,
            extras,
        )
        for lights in (sample_lights(SEED), sample_lights(SEED), ambient_lights(1.0))
    ]
    return renders, extras, background


@pytest.fixture(scope="module")
def references(model, identity, rig, frames):
    """Independent renders of head + quad at 2x (coverage, UV) and 1x (UV at pixel centres)."""
    extras = frames[1]
    params = _params(model)
    head = _posed_vertices(model, identity.shape, params.expression, params.pose)
    vertices = np.concatenate([np.asarray(head), extras.vertices])
    faces = np.concatenate([model.faces, extras.faces + model.num_vertices])
    corner_uv = np.concatenate([corner_image_uv(model), np.zeros((2, 3, 2), np.float32)])
    viewmat, K = rig[0][0], rig[1][0]
    fine = render_mesh(
        vertices,
        faces,
        viewmat,
        K * np.float32([[2], [2], [1]]),
        2 * SIZE,
        2 * SIZE,
        corner_uv=corner_uv,
    )
    centre = render_mesh(vertices, faces, viewmat, K, SIZE, SIZE, corner_uv=corner_uv)
    return fine, centre


def test_backgrounds_are_textured_and_deterministic():
    images = [background_image(seed, 24) for seed in range(60)]
    assert min(float(image.std()) for image in images) > 0.03
    assert all(image.shape == (24, 24, 3) and image.dtype == np.float32 for image in images)
    assert np.array_equal(background_image(5, 24), images[5])
    assert not np.allclose(images[5], images[6])
    with pytest.raises(ValueError, match="size"):
        background_image(0, 4)


def test_lights_are_deterministic_and_bounded():
    lights = sample_lights(11)
    again = sample_lights(11)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(lights), jax.tree.leaves(again), strict=True)
    )
    for seed in range(40):
        lights = sample_lights(seed)
        luminance = np.asarray(lights.colours) @ [0.2126, 0.7152, 0.0722]
        assert 2 <= np.count_nonzero(luminance) <= MAX_LIGHTS
        assert np.all(np.diff(luminance) <= 1e-6), "the key light comes first"
        total = luminance.sum() + float(np.asarray(lights.sky) @ [0.2126, 0.7152, 0.0722])
        assert 0.99 <= total <= 1.61
        np.testing.assert_allclose(np.linalg.norm(lights.directions, axis=-1), 1.0, atol=1e-6)


def test_shade_energy():
    shade_ = jax.jit(shade)
    albedo = jnp.array([[0.3, 0.5, 0.7]] * 4)
    up = jnp.array([0.0, -1.0, 0.0])  # camera y points down; identity rotation: world up = -y
    normals = jnp.stack([up, -up, jnp.array([0.0, 0.0, -1.0]), jnp.array([1.0, 0.0, 0.0])])
    to_camera = jnp.tile(jnp.array([0.0, 0.0, -1.0]), (4, 1))
    no_gloss = jnp.tile(jnp.array([0.0, 1.0, 1.0]), (4, 1))
    rotation = jnp.diag(jnp.array([1.0, -1.0, 1.0]))
    uniform = shade_(albedo, normals, to_camera, no_gloss, ambient_lights(1.0), rotation)
    np.testing.assert_allclose(uniform, albedo, rtol=1e-6)
    hemisphere = shade_(albedo, normals, to_camera, no_gloss, ambient_lights(1.0, 0.2), rotation)
    np.testing.assert_allclose(hemisphere[0], albedo[0], rtol=1e-6)
    np.testing.assert_allclose(hemisphere[1], 0.2 * albedo[1], rtol=1e-6)
    np.testing.assert_allclose(hemisphere[2], 0.6 * albedo[2], rtol=1e-6)
    # One white light at the camera (world +z is camera -z with this rotation), no ambient.
    lights = ambient_lights(0.0)
    lights = Lights(
        np.asarray(lights.directions) * [1.0, 1.0, -1.0],
        np.asarray(lights.colours).copy(),
        lights.sky,
        lights.ground,
        lights.specular_scale,
    )
    lights.colours[0] = 1.0
    lit = shade_(albedo, normals, to_camera, no_gloss, lights, rotation)
    np.testing.assert_allclose(lit[2], albedo[2], rtol=1e-6)
    np.testing.assert_allclose(lit[3], albedo[3] * DIFFUSE_WRAP / (1 + DIFFUSE_WRAP), rtol=1e-5)
    glossy = shade_(
        albedo, normals, to_camera, jnp.tile(jnp.array([0.5, 30.0, 1.0]), (4, 1)), lights, rotation
    )
    np.testing.assert_allclose(glossy[2], albedo[2] + 0.5, rtol=1e-6)
    np.testing.assert_allclose(to_display(to_linear(albedo)), albedo, rtol=1e-5)


def test_shadows_and_occlusion_of_a_simple_scene():
    # A unit floor square at y = 0 with a small roof square 0.3 above its centre.
    square = np.array([[-1, 0, -1], [1, 0, -1], [1, 0, 1], [-1, 0, 1]], np.float32)
    vertices = np.concatenate([square, square * 0.25 + [0.0, 0.3, 0.0]])
    faces = np.array([[0, 2, 1], [0, 3, 2], [4, 6, 5], [4, 7, 6]], np.int32)
    points = np.array([[0.0, 0.0, 0.0], [0.8, 0.0, 0.8], [0.0, 0.3, 0.0]], np.float32)
    normals = np.tile(np.float32([0.0, 1.0, 0.0]), (3, 1))

    @jax.jit
    def overhead_light():
        *maps, overflow = shadow_maps(vertices, faces, jnp.float32([[0.0, 1.0, 0.0]]), 32, 4096)
        return shadow_visibility(points, normals, *maps)[:, 0], overflow

    visible, overflow = overhead_light()
    assert int(overflow) == 0
    np.testing.assert_allclose(visible, [0.0, 1.0, 1.0])
    # A tetrahedron is convex (nothing occludes its corners); a triangle inside it sees nothing.
    tetra = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], np.float32)
    inner = tetra[:3] * 0.05
    occlusion = vertex_occlusion(
        np.concatenate([tetra, inner]),
        np.array([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2], [4, 5, 6]], np.int32),
        directions=16,
        map_size=32,
    )
    assert np.all(occlusion[:4] > 0.97) and np.all(occlusion[4:] < 0.03)


def test_rig_views_and_framing(model, identity):
    shape = identity.shape
    viewmats, Ks = fixed_view_rig(model, shape, 256, SEED, NO_JITTER)
    assert viewmats.shape == (9, 4, 4) and Ks.shape == (9, 3, 3)
    vertices = np.asarray(
        _posed_vertices(
            model, shape, np.zeros(model.num_expression, np.float32), np.zeros((5, 3), np.float32)
        )
    )
    crown, chin = framing_landmarks()
    target = np.array(
        [
            0.0,
            0.5 * (vertices[crown, 1] + vertices[chin, 1]),
            0.5 * (vertices[crown, 2] + vertices[chin, 2]),
        ]
    )
    for (yaw, pitch), viewmat in zip(FIXED_VIEWS, viewmats, strict=True):
        eye = -viewmat[:3, :3].T @ viewmat[:3, 3] - target
        eye /= np.linalg.norm(eye)
        assert np.rad2deg(np.arctan2(eye[0], eye[2])) == pytest.approx(yaw, abs=1e-3)
        assert np.rad2deg(np.arcsin(eye[1])) == pytest.approx(pitch, abs=1e-3)
    spans = []
    for jitter in (NO_JITTER, None):
        vm, K = (viewmats, Ks) if jitter else fixed_view_rig(model, shape, 256, SEED)
        cam = np.einsum("cij,pj->cpi", vm[:, :3, :3], vertices[[crown, chin]]) + vm[:, None, :3, 3]
        image = cam[..., :2] / cam[..., 2:] * K[:, None, [0, 1], [0, 1]]
        spans.append(np.linalg.norm(image[:, 0] - image[:, 1], axis=-1) / 256)
    level = np.array([pitch == 0 for _, pitch in FIXED_VIEWS])
    assert spans[0][0] == pytest.approx(0.7, abs=0.01)
    assert np.all(np.abs(spans[0][level] - 0.7) < 0.03), "crown to chin spans 70% at eye level"
    assert np.all(np.abs(spans[0][~level] - 0.7) < 0.1), "foreshortened from above and below"
    assert np.all(np.abs(spans[1] - spans[0]) < 0.1) and np.ptp(spans[1] / spans[0]) > 0.05
    again = fixed_view_rig(model, shape, 256, SEED)
    np.testing.assert_array_equal(again[0], fixed_view_rig(model, shape, 256, SEED)[0])
    assert not np.allclose(again[0], fixed_view_rig(model, shape, 256, SEED + 1)[0])


def test_frames_are_deterministic(frames):
    lit, again, ambient = frames[0]
    for a, b in zip(jax.tree.leaves(lit), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(lit.image, ambient.image)
    assert int(lit.overflow) == 0 and int(ambient.overflow) == 0
    assert lit.image.shape == (SIZE, SIZE, 3) and lit.image.dtype == np.uint8


def test_alpha_is_the_box_filtered_coverage(frames, references):
    alpha = np.asarray(frames[0][0].alpha)
    fine = np.asarray(references[0].mask, np.float32)
    coverage = fine.reshape(SIZE, 2, SIZE, 2).mean(axis=(1, 3))
    np.testing.assert_array_equal(alpha, np.round(coverage * 255).astype(np.uint8))
    fractional = (alpha > 0) & (alpha < 255)
    assert fractional.sum() > SIZE // 2
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(alpha, 1), (3, 3))
    on_silhouette = (windows.min(axis=(2, 3)) < 255) & (windows.max(axis=(2, 3)) > 0)
    assert np.all(on_silhouette[fractional]), "fractional alpha off the silhouette"


def test_ambient_frame_is_the_box_filtered_albedo(model, identity, frames, references):
    """Uniform ambient 1, no lights, no occlusion: the image is the anti-aliased albedo."""
    ambient, (extras, background) = frames[0][2], frames[1:]
    fine = references[0]
    head = np.asarray(fine.triangle_id) < model.faces.shape[0]
    albedo = np.where(
        head[..., None],
        np.asarray(sample_texture(to_linear(identity.texture), fine.image_uv)),
        np.asarray(to_linear(extras.colours[0])),
    )
    covered = np.asarray(fine.mask)[..., None]
    premultiplied = np.where(covered, albedo, 0.0).reshape(SIZE, 2, SIZE, 2, 3).mean(axis=(1, 3))
    coverage = covered.reshape(SIZE, 2, SIZE, 2, 1).mean(axis=(1, 3))
    linear = premultiplied + (1.0 - coverage) * np.asarray(to_linear(background))
    expected = np.asarray(to_display(linear)) * 255
    assert np.abs(np.asarray(ambient.image, np.float32) - expected).max() <= 0.6


def test_uv_map_is_the_heads_at_pixel_centres(model, frames, references):
    frame, centre = frames[0][0], references[1]
    alpha, valid = np.asarray(frame.alpha), np.asarray(frame.uv_valid)
    head = np.asarray(centre.mask) & (np.asarray(centre.triangle_id) < model.faces.shape[0])
    np.testing.assert_array_equal(valid, head & (alpha > 0))
    assert np.all(alpha[valid] > 0) and valid.sum() > 0.2 * SIZE * SIZE
    uv = np.asarray(frame.image_uv)
    np.testing.assert_allclose(uv[valid], np.asarray(centre.image_uv)[valid], atol=1e-5)
    assert np.all(uv[~valid] == 0) and np.all((uv >= 0) & (uv <= 1))
    quad = np.asarray(centre.triangle_id) >= model.faces.shape[0]
    assert quad.sum() > 4 and np.all(alpha[quad] == 255) and not valid[quad].any()
