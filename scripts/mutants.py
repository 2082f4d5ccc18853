#!/usr/bin/env python3
"""Mutation check: build the library and router with one deliberate bug at a time, run the suite,
and require every bug to turn it red (`make mutants`; docs/testing.md, "Mutation check").

A mutant is data: a name, what it breaks, and edits, each an exact anchor in one file and its
replacement. Code moved by a refactor makes an anchor miss: the run stops before building
anything, naming the mutant and the file, and `tests/unit/test_mutants.py` (part of `make test`)
fails the same way, so the table is re-anchored here rather than silently testing nothing.

Each mutant: a scratch copy of the tree under /tmp (tracked and untracked-but-not-ignored files,
so uncommitted work is included), the edits applied, `pip install` of that copy into a venv kept
for mutants only (/tmp/sf-mutants-venv; installing compiles the C library), and that venv's
pytest on the copy's tests, with -x: the first failure ends the run, so a caught mutant costs
little. "survived" means the whole suite passed. At the end the original tree is installed into
the same venv and every catching test is run on it again: a catch counts as confirmed only if
that test passes without the bug (so a flaky or already-red test does not pass for a catch).

    scripts/mutants.py                       # every mutant
    scripts/mutants.py --list                # names and what each breaks
    scripts/mutants.py byte-dropped -- -k torture   # one mutant, extra pytest args after --
    scripts/mutants.py --check               # only check that every anchor applies once

Exit status: 0 if every mutant was caught (and confirmed), 1 otherwise (survivor, unconfirmed
catch, build failure, missing anchor).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path("/tmp/sf-mutants-venv")
LOGS = Path("/tmp/sf-mutants-logs")

# The suite's files, cheapest catchers first: unit tests (no testbed), then the byte-integrity
# torture, transparency, fault injection and apps. Every other test file follows, sorted.
ORDER = (
    "tests/unit",
    "tests/integration/test_torture.py",
    "tests/integration/test_transparency.py",
    "tests/integration/test_fault_injection.py",
    "tests/integration/test_apps.py",
    "tests/integration/test_security.py",
    "tests/integration/test_router.py",
    "tests/integration/test_select.py",
    "tests/integration/test_faults.py",
)

ANCHOR_TESTS = "tests/unit/test_mutants.py"


@dataclass(frozen=True)
class Edit:
    path: str  # relative to the tree's root
    anchor: str  # must occur exactly once in the file
    replacement: str


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str
    edits: tuple[Edit, ...] = field(default_factory=tuple)


# What the fake switch reports is what a real one does (sf_swap_locked, note_switch_time): the
# SWITCH_DONE frame, the switches-done counter, phase HOST (so CONN_INFO says "host" and later
# bytes count as host bytes) and the same log line. Only the fd keeps naming the overlay socket.
_OVERLAY_KEPT = """\
        /* MUTANT overlay-kept: the host connection is closed unused, the overlay socket stays
         * on the fd, and the switch is reported as done. */
        (void)begin_handshake;
        real.close(fd);
        struct sf_msg done = {.magic = SF_MSG_MAGIC, .type = SF_SWITCH_DONE,
                              .arg = sf_now_us() - atomic_load(&c->decided_us),
                              .arg2 = (uint64_t)atomic_load(&c->initiated)};
        fill_tuple(&done, c);
        sf_agent_report(&done);
        sf_set_phase(c, SF_P_HOST);
        atomic_store(&sf_last_swap_ms, sf_now_ms());
        sf_agent_count_switch(1);
        SF_LOG("fd %d: switched to the host path (S=%llu, S_peer=%llu, in transition %d)", c->fd,
               (unsigned long long)atomic_load(&c->tx), (unsigned long long)c->peer_s,
               atomic_load(&sf_in_transition));
