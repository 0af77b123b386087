"""The GPU check in one run: correctness and speed of the CUDA paths on a machine without any registry.

Here (with PyPI), once: wheels for Python 3.12 and the synthetic data, into ignored folders:

    python -m mouserecon.eval.gpu_prepare          # -> build/gpu_wheels/ (+ requirements.txt), build/gpu_data/

There (one H200, Python 3.12, torch with CUDA preinstalled), with carry ["build/gpu_wheels", "build/gpu_data"]:

    python eval/gpu_check.py --out $OUT/gpu_check.json; tar czf $OUT/logs.tgz -C $OUT gpu_check_logs

(the device tool brings back at most 8 files, hence one archive of the nine stage logs).

Run as a file there: the project is not installed yet, so the script (standard library only at its top
level) first installs it: `pip install --no-index --find-links build/gpu_wheels --no-deps` of the pinned
requirements the machine lacks (those it has stay at its own versions; the report lists both), then
`pip install ... --no-deps -e .` (setuptools comes from the wheel folder), then runs
each stage in its own process (`python -m mouserecon.eval.gpu_check --stage NAME`) with its own time limit,
so that a crash, a sticky CUDA error or a hang in one stage still leaves the others' results. Everything
stops within `--budget` seconds (default 460: under 8 minutes, so it can be rerun in a 15-minute window;
a rerun on the same machine reuses gsplat's build in build/torch_extensions). Here, `--dry-run` runs every
stage that does not need CUDA on the CPU, small (about a minute; tests/test_gpu_check.py runs it).

Stages, in order of value, with the seconds each took on an H200 on 2026-12-04 (whole check: 278 s):
  install         10 s   pip install from the wheel folder (skipped when the project is importable)
  environment     8 s    python, torch, CUDA, GPU name/memory/capability, nvcc, compiler, data present
  gsplat_compile  73 s   gsplat's JIT CUDA build, TORCH_CUDA_ARCH_LIST = the GPU's (9.0), MAX_JOBS =
                         the cores (16); our C++ CPU kernel is built beside it. Cached: ~5 s
  render_compare  7 s    gsplat (CUDA) vs cpp (CPU) on bench_render's scenes a (5x128^2 Gaussians into
                         6x128^2) and b (256): images, alphas, depths; gradients of a fixed random weighting
                         of all three w.r.t. means, sh (colours), opacity_logits, log_scales, quats
  model_forward   20 s   facelift preset (random init), 5 views x 512 px, bf16 autocast: 1 warm-up then
                         3 timed runs (best = time per reconstruction; GS-LRM reports 0.23 s on an A100),
                         peak CUDA memory; saves the model for the next stages
  finetune        56 s   30 exp_c steps, facelift preset, 512 px, synthetic samples, one huge-gradient step
                         injected (step 10) so that the skip rule must fire: steps/s, peak memory, losses
  reconstruct     27 s   `mouserecon reconstruct SAMPLE -o x.ply --device cuda`, that model and the demo
  sequence        65 s   `mouserecon reconstruct SAMPLES/ -o OUT/ --device cuda` on 32 frames: frames/s
  cuda_tests      12 s   `pytest -m cuda` on the test files that hold CUDA-marked tests

Reading the JSON (`format` "mouserecon-gpu-check"): `ok` is true when every stage is "ok" (or, in a
dry run, "skipped" for want of CUDA). `install` and `stages.<name>` each have `status` ("ok", "failed",
"timeout", "skipped"), `seconds`, on failure `error` and `log_tail`, and when skipped `reason`; every
stage's full output is in `gpu_check_logs/<name>.log` beside the JSON. Numbers: render_compare.scenes.<a|b>.
<images|alphas|depths|depths_alpha>0.5|grad_*> = {max_abs, ref_max_abs (the cpp value's largest magnitude,
for scale), cosine}; model_forward.best_s / peak_gib; finetune.steps_per_s (median over steps after the
third), peak_gib, nonfinite_loss_steps, skipped_steps, checks; sequence.runs.<model>.frames_per_s_*
(end_to_end: whole command; in_process: sequence.json's seconds; steady: between the first and last frame
written). `imported_dropped` lists modules of packages the wheel folder leaves out that a stage imported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMAT, VERSION = "mouserecon-gpu-check", 1
STAGES = {  # name -> time limit (s) on the GPU machine; the dry run uses the same, capped by --budget
    "environment": 60, "gsplat_compile": 300, "render_compare": 120, "model_forward": 120,
    "finetune": 180, "reconstruct": 120, "sequence": 150, "cuda_tests": 120,
}
NEEDS_GSPLAT = ("render_compare", "finetune", "reconstruct", "sequence", "cuda_tests")
DROPPED_MODULES = ("viser", "cv2", "av", "gsply", "lpips", "scipy")  # gpu_prepare.DROPPED's import names
NO_CUDA = "no CUDA"
MIN_STAGE_S = 15


# ---- the parent: install, run each stage in its own process, report -------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    parser.add_argument("--dry-run", action="store_true", help="CPU only, small: what can be checked without CUDA")
    parser.add_argument("--wheels", type=Path, default=ROOT / "build" / "gpu_wheels")
    parser.add_argument("--data", type=Path, default=ROOT / "build" / "gpu_data")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--budget", type=float, default=460.0, help="seconds for everything")
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps")
    parser.add_argument("--inject-step", type=int, default=10, help="the step given a huge gradient")
    parser.add_argument("--frames", type=int, default=32, help="frames of the sequence stage")
    parser.add_argument("--no-install", action="store_true", help="never pip install (fail if not importable)")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        return _child(args)
    return _parent(args)


def _parent(args) -> int:
    start = time.monotonic()
    deadline = start + args.budget
    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="gpu_check_")) if own_work else args.work
    work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    logs = args.out.parent / "gpu_check_logs"
    logs.mkdir(exist_ok=True)
    report = {"format": FORMAT, "version": VERSION, "dry_run": args.dry_run, "ok": False, "budget_s": args.budget,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": [sys.executable, *sys.argv],
              "host": platform.node(), "install": None, "stages": {}}
    env = _stage_env()
    try:
        report["install"] = _install(args, env, logs / "install.log", work)
        _write(args.out, report)
        for name, limit in STAGES.items():
            remaining = deadline - time.monotonic()
            compiled = report["stages"].get("gsplat_compile", {}).get("status")
            if name in NEEDS_GSPLAT and not args.dry_run and compiled != "ok":
                result = {"status": "skipped", "reason": f"gsplat_compile is {compiled}", "seconds": 0.0}
            elif remaining < MIN_STAGE_S:
                result = {"status": "skipped", "reason": f"out of time ({remaining:.0f} s of --budget left)",
                          "seconds": 0.0}
            else:
                result = _run_stage(name, args, work, env, min(limit, remaining), logs / f"{name}.log")
            report["stages"][name] = result
            arch = report["stages"]["environment"].get("gpu", {}).get("capability")
            if arch and "TORCH_CUDA_ARCH_LIST" not in env:
                env["TORCH_CUDA_ARCH_LIST"] = arch  # gsplat builds for this GPU only
            _write(args.out, report)
    finally:
        report["total_s"] = round(time.monotonic() - start, 1)
        report["ok"] = _all_ok(report)
        _write(args.out, report)
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    print(summary(report))
    print(f"report: {args.out}; logs: {logs}")
    return 0 if report["ok"] else 1


def _all_ok(report: dict) -> bool:
    """Every stage ran and is "ok"; in a dry run, stages skipped for want of CUDA count as ok too."""
    def ok(part: dict) -> bool:
        return part["status"] == "ok" or (report["dry_run"] and part["status"] == "skipped"
                                          and NO_CUDA in part.get("reason", ""))

    parts = [report["install"] or {"status": "missing"}, *report["stages"].values()]
    return len(report["stages"]) == len(STAGES) and all(ok(p) for p in parts)


def _write(path: Path, report: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)


def _stage_env() -> dict[str, str]:
    """The stages' environment: gsplat's and our kernel builds cached in build/torch_extensions (kept between
    runs on the same machine), all cores for the build, pip's script folders (ninja) on PATH."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    env["PYTHONUNBUFFERED"] = "1"
    scripts = [sysconfig.get_path("scripts"), sysconfig.get_path("scripts", f"{os.name}_user")]
    env["PATH"] = os.pathsep.join([*(s for s in scripts if s), env.get("PATH", "")])
    return env


