"""Options of the user-facing commands: frozen dataclasses that validate in `__post_init__`.

The defaults live here and only here (the CLI shows them with --help); the module imports no torch,
so `mouserecon --help` stays fast. One vocabulary: frame indices are `inputs` / `heldout`; `units`
is "input" (the camera file's frame and units, e.g. mm) or "model" (the normalised rig).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from mouserecon.errors import MouseReconError

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"  # CUDA when available
UNITS = ("input", "model")
DEFAULT_INPUT_VIEWS = 5  # Exp C: 5 input views per sample
DEFAULT_MIN_OPACITY = 0.005  # prune Gaussians below this opacity (about 1/255: invisible when rendered)
TURNTABLE_FORMATS = ("gif", "mp4")
BASELINES = ("flat", "hull")
METHODS = ("model", "hull")  # reconstruct: a GS-LRM, or the visual hull of the input masks
SYNTH_VARIETIES = ("rig", "wide", "broad")  # synth: what synth.generate draws (its module docstring)
LPIPS_CHOICES = ("alex", "vgg", "none")
MASK_SOURCES = ("alpha", "near_white")


class ViewsError(MouseReconError, ValueError):
    """Input / held-out frame indices that are malformed or out of range; the message names the file."""


class EvalError(MouseReconError, ValueError):
    """Bad options or inputs for `evaluate`; the message names the file or option and the defect."""


def default(options_class, name: str):
    """The default of field `name` of an options dataclass (for the CLI's --help)."""
    (found,) = [f for f in fields(options_class) if f.name == name]
    return found.default


def check_views(views, name: str) -> tuple[int, ...] | None:
    """Option check of frame indices (None = the default): distinct non-negative integers -> a tuple."""
    if views is None:
        return None
    views = tuple(views)
    if not views or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in views):
        raise ViewsError(f"{name} must be non-negative integer frame indices, got {list(views)!r}")
    if len(set(views)) != len(views):
        raise ViewsError(f"{name} must be distinct frame indices, got {list(views)}")
    return views


def parse_mask(spec: str) -> tuple[str, float]:
    """"alpha" | "alpha:<t>" | "near_white:<t>" -> (source, threshold in (0, 1)); alpha's threshold
    defaults to 0.5. Raises EvalError for anything else."""
    source, _, value = spec.partition(":")
    if source not in MASK_SOURCES or (source == "near_white" and not value):
        raise EvalError(f"mask must be 'alpha', 'alpha:<t>' or 'near_white:<t>' (e.g. near_white:0.95), got {spec!r}")
    try:
        threshold = float(value) if value else 0.5
    except ValueError:
        raise EvalError(f"mask threshold in {spec!r} is not a number") from None
    if not 0.0 < threshold < 1.0:
        raise EvalError(f"mask threshold must be in (0, 1), got {threshold}")
    return source, threshold


class ReconstructError(MouseReconError, ValueError):
    """Bad options or inputs for `reconstruct`; the message names the file or option and the defect."""


