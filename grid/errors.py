"""The one error the grid raises for what stops it outside the experiment file.

`GridError`: another driver holds the experiment, the Ray cluster at the address is gone, the MLflow store cannot
be reached or written, the working directory cannot be written. `slamgrid` prints it as one line and exits with
`EXIT_ENVIRONMENT`; what was finished stays finished and the same command resumes once the cause is gone.
"""

from __future__ import annotations

EXIT_ENVIRONMENT = 3
"""`slamgrid`'s exit code for a `GridError` (2 is a bad experiment file or argument, 1 a grid left unfinished)."""


class GridError(RuntimeError):
    """The grid cannot start or go on for a reason outside the experiment file; the message says what to do."""