"""

# The first read on the host path after the swap returns the bytes right after the switch point.
# peer_s (S_peer) is not used once the fd is swapped: UINT64_MAX marks "already done".
_HOST_READ = """\
        if (phase == SF_P_HOST) {
            ssize_t n = op->call(op, c->fd);
"""

_BYTE_DROPPED = """\
        if (phase == SF_P_HOST) {
            ssize_t n = op->call(op, c->fd);
            /* MUTANT byte-dropped: the first byte after the switch point is lost. */
            if (n > 1 && !peek && op->buf != NULL && c->peer_s != UINT64_MAX) {
                c->peer_s = UINT64_MAX;
                memmove(op->buf, (char *)op->buf + 1, (size_t)n - 1);
                n--;
                op->bytes = n;
            }
"""

_BYTE_DUPLICATED = """\
        if (phase == SF_P_HOST) {
            /* MUTANT byte-duplicated: the first byte after the switch point is delivered twice. */
            int dup_first = !peek && op->buf != NULL && op->len > 1 && c->peer_s != UINT64_MAX;
            if (dup_first)
                op->len--;
            ssize_t n = op->call(op, c->fd);
            if (dup_first) {
                op->len++;
                if (n > 0) {
                    c->peer_s = UINT64_MAX;
                    memmove((char *)op->buf + 1, op->buf, (size_t)n);
                    n++;
                    op->bytes = n;
                }
            }
"""

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "overlay-kept",
        "report a switch but keep the overlay socket: the library closes the host connection "
        "it was given and reports the switch done (SWITCH_DONE, switches counter, path host, "
        "log line); the data stays on the overlay",
        (
            Edit(
                "preload/agent.c",
                "        begin_handshake(c, sf_private_fd(fd));\n",
                _OVERLAY_KEPT,
            ),
        ),
    ),
    Mutant(
        "byte-dropped",
        "drop one byte at the switch point: the first host-path read after the swap (read, "
        "recv, recvfrom) loses its first byte",
        (Edit("preload/wrap_io.c", _HOST_READ, _BYTE_DROPPED),),
    ),
    Mutant(
        "byte-duplicated",
        "duplicate one byte at the switch point: the first host-path read after the swap (read, "
        "recv, recvfrom) returns its first byte twice",
        (Edit("preload/wrap_io.c", _HOST_READ, _BYTE_DUPLICATED),),
    ),
    Mutant(
        "leader-inverted-library",
        "invert the leader rule in the library: the end with the higher overlay (ip, port) "
        "leads the handoff (waits for READY, commits first)",
        (Edit("preload/agent.c", "    c->leader = cmp < 0;\n", "    c->leader = cmp > 0;\n"),),
    ),
    Mutant(
        "leader-inverted-router",
        "invert the leader rule in the router: a crossing offer is accepted from the follower, "
        "and the leader's request (not the follower's) waits for the other side's offer",
        (
            Edit(
                "src/shuntflow/router/daemon.py",
                "            and theirs.local_is_leader()\n",
                "            and not theirs.local_is_leader()\n",
            ),
            Edit(
                "src/shuntflow/router/daemon.py",
                "        if not t.local_is_leader() and await self._served_by_leader(e):\n",
                "        if t.local_is_leader() and await self._served_by_leader(e):\n",
            ),
        ),
    ),
    Mutant(
        "owner-check-skipped",
        "skip the ownership check: the router still looks the tuple up (the checks counter "
        "grows) but ignores the verdict, so any process gets a host connection for any tuple",
        (
            Edit(
                "src/shuntflow/router/daemon.py",
                "        if verdict.ok:\n            return None\n",
                "        if verdict.ok or True:\n            return None\n",
            ),
        ),
    ),
    Mutant(
        "epoll-registration-forgotten",
        "forget one epoll registration at the swap: the first recorded registration of the fd "
        "is removed with the overlay socket and not added for the host socket",
        (
            Edit(
                "preload/swap.c",
                "        real.epoll_ctl(r->epfd, EPOLL_CTL_ADD, fd, &ev);\n",
                "        if (i > 0) /* MUTANT: the first registration is not carried over */\n"
                "            real.epoll_ctl(r->epfd, EPOLL_CTL_ADD, fd, &ev);\n",
            ),
        ),
    ),
)


class AnchorError(Exception):
    pass


def _apply_edit(tree: Path, mutant: Mutant, index: int, edit: Edit) -> None:
    path = tree / edit.path
    where = f"mutant {mutant.name!r}, edit {index + 1} of {len(mutant.edits)}, file {edit.path}"
    try:
        text = path.read_text()
    except OSError as exc:
        raise AnchorError(
            f"{where}: cannot read the file ({exc}); re-anchor it in scripts/mutants.py"
        ) from None
    count = text.count(edit.anchor)
    if count != 1:
        first = edit.anchor.strip().splitlines()[0]
        raise AnchorError(
            f"{where}: anchor found {count} times, expected exactly once (first line: "
            f"{first!r}); the code moved: re-anchor this mutant in scripts/mutants.py"
        )
    path.write_text(text.replace(edit.anchor, edit.replacement, 1))


def apply(tree: Path, mutant: Mutant) -> None:
    """Apply every edit of `mutant` to the tree, or raise AnchorError naming the one that missed.

    Edits apply in order, each to the file as the previous ones left it."""
    for i, edit in enumerate(mutant.edits):
        _apply_edit(tree, mutant, i, edit)


def anchor_problems(tree: Path, mutants: Sequence[Mutant] = MUTANTS) -> list[str]:
    """Every anchor that does not apply exactly once to a copy of `tree`'s mutated files."""
    problems = []
    for m in mutants:
        with tempfile.TemporaryDirectory(prefix="sf-anchors-") as tmp:
            for rel in {e.path for e in m.edits}:
                src = tree / rel
                if src.is_file():
                    (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, Path(tmp) / rel)
            try:
                apply(Path(tmp), m)
            except AnchorError as exc:
                problems.append(str(exc))
    names = [m.name for m in mutants]
    problems += [f"mutant name {n!r} used twice" for n in set(names) if names.count(n) > 1]
    return problems


# ---- the runner ----------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    verdict: str  # caught, survived, build-failed, error
    first_failure: str = ""
    seconds: float = 0.0
    confirmed: bool | None = None  # the catching test passes on the original tree


def _log(msg: str) -> None:
    print(f"mutants: {msg}", flush=True)


def scratch_copy(dest: Path) -> None:
    """The tree as `git` sees it (tracked + untracked-not-ignored files), without builds."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in files:
        if not raw:
            continue
        rel = raw.decode()
        src = ROOT / rel
        if not src.is_file():  # deleted in the worktree, not yet in the index
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


def _run(
    cmd: Sequence[str], log: Path, cwd: Path | None = None, timeout: float | None = None
) -> int:
    """Run `cmd` in its own process group, output to `log`. On a timeout or an interruption the
    whole group ends (pytest's servers, clients and routers), not only its leader."""
    env = {k: v for k, v in os.environ.items() if k not in ("SHUNTFLOW_LIBRARY", "VIRTUAL_ENV")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            out.write(f"\nmutants: timed out after {timeout} s\n")
            _end_group(proc)
            return -1
        except BaseException:
            _end_group(proc)
            raise


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT first, so pytest tears its testbeds down; SIGKILL if it does not end in 60 s."""
    for sig, wait in ((signal.SIGINT, 60.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def ensure_venv(log: Path) -> None:
    """The mutants' own venv, made once: never the checkout's .venv, which a mutant would break."""
    if (VENV / "bin" / "pytest").exists():
        return
    _log(f"creating {VENV} (once)")
    with tempfile.TemporaryDirectory(prefix="sf-mutant-orig-") as tmp:
        scratch_copy(Path(tmp))
        if (
            _run(["/usr/bin/python3", "-m", "venv", str(VENV)], log) != 0
            or _run([str(VENV / "bin" / "pip"), "install", "-q", f"{tmp}[dev]"], log) != 0
        ):
            shutil.rmtree(VENV, ignore_errors=True)
            raise SystemExit(f"mutants: cannot create {VENV}; see {log}")


def install(tree: Path, log: Path) -> bool:
    """Install `tree` into the venv (compiling the library) and check that what got installed is
    that tree: the library's bytes, and every Python file of the package."""
    pip = [str(VENV / "bin" / "pip"), "install", "-q", "--no-deps", "--force-reinstall"]
    if _run([*pip, str(tree)], log) != 0:
        return False
    site = subprocess.run(
        [
            str(VENV / "bin" / "python"),
            "-c",
            "import shuntflow, pathlib; print(pathlib.Path(shuntflow.__file__).parent)",
        ],
        capture_output=True,
        text=True,
    )
    if site.returncode != 0:
        with log.open("a") as out:
            out.write(site.stderr)
        return False
    pkg = Path(site.stdout.strip())

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    built = tree / "preload" / "build" / "libshuntflow.so"
    pairs = [(built, pkg / "_native" / "libshuntflow.so")]
    pairs += [
        (p, pkg / p.relative_to(tree / "src" / "shuntflow"))
        for p in (tree / "src" / "shuntflow").rglob("*.py")
    ]
    wrong = [str(b) for a, b in pairs if not b.is_file() or digest(a) != digest(b)]
    if wrong:
        with log.open("a") as out:
            out.write(f"mutants: installed files differ from the tree: {wrong[:5]}\n")
        return False
    return True


def test_files(tree: Path, mutant: Mutant | None = None) -> list[str]:
    """ORDER first, then every other test file of the tree, sorted. The unit tests never load
    the library, so for a mutant of the library alone they go last: they cannot catch it first,
    but a survivor must still pass them."""
    ordered = [p for p in ORDER if (tree / p).exists()]
    covered = [tree / p for p in ordered]
    rest = sorted(
        str(p.relative_to(tree))
        for p in (tree / "tests").rglob("test_*.py")
        if not any(p == c or c in p.parents for c in covered)
    )
    files = ordered + rest
    if mutant is not None and all(e.path.startswith("preload/") for e in mutant.edits):
        files = [f for f in files if f != "tests/unit"] + ["tests/unit"]
    return files


FAIL_LINE = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


def run_suite(
    tree: Path,
    log: Path,
    targets: Sequence[str],
    extra: Sequence[str],
    stop_first: bool,
    timeout: float,
) -> tuple[int, list[str]]:
    cmd = [str(VENV / "bin" / "pytest"), "-q", "-p", "no:cacheprovider", "-rfE"]
    # The anchor checks read the tree they run in: on a mutated copy they fail by construction.
    cmd.append(f"--deselect={ANCHOR_TESTS}")
    if stop_first:
        cmd.append("-x")
    start = log.stat().st_size if log.exists() else 0
    rc = _run([*cmd, *targets, *extra], log, cwd=tree, timeout=timeout)
    with log.open() as f:
        f.seek(start)
        failures = FAIL_LINE.findall(f.read())
    return rc, failures


def check_compiles(tree: Path, mutant: Mutant, log: Path) -> bool:
    """A Python mutant that does not even compile would 'fail' every test for the wrong reason."""
    for path in {e.path for e in mutant.edits if e.path.endswith(".py")}:
        try:
            compile((tree / path).read_text(), path, "exec")
        except SyntaxError as exc:
            with log.open("a") as out:
                out.write(f"mutants: {path} does not compile: {exc}\n")
            return False
    return True


def run_mutant(
    m: Mutant, extra: Sequence[str], targets: Sequence[str] | None, keep: bool, timeout: float
) -> Result:
    log = LOGS / f"{m.name}.log"
    log.write_text(f"mutant {m.name}: {m.bug}\n")
    t0 = time.monotonic()
    tree = Path(tempfile.mkdtemp(prefix=f"sf-mutant-{m.name}-"))
    try:
        scratch_copy(tree)
        apply(tree, m)
        with log.open("a") as out:
            for rel in dict.fromkeys(e.path for e in m.edits):
                diff = subprocess.run(
                    ["diff", "-u", str(ROOT / rel), str(tree / rel)], capture_output=True, text=True
                )
                out.write(diff.stdout)
        if not check_compiles(tree, m, log) or not install(tree, log):
            return Result(m.name, "build-failed", seconds=time.monotonic() - t0)
        rc, failures = run_suite(tree, log, targets or test_files(tree, m), extra, True, timeout)
        took = time.monotonic() - t0
        if rc == 0:
            return Result(m.name, "survived", seconds=took)
        if rc == 1 and failures:
            return Result(m.name, "caught", failures[0], took)
        if rc == -1:
            return Result(m.name, "caught", f"(suite timed out after {timeout:.0f} s)", took)
        return Result(m.name, "error", f"pytest exit {rc}", took)
    finally:
        if keep:
            _log(f"{m.name}: scratch tree kept at {tree}")
        else:
            shutil.rmtree(tree, ignore_errors=True)


def confirm(results: list[Result], timeout: float) -> None:
    """Install the original tree and run each catching test on it: it must pass there."""
    caught = [r for r in results if r.verdict == "caught" and "::" in r.first_failure]
    log = LOGS / "original.log"
    log.write_text("the original tree, for the catching tests\n")
    tree = Path(tempfile.mkdtemp(prefix="sf-mutant-original-"))
    try:
        scratch_copy(tree)
        if not install(tree, log):
            _log(f"the original tree does not install; see {log}")
            return
        if not caught:
            return
        nodes = sorted({r.first_failure for r in caught})
        _log(f"confirming {len(nodes)} catching test(s) on the original tree")
        _rc, failures = run_suite(tree, log, nodes, (), False, timeout)
        for r in caught:
            r.confirmed = r.first_failure not in failures
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def table(results: Sequence[Result]) -> str:
    """A Markdown table: mutant, verdict, first failing test, whether that test passes without
    the bug, time."""
    confirmed = {True: "yes", False: "NO: fails without the bug too", None: "-"}
    rows = [("mutant", "verdict", "first failing test", "passes without the bug", "time")]
    rows += [
        (
            r.name,
            r.verdict,
            f"`{r.first_failure}`" if r.first_failure else "-",
            confirmed[r.confirmed],
            f"{r.seconds:.0f} s",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--check", action="store_true", help="only check the anchors")
    ap.add_argument("--tests", nargs="+", help="test paths or node ids instead of the suite")
    ap.add_argument("--keep", action="store_true", help="keep the scratch trees")
    ap.add_argument(
        "--no-confirm",
        action="store_true",
        help="skip re-running the catching tests on the original tree",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=3600,
        help="seconds one mutant's suite may take (default 3600)",
    )
    args = ap.parse_args(argv)

    if args.list:
        for m in MUTANTS:
            print(f"{m.name}\n    {m.bug}")
        return 0
    problems = anchor_problems(ROOT)
    if problems:
        for p in problems:
            print(f"mutants: {p}", file=sys.stderr)
        return 1
    if args.check:
        _log(f"all {len(MUTANTS)} mutants apply")
        return 0
    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        print(f"mutants: unknown mutant(s) {unknown}; known: {sorted(by_name)}", file=sys.stderr)
        return 2
    chosen = [by_name[n] for n in args.names] or list(MUTANTS)

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    LOGS.mkdir(parents=True, exist_ok=True)
    with open(f"{VENV}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one mutants run per machine: they share the venv
        ensure_venv(LOGS / "venv.log")
        results = []
        for m in chosen:
            _log(f"{m.name}: {m.bug}")
            r = run_mutant(m, extra, args.tests, args.keep, args.timeout)
            _log(
                f"{m.name}: {r.verdict} in {r.seconds:.0f} s {r.first_failure} "
                f"(log {LOGS / (m.name + '.log')})"
            )
            results.append(r)
        if not args.no_confirm:
            confirm(results, args.timeout)
    print(table(results))
    (LOGS / "results.md").write_text(table(results) + "\n")
    bad = [r for r in results if r.verdict != "caught" or r.confirmed is False]
    if bad:
        _log(f"{len(bad)} of {len(results)} not caught: {', '.join(r.name for r in bad)}")
        return 1
    _log(f"all {len(results)} caught")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
