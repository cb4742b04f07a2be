"""Randomised lighting, soft shadows and deferred shading for the synthetic renders.

Lights (`Lights`, world space, one set per sequence, drawn by `sample_lights(seed)`):

* `MAX_LIGHTS` directional lights, 2 to 4 of them active (inactive ones have
  zero colour), sorted by intensity so the key light comes first; each has a
  colour temperature (`kelvin_to_linear_rgb`, 2500 K to 9000 K) and an intensity;
  the key light comes from one side of the face (azimuth 20 to 90 degrees off
  the face's axis, elevation 5 to 60 degrees), the others from anywhere, rim
  lights from behind included;
* a hemisphere ambient: `sky` from above (world +y), `ground` (20 to 60% of
  the sky, tinted) from below, blended by the normal's up component;
* a total budget of 1.0 to 1.6 (linear) shared by ambient (8 to 30%), the key
  light (55 to 85% of the rest) and the other lights, so a white surface
  facing every light at once would just saturate;
* `specular_scale`: a per-sequence multiplier of the surfaces' shininess.

Shading (`shade`), per pixel and in linear light (display values such as the
albedo maps and the backgrounds are linearised with `to_linear`, gamma 2.2, and
the result is encoded back with `to_display`)::

    linear = albedo * (o hemisphere(n) + d sum_l c_l v_l wrap(n . l))
             + d sum_l c_l v_l k_s (n . h)^e [n . l > 0]

with n the unit normal, l the direction towards light l, h the half vector of
l and the direction to the camera (Blinn-Phong; x^e is evaluated with
Schlick's rational approximation x / (e - e x + x), much cheaper than a
power), c_l the light's colour, k_s and e the surface's specular strength and
exponent and o its ambient occlusion (`uika_jax.synthetic.materials`: soft
specular on skin, sharp and strong on the eyes), d = 1 - `DIRECT_OCCLUSION`
(1 - o) (creases also hide from most lights, which matters most without
shadow maps), wrap(x) = max(0, (x + w) / (1 + w)) with w = `DIFFUSE_WRAP` (a
soft terminator, as light scattered under the skin gives), and v_l in [0, 1]
the light's visibility (1 without shadows).

Shadows (`shadow_maps`, `shadow_visibility`): the posed meshes are rendered by
`render_mesh` from each shadowed light, a pinhole camera `SHADOW_DISTANCE` head
radii away looking at the head's bounding-box centre (nearly orthographic, the
head's bounding sphere filling the map). A surface point, first pushed along
its normal by `NORMAL_OFFSET` texels, is lit where its light-camera depth minus
`DEPTH_BIAS` texels is in front of the map; the comparison is averaged over a
4 x 4 block of texels around it (percentage-closer filtering), which softens
the shadow's edge to about two texels. Shadow maps give cast shadows (the
nose on the cheek, the jaw on the neck); where the surface turns away from
the light (n . l < `SHADOW_FADE`) the wrapped diffuse term does the
self-shadowing instead, so the terminator stays soft.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from uika_jax.render.mesh_render import render_mesh

MAX_LIGHTS = 4
"""Directional lights per scene (static; inactive ones have zero colour)."""
GAMMA = 2.2
"""Display values are linear values to the power 1 / GAMMA."""
DIFFUSE_WRAP = 0.2
"""Wrap of the diffuse term (0: Lambert)."""
DIRECT_OCCLUSION = 0.5
"""How much the ambient occlusion also dims the lights (0: ambient only, 1: fully)."""
SHADOW_DISTANCE = 12.0
"""A shadow camera's distance from the head's centre, in head radii."""
NORMAL_OFFSET = 1.5
"""Shadow lookups start this many shadow-map texels off the surface, along its normal."""
DEPTH_BIAS = 1.0
"""Depth bias of the shadow test, in shadow-map texels."""
SHADOW_FADE = 0.2
"""Cast shadows fade in as n . l grows from 0 to this."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Lights:
    """The lighting of one sequence, in world space (module docstring).

    Attributes:
      directions: (L, 3) unit directions towards the lights.
      colours: (L, 3) linear RGB radiance of each light (0 for an inactive one).
      sky: (3,) linear ambient radiance from above (world +y).
      ground: (3,) linear ambient radiance from below.
      specular_scale: () multiplier of every surface's specular strength.
    """

    directions: jax.Array
    colours: jax.Array
    sky: jax.Array
    ground: jax.Array
    specular_scale: jax.Array


