"""Prepare, on this machine (with PyPI), everything the offline GPU check (`gpu_check.py`) needs.

    python -m mouserecon.eval.gpu_prepare [--wheels build/gpu_wheels] [--data build/gpu_data]

1. Wheels for the GPU machine (Python 3.12, manylinux x86_64, torch preinstalled, no registry):
   the project's runtime dependencies from pyproject.toml and their own dependencies, resolved
   from the distributions installed here (markers evaluated for Python 3.12 on Linux) and pinned
   to the versions installed here, i.e. the versions the test suite ran with. Left out:
   torch, torchvision and what torch itself pulls in (nvidia-*, cuda-*, triton, sympy, ...):
   preinstalled there; and the dependencies the check never imports (`DROPPED`, with the reason).
   Added: pytest (the CUDA-marked tests) and setuptools (the editable install's build backend).
   The pinned list goes to `--wheels`/requirements.txt; `pip download --no-deps --only-binary=:all:
   --python-version 3.12 --platform manylinux...` writes there the wheels of those the H200 image does not
   already hold (`ON_IMAGE`; gpu_check keeps the image's own versions of those), plus setuptools: about
   7 MiB instead of 50, which matters because a device call carries at most 64 MiB with the working tree.
2. Synthetic data (`mouserecon.synth`): `--samples` mice, 6 views at `--resolution` px, in mm,
   under `--data`/samples, plus `prepared.json` (what was made, with which versions).

Both folders are ignored by git (`/build/`), so they travel to the GPU machine as `carry` paths.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import time
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "build" / "gpu_wheels"
DATA = ROOT / "build" / "gpu_data"
PYTHON_VERSION = "3.12"
# torch >= 2.10 wheels are manylinux_2_28, so the GPU machine's glibc is >= 2.28.
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64")
# Preinstalled on the GPU machine with torch (never downloaded, nor their dependencies).
PREINSTALLED = ("torch", "torchvision")
PREINSTALLED_PREFIXES = ("nvidia-", "cuda-")
# Runtime dependencies the check never imports (verified by the dry run: `imported_dropped` per stage).
DROPPED = {
    "viser": "the web viewer only",
    "opencv-python-headless": "prepare / masks / calibration only (recordings)",
    "av": "video decoding (prepare) only",
    "gsply": "the compressed-PLY export only",
    "lpips": "LPIPS only (exp_c weighs it 0; imported when an LPIPS net is built)",
    "scipy": "DANNCE .mat calibrations (and lpips) only",
}
EXTRA = ("pytest", "setuptools")  # the CUDA-marked tests; the build backend of `pip install -e .`
BUILD_BACKEND = "setuptools"  # its wheel always travels: `pip install -e .` builds in isolation, from the folder
# Distributions the H200 image already holds (/work/.library/device/KINDS.md, "Python packages already there",
# read 2026-11-17): gpu_check keeps whatever version the image has, so their wheels need not travel (the travel
# limit is 64 MiB with the working tree; numpy + matplotlib + pillow alone are 32 MiB). `--all-wheels` takes all.
ON_IMAGE = frozenset({
    "click", "contourpy", "cycler", "fonttools", "imageio", "iniconfig", "jaxtyping", "kiwisolver",
    "markdown-it-py", "matplotlib", "mdurl", "ninja", "numpy", "packaging", "pillow", "pluggy", "pygments",
    "pyparsing", "pytest", "python-dateutil", "pyyaml", "rich", "setuptools", "six", "tqdm", "wadler-lindig",
})
REQUIREMENTS = "requirements.txt"


def target_environment(python_version: str = PYTHON_VERSION) -> dict[str, str]:
    """PEP 508 marker environment of the GPU machine: CPython `python_version` on x86_64 Linux."""
    env = default_environment()
    env.update({"python_version": python_version, "python_full_version": f"{python_version}.0",
                "implementation_name": "cpython", "platform_python_implementation": "CPython",
                "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                "platform_machine": "x86_64", "extra": ""})
    return env


def _excluded(name: str, torch_closure: set[str]) -> bool:
    return name in PREINSTALLED or name.startswith(PREINSTALLED_PREFIXES) or name in torch_closure


def _requires(name: str, env: dict[str, str]) -> list[str]:
    """Canonical names of the installed distribution `name`'s requirements whose markers hold in `env`."""
    try:
        reqs = distribution(name).requires or []
    except PackageNotFoundError:
        raise RuntimeError(f"{name} is not installed here: install the project's dependencies first "
                           "(pip install -e .) so their versions can be pinned") from None
    out = []
    for text in reqs:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            out.append(canonicalize_name(req.name))
    return out


