"""What every entry point's ``main()`` does: parse the config (``--debug`` included), run, and turn failures into one
line on stderr and an exit code (2 bad input, 1 non-finite values, 130 interrupted) instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from .config import ConfigError, DebugConfig, fail, parse_config
from .train.step import NonFiniteError

RESUME_HINT = "interrupted: the latest published checkpoint is intact (resume with --train.resume auto)"


def run_cli(
    config_cls: type,
    run: Callable[[Any, DebugConfig], Any],
    argv: list[str] | None,
    *,
    prog: str,
    interrupted: str | None = RESUME_HINT,
) -> None:
    cfg, dbg = parse_config(config_cls, argv, prog=prog)
    try:
        run(cfg, dbg)
    except ConfigError as err:
        fail(str(err), code=2)
    except NonFiniteError as err:
        fail(str(err), code=1)
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        raise SystemExit(130) from None
