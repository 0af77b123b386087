"""The one base class of every error a user can cause (bad input, options, files, environment).

Each module owns its own error (`SampleError` in `data`, `CheckpointError` in `checkpoints`, ...) and
derives it from `MouseReconError`, so the CLI catches one type and shows the message, which names the
file or option and the defect. Anything else that escapes is a bug and keeps its traceback.
"""


class MouseReconError(Exception):
    """Bad input, options or environment; the message names the file or option and the defect."""


class RecipeError(MouseReconError, ValueError):
    """A recipe (file, section or override) is malformed; the message names the file/key and the defect."""
