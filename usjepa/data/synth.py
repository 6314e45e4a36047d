"""Synthetic B-mode ultrasound image folders: the project's embedded default data.

The images exist so that `usjepa demo` can show, offline and in minutes, that self-supervised
pretraining beats a random encoder. That only works if the classes differ in *structure*
(lesion shape, boundary, internal echo pattern, posterior shadowing or enhancement) and not in
global statistics that any random network reads off for free; hence every image is rescaled to
an in-FOV mean and spread drawn from one distribution shared by all classes.

Acquisition is simulated in beam space (depth x scan line): tissue sets scatterer amplitude,
density and attenuation; attenuation is accumulated along each scan line, so anything behind a
lesion is shadowed or enhanced for free; scatterers are convolved with a laterally elongated
complex point-spread function whose magnitude is Rayleigh-like speckle. The beam-space image is
log-compressed and scan-converted to a sector (convex/phased probe) or a rectangle (linear
probe) with a black surround that carries text, a depth ruler and sometimes calipers.

Lengths in the tissue model are in units of the displayed depth, so the same patient looks the
same at any output size.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage, signal

from usjepa.errors import UserError
from usjepa.fileio import atomic_write, make_folder

CLASS_NAMES: tuple[str, ...] = ("normal", "cyst", "solid", "calcified")
GROUP_PATTERN: str = r"^(patient\d+)_"

# Independent random streams under one user seed: an image's pixels depend only on (seed, its
# index, its class and patient), so any image can be re-rendered alone.
_LAYOUT_STREAM, _PATIENT_STREAM, _IMAGE_STREAM = 0, 1, 2
_IMAGES_PER_PATIENT = (3, 8)
_BODY_MARKS = ("ABD", "THY", "BR", "MSK", "RT", "LT", "LONG", "TRANS")


@dataclass(frozen=True)
class Patient:
    """What stays fixed across one simulated patient's images (probe, body habitus, presets)."""

    patient_id: str
    probe: str  # "sector" (convex or phased array) or "linear"
    depth_cm: float  # displayed depth; labels and ruler only
    frequency_mhz: float  # label only
    probe_radius: float  # convex radius / depth; 0 for linear
    half_angle: float  # sector half-opening in radians; 0 for linear
    aspect: float  # linear FOV width / depth; 0 for sector
    layers: tuple[float, float, float]  # skin, fat, muscle thickness (fraction of depth)
    echo: tuple[float, float, float, float]  # skin, fat, muscle, organ scatterer amplitude
    density: float  # probability that a beam-grid cell holds a scatterer
    psf: tuple[float, float]  # axial, lateral PSF sigma in beam-grid cells at 128 px
    attenuation_db: float  # round-trip loss over the full depth
    tgc_error: float  # fraction of that loss the TGC fails to undo (residual depth gradient)
    dynamic_range_db: float
    gain: float  # target in-FOV mean grey level
    contrast: float  # target in-FOV grey-level standard deviation


def sample_patient(rng: np.random.Generator, patient_id: str) -> Patient:
    """Draw one patient; nothing here depends on the class, so no class can be told by it."""
    sector = rng.random() < 0.5
    thin = 0.5 if sector else 1.0  # abdominal presets show more depth, so layers look thinner
    return Patient(
        patient_id=patient_id,
        probe="sector" if sector else "linear",
        depth_cm=float(rng.uniform(8, 16) if sector else rng.uniform(3, 6)),
        frequency_mhz=float(rng.choice([2.5, 3.5, 4.0, 5.0]) if sector else rng.choice([7.5, 10.0, 12.0])),
        probe_radius=float(rng.uniform(0.05, 0.45)) if sector else 0.0,
        half_angle=float(np.deg2rad(rng.uniform(26, 38))) if sector else 0.0,
        aspect=0.0 if sector else float(rng.uniform(0.75, 1.1)),
        layers=(
            float(rng.uniform(0.015, 0.035) * thin),
            float(rng.uniform(0.05, 0.2) * thin),
            float(rng.uniform(0.08, 0.2) * thin),
        ),
        echo=(
            float(rng.uniform(1.6, 2.4)),
            float(rng.uniform(0.3, 0.6)),
            float(rng.uniform(0.6, 1.0)),
            float(rng.uniform(0.8, 1.2)),
        ),
        density=float(rng.uniform(0.2, 0.7)),
        psf=(float(rng.uniform(0.55, 0.85)), float(rng.uniform(1.3, 2.2))),
        attenuation_db=float(rng.uniform(30, 50)),
        tgc_error=float(rng.uniform(-0.2, 0.2)),
        dynamic_range_db=float(rng.uniform(45, 60)),
        gain=float(rng.uniform(60, 100)),
        contrast=float(rng.uniform(26, 38)),
    )


