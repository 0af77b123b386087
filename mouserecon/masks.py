"""Foreground masks of raw rig frames (background subtraction), user masks, and their 3D consistency.

Background subtraction, per camera (`fit_foreground` once, then `Foreground.alpha` per frame). Every
rule works on the camera's own data; no threshold is tuned to one look of mouse or arena:

1. Background: the per-pixel temporal median of frames sampled across the recording, each divided by
   its flicker gain first (`median_background`). Valid where the mouse covers each pixel in fewer than
   half of them; a mouse that sits still for most of the samples is baked into the background (pass
   an empty-arena clip).
2. Working resolution: frames are area-averaged by an integer factor to a longer side of about
   `WORK_SIDE` px (x2 at 1152x1024). This halves the sensor noise and makes the stage cheap; the soft
   mask is resampled (bilinear) to full size at the end.
3. Gain (light flicker): per colour channel, g_c = median over pixels of frame_c / background_c
   (pixels with background >= `GAIN_MIN_LEVEL`, on a sparse grid). The mouse covers a few % of the
   image, so it barely moves the median. The background is scaled by g before any comparison.
4. Colour distance d = |frame - g * background| (RGB, 0-255 units).
5. Threshold from the camera's noise: over the sample frames, d of background pixels is noise; with the
   mouse a small fraction, median m and MAD of d are the noise's (robust). Threshold
   T = max(`THRESHOLD_FLOOR`, m + `NOISE_MULTIPLE` * 1.4826 * MAD). For Gaussian noise of per-channel
   sigma, d / sigma follows a chi distribution with 3 degrees of freedom: m = 1.54 sigma,
   1.4826 MAD = 0.68 sigma, T = 4.95 sigma and a background pixel exceeds it with probability 2e-5
   (morphology removes the rest). Saturated background pixels (a channel <= 2 or >= 253: clipped
   walls, lamps) carry no noise and are left out of the statistics.
6. Shadows (Horprasert et al. 1999; Cucchiara et al. 2003): a pixel above T is shadow, not mouse,
   when it is a darkened copy of the background: brightness ratio a = (I . B) / (B . B) in
   [`SHADOW_RATIO_MIN`, 1) and chromaticity distortion |I - a B| within max(T, `CHROMA_TOLERANCE`
   * a |B|) (noise, or ~3 deg in RGB), and it lies in a broad region of such pixels (opening with a
   5-px disk at the working size, ~1 % of the longer side): soft overhead light casts broad shadows,
   while thin shadow-coloured structures are the mouse (a dark tail, the mixed rim of a dark body).
   Soft overhead shadows darken the floor by 10-40 %; black fur reflects well under half of what a
   floor it is filmed on does, so it stays foreground. The limit of the rule: a dark mouse on a floor
   less than ~1.7x brighter than its fur, whose broad parts read as shadow (hole filling restores the
   interior, not the rim).
7. Texture (Heikkilae & Pietikaeinen 2006; NCC shadow tests: Tian et al. 2005, Sanin et al. 2012): a
   shadow or flicker scales the floor and keeps its texture; a mouse replaces it. r = normalised
   cross-correlation of the frame's luma with the background's in the `TEXTURE_WINDOW` (5 x 5) window
   around each pixel. Used only where the background is textured: its local luma std >= `TEXTURE_SNR`
   noise sigmas (sigma = noise median / 1.54, step 5), where kept texture correlates at r ~ 0.9 (0.8 at
   60 % light). There r < `TEXTURE_CORRELATION` (0.35: the one-sided 5 % level of a test for positive correlation
   over 25 independent samples) says "not the floor's texture". A window straddling the mouse's edge reads low too, so
   the cue is trusted a window deep: `core` pixels are those every window holding them reads low.
   (a) Shadow veto: shadow-coloured candidates whose texture is gone, in a connected region holding a
   core pixel one pixel deeper still, are not shadow (a shaded white body is a darker copy of a white
   floor with the same chroma). (b) Hysteresis: colour foreground grows into the core it touches (the
   parts of a white mouse as bright as its floor). Measured on `synth-recording`s (H.264, 288 x 256, IoU
   of mask > 0.5 with the empty-arena clip as background, mean / worst frame over 6 cameras): white
   mouse on a white grainy floor 0.659 / 0.335 -> 0.859 / 0.614; agouti 0.951 / 0.884 -> 0.948 / 0.882;
   a walking mouse 0.969 / 0.913 -> 0.968 / 0.913. Vetoing every low-r pixel takes the shadow beside
   the mouse (agouti 0.921); vetoing only core pixels, without the hysteresis, too few of the white
   body (0.716: its fur's own texture correlates with the floor's by chance here and there). The limit: within a window
   of the edge the cue says nothing, so a rim as bright as the floor is still lost; on a textureless
   floor it does nothing (and costs nothing; else ~4 ms a 1152 x 1024 frame on one core).
8. Clean-up on the binary mask (kernels scaled to the image): opening (removes salt noise and
   isolated compression blocks), closing (bridges fur gaps), connected components: the largest one
   plus every other one at least `KEEP_FRACTION` of its area (a tail the closing could not join),
   holes filled (fur that matches the floor; note that a tail loop enclosing floor is filled too).
9. Soft edge: 1 inside; on the one-pixel ring around the edge, the fraction of the local mouse-floor
   contrast the pixel shows (a pixel mixing the two by alpha is alpha of the way from floor to mouse),
   so the 0.5 level sits at the sub-pixel edge whatever the contrast (a plain threshold grows the
   mask of a high-contrast mouse by its blurred edge and shrinks a low-contrast one).

Consistency (`hull_consistency`): the masks of one frame, undistorted, against each other in 3D through
the visual hull; see its docstring for what the scores mean. User masks: `read_mask` (image files)
and `mask_from_frame` (decoded mask-video frames).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import cv2
import numpy as np
import torch

from mouserecon.cameras import Cameras
from mouserecon.carve import project_to_masks
from mouserecon.errors import MouseReconError

log = logging.getLogger(__name__)

WORK_SIDE = 576  # longer side (px) background subtraction works at, reached by an integer area-average
GAIN_MIN_LEVEL = 16  # background level (0-255) below which a pixel's frame/background ratio is too noisy
GAIN_RANGE = (0.5, 2.0)  # a frame whose gain leaves this range is not flicker: the lighting changed
NOISE_MULTIPLE = 5.0  # robust sigmas of d above its median (4.95 Gaussian sigma, false-positive rate 2e-5)
THRESHOLD_FLOOR = 8.0  # minimum colour distance (0-255): quantisation and compression on noiseless video
SHADOW_RATIO_MIN = 0.6  # a shadow keeps at least 60 % of the floor's brightness (soft overhead light: 60-90 %)
CHROMA_TOLERANCE = 0.05  # a shadow's colour stays within this fraction of its brightness (~3 deg)
TEXTURE_WINDOW = 5  # px (working resolution): the window of the frame-background correlation (25 samples)
TEXTURE_SNR = 2.0  # textured: the background's local std >= this many noise sigmas (kept texture: r ~ 0.9)
TEXTURE_CORRELATION = 0.35  # r below this: the texture is not the floor's (no significant correlation, 5 %)
KEEP_FRACTION = 0.02  # a component at least this fraction of the largest is kept (e.g. a detached tail)
MIN_AREA_FRACTION = 2e-3  # a mask smaller than this fraction of the image "sees no mouse" (a mouse fills a few %)
CONSISTENCY_MIN = 0.8  # a view whose mask the hull of all views covers less than this is suspect (evidence:
# hull_consistency's docstring and tests/test_masks.py)
HULL_SIDE = 256  # longer side (px) the consistency check works at
HULL_GRID = 64  # voxels along the longest side of the hull's box
HULL_DILATION_PX = 1  # masks are dilated by this (working px) when carving: calibration and rounding error
BOX_SAFETY = 1.5  # the search box is this much larger than the masks' back-projected extent


class MaskError(MouseReconError, ValueError):
    """A mask, background or frame cannot be used; the message names the file or camera and the defect."""


class ForegroundStats(TypedDict):
    """A camera's background model, for the manifest (colour distances in 0-255 units)."""

    camera: str
    threshold: float  # colour distance above which a pixel is foreground (unless shadow)
    noise_median: float  # median colour distance of the sample frames to the background
    noise_scale: float  # 1.4826 * MAD of that distance
    work_factor: int  # frames are area-averaged by this factor before subtraction
    sample_frames: int
    gain_min: float  # extremes of the mean per-channel gain over the sample and masked frames
    gain_max: float


