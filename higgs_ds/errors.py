"""One error policy for every entry point (`higgs-ds ...`, `higgs-ds train`, `swift sft --external_plugins`).

- `UserError`: the user's to fix (bad input, bad config, bad path, a hostile or corrupt file). Printed as one
  line `higgs-ds: error: <message>` and exit code 2. The message names the file (and member, key or line) and
  says what to do.
- `CheckFailed`: a check the user asked for ran and found a problem (`shards verify`, `check-export`, an
  accounting mismatch after a build). Printed as `higgs-ds: check failed: <message>`, exit code 1.
- Anything else is a bug in higgs-ds and keeps its traceback.

`exit_code_for` / `report` are what every entry point calls, so the codes are the same everywhere."""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USER_ERROR = 2

EXIT_CODES_HELP = (
    "exit codes: 0 success; 1 a check found a problem (shards verify, check-export, a failed build check); "
    "2 a user error (bad input, config, path, or a hostile/corrupt file), printed as one "
    "'higgs-ds: error: ...' line"
)


class UserError(ValueError):
    """Bad input, config or path: one line naming the file and saying what to do; exit 2."""


class CheckFailed(RuntimeError):
    """A requested check failed; exit 1."""


def report(err: BaseException) -> int:
    """Print `err` as the one line of the policy and return its exit code."""
    if isinstance(err, CheckFailed):
        print(f"higgs-ds: check failed: {err}", file=sys.stderr, flush=True)
        return EXIT_CHECK_FAILED
    print(f"higgs-ds: error: {err}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def exit_on_user_error(err: UserError | CheckFailed) -> SystemExit:
    """For code running inside another program's main (SWIFT's): print the line, then `raise` the result."""
    return SystemExit(report(err))
