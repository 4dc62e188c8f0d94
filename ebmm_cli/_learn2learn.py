"""learn2learn, imported on demand and quietly.

learn2learn is heavy (seconds to import) and its gym dependency prints a banner and
warnings at import; only the code paths that use it import it, through this function.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from types import ModuleType


def import_learn2learn() -> ModuleType:
    """Import learn2learn with its import-time noise kept off the user's terminal."""
    sink = io.StringIO()
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        warnings.simplefilter("ignore")
        import learn2learn
    return learn2learn
