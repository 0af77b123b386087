"""Compose docs/quickstart.png from the quick start's outputs.

    mouserecon reconstruct assets/demo_mouse -o mouse.ply --previews previews/
    mouserecon view mouse.ply --sample assets/demo_mouse        # then screenshot http://127.0.0.1:8080
    python docs/make_quickstart.py previews/ viewer.png -o docs/quickstart.png

Top: the input views the model saw (cropped around the mouse) over its renders of them, then the
held-out view and its render, then turntable frames; bottom: the viewer screenshot.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from PIL import Image, ImageDraw, ImageSequence

log = logging.getLogger("make_quickstart")

TILE = 192  # px: previews are at the model's resolution (64 or 128 px), enlarged to about this
GAP = 12
LABEL = 22


def labelled(image: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (image.width, image.height + LABEL), "white")
    out.paste(image, (0, LABEL))
    ImageDraw.Draw(out).text((4, 4), text, fill="black")
    return out


def row(images: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (sum(i.width for i in images) + GAP * (len(images) - 1), max(i.height for i in images)),
                    "white")
    x = 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width + GAP
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("previews", type=Path)
    parser.add_argument("screenshot", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()

    frames = list(ImageSequence.Iterator(Image.open(args.previews / "turntable.gif")))
    scale = max(1, round(TILE / frames[0].height))  # a turntable frame is one render at the model's resolution

    def big(image: Image.Image) -> Image.Image:
        return image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)

    inputs = big(Image.open(args.previews / "inputs.png"))
    heldout = big(Image.open(args.previews / "heldout.png"))
    turntable = [big(frames[i * len(frames) // 4]) for i in range(4)]
    tiles = Image.new("RGB", (turntable[0].width * 2, turntable[0].height * 2), "white")
    for k, frame in enumerate(turntable):
        tiles.paste(frame, ((k % 2) * frame.width, (k // 2) * frame.height))
    top = row([labelled(inputs, "input views as the model sees them (top) and its renders (bottom)"),
               labelled(heldout, "held-out view / render"), labelled(tiles, "turntable")])
    shot = Image.open(args.screenshot).convert("RGB")
    shot = shot.resize((top.width, round(shot.height * top.width / shot.width)), Image.LANCZOS)
    shot = labelled(shot, "mouserecon view mouse.ply --sample assets/demo_mouse")
    out = Image.new("RGB", (top.width, top.height + GAP + shot.height), "white")
    out.paste(top, (0, 0))
    out.paste(shot, (0, top.height + GAP))
    out.save(args.output, optimize=True)
    log.info("wrote %s (%dx%d)", args.output, out.width, out.height)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
