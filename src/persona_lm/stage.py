"""The common entry point of stage scripts: logging set up once, user errors as one line, exit 1."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Callable

from persona_lm.errors import PersonaError
from persona_lm.params import Params, load_params


def _terminate(signum, frame):
    """SIGTERM (kill, timeout, Slurm) unwinds as Ctrl-C does, so temp files are removed on the way out."""
    raise KeyboardInterrupt


def run(main: Callable[[Params], None], params_path: str = "params.yaml") -> None:
    """Load and validate params before any work, then call `main`; a PersonaError ends the stage cleanly."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("persona_lm").setLevel(logging.INFO)
    name = getattr(main, "__module__", "stage")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main(load_params(params_path))
    except PersonaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; it wrote no partial output", file=sys.stderr)
        sys.exit(130)