class MaskStatistics(TypedDict):
    area_fraction: float  # fraction of pixels with alpha >= 0.5
    bbox: list[int] | None  # [x0, y0, x1, y1] of those pixels, pixel edges (x1, y1 exclusive); None if empty
    components: int  # 8-connected components of alpha >= 0.5


# ---- background ------------------------------------------------------------------------------------


def median_background(frames: Sequence[np.ndarray], chunk_rows: int = 64) -> np.ndarray:
    """Per-pixel temporal median of frames [N] x uint8 [H, W, 3] -> uint8 [H, W, 3], flicker-compensated.

    Flicker biases a plain median wherever the mouse covers a pixel in some of the frames: the dark (or
    bright) mouse values sort to one end and the median becomes a clean frame from the other end of the
    brightness range, a ghost of the mouse of up to half the flicker amplitude. So: a first median,
    each frame's per-channel gain against it (median ratio, as `Foreground`), and the median of the
    frames divided by their gains. Computed in bands of `chunk_rows` rows (memory beyond the frames:
    N x chunk_rows x W x 3 bytes). Frames should be spread over the recording so the mouse covers each
    pixel in fewer than half of them.
    """
    if len(frames) == 0:
        raise MaskError("median_background: no frames")
    shape = frames[0].shape
    for i, frame in enumerate(frames):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or frame.shape != shape:
            raise MaskError(f"median_background: frame {i} is {frame.dtype} {frame.shape}; "
                            f"every frame must be uint8 {shape[:2] + (3,)}")
    reference = np.median(np.stack([f[::4, ::4].reshape(-1, 3) for f in frames]), axis=0)  # [P, 3] first median
    gains = np.stack([_channel_gain(f[::4, ::4].reshape(-1, 3), reference, "median_background") for f in frames])
    return _band_median(frames, gains, chunk_rows)


