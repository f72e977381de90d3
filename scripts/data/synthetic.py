"""Seeded synthetic skulls with SkullBreak- and SkullFix-style defects.

Stand-in for SkullBreak / SkullFix (CQ500-derived, not downloadable here). A skull is a
star-shaped bony shell around a centre O: for every direction u (unit vector in the *skull frame*:
x left->right, y posterior->anterior, z inferior->superior) the bone spans the radii
[r_out(u) - t(u) / cos(a), r_out(u)], where r_out is a braincase shape (flattened temporal sides,
rounder occiput, steep forehead running down to the face, random axis lengths and smooth
spherical-harmonic bumps), t a variable bone thickness and a the angle between the surface normal
and u. The base is cut by a tilted plane, orbits and the foramen magnum are optional holes.
Both radial functions depend on the direction only, so they are tabulated on a (theta, phi)
grid once per skull and looked up per voxel (in slabs), which scales from 64^3 to 512^3.

A defect is a union of angular "caps" (superellipses in tangent-plane angles around a centre
direction, optionally with a rippled rim); it removes the bone of the whole shell thickness
inside it. implant = largest connected piece of (complete & defect), defective = complete -
implant, so complete == defective | implant exactly.

Physical size is fixed (field of view ``FOV_MM`` mm per axis, like SkullBreak's 512 x 0.4 mm);
``size`` only sets the sampling grid. Each case draws from ``numpy.random.default_rng([seed,
case_id])`` (skull) and ``[seed, case_id, 1 + k]`` (defect class k of DEFECT_KINDS), so a case
never depends on how many others, or which other defect classes, are generated.

CLI:
    python -m scripts.data.synthetic skullbreak --root data/synthetic --num_cases 4 --size 64 --seed 0
    python -m scripts.data.synthetic skullfix --root data/synthetic --num_cases 4 --size 64 --seed 0
    python -m scripts.data.synthetic preview data/synthetic out.png --case 0 --defect bilateral
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from monai.transforms.utils import get_largest_connected_component_mask
from scipy import ndimage
from scipy.spatial.transform import Rotation
from scipy.special import sph_harm_y_all

from scripts.io import load_mask, mask_spacing, save_mask
from scripts.outputs import first_hit

__all__ = [
    "FOV_MM",
    "SKULLBREAK_DEFECTS",
    "DEFECT_KINDS",
    "SKULLFIX_Z_FRACTION",
    "SmoothSphereField",
    "Skull",
    "Cap",
    "SyntheticCase",
    "sample_skull",
    "vary_head",
    "sample_defect",
    "apply_defect",
    "skullbreak_case",
    "skullfix_case",
    "generate_skullbreak",
    "generate_skullfix",
    "NAMED_DATASETS",
    "generator_command",
    "preview",
    "synthetic_ct",
]

FOV_MM = 204.8
SKULLBREAK_DEFECTS = ("bilateral", "frontoorbital", "parietotemporal", "random_1", "random_2")
# The synthetic SkullBreak sets the shipped configs and docs name, by folder: generator arguments. Not made on
# the fly: 160 skulls at 128^3 take about 40 min on 2 cores (measured 27 s for 2).
NAMED_DATASETS = {
    "synthetic": dict(num_cases=4, size=64, seed=0),
    "synth128": dict(num_cases=32, size=128, seed=0),
    "synth128_160": dict(num_cases=160, size=128, seed=0),
    "synth128_seed4242": dict(num_cases=8, size=128, seed=4242),
    # the widened heads of the shipped denoiser's training, validation and test sets (configs/splits/synthetic_wide.json)
    "synth128_wide": dict(num_cases=168, size=128, seed=0, head_scale=(0.8, 1.05), head_stretch=0.1),
    "synth128_wide_seed4242": dict(num_cases=8, size=128, seed=4242, head_scale=(0.8, 1.05), head_stretch=0.1),
}
DEFECT_KINDS = (*SKULLBREAK_DEFECTS, "skullfix")  # position k -> random stream [seed, case_id, 1 + k]
SKULLFIX_Z_FRACTION = 0.6  # SkullFix-like grids: size x size x round(0.6 * size), thicker slices
MIN_SIZE = 32  # at 6.4 mm voxels the 2-voxel bone is already 13 mm thick
_MIN_THICKNESS_VOXELS = 2.0
_SLAB_VOXELS = 1 << 22  # voxels evaluated at once (about 0.5 GB of temporaries at most)
# (theta, phi) table of 128 x 256 directions (1.4 deg): the radii are smooth, so linear
# interpolation errs by < 0.01 mm, far below a 0.4 mm voxel
_TABLE_THETA = 128
_LATERAL = np.array([1.0, 0.0, 0.0])
_ANTERIOR = np.array([0.0, 1.0, 0.0])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _direction(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """Skull-frame unit vector (3,): azimuth from anterior (+y) towards right (+x), elevation up."""
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    return np.array([np.cos(el) * np.sin(az), np.cos(el) * np.cos(az), np.sin(el)])


def _polar(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Polar angle in [0, pi] (from +z) and azimuth in [0, 2 pi) of unit vectors (..., 3)."""
    theta = np.arccos(np.clip(u[..., 2], -1.0, 1.0))
    phi = np.mod(np.arctan2(u[..., 1], u[..., 0]), 2 * np.pi)
    return theta, phi