def _closure(roots: list[str], env: dict[str, str], stop=lambda name: False) -> set[str]:
    seen: set[str] = set()
    todo = [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or stop(name):
            continue
        seen.add(name)
        todo.extend(_requires(name, env))
    return seen


def wheel_requirements(pyproject: Path = ROOT / "pyproject.toml", dropped: dict[str, str] = DROPPED,
                       extra: tuple[str, ...] = EXTRA, env: dict[str, str] | None = None) -> list[str]:
    """Pinned `name==version` for every wheel the GPU machine needs, sorted by name.

    The project's runtime dependencies minus `dropped` plus `extra`, and everything they require (markers
    evaluated in `env`, the GPU machine's by default), except torch, torchvision, nvidia-* / cuda-* and the
    rest of torch's own dependency closure. Versions are those installed here.
    """
    env = target_environment() if env is None else env
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    names = [canonicalize_name(Requirement(d).name) for d in deps]
    unknown = sorted(set(map(canonicalize_name, dropped)) - set(names))
    if unknown:
        raise ValueError(f"dropped packages {unknown} are not dependencies in {pyproject}")
    torch_closure = _closure(["torch"], env, stop=lambda n: n.startswith(PREINSTALLED_PREFIXES))
    roots = [n for n in names if n not in {canonicalize_name(d) for d in dropped}] + list(extra)
    keep = _closure(roots, env, stop=lambda n: _excluded(n, torch_closure - set(map(canonicalize_name, extra))))
    return sorted(f"{name}=={distribution(name).version}" for name in keep)


def wheels_to_fetch(requirements: list[str], on_image: frozenset[str] = ON_IMAGE) -> list[str]:
    """The pins whose wheels must travel: those the GPU image lacks, and the build backend."""
    return [r for r in requirements
            if canonicalize_name(Requirement(r).name) not in on_image - {BUILD_BACKEND}]


def download_wheels(requirements: list[str], folder: Path, python_version: str = PYTHON_VERSION,
                    on_image: frozenset[str] = ON_IMAGE) -> list[Path]:
    """`pip download` binary wheels (no dependency resolution) into `folder` (emptied) of the `requirements`
    not `on_image`; `folder`/requirements.txt lists them all (gpu_check installs those the machine lacks)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    fetch = wheels_to_fetch(requirements, on_image)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", "--abi", f"cp{python_version.replace('.', '')}",
           *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(folder), *fetch]
    subprocess.run(cmd, check=True)
    (folder / REQUIREMENTS).write_text("\n".join(requirements) + "\n")
    wheels = sorted(folder.glob("*.whl"))
    got = {canonicalize_name(re.split(r"-\d", w.name, maxsplit=1)[0]) for w in wheels}
    missing = sorted({canonicalize_name(r.split("==")[0]) for r in fetch} - got)
    if missing:
        raise RuntimeError(f"no wheel downloaded for {missing}")
    return wheels


def prepare_data(folder: Path, samples: int, resolution: int, seed: int = 1000) -> dict:
    """Write `samples` synthetic mice (6 views, `resolution` px, mm) to folder/samples and prepared.json."""
    from mouserecon.rundir import versions
    from mouserecon.synth.generate import generate_dataset

    if folder.exists():
        shutil.rmtree(folder)
    start = time.perf_counter()
    generate_dataset(folder / "samples", n=samples, seed=seed, resolution=resolution, units="mm")
    record = {"samples": samples, "resolution": resolution, "seed": seed, "units": "mm", "views": 6,
              "seconds": round(time.perf_counter() - start, 1), "versions": versions()}
    (folder / "prepared.json").write_text(json.dumps(record, indent=1))
    return record


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, default=WHEELS)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--skip-wheels", action="store_true", help="only (re)make the data")
    parser.add_argument("--skip-data", action="store_true", help="only (re)download the wheels")
    parser.add_argument("--all-wheels", action="store_true",
                        help="also the wheels of packages the H200 image holds (ON_IMAGE): for another machine")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.skip_wheels:
        reqs = wheel_requirements()
        log.info("%d pinned packages for Python %s: %s", len(reqs), PYTHON_VERSION, " ".join(reqs))
        log.info("left out: %s; torch, torchvision and torch's own dependencies (preinstalled there)",
                 "; ".join(f"{k} ({v})" for k, v in DROPPED.items()))
        on_image = frozenset() if args.all_wheels else ON_IMAGE
        fetch = wheels_to_fetch(reqs, on_image)
        log.info("on the H200 image, no wheel downloaded: %s", " ".join(sorted(set(reqs) - set(fetch))) or "none")
        wheels = download_wheels(reqs, args.wheels, on_image=on_image)
        for w in wheels:
            log.info("%7.2f MiB  %s", w.stat().st_size / 2**20, w.name)
        log.info("%s: %d wheels, %.1f MiB", args.wheels, len(wheels), folder_mib(args.wheels))
    if not args.skip_data:
        record = prepare_data(args.data, args.samples, args.resolution)
        log.info("%s: %d samples at %d px in %s s, %.1f MiB", args.data, record["samples"], record["resolution"],
                 record["seconds"], folder_mib(args.data))

if __name__ == "__main__":
    main()
