"""Mutation testing (mutmut 3) of the pack, package by package (tools/mutation_packages.py): how many mutants die.

Not part of the default test run: it runs the tests once per mutant (minutes to an hour a package on two cores).

    .venv/bin/python tools/mutation.py [--package sampling ...] [--max-children N] [--workdir DIR] [--keep]
                                       [--time-limit SECONDS] [--survivors] [--report]

For each package it builds a work folder (default: .mutation/<package>/ in the checkout, git-ignored) holding
`src/comfyui_krea/`, a copy of the working tree, so that the mutated copy under `mutants/src/comfyui_krea/` is
what `import comfyui_krea` finds (mutmut puts `mutants/src` first on sys.path, ahead of the editable install's
finder, which Python consults only after sys.path). The tests run from that copy too, so their paths
relative to the package (workflows/, ...) resolve inside it. The tracked sources are never touched.

Log and exception message arguments are not mutated (the work folder's mutmut configuration skips their lines):
mutants that only change what an error or log line says are counted as equivalent as a class. So are mutants
that only rewrite a tooltip's text (what the frontend shows on hover) or a command-line help text (what --help
prints; that every option has one is tested), told from each mutant's diff. The other
equivalent mutants are listed, with the reason, in tools/mutation_equivalent.md; the score "excl. equivalent"
leaves them out. Mutants listed there under a heading that says "second device" or "inside ComfyUI" are not
equivalent: they change device moves, which only a machine with a GPU can tell apart, or code that runs only
inside ComfyUI, whose host tests run the pack in processes of their own that mutmut's mutants do not reach.
They stay in that score and are left out only of the last column, "testable here". A listed mutant that no
longer survives, or no longer exists, is reported as stale.
"""
from __future__ import annotations

import argparse
import ast
import fnmatch
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from mutation_packages import PACKAGES  # the table of packages, beside this script

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_LIST = ROOT / "tools" / "mutation_equivalent.md"
DETECTED = {"killed", "timeout", "segfault", "caught by type check"}
IGNORE = shutil.ignore_patterns(".git", ".venv", ".mutation", "__pycache__", "*.egg-info", "models", "output",
                                ".pytest_cache", ".ruff_cache")
LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical"}


def split_entries(entries: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(source files, mutant-name globs restricting them, test files) of one package entry list."""
    files, globs, tests = [], [], []
    for entry in entries:
        if entry.startswith(("tests/", "!tests/")):
            tests.append(entry)
            continue
        path, _, functions = entry.partition("::")
        files.append(path)
        module = "comfyui_krea." + path[:-3].replace("/", ".")
        names = [f.strip() for f in functions.split(",") if f.strip()] or ["*"]
        for name in names:
            cls, _, meth = name.rpartition(".")
            key = f"xǁ{cls}ǁ{meth}" if cls else (f"x_{name}" if name != "*" else "x*")
            globs.append(f"{module}.{key}__mutmut_*")
    return files, globs, tests


def message_lines(source: str) -> list[str]:
    """Source lines of exception and log message arguments: `raise E(...)`, `log.x(...)`, `warnings.warn(...)`."""
    tree = ast.parse(source)
    lines = source.splitlines()
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            spans.append((node.exc.lineno, node.exc.end_lineno))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOG_METHODS:
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id in {"log", "logger", "logging", "warnings"}:
                spans.append((node.lineno, node.end_lineno))
    picked = {lines[i - 1] for start, end in spans for i in range(start, end + 1)}
    return sorted(line for line in picked if line.strip())


# Texts shown to a person and read by no program: a node input's tooltip, a command-line option's or command's
# help=, description= and metavar= (what --help prints).
UI_TEXT_KEYS = ("tooltip", "help", "description", "metavar")
UI_TEXT = re.compile(r'("tooltip":\s*|(?:tooltip|help|description|metavar)=f?)"(?:[^"\\]|\\.)*"')


@functools.cache
def ui_text_continuation_lines(path: Path) -> frozenset[str]:
    """The stripped lines of a source file that hold only the continuation of a tooltip's or help text (its second line
    on); read and parsed once per file, however many of its mutants are asked about."""
    if not path.exists():
        return frozenset()
    source = path.read_text()
    lines = source.splitlines()
    found = set()
    for node in ast.walk(ast.parse(source)):
        values = []
        if isinstance(node, ast.Dict):
            values = [v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "tooltip"]
        elif isinstance(node, ast.keyword) and node.arg in UI_TEXT_KEYS:
            values = [node.value]
        for value in values:
            found |= {lines[i - 1].strip() for i in range(value.lineno + 1, value.end_lineno + 1)}
    return frozenset(found)


def ui_text_only(key: str, diff: str) -> bool:
    """True when a mutant only rewrites the text of a tooltip (what the frontend shows on hover) or of a command's
    or option's help (what --help prints), not whether there is one."""
    removed = [line[1:] for line in diff.splitlines() if line.startswith("-")]
    added = [line[1:] for line in diff.splitlines() if line.startswith("+")]
    if not removed or len(removed) != len(added):
        return False
    path = ROOT / (key.split(".x", 1)[0].removeprefix("comfyui_krea.").replace(".", "/") + ".py")
    continuation = ui_text_continuation_lines(path)
    for old, new in zip(removed, added):
        if old.strip() in continuation and old.strip().startswith(('"', 'f"')):
            continue
        if UI_TEXT.search(old) is None or UI_TEXT.sub(r'\1""', old) != UI_TEXT.sub(r'\1""', new):
            return False
    return True


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _refresh_changed_files(pkg: Path) -> None:
    """Copy the checkout's changed sources into the work folder's copy (with their times, so that mutmut
    regenerates the mutants of those files; it keeps the results of the functions that did not change)."""
    for source in ROOT.rglob("*.py"):
        relative = source.relative_to(ROOT)
        if relative.parts[0] in {"tests", ".git", ".venv", ".mutation", "models", "output"}:
            continue
        copy = pkg / relative
        if not copy.exists() or copy.read_bytes() != source.read_bytes():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy)