@dataclass(frozen=True)
class _Geometry:
    """Beam grid <-> pixel mapping for one (patient, size)."""

    size: int
    mask: np.ndarray  # (size, size) bool field of view
    beam_index: np.ndarray  # (2, n_fov) fractional (depth row, scan line) of each FOV pixel
    z: np.ndarray  # (n, 1) depth of each beam row, 0..1
    lat: np.ndarray  # (1, n) scan-line position, 0..1 left to right
    x: np.ndarray  # (n, n) lateral position of each beam cell, depth units, 0 = centre line
    y: np.ndarray  # (n, n) vertical position, depth units, 0 = probe face on the centre line
    origin: tuple[float, float]  # pixel of (x, y) = (0, 0)
    scale: float  # pixels per depth unit
    right: float  # right-most FOV pixel column, where the ruler goes

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        return self.origin[0] + self.scale * x, self.origin[1] + self.scale * y


@functools.lru_cache(maxsize=64)
def _geometry(patient: Patient, size: int) -> _Geometry:
    """Probe geometry is a patient property, so consecutive images of a patient share it (cached)."""
    n = size
    z = np.linspace(0.0, 1.0, n)[:, None]
    lat = np.linspace(0.0, 1.0, n)[None, :]
    py, px = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    top = 0.06 * size  # room for a line of text above the FOV
    if patient.probe == "sector":
        r0, alpha = patient.probe_radius, patient.half_angle
        # The fan must fit between the top margin and the bottom, and between the side margins.
        scale = min(0.96 * size - top, (0.5 * size - 0.04 * size) / ((1 + r0) * math.sin(alpha)))
        cx, apex_y = 0.5 * size, top - r0 * scale
        r = np.hypot(px - cx, py - apex_y) / scale - r0
        theta = np.arctan2(px - cx, py - apex_y)
        depth, line = r, (theta + alpha) / (2 * alpha)
        angle = (2 * lat - 1) * alpha
        x = (r0 + z) * np.sin(angle)
        y = (r0 + z) * np.cos(angle) - r0
        origin, right = (cx, top), cx + (1 + r0) * math.sin(alpha) * scale
    else:
        # Side margins hold the ruler and text, as on real linear-probe screens.
        scale = min(0.96 * size - top, 0.74 * size / patient.aspect)
        width = patient.aspect * scale
        left = 0.5 * (size - width)
        depth, line = (py - top) / scale, (px - left) / width
        x = np.broadcast_to((lat - 0.5) * patient.aspect, (n, n)).copy()
        y = np.broadcast_to(z, (n, n)).copy()
        origin, right = (0.5 * size, top), left + width
    mask = (depth >= 0) & (depth <= 1) & (line >= 0) & (line <= 1)
    beam_index = np.stack([depth[mask] * (n - 1), line[mask] * (n - 1)])
    return _Geometry(size, mask, beam_index, z, lat, x, y, origin, scale, right)


