"""Result lines of the tests/gpu/ scripts, which tests/gpu/check.sh counts:

    [PASS] name: what was measured, against its threshold
    [FAIL] name: what was measured, against its threshold (or the exception)
    [SKIP] name: not checked - why
    [TIME] a figure (no threshold; a figure with a goal is a check)

Each script ends with one line "<script>: P passed, F failed, S skipped" and exits 0 only if
some check passed and none failed: a script that checked nothing does not pass.
"""

from __future__ import annotations

import contextlib
import traceback


class Checks:
    def __init__(self, script: str):
        self.script = script
        self.passed: list[str] = []
        self.failed: list[str] = []
        self.skipped: list[str] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        (self.passed if ok else self.failed).append(name)
        return ok

    def skip(self, name: str, why: str) -> None:
        print(f"[SKIP] {name}: not checked - {why}", flush=True)
        self.skipped.append(name)

    @staticmethod
    def time(text: str) -> None:
        print(f"[TIME] {text}", flush=True)

    @contextlib.contextmanager
    def guard(self, name: str):
        """An exception inside (out of memory included) is a failed check named ``name``; the
        script goes on to its next check."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - reported as a failure, never swallowed
            traceback.print_exc()
            self.check(name, False, f"raised {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")

    def finish(self) -> int:
        print(f"{self.script}: {len(self.passed)} passed, {len(self.failed)} failed, {len(self.skipped)} skipped"
              + (f"; failed: {self.failed}" if self.failed else ""), flush=True)
        return 0 if self.passed and not self.failed else 1
