"""Data that ships with the tool (demo samples, demo checkpoint, rig presets): read via importlib.resources."""
