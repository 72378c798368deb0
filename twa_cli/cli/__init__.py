"""The command line: the Typer app (`app`), its option groups, terminal rendering and config files.

Exit codes: 0 success, 1 a problem with the inputs (one line on stderr; --debug shows the traceback),
2 a usage error (unknown flag, bad value), 130 interrupted.
"""

import os
import sys

from twa_cli.cli.signals import Interrupted, ctrl_c_raises_interrupted
from twa_cli.errors import TwaError
from twa_cli.units import launched_by_torchrun


def main(argv: list[str] | None = None) -> None:
    """The `twa` entry point."""
    if not launched_by_torchrun():
        return _main(argv)
    # A rank of a torchrun job ends here, its results written and its process group left: the interpreter's own
    # teardown can then abort it in gloo's threads ("terminate called without an active exception", seen under
    # load), which turns a finished rank into a failed job. So it leaves without that teardown, with its code.
    try:
        _main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: list[str] | None) -> None:
    import typer

    from twa_cli.cli.app import app
    from twa_cli.cli.render import Output

    # click's UsageError, wherever this typer takes click from (newer ones carry their own copy).
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("TWA_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    with ctrl_c_raises_interrupted():
        try:
            code = app(args=argv, prog_name="twa", standalone_mode=False)
            if isinstance(code, int) and code:  # typer.Exit(n) and --help come back as a code here
                sys.exit(code)
        except usage_error as exc:
            if debug:
                raise
            from twa_cli.cli.config import options_file

            message = " ".join(exc.format_message().split())
            source = options_file(exc)
            if source is not None:  # a value a file gave: that file's error, as bad input
                Output().error(f"{source}: {message}")
                sys.exit(1)
            where = f" (see '{exc.ctx.command_path} -h')" if exc.ctx is not None else ""
            Output().error(f"{message}{where}")
            sys.exit(exc.exit_code)
        except typer.Abort:
            Output().error("interrupted")
            sys.exit(130)
        except TwaError as exc:
            if debug:
                raise
            Output().error(str(exc))
            sys.exit(1)
        except OSError as exc:  # the system refused a read or a write (permissions, a full disk)
            if debug:
                raise
            Output().error(f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc))
            sys.exit(1)
        except Interrupted:
            Output().error("interrupted")
            sys.exit(130)
