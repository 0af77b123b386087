"""Write synthetic mouse samples in the user-facing sample format (DESIGN.md section 4).

A sample folder holds `images/cam_000.png ...` (8-bit RGBA, alpha = coverage of the mouse,
white where alpha is 0), `opencv_cameras.json` (w2c on disk; top-level `world_up` and, for
normalised samples, the `normalization` similarity from mm), `depth.npz` (each frame's depth map:
camera z of the surface under each pixel centre in the sample's units, 0 off the mouse; see
`mouserecon.data.DEPTH_FILE`) and `synth.json` (seed, mouse parameters, light, rig values, which
frames are rig views and which are held out).
Frames 0 .. n_views-1 are the rig views in azimuth order; held-out views follow them.

Units: "mm" writes the raw world (mm, +Z up, ground z = 0, cameras ~300-330 mm from the aim
point); "model" applies `mouserecon.normalize.normalize_cameras` (centre = least-squares
intersection of the optical axes, mean rig-camera distance 2.7, +Z up) to the rig views and the
same similarity to the held-out views. Everything is drawn from one numpy Generator seeded with
`seed`, so a seed gives identical files.

Varieties: "rig" (a rig like the real one aimed at the mouse, the classic mouse), "wide" (WIDE_RIG and
`widen`: rig, coat and light ranges beyond the real ones), "broad" (`mouse.sample_broad_params`: pose
families, real lab coats with glossy fur and pink skin, under `wide_light` with the energy-conserving
highlight; framed by `rig.sample_framed_rig`: mostly crops of a full 1152 x 1024 real-style rig aimed at
the arena, the mouse where real mice are). synth.json records the framing for every variety.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from mouserecon.cameras import Cameras, load_opencv_cameras, save_opencv_cameras
from mouserecon.data import DEPTH_FILE
from mouserecon.normalize import Similarity, normalize_cameras
from mouserecon.options import SYNTH_VARIETIES
from mouserecon.progress import progress
from mouserecon.synth.mouse import MouseParams, build_mouse, sample_broad_params, sample_params
from mouserecon.synth.rig import REAL_RIG, Framing, FramingConfig, RigConfig, sample_framed_rig, sample_rig
from mouserecon.synth.sdf import Shape
from mouserecon.synth.trace import Light, TraceConfig, render_depth, render_rgba

log = logging.getLogger(__name__)

UNITS = ("mm", "model")  # "model": normalised to the model's rig, the word every command uses
VARIETIES = SYNTH_VARIETIES

# variety="wide": ranges beyond the real rig and the coat table, for training models that must
# not learn the generator's look (cameras nearer/farther and wider/narrower, coats re-tinted,
# light from anywhere above, dim to harsh).
WIDE_RIG = RigConfig(low_elevation_deg=(-2.0, 8.0), high_elevation_deg=(12.0, 32.0), distance_mm=(260.0, 380.0),
                     hfov_deg=(32.0, 46.0), principal_jitter=0.06, roll_deg=4.0, look_jitter_mm=10.0,
                     gap_spread=0.25)


def sample_light(rng: np.random.Generator) -> Light:
    """A key light from above at a random azimuth, random strength, tint, ambient and shadow."""
    u = rng.uniform
    az, el = math.radians(u(0, 360)), math.radians(u(25, 85))
    warm = u(-0.08, 0.08)
    tint = np.array([1 + warm, 1.0, 1 - warm])
    key, ambient = u(0.7, 1.3) * tint, u(0.12, 0.45) * tint
    return Light(direction=(math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)),
                 key=tuple(key.tolist()), ambient=tuple(ambient.tolist()), shadow=u(0.4, 0.9),
                 shininess=u(12, 40))


def widen(params: MouseParams, light: Light, rng: np.random.Generator) -> tuple[MouseParams, Light]:
    """Re-draw coat brightness/tint and the light's strength/colour/direction over wide ranges."""
    u = rng.uniform
    brightness = u(0.85, 1.05) if params.coat == "white" else u(0.5, 1.6)
    params = replace(params, brightness=brightness, tint=tuple(u(0.8, 1.2, size=3).tolist()))
    return params, wide_light(light, rng)


