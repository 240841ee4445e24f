"""Semantic mutation check: does the test suite notice when a method is broken?

Each mutant is a comment on the line above the code it breaks, in the package itself, so a
refactor that moves the code moves its mutant with it:

    # mutant b-step-sign: `res.grad_b.detach()` -> `-res.grad_b.detach()` | behaviour:b_r_and_v
    # mutant b-step-dropped: drop | behaviour:b_r_and_v
    self.b_opt.step(self.b, whole, res.grad_b.detach())

`OLD` must occur exactly once in the first non-comment line below the marker (several markers
may stack above one line); `drop` replaces that line's statement by `pass`. The part after `|`
(on the marker's line, or on a `#   | ...` line right below it when the marker is long) names
the tests that should kill it, each as `FILE` (tests/test_FILE.py) or `FILE:K` (that file with
`-k K`), tried in order.

For each mutant the script copies the package and the tests into a temporary folder, applies
the one change, runs the named tests there with `-x`, and prints killed or survived, the test
that failed, and the time. Before any mutant it runs the same tests unmutated: a mutant only
counts as killed by tests that pass without it. Exit status 1 if a mutant survived.

    python tests/mutants.py              # every mutant (about 15 minutes on 2 cores)
    python tests/mutants.py --list       # the list, nothing run
    python tests/mutants.py b-step-sign  # only these

It runs on demand, not in CI.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^\s*# mutant ([\w.+-]+): (?:drop|`(.+?)` -> `(.*?)`)(?: \| (.+?))?\s*$")
TESTS_LINE = re.compile(r"^\s*#   \| (.+?)\s*$")  # the tests, when the marker is wrapped


@dataclass
class Mutant:
    name: str
    file: Path  # relative to ROOT
    line: int  # 1-based line the change applies to
    old: str
    new: str
    tests: list[str]  # "FILE" or "FILE:K"

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def find_mutants(root: Path = ROOT) -> list[Mutant]:
    """Every marker under lfm/, checked: unique names, OLD exactly once in its target line."""
    found: list[Mutant] = []
    for path in sorted((root / "lfm").rglob("*.py")):
        lines = path.read_text().splitlines()
        for i, text in enumerate(lines):
            m = MARKER.match(text)
            if not m:
                if "# mutant " in text:
                    raise SystemExit(f"{path}:{i + 1}: malformed mutant marker: {text.strip()}")
                continue
            j = i + 1
            while j < len(lines) and lines[j].lstrip().startswith("#"):
                j += 1
            if j == len(lines):
                raise SystemExit(f"{path}:{i + 1}: mutant {m[1]} has no code line below it")
            name, tests = m[1], m[4]
            if tests is None:
                cont = TESTS_LINE.match(lines[i + 1]) if i + 1 < len(lines) else None
                if not cont:
                    raise SystemExit(f"{path}:{i + 1}: mutant {name} names no tests")
                tests = cont[1]
            if m[2] is None:  # drop: the whole statement
                old, new = lines[j].strip(), "pass"
            else:
                old, new = m[2], m[3]
            if lines[j].count(old) != 1:
                raise SystemExit(
                    f"{path}:{j + 1}: mutant {name}: `{old}` occurs {lines[j].count(old)} times "
                    f"in the line below its marker (it must occur once): {lines[j].strip()}"
                )
            found.append(Mutant(name, path.relative_to(root), j + 1, old, new, tests.split()))
    names = [m.name for m in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SystemExit(f"mutant names used twice: {', '.join(dup)}")
    return found


def _pytest_args(selector: str) -> list[str]:
    file, _, k = selector.partition(":")
    args = [f"tests/test_{file}.py"]
    return args + (["-k", k] if k else [])


def run_tests(work: Path, selector: str, timeout: float) -> tuple[bool, str]:
    """(passed, first failing test or reason) of one selector in the copy at `work`."""
    env = {**os.environ, "PYTHONPATH": str(work), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf"]
    try:
        proc = subprocess.run(
            cmd + _pytest_args(selector),
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False, f"timeout after {timeout:.0f} s"
    if proc.returncode == 5:
        raise SystemExit(f"selector {selector!r} collected no test")
    if proc.returncode == 0:
        return True, ""
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    return False, failed[1] if failed else f"pytest exit {proc.returncode}"


def _copy_tree(work: Path) -> None:
    for part in ("lfm", "tests"):
        shutil.copytree(ROOT / part, work / part, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):  # README: its example and table are tested
        shutil.copy(ROOT / name, work / name)
    check = subprocess.run(
        [sys.executable, "-c", "import lfm; print(lfm.__file__)"],
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(work)},
        capture_output=True,
        text=True,
    )
    if not check.stdout.strip().startswith(str(work)):
        raise SystemExit(f"the copy's package is not the one imported: {check.stdout.strip()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="run only these mutants")
    ap.add_argument("--list", action="store_true", help="print the mutants and stop")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per test run")
    args = ap.parse_args(argv)
    mutants = find_mutants()
    if args.names:
        unknown = sorted(set(args.names) - {m.name for m in mutants})
        if unknown:
            raise SystemExit(f"unknown mutant(s): {', '.join(unknown)}")
        mutants = [m for m in mutants if m.name in args.names]
    if args.list:
        for m in mutants:
            print(f"{m.name:32s} {m.where():40s} `{m.old}` -> `{m.new}`  [{' '.join(m.tests)}]")
        return 0

    with tempfile.TemporaryDirectory(prefix="lfm-mutants-") as tmp:
        work = Path(tmp)
        _copy_tree(work)
        selectors = sorted({s for m in mutants for s in m.tests})
        print(f"{len(mutants)} mutants; checking {len(selectors)} test selections pass unmutated")
        for s in selectors:
            ok, why = run_tests(work, s, args.timeout)
            if not ok:
                raise SystemExit(f"{s} fails without any mutant ({why}): fix that first")
        rows = []
        for m in mutants:
            target = work / m.file
            original = target.read_text()
            lines = original.splitlines(keepends=True)
            lines[m.line - 1] = lines[m.line - 1].replace(m.old, m.new)
            target.write_text("".join(lines))
            t0 = time.time()
            killer = ""
            try:
                for s in m.tests:
                    ok, why = run_tests(work, s, args.timeout)
                    if not ok:
                        killer = why
                        break
            finally:
                target.write_text(original)
            rows.append((m, killer, time.time() - t0))
            status = "killed" if killer else "SURVIVED"
            print(f"{m.name:32s} {status:9s} {time.time() - t0:6.1f} s  {killer}", flush=True)

    print("\n| mutant | where | change | result | killed by | seconds |")
    print("|---|---|---|---|---|---|")
    for m, killer, secs in rows:
        change = f"`{m.old}` -> `{m.new}`".replace("|", "\\|")
        result = "killed" if killer else "**survived**"
        print(f"| {m.name} | {m.where()} | {change} | {result} | {killer} | {secs:.1f} |")
    survived = [m.name for m, killer, _ in rows if not killer]
    print(f"\n{len(rows) - len(survived)} of {len(rows)} killed" + (
        f"; survived: {', '.join(survived)}" if survived else ""
    ))  # fmt: skip
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