def to_linear(display: jax.Array) -> jax.Array:
    """Converts display values in [0, 1] to linear light."""
    return jnp.clip(display, 0.0, 1.0) ** GAMMA


def to_display(linear: jax.Array) -> jax.Array:
    """Converts linear light to display values, clipping to [0, 1]."""
    return jnp.clip(linear, 1e-12, 1.0) ** (1.0 / GAMMA)


def kelvin_to_linear_rgb(kelvin: float) -> np.ndarray:
    """Returns the linear RGB (3,) of a black body at `kelvin`, with luminance 1.

    Tanner Helland's fit of the Planckian locus in display RGB (1000 K to 40000 K),
    linearised.
    """
    t = float(np.clip(kelvin, 1000.0, 40000.0)) / 100.0
    if t <= 66.0:
        red = 255.0
        green = 99.4708025861 * np.log(t) - 161.1195681661
        blue = 0.0 if t <= 19.0 else 138.5177312231 * np.log(t - 10.0) - 305.0447927307
    else:
        red = 329.698727446 * (t - 60.0) ** -0.1332047592
        green = 288.1221695283 * (t - 60.0) ** -0.0755148492
        blue = 255.0
    rgb = (np.clip([red, green, blue], 0.0, 255.0) / 255.0) ** GAMMA
    return (rgb / (rgb @ [0.2126, 0.7152, 0.0722])).astype(np.float32)