@dataclass(frozen=True)
class SmoothSphereField:
    """Random smooth function on the unit sphere: real spherical harmonics of degree 2..L.

    The field is made mostly left-right symmetric (skulls are): f(u) = sym + asymmetry * anti,
    with sym / anti the even / odd parts under the mirror x -> -x.
    """

    coeffs: tuple[np.ndarray, ...]  # coeffs[i]: 2l+1 weights of degree l = i + 2
    asymmetry: float

    @classmethod
    def sample(cls, rng: np.random.Generator, sigmas: Sequence[float], asymmetry: float) -> SmoothSphereField:
        """sigmas[i] = standard deviation of the degree-(i + 2) weights."""
        return cls(tuple(rng.normal(0.0, s, 2 * degree + 1) for degree, s in enumerate(sigmas, start=2)), asymmetry)

    def _raw(self, u: np.ndarray) -> np.ndarray:
        theta, phi = _polar(u)
        top = len(self.coeffs) + 1
        y = sph_harm_y_all(top, top, theta, phi)  # (top + 1, 2 top + 1, ...), order m at index m
        out = np.zeros(u.shape[:-1])
        for degree, weights in enumerate(self.coeffs, start=2):
            out += weights[0] * y[degree, 0].real
            for m in range(1, degree + 1):
                out += np.sqrt(2.0) * (weights[m] * y[degree, m].real + weights[degree + m] * y[degree, m].imag)
        return out

    def __call__(self, u: np.ndarray) -> np.ndarray:
        """Field values (...,) at unit vectors u (..., 3)."""
        f, g = self._raw(u), self._raw(u * np.array([-1.0, 1.0, 1.0]))
        return 0.5 * (f + g) + self.asymmetry * 0.5 * (f - g)