def build_workdir(work: Path, files: list[str], tests: list[str], keep: bool) -> None:
    pkg = work / "src" / "comfyui_krea"
    if work.exists() and not keep:
        shutil.rmtree(work)
    if keep and pkg.exists():  # keep mutants/ (mutmut's results); refresh the sources that changed and the tests
        _refresh_changed_files(pkg)
        shutil.rmtree(pkg / "tests")
        shutil.copytree(ROOT / "tests", pkg / "tests", ignore=IGNORE)
        mutated_tests = work / "mutants" / "src" / "comfyui_krea" / "tests"
        if mutated_tests.exists():
            shutil.rmtree(mutated_tests)
            shutil.copytree(ROOT / "tests", mutated_tests, ignore=IGNORE)
    else:
        shutil.copytree(ROOT, pkg, ignore=IGNORE)
    patterns = []
    for f in files:
        patterns += ["^" + re.escape(line) + "$" for line in message_lines((ROOT / f).read_text())]
    tests = [t for t in tests if (ROOT / t.lstrip("!").partition("::")[0]).exists()]  # a test file not written yet
    selection = [f"src/comfyui_krea/{t}" for t in tests if not t.startswith("!")] or ["src/comfyui_krea/tests"]
    selection += [f"--deselect=src/comfyui_krea/{t[1:]}" for t in tests if t.startswith("!")]
    (work / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["src/comfyui_krea"]\n'
        f"only_mutate = {toml_list(['src/comfyui_krea/' + f for f in files])}\n"
        'do_not_mutate = ["src/comfyui_krea/tests/*"]\n'
        f"do_not_mutate_patterns = {toml_list(patterns)}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(selection)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:randomly"]\n'
        'process_isolation = "forkserver"\n'
        "use_git_change_detection = false\n"
        "use_setproctitle = false\n")


def read_equivalents() -> dict[str, str]:
    """mutant id -> "equivalent" or "elsewhere", from the table rows of tools/mutation_equivalent.md that start
    with a `mutant id` ("elsewhere": under a heading that says "second device" or "inside ComfyUI")."""
    found = {}
    kind = "equivalent"
    if EQUIVALENT_LIST.exists():
        for line in EQUIVALENT_LIST.read_text().splitlines():
            if line.startswith(("# ", "## ")):  # a section's kind holds for its ### module headings
                elsewhere = "second device" in line.lower() or "inside comfyui" in line.lower()
                kind = "elsewhere" if elsewhere else "equivalent"
            m = re.match(r"\|\s*`([^`]+__mutmut_\d+)`\s*\|(.*)\|", line)
            if m:
                found[m.group(1)] = kind
    return found