def _direction(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """Unit vector at an azimuth about +y (0: +z, in front of the face) and an elevation."""
    a, e = np.deg2rad(azimuth_deg), np.deg2rad(elevation_deg)
    return np.array([np.sin(a) * np.cos(e), np.sin(e), np.cos(a) * np.cos(e)], np.float32)


def ambient_lights(sky: float = 1.0, ground: float | None = None) -> Lights:
    """Returns lights with only a hemisphere ambient (no directional light, no specular).

    Args:
      sky: grey radiance from above.
      ground: grey radiance from below; None: the same as the sky (uniform ambient).
    """
    ground = sky if ground is None else ground
    return Lights(
        directions=np.tile(np.array([0.0, 0.0, 1.0], np.float32), (MAX_LIGHTS, 1)),
        colours=np.zeros((MAX_LIGHTS, 3), np.float32),
        sky=np.full(3, sky, np.float32),
        ground=np.full(3, ground, np.float32),
        specular_scale=np.float32(1.0),
    )


def sample_lights(seed: int) -> Lights:
    """Draws one sequence's lighting (module docstring), deterministic per seed.

    Args:
      seed: a non-negative int.
    """
    rng = np.random.default_rng([seed, 0x11647])
    count = int(rng.integers(2, MAX_LIGHTS + 1))
    budget = rng.uniform(1.0, 1.6)
    ambient = budget * rng.uniform(0.08, 0.3)
    key = (budget - ambient) * rng.uniform(0.55, 0.85)
    fills = (budget - ambient - key) * rng.dirichlet(np.ones(count - 1))
    side = rng.choice([-1.0, 1.0])
    directions = [_direction(side * rng.uniform(20.0, 90.0), rng.uniform(5.0, 60.0))]
    directions += [_direction(rng.uniform(-180.0, 180.0), rng.uniform(-25.0, 70.0)) for _ in fills]
    intensities = np.concatenate([[key], fills])
    colours = np.zeros((MAX_LIGHTS, 3), np.float32)
    lit = np.tile(np.array([0.0, 0.0, 1.0], np.float32), (MAX_LIGHTS, 1))
    for slot, index in enumerate(np.argsort(-intensities, kind="stable")):
        lit[slot] = directions[index]
        colours[slot] = intensities[index] * kelvin_to_linear_rgb(rng.uniform(2500.0, 9000.0))
    sky = ambient * kelvin_to_linear_rgb(rng.uniform(5500.0, 12000.0))
    ground_tint = np.clip(1.0 + rng.uniform(-0.3, 0.3, 3), 0.0, None)
    ground = ambient * rng.uniform(0.2, 0.6) * ground_tint
    return Lights(
        directions=lit,
        colours=colours,
        sky=sky.astype(np.float32),
        ground=ground.astype(np.float32),
        specular_scale=np.float32(rng.uniform(0.5, 1.5)),
    )


def _unit(x: jax.Array) -> jax.Array:
    """Scales vectors (..., 3) to unit length."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-20))


def shade(
    albedo: jax.Array,
    normals: jax.Array,
    to_camera: jax.Array,
    materials: jax.Array,
    lights: Lights,
    rotation: jax.Array,
    visibility: jax.Array | None = None,
) -> jax.Array:
    """Shades surface points in linear light (module docstring).

    Args:
      albedo: (..., 3) linear albedo.
      normals: (..., 3) unit camera-space normals.
      to_camera: (..., 3) unit camera-space directions from the points to the camera.
      materials: (..., 3) specular strength, specular exponent, ambient occlusion.
      lights: the scene's `Lights` (world space).
      rotation: (3, 3) world-to-camera rotation (a viewmat's upper left block).
      visibility: optional (..., L) light visibility in [0, 1]; None: all lit.

    Returns:
      (..., 3) linear radiance (not clipped).
    """
    strength, exponent, occlusion = (materials[..., i] for i in range(3))
    n = [normals[..., i] for i in range(3)]
    v = [to_camera[..., i] for i in range(3)]
    directions = _unit(jnp.asarray(lights.directions) @ rotation.T)
    colours = jnp.asarray(lights.colours)
    hemisphere = 0.5 + 0.5 * _dot(n, rotation[:, 1])
    sky, ground = jnp.asarray(lights.sky), jnp.asarray(lights.ground)
    direct = 1.0 - DIRECT_OCCLUSION * (1.0 - occlusion)
    irradiance = [occlusion * (ground[c] + (sky[c] - ground[c]) * hemisphere) for c in range(3)]
    reflected = [0.0, 0.0, 0.0]
    for light in range(directions.shape[0]):
        d = directions[light]
        cosine = _dot(n, d)
        diffuse = jnp.maximum((cosine + DIFFUSE_WRAP) / (1.0 + DIFFUSE_WRAP), 0.0)
        half = [d[i] + v[i] for i in range(3)]
        highlight = jnp.maximum(_dot(n, half), 0.0) * jax.lax.rsqrt(
            jnp.maximum(_dot(half, half), 1e-20)
        )
        lobe = highlight / (exponent - exponent * highlight + highlight + 1e-12)
        glossy = jnp.where(cosine > 0.0, lights.specular_scale * strength * lobe, 0.0)
        weight = direct
        if visibility is not None:
            weight = weight * (
                1.0 - (1.0 - visibility[..., light]) * jnp.clip(cosine / SHADOW_FADE, 0.0, 1.0)
            )
        for c in range(3):
            irradiance[c] = irradiance[c] + weight * diffuse * colours[light, c]
            reflected[c] = reflected[c] + weight * glossy * colours[light, c]
    return jnp.stack([albedo[..., c] * irradiance[c] + reflected[c] for c in range(3)], axis=-1)


def _dot(a, b) -> jax.Array:
    """Dot product of two 3-vectors given as sequences of components (arrays or scalars)."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def shadow_cameras(
    vertices: jax.Array, directions: jax.Array, size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns the shadow cameras of some lights: viewmats (L, 4, 4), Ks (L, 3, 3), texel (L,).

    Each looks at the centre of the vertices' bounding box from SHADOW_DISTANCE
    head radii along the light's direction, its map of `size` texels spanning the
    bounding sphere; `texel` is the world size of one texel at the centre.
    Jittable.

    Args:
      vertices: (V, 3) world positions of everything that casts shadows.
      directions: (L, 3) unit world directions towards the lights.
      size: shadow map side in texels.
    """
    low, high = jnp.min(vertices, axis=0), jnp.max(vertices, axis=0)
    centre = 0.5 * (low + high)
    radius = jnp.max(jnp.linalg.norm(vertices - centre, axis=-1))
    forward = -_unit(directions)
    up = jnp.where(
        jnp.abs(forward[:, 1:2]) > 0.99, jnp.array([0.0, 0.0, 1.0]), jnp.array([0.0, 1.0, 0.0])
    )
    right = _unit(jnp.cross(forward, up))
    down = jnp.cross(forward, right)
    rotation = jnp.stack([right, down, forward], axis=1)
    eye = centre - SHADOW_DISTANCE * radius * forward
    viewmats = jnp.zeros((directions.shape[0], 4, 4)).at[:, 3, 3].set(1.0)
    viewmats = viewmats.at[:, :3, :3].set(rotation)
    viewmats = viewmats.at[:, :3, 3].set(-jnp.einsum("lij,lj->li", rotation, eye))
    focal = 0.5 * size * SHADOW_DISTANCE
    K = jnp.array([[focal, 0.0, 0.5 * size], [0.0, focal, 0.5 * size], [0.0, 0.0, 1.0]])
    texel = jnp.full(directions.shape[0], 2.0 * radius / size)
    return viewmats, jnp.broadcast_to(K, (directions.shape[0], 3, 3)), texel


def shadow_maps(
    vertices: jax.Array,
    faces: jax.Array,
    directions: jax.Array,
    size: int,
    capacity: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Renders the depth maps of some lights (`shadow_cameras`, then `render_mesh`).

    Args:
      vertices: (V, 3) world positions of everything that casts shadows.
      faces: (F, 3) vertex indices.
      directions: (L, 3) unit world directions towards the lights.
      size: shadow map side in texels.
      capacity: rasterizer capacity of one map.

    Returns:
      (depth (L, size, size) with +inf where empty, viewmats, Ks, texel sizes, the
      rasterizer's overflow summed over the maps).
    """
    viewmats, Ks, texel = shadow_cameras(vertices, directions, size)

    def depth(viewmat, K):
        render = render_mesh(vertices, faces, viewmat, K, size, size, capacity=capacity)
        return render.depth, render.overflow

    depths, overflow = jax.vmap(depth)(viewmats, Ks)
    return depths, viewmats, Ks, texel, jnp.sum(overflow)


def shadow_visibility(
    points: jax.Array,
    normals: jax.Array,
    depths: jax.Array,
    viewmats: jax.Array,
    Ks: jax.Array,
    texel: jax.Array,
) -> jax.Array:
    """Returns (..., L) how much of each shadowed light reaches world points (module docstring).

    Args:
      points: (..., 3) world positions.
      normals: (..., 3) unit world normals.
      depths: (L, S, S) shadow depth maps (+inf where empty).
      viewmats: (L, 4, 4) their cameras.
      Ks: (L, 3, 3) their intrinsics.
      texel: (L,) world size of one texel.
    """
    size = depths.shape[-1]

    def one_light(depth, viewmat, K, texel):
        p = [points[..., i] + NORMAL_OFFSET * texel * normals[..., i] for i in range(3)]
        x, y, z = (_dot(p, viewmat[i, :3]) + viewmat[i, 3] for i in range(3))
        column = jnp.floor(x / z * K[0, 0] + K[0, 2] + 0.5).astype(jnp.int32)
        row = jnp.floor(y / z * K[1, 1] + K[1, 2] + 0.5).astype(jnp.int32)
        inside = (row >= 0) & (row <= size) & (column >= 0) & (column <= size)
        stored = _pcf_neighbourhoods(depth)[jnp.clip(row, 0, size), jnp.clip(column, 0, size)]
        lit = jnp.mean(((z - DEPTH_BIAS * texel)[..., None] <= stored).astype(jnp.float32), -1)
        return jnp.where(inside, lit, 1.0)

    return jax.vmap(one_light, out_axes=-1)(depths, viewmats, Ks, texel)


def _pcf_neighbourhoods(depth: jax.Array) -> jax.Array:
    """(S + 1, S + 1, 16): at (r, c) the depths of texels r - 2 .. r + 1 x c - 2 .. c + 1.

    Those are the 4 x 4 texels around a point whose image coordinates round to
    (c, r) (texel centres at + 0.5): one gather per point fetches its whole
    filter footprint. Texels off the map are +inf (lit).
    """
    size = depth.shape[-1]
    padded = jnp.pad(depth, 2, constant_values=jnp.inf)
    return jnp.stack(
        [padded[a : a + size + 1, b : b + size + 1] for a in range(4) for b in range(4)], axis=-1
    )
