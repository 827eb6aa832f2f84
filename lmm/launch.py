"""The `lmm` command's entry point: pick the host memory allocator, then run `lmm.cli`.

The allocator must be chosen before the process loads torch (`lmm.utils.allocator.reexec`
starts the command again with jemalloc or tcmalloc preloaded); this module imports nothing
else first, so the re-exec costs milliseconds.
"""

from __future__ import annotations


def main() -> None:
    from lmm.utils import allocator, errors

    try:
        allocator.reexec()
    except errors.UserError as err:  # a bad LMM_ALLOCATOR: the message, exit code 2
        raise SystemExit(errors.report(err)) from None
    from lmm.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