RESULTS_SCRIPT = """
import json, sys
from mutmut.configuration import config
from mutmut.utils.file_utils import walk_mutatable_files
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
out = {}
for path in walk_mutatable_files():
    m = SourceFileMutationData(path=path)
    m.load()
    for key, code in m.exit_code_by_key.items():
        status = status_by_exit_code[code]
        diff = ""
        if status not in ("killed", "timeout"):
            diff = "\\n".join(l for l in get_diff_for_mutant(key, path=path).splitlines()[2:]
                              if l[:1] in "+-" )
        out[key] = {"status": status, "diff": diff}
json.dump(out, sys.stdout)
"""


def run_package(label: str, entries: list[str], workroot: Path, max_children: int, keep: bool,
                time_limit: float | None, report_only: bool = False, survivors_only: bool = False) -> dict:
    files, globs, tests = split_entries(entries)
    work = workroot / re.sub(r"\W+", "_", label)
    build_workdir(work, files, tests, keep or report_only)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    shared_tokenizers = ROOT.parent / "shared" / "tokenizers"
    if "KREA_TOKENIZERS" not in env and shared_tokenizers.is_dir():
        env["KREA_TOKENIZERS"] = str(shared_tokenizers)
    start = time.monotonic()
    targets = globs
    previous = work / "results.json"
    if keep and previous.exists():  # retest only what survived last time (mutmut reruns every mutant named)
        targets = [k for k, m in json.loads(previous.read_text()).items() if m["status"] not in DETECTED
                   and not (survivors_only and m["status"] == "not checked")]
    if report_only:
        targets = []
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *targets]
    print(f"== {label}: {' '.join(cmd[1:4])} ... in {work}", flush=True)
    log = work / "mutmut-run.log"
    returncode = 0
    if targets:
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                returncode = proc.wait(timeout=time_limit)
            except subprocess.TimeoutExpired:  # stop mutmut and its workers; what was checked is kept
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                print(f"   stopped after --time-limit {time_limit:.0f}s; --keep continues", flush=True)
                returncode = 0
    elapsed = time.monotonic() - start
    if returncode != 0:
        print(f"   mutmut exited with {returncode}; see {log}", flush=True)
    res = subprocess.run([sys.executable, "-c", RESULTS_SCRIPT], cwd=work, env=env, capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        raise SystemExit(f"reading mutmut's results failed:\n{res.stderr[-3000:]}")
    mutants = {k: v for k, v in json.loads(res.stdout).items() if any(fnmatch.fnmatch(k, g) for g in globs)}
    (work / "results.json").write_text(json.dumps(mutants, indent=1))
    return {"label": label, "mutants": mutants, "seconds": elapsed}


def summarize(result: dict, equivalents: dict[str, str]) -> dict:
    mutants = result["mutants"]
    counts: dict[str, int] = {}
    for m in mutants.values():
        counts[m["status"]] = counts.get(m["status"], 0) + 1
    detected = sum(n for s, n in counts.items() if s in DETECTED)
    undetected = {k: m for k, m in mutants.items() if m["status"] not in DETECTED}
    listed = {k for k, m in undetected.items() if k in equivalents and m["status"] in ("survived", "no tests")}
    ui_text = {k for k, m in undetected.items() if m["status"] == "survived" and ui_text_only(k, m["diff"])}
    listed |= ui_text
    equivalent = [k for k in listed if equivalents.get(k, "equivalent") == "equivalent"]
    elsewhere = [k for k in listed if equivalents.get(k) == "elsewhere"]
    stale = [k for k in equivalents if k.startswith(tuple(_modules(result))) and k not in undetected]
    total = len(mutants)
    return {
        "total": total, "killed": counts.get("killed", 0), "survived": counts.get("survived", 0),
        "timeout": counts.get("timeout", 0), "no tests": counts.get("no tests", 0),
        "other": total - sum(counts.get(s, 0) for s in ("killed", "survived", "timeout", "no tests")),
        "equivalent": len(equivalent), "elsewhere": len(elsewhere), "ui_text": len(ui_text),
        "score": 100.0 * detected / total if total else float("nan"),
        "score_excl": 100.0 * detected / (total - len(equivalent)) if total > len(equivalent) else float("nan"),
        "score_here": (100.0 * detected / (total - len(equivalent) - len(elsewhere))
                       if total > len(equivalent) + len(elsewhere) else float("nan")),
        "not_checked": counts.get("not checked", 0),
        "score_checked": (100.0 * detected / (total - len(equivalent) - counts.get("not checked", 0))
                          if total - len(equivalent) - counts.get("not checked", 0) > 0 else float("nan")),
        "remaining": {k: m for k, m in undetected.items() if k not in listed},
        "stale": stale,
    }


def _modules(result: dict) -> set[str]:
    return {k.split(".x")[0] + "." for k in result["mutants"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", action="append", choices=list(PACKAGES),
                        help="package to mutate (repeatable; default: all)")
    parser.add_argument("--max-children", type=int, default=max(1, (os.cpu_count() or 2)))
    parser.add_argument("--workdir", type=Path, default=ROOT / ".mutation",
                        help="where the work folders go (default: .mutation/ in the checkout, git-ignored)")
    parser.add_argument("--keep", action="store_true",
                        help="reuse the work folder's earlier results: only the mutants not detected last time "
                             "are tested again, against fresh copies of the tests and of the sources that "
                             "changed; the mutants of changed functions show as not checked until the next "
                             "--keep run")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="stop each package's run after this many seconds (unchecked mutants count as "
                             "'other'; --keep resumes)")
    parser.add_argument("--survivors", action="store_true",
                        help="with --keep: retest only the mutants that survived last time (after adding tests), "
                             "not those a stopped run left unchecked")
    parser.add_argument("--report", action="store_true", help="only print the results of the earlier runs")
    args = parser.parse_args()
    equivalents = read_equivalents()
    rows = []
    for label in args.package or list(PACKAGES):
        if args.report and not (args.workdir / re.sub(r"\W+", "_", label) / "results.json").exists():
            continue
        result = run_package(label, PACKAGES[label], args.workdir, args.max_children, args.keep, args.time_limit,
                             args.report, args.survivors)
        rows.append((label, result["seconds"], summarize(result, equivalents)))

    print()
    print(f"{'package':<20}{'total':>7}{'killed':>8}{'surv.':>7}{'timeout':>8}{'no test':>8}{'other':>7}"
          f"{'equiv.':>7}{'elsewh.':>8}{'score':>8}{'excl.eq':>9}{'testable here':>14}{'time':>8}")
    for label, seconds, s in rows:
        print(f"{label:<20}{s['total']:>7}{s['killed']:>8}{s['survived']:>7}{s['timeout']:>8}{s['no tests']:>8}"
              f"{s['other']:>7}{s['equivalent']:>7}{s['elsewhere']:>8}{s['score']:>7.1f}%{s['score_excl']:>8.1f}%"
              f"{s['score_here']:>13.1f}%{seconds:>7.0f}s")
    for label, _, s in rows:
        if s["ui_text"]:
            print(f"{label}: {s['ui_text']} of the equivalent mutants only rewrite a tooltip's text (a class, as "
                  f"message texts)")
    for label, _, s in rows:
        if s["not_checked"]:
            print(f"{label}: {s['not_checked']} mutants not checked yet (run stopped; --keep continues); of the "
                  f"checked non-equivalent ones {s['score_checked']:.1f}% killed")
    for label, _, s in rows:
        if s["remaining"]:
            print(f"\n{label}: {len(s['remaining'])} undetected mutants not listed as equivalent")
            for key, m in sorted(s["remaining"].items()):
                if m["status"] == "not checked":
                    continue
                print(f"  {key} [{m['status']}]")
                for line in m["diff"].splitlines():
                    print(f"      {line.strip()[:150]}")
        if s["stale"]:
            print(f"\n{label}: listed as equivalent but detected or gone (stale entries): {', '.join(s['stale'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
