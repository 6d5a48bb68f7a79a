"""What the examples print after a recorded generation (shared by the example scripts)."""

import sys
from pathlib import Path


def report(images, outcome, run_id_file: Path | None) -> None:
    """Summary on stderr; the run id alone on stdout and in ``run_id_file``.

    When the call was not recorded as a run (spooled, disabled or failed),
    stdout stays empty and ``run_id_file`` is emptied, so no stale id survives.
    """
    import numpy as np

    run_id = outcome.wait() if outcome is not None else None  # the upload runs in the background
    print(f"images: shape {images.shape}, sum(|x|) = {np.abs(images).sum()!s}", file=sys.stderr)
    if run_id:
        print(f"recorded as run {run_id} in {outcome.tracking_uri}", file=sys.stderr)
        print(f"replay it with: repro-track replay {run_id}", file=sys.stderr)
        print(run_id)
    elif outcome is not None and outcome.spool_path is not None:
        print(f"MLflow was unreachable; the recording was spooled to {outcome.spool_path}", file=sys.stderr)
    else:
        reason = getattr(outcome, "error", None) or "recording is off, or failed (see any warning above)"
        print(f"this call was not recorded: {reason}", file=sys.stderr)
    if run_id_file is not None:
        run_id_file.write_text(f"{run_id}\n" if run_id else "", encoding="utf-8")