@dataclass(frozen=True)
class Skull:
    """Parameters of one synthetic skull (lengths in mm, angles in radians).

    Skull frame = volume frame rotated by ``rotation`` about ``centre`` (small head tilts).
    """

    centre: np.ndarray  # (3,) position of O in the volume (mm, origin at voxel 0)
    rotation: np.ndarray  # (3, 3) skull frame -> volume frame
    half_width: float  # x semi-axis at the equator
    half_length: tuple[float, float]  # y semi-axes (anterior, posterior)
    height: float  # z semi-axis above the equator (vertex)
    depth: tuple[float, float, float]  # z semi-axes below the equator: (posterior, lateral, anterior)
    squareness: float  # superellipse exponent across x (> 2 flattens the temporal sides)
    taper: float  # forehead narrower than the parietal region: a(u) = a (1 - taper * u_y)
    radius_noise: SmoothSphereField  # relative (log) radius perturbation
    thickness: tuple[float, float, float, float]  # (vault, extra frontal, extra occipital, temporal thinning)
    thickness_noise: SmoothSphereField  # mm
    cut_depth: float  # cut plane below O at y = 0
    cut_tilt: float  # the plane rises anteriorly by this angle (negative: dips)
    orbits: tuple[float, float, float, float] | None  # (x offset, z centre, half width, half height)
    foramen: tuple[float, float, float] | None  # (y centre, half width, half length)

    def outer_radius(self, u: np.ndarray) -> np.ndarray:
        """Outer-surface radius (...,) in mm along unit vectors u (..., 3) of the skull frame."""
        ux, uy, uz = u[..., 0], u[..., 1], u[..., 2]
        a = self.half_width * (1.0 - self.taper * uy)
        b = np.where(uy >= 0, *self.half_length)
        back, side, front = self.depth
        # quadratic through (uy=-1: back, 0: side, 1: front) so the forehead runs steeply down
        low = side + 0.5 * (front - back) * uy + (0.5 * (front + back) - side) * uy**2
        c = np.where(uz >= 0, self.height, low)
        p = self.squareness
        norm = (np.abs(ux / a) ** p + ((uy / b) ** 2 + (uz / c) ** 2) ** (p / 2)) ** (1.0 / p)
        return np.exp(self.radius_noise(u)) / norm

    def bone_thickness(self, u: np.ndarray) -> np.ndarray:
        """Bone thickness (...,) in mm along the surface normal, before grid clamping."""
        vault, frontal, occipital, temporal = self.thickness
        bump = lambda d: np.exp((u @ _unit(np.asarray(d)) - 1.0) / 0.15)  # noqa: E731
        t = (
            vault
            + frontal * bump([0.0, 0.95, 0.1])
            + occipital * bump([0.0, -0.9, -0.4])
            - temporal * u[..., 0] ** 4
            + self.thickness_noise(u)
        )
        return np.clip(t, 4.0, 9.0)

    def to_skull_frame(self, index: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """Voxel indices (N, 3) -> skull-frame coordinates (N, 3) in mm relative to O."""
        return (index * np.asarray(spacing) - self.centre) @ self.rotation

    def _radius_tables(self, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inner and outer radius on a (theta, phi) grid, phi padded by one wrap-around column."""
        n_theta = _TABLE_THETA
        theta = (np.arange(n_theta) + 0.5) * np.pi / n_theta
        phi = np.arange(2 * n_theta) * np.pi / n_theta
        st = np.sin(theta)[:, None]
        u = np.stack(np.broadcast_arrays(st * np.cos(phi), st * np.sin(phi), np.cos(theta)[:, None]), -1)
        r = self.outer_radius(u)
        d = np.pi / n_theta
        r_theta = np.gradient(r, d, axis=0)
        r_phi = (np.roll(r, -1, 1) - np.roll(r, 1, 1)) / (2 * d)
        cos_normal = r / np.sqrt(r**2 + r_theta**2 + (r_phi / st) ** 2)
        # >= 2 voxels along the (approximately radial) normal, also on anisotropic grids
        t_min = _MIN_THICKNESS_VOXELS * np.linalg.norm((u @ self.rotation.T) * spacing, axis=-1)
        t = np.maximum(self.bone_thickness(u), t_min) / cos_normal
        wrap = lambda a: np.concatenate([a, a[:, :1]], axis=1)  # noqa: E731
        return wrap(r - t), wrap(r)

    def _kept(self, q: np.ndarray) -> np.ndarray:
        """False where the cut plane, the orbits or the foramen magnum remove bone; q (..., 3)."""
        x, y, z = q[..., 0], q[..., 1], q[..., 2]
        keep = z >= -self.cut_depth + np.tan(self.cut_tilt) * y
        if self.orbits is not None:
            dx, zc, w, h = self.orbits
            keep &= ~((y > 0) & ((np.abs(np.abs(x) - dx) / w) ** 2.2 + (np.abs(z - zc) / h) ** 2.2 < 1))
        if self.foramen is not None:
            yc, w, l = self.foramen
            keep &= ~((z < 0) & ((x / w) ** 2 + ((y - yc) / l) ** 2 < 1))
        return keep

    def mask(self, shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
        """Complete-skull mask, bool (X, Y, Z), on a grid of ``shape`` voxels of ``spacing`` mm."""
        spacing = np.asarray(spacing, dtype=float)
        r_in, r_out = self._radius_tables(spacing)
        r_lo, r_hi = r_in.min(), r_out.max()
        n_theta = r_in.shape[0]
        axes = [np.arange(n) * s - c for n, s, c in zip(shape, spacing, self.centre)]
        out = np.zeros(tuple(shape), dtype=bool)
        step = max(1, _SLAB_VOXELS // (shape[1] * shape[2]))
        for i0 in range(0, shape[0], step):
            x, y, z = axes[0][i0 : i0 + step, None, None], axes[1][None, :, None], axes[2][None, None, :]
            q = [x * self.rotation[0, k] + y * self.rotation[1, k] + z * self.rotation[2, k] for k in range(3)]
            rho = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
            cand = (rho >= r_lo) & (rho <= r_hi)
            qc, rc = np.stack([c[cand] for c in q], -1), rho[cand]
            theta, phi = _polar(qc / rc[:, None])
            coords = np.stack([theta * n_theta / np.pi - 0.5, phi * n_theta / np.pi])
            lo = ndimage.map_coordinates(r_in, coords, order=1, mode="nearest")
            hi = ndimage.map_coordinates(r_out, coords, order=1, mode="nearest")
            slab = out[i0 : i0 + step]
            slab[cand] = (rc >= lo) & (rc <= hi) & self._kept(qc)
        return out


def sample_skull(rng: np.random.Generator, orbits: bool = True, foramen: bool = True) -> Skull:
    """Draw one adult-like skull: length ~180-190 mm, width ~138-150 mm, vault ~130 mm high.

    O lies at the level of the greatest breadth (parietal eminences), about 75 mm below the
    vertex; the orbits sit 20-60 mm below O and the cut plane just under them.
    """
    half_width = rng.uniform(67.5, 72.5)
    half_length = (rng.uniform(88.0, 93.0), rng.uniform(91.0, 95.0))
    height = rng.uniform(72.0, 80.0)
    # like a gantry-tilted scan cropped just below the orbits: the plane dips anteriorly
    cut_depth, cut_tilt = rng.uniform(56.0, 62.0), np.radians(rng.uniform(-7.0, -2.0))
    centre = np.array(
        [
            FOV_MM / 2 + rng.normal(0.0, 1.5),
            FOV_MM / 2 + (half_length[1] - half_length[0]) / 2 + rng.normal(0.0, 1.5),
            FOV_MM / 2 + (cut_depth - height) / 2 + rng.normal(0.0, 1.5),
        ]
    )
    tilt = rng.uniform(-1.0, 1.0, 3) * np.array([3.0, 6.0, 3.0])  # yaw, pitch, roll (degrees)
    return Skull(
        centre=centre,
        rotation=Rotation.from_euler("zxy", tilt, degrees=True).as_matrix(),
        half_width=half_width,
        half_length=half_length,
        height=height,
        depth=(rng.uniform(72.0, 82.0), rng.uniform(100.0, 112.0), rng.uniform(135.0, 155.0)),
        squareness=rng.uniform(2.2, 2.6),
        taper=rng.uniform(0.10, 0.16),
        radius_noise=SmoothSphereField.sample(rng, (0.02, 0.012, 0.008), asymmetry=0.3),
        thickness=(rng.uniform(5.5, 6.5), rng.uniform(1.0, 2.0), rng.uniform(1.5, 2.5), rng.uniform(1.5, 2.0)),
        thickness_noise=SmoothSphereField.sample(rng, (0.4, 0.3), asymmetry=0.5),
        cut_depth=cut_depth,
        cut_tilt=cut_tilt,
        orbits=(rng.uniform(30.0, 34.0), rng.uniform(-42.0, -37.0), rng.uniform(17.0, 20.0), rng.uniform(15.0, 18.0))
        if orbits
        else None,
        foramen=(rng.uniform(-52.0, -46.0), rng.uniform(14.0, 17.0), rng.uniform(17.0, 21.0)) if foramen else None,
    )


@dataclass(frozen=True)
class Cap:
    """Patch of directions: superellipse |s/A|^p + |t/B|^p < rim(psi)^p in tangent-plane angles.

    s, t = angles of u away from ``centre`` towards ``axis`` and ``centre x axis``; the rim
    1 + sum_k a_k cos(k psi + phase_k) makes the outline irregular (ripple empty: smooth).
    """

    centre: np.ndarray  # (3,) unit vector, skull frame
    axis: np.ndarray  # (3,) unit vector orthogonal to centre (direction of the A half-angle)
    half_angles: tuple[float, float]  # (A, B) radians
    exponent: float  # 2 ellipse, larger -> rounded rectangle
    ripple: np.ndarray  # (K, 2): amplitude and phase of harmonics k = 2 .. K + 1

    def contains(self, u: np.ndarray) -> np.ndarray:
        """Boolean (N,) for unit vectors u (N, 3)."""
        c = u @ self.centre
        s = np.arctan2(u @ self.axis, c) / self.half_angles[0]
        t = np.arctan2(u @ np.cross(self.centre, self.axis), c) / self.half_angles[1]
        radius = (np.abs(s) ** self.exponent + np.abs(t) ** self.exponent) ** (1.0 / self.exponent)
        psi = np.arctan2(t, s)
        k = np.arange(2, len(self.ripple) + 2)
        rim = 1.0 + np.cos(np.outer(psi, k) + self.ripple[:, 1]) @ self.ripple[:, 0]
        return (c > 0) & (radius < rim)

    def point(self, s: float, t: float) -> np.ndarray:
        """Unit vector (3,) at tangent-plane angles (s, t) in radians."""
        return _unit(self.centre + np.tan(s) * self.axis + np.tan(t) * np.cross(self.centre, self.axis))


def _cap(
    skull: Skull,
    rng: np.random.Generator,
    centre: np.ndarray,
    hint: np.ndarray,
    half_mm: tuple[float, float],
    exponent: float = 2.0,
    irregularity: float = 0.0,
) -> Cap:
    """Cap of about ``half_mm`` half-extents on the outer surface, first axis along ``hint``."""
    centre = _unit(np.asarray(centre, dtype=float))
    axis = _unit(hint - (hint @ centre) * centre)
    radius = float(skull.outer_radius(centre))
    ripple = np.stack([irregularity * rng.uniform(0.3, 1.0, 4) / np.arange(1, 5), rng.uniform(0, 2 * np.pi, 4)], 1)
    return Cap(centre, axis, (half_mm[0] / radius, half_mm[1] / radius), exponent, ripple)


def _random_caps(skull: Skull, rng: np.random.Generator) -> tuple[Cap, ...]:
    """2-4 overlapping irregular blobs on the vault, each centred inside the previous one."""
    caps = [
        _cap(
            skull,
            rng,
            _direction(rng.uniform(-180, 180), rng.uniform(-10, 60)),
            _unit(rng.normal(size=3)),
            (rng.uniform(26, 40), rng.uniform(20, 32)),
            irregularity=0.35,
        )
    ]
    for _ in range(rng.integers(1, 4)):
        prev = caps[-1]
        angle, reach = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 0.8)
        centre = prev.point(reach * prev.half_angles[0] * np.cos(angle), reach * prev.half_angles[1] * np.sin(angle))
        if centre[2] < -0.3:  # keep the chain on the vault, well above the cut
            centre = _unit(centre * np.array([1.0, 1.0, 0.0]) + [0.0, 0.0, -0.3])
        half = (rng.uniform(18, 30), rng.uniform(15, 26))
        caps.append(_cap(skull, rng, centre, _unit(rng.normal(size=3)), half, irregularity=0.35))
    return tuple(caps)


def sample_defect(skull: Skull, kind: str, rng: np.random.Generator) -> tuple[Cap, ...]:
    """Caps (skull frame) of one defect of class ``kind`` (a SkullBreak class or "skullfix")."""
    if kind == "bilateral":  # large, across the midline on top, centred in front of or behind the vertex
        az = rng.uniform(-25, 25) + rng.choice([0.0, 180.0])
        centre = _direction(az, rng.uniform(60, 78))
        return (_cap(skull, rng, centre, _LATERAL, (rng.uniform(58, 70), rng.uniform(42, 52)), 2.2, 0.08),)
    if kind == "frontoorbital":  # frontal bone down into the orbital roofs
        centre = _direction(rng.uniform(-20, 20), rng.uniform(-8, 2))
        return (_cap(skull, rng, centre, _LATERAL, (rng.uniform(42, 55), rng.uniform(36, 44)), 2.5, 0.08),)
    if kind == "parietotemporal":  # one side, parietal and temporal squama
        centre = _direction(rng.choice([-1.0, 1.0]) * rng.uniform(80, 110), rng.uniform(-15, 5))
        return (_cap(skull, rng, centre, _ANTERIOR, (rng.uniform(50, 64), rng.uniform(38, 48)), 2.2, 0.08),)
    if kind in ("random_1", "random_2"):  # same recipe, independent random streams
        return _random_caps(skull, rng)
    if kind == "skullfix":  # rounded-rectangle craniotomy with a burr hole at each corner
        centre = _direction(rng.uniform(-180, 180), rng.uniform(0, 55))
        plate = _cap(skull, rng, centre, _unit(rng.normal(size=3)), (rng.uniform(30, 45), rng.uniform(25, 35)), 4.0)
        hole = rng.uniform(5.5, 7.0)
        hole_angle = hole / float(skull.outer_radius(centre))
        # hole centres just outside the rounded corners, so each hole shows as a round lobe
        s, t = (2.0 ** (-1.0 / plate.exponent) * h + 0.5 * hole_angle for h in plate.half_angles)
        holes = tuple(
            _cap(skull, rng, plate.point(sa * s, sb * t), plate.axis, (hole, hole)) for sa in (-1, 1) for sb in (-1, 1)
        )
        return (plate, *holes)
    raise ValueError(f"defect kind {kind!r} is not one of {DEFECT_KINDS}")


def apply_defect(
    complete: np.ndarray, skull: Skull, spacing: Sequence[float], caps: Sequence[Cap]
) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``caps`` out of a complete mask (X, Y, Z) -> (defective, implant), bool, disjoint.

    The implant is the largest 26-connected piece of bone inside the caps, so it is one piece.
    """
    index = np.argwhere(complete)
    u = _unit(skull.to_skull_frame(index, spacing))
    inside = np.zeros(len(index), dtype=bool)
    for cap in caps:
        inside |= cap.contains(u)
    implant = np.zeros_like(complete, dtype=bool)
    if inside.any():
        index = index[inside]
        box = tuple(slice(lo, hi + 1) for lo, hi in zip(index.min(0), index.max(0)))  # label the box only
        region = np.zeros_like(complete[box], dtype=bool)
        region[tuple((index - index.min(0)).T)] = True
        implant[box] = get_largest_connected_component_mask(region)
    return complete & ~implant, implant


@dataclass(frozen=True)
class SyntheticCase:
    """A complete skull on its grid; defects are cut on demand (one at a time keeps 512^3 light)."""

    case_id: int
    seed: int
    skull: Skull
    complete: np.ndarray  # bool (X, Y, Z)
    spacing: tuple[float, float, float]  # mm

    @property
    def affine(self) -> np.ndarray:
        """4x4 RAS voxel-to-mm affine, origin at voxel 0."""
        return np.diag([*self.spacing, 1.0])

    def defect(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(defective, implant) bool masks for ``kind`` in SKULLBREAK_DEFECTS or "skullfix"."""
        if kind not in DEFECT_KINDS:
            raise ValueError(f"defect kind {kind!r} is not one of {DEFECT_KINDS}")
        rng = np.random.default_rng([self.seed, self.case_id, 1 + DEFECT_KINDS.index(kind)])
        return apply_defect(self.complete, self.skull, self.spacing, sample_defect(self.skull, kind, rng))


def synthetic_ct(skull: np.ndarray, seed: int = 0, table_hu: float = 600.0, specks: int = 50) -> np.ndarray:
    """A head CT in Hounsfield units (int16, same shape) around a skull mask (X, Y, Z), for CT-input tests.

    Air -1000 HU; soft tissue 40 HU in the ellipsoid spanning the skull's bounding box (+2 voxels);
    bone 300..1500 HU; Gaussian noise (sigma 20 HU, so soft tissue stays far below a 150 HU bone
    threshold); a 2-voxel CT table of ``table_hu`` at the posterior border (y = 0, 1), apart from the
    skull; ``specks`` single noise voxels of 1200 HU in the air. The skull must leave y < 4 free.
    """
    skull = np.asarray(skull, dtype=bool)
    rng = np.random.default_rng(seed)
    lo, hi = np.argwhere(skull).min(0) - 2, np.argwhere(skull).max(0) + 2
    if lo[1] < 2:
        raise ValueError(f"synthetic_ct: the skull reaches y = {lo[1] + 2}; the table needs y < 4 free")
    grid = np.meshgrid(*(np.arange(n) for n in skull.shape), indexing="ij")
    head = sum(((g - (a + b) / 2) / ((b - a) / 2)) ** 2 for g, a, b in zip(grid, lo, hi)) <= 1.0
    ct = np.where(head, 40.0, -1000.0) + rng.normal(0.0, 20.0, skull.shape)
    ct[skull] = rng.uniform(300.0, 1500.0, int(skull.sum()))
    ct[:, :2, :] = table_hu
    air = np.flatnonzero(~head & ~skull & (grid[1] >= 2))
    ct.flat[rng.choice(air, specks, replace=False)] = 1200.0
    return np.round(ct).astype(np.int16)


def _check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def vary_head(skull: Skull, rng: np.random.Generator, scale: tuple[float, float], stretch: float) -> Skull:
    """``skull`` scaled by a factor drawn from ``scale`` (a child's to a large adult's head) and its width,
    length and height each stretched by a factor drawn from 1 +- ``stretch`` (long, narrow, short, flat
    heads), about its centre O; bone thickness, holes and the cut plane's angle stay."""
    factor = rng.uniform(*scale)
    width, length, height = factor * rng.uniform(1.0 - stretch, 1.0 + stretch, 3)
    offset = skull.centre - FOV_MM / 2
    return replace(
        skull,
        centre=FOV_MM / 2 + offset * np.array([width, length, height]),
        half_width=skull.half_width * width,
        half_length=tuple(b * length for b in skull.half_length),
        height=skull.height * height,
        depth=tuple(c * height for c in skull.depth),
        cut_depth=skull.cut_depth * height,
        orbits=None if skull.orbits is None else (skull.orbits[0] * width, skull.orbits[1] * height,
                                                  skull.orbits[2] * width, skull.orbits[3] * height),
        foramen=None if skull.foramen is None else (skull.foramen[0] * length, skull.foramen[1] * width,
                                                    skull.foramen[2] * length),
    )


def _make_case(case_id: int, seed: int, shape: tuple[int, int, int], head_scale: tuple[float, float] | None = None,
               head_stretch: float = 0.0) -> SyntheticCase:
    _check_positive_int("case_id", case_id, 0)
    spacing = tuple(FOV_MM / n for n in shape)
    skull = sample_skull(np.random.default_rng([seed, case_id]))
    if head_scale is not None or head_stretch:
        # a stream of its own ([seed, case_id, 0]), so the default skulls stay exactly as they were
        skull = vary_head(skull, np.random.default_rng([seed, case_id, 0]), head_scale or (1.0, 1.0), head_stretch)
    return SyntheticCase(case_id, seed, skull, skull.mask(shape, spacing), spacing)


def skullbreak_case(case_id: int, size: int = 64, seed: int = 0, head_scale: tuple[float, float] | None = None,
                    head_stretch: float = 0.0) -> SyntheticCase:
    """SkullBreak-like case: isotropic size^3 grid, spacing FOV_MM / size; ``head_scale`` / ``head_stretch``:
    :func:`vary_head` (default: the adult heads of :func:`sample_skull`)."""
    _check_positive_int("size", size, MIN_SIZE)
    return _make_case(case_id, seed, (size, size, size), head_scale, head_stretch)


def skullfix_case(case_id: int, size: int = 64, seed: int = 0) -> SyntheticCase:
    """SkullFix-like case: size x size x round(0.6 size) grid with thicker slices, same field of view."""
    _check_positive_int("size", size, MIN_SIZE)
    return _make_case(case_id, seed, (size, size, round(size * SKULLFIX_Z_FRACTION)))


def _defect_kinds(defects: str | Sequence[str]) -> tuple[str, ...]:
    kinds = tuple(defects.split(",")) if isinstance(defects, str) else tuple(defects)
    if not kinds or any(k not in SKULLBREAK_DEFECTS for k in kinds):
        raise ValueError(f"defects must be a non-empty subset of {SKULLBREAK_DEFECTS}, got {kinds!r}")
    return kinds


def _save(path: Path, mask: np.ndarray, affine: np.ndarray) -> None:
    save_mask(path, mask.astype(np.uint8), affine, overwrite=True)


def generate_skullbreak(
    root: str | os.PathLike = "data/synthetic",
    num_cases: int = 4,
    size: int = 64,
    seed: int = 0,
    defects: str | Sequence[str] = SKULLBREAK_DEFECTS,
    head_scale: tuple[float, float] | None = None,
    head_stretch: float = 0.0,
) -> str:
    """Write root/SkullBreak/{complete_skull, defective_skull/<defect>, implant/<defect>}/XXX.nrrd.

    ``head_scale`` (e.g. ``[0.8, 1.15]``) and ``head_stretch`` (e.g. ``0.1``) widen the heads'
    sizes and proportions (:func:`vary_head`). Returns the dataset folder root/SkullBreak.
    """
    _check_positive_int("num_cases", num_cases)
    kinds = _defect_kinds(defects)
    out = Path(root) / "SkullBreak"
    for case_id in range(num_cases):
        case = skullbreak_case(case_id, size, seed, None if head_scale is None else tuple(head_scale), head_stretch)
        name = f"{case_id:03d}.nrrd"
        _save(out / "complete_skull" / name, case.complete, case.affine)
        for kind in kinds:
            defective, implant = case.defect(kind)
            _save(out / "defective_skull" / kind / name, defective, case.affine)
            _save(out / "implant" / kind / name, implant, case.affine)
    return str(out)


def generate_skullfix(
    root: str | os.PathLike = "data/synthetic", num_cases: int = 4, size: int = 64, seed: int = 0
) -> str:
    """Write root/SkullFix/{complete_skull, defective_skull, implant}/XXX.nrrd (anisotropic grid).

    Returns the dataset folder root/SkullFix.
    """
    _check_positive_int("num_cases", num_cases)
    out = Path(root) / "SkullFix"
    for case_id in range(num_cases):
        case = skullfix_case(case_id, size, seed)
        defective, implant = case.defect("skullfix")
        name = f"{case_id:03d}.nrrd"
        for folder, mask in (("complete_skull", case.complete), ("defective_skull", defective), ("implant", implant)):
            _save(out / folder / name, mask, case.affine)
    return str(out)


# ----------------------------------------------------------------------------------------------
# preview
# ----------------------------------------------------------------------------------------------

# (name, transpose to (rows, cols, depth), flips) so that each render is seen as a viewer would:
# rows top->bottom, cols left->right, depth away from the viewer.
_VIEWS = (
    ("anterior", (2, 0, 1), (True, True, True)),
    ("left", (2, 1, 0), (True, True, False)),
    ("right", (2, 1, 0), (True, False, True)),
    ("posterior", (2, 0, 1), (True, False, False)),
    ("superior", (1, 0, 2), (True, False, True)),
)
_COLOURS = np.array([[1.0, 1.0, 1.0], [0.93, 0.89, 0.78], [0.85, 0.15, 0.12]])  # background, bone, implant
_LIGHT = _unit(np.array([-0.4, 0.5, 0.8]))


def _oriented(a: np.ndarray, transpose: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    a = np.transpose(a, transpose)
    return a[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]


def _render(labels: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Lambert-shaded depth render of labels (rows, cols, depth) seen from depth 0 -> RGB (rows, cols, 3)."""
    seen, first = first_hit(labels > 0, axis=2, from_end=False)
    depth = np.where(seen, first * spacing[2], 0.0)
    # median: drop single pixels that look through a stair step of the cut edge; then a
    # normalised convolution smooths the voxel terraces without blending in the background
    depth = np.where(seen, ndimage.median_filter(depth, size=3), 0.0)
    weight = ndimage.gaussian_filter(seen.astype(float), 1.0)
    depth = ndimage.gaussian_filter(depth, 1.0) / np.maximum(weight, 1e-6)
    # surface height towards the viewer; screen y points up, i.e. against the row index
    d_row, d_col = np.gradient(-depth, spacing[0], spacing[1])
    normal = _unit(np.stack([-d_col, d_row, np.ones_like(depth)], -1))
    shade = 0.25 + 0.75 * np.clip(normal @ _LIGHT, 0.0, 1.0)
    label = np.take_along_axis(labels, first[..., None], axis=2)[..., 0]
    rgb = _COLOURS[label] * np.where(seen, shade, 1.0)[..., None]
    return np.clip(rgb, 0.0, 1.0)


def _resolve_preview_files(source: Path, case: int, defect: str | None) -> tuple[Path, Path | None]:
    """Map a dataset folder (root, root/SkullBreak or root/SkullFix) to (defective, implant) files."""
    if source.is_file():
        return source, None
    name = f"{int(case):03d}.nrrd"
    for base in (source, source / "SkullBreak", source / "SkullFix"):
        if (base / "defective_skull" / name).is_file():
            return base / "defective_skull" / name, base / "implant" / name
        kind = defect or SKULLBREAK_DEFECTS[0]
        if (base / "defective_skull" / kind / name).is_file():
            return base / "defective_skull" / kind / name, base / "implant" / kind / name
    raise FileNotFoundError(f"{source}: no defective_skull/{name} or defective_skull/<defect>/{name} found")


def preview(
    source: str | os.PathLike,
    out_png: str | os.PathLike,
    case: int = 0,
    defect: str | None = None,
    implant: str | os.PathLike | None = None,
    title: str | None = None,
) -> str:
    """Write a PNG: shaded renders from five sides + axial/coronal/sagittal slices through the implant.

    Args:
        source: a skull mask file, or a dataset folder (root, root/SkullBreak, root/SkullFix);
            for a folder the defective skull and implant of ``case`` (and ``defect``, SkullBreak,
            default "bilateral") are shown.
        out_png: output image.
        implant: implant mask file drawn in red (only with a mask file as ``source``).
        title: figure title (default: the skull file name).
    Returns:
        ``out_png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skull_file, implant_file = _resolve_preview_files(Path(source), case, defect)
    implant_file = Path(implant) if implant is not None else implant_file
    skull_img = load_mask(skull_file)
    labels = np.asarray(skull_img[0], dtype=np.uint8)
    spacing = mask_spacing(skull_img)
    if implant_file is not None:
        implant_mask = np.asarray(load_mask(implant_file)[0]) > 0
        if implant_mask.shape != labels.shape:
            raise ValueError(f"{implant_file}: shape {implant_mask.shape} != skull shape {labels.shape}")
        labels[implant_mask] = 2
    centre = np.argwhere(labels == 2).mean(0) if (labels == 2).any() else np.array(labels.shape) / 2
    centre = np.round(centre).astype(int)

    fig, axes = plt.subplots(2, 4, figsize=(16, 8.5))
    panels = [(name, _oriented(labels, t, f), spacing[list(t)]) for name, t, f in _VIEWS]
    for ax, (name, oriented, sp) in zip(axes.flat, panels):
        ax.imshow(_render(oriented, sp), aspect=sp[0] / sp[1], interpolation="nearest")
        ax.set_title(name)
    slices = (
        ("axial z=%d", labels[:, :, centre[2]].T[::-1, :], spacing[1] / spacing[0]),
        ("coronal y=%d", labels[:, centre[1], :].T[::-1, :], spacing[2] / spacing[0]),
        ("sagittal x=%d", labels[centre[0], :, :].T[::-1, ::-1], spacing[2] / spacing[1]),
    )
    for ax, (name, image, aspect), index in zip(axes.flat[5:], slices, centre[::-1]):
        ax.imshow(_COLOURS[image] * np.where(image > 0, 0.9, 1.0)[..., None], aspect=aspect, interpolation="nearest")
        ax.set_title(name % index)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(title or str(skull_file))
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return str(out_png)


def generator_command(root: str | os.PathLike) -> str | None:
    """The command that writes the named synthetic SkullBreak set ``root`` (see NAMED_DATASETS), run from the
    bundle root; None for another folder name."""
    args = NAMED_DATASETS.get(Path(root).name)
    if args is None:
        return None
    bundle = Path(__file__).resolve().parents[2]
    shell = lambda v: shlex.quote(f"[{','.join(map(str, v))}]") if isinstance(v, tuple) else v  # noqa: E731
    flags = " ".join(f"--{k} {shell(v)}" for k, v in args.items())
    return f"cd {bundle} && python -m scripts.data.synthetic skullbreak --root {Path(root).resolve()} {flags}"


if __name__ == "__main__":
    import fire

    fire.Fire({"skullbreak": generate_skullbreak, "skullfix": generate_skullfix, "preview": preview})