@dataclass
class _Scene:
    """Per-beam-cell acoustic properties; lesions edit these in place before acquisition."""

    amplitude: np.ndarray  # incoherent scatterer strength
    density: np.ndarray  # scatterer probability per cell
    attenuation: np.ndarray  # one-way loss, dB per depth unit
    coherent: np.ndarray  # specular / point reflectors that do not speckle


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-variance noise with features about shape/cells across."""
    low = rng.standard_normal((cells + 1, cells + 1))
    field = ndimage.zoom(low, (shape[0] / (cells + 1), shape[1] / (cells + 1)), order=1)
    field = field[: shape[0], : shape[1]]
    return (field - field.mean()) / (field.std() + 1e-9)


def _wavy(rng: np.random.Generator, lat: np.ndarray, level: float, amplitude: float) -> np.ndarray:
    """An interface depth that undulates across the scan lines."""
    f1, f2 = rng.uniform(0.5, 1.5), rng.uniform(2, 4)
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    return level + amplitude * (np.sin(2 * np.pi * f1 * lat + p1) + 0.35 * np.sin(2 * np.pi * f2 * lat + p2))


def _tissue(rng: np.random.Generator, patient: Patient, geo: _Geometry) -> tuple[_Scene, np.ndarray]:
    """Skin, fat (with septa), muscle (fibrillar) and a homogeneous organ; returns the organ's top."""
    z, lat, n = geo.z, geo.lat, geo.size
    jitter = rng.uniform(0.85, 1.15, 3)  # the probe never sits in exactly the same place
    skin_t, fat_t, muscle_t = (t * j for t, j in zip(patient.layers, jitter))
    b_skin = _wavy(rng, lat, skin_t, 0.1 * skin_t)
    b_fat = _wavy(rng, lat, skin_t + fat_t, 0.25 * fat_t)
    b_muscle = _wavy(rng, lat, skin_t + fat_t + muscle_t, 0.2 * muscle_t)
    e_skin, e_fat, e_muscle, e_organ = np.array(patient.echo) * rng.uniform(0.9, 1.1, 4)

    organ = e_organ * np.exp(0.15 * _smooth_noise(rng, (n, n), 6))
    # Fat: hypoechoic with a few thin bright connective-tissue septa.
    septa = np.zeros((n, n))
    for _ in range(rng.integers(2, 6)):
        level = rng.uniform(0.2, 0.8) * fat_t + skin_t + rng.uniform(-0.1, 0.1) * (lat - 0.5)
        start, length = rng.uniform(-0.2, 0.8), rng.uniform(0.2, 0.7)
        inside = (lat > start) & (lat < start + length)
        septa += 2.5 * np.exp(-0.5 * ((z - level) / (0.6 / n)) ** 2) * inside
    fat = e_fat * (1 + septa)
    # Muscle: oblique fibrillar striations (pennate fibres seen longitudinally).
    period = rng.uniform(0.025, 0.045)
    tilt = rng.uniform(-0.15, 0.15)
    fibres = np.cos(2 * np.pi * (z + tilt * lat + 0.01 * np.sin(6 * lat)) / period)
    muscle = e_muscle * (0.75 + 0.6 * np.clip(fibres, 0, None) ** 3)

    layer = (z >= b_skin).astype(int) + (z >= b_fat) + (z >= b_muscle)  # 0 skin, 1 fat, 2 muscle, 3 organ
    amplitude = np.choose(layer, (e_skin, fat, muscle, organ))
    # Fascia: bright specular lines at the fat/muscle and muscle/organ interfaces.
    for boundary in (b_fat, b_muscle):
        amplitude = amplitude + 2.0 * np.exp(-0.5 * ((z - boundary) / (0.7 / n)) ** 2)
    # Fat has fewer, larger scatterers than parenchyma: coarser, less developed speckle.
    density = patient.density * np.array([1.0, 0.5, 0.8, 1.0])[layer]
    attenuation = np.full((n, n), patient.attenuation_db / 2)
    scene = _Scene(amplitude, density, attenuation, np.zeros((n, n)))
    return scene, b_muscle


def _shape(
    geo: _Geometry,
    centre: tuple[float, float],
    radius: float,
    aspect: float,
    angle: float,
    harmonics: tuple[tuple[int, float, float], ...] = (),
    spikes: tuple[tuple[int, float, float], ...] = (),
) -> np.ndarray:
    """Normalised radius of each beam cell w.r.t. a (deformed) ellipse: < 1 inside, 1 on the boundary.

    `harmonics` (k, amplitude, phase) make lobulated outlines; `spikes` are sharpened harmonics
    that make spiculated ones.
    """
    dx, dy = geo.x - centre[0], geo.y - centre[1]
    c, s = math.cos(angle), math.sin(angle)
    u, v = (c * dx + s * dy) / radius, (-s * dx + c * dy) / (radius * aspect)
    phi = np.arctan2(v, u)
    outline = np.ones_like(phi)
    for k, amp, phase in harmonics:
        outline += amp * np.cos(k * phi + phase)
    for k, amp, phase in spikes:
        outline += amp * np.clip(np.cos(k * phi + phase), 0, None) ** 6
    return np.hypot(u, v) / outline


