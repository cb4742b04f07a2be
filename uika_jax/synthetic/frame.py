"""One frame of the synthetic dataset: a lit, anti-aliased render with its ground-truth UV map.

`render_frames` renders frames of one identity (T frames of FLAME-format
parameters) from C cameras in one jitted call; `render_frame` is the same for
one frame and one camera. A frame is:

* `image` (H, W, 3) uint8: the head (and any render-only meshes: hair,
  accessories) shaded by the sequence's lights (`uika_jax.synthetic.lighting`),
  composited over the sequence's background for that camera
  (`uika_jax.synthetic.backgrounds`);
* `alpha` (H, W) uint8: the foreground's coverage of each pixel, 255 inside;
* `image_uv` (H, W, 2) float32 and `uv_valid` (H, W) bool: the head's image UV
  (the convention of `uika_jax.render.mesh_render`: both axes in [0, 1], v down
  the map's rows) where the head's own surface is seen; 0 elsewhere.

Pipeline, per frame: pose the head (`flame_forward` with the identity's shape
and the frame's expression, pose rows global / neck / jaw / left eye / right
eye, and translation), append the render-only meshes, render shadow maps of
the `shadow_lights` strongest lights (once per frame, shared by all cameras);
then per camera one `render_mesh` call at `supersample` times the size and
deferred shading of its fields in linear light: the albedo is the identity's
texture (linearised, then sampled bilinearly) at the image UV on the head,
and the render-only meshes' per-vertex colour elsewhere (their faces get
corner UVs (0, 0), (1, 0), (0, 1), so the interpolated "UV" is the
barycentric coordinate pair (b1, b2) and b0 = 1 - b1 - b2 weighs the corner
colours; the head's UV is never mixed with theirs); normals, positions and
view directions come from the normals and depth fields.

Anti-aliasing: with supersample factor k every pixel is the mean of the k x k
samples of its square (sample centres at ((j + (s + 0.5) / k), (i + (t + 0.5) / k))
in image coordinates); the shaded colours are averaged premultiplied in
linear light with the coverage as alpha, and composited over the linearised
background: image = to_display(mean(c * m) + (1 - mean(m)) * to_linear(bg)),
alpha = mean(m), quantised to 8 bits.

Ground-truth UV map (never blended across the silhouette or between
samples): the image UV of the single ray through the 1x pixel's centre, the
nearest-surface sample at (j + 0.5, i + 0.5). With odd k that is the central
sample of the supersampled render; with even k a separate 1x render (one
extra render at 1 / k^2 of the cost). It is valid where that ray's nearest
surface is the head (not a render-only mesh, not the background) and the
8-bit alpha is above 0, so valid pixels always lie inside the alpha mask.
Every face of the head model is in its UV layout (skin, eyeballs and the
mouth cavity for the built-in head), so all of the seen head counts.

Rasterizer overflow (`render_mesh`'s capacity: `FrameOptions.capacity_per_pixel`
slots per rendered pixel, plus `extras_capacity_per_pixel` when render-only
meshes are given) is counted per frame in `Frame.overflow`, never dropped
silently. The head at face framing needs up to about 3 slots a pixel, the
head with long hair about 8.5.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from uika_jax.head.lbs import flame_forward
from uika_jax.head.model import HeadModel
from uika_jax.head.uv_raster import corner_image_uv
from uika_jax.render.mesh_render import render_mesh, sample_texture
from uika_jax.synthetic.albedo import synthetic_albedo
from uika_jax.synthetic.head import identity_coefficients
from uika_jax.synthetic.lighting import (
    MAX_LIGHTS,
    Lights,
    shade,
    shadow_maps,
    shadow_visibility,
    to_display,
    to_linear,
)
from uika_jax.synthetic.materials import synthetic_material_map

EXTRA_MATERIAL = (0.04, 12.0, 1.0)
"""Specular strength, exponent and occlusion of the render-only meshes (hair: a faint sheen)."""
_BARYCENTRIC_UV = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Identity:
    """What one identity seed gives the renderer (`make_identity`).

    Attributes:
      shape: (S,) identity coefficients.
      texture: (R, R, 3) albedo UV map, display values in [0, 1].
      materials: (R, R, 3) specular strength, exponent and ambient occlusion UV map
        (`uika_jax.synthetic.materials`).
    """

    shape: jax.Array
    texture: jax.Array
    materials: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FrameParams:
    """FLAME-format parameters of a frame (leading axes allowed: (T, ...) for T frames).

    Attributes:
      expression: (E,) expression coefficients.
      pose: (5, 3) axis-angle rows global, neck, jaw, left eye, right eye.
      translation: (3,) added after skinning.
    """

    expression: jax.Array
    pose: jax.Array
    translation: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExtraMeshes:
    """Render-only geometry (hair, accessories): in the image and alpha, never in the UV map.

    Attributes:
      vertices: (Ve, 3) world positions, already posed with the frame ((T, Ve, 3)
        for `render_frames`).
      faces: (Fe, 3) vertex indices into `vertices`.
      colours: (Ve, 3) per-vertex albedo, display values in [0, 1].
    """

    vertices: jax.Array
    faces: jax.Array
    colours: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Scene:
    """A sequence's surroundings.

    Attributes:
      lights: the `Lights` (world space).
      background: (H, W, 3) display values in [0, 1] behind the head ((C, H, W, 3),
        one per camera, for `render_frames`).
    """

    lights: Lights
    background: jax.Array


@dataclasses.dataclass(frozen=True)
class FrameOptions:
    """Static rendering options.

    Attributes:
      size: image side in pixels.
      supersample: samples per pixel along each axis (1: no anti-aliasing).
      shadow_lights: how many of the strongest lights cast shadows (0: none).
      shadow_size: shadow map side in texels.
      capacity_per_pixel: rasterizer slots per rendered pixel (`render_mesh`'s
        capacity) for the head.
      extras_capacity_per_pixel: slots per pixel added when render-only meshes
        are given.
    """

    size: int = 128
    supersample: int = 1
    shadow_lights: int = 0
    shadow_size: int = 128
    capacity_per_pixel: float = 4.0
    extras_capacity_per_pixel: float = 6.0

    def __post_init__(self):
        if self.size < 8 or self.supersample < 1 or self.shadow_size < 8:
            raise ValueError(f"FrameOptions: size and shadow_size >= 8, supersample >= 1: {self}")
        if not 0 <= self.shadow_lights <= MAX_LIGHTS:
            raise ValueError(f"FrameOptions: shadow_lights must be in [0, {MAX_LIGHTS}]: {self}")

    def capacity(self, side: int, extras: bool) -> int:
        """Rasterizer capacity of a side x side render, with or without render-only meshes."""
        per_pixel = self.capacity_per_pixel + (self.extras_capacity_per_pixel if extras else 0.0)
        return int(np.ceil(per_pixel * side * side))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Frame:
    """A rendered frame (module docstring); leading (T, C) axes from `render_frames`.

    Attributes:
      image: (H, W, 3) uint8.
      alpha: (H, W) uint8 coverage.
      image_uv: (H, W, 2) float32 image UV of the head, 0 where not valid.
      uv_valid: (H, W) bool.
      overflow: () int32 rasterizer overflow of the frame's renders (0 when none).
    """

    image: jax.Array
    alpha: jax.Array
    image_uv: jax.Array
    uv_valid: jax.Array
    overflow: jax.Array


def make_identity(model: HeadModel, seed: int, texture_resolution: int = 256) -> Identity:
    """Returns an identity's shape and maps (`identity_coefficients`, `synthetic_albedo`).

    Args:
      model: the synthetic head model.
      seed: identity seed, a non-negative int.
      texture_resolution: side of the albedo and material maps (one resolution, so
        both reuse one compiled UV rasterization).
    """
    return Identity(
        shape=identity_coefficients(seed, model.num_shape),
        texture=synthetic_albedo(seed, texture_resolution),
        materials=synthetic_material_map(texture_resolution),
    )


def _pixel_rays(K: jax.Array, side: int) -> jax.Array:
    """Camera-space rays (side, side, 3) with z = 1 through the pixel centres."""
    centres = jnp.arange(side, dtype=jnp.float32) + 0.5
    x = (centres[None, :] - K[0, 2]) / K[0, 0]
    y = (centres[:, None] - K[1, 2]) / K[1, 1]
    return jnp.stack(jnp.broadcast_arrays(x, y, jnp.ones_like(x)), axis=-1)


def _area_mean(x: jax.Array, k: int) -> jax.Array:
    """Averages k x k blocks of the two leading axes."""
    h, w = x.shape[0] // k, x.shape[1] // k
    return x.reshape(h, k, w, k, *x.shape[2:]).mean(axis=(1, 3))


def _scaled_intrinsics(K: jax.Array, k: int) -> jax.Array:
    """Intrinsics of the same camera with k times the pixels along each axis."""
    return K * jnp.array([[k], [k], [1.0]], jnp.float32)


def _shade_view(geometry, identity, lights, viewmat, K, shadows, options):
    """One camera at the supersampled size: (linear colour, coverage, UV, head, overflow).

    The identity's texture and the corner colours are linear here (`_render_frames`).
    """
    vertices, faces, corner_uv, corner_colour, num_head_faces = geometry
    side = options.size * options.supersample
    K_big = _scaled_intrinsics(K, options.supersample)
    render = render_mesh(
        vertices,
        faces,
        viewmat,
        K_big,
        side,
        side,
        corner_uv=corner_uv,
        capacity=options.capacity(side, corner_colour is not None),
    )
    head = render.mask & (render.triangle_id < num_head_faces)
    uv = render.image_uv
    if corner_colour is None:
        albedo = sample_texture(identity.texture, uv)
        materials = sample_texture(identity.materials, uv)
    else:
        b1, b2 = uv[..., :1], uv[..., 1:]
        colours = corner_colour[jnp.maximum(render.triangle_id - num_head_faces, 0)]
        extra = (
            (1.0 - b1 - b2) * colours[..., 0, :] + b1 * colours[..., 1, :] + b2 * colours[..., 2, :]
        )
        albedo = jnp.where(head[..., None], sample_texture(identity.texture, uv), extra)
        materials = jnp.where(
            head[..., None], sample_texture(identity.materials, uv), jnp.array(EXTRA_MATERIAL)
        )
    depth = jnp.where(render.mask, render.depth, 1.0)
    points = _pixel_rays(K_big, side) * depth[..., None]
    to_camera = -points * jax.lax.rsqrt(jnp.sum(points * points, axis=-1, keepdims=True))
    rotation = viewmat[:3, :3]
    visibility = None
    if shadows is not None:
        world = (points - viewmat[:3, 3]) @ rotation
        lit = shadow_visibility(world, render.normals @ rotation, *shadows)
        unshadowed = jnp.ones((*lit.shape[:-1], MAX_LIGHTS - lit.shape[-1]))
        visibility = jnp.concatenate([lit, unshadowed], axis=-1)
    colour = shade(albedo, render.normals, to_camera, materials, lights, rotation, visibility)
    return colour, render.mask, uv, head, render.overflow


def _render_frame_views(model, identity, params, viewmats, Ks, scene, extras, options):
    """One frame from C cameras (the body of `render_frames`; colours already linear)."""
    head_vertices = flame_forward(
        model, identity.shape, params.expression, params.pose, params.translation
    )[0]
    head_faces = jnp.asarray(model.faces)
    num_head_faces = head_faces.shape[0]
    head_uv = corner_image_uv(model)
    if extras is None:
        geometry = (head_vertices, head_faces, head_uv, None, num_head_faces)
    else:
        geometry = (
            jnp.concatenate([head_vertices, extras.vertices]),
            jnp.concatenate([head_faces, extras.faces + head_vertices.shape[0]]),
            jnp.concatenate(
                [head_uv, jnp.broadcast_to(_BARYCENTRIC_UV, (extras.faces.shape[0], 3, 2))]
            ),
            jnp.asarray(extras.colours)[extras.faces],
            num_head_faces,
        )
    shadows, overflow = None, jnp.int32(0)
    if options.shadow_lights:
        depths, shadow_viewmats, shadow_Ks, texel, overflow = shadow_maps(
            geometry[0],
            geometry[1],
            jnp.asarray(scene.lights.directions)[: options.shadow_lights],
            options.shadow_size,
            options.capacity(options.shadow_size, extras is not None),
        )
        shadows = (depths, shadow_viewmats, shadow_Ks, texel)

    def one_view(viewmat, K, background):
        k = options.supersample
        colour, mask, uv, head, view_overflow = _shade_view(
            geometry, identity, scene.lights, viewmat, K, shadows, options
        )
        coverage = _area_mean(mask.astype(jnp.float32), k)
        premultiplied = _area_mean(jnp.where(mask[..., None], colour, 0.0), k)
        linear = premultiplied + (1.0 - coverage[..., None]) * background
        image = jnp.round(to_display(linear) * 255.0).astype(jnp.uint8)
        alpha = jnp.round(coverage * 255.0).astype(jnp.uint8)
        if k % 2:
            uv, head = uv[k // 2 :: k, k // 2 :: k], head[k // 2 :: k, k // 2 :: k]
        else:
            centre = render_mesh(
                geometry[0],
                geometry[1],
                viewmat,
                K,
                options.size,
                options.size,
                corner_uv=geometry[2],
                capacity=options.capacity(options.size, extras is not None),
            )
            uv = centre.image_uv
            head = centre.mask & (centre.triangle_id < num_head_faces)
            view_overflow = view_overflow + centre.overflow
        valid = head & (alpha > 0)
        return Frame(
            image=image,
            alpha=alpha,
            image_uv=jnp.where(valid[..., None], uv, 0.0),
            uv_valid=valid,
            overflow=view_overflow + overflow,
        )

    return jax.vmap(one_view)(viewmats, Ks, scene.background)


@functools.partial(jax.jit, static_argnames=("options", "frames_per_step"))
def _render_frames(model, identity, params, viewmats, Ks, scene, extras, options, frames_per_step):
    identity = dataclasses.replace(identity, texture=to_linear(identity.texture))
    scene = Scene(scene.lights, to_linear(scene.background))
    if extras is not None:
        extras = dataclasses.replace(extras, colours=to_linear(extras.colours))

    def one_frame(inputs):
        frame_params, extra_vertices = inputs
        frame_extras = (
            None if extras is None else dataclasses.replace(extras, vertices=extra_vertices)
        )
        return _render_frame_views(
            model, identity, frame_params, viewmats, Ks, scene, frame_extras, options
        )

    extra_vertices = None if extras is None else extras.vertices
    return jax.lax.map(one_frame, (params, extra_vertices), batch_size=frames_per_step)


def render_frames(
    model: HeadModel,
    identity: Identity,
    params: FrameParams,
    viewmats: jax.Array,
    Ks: jax.Array,
    scene: Scene,
    options: FrameOptions,
    extras: ExtraMeshes | None = None,
    frames_per_step: int = 1,
) -> Frame:
    """Renders T frames of one identity from C cameras in one jitted call (module docstring).

    Frames run `frames_per_step` at a time (vmapped), the cameras of a frame
    together; one program per (shapes, options).

    Args:
      model: the synthetic head model (with a UV layout).
      identity: the identity's shape and maps (`make_identity`).
      params: the frames' parameters, each field with a leading axis T.
      viewmats: (C, 4, 4) OpenCV world-to-camera matrices.
      Ks: (C, 3, 3) intrinsics for `options.size` pixels.
      scene: the sequence's lights and a background per camera (C, H, W, 3).
      options: static `FrameOptions`.
      extras: optional render-only meshes, vertices (T, Ve, 3) posed per frame.
      frames_per_step: frames vmapped together (memory grows with it).

    Returns:
      A `Frame` whose fields have leading axes (T, C).

    Raises:
      ValueError: on mismatched shapes (naming the argument).
    """
    model.require_uv("render_frames")
    size, cameras = options.size, np.shape(viewmats)[0]
    frames = np.shape(params.pose)[0]
    expected = {
        "viewmats": (np.shape(viewmats), (cameras, 4, 4)),
        "Ks": (np.shape(Ks), (cameras, 3, 3)),
        "scene.background": (np.shape(scene.background), (cameras, size, size, 3)),
        "params.pose": (np.shape(params.pose), (frames, 5, 3)),
        "params.translation": (np.shape(params.translation), (frames, 3)),
    }
    if extras is not None:
        expected["extras.vertices"] = (np.shape(extras.vertices)[:1], (frames,))
    for name, (got, want) in expected.items():
        if tuple(got) != want:
            raise ValueError(f"render_frames: {name} has shape {tuple(got)}, expected {want}")
    if np.ndim(params.expression) != 2 or np.shape(params.expression)[0] != frames:
        raise ValueError(
            f"render_frames: params.expression has shape {np.shape(params.expression)}, "
            f"expected ({frames}, E)"
        )
    return _render_frames(
        model,
        identity,
        params,
        jnp.asarray(viewmats, jnp.float32),
        jnp.asarray(Ks, jnp.float32),
        scene,
        extras,
        options=options,
        frames_per_step=max(1, min(int(frames_per_step), frames)),
    )


def render_frame(
    model: HeadModel,
    identity: Identity,
    params: FrameParams,
    viewmat: jax.Array,
    K: jax.Array,
    scene: Scene,
    options: FrameOptions,
    extras: ExtraMeshes | None = None,
) -> Frame:
    """Renders one frame from one camera (`render_frames` with T = C = 1).

    Args:
      model: the synthetic head model (with a UV layout).
      identity: the identity's shape and maps (`make_identity`).
      params: the frame's parameters (no leading axis).
      viewmat: (4, 4) OpenCV world-to-camera matrix.
      K: (3, 3) intrinsics for `options.size` pixels.
      scene: the sequence's lights and the background (H, W, 3).
      options: static `FrameOptions`.
      extras: optional render-only meshes posed with the frame (vertices (Ve, 3)).

    Returns:
      A `Frame` without leading axes.
    """
    add_axis = functools.partial(jax.tree.map, lambda x: jnp.asarray(x)[None])
    frame = render_frames(
        model,
        identity,
        add_axis(params),
        add_axis(viewmat),
        add_axis(K),
        Scene(scene.lights, add_axis(scene.background)),
        options,
        None if extras is None else dataclasses.replace(extras, vertices=add_axis(extras.vertices)),
    )
    return jax.tree.map(lambda x: x[0, 0], frame)