@dataclass(frozen=True)
class ReconstructOptions:
    """What to reconstruct and how.

    views_dir:     sample folder (`opencv_cameras.json` or `transforms.json` + images).
    output:        the .ply to write; its folder must exist; the sidecar is `Sidecar.path_for(output)`.
    checkpoint:    ours or FaceLift's; None = the bundled demo checkpoint (method "model" only).
    device:        "auto" (CUDA when available), "cpu" or "cuda".
    inputs:        input frame indices in the order given (distinct); None = the first 5.
    heldout:       held-out frame indices (scores and previews); None = every frame not an input.
    resolution:    square side in pixels the frames are resized to (held-out scores, refinement); None = the
                   model's image_size (256 for the hull). The model sees its inputs at its image_size, or, to be
                   refined, at this side where it is larger, up to 1.5x (`pipeline.CheckpointPredictor`).
    units:         "input" = the user's frame (the camera file's units, e.g. mm); "model" = normalised rig.
    min_opacity:   prune Gaussians with opacity below this (0 keeps all).
    refine:        steps of per-scene refinement against the input views (0 = feed-forward only).
    previews_dir:  where to write preview images; None = no previews.
    turntable_frames / turntable_format: the turntable preview (0 frames = none; "gif" or "mp4").
    method:        "model" (a GS-LRM checkpoint) or "hull" (the visual hull of the input masks, no model).
    """

    views_dir: Path
    output: Path
    checkpoint: Path | None = None
    device: str = DEFAULT_DEVICE
    inputs: tuple[int, ...] | None = None
    heldout: tuple[int, ...] | None = None
    resolution: int | None = None
    units: str = "input"
    min_opacity: float = DEFAULT_MIN_OPACITY
    refine: int = 0
    previews_dir: Path | None = None
    turntable_frames: int = 36
    turntable_format: str = "gif"
    method: str = "model"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise fields once, here
        set_(self, "views_dir", Path(self.views_dir))
        set_(self, "output", Path(self.output))
        if self.checkpoint is not None:
            set_(self, "checkpoint", Path(self.checkpoint))
        if self.previews_dir is not None:
            set_(self, "previews_dir", Path(self.previews_dir))
        if self.device not in DEVICES:
            raise ReconstructError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.units not in UNITS:
            raise ReconstructError(f"units must be one of {UNITS}, got {self.units!r}")
        if self.method not in METHODS:
            raise ReconstructError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "hull" and self.checkpoint is not None:
            raise ReconstructError(f"{self.checkpoint}: the visual hull uses no checkpoint; drop --checkpoint or "
                                   "use --method model")
        if self.output.suffix.lower() != ".ply":
            raise ReconstructError(f"{self.output}: the output must be a .ply file")
        set_(self, "inputs", check_views(self.inputs, "inputs"))
        set_(self, "heldout", check_views(self.heldout, "heldout"))
        if self.resolution is not None and not (isinstance(self.resolution, int) and self.resolution > 0):
            raise ReconstructError(f"resolution must be a positive integer, got {self.resolution!r}")
        if not (isinstance(self.min_opacity, (int, float)) and 0.0 <= self.min_opacity < 1.0):
            raise ReconstructError(f"min_opacity must be in [0, 1), got {self.min_opacity!r}")
        if not (isinstance(self.refine, int) and not isinstance(self.refine, bool) and self.refine >= 0):
            raise ReconstructError(f"refine must be an integer >= 0 (steps), got {self.refine!r}")
        if not (isinstance(self.turntable_frames, int) and self.turntable_frames >= 0):
            raise ReconstructError(f"turntable_frames must be an integer >= 0, got {self.turntable_frames!r}")
        if self.turntable_format not in TURNTABLE_FORMATS:
            raise ReconstructError(f"turntable_format must be one of {TURNTABLE_FORMATS}, got {self.turntable_format!r}")