def _inside(rho: np.ndarray, edge: float) -> np.ndarray:
    """Soft inside-weight (1 in, 0 out) with a boundary `edge` wide in normalised radius."""
    t = np.clip((1 - rho) / edge + 0.5, 0, 1)
    return t * t * (3 - 2 * t)


def _lerp_into(field: np.ndarray, weight: np.ndarray, value: float | np.ndarray) -> None:
    """Blend `field` towards `field * value` where weight is 1 (multiplicative, so textures survive)."""
    field *= 1 + weight * (np.asarray(value) - 1)


def _lesion_site(rng: np.random.Generator, geo: _Geometry, organ_top: np.ndarray, radius: float) -> tuple[float, float]:
    """A lesion centre (x, y in depth units) inside the organ, away from the FOV edges."""
    line = rng.uniform(0.22, 0.78)
    top = float(np.interp(line, geo.lat[0], organ_top[0])) + radius + 0.03
    depth = rng.uniform(min(top, 0.75 - radius), 0.82 - radius)
    j = line * (geo.size - 1)
    i = depth * (geo.size - 1)
    coords = np.array([[i], [j]])
    return (
        float(ndimage.map_coordinates(geo.x, coords, order=1)[0]),
        float(ndimage.map_coordinates(geo.y, coords, order=1)[0]),
    )


def _add_cyst(
    rng: np.random.Generator, scene: _Scene, geo: _Geometry, organ_top: np.ndarray
) -> tuple[tuple[float, float], float]:
    """Anechoic, smooth, sharply bounded; fluid barely attenuates, so the far side is enhanced."""
    radius = rng.uniform(0.10, 0.20)
    centre = _lesion_site(rng, geo, organ_top, radius)
    rho = _shape(geo, centre, radius, rng.uniform(0.65, 1.0), rng.uniform(0, np.pi))
    w = _inside(rho, edge=1.5 / (geo.size * radius))
    _lerp_into(scene.amplitude, w, rng.uniform(0.0, 0.04))
    wall = np.exp(-0.5 * ((rho - 1) / (1.0 / (geo.size * radius))) ** 2)
    # A thin wall that grazing beams cross for longer: this is what casts the edge shadows.
    scene.amplitude += 0.8 * wall * scene.amplitude.mean()
    _lerp_into(scene.attenuation, wall, 1.6)
    _lerp_into(scene.attenuation, w, rng.uniform(0.0, 0.15))
    return centre, radius


def _add_solid(
    rng: np.random.Generator, scene: _Scene, geo: _Geometry, organ_top: np.ndarray
) -> tuple[tuple[float, float], float]:
    """Hypoechoic, heterogeneous, lobulated or spiculated with a fuzzy edge; shadows behind."""
    radius = rng.uniform(0.12, 0.22)
    centre = _lesion_site(rng, geo, organ_top, radius)
    style = rng.integers(3)  # 0 lobulated, 1 spiculated, 2 both
    lobes = rng.choice(np.arange(2, 6), size=int(rng.integers(2, 4)), replace=False) if style != 1 else []
    harmonics = tuple((int(k), rng.uniform(0.06, 0.16), rng.uniform(0, 2 * np.pi)) for k in lobes)
    points = rng.integers(7, 15, size=2) if style != 0 else []
    spikes = tuple((int(k), rng.uniform(0.15, 0.35), rng.uniform(0, 2 * np.pi)) for k in points)
    rho = _shape(geo, centre, radius, rng.uniform(0.6, 1.3), rng.uniform(0, np.pi), harmonics, spikes)
    w = _inside(rho, edge=rng.uniform(0.1, 0.3) if style == 0 else rng.uniform(0.04, 0.12))
    n = geo.size
    interior = rng.uniform(0.25, 0.5) * np.exp(0.6 * _smooth_noise(rng, (n, n), 16))
    _lerp_into(scene.amplitude, w, interior)
    _lerp_into(scene.density, w, 0.6)
    if rng.random() < 0.3:  # echogenic halo
        scene.amplitude += 0.8 * np.exp(-0.5 * ((rho - 1.08) / 0.06) ** 2) * scene.amplitude.mean()
    _lerp_into(scene.attenuation, w, rng.uniform(1.6, 3.2))
    return centre, radius


