"""The viser web viewer: `serve()` opens PLY files (and optionally the input cameras) in a browser.

`serve` / `serve_gaussians` start a viser server bound to 127.0.0.1 unless told otherwise and return
a `Viewer` handle (non-blocking with `block=False`), so the viewer is driven and tested without click.
Each PLY is one toggleable layer; the GUI offers an opacity threshold, a splat scale, the background
colour, camera / axes visibility, "look through camera i" and a PNG render of the current view.
The world is drawn multiplied by `Viewer.scene_scale` (see `viewer/scene.py`). Sequences (one PLY per
frame, with a timeline) are `viewer/timeline.py`, built on the pieces here.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import viser
from PIL import Image

from mouserecon.errors import MouseReconError
from mouserecon.cameras import Cameras
from mouserecon.data import SampleError, load_sample
from mouserecon.gaussians import Gaussians
from mouserecon.ply import PlyError, load_ply
from mouserecon.viewer.scene import (
    CameraPose,
    SplatArrays,
    camera_poses,
    choose_scene_scale,
    displayed,
    robust_bounds,
    scaled,
    splat_arrays,
)

log = logging.getLogger(__name__)

UP_DIRECTIONS = ("+x", "-x", "+y", "-y", "+z", "-z")
FRUSTUM_IMAGE_PX = 256  # longest side of the image shown on a frustum (transport size only)


class ViewerError(MouseReconError):
    """The viewer cannot start: bad input file or unusable address; the message names which."""


# ---- inputs ------------------------------------------------------------------------------------


def load_layers(paths: list[str | Path]) -> dict[str, Gaussians]:
    """Read PLY files into named layers (file stem, or index + stem when stems repeat).

    Raises ViewerError naming the file for a missing, unreadable, malformed or empty PLY.
    """
    if not paths:
        raise ViewerError("no PLY file given")
    paths = [Path(p) for p in paths]
    stems = [p.stem for p in paths]
    return {stems[i] if stems.count(stems[i]) == 1 else f"{i}_{stems[i]}": load_gaussians(path)
            for i, path in enumerate(paths)}


def load_gaussians(path: str | Path) -> Gaussians:
    """One PLY's Gaussians [N]; ViewerError naming the file when it is missing, unreadable, malformed or empty."""
    path = Path(path)
    if not path.is_file():
        raise ViewerError(f"{path}: PLY file not found")
    try:
        gaussians = load_ply(path)
    except PlyError as err:
        raise ViewerError(f"{path}: cannot be read as a 3DGS PLY ({err})") from None
    if gaussians.num == 0:
        raise ViewerError(f"{path}: the PLY contains no Gaussians")
    return gaussians