@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and under which protocol.

    data:        dataset (folder of samples, one sample folder, or a list file; `data.find_samples`).
    checkpoints: model checkpoints (ours or FaceLift's), evaluated by reconstructing from `inputs`; with no
                 checkpoint, .ply or baseline at all, the bundled demo checkpoint.
    plys:        .ply files or folders of `<sample_id>.ply` (see the module docstring).
    baselines:   naive baselines to score too: "flat" and/or "hull" (see the module docstring).
    refine:      N > 0 also scores every checkpoint and the hull after N refinement steps.
    out:         report folder (created; must not already hold a summary.json).
    inputs:      input frame indices, in the order fed to the model; None = the first 5.
    heldout:     held-out frame indices; None = every frame of the first sample not in `inputs`.
    resolution:  square side in px; None = the first checkpoint's image size (required without checkpoints).
    lpips:       "alex", "vgg" or "none".
    mask:        "alpha", "alpha:<t>" or "near_white:<t>" (`parse_mask`).
    device:      "auto", "cpu" or "cuda".
    """

    data: Path
    checkpoints: tuple[Path, ...] = ()
    plys: tuple[Path, ...] = ()
    baselines: tuple[str, ...] = ()
    refine: int = 0
    out: Path = Path("report")
    inputs: tuple[int, ...] | None = None
    heldout: tuple[int, ...] | None = None
    resolution: int | None = None
    lpips: str = "alex"
    mask: str = "alpha"
    device: str = DEFAULT_DEVICE

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise fields once, here
        set_(self, "data", Path(self.data))
        set_(self, "out", Path(self.out))
        set_(self, "checkpoints", tuple(Path(p) for p in self.checkpoints))
        set_(self, "plys", tuple(Path(p) for p in self.plys))
        set_(self, "baselines", tuple(self.baselines))
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown or len(set(self.baselines)) != len(self.baselines):
            raise EvalError(f"baselines must be distinct names from {BASELINES}, got {list(self.baselines)}")
        if not (isinstance(self.refine, int) and not isinstance(self.refine, bool) and self.refine >= 0):
            raise EvalError(f"refine must be an integer >= 0, got {self.refine!r}")
        set_(self, "inputs", check_views(self.inputs, "inputs"))
        set_(self, "heldout", check_views(self.heldout, "heldout"))
        if self.resolution is not None and not (isinstance(self.resolution, int) and self.resolution > 0):
            raise EvalError(f"resolution must be a positive integer, got {self.resolution!r}")
        if self.lpips not in LPIPS_CHOICES:
            raise EvalError(f"lpips must be one of {LPIPS_CHOICES}, got {self.lpips!r}")
        parse_mask(self.mask)
        if self.device not in DEVICES:
            raise EvalError(f"device must be one of {DEVICES}, got {self.device!r}")


@dataclass(frozen=True)
class SynthOptions:
    """`mouserecon synth`: n samples with seeds seed, seed + 1, ... into `out` (see `synth.generate_sample`).

    num_views rig views per sample, then num_heldout extra held-out views; units "mm" (the raw world) or
    "model" (normalised to the model's rig); variety "rig" (like the real rig, aimed at the mouse), "wide"
    (wider rigs, coats and light) or "broad" (pose families, lab coats, crops of a full-frame rig aimed at
    the arena), see `synth.generate`.
    """

    out: Path
    n: int = 1
    seed: int = 0
    resolution: int = 256
    num_views: int = 6
    num_heldout: int = 0
    units: str = "mm"
    variety: str = "rig"

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.n < 1 or self.resolution < 8 or self.num_views < 2 or self.num_heldout < 0:
            raise SynthError(f"need n >= 1, resolution >= 8, num_views >= 2, num_heldout >= 0; got n={self.n}, "
                             f"resolution={self.resolution}, num_views={self.num_views}, num_heldout={self.num_heldout}")
        if self.units not in ("mm", "model") or self.variety not in SYNTH_VARIETIES:
            raise SynthError(f"units must be mm or model, variety one of {SYNTH_VARIETIES}; got {self.units!r}, "
                             f"{self.variety!r}")


class SynthError(MouseReconError, ValueError):
    """Bad options for `synth`."""


PREPARE_CROPS = ("mask", "none")
DEFAULT_CROP_MARGIN = 0.1  # as the recipes' data.crop_margin
DEFAULT_MIN_CONSISTENCY = 0.8  # a view whose mask the visual hull of all views covers less than this is suspect


class PrepareOptionsError(MouseReconError, ValueError):
    """Bad options for `prepare`."""


@dataclass(frozen=True)
class PrepareOptions:
    """`mouserecon prepare`: a recording folder -> one sample folder per frame in `out`.

    recording:   folder with one video (or image folder) per camera and the calibration file.
    out:         output folder (created; an earlier run's folder with the same settings is resumed).
    frames:      "START:STOP:STEP" (Python slice semantics) or "N"; None = every frame.
    calibration: the calibration file; None = found in the recording (`calibration.find_calibration`).
    masks:       "background" (background subtraction) or a folder of per-camera mask videos / PNG folders.
    background:  folder of per-camera empty-arena clips or frames; None = temporal median of sampled frames.
    crop:        "mask" (a square around each view's mask, resized to `side`) or "none" (whole frames).
    side:        crop side in pixels.
    margin:      crop margin on each side, as a fraction of the mask's longer side.
    min_consistency: skip a frame where a view's mask is covered less than this by the visual hull of all views.
    fps:         frame rate of image-sequence recordings (videos carry their own).
    """

    recording: Path
    out: Path
    frames: str | None = None
    calibration: Path | None = None
    masks: str = "background"
    background: Path | None = None
    crop: str = "mask"
    side: int = 512
    margin: float = DEFAULT_CROP_MARGIN
    min_consistency: float = DEFAULT_MIN_CONSISTENCY
    fps: float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "recording", Path(self.recording))
        set_(self, "out", Path(self.out))
        for name in ("calibration", "background"):
            if getattr(self, name) is not None:
                set_(self, name, Path(getattr(self, name)))
        if self.masks != "background" and not Path(self.masks).is_dir():
            raise PrepareOptionsError(f"masks must be 'background' or a folder of per-camera masks; {self.masks} "
                                      "is not a folder")
        if self.background is not None and self.masks != "background":
            raise PrepareOptionsError("background clips are for masks=background; user masks need none")
        if self.crop not in PREPARE_CROPS:
            raise PrepareOptionsError(f"crop must be one of {PREPARE_CROPS}, got {self.crop!r}")
        if not (isinstance(self.side, int) and self.side >= 16):
            raise PrepareOptionsError(f"side must be an integer >= 16 px, got {self.side!r}")
        if not 0.0 <= self.margin <= 2.0:
            raise PrepareOptionsError(f"margin must be in [0, 2], got {self.margin}")
        if not 0.0 <= self.min_consistency <= 1.0:
            raise PrepareOptionsError(f"min_consistency must be in [0, 1], got {self.min_consistency}")
        if self.fps is not None and not self.fps > 0:
            raise PrepareOptionsError(f"fps must be > 0, got {self.fps}")


@dataclass(frozen=True)
class SynthRecordingOptions:
    """`mouserecon synth-recording`: a synthetic rig recording with ground truth (`synth.recording`).

    calibration: the rig to render through (any format `prepare` reads); None = a drawn rig like the real one.
    image_size:  (width, height) for calibration files that do not store it (DANNCE) and for the drawn rig.
    scale:       image scale of every camera (0.25: 288 x 256 for a 1152 x 1024 rig).
    """

    out: Path
    num_frames: int = 100
    seed: int = 0
    calibration: Path | None = None
    image_size: tuple[int, int] = (1152, 1024)
    scale: float = 1.0
    fps: float = 100.0
    workers: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.calibration is not None:
            object.__setattr__(self, "calibration", Path(self.calibration))
        if self.num_frames < 1 or self.scale <= 0 or self.fps <= 0 or self.workers < 1:
            raise SynthError(f"need num_frames >= 1, scale > 0, fps > 0, workers >= 1; got {self.num_frames}, "
                             f"{self.scale}, {self.fps}, {self.workers}")


@dataclass(frozen=True)
class SequenceOptions:
    """`reconstruct SAMPLES/ -o OUT/`: every sample of a folder or list file -> OUT (see `sequence`).

    The reconstruct fields mean what they mean in ReconstructOptions (no previews for sequences).
    batch_size: frames per model forward pass. workers: DataLoader processes preparing samples beside the model
                (0: none, prepared in the main process; None: none on the CPU, where they compete with the model
                for cores, min(4, cores - 1) on CUDA).
    overwrite:  redo frames that OUT holds from another model or other settings (else refused).
    """

    samples: Path
    out: Path
    checkpoint: Path | None = None
    device: str = DEFAULT_DEVICE
    inputs: tuple[int, ...] | None = None
    heldout: tuple[int, ...] | None = None
    resolution: int | None = None
    units: str = "input"
    min_opacity: float = DEFAULT_MIN_OPACITY
    refine: int = 0
    batch_size: int = 8
    workers: int | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "samples", Path(self.samples))
        set_(self, "out", Path(self.out))
        if self.checkpoint is not None:
            set_(self, "checkpoint", Path(self.checkpoint))
        if self.out.suffix.lower() == ".ply":
            raise ReconstructError(f"{self.out}: several samples are reconstructed into a folder, not one .ply")
        # the per-frame options are checked as a single reconstruct's (one error message for each defect)
        frame = ReconstructOptions(self.samples, self.out / "mouse.ply", self.checkpoint, self.device, self.inputs,
                                   self.heldout, self.resolution, self.units, self.min_opacity, self.refine)
        set_(self, "inputs", frame.inputs)
        set_(self, "heldout", frame.heldout)
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ReconstructError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.workers is not None and not (isinstance(self.workers, int) and self.workers >= 0):
            raise ReconstructError(f"workers must be an integer >= 0, got {self.workers!r}")