def _gaussian_spot(geo: _Geometry, x0: float, y0: float, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * ((geo.x - x0) ** 2 + (geo.y - y0) ** 2) / sigma**2)


def _add_calcified(
    rng: np.random.Generator, scene: _Scene, geo: _Geometry, organ_top: np.ndarray
) -> tuple[tuple[float, float], float]:
    """A slightly heterogeneous region holding bright foci, each casting a narrow shadow."""
    radius = rng.uniform(0.12, 0.22)
    centre = _lesion_site(rng, geo, organ_top, radius)
    aspect, angle = rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    rho = _shape(geo, centre, radius, aspect, angle)
    n = geo.size
    # Texture change without a net brightness change: mean of exp(0.35 g) is ~1.06.
    _lerp_into(scene.amplitude, _inside(rho, 0.4), np.exp(0.35 * _smooth_noise(rng, (n, n), 24)))
    count = rng.integers(5, 11)
    r = radius * np.sqrt(rng.uniform(0.05, 1.0, count))
    t = rng.uniform(0, 2 * np.pi, count)
    c, s = math.cos(angle), math.sin(angle)
    u, v = r * np.cos(t), r * np.sin(t) * aspect
    fx, fy = centre[0] + c * u - s * v, centre[1] + s * u + c * v
    cell = 1.0 / n
    for x0, y0 in zip(fx, fy):
        sigma = rng.uniform(0.8, 1.6) * cell
        scene.coherent += rng.uniform(20, 40) * _gaussian_spot(geo, x0, y0, sigma)
        # Round-trip loss of 10-25 dB whatever the focus size; it sits just below the reflecting
        # surface, because the focus itself is bright and only what lies behind it is shadowed.
        scene.attenuation += (
            _gaussian_spot(geo, x0, y0 + 2 * sigma, sigma) * rng.uniform(5, 12.5) / (sigma * math.sqrt(2 * math.pi))
        )
    return centre, radius


def _add_vessel(rng: np.random.Generator, scene: _Scene, geo: _Geometry, organ_top: np.ndarray) -> None:
    """A vessel segment, cut along its axis, in any class: "something dark" alone is not a cyst."""
    radius = rng.uniform(0.015, 0.035)
    centre = _lesion_site(rng, geo, organ_top, radius + 0.03)
    angle, half_length = rng.uniform(-0.35, 0.35), rng.uniform(0.2, 0.5)
    dx, dy = geo.x - centre[0], geo.y - centre[1]
    along = np.abs(math.cos(angle) * dx + math.sin(angle) * dy) / half_length
    dist = np.abs(-math.sin(angle) * dx + math.cos(angle) * dy) / radius
    # The vessel leaves the image plane at its ends, so it tapers out instead of stopping.
    dist = dist / np.clip(1 - along**4, 1e-3, None)
    w = _inside(dist, 0.3)
    _lerp_into(scene.amplitude, w, 0.03)
    scene.amplitude += 0.8 * np.exp(-0.5 * ((dist - 1.1) / 0.25) ** 2) * scene.amplitude.mean()
    _lerp_into(scene.attenuation, w, 0.3)


def _add_rib(rng: np.random.Generator, scene: _Scene, geo: _Geometry, organ_top: np.ndarray) -> None:
    """A shallow bright reflector (rib or gas) that blanks everything beneath it, in any class."""
    line, half = rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.12)
    depth = float(np.interp(line, geo.lat[0], organ_top[0])) - rng.uniform(0.0, 0.03)
    arc = depth - 0.5 * half * (1 - ((geo.lat - line) / half) ** 2)
    width = 1.2 / geo.size
    across = np.abs(geo.lat - line) < half
    scene.coherent += 8 * np.exp(-0.5 * ((geo.z - arc) / width) ** 2) * across
    # Total reflection: ~60 dB round trip, starting just below the bright surface.
    shadow = np.exp(-0.5 * ((geo.z - arc - 2 * width) / width) ** 2) * across
    scene.attenuation += shadow * 30 / (width * math.sqrt(2 * math.pi))