def _run(cmd: list[str], env: dict, log: Path, timeout: float, cwd: Path = ROOT) -> tuple[int | None, float]:
    """Run cmd in its own process group, output appended to log; kill the group at timeout -> (rc or None, s)."""
    start = time.monotonic()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(map(str, cmd))}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.monotonic() - start


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def _install(args, env: dict, log: Path, work: Path) -> dict:
    """Make `mouserecon` importable: nothing to do when it is; else pip install, from the wheel folder, the
    pinned packages this Python lacks (split_requirements), then the project itself (editable)."""
    probe = [sys.executable, "-c", "import mouserecon.train, mouserecon.eval, importlib.metadata as m; "
             "print(m.version('mouserecon'))"]
    rc, _ = _run(probe, env, log, 120)
    if rc == 0:
        return {"status": "ok", "seconds": 0.0, "note": "mouserecon already importable; nothing installed"}
    if args.no_install:
        return {"status": "failed", "seconds": 0.0, "error": "mouserecon is not importable and --no-install"}
    start = time.monotonic()
    requirements = args.wheels / "requirements.txt"
    if not requirements.is_file():
        return {"status": "failed", "seconds": 0.0,
                "error": f"{requirements} missing: run `python -m mouserecon.eval.gpu_prepare` on a machine with "
                         "PyPI and carry build/gpu_wheels"}
    if _run([sys.executable, "-m", "pip", "--version"], env, log, 60)[0] != 0:
        _run([sys.executable, "-m", "ensurepip", "--default-pip"], env, log, 120)
    missing, kept = split_requirements(requirements.read_text().split())
    (work / "requirements.missing.txt").write_text("".join(f"{pin}\n" for pin in missing))
    todo = [["--requirement", str(work / "requirements.missing.txt")]] if missing else []
    todo.append(["-e", str(ROOT)])
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(args.wheels), "--no-deps",
           "--disable-pip-version-check"]
    for what in todo:
        rc, _ = _run(pip + what, env, log, 300)
        if rc != 0 and "externally-managed-environment" in _tail(log, 5000):
            rc, _ = _run(pip + ["--break-system-packages"] + what, env, log, 300)
        if rc != 0:
            return {"status": "failed", "seconds": round(time.monotonic() - start, 1),
                    "error": f"pip install {' '.join(what)} failed (rc {rc})", "log_tail": _tail(log)}
    _run([sys.executable, "-m", "pip", "check"], env, log, 60)
    rc, _ = _run(probe, env, log, 120)
    result = {"status": "ok" if rc == 0 else "failed", "seconds": round(time.monotonic() - start, 1),
              "installed": missing, "kept": kept, "pip_check": _tail(log, 1500).split("pip check\n")[-1]}
    if rc != 0:
        result.update(error="mouserecon still not importable after installing", log_tail=_tail(log))
    return result