def wide_light(light: Light, rng: np.random.Generator, tint_range: tuple[float, float] = (0.85, 1.15)) -> Light:
    """`light` with direction (any azimuth, elevation 10-90 deg), strength, colour (each channel x a factor
    from tint_range), shadow and shininess re-drawn over wide ranges."""
    u = rng.uniform
    az, el = math.radians(u(0, 360)), math.radians(u(10, 90))
    tint = u(*tint_range, size=3)
    return replace(light, direction=(math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)),
                   key=tuple((u(0.45, 1.6) * tint).tolist()), ambient=tuple((u(0.06, 0.6) * tint).tolist()),
                   shadow=u(0.2, 1.0), shininess=u(6, 60))


def draw_mouse(seed: int, variety: str) -> tuple[MouseParams, Light, np.random.Generator]:
    """The mouse and light of `seed` -> (mouse parameters, light, the generator, ready to draw the rig)."""
    if variety not in VARIETIES:
        raise ValueError(f"variety must be one of {VARIETIES}, got {variety!r}")
    rng = np.random.default_rng(seed)
    if variety == "broad":
        # A milder colour cast than wide's: +-15 % per channel turned albino mice green or violet.
        return sample_broad_params(rng), wide_light(Light(energy_conserving=True), rng, (0.92, 1.08)), rng
    params = sample_params(rng)
    light = sample_light(rng)
    if variety == "wide":
        params, light = widen(params, light, rng)
    return params, light, rng


def mouse_center(shape: Shape) -> np.ndarray:
    """Centre [3] (mm) of the mouse's torso box (body and head, not the tail)."""
    box = shape.parts[0].bounds().double().numpy()
    return box.mean(0)


