"""Procedural synthetic mice rendered from a randomised real-style rig (see generate.py)."""

from mouserecon.synth.generate import generate_dataset, generate_sample
from mouserecon.synth.mouse import MouseParams, build_mouse, sample_params
from mouserecon.synth.rig import RigConfig, sample_rig
from mouserecon.synth.trace import Light, TraceConfig, render_rgba

__all__ = ["generate_sample", "generate_dataset", "MouseParams", "build_mouse", "sample_params", "RigConfig",
           "sample_rig", "Light", "TraceConfig", "render_rgba"]