def split_requirements(pins: list[str], installed=None) -> tuple[list[str], dict[str, str]]:
    """Split `name==version` pins into those this Python lacks (to install from the wheel folder) and those it
    has at some version, kept as they are (-> {name: "installed X, pinned Y"} where X != Y): the image's own
    packages are never replaced, and the wheel folder need not hold them (gpu_prepare leaves them out)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed_version(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    installed = installed_version if installed is None else installed
    missing, kept = [], {}
    for pin in pins:
        name, _, pinned = pin.partition("==")
        have = installed(name)
        if have is None:
            missing.append(pin)
        elif have != pinned:
            kept[name] = f"installed {have}, pinned {pinned}"
    return missing, kept


def _run_stage(name: str, args, work: Path, env: dict, limit: float, log: Path) -> dict:
    result_path = work / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "mouserecon.eval.gpu_check", "--stage", name, "--result", str(result_path),
           "--work", str(work), "--data", str(args.data), "--steps", str(args.steps),
           "--inject-step", str(args.inject_step), "--frames", str(args.frames)] + (["--dry-run"] if args.dry_run else [])
    rc, seconds = _run(cmd, env, log, limit)
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    elif rc is None:
        result = {"status": "timeout", "error": f"killed after its limit of {limit:.0f} s"}
    else:
        result = {"status": "failed", "error": f"stage process exited with {rc} and wrote no result"}
    if result["status"] in ("failed", "timeout"):
        result["log_tail"] = _tail(log)
    result["seconds"] = round(seconds, 1)
    return result


# ---- the child: one stage -------------------------------------------------------------------------------


def _child(args) -> int:
    import torch

    cuda = torch.cuda.is_available()
    start = time.perf_counter()
    try:
        if not cuda and not args.dry_run and args.stage != "environment":
            result = {"status": "skipped", "reason": f"{NO_CUDA} (and not --dry-run)"}
        else:
            result = {"status": "ok", **STAGE_FUNCTIONS[args.stage](args, cuda)}
    except Exception as err:  # noqa: BLE001 - a reporting stage: record the failure, the parent runs the others
        result = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
    result["stage_s"] = round(time.perf_counter() - start, 2)
    result["imported_dropped"] = sorted(m for m in DROPPED_MODULES if m in sys.modules)
    args.result.write_text(json.dumps(result, indent=1, default=str))
    return 0


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


def _samples(args) -> list[Path]:
    root = args.data / "samples"
    found = sorted(p for p in root.iterdir() if (p / "opencv_cameras.json").is_file()) if root.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no samples in {root}: run `python -m mouserecon.eval.gpu_prepare` and carry "
                                "build/gpu_data")
    return found


def stage_environment(args, cuda: bool) -> dict:
    import torch
    from importlib.metadata import PackageNotFoundError, version
    from torch.utils import cpp_extension

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    nvcc = shutil.which("nvcc") or (cpp_extension.CUDA_HOME and str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"))
    nvcc_version = None
    if nvcc and Path(nvcc).is_file():
        nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:]
    out = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": cuda,
           "cuda_home": cpp_extension.CUDA_HOME, "nvcc": nvcc, "nvcc_version": nvcc_version,
           "cxx": shutil.which("c++") or shutil.which("g++"), "ninja": shutil.which("ninja"),
           "mouserecon_cli": shutil.which("mouserecon"),
           "env": {k: os.environ.get(k) for k in ("TORCH_EXTENSIONS_DIR", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS")},
           "versions": {n: ver(n) for n in ("mouserecon", "torchvision", "gsplat", "numpy", "scipy", "lpips",
                                             "pillow", "matplotlib", "pytest")}}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
                      "memory_gib": _gib(props.total_memory), "bf16": torch.cuda.is_bf16_supported()}
        smi = shutil.which("nvidia-smi")
        if smi:
            out["nvidia_smi"] = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                               capture_output=True, text=True).stdout.strip()
    prepared = args.data / "prepared.json"
    out["data"] = {"prepared": json.loads(prepared.read_text()) if prepared.is_file() else None,
                   "samples": len(_samples(args))}
    if not cuda:
        out["cuda"] = f"skipped: {NO_CUDA}"
    return out


def stage_gsplat_compile(args, cuda: bool) -> dict:
    if not cuda:
        return {"status": "skipped", "reason": NO_CUDA}
    from torch.utils.cpp_extension import _get_build_directory

    # Our C++ CPU kernel (render_compare's reference) builds beside gsplat, in its own process.
    cpp = subprocess.Popen([sys.executable, "-c", "from mouserecon import render_cpp; render_cpp.extension()"])
    cached = (Path(_get_build_directory("gsplat_cuda", False)) / "gsplat_cuda.so").is_file()
    start = time.perf_counter()
    from gsplat.cuda._backend import _C

    compile_s = time.perf_counter() - start
    if _C is None:
        raise RuntimeError("gsplat has no CUDA kernels: no CUDA toolkit (nvcc) was found to build them")
    cpp_rc = cpp.wait(timeout=240)
    return {"compile_s": round(compile_s, 1), "cached": cached, "cpp_extension_rc": cpp_rc,
            "cpp_extension_wait_s": round(time.perf_counter() - start - compile_s, 1),
            "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"), "max_jobs": os.environ.get("MAX_JOBS")}


def _diff(ours, ref) -> dict:
    import torch

    a, b = ours.double().flatten(), ref.double().flatten()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item() if a.numel() else math.nan
    return {"max_abs": (a - b).abs().max().item(), "ref_max_abs": b.abs().max().item(), "cosine": cosine}


def compare_backends(size: int, backend: str, reference: str = "cpp") -> dict:
    """bench_render's pixel-aligned scene (5 x size^2 Gaussians, 6 views of size^2) rendered with `backend`
    and `reference` (cpp, on the CPU): outputs and the gradients of one fixed random weighting of images,
    alphas and depths, compared on CPU copies."""
    import torch

    from mouserecon.eval.bench_render import pixel_aligned_scene
    from mouserecon.gaussians import Gaussians
    from mouserecon.render import render

    scene, cams = pixel_aligned_scene(size)
    weights = torch.rand(1, cams.c2w.shape[1], 5, size, size, generator=torch.Generator().manual_seed(1))
    got, seconds = {}, {}
    for name in (reference, backend):
        device = "cuda" if name == "gsplat" else "cpu"
        leaves = Gaussians(**{k: v.detach().to(device).clone().requires_grad_(True) for k, v in vars(scene).items()})
        views = cams.to(device=device)
        if name == "gsplat":  # warm-up (allocator, kernel loading)
            render(leaves, views, size, size, backend=name, render_depth=True).images.sum().backward()
            leaves = Gaussians(**{k: v.detach().clone().requires_grad_(True) for k, v in vars(leaves).items()})
        _sync(device == "cuda")
        tic = time.perf_counter()
        out = render(leaves, views, size, size, backend=name, render_depth=True)
        stacked = torch.cat([out.images, out.alphas, out.depths], 2)  # [1, V, 5, H, W]
        (stacked * weights.to(device)).sum().backward()
        _sync(device == "cuda")
        seconds[name] = round(time.perf_counter() - tic, 3)
        got[name] = {"images": out.images, "alphas": out.alphas, "depths": out.depths,
                     **{f"grad_{k}": v.grad for k, v in vars(leaves).items()}}
        got[name] = {k: v.detach().cpu() for k, v in got[name].items()}
    ours, ref = got[backend], got[reference]
    result = {key: _diff(ours[key], ref[key]) for key in ref}
    solid = ref["alphas"] > 0.5
    result["depths_alpha>0.5"] = _diff(ours["depths"][solid], ref["depths"][solid])
    worst = min(v["cosine"] for v in result.values())
    return {"gaussians": scene.num, "views": int(cams.c2w.shape[1]), "size": size, "fwd_bwd_s": seconds,
            "worst_cosine": worst, **result}


def stage_render_compare(args, cuda: bool) -> dict:
    if cuda:
        scenes = {"a": 128, "b": 256}
        return {"backend": "gsplat", "reference": "cpp",
                "scenes": {k: compare_backends(s, "gsplat") for k, s in scenes.items()}}
    return {"mode": "dry run: torch vs cpp on the CPU, tiny scene", "cuda": f"skipped: {NO_CUDA}",
            "backend": "torch", "reference": "cpp", "scenes": {"tiny": compare_backends(24, "torch")}}


def _model_path(args) -> Path:
    return args.work / "model.pt"


def _make_model(cuda: bool):
    import torch

    from mouserecon.model import GSLRM, ModelConfig

    torch.manual_seed(0)
    return GSLRM(ModelConfig.preset("facelift" if cuda else "tiny"))


def stage_model_forward(args, cuda: bool) -> dict:
    import torch

    from mouserecon.checkpoints import save_checkpoint
    from mouserecon.eval.bench_model import ring_cameras
    from mouserecon.model import GSLRM, ModelConfig, forward_flops

    facelift = ModelConfig.preset("facelift")
    with torch.device("meta"):
        facelift_params = sum(p.numel() for p in GSLRM(facelift).parameters())
    device = "cuda" if cuda else "cpu"
    model = _make_model(cuda)
    size, views = model.config.image_size, 5
    model = model.to(device).eval()
    images = torch.rand(1, views, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    cams = ring_cameras(views, size).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
        for i in range(4):  # 1 warm-up, 3 timed
            _sync(cuda)
            tic = time.perf_counter()
            gaussians = model(images, cams)
            _sync(cuda)
            if i:
                times.append(time.perf_counter() - tic)
    finite = all(bool(torch.isfinite(v.float()).all()) for v in vars(gaussians).values())
    if not finite:
        raise RuntimeError("the forward pass produced non-finite Gaussians")
    best = min(times)
    flops = forward_flops(model.config, views, size, size)
    out = {"preset": "facelift" if cuda else "tiny", "facelift_params": facelift_params, "views": views, "size": size,
           "dtype": "bf16 autocast" if cuda else "fp32", "best_s": round(best, 4), "times_s": [round(t, 4) for t in times],
           "gaussians": gaussians.num, "tflop": round(flops / 1e12, 3), "tflops_per_s": round(flops / best / 1e12, 1),
           "reference": "GS-LRM paper: 0.23 s per reconstruction on an A100"}
    if cuda:
        out.update(peak_gib=_gib(torch.cuda.max_memory_allocated()), peak_reserved_gib=_gib(torch.cuda.max_memory_reserved()))
    else:
        out.update(mode="dry run: facelift built on the meta device (parameter count), the tiny preset run on the CPU",
                   cuda=f"skipped: {NO_CUDA}")
    save_checkpoint(_model_path(args), model, fp16=cuda)  # the reconstruct and sequence stages use it
    return out


def stage_finetune(args, cuda: bool) -> dict:
    import torch

    from mouserecon.rundir import RunDir
    from mouserecon.train import loop as train_loop
    from mouserecon.train.config import load_recipe

    samples = _samples(args)
    if cuda:
        steps, inject = args.steps, args.inject_step
        overrides = ["model.preset=facelift", "data.resolution=512"]
    else:
        steps, inject = 2, 2
        overrides = ["model.preset=tiny", "data.resolution=32", "optim.warmup_steps=5"]
    overrides += [f"training.steps={steps}", "data.val_samples=1", "training.log_every=1", "training.val_every=100000",
                  "training.ckpt_every=100000"]
    real, calls = train_loop.step_batch, {"n": 0}

    def exploding(model, batch, recipe, losses, device):  # as tests/test_finetune.py: one huge gradient
        terms, rendered = real(model, batch, recipe, losses, device)
        if model.training:
            calls["n"] += 1
            if calls["n"] == inject:
                terms = {**terms, "total": terms["total"] * 1e9}
        return terms, rendered

    train_loop.step_batch = exploding
    out = args.work / "finetune_run"
    shutil.rmtree(out, ignore_errors=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    train_loop.finetune(train_loop.FinetuneOptions(data=samples[0].parent, out=out, recipe=load_recipe("exp_c", overrides),
                                                   device="cuda" if cuda else "cpu", progress=False))
    wall = time.perf_counter() - tic
    records = RunDir(out).read_metrics()
    train = [r for r in records if r["kind"] == "train"]
    per_step = [r["sec_per_step"] for r in train]
    steady = per_step[3:] or per_step
    nonfinite = [r["step"] for r in train if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]))]
    skipped = [r["step"] for r in train if r["skipped"]]
    checks = {"all_steps_logged": len(train) == steps, "no_nonfinite_loss": not nonfinite,
              "skip_rule_exercised": skipped == [inject] and train[inject - 1]["grad_norm"] > 25}
    result = {"preset": "facelift" if cuda else "tiny", "steps": steps, "samples": len(samples), "overrides": overrides,
              "injected_step": inject, "finetune_call_s": round(wall, 1),
              "steps_per_s": round(1 / statistics.median(steady), 3), "sec_per_step": [round(s, 3) for s in per_step],
              "losses": [r["loss"] for r in train], "grad_norms": [r["grad_norm"] for r in train],
              "nonfinite_loss_steps": nonfinite, "skipped_steps": skipped, "checks": checks,
              "val": [r for r in records if r["kind"] == "val"]}
    if cuda:
        result["peak_gib"] = _gib(torch.cuda.max_memory_allocated())
    else:
        result.update(mode="dry run: the tiny preset, 2 steps on the CPU", cuda=f"skipped: {NO_CUDA}")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # GiBs on the GPU run
    if not all(checks.values()):
        result.update(status="failed", error=f"checks failed: {[k for k, v in checks.items() if not v]}")
    return result


def _models(args, cuda: bool) -> dict[str, Path | None]:
    """Checkpoints for the CLI stages: the model_forward stage's (facelift, random; tiny in a dry run; made
    here if that stage did not), and on CUDA also the bundled demo (None)."""
    path = _model_path(args)
    if not path.is_file():
        from mouserecon.checkpoints import save_checkpoint

        save_checkpoint(path, _make_model(cuda), fp16=cuda)
    models = {"facelift_random" if cuda else "tiny_random": path}
    if cuda:
        models["demo"] = None
    return models


def _cli(args: list[str], log: Path, timeout: float = 150) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "mouserecon.cli", *args]
    tic = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}")
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")
    return time.perf_counter() - tic, done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def stage_reconstruct(args, cuda: bool) -> dict:
    sample = _samples(args)[0]
    device = "cuda" if cuda else "cpu"
    runs = {}
    for label, ckpt in _models(args, cuda).items():
        out = args.work / "reconstruct" / label
        out.mkdir(parents=True, exist_ok=True)
        wall, line = _cli(["reconstruct", str(sample), "-o", str(out / "mouse.ply"), "--device", device]
                          + (["--checkpoint", str(ckpt)] if ckpt else []), args.work / "cli.log")
        sidecar = json.loads((out / "mouse.json").read_text())
        runs[label] = {"wall_s": round(wall, 2), "output": line, "ply_mib": round((out / "mouse.ply").stat().st_size / 2**20, 1),
                       "counts": sidecar.get("counts"), "timings_s": sidecar.get("timings_s")}
    result = {"device": device, "sample": str(sample), "runs": runs}
    if not cuda:
        result.update(mode="dry run: the CLI on the CPU with a tiny checkpoint", cuda=f"skipped: {NO_CUDA}")
    return result


def stage_sequence(args, cuda: bool) -> dict:
    samples = _samples(args)
    frames = args.frames if cuda else 3
    seq = args.work / "sequence_samples"
    shutil.rmtree(seq, ignore_errors=True)
    seq.mkdir()
    for i in range(frames):  # the prepared samples, repeated, as frames 0..frames-1
        shutil.copytree(samples[i % len(samples)], seq / f"sample_{i:05d}")
    device = "cuda" if cuda else "cpu"
    runs = {}
    for label, ckpt in _models(args, cuda).items():
        out = args.work / "sequence" / label
        shutil.rmtree(out, ignore_errors=True)
        wall, line = _cli(["reconstruct", str(seq), "-o", str(out), "--device", device]
                          + (["--checkpoint", str(ckpt)] if ckpt else []), args.work / "cli.log")
        index = json.loads((out / "sequence.json").read_text())
        written = len(index["frames"])
        stamps = sorted(p.stat().st_mtime for p in out.glob("mouse_*.json"))
        steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else None
        runs[label] = {"frames": written, "failed": len(index["failed"]), "wall_s": round(wall, 2), "output": line,
                       "frames_per_s_end_to_end": round(written / wall, 2),
                       "frames_per_s_in_process": round(written / index["seconds_per_rank"][0], 2),
                       "frames_per_s_steady": None if steady is None else round(steady, 2),
                       "gaussians_per_frame": index["frames"][0]["gaussians"] if written else None,
                       "ply_mib_per_frame": round(sum(p.stat().st_size for p in out.glob("mouse_*.ply")) / max(written, 1) / 2**20, 1)}
        shutil.rmtree(out, ignore_errors=True)
        if written != frames:
            raise RuntimeError(f"{label}: {written} of {frames} frames written: {index['failed'][:3]}")
    result = {"device": device, "frames": frames, "runs": runs}
    if not cuda:
        result.update(mode="dry run: the CLI on the CPU with a tiny checkpoint, 3 frames", cuda=f"skipped: {NO_CUDA}")
    return result


def stage_cuda_tests(args, cuda: bool) -> dict:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.cuda" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *files]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    result = {"files": files, "returncode": done.returncode, "summary": lines[-1] if lines else "",
              "output_tail": done.stdout[-3000:]}
    if not cuda:
        result.update(status="skipped", reason=f"{NO_CUDA} (pytest ran: the CUDA tests skip themselves here)")
    elif done.returncode != 0:
        result.update(status="failed", error=f"pytest exited with {done.returncode}: {result['summary']}")
    return result


STAGE_FUNCTIONS = {
    "environment": stage_environment, "gsplat_compile": stage_gsplat_compile, "render_compare": stage_render_compare,
    "model_forward": stage_model_forward, "finetune": stage_finetune, "reconstruct": stage_reconstruct,
    "sequence": stage_sequence, "cuda_tests": stage_cuda_tests,
}


# ---- the summary ----------------------------------------------------------------------------------------


def _headline(name: str, r: dict) -> str:
    if r.get("status") != "ok":
        return (r.get("reason") or r.get("error") or "")[:90]
    try:
        if name == "install":
            return r.get("note", "installed from the wheel folder")
        if name == "environment":
            gpu = r.get("gpu", {})
            return (f"{gpu.get('name', 'no GPU')} {gpu.get('memory_gib', '')} GiB cc {gpu.get('capability', '-')}; "
                    f"torch {r['torch']} (CUDA {r['torch_cuda']}); nvcc {'yes' if r['nvcc_version'] else 'no'}; "
                    f"{r['data']['samples']} samples")
        if name == "gsplat_compile":
            return f"{r['compile_s']} s ({'cached' if r['cached'] else 'built'}, arch {r['arch_list']}, {r['max_jobs']} jobs)"
        if name == "render_compare":
            return "; ".join(f"{k}: image max|d| {s['images']['max_abs']:.1e}, worst cos {s['worst_cosine']:.5f}"
                             for k, s in r["scenes"].items())
        if name == "model_forward":
            peak = f", peak {r['peak_gib']} GiB" if "peak_gib" in r else ""
            return f"{r['preset']} {r['views']}x{r['size']} px: best {r['best_s']} s{peak}"
        if name == "finetune":
            peak = f", peak {r['peak_gib']} GiB" if "peak_gib" in r else ""
            return (f"{r['steps']} steps, {r['steps_per_s']} steps/s{peak}, non-finite {len(r['nonfinite_loss_steps'])}, "
                    f"skipped {r['skipped_steps']} (injected {r['injected_step']})")
        if name == "reconstruct":
            return "; ".join(f"{k}: {v['wall_s']} s" for k, v in r["runs"].items())
        if name == "sequence":
            return "; ".join(f"{k}: {v['frames_per_s_steady']} frames/s steady, {v['frames_per_s_end_to_end']} end to end"
                             for k, v in r["runs"].items())
        if name == "cuda_tests":
            return r["summary"]
    except (KeyError, TypeError) as err:
        return f"(incomplete result: {err!r})"
    return ""


def summary(report: dict) -> str:
    rows = [("install", report["install"] or {"status": "missing"})] + list(report["stages"].items())
    lines = [f"GPU check ({'dry run, CPU' if report['dry_run'] else 'CUDA'}): {'OK' if report['ok'] else 'NOT OK'} "
             f"in {report.get('total_s', '?')} s of {report['budget_s']:.0f}",
             f"{'stage':<16}{'status':<9}{'s':>7}  result", "-" * 100]
    for name, r in rows:
        lines.append(f"{name:<16}{r.get('status', '?'):<9}{r.get('seconds', 0):>7.1f}  {_headline(name, r)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