def generate_sample(seed: int, out_dir: str | Path, resolution: int = 256, n_views: int = 6, n_heldout: int = 0,
                    units: str = "mm", rig: RigConfig | None = None, trace: TraceConfig = TraceConfig(),
                    variety: str = "rig", framing: FramingConfig = FramingConfig()) -> Path:
    """Draw mouse, light and rig from `seed`, render, and write the sample folder `out_dir`.

    Returns out_dir. Images are [resolution, resolution] RGBA; there are n_views + n_heldout frames.
    variety: VARIETIES (module docstring). rig: the rig's ranges, None = RigConfig() (rig), WIDE_RIG (wide)
    or the full-frame REAL_RIG (broad); framing: how broad frames the mouse (unused by rig and wide).
    The folder must not exist or be empty; it is written under a temporary name and renamed.
    """
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}, got {units!r}")
    if variety not in VARIETIES:
        raise ValueError(f"variety must be one of {VARIETIES}, got {variety!r}")
    if rig is None:
        rig = {"rig": RigConfig(), "wide": WIDE_RIG, "broad": REAL_RIG}[variety]
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: output folder exists and is not empty")
    params, light, rng = draw_mouse(seed, variety)
    shape = build_mouse(params)
    if variety == "broad":
        drawn, framed = sample_framed_rig(rng, shape.surface_samples(), mouse_center(shape), resolution, n_views,
                                          n_heldout, rig, framing)
    else:
        aim = mouse_center(shape) + rng.uniform(-5.0, 5.0, size=3)
        drawn, framed = sample_rig(rng, aim, resolution, n_views, n_heldout, rig), Framing("aimed")
    rgba = render_rgba(shape, drawn.cameras, light, trace)  # [V, H, W, 4]
    depth = render_depth(shape, drawn.cameras, trace, near_silhouette(rgba[..., 3]))  # [V, H, W] mm

    cameras, extra = drawn.cameras, {"world_up": [0.0, 0.0, 1.0]}
    if units == "model":
        _, similarity = normalize_cameras(cameras[:n_views])
        cameras = similarity.apply_cameras(cameras)
        depth = depth * similarity.scale
        extra["normalization"] = similarity.to_dict()

    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    files = [f"images/cam_{i:03d}.png" for i in range(len(cameras))]
    pixels = (rgba * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    for name, image in zip(files, pixels):
        iio.imwrite(tmp / name, image)
    save_opencv_cameras(tmp / "opencv_cameras.json", cameras, files, **extra)
    save_depth(tmp / DEPTH_FILE, depth)
    record = {
        "generator": "mouserecon.synth", "seed": seed, "variety": variety, "units": units, "resolution": resolution,
        "rig_views": list(range(n_views)), "heldout_views": list(range(n_views, n_views + n_heldout)),
        "mouse": asdict(params), "mouse_center_mm": mouse_center(shape).tolist(),
        "light": asdict(light), "rig": drawn.record(), "framing": framed.record(), "trace": asdict(trace),
    }
    (tmp / "synth.json").write_text(json.dumps(record, indent=1))
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    return out_dir


def generate_dataset(out_dir: str | Path, n: int, seed: int = 0, **sample_kwargs) -> list[Path]:
    """Write n samples `out_dir/sample_00000 ...` with seeds seed, seed + 1, ...; returns their folders."""
    assert n >= 1, f"n must be >= 1, got {n}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folders = []
    for i in progress(range(n), desc="synth", unit="sample"):
        folders.append(generate_sample(seed + i, out_dir / f"sample_{i:05d}", **sample_kwargs))
    log.info("wrote %d synthetic samples to %s", n, out_dir)
    return folders


def render_cameras(seed: int, cameras: Cameras, trace: TraceConfig = TraceConfig(),
                   variety: str = "rig") -> torch.Tensor:
    """The mouse and light of `seed` rendered from any cameras [V] in mm -> RGBA [V, H, W, 4]."""
    params, light, _ = draw_mouse(seed, variety)
    return render_rgba(build_mouse(params), cameras, light, trace)


def near_silhouette(alpha: torch.Tensor) -> torch.Tensor:
    """alpha [V, H, W] -> bool [V, H, W]: pixels with alpha > 0 and their neighbours, the pixels whose
    centre ray is traced for depth. A centre ray can hit where none of the pixel's sub-pixel rays
    did only on parts thinner than half a pixel; such pixels keep depth 0."""
    covered = (alpha > 0).float()[:, None]
    return torch.nn.functional.max_pool2d(covered, 3, stride=1, padding=1)[:, 0] > 0


def save_depth(path: Path, depth: torch.Tensor) -> None:
    """Write depth maps [F, H, W] (float32, 0 = no surface) as `mouserecon.data.DEPTH_FILE` expects."""
    np.savez_compressed(path, depth=depth.float().numpy())


def add_depth(folder: str | Path, trace: TraceConfig | None = None) -> Path:
    """Write `depth.npz` into a synthetic sample folder written without one (by an older version).

    The mouse is redrawn from `synth.json` (seed, variety) and traced from the folder's own cameras,
    mapped back to mm when the sample is normalised, at the pixels the images' alpha marks (see
    `near_silhouette`), as `generate_sample` does. Returns the depth file's path.
    """
    folder = Path(folder)
    record = json.loads((folder / "synth.json").read_text())
    camera_file = folder / "opencv_cameras.json"
    cameras, files = load_opencv_cameras(camera_file)
    to_mm = Similarity.identity()
    if record["units"] == "model":  # the similarity from mm, recorded beside the frames
        to_mm = Similarity.from_dict(json.loads(camera_file.read_text())["normalization"]).inverse()
    alpha = torch.stack([torch.from_numpy(iio.imread(folder / f)[..., 3].astype(np.float32)) for f in files])
    params, _, _ = draw_mouse(record["seed"], record["variety"])
    trace = TraceConfig(**record["trace"]) if trace is None else trace
    depth = render_depth(build_mouse(params), to_mm.apply_cameras(cameras), trace, near_silhouette(alpha))
    depth = depth / to_mm.scale
    path = folder / DEPTH_FILE
    save_depth(path, depth)
    return path