_LESIONS = {"cyst": _add_cyst, "solid": _add_solid, "calcified": _add_calcified}


def _psf(patient: Patient, size: int) -> np.ndarray:
    """Complex pulse: Gaussian envelope, longer laterally than axially, with an axial carrier."""
    k = size / 128
    sa, sl = patient.psf[0] * k, patient.psf[1] * k
    ha, hl = int(math.ceil(3 * sa)), int(math.ceil(3 * sl))
    za, xl = np.mgrid[-ha : ha + 1, -hl : hl + 1].astype(np.float64)
    wavelength = max(2.5, 3.0 * sa)
    return np.exp(-0.5 * ((za / sa) ** 2 + (xl / sl) ** 2) + 2j * np.pi * za / wavelength)


def _acquire(rng: np.random.Generator, patient: Patient, scene: _Scene, geo: _Geometry) -> np.ndarray:
    """Log-compressed beam-space echo, 0 at the noise floor and 1 one dynamic range above it.

    Attenuation, TGC, beamforming (PSF) and envelope detection happen here; values above 1
    are strong reflectors and saturate later.
    """
    n = geo.size
    z = geo.z
    dz = 1.0 / (n - 1)
    loss_db = 2 * np.cumsum(scene.attenuation, axis=0) * dz
    # TGC undoes the nominal loss, imperfectly, plus a few dB of slider wiggle; a focal zone
    # is slightly brighter.
    wiggle = 2.5 * _smooth_noise(rng, (n, 1), 3)
    focus = rng.uniform(0.3, 0.7)
    focal_db = 3 * np.exp(-0.5 * ((z - focus) / 0.15) ** 2)
    tgc_db = patient.attenuation_db * (1 + patient.tgc_error) * z + wiggle + focal_db
    gain = 10 ** ((tgc_db - loss_db) / 20)
    present = rng.random((n, n)) < scene.density
    scatter = rng.standard_normal((n, n)) * scene.amplitude * present + scene.coherent
    rf = signal.fftconvolve(scatter * gain, _psf(patient, n), mode="same")
    # Receiver noise enters before the TGC amplifier, so it grows with depth: anechoic regions
    # are black near the probe and grainy grey deep down.
    noise_std = 0.05 * np.sqrt(patient.density * 20) * 10 ** ((tgc_db - patient.attenuation_db) / 20)
    rf = rf + noise_std * (rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n)))
    db = 20 * np.log10(np.abs(rf) + 1e-9)
    # Only the noise floor is clipped here: strong specular reflectors (calcifications, ribs)
    # must stay far above the speckle so that they saturate after grey-level mapping.
    floor = np.median(db) - 0.6 * patient.dynamic_range_db
    return np.clip((db - floor) / patient.dynamic_range_db, 0, None)


def _scan_convert(beam: np.ndarray, geo: _Geometry) -> np.ndarray:
    out = np.zeros((geo.size, geo.size))
    out[geo.mask] = ndimage.map_coordinates(beam, geo.beam_index, order=1, mode="nearest")
    return out


def _normalise(image: np.ndarray, mask: np.ndarray, mean: float, spread: float) -> np.ndarray:
    """Affine grey-level map giving the FOV this mean and tissue spread; black stays black outside.

    The spread is measured robustly (interquartile range) so that it is the tissue's: with the
    standard deviation, a large anechoic area or shadow would compress the tissue and turn
    black fluid grey.
    """
    values = image[mask]
    q25, q75 = np.percentile(values, [25, 75])
    scaled = (values - values.mean()) / ((q75 - q25) / 1.349 + 1e-9) * spread + mean
    # Clipping at 0 and 255 moves the mean by a class-dependent amount (anechoic cysts clip);
    # a few offset corrections put it back.
    for _ in range(4):
        scaled += mean - np.clip(scaled, 0, 255).mean()
    out = np.zeros(image.shape, dtype=np.uint8)
    out[mask] = np.round(np.clip(scaled, 0, 255)).astype(np.uint8)
    return out