def load_camera_views(sample: str | Path) -> tuple[Cameras, list[np.ndarray]]:
    """Cameras [V] of a sample (its folder, `opencv_cameras.json` or `transforms.json`) and their
    images, white-composited, as uint8 [h, w, 3] thumbnails (longest side <= FRUSTUM_IMAGE_PX).
    Raises ViewerError naming the file for a bad camera file or image (see `mouserecon.data`)."""
    try:
        loaded = load_sample(sample)
    except SampleError as err:
        raise ViewerError(str(err)) from None
    images = []
    for image in loaded.images:  # [3, H, W] in [0, 1]
        thumb = Image.fromarray(np.round(image.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
        thumb.thumbnail((FRUSTUM_IMAGE_PX, FRUSTUM_IMAGE_PX))
        images.append(np.asarray(thumb))
    return loaded.cameras, images


def check_port_free(host: str, port: int) -> None:
    """Raise ViewerError if nothing can listen on (host, port); viser would silently take the next
    port instead. Port 0 (any free port) always passes."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ViewerError(f"port {port} on {host} is already in use; pass another --port") from None
            raise ViewerError(f"cannot listen on {host}:{port} ({err.strerror})") from None


# ---- the running viewer ------------------------------------------------------------------------


@dataclass
class Viewer:
    """Handle of a running viewer. `layers` hold the splats in the scaled world (unfiltered)."""

    server: viser.ViserServer
    url: str
    scene_scale: float
    layers: dict[str, SplatArrays]
    poses: list[CameraPose]
    render_dir: Path
    gui: dict[str, object] = field(default_factory=dict)
    _splats: dict[str, viser.GaussianSplatHandle] = field(default_factory=dict)
    _frustums: list[viser.CameraFrustumHandle] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        return self.server.get_port()

    def redraw_splats(self) -> None:
        """Re-send every layer (with its visibility) under the current opacity threshold and splat scale."""
        with self._lock:
            for name, arrays in self.layers.items():
                shown = displayed(arrays, self.gui["opacity"].value, self.gui["splat_scale"].value)
                self._splats[name] = self.server.scene.add_gaussian_splats(
                    f"/layers/{_node_name(name)}", centers=shown.centers, covariances=shown.covariances,
                    rgbs=shown.rgbs, opacities=shown.opacities, visible=self.gui[f"layer:{name}"].value,
                )

    def set_layer_visible(self, name: str) -> None:
        """Show or hide a layer as its GUI checkbox says (a layer not drawn now stays undrawn)."""
        with self._lock:
            if name in self._splats:
                self._splats[name].visible = self.gui[f"layer:{name}"].value

    def draw_cameras(self, images: list[np.ndarray] | None = None) -> None:
        """Replace the drawn frustums by those of `poses` (images: one uint8 [h, w, 3] per pose, optional),
        sized by their median distance to the splats; needs the "Cameras" GUI (see `_add_camera_gui`)."""
        assert images is None or len(images) == len(self.poses), "one image per camera"
        gui = self.gui
        with self._lock:
            for frustum in self._frustums:
                frustum.remove()
            self._frustums = []
            if self.poses:
                centre, _ = robust_bounds(list(self.layers.values())) if self.layers else (np.zeros(3), 1.0)
                distance = float(np.median([np.linalg.norm(p.position - centre) for p in self.poses]))
            for i, pose in enumerate(self.poses):
                frustum = self.server.scene.add_camera_frustum(
                    f"/cameras/cam_{i:03d}", fov=pose.fov, aspect=pose.aspect, scale=0.12 * distance,
                    thickness=0.004 * distance, color=(40, 90, 200), image=None if images is None else images[i],
                    wxyz=pose.wxyz, position=pose.position, visible=gui["show_cameras"].value,
                )
                frustum.on_click(lambda event, i=i: self.look_through(i, clients=[event.client]))
                self._frustums.append(frustum)
            gui["camera_index"].options = [str(i) for i in range(len(self.poses))] or ["none"]
            gui["camera_index"].value = gui["camera_index"].options[0]
            gui["look_through"].disabled = not self.poses

    def wait_for_client(self, timeout: float = 30.0) -> viser.ClientHandle:
        """The first connected browser, waiting up to `timeout` seconds (TimeoutError)."""
        deadline = time.monotonic() + timeout
        while not (clients := self.server.get_clients()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no browser connected to {self.url} within {timeout:.0f} s")
            time.sleep(0.05)
        return clients[min(clients)]

    def look_through(self, index: int, clients: list[viser.ClientHandle] | None = None) -> None:
        """Put the browser camera(s) at input camera `index`: its pose and vertical FOV."""
        if not 0 <= index < len(self.poses):
            raise IndexError(f"camera {index} out of range (the viewer has {len(self.poses)} cameras)")
        pose = self.poses[index]
        for client in clients if clients is not None else self.server.get_clients().values():
            with client.atomic():
                client.camera.position = pose.position
                client.camera.wxyz = pose.wxyz
                client.camera.fov = pose.fov

    def save_render(self, path: str | Path | None = None, client: viser.ClientHandle | None = None) -> Path:
        """Ask a browser (default: the first connected) for a render of its current view at its canvas
        size, background colour included and GUI excluded, and write it as a PNG (default: the next
        free `render_NNN.png` in `render_dir`); returns the path written."""
        client = client or self.wait_for_client(timeout=0.0)
        if path is None:
            self.render_dir.mkdir(parents=True, exist_ok=True)
            taken = {p.name for p in self.render_dir.glob("render_*.png")}
            path = self.render_dir / next(f"render_{i:03d}.png" for i in range(len(taken) + 1)
                                          if f"render_{i:03d}.png" not in taken)
        path = Path(path)
        image = client.get_render(client.camera.image_height, client.camera.image_width,
                                  transport_format="png", timeout=30.0)
        iio.imwrite(path, image)
        log.info("saved render %s (%dx%d)", path, image.shape[1], image.shape[0])
        return path

    def serve_until_interrupted(self) -> None:
        """Block until Ctrl-C (KeyboardInterrupt), then stop the server."""
        try:
            while True:
                time.sleep(0.5)
        except KeyboardInterrupt:
            log.info("stopping the viewer")
        finally:
            self.stop()

    def stop(self) -> None:
        self.server.stop()


def _node_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# ---- building the scene ------------------------------------------------------------------------


def serve(
    plys: list[str | Path],
    sample: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    up: str = "+z",
    render_dir: str | Path = ".",
    block: bool = True,
) -> Viewer:
    """Open PLY files (one layer each) and, optionally, the cameras and images of a sample (a folder,
    or its `opencv_cameras.json` / `transforms.json`). See `serve_gaussians` for the rest."""
    layers = load_layers(plys)
    cameras, images = load_camera_views(sample) if sample is not None else (None, None)
    return serve_gaussians(layers, cameras, images, host=host, port=port, up=up, render_dir=render_dir, block=block)


def serve_gaussians(
    layers: dict[str, Gaussians],
    cameras: Cameras | None = None,
    images: list[np.ndarray] | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    up: str = "+z",
    render_dir: str | Path = ".",
    block: bool = True,
) -> Viewer:
    """Start the viewer on named layers of unbatched Gaussians [N].

    cameras: [V] input cameras drawn as frustums (images: V uint8 [h, w, 3], optional).
    port: 0 picks a free port. up: world up axis, one of UP_DIRECTIONS (+z for the FaceLift rig).
    block: serve until Ctrl-C, then stop and return the (stopped) handle; else return at once.
    """
    if up not in UP_DIRECTIONS:
        raise ViewerError(f"up direction {up!r} is not one of {', '.join(UP_DIRECTIONS)}")
    if not layers or any(g.means.ndim != 2 or g.num == 0 for g in layers.values()):
        raise ViewerError("every layer needs an unbatched, non-empty set of Gaussians")
    if images is not None:
        assert cameras is not None and len(images) == len(cameras), "one image per camera"
    raw = {name: splat_arrays(g) for name, g in layers.items()}
    scene_scale = pick_scene_scale(list(raw.values()))
    arrays = {name: scaled(a, scene_scale) for name, a in raw.items()}
    poses = camera_poses(cameras, scene_scale) if cameras is not None else []

    server, url = start_server(host, port)
    viewer = Viewer(server, url, scene_scale, arrays, poses, Path(render_dir))
    build_scene(viewer, up, images, camera_gui=bool(poses))
    log.info("viewer at %s", viewer.url)
    if block:
        viewer.serve_until_interrupted()
    return viewer


def pick_scene_scale(layers: list[SplatArrays]) -> float:
    """`choose_scene_scale`, logged when it is not 1."""
    scene_scale = choose_scene_scale(layers)
    if scene_scale != 1.0:
        log.info("drawing the scene x%g so that float16 covariances keep their shape", scene_scale)
    return scene_scale


def start_server(host: str, port: int) -> tuple[viser.ViserServer, str]:
    """A viser server listening on (host, port) and its URL; ViewerError for a busy or unusable address."""
    check_port_free(host, port)
    server = viser.ViserServer(host=host, port=port, label="mouserecon", verbose=False)
    if port != 0 and server.get_port() != port:  # lost a race for the port after our check
        server.stop()
        raise ViewerError(f"port {port} on {host} is already in use; pass another --port")
    url_host = f"[{host}]" if ":" in host else host
    return server, f"http://{url_host}:{server.get_port()}"


def build_scene(viewer: Viewer, up: str, images: list[np.ndarray] | None, camera_gui: bool) -> None:
    """The scene and GUI of a new viewer: initial camera from the splats' bounds, the Splats and Scene
    folders, and (camera_gui) the Cameras folder with the frustums of `viewer.poses`."""
    server, gui = viewer.server, viewer.gui
    server.scene.set_up_direction(up)
    centre, radius = robust_bounds(list(viewer.layers.values()))
    _set_initial_camera(server, up, centre, radius)

    with server.gui.add_folder("Splats"):
        for name in viewer.layers:
            gui[f"layer:{name}"] = server.gui.add_checkbox(f"Layer {name}", initial_value=True)
        gui["opacity"] = server.gui.add_slider("Opacity threshold", min=0.0, max=1.0, step=0.01, initial_value=0.0)
        gui["splat_scale"] = server.gui.add_slider("Splat scale", min=0.1, max=3.0, step=0.05, initial_value=1.0)
    with server.gui.add_folder("Scene"):
        gui["background"] = server.gui.add_rgb("Background", initial_value=(255, 255, 255))
        gui["show_axes"] = server.gui.add_checkbox("Show axes", initial_value=False)
        gui["save_render"] = server.gui.add_button("Save render (PNG)")

    for name in viewer.layers:
        gui[f"layer:{name}"].on_update(lambda _, name=name: viewer.set_layer_visible(name))
    gui["opacity"].on_update(lambda _: viewer.redraw_splats())
    gui["splat_scale"].on_update(lambda _: viewer.redraw_splats())
    gui["background"].on_update(lambda _: _set_background(server, gui["background"].value))
    gui["show_axes"].on_update(lambda _: setattr(server.scene.world_axes, "visible", gui["show_axes"].value))
    gui["save_render"].on_click(lambda event: _save_render_clicked(viewer, event.client))
    server.scene.world_axes.axes_length = 0.5 * radius
    server.scene.world_axes.axes_radius = 0.01 * radius
    _set_background(server, gui["background"].value)
    viewer.redraw_splats()
    if camera_gui:
        _add_camera_gui(viewer)
        viewer.draw_cameras(images)


def _save_render_clicked(viewer: Viewer, client: viser.ClientHandle | None) -> None:
    path = viewer.save_render(client=client)
    if client is not None:
        client.add_notification("Render saved", str(path.resolve()), auto_close_seconds=5.0)


def _set_background(server: viser.ViserServer, rgb: tuple[int, int, int]) -> None:
    server.scene.set_background_image(np.full((8, 8, 3), rgb, dtype=np.uint8), format="png")


def _set_initial_camera(server: viser.ViserServer, up: str, centre: np.ndarray, radius: float) -> None:
    """An oblique view from 25 deg above the horizon, far enough to see the bulk of the splats."""
    up_vec = np.zeros(3)
    up_vec["xyz".index(up[1])] = 1.0 if up[0] == "+" else -1.0
    side = np.roll(np.abs(up_vec), 1)  # a world axis orthogonal to up
    front = np.cross(up_vec, side)
    elevation = np.radians(25.0)
    direction = np.cos(elevation) * (side + front) / np.sqrt(2.0) + np.sin(elevation) * up_vec
    server.initial_camera.position = centre + 4.0 * radius * direction
    server.initial_camera.look_at = centre
    server.initial_camera.up = up_vec
    server.initial_camera.near = 0.01 * radius
    server.initial_camera.far = 100.0 * radius


def _add_camera_gui(viewer: Viewer) -> None:
    server, gui = viewer.server, viewer.gui
    with server.gui.add_folder("Cameras"):
        gui["show_cameras"] = server.gui.add_checkbox("Show cameras", initial_value=True)
        gui["camera_index"] = server.gui.add_dropdown("Camera", options=["none"], initial_value="none")
        gui["look_through"] = server.gui.add_button("Look through camera")

    def show_cameras(_) -> None:
        for frustum in viewer._frustums:
            frustum.visible = gui["show_cameras"].value

    def look_through(event) -> None:
        if viewer.poses:  # the frame shown may have none
            viewer.look_through(int(gui["camera_index"].value), clients=None if event.client is None else [event.client])

    gui["show_cameras"].on_update(show_cameras)
    gui["look_through"].on_click(look_through)