def _band_median(frames: Sequence[np.ndarray], gains: np.ndarray, chunk_rows: int) -> np.ndarray:
    """Median over frames [N] of frame / gain [N, 3] (rounded to uint8 first), band by band -> uint8 [H, W, 3]."""
    out = np.empty(frames[0].shape, np.uint8)
    scales = [(*(1.0 / g).tolist(), 0.0) for g in gains]  # per-channel cv2 scalars
    for top in range(0, out.shape[0], chunk_rows):
        band = np.stack([cv2.multiply(f[top:top + chunk_rows], s) for f, s in zip(frames, scales)])  # [N, rows, W, 3]
        out[top:top + chunk_rows] = np.rint(np.median(band, axis=0))
    return out


def _channel_gain(frame: np.ndarray, reference: np.ndarray, name: str) -> np.ndarray:
    """Per-channel gain [3]: median of frame / reference over pixels [P, 3] whose reference >= GAIN_MIN_LEVEL."""
    gain = np.empty(3, np.float32)
    for c in range(3):
        valid = reference[:, c] >= GAIN_MIN_LEVEL
        if valid.sum() < 100:
            raise MaskError(f"{name}: background too dark to measure flicker in channel {c} "
                            f"(fewer than 100 sampled pixels >= {GAIN_MIN_LEVEL})")
        gain[c] = np.median(frame[valid, c] / reference[valid, c])
    return gain


# ---- background subtraction ----------------------------------------------------------------------------


def _work_factor(height: int, width: int) -> int:
    return max(1, round(max(height, width) / WORK_SIDE))