@functools.lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _overlay(
    rng: np.random.Generator,
    image: np.ndarray,
    patient: Patient,
    geo: _Geometry,
    caliper_site: tuple[tuple[float, float], float] | None,
) -> np.ndarray:
    """Screen furniture: preset text, a depth ruler and sometimes a pair of '+' calipers."""
    size = geo.size
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    grey = int(rng.integers(170, 256))
    lines = [f"{patient.frequency_mhz:.1f} MHz", f"D {patient.depth_cm:.1f} cm", f"G {int(rng.integers(30, 80))}%"]
    keep = [line for line in lines if rng.random() < 0.7]
    mark, frame_rate = rng.random() < 0.6, rng.random() < 0.5
    font_px = round(size / 13)
    if font_px >= 5:  # smaller text is an unreadable smear that would cover the FOV
        font = _font(font_px)
        for row, text in enumerate(keep):
            draw.text((1, 1 + row * font_px), text, fill=grey, font=font)
        if mark:
            draw.text((0.72 * size, 1), str(rng.choice(_BODY_MARKS)), fill=grey, font=font)
        if frame_rate:
            draw.text((1, size - font_px - 2), f"FR {int(rng.integers(12, 40))}", fill=grey, font=font)
    # Depth ruler: one tick per cm along the right edge, a longer one every 5 cm.
    x = min(size - 3.0, geo.right + 0.02 * size)
    for cm in range(int(patient.depth_cm) + 1):
        y = geo.origin[1] + geo.scale * cm / patient.depth_cm
        tick = 0.03 * size if cm % 5 == 0 else 0.015 * size
        draw.line([(x, y), (x + tick, y)], fill=grey)
    if rng.random() < 0.35:
        if caliper_site is None:
            centre, radius = (rng.uniform(-0.15, 0.15), rng.uniform(0.4, 0.7)), rng.uniform(0.06, 0.15)
        else:
            centre, radius = caliper_site
        t = rng.uniform(0, np.pi)
        arm = max(1.5, 0.02 * size)
        for sign in (-1, 1):
            px, py = geo.to_pixel(centre[0] + sign * radius * math.cos(t), centre[1] + sign * radius * math.sin(t))
            draw.line([(px - arm, py), (px + arm, py)], fill=grey)
            draw.line([(px, py - arm), (px, py + arm)], fill=grey)
    return np.array(canvas)


