"""Tests for the UV convention / UV rasterizer and the textured mesh renderer."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uika_jax.head.model import HeadModel
from uika_jax.head.uv_raster import (
    corner_image_uv,
    image_uv_to_texel,
    texel_centers,
    uv_rasterize,
    uv_to_image_uv,
)
from uika_jax.render import camera
from uika_jax.render.mesh_raster import interpolate, rasterize_triangles
from uika_jax.render.mesh_render import (
    mesh_capacity,
    render_mesh,
    render_mesh_batch,
    sample_texture,
    vertex_normals,
)


def make_model(vertices, faces, uv_coords=None, uv_faces=None) -> HeadModel:
    """A HeadModel around a procedural mesh, with dummy blendshapes and skinning."""
    v = np.asarray(vertices, np.float32)
    n = len(v)
    weights = np.zeros((n, 5), np.float32)
    weights[:, 0] = 1.0
    return HeadModel(
        v_template=v,
        faces=np.asarray(faces, np.int32),
        shapedirs=np.zeros((n, 3, 2), np.float32),
        exprdirs=np.zeros((n, 3, 2), np.float32),
        posedirs=np.zeros((n, 3, 36), np.float32),
        j_regressor=np.full((5, n), 1.0 / n, np.float32),
        lbs_weights=weights,
        uv_coords=None if uv_coords is None else np.asarray(uv_coords, np.float32),
        uv_faces=None if uv_faces is None else np.asarray(uv_faces, np.int32),
    )


def plane_model(seam: bool = False) -> HeadModel:
    """A unit square in the z = 0 plane facing +z, split into 2 triangles.

    With `seam`, the second triangle's UV island is moved to the right half of the
    UV square (its corners get their own texture coordinates).
    """
    vertices = [[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0]]
    faces = [[0, 1, 2], [0, 2, 3]]
    if not seam:
        return make_model(vertices, faces, [[0, 0], [1, 0], [1, 1], [0, 1]], faces)
    uv = [[0, 0], [0.5, 0], [0.5, 1], [0.5, 0], [1, 1], [0.5, 1]]
    return make_model(vertices, faces, uv, [[0, 1, 2], [3, 4, 5]])


# ---------------------------------------------------------------------------- UV convention


def test_uv_convention_helpers():
    uv = jnp.array([[0.25, 0.75], [1.0, 0.0]])
    np.testing.assert_allclose(uv_to_image_uv(uv), [[0.25, 0.25], [1.0, 1.0]])
    np.testing.assert_allclose(uv_to_image_uv(uv_to_image_uv(uv)), uv)
    centres = texel_centers(4)
    assert centres.shape == (4, 4, 2)
    np.testing.assert_allclose(centres[1, 2], [2.5 / 4, 1.5 / 4])
    rows, cols = image_uv_to_texel(centres, 4)
    np.testing.assert_array_equal(rows, np.arange(4)[:, None] * np.ones(4, int))
    np.testing.assert_array_equal(cols, np.arange(4)[None, :] * np.ones((4, 1), int))
    rows, cols = image_uv_to_texel(jnp.array([[1.0, 1.0], [0.0, 0.0]]), 4)
    np.testing.assert_array_equal(rows, [3, 0])
    np.testing.assert_array_equal(cols, [3, 0])


def test_sample_texture_bilinear_and_clamped():
    rng = np.random.default_rng(0)
    texture = jnp.asarray(rng.random((5, 6, 2)), jnp.float32)
    # Texel centres return the texels.
    centres = (np.stack(np.meshgrid(np.arange(6) + 0.5, np.arange(5) + 0.5), -1)) / [6, 5]
    np.testing.assert_allclose(sample_texture(texture, centres), texture, atol=1e-6)
    # Halfway between two texel centres: the mean.
    midpoint = jnp.array([2.0 / 6, 1.5 / 5])
    np.testing.assert_allclose(
        sample_texture(texture, midpoint), (texture[1, 1] + texture[1, 2]) / 2, atol=1e-6
    )
    # Outside the map: the edge texel.
    np.testing.assert_allclose(sample_texture(texture, jnp.array([-0.3, 1.4])), texture[4, 0])
    grads = jax.grad(lambda t, p: sample_texture(t, p).sum(), argnums=(0, 1))(
        texture, jnp.array([0.4, 0.3])
    )
    assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in grads)


def test_uv_rasterize_aligned_square_is_exact():
    # A square from u, v = 0.25 to 0.75: exactly the 32 x 32 central texels of a 64 map.
    uv = [[0.25, 0.25], [0.75, 0.25], [0.75, 0.75], [0.25, 0.75]]
    faces = [[0, 1, 2], [0, 2, 3]]
    model = make_model(np.zeros((4, 3)), faces, uv, faces)
    raster = uv_rasterize(model, 64)
    mask = np.asarray(raster.mask)
    assert mask.sum() == 32 * 32 and mask[16:48, 16:48].all()
    assert int(raster.overflow) == 0


def test_uv_rasterize_seam_layout_coverage_and_barycentrics():
    model = plane_model(seam=True)
    resolution = 50
    raster = uv_rasterize(model, resolution)
    mask = np.asarray(raster.mask)
    # Two triangles of area 1/4 each: half the map, up to the texels along their edges.
    assert abs(mask.mean() - 0.5) < 4 * 1.5 / resolution
    face_id = np.asarray(raster.face_id)
    assert set(np.unique(face_id)) == {-1, 0, 1}
    # Face 0 lives in the left half of the map, face 1 in the right half.
    cols = np.broadcast_to(np.arange(resolution), mask.shape)
    assert np.all(cols[face_id == 0] < resolution / 2 + 1)
    assert np.all(cols[face_id == 1] >= resolution / 2 - 1)
    # Barycentrics map each covered texel centre back to its UV.
    corner_uv = uv_to_image_uv(model.uv_coords[model.uv_faces])
    fragments_uv = jnp.einsum(
        "rck,rckd->rcd", raster.barycentrics, corner_uv[np.maximum(face_id, 0)]
    )
    np.testing.assert_allclose(
        np.asarray(fragments_uv)[mask], np.asarray(texel_centers(resolution))[mask], atol=1e-5
    )


def test_uv_rasterize_needs_uv():
    model = make_model(np.zeros((3, 3)), [[0, 1, 2]])
    with pytest.raises(ValueError, match="uv_rasterize needs a UV layout"):
        uv_rasterize(model, 8)


# ---------------------------------------------------------------------------- renderer


def front_camera(size: int = 48, yaw: float = 25.0, pitch: float = -15.0):
    return camera.orbit_viewmat(yaw, pitch, 2.5), camera.intrinsics(
        camera.focal_from_fov(30.0, size), size, size
    )


def test_vertex_normals():
    model = plane_model()
    np.testing.assert_allclose(
        vertex_normals(model.v_template, model.faces), np.tile([0, 0, 1.0], (4, 1)), atol=1e-6
    )
    # A tetrahedron corner: the area-weighted mean of its three faces' normals.
    vertices = jnp.array([[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 1]], jnp.float32)
    faces = jnp.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    expected = np.array([0, 0, -2.0]) + np.array([0, -1.0, 0]) + np.array([-2.0, 0, 0])
    np.testing.assert_allclose(
        vertex_normals(vertices, faces)[0], expected / np.linalg.norm(expected), atol=1e-6
    )


def test_render_plane_uv_matches_ray_intersection_and_texture():
    size = 48
    model = plane_model()
    viewmat, K = front_camera(size)
    texture = jnp.asarray(np.random.default_rng(0).random((16, 16, 3)), jnp.float32)
    out = render_mesh(
        model.v_template,
        model.faces,
        viewmat,
        K,
        size,
        size,
        corner_uv=corner_image_uv(model),
        texture=texture,
        ambient=1.0,
    )
    mask = np.asarray(out.mask)
    assert 0.2 < mask.mean() < 0.9 and int(out.overflow) == 0

    # Closed-form ray-plane intersection (plane z = 0 in the world) at every pixel centre.
    rotation, translation = viewmat[:3, :3].astype(np.float64), viewmat[:3, 3].astype(np.float64)
    eye = -rotation.T @ translation
    x, y = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    rays_cam = np.stack([x, y, np.ones_like(x)], -1) @ np.linalg.inv(K.astype(np.float64)).T
    rays = rays_cam @ rotation
    lam = -eye[2] / rays[..., 2]
    hit = eye + lam[..., None] * rays
    inside = np.all(np.abs(hit[..., :2]) <= 0.5, axis=-1)
    np.testing.assert_array_equal(mask, inside)
    np.testing.assert_allclose(np.asarray(out.depth)[mask], lam[mask], rtol=1e-5)
    expected_uv = np.stack([hit[..., 0] + 0.5, 0.5 - hit[..., 1]], -1)
    np.testing.assert_allclose(np.asarray(out.image_uv)[mask], expected_uv[mask], atol=1e-5)
    assert np.all(np.asarray(out.image_uv)[~mask] == 0)

    # With ambient 1 the image is the texture sampled at the rendered image UV.
    np.testing.assert_allclose(
        np.asarray(out.image)[mask],
        np.asarray(sample_texture(texture, out.image_uv))[mask],
        atol=1e-6,
    )
    np.testing.assert_allclose(np.asarray(out.image)[~mask], 1.0)
    # The plane faces +z, so its camera-space normal is the rotated +z.
    np.testing.assert_allclose(
        np.asarray(out.normals)[mask], np.tile(rotation[:, 2], (mask.sum(), 1)), atol=1e-5
    )


def test_render_round_trip_through_a_coordinate_texture():
    # A texture whose colour is its own image UV: rendered colour decodes to the pixel's UV.
    size, resolution = 40, 32
    model = plane_model(seam=True)
    viewmat, K = front_camera(size, yaw=-20.0, pitch=10.0)
    centres = np.asarray(texel_centers(resolution))
    texture = np.concatenate([centres, np.zeros((resolution, resolution, 1))], -1)
    out = render_mesh(
        model.v_template,
        model.faces,
        viewmat,
        K,
        size,
        size,
        corner_uv=corner_image_uv(model),
        texture=texture,
        ambient=1.0,
    )
    image_uv = np.asarray(out.image_uv)
    image = np.asarray(out.image)
    # Bilinear sampling reproduces a linear ramp away from the half-texel border.
    interior = np.asarray(out.mask) & np.all(
        (image_uv > 0.5 / resolution) & (image_uv < 1 - 0.5 / resolution), axis=-1
    )
    assert interior.sum() > 100
    np.testing.assert_allclose(image[interior][:, :2], image_uv[interior], atol=1e-5)
    # The seam: face 0 samples the left half of the map, face 1 the right half.
    tid = np.asarray(out.triangle_id)
    assert np.all(image_uv[tid == 0][:, 0] <= 0.5 + 1e-6)
    assert np.all(image_uv[tid == 1][:, 0] >= 0.5 - 1e-6)


def test_render_occlusion_and_shading():
    # Two parallel squares, the front one smaller: it hides the back one's centre.
    back = np.array([[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0]])
    front = back * 0.4 + [0, 0, 0.3]
    vertices = np.concatenate([back, front])
    faces = [[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]]
    model = make_model(vertices, faces)
    size = 32
    viewmat, K = front_camera(size, yaw=0.0, pitch=0.0)
    out = render_mesh(vertices, model.faces, viewmat, K, size, size, background=0.0)
    tid = np.asarray(out.triangle_id)
    assert out.image_uv is None
    assert tid[size // 2, size // 2] in (2, 3) and tid[6, size // 2] in (0, 1)
    image = np.asarray(out.image)
    assert np.all(image[~np.asarray(out.mask)] == 0)
    assert np.all((image >= 0) & (image <= 1))
    lit = render_mesh(
        vertices, model.faces, viewmat, K, size, size, light_dir=(0, 0, -1), ambient=0.2
    )
    np.testing.assert_allclose(np.asarray(lit.image)[np.asarray(lit.mask)], 0.7, atol=1e-5)
    dark = render_mesh(
        vertices, model.faces, viewmat, K, size, size, light_dir=(0, 0, 1), ambient=0.2
    )
    np.testing.assert_allclose(np.asarray(dark.image)[np.asarray(dark.mask)], 0.7 * 0.2, atol=1e-5)
    with pytest.raises(ValueError, match="needs corner_uv"):
        render_mesh(vertices, model.faces, viewmat, K, size, size, texture=np.zeros((4, 4, 3)))


@contextlib.contextmanager
def count_traces():
    """Collects the jit traces (cache misses: each one is a compile) made inside the block."""
    traces = []

    def listener(event, _duration, **_):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traces.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield traces
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_render_jit_vmap_and_batch_over_cameras():
    size = 32
    model = plane_model()
    viewmats = np.stack([front_camera(size, yaw=y)[0] for y in (-30.0, 0.0, 30.0)])
    K = front_camera(size)[1]
    capacity = mesh_capacity(model.v_template, model.faces, viewmats, K, size, size)
    assert capacity >= max(
        mesh_capacity(model.v_template, model.faces, v, K, size, size) for v in viewmats
    )

    def render(viewmat):
        return render_mesh(
            model.v_template,
            model.faces,
            viewmat,
            K,
            size,
            size,
            corner_uv=corner_image_uv(model),
            capacity=capacity,
        )

    batched = jax.jit(jax.vmap(render))(viewmats)
    assert batched.image.shape == (3, size, size, 3)
    eager = render_mesh(
        model.v_template, model.faces, viewmats[2], K, size, size, corner_uv=corner_image_uv(model)
    )
    np.testing.assert_allclose(batched.image[2], eager.image, atol=1e-6)
    np.testing.assert_array_equal(batched.overflow, 0)
    with pytest.raises(ValueError, match="capacity"):
        jax.jit(
            lambda v: render_mesh(
                v, model.faces, viewmats[0], K, size, size, corner_uv=corner_image_uv(model)
            )
        )(model.v_template)

    # The batched companion: the same renders, one compiled program for every batch.
    vertices = np.broadcast_to(model.v_template, (3, *model.v_template.shape))
    Ks = np.broadcast_to(K, (3, 3, 3))
    batch = render_mesh_batch(
        vertices, model.faces, viewmats, Ks, size, size,
        corner_uv=corner_image_uv(model), capacity=capacity,
    )  # fmt: skip
    for field in ("image", "image_uv", "depth", "triangle_id", "normals", "overflow"):
        np.testing.assert_allclose(getattr(batch, field), getattr(batched, field), atol=1e-6)
    with count_traces() as traces:
        shifted = render_mesh_batch(
            vertices + 0.05, model.faces, viewmats[::-1], Ks * 1.1, size, size,
            corner_uv=corner_image_uv(model), capacity=capacity,
        )  # fmt: skip
    assert traces == [], "other vertices and cameras of the same shapes must reuse the program"
    assert int(shifted.mask.sum()) != int(batch.mask.sum())


def test_interpolate_uses_corner_attributes():
    corners = jnp.array([[[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]]])
    frags = rasterize_triangles(corners, jnp.ones((1, 3)), 8, 8)
    values = interpolate(frags, jnp.eye(3)[None])
    np.testing.assert_allclose(values, frags.barycentrics, atol=1e-6)


def test_render_gradients_are_finite():
    size = 24
    model = plane_model()
    viewmat, K = front_camera(size)
    texture = jnp.full((8, 8, 3), 0.5)

    def loss(vertices, texture):
        out = render_mesh(
            vertices,
            model.faces,
            viewmat,
            K,
            size,
            size,
            corner_uv=corner_image_uv(model),
            texture=texture,
            capacity=576,
        )
        return jnp.sum(out.image) + jnp.sum(out.image_uv) + jnp.sum(out.normals)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(model.v_template), texture)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)
