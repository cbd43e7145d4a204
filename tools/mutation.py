"""Mutation testing of the modules where a silent error corrupts results, one mutmut run each.

Each module is mutated in a scratch copy of the working tree under ``build/mutation/<name>``
with only the tests that exercise it selected, so a mutant costs seconds rather than a whole
suite run. Prints every module's kill rate and its surviving mutants; the last line is
``mutation: K killed of N (R %)``. Exits non-zero when the rate is under the floor.

    python tools/mutation.py              # every module
    python tools/mutation.py patches      # just one (names below)
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / "build" / "mutation"
FLOOR = 90.0
KILLED = {1, 3, 36, -24, 24, 152, 255}  # test failure, pytest internal error, timeout (mutmut's codes)


@dataclass(frozen=True)
class Target:
    name: str
    files: tuple[str, ...]
    tests: tuple[str, ...]  # pytest arguments selecting the tests that exercise the files
    # mutmut's mutant names to run, as globs (x_<function>__mutmut_N, xǁ<Class>ǁ<method>__mutmut_N):
    # the functions that compute results; empty means every function of the files
    functions: tuple[str, ...] = ()

    def selects(self, mutant: str) -> bool:
        return not self.functions or any(fnmatch.fnmatchcase(mutant, pattern) for pattern in self.functions)


TARGETS = (
    Target(
        "cam-methods",
        ("workers/cam/methods.py", "workers/cam/maps.py"),
        ("tests/test_cam_methods.py", "tests/test_cam_parity.py::test_fused_layers_match_reference"),
    ),
    Target("patches", ("workers/patches.py",), ("tests/test_patches.py",)),
    Target(
        "results",
        ("workers/results.py",),
        ("tests/test_results_pg.py",),
        (
            "workers.results.x*upsert*",
            "workers.results.x_sqlite*",
            "workers.results.x_delete_stale_patch_scores*",
            "workers.results.xǁ_Stagedǁmerge_sql*",
            "workers.results.xǁ_Stagedǁwrite*",
        ),
    ),
    Target(
        "web-auth",
        ("scheduler/web/auth.py",),
        (
            "tests/test_web_auth.py",
            "tests/test_web.py::test_loopback_needs_no_token",
            "tests/test_web.py::test_other_hosts_need_a_token",
            "tests/test_web.py::test_access_log_hides_the_token",
        ),
    ),
    Target(
        "drift",
        ("scheduler/analysis/drift.py",),
        (
            "tests/test_drift.py",
            "-k",
            "blob or movers or resample or pearson or area_iou or mass_shift or narrow or classes_come",
        ),
        tuple(
            f"scheduler.analysis.drift.{name}*"
            for name in (
                "x_pearson",
                "x_resample",
                "x_normalise",
                "x_centre_of_mass",
                "x_shift_px",
                "x_mass_shift",
                "xǁ_Groupǁadd_maps",
                "xǁ_Comparisonǁadd",
                "xǁ_Comparisonǁclasses",
            )
        ),
    ),
    Target("shard-rows", ("workers/shard_rows.py",), ("tests/test_shard_rows.py",)),
)


def tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line for line in out.splitlines() if line and (REPO / line).is_file()]


def mutmut_section(target: Target) -> str:
    def toml_list(values: tuple[str, ...] | list[str]) -> str:
        return "[" + ", ".join(json.dumps(v) for v in values) + "]"

    return (
        "\n[tool.mutmut]\n"
        f"source_paths = {toml_list(['workers', 'scheduler', 'schema'])}\n"
        f"only_mutate = {toml_list(target.files)}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(target.tests)}\n"
        f"pytest_add_cli_args = {toml_list(['-p', 'no:cacheprovider', '-q', '-x', '-o', 'addopts='])}\n"
        'process_isolation = "forkserver"\n'
        "use_git_change_detection = false\n"
    )


def prepare(target: Target) -> Path:
    """A fresh copy of the working tree with mutmut configured for this target."""
    work = SCRATCH / target.name
    if work.exists():
        shutil.rmtree(work)
    for name in tracked_files():
        dest = work / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest)
    pyproject = work / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + mutmut_section(target))
    return work


def outcomes(work: Path, target: Target) -> dict[str, int | None]:
    """Exit code of every mutant of the target's files, by mutant name."""
    found: dict[str, int | None] = {}
    for name in target.files:
        meta = work / "mutants" / (name + ".meta")
        if not meta.exists():
            raise SystemExit(f"mutmut wrote no results for {name} (looked for {meta})")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        found.update({name: code for name, code in codes.items() if target.selects(name)})
    return found


def run_target(target: Target, mutmut: str, children: int) -> tuple[int, int, list[str]]:
    work = prepare(target)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MUTANT_UNDER_TEST")}
    started = time.monotonic()
    proc = subprocess.run(
        [mutmut, "run", "--max-children", str(children), *target.functions],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"mutmut failed on {target.name} (exit {proc.returncode})")
    codes = outcomes(work, target)
    survivors = sorted(name for name, code in codes.items() if code not in KILLED)
    killed = len(codes) - len(survivors)
    rate = 100.0 * killed / len(codes) if codes else 100.0
    print(
        f"{target.name:<12} {killed:>4} killed of {len(codes):>4} ({rate:5.1f} %) in {elapsed:5.0f} s",
        flush=True,
    )
    for name in survivors:
        print(f"    survived: {name} (exit {codes[name]})")
    return killed, len(codes), survivors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("targets", nargs="*", choices=[t.name for t in TARGETS] + [[]], default=[])
    parser.add_argument("--mutmut", default=str(Path(sys.executable).with_name("mutmut")))
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    chosen = [t for t in TARGETS if not args.targets or t.name in args.targets]
    total_killed = total = 0
    for target in chosen:
        killed, count, _ = run_target(target, args.mutmut, args.children)
        total_killed += killed
        total += count
    rate = 100.0 * total_killed / total if total else 100.0
    print(f"mutation: {total_killed} killed of {total} ({rate:.1f} %)")
    if rate < FLOOR:
        sys.exit(1)


if __name__ == "__main__":
    main()