def render_image(
    rng: np.random.Generator, class_name: str, patient: Patient, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One B-mode image, uint8 (size, size), and its FOV mask, bool (size, size)."""
    if class_name not in CLASS_NAMES:
        raise ValueError(f"unknown class {class_name!r}; expected one of {CLASS_NAMES}")
    geo = _geometry(patient, size)
    scene, organ_top = _tissue(rng, patient, geo)
    if rng.random() < 0.25:
        _add_vessel(rng, scene, geo, organ_top)
    if rng.random() < 0.15:
        _add_rib(rng, scene, geo, organ_top)
    site = None  # (centre, radius) of the last lesion, for the calipers
    if class_name != "normal":
        count = 1 if class_name == "calcified" else 1 + int(rng.random() < 0.25)
        for _ in range(count):
            site = _LESIONS[class_name](rng, scene, geo, organ_top)
    beam = _acquire(rng, patient, scene, geo)
    # Target grey levels come from the patient's presets plus per-image noise: the same
    # distribution for every class, so brightness and contrast say nothing about the class.
    mean = float(np.clip(patient.gain + rng.normal(0, 6), 45, 115))
    spread = patient.contrast * rng.uniform(0.9, 1.1)
    image = _normalise(_scan_convert(beam, geo), geo.mask, mean, spread)
    return _overlay(rng, image, patient, geo, site), geo.mask.copy()


def _split(rng: np.random.Generator, total: int) -> list[int]:
    """Split `total` images into per-patient counts of 3-8 (fewer only if total < 3)."""
    low, high = _IMAGES_PER_PATIENT
    counts = []
    while total > 0:
        k = min(int(rng.integers(low, high + 1)), total)
        if 0 < total - k < low:  # never leave the last patient with too few images
            k = total - low if total - low >= low else total
        counts.append(k)
        total -= k
    return counts


def plan_dataset(n: int, seed: int) -> list[tuple[int, str]]:
    """(patient number, class) for each image index.

    Classes are balanced to within one image and shuffled across patients, so a patient's
    identity (probe, FOV shape, body habitus) carries no class information even when a probe
    is evaluated on images of patients it was trained on.
    """
    rng = np.random.default_rng([seed, _LAYOUT_STREAM])
    k = len(CLASS_NAMES)
    labels = [CLASS_NAMES[i % k] for i in range(n)]
    labels = [labels[i] for i in rng.permutation(n)]
    counts = _split(rng, n)
    patients = np.repeat(np.arange(len(counts)), counts)
    return [(int(p), name) for p, name in zip(patients, labels)]


def _check_args(n: int, size: int) -> None:
    if n < len(CLASS_NAMES):
        raise UserError(f"--n {n} is too small; use at least {len(CLASS_NAMES)} (one image per class)")
    if size < 32:
        raise UserError(f"--size {size} is too small; use at least 32 pixels")


@dataclass(frozen=True)
class SyntheticImage:
    """One generated image with what the folder layout (and its tests) need."""

    index: int
    group: str
    class_name: str
    image: np.ndarray  # uint8 (size, size)
    mask: np.ndarray  # bool (size, size) field of view

    @property
    def relpath(self) -> str:
        """Where it goes under the output folder: <class>/<group>_<index>.png."""
        return f"{self.class_name}/{self.group}_{self.index:05d}.png"


def generate(n: int, size: int = 128, seed: int = 0) -> Iterator[SyntheticImage]:
    """The images `write_synthetic_dataset` writes, with their FOV masks, in index order.

    Image i is drawn from its own generator seeded by (seed, i), its patient's from
    (seed, patient number), so any image can be reproduced without rendering the others.
    """
    _check_args(n, size)
    patients: dict[int, Patient] = {}
    for index, (pid, name) in enumerate(plan_dataset(n, seed)):
        group = f"patient{pid:04d}"
        if pid not in patients:
            patients[pid] = sample_patient(np.random.default_rng([seed, _PATIENT_STREAM, pid]), group)
        image, mask = render_image(np.random.default_rng([seed, _IMAGE_STREAM, index]), name, patients[pid], size)
        yield SyntheticImage(index, group, name, image, mask)


def _write_png(image: np.ndarray, path: Path) -> None:
    """Write atomically, so an interrupted run never leaves a truncated PNG under a final name."""
    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


def write_synthetic_dataset(out, n: int, size: int = 128, seed: int = 0) -> dict:
    """Write n PNG images (8-bit grayscale) to OUT/<class_name>/<group>_<index:05d>.png.

    Deterministic for a given (n, size, seed). Returns
    {"n", "size", "seed", "classes": {name: count}, "groups": number of patients, "out"}.
    """
    out = Path(out)
    _check_args(n, size)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists and is not an empty folder; pass a new path or remove it")
    for name in CLASS_NAMES:
        make_folder(out / name, "the image folder", "choose a new folder path for OUT")
    counts = dict.fromkeys(CLASS_NAMES, 0)
    groups = set()
    for item in generate(n, size, seed):
        _write_png(item.image, out / item.relpath)
        counts[item.class_name] += 1
        groups.add(item.group)
    return {"n": n, "size": size, "seed": seed, "classes": counts, "groups": len(groups), "out": str(out)}


def _run_cli(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    summary = write_synthetic_dataset(args.out, args.n, size=args.size, seed=args.seed)
    classes = ", ".join(f"{name} {count}" for name, count in summary["classes"].items())
    print(
        f"synth: wrote {summary['n']} images ({classes}) from {summary['groups']} patients "
        f"to {summary['out']} in {time.perf_counter() - start:.1f} s"
    )
    return 0


def register_cli(subparsers) -> None:
    """Add `usjepa synth OUT --n N [--size S] [--seed K]`."""
    parser = subparsers.add_parser(
        "synth",
        description="Write N synthetic B-mode ultrasound PNGs to OUT/<class>/<patient>_<index>.png, "
        f"classes {', '.join(CLASS_NAMES)}, several images per simulated patient "
        f"(group regex {GROUP_PATTERN}). Same arguments, same bytes.",
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="output folder; must not exist or be empty")
    parser.add_argument("--n", type=int, required=True, help="number of images (at least one per class)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels, at least 32 (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.set_defaults(func=_run_cli)
