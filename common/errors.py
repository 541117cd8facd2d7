"""Errors a user can cause, and the wrapper that turns them into one clean line.

Design rule (docs/design.md, "User errors"): a missing path, a wrong layout, a
corrupt image or a bad checkpoint ends in one line naming the thing and what
to do, a non-zero exit and no traceback wall. Library code raises
`UserError`; entry points do `raise SystemExit(run_cli(main))`, so the
traceback is only hidden at the command line, never inside Python callers.
"""

import sys


class UserError(Exception):
    """An error the user caused and can fix (bad path, wrong layout, corrupt file...).

    The message is a single line: what is wrong, then what to do about it, e.g.
    ``data directory 'x/y' does not exist: pass --data <folder with one
    sub-folder per class> or run 'make data'``.
    """


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)`` and map its outcome to a process exit status.

    Returns main's return value (0 when it returns None); 2 after printing
    ``error: <message>`` on stderr for a `UserError`; 130 after printing
    ``interrupted`` for Ctrl-C. Any other exception propagates with its
    traceback, because that is a bug in this code, not the user's mistake.
    """
    try:
        status = main(argv)
    except UserError as error:
        print(f"error: {one_line_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if status is None else int(status)


def one_line_message(error: BaseException) -> str:
    """The user-facing line of ``error``, even after a DataLoader worker wrapped it.

    A `UserError` raised inside a DataLoader worker comes back re-created with
    the message "Caught UserError in DataLoader worker process N.\nOriginal
    Traceback ...\n<module>.UserError: <original message>"; the original
    message is the last line, after the exception's name.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) == 1:
        return lines[0]
    last_line = lines[-1]
    marker = f"{type(error).__name__}: "
    if marker in last_line:
        return last_line.split(marker, 1)[1]
    return " ".join(lines)