def _downsample(image: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return image
    h, w = image.shape[:2]
    return cv2.resize(image, (round(w / factor), round(h / factor)), interpolation=cv2.INTER_AREA)


def _box(image: np.ndarray) -> np.ndarray:
    """Mean over the TEXTURE_WINDOW x TEXTURE_WINDOW window of each pixel (float32 [h, w])."""
    return cv2.boxFilter(image, -1, (TEXTURE_WINDOW, TEXTURE_WINDOW), borderType=cv2.BORDER_REFLECT)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _square(size: int) -> np.ndarray:
    return np.ones((size, size), np.uint8)


_SQUARE3 = _square(3)
_LUMA = np.full((1, 3), 1 / 3, np.float32)  # cv2.transform: the channels' mean


@dataclass(eq=False)
class Foreground:
    """One camera's background model. Build it with `fit_foreground`; `alpha(frame)` masks a raw frame.

    background: uint8 [H, W, 3] RGB of the raw (distorted) camera; threshold: colour distance (0-255) at
    the working resolution (the background area-averaged by `factor`).
    """

    name: str
    background: np.ndarray
    threshold: float
    noise_median: float
    noise_scale: float
    factor: int
    sample_frames: int
    gain_min: float = float("inf")
    gain_max: float = float("-inf")

    def __post_init__(self) -> None:
        self._work_bg = _downsample(self.background, self.factor).astype(np.float32)  # [h, w, 3]
        self._gain_grid = self._work_bg[::4, ::4].reshape(-1, 3)  # [P, 3] sparse pixels for the gain
        side = max(self._work_bg.shape[:2])
        self._open = _disk(max(1, round(side / 576)))  # 3 px at the working 576
        self._close = _disk(max(1, round(side / 144)))  # 9 px
        self._shadow_open = _disk(max(1, round(side / 288)))  # 5 px: a shadow is at least this broad
        luma = cv2.transform(self._work_bg, _LUMA)  # [h, w]
        self._luma_offset = float(luma.mean())  # centred values keep the float32 window sums exact
        self._bg_luma = luma - self._luma_offset
        self._bg_luma_mean = _box(self._bg_luma)
        self._bg_luma_std = np.sqrt(np.maximum(_box(self._bg_luma * self._bg_luma) - self._bg_luma_mean ** 2, 0.0))


    @property
    def stats(self) -> ForegroundStats:
        return ForegroundStats(camera=self.name, threshold=round(self.threshold, 3),
                               noise_median=round(self.noise_median, 3), noise_scale=round(self.noise_scale, 3),
                               work_factor=self.factor, sample_frames=self.sample_frames,
                               gain_min=round(self.gain_min, 4), gain_max=round(self.gain_max, 4))

    def _check(self, frame: np.ndarray) -> None:
        if frame.dtype != np.uint8 or frame.shape != self.background.shape:
            raise MaskError(f"camera {self.name}: frame is {frame.dtype} {frame.shape}, "
                            f"the background uint8 {self.background.shape}")

    def _gain(self, work: np.ndarray) -> np.ndarray:
        """Per-channel gain [3] of a working-resolution frame against the background (see module doc, 3)."""
        gain = _channel_gain(work[::4, ::4].reshape(-1, 3), self._gain_grid, f"camera {self.name}")
        mean = float(gain.mean())
        if not GAIN_RANGE[0] <= mean <= GAIN_RANGE[1]:
            raise MaskError(f"camera {self.name}: frame brightness is {mean:.2f} x the background's, outside "
                            f"{GAIN_RANGE}: the lighting changed; fit the background on frames lit like this one")
        self.gain_min, self.gain_max = min(self.gain_min, mean), max(self.gain_max, mean)
        return gain

    def distance(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw frame uint8 [H, W, 3] -> colour distance d [h, w] float32 at the working resolution, the
        working frame [h, w, 3] float32 and the gain-scaled background [h, w, 3] float32."""
        self._check(frame)
        work = _downsample(frame, self.factor)
        background = self._work_bg * self._gain(work)  # [h, w, 3]
        work = work.astype(np.float32)
        diff = work - background
        return np.sqrt(np.einsum("hwc,hwc->hw", diff, diff)), work, background

    def texture_correlation(self, work: np.ndarray) -> np.ndarray:
        """Working frame float32 [h, w, 3] -> float32 [h, w]: normalised cross-correlation of its luma with
        the background's in the TEXTURE_WINDOW window around each pixel (module doc, 7)."""
        luma = cv2.transform(work, _LUMA) - self._luma_offset  # [h, w]
        mean = _box(luma)
        var = np.maximum(_box(luma * luma) - mean * mean, 1e-3)
        cov = _box(luma * self._bg_luma) - mean * self._bg_luma_mean
        return cov / np.sqrt(var * np.maximum(self._bg_luma_std ** 2, 1e-3))

    def _texture_cue(self, work: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Working frame float32 [h, w, 3] -> bool [h, w] x 3 (module doc, 7): `replaced` (textured background,
        r < TEXTURE_CORRELATION), `core` (so is every window holding the pixel), `deep` (and every window
        within one more pixel)."""
        ncc = self.texture_correlation(work)
        replaced = self._textured() & (ncc < TEXTURE_CORRELATION)
        best = cv2.dilate(ncc, _square(TEXTURE_WINDOW))  # the highest r of the windows holding each pixel
        core = replaced & (best < TEXTURE_CORRELATION)
        return replaced, core, core & (cv2.dilate(best, _SQUARE3) < TEXTURE_CORRELATION)

    def _textured(self) -> np.ndarray:
        """bool [h, w]: the background's local luma std is >= TEXTURE_SNR noise sigmas (module doc, 7); cached
        for the current noise (`fit_foreground` sets it after construction)."""
        key = (self.noise_median, TEXTURE_SNR)
        if getattr(self, "_textured_key", None) != key:
            self._textured_map = self._bg_luma_std >= TEXTURE_SNR * self.noise_median / 1.54  # chi-3 median / sigma
            self._textured_key = key
        return self._textured_map

    def alpha(self, frame: np.ndarray) -> np.ndarray:
        """Raw RGB frame uint8 [H, W, 3] -> soft foreground mask float32 [H, W] in [0, 1] (module doc)."""
        d, work, background = self.distance(frame)
        mask = (d > self.threshold).view(np.uint8)  # [h, w] 0/1
        index = np.flatnonzero(mask)  # candidates only: a few % of the pixels
        pixel, back = work.reshape(-1, 3)[index], background.reshape(-1, 3)[index]  # [P, 3]
        back_sq = np.maximum(np.einsum("pc,pc->p", back, back), 1.0)
        ratio = np.einsum("pc,pc->p", pixel, back) / back_sq  # brightness ratio a
        chroma = pixel - ratio[:, None] * back
        chroma_sq = np.einsum("pc,pc->p", chroma, chroma)
        tolerance_sq = np.maximum(self.threshold ** 2, CHROMA_TOLERANCE ** 2 * ratio ** 2 * back_sq)
        shadow = np.zeros_like(mask)
        shadow.reshape(-1)[index] = (ratio >= SHADOW_RATIO_MIN) & (ratio < 1.0) & (chroma_sq <= tolerance_sq)
        core = None
        if self._textured().any():  # texture cue (module doc, 7); skipped on a textureless floor
            replaced, core, deep = self._texture_cue(work)
            kept = shadow & replaced.view(np.uint8)  # shadow-coloured, but the floor's texture is gone
            shadow[_grow(kept, deep)] = 0  # ... in a region with a pixel deep inside it: not shadow
        shadow = cv2.morphologyEx(shadow, cv2.MORPH_OPEN, self._shadow_open).view(bool)  # broad regions only
        mask[shadow] = 0
        d[shadow] = 0.0
        if core is not None:  # hysteresis: colour foreground grows into the texture core it touches
            mask[_grow(core.view(np.uint8), cv2.dilate(mask, _SQUARE3).view(bool) & core)] = 1
        soft = _soft_edge(_clean(mask, self._open, self._close), d)
        h, w = frame.shape[:2]
        if soft.shape != (h, w):
            soft = cv2.resize(soft, (w, h), interpolation=cv2.INTER_LINEAR)
        return np.clip(soft, 0.0, 1.0, out=soft)


def _grow(weak: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """uint8 [h, w] 0/1, bool [h, w] -> bool [h, w]: the 8-connected components of `weak` holding a `seed` pixel
    (hysteresis)."""
    if not seed.any():
        return np.zeros(weak.shape, bool)
    count, labels = cv2.connectedComponents(weak, connectivity=8)
    lookup = np.zeros(count, bool)
    lookup[labels[seed]] = True
    lookup[0] = False
    return lookup[labels]


def _soft_edge(clean: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Binary uint8 [h, w] and colour distance [h, w] (0 on shadow) -> float32 alpha: 1 inside, and on the
    one-pixel ring around the edge the fraction of the local contrast a pixel shows, d / C (a pixel
    mixing mouse and floor by alpha has d = alpha * |mouse - floor|). C = mean d of the interior within
    4 px, or where a part has no interior (a thin tail) the largest d on it within 2 px."""
    soft = clean.astype(np.float32)
    if not clean.any():
        return soft
    x, y, bw, bh = cv2.boundingRect(clean)
    window = (slice(max(0, y - 6), y + bh + 6), slice(max(0, x - 6), x + bw + 6))
    inside, dist = clean[window], d[window]
    core = cv2.erode(inside, _SQUARE3)
    ring = (cv2.dilate(inside, _SQUARE3) - core).view(bool)
    total = cv2.boxFilter(dist * core, -1, (9, 9), normalize=False)
    count = cv2.boxFilter(core.astype(np.float32), -1, (9, 9), normalize=False)
    peak = cv2.dilate(dist * inside, _disk(2))
    contrast = np.where(count > 0.5, total / np.maximum(count, 1.0), peak)
    ramp = np.clip(dist / np.maximum(contrast, 1e-3), 0.0, 1.0)
    soft[window] = np.where(ring, ramp, core)
    return soft


def _clean(mask: np.ndarray, open_kernel: np.ndarray, close_kernel: np.ndarray) -> np.ndarray:
    """Binary uint8 [h, w] -> opened, closed, largest component (+ those >= KEEP_FRACTION of it), holes filled."""
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, open_kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, close_kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = 1 + np.flatnonzero(areas >= KEEP_FRACTION * areas.max())  # labels kept
    x0, y0 = stats[keep, cv2.CC_STAT_LEFT].min(), stats[keep, cv2.CC_STAT_TOP].min()
    x1 = (stats[keep, cv2.CC_STAT_LEFT] + stats[keep, cv2.CC_STAT_WIDTH]).max()
    y1 = (stats[keep, cv2.CC_STAT_TOP] + stats[keep, cv2.CC_STAT_HEIGHT]).max()
    lookup = np.zeros(count, np.uint8)
    lookup[keep] = 1
    out = np.zeros_like(mask)
    box = lookup[labels[y0:y1, x0:x1]]  # [bh, bw] kept components inside their bounding box
    padded = np.pad(box, 1)  # a background ring so one flood fill reaches every outside pixel
    cv2.floodFill(padded, None, (0, 0), 1)
    out[y0:y1, x0:x1] = box | (1 - padded[1:-1, 1:-1])  # holes: not reached from outside
    return out


def fit_foreground(background: np.ndarray, sample_frames: Sequence[np.ndarray], name: str) -> Foreground:
    """A camera's background model: the threshold from the noise of `sample_frames` [N] x uint8 [H, W, 3]
    against `background` uint8 [H, W, 3] (module doc, 5). The samples may contain the mouse (a small
    fraction of each). When the background is their own median it sits closer to them than to other
    frames, which lowers the threshold by about 1/N (measured: 16 % at N = 5, 8 % at 12, 2 % at 50);
    use N >= 10."""
    if background.dtype != np.uint8 or background.ndim != 3 or background.shape[2] != 3:
        raise MaskError(f"camera {name}: background is {background.dtype} {background.shape}, not uint8 [H, W, 3]")
    if len(sample_frames) == 0:
        raise MaskError(f"camera {name}: no sample frames to measure the noise")
    factor = _work_factor(*background.shape[:2])
    model = Foreground(name, background, THRESHOLD_FLOOR, 0.0, 0.0, factor, len(sample_frames))
    work_bg = model._work_bg
    unsaturated = ((work_bg > 2) & (work_bg < 253)).all(-1)[::2, ::2]  # [h/2, w/2] pixels whose noise is visible
    if unsaturated.sum() < 1000:
        raise MaskError(f"camera {name}: the background is saturated (0 or 255) almost everywhere")
    distances = [model.distance(frame)[0][::2, ::2][unsaturated] for frame in sample_frames]
    d = np.concatenate(distances)  # [N * P] pooled over the samples
    median = float(np.median(d))
    scale = 1.4826 * float(np.median(np.abs(d - median)))
    model.noise_median, model.noise_scale = median, scale
    model.threshold = max(THRESHOLD_FLOOR, median + NOISE_MULTIPLE * scale)
    log.info("camera %s: foreground threshold %.1f (noise median %.1f, scale %.1f, %d samples)",
             name, model.threshold, median, scale, len(sample_frames))
    return model


def mask_statistics(alpha: np.ndarray) -> MaskStatistics:
    """alpha float32 [H, W] in [0, 1] -> area fraction, bbox and component count of alpha >= 0.5."""
    assert alpha.ndim == 2, f"alpha must be [H, W], got {alpha.shape}"
    binary = (alpha >= 0.5).astype(np.uint8)
    area = int(binary.sum())
    if area == 0:
        return MaskStatistics(area_fraction=0.0, bbox=None, components=0)
    rows, cols = np.flatnonzero(binary.any(1)), np.flatnonzero(binary.any(0))
    count = cv2.connectedComponents(binary, connectivity=8)[0] - 1
    return MaskStatistics(area_fraction=area / binary.size,
                          bbox=[int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1],
                          components=int(count))


# ---- user masks ---------------------------------------------------------------------------------------


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A user's mask image -> float32 [H, W] in [0, 1] (value / the format's maximum).

    PNG (or any format OpenCV reads) of 8 or 16 bits: grey; grey or RGB with alpha (the alpha channel is
    the mask and must not be opaque everywhere); RGB whose channels are equal (a grey mask saved as RGB;
    coloured masks are ambiguous and refused). size = (width, height) the mask must have.
    """
    path = Path(path)
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise MaskError(f"{path}: missing or unreadable mask image")
    if image.dtype not in (np.uint8, np.uint16):
        raise MaskError(f"{path}: unsupported mask type {image.dtype}; use 8- or 16-bit")
    h, w = image.shape[:2]
    if (w, h) != tuple(size):
        raise MaskError(f"{path}: mask is {w}x{h} but the frame is {size[0]}x{size[1]}")
    top = float(np.iinfo(image.dtype).max)
    if image.ndim == 2:
        return image.astype(np.float32) / top
    channels = image.shape[2]
    if channels in (2, 4):
        alpha = image[..., -1]
        if alpha.min() == np.iinfo(image.dtype).max:
            raise MaskError(f"{path}: the alpha channel is opaque everywhere, so it is no mask; "
                            "save the mask as grey or as the alpha channel")
        return alpha.astype(np.float32) / top
    if channels == 3:
        spread = image.max(-1).astype(np.int64) - image.min(-1)
        if spread.max() > 0.02 * top:
            raise MaskError(f"{path}: RGB mask with coloured pixels (channels differ by up to "
                            f"{spread.max() / top:.0%}); save it as grey (R = G = B) or alpha")
        return image.astype(np.float32).mean(-1) / top
    raise MaskError(f"{path}: unsupported mask with {channels} channels")


def mask_from_frame(frame: np.ndarray) -> np.ndarray:
    """A decoded mask-video frame uint8 [H, W] or [H, W, 3] -> binary alpha float32 [H, W] in {0, 1}.

    Lossy video (H.264) blurs and rings a binary mask by a few levels and smears its colour, so the
    value (the mean of the channels) / 255 is thresholded at 0.5 rather than used as a soft alpha.
    """
    if frame.dtype != np.uint8 or not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] in (1, 3))):
        raise MaskError(f"mask frame is {frame.dtype} {frame.shape}; expected uint8 [H, W] or [H, W, 3]")
    value = frame.astype(np.float32) if frame.ndim == 2 else frame.astype(np.float32).mean(-1)
    return (value >= 127.5).astype(np.float32)


# ---- multi-view consistency -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Consistency:
    """The masks of one frame checked against each other through their visual hull.

    coverage: [V] |mask_v & proj(hull)| / |mask_v| (0 for a view that sees no mouse).
    centre:   [3] least-squares intersection of the rays through the masks' centroids (world units).
    box:      [2, 3] min and max corner of the voxel grid the hull was carved in.
    voxels:   number of hull voxels; voxel_size: their edge (world units).
    """

    coverage: np.ndarray
    centre: np.ndarray
    box: np.ndarray
    voxels: int
    voxel_size: float


def _rays_intersection(origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Least-squares point [3] closest to the lines origins [R, 3] + t dirs [R, 3] (unit), R >= 2."""
    proj = np.eye(3) - dirs[:, :, None] * dirs[:, None, :]  # [R, 3, 3] onto each line's normal plane
    lhs, rhs = proj.sum(0), (proj @ origins[:, :, None]).sum(0)[:, 0]
    if np.linalg.cond(lhs) > 1e8:
        raise MaskError("hull_consistency: the rays through the mask centroids are (nearly) parallel")
    return np.linalg.solve(lhs, rhs)


def _carve(points: np.ndarray, masks: np.ndarray, cameras: Cameras, dilation: np.ndarray) -> np.ndarray:
    """points [P, 3] -> those on the foreground of every view of masks bool [V, h, w], each dilated by
    dilation [V] px (a disk); a point outside a view's image is carved (`carve.project_to_masks`: every
    view must see the whole mouse). View by view, so each view tests only the points the others kept."""
    pts = torch.from_numpy(points)
    for v in range(len(cameras)):
        mask = cv2.dilate(masks[v].view(np.uint8), _disk(int(dilation[v]))) if dilation[v] > 0 else masks[v]
        mask_t = torch.from_numpy(mask.astype(np.float64))[None, None]  # [1, 1, h, w]
        pts = pts[project_to_masks(pts, mask_t, cameras[v:v + 1])[0][0]]
        if len(pts) == 0:
            break
    return pts.numpy()


def _grid(lo: np.ndarray, hi: np.ndarray, voxel: float) -> np.ndarray:
    """Voxel centres [P, 3] of cubes of edge `voxel` filling the box [lo, hi] (centred in it)."""
    counts = np.maximum(1, np.ceil((hi - lo) / voxel - 1e-9)).astype(int)  # [3]
    start = (lo + hi) / 2 - (counts - 1) * voxel / 2
    axes = [start[k] + voxel * np.arange(counts[k]) for k in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def _centre_and_radius(masks: np.ndarray, cameras: Cameras) -> tuple[np.ndarray, float]:
    """masks bool [V, h, w] (each non-empty), cameras [V] -> the least-squares meeting point [3] of the rays
    through the masks' centroids, and the radius of a ball around it that holds every mask's bounding
    box back-projected at the point's depth, times BOX_SAFETY."""
    c2w, w2c = cameras.c2w.numpy(), cameras.w2c.numpy()  # [V, 4, 4]
    fx, fy, cx, cy = cameras.intrinsics.numpy().T  # [V] each
    dirs, extents = [], []  # [V, 3] unit rays; [V] angular half-extent (tangent) of each mask from its centroid
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        u, v = xs.mean() + 0.5, ys.mean() + 0.5  # centroid of pixel centres (pixel-edge convention)
        ray = c2w[i, :3, :3] @ np.array([(u - cx[i]) / fx[i], (v - cy[i]) / fy[i], 1.0])
        dirs.append(ray / np.linalg.norm(ray))
        dx, dy = np.abs([xs.min() - u, xs.max() + 1 - u]).max(), np.abs([ys.min() - v, ys.max() + 1 - v]).max()
        extents.append(np.hypot(dx / fx[i], dy / fy[i]))
    centre = _rays_intersection(c2w[:, :3, 3], np.array(dirs))
    depth = np.maximum((w2c[:, :3, :3] @ centre + w2c[:, :3, 3])[:, 2], 0.0)  # [V] (< 0: the caller refuses)
    return centre, BOX_SAFETY * float((np.array(extents) * depth).max())


def hull_consistency(alphas: np.ndarray, cameras: Cameras, side: int = HULL_SIDE, grid: int = HULL_GRID,
                     dilation_px: int = HULL_DILATION_PX) -> Consistency:
    """How well the masks of one frame agree in 3D.

    alphas [V, H, W] float32 in [0, 1], undistorted to the pinhole `cameras` [V] (one frame, any units).
    Masks are area-averaged to a longer side of ~`side` px and binarised at 0.5. Views whose mask is below
    `MIN_AREA_FRACTION` see no mouse: they score 0 and do not carve (at least 2 must see it). The hull:
    the rays through the masks' centroids meet (least squares) at `centre`; a cube around it, sized from
    each mask's bounding box back-projected at the centre's depth (x `BOX_SAFETY`), is carved at 32^3
    conservatively (masks dilated by a voxel's projected radius); the box of that coarse hull is carved
    again with `grid` voxels along its longest side, a voxel kept when its centre projects onto every
    mask dilated by `dilation_px` (calibration and rounding error). The voxels are splatted into each
    view (disks of a voxel's projected radius) and coverage_v = |mask_v & splat_v| / |mask_v|.

    Scores: ~1 when the views agree. A view whose mask holds something no other view sees (a shadow
    or reflection seen in one view, a hand) scores about |mouse| / |mask|. A view whose mask misses part
    of the mouse cuts the hull, so the *other* views score low (the view itself stays ~1). Judge a frame
    by its minimum coverage. Measured on exact masks of a body + head + tail made of ellipsoids in the
    markerless_mouse_1 rig (tests/test_masks.py checks the exact, shifted, extra, half and tail cases):
    1.00 in every view; >= 0.99 with every mask eroded or dilated by up to 2 px and shifted by up to
    4 px (1152 x 1024); the tail lost in one view: >= 0.86; one view with a
    separate extra region of 10 / 20 / 30 % of the mouse's area: 0.91 / 0.84 / 0.77, with one attached
    to the mouse (a shadow leak, partly inside the hull's projection): 0.94 / 0.88 / 0.84; half the
    mouse lost in one view: the others' minimum 0.38-0.71. Hence `CONSISTENCY_MIN` = 0.8: keeps frames
    with calibration error and thin parts lost, rejects a view with a detached region of a quarter of
    the mouse or more, or half the mouse missing; it does not catch a moderate leak attached to the
    mouse.
    """
    v, h, w = alphas.shape
    assert len(cameras) == v and (cameras.width, cameras.height) == (w, h), (
        f"{len(cameras)} cameras of {cameras.width}x{cameras.height}, alphas {alphas.shape}")
    factor = max(1, round(max(h, w) / side))
    hs, ws = round(h / factor), round(w / factor)
    masks = np.stack([_downsample(a.astype(np.float32, copy=False), factor) for a in alphas]) >= 0.5  # [V, hs, ws]
    seen = masks.mean((1, 2)) >= MIN_AREA_FRACTION  # [V] at the working resolution
    views = np.flatnonzero(seen).tolist()
    if len(views) < 2:
        raise MaskError(f"hull_consistency: only view(s) {views} see a mouse; the check needs 2")
    cams = cameras.resize(hs, ws).to(torch.float64)[views]
    centre, radius = _centre_and_radius(masks[views], cams)
    depth = (cams.w2c.numpy()[:, :3, :3] @ centre + cams.w2c.numpy()[:, :3, 3])[:, 2]  # [V']
    if (depth <= 0).any():
        raise MaskError(f"hull_consistency: the rays through the masks' centroids meet at {centre.round(3).tolist()}, "
                        f"behind camera(s) {[views[k] for k in np.flatnonzero(depth <= 0)]}: the masks or cameras "
                        "do not belong together")
    focal = cams.intrinsics.numpy()[:, :2].max(1)  # [V']

    coarse = 2 * radius / 32
    near = np.maximum(depth - np.sqrt(3) * radius, depth / 2)  # the box's nearest depth, bounded away from 0
    slack = np.ceil(coarse * np.sqrt(3) / 2 * focal / near) + dilation_px  # [V'] px: a voxel's projected radius
    hull = _carve(_grid(centre - radius, centre + radius, coarse), masks[views], cams, slack)
    if len(hull) == 0:
        return Consistency(np.zeros(v), centre, np.stack([centre - radius, centre + radius]), 0, coarse)
    lo, hi = hull.min(0) - coarse / 2, hull.max(0) + coarse / 2  # the coarse hull's voxels' extent
    voxel = float((hi - lo).max() / grid)
    fine = _grid(lo, hi, voxel)
    occupied = np.zeros(tuple(np.rint((hi - lo) / coarse).astype(int)), bool)  # [X, Y, Z] the coarse hull
    occupied[tuple(np.rint((hull - lo) / coarse - 0.5).astype(np.int64).T)] = True
    cell = np.clip(np.floor((fine - lo) / coarse).astype(np.int64), 0, np.array(occupied.shape) - 1)  # [P, 3]
    fine = fine[occupied[tuple(cell.T)]]  # the coarse carving was conservative: nothing outside it survives
    hull = _carve(fine, masks[views], cams, np.full(len(views), dilation_px))

    coverage = np.zeros(v)
    if len(hull):
        uv, z = (t.numpy() for t in cams.project(torch.from_numpy(hull).expand(len(views), -1, -1)))  # [V', P, 2|]
        for k, i in enumerate(views):
            px = np.floor(uv[k]).astype(np.int64)  # pixel-edge convention
            inside = (z[k] > 0) & (px[:, 0] >= 0) & (px[:, 0] < ws) & (px[:, 1] >= 0) & (px[:, 1] < hs)
            splat = np.zeros((hs, ws), np.uint8)
            splat[px[inside, 1], px[inside, 0]] = 1
            radius_px = np.ceil(voxel * np.sqrt(3) / 2 * focal[k] / np.median(z[k]))  # a voxel's projection
            splat = cv2.dilate(splat, _disk(int(radius_px))).view(bool)
            coverage[i] = (masks[i] & splat).sum() / masks[i].sum()
    return Consistency(coverage, centre, np.stack([lo, hi]), len(hull), voxel)
