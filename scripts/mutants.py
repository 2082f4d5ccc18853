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
pytest on the copy's tests, in a fixed order (cheap catchers first), stopping at the first
failure. The machine is shared and some checks are timing-bound, so a failure counts as the
catch only if the test fails again when rerun on the mutant and the original tree, installed in
a second venv (/tmp/sf-mutants-venv-original), never failed it the same way during the run (the
first `E` line, numbers aside; two tries there, stopping at a pass). Any other failure is noted
("flaky on the mutant", "red without the bug") and the suite goes on after that test.
"survived": the suite ran to its end with no failure that counts.

    scripts/mutants.py                       # every mutant
    scripts/mutants.py --list                # names and what each breaks
    scripts/mutants.py byte-dropped -- -k torture   # one mutant, extra pytest args after --
    scripts/mutants.py --check               # only check that every anchor applies once

Logs and a Markdown table of the results go to /tmp/sf-mutants-logs/. Exit status: 0 if every
mutant was caught, 1 otherwise (a survivor, a build failure, a missing anchor, a pytest error).
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
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path("/tmp/sf-mutants-venv")
ORIG_VENV = Path("/tmp/sf-mutants-venv-original")
LOGS = Path("/tmp/sf-mutants-logs")

# The suite's files, cheapest catchers first: unit tests (no testbed), the routers on loopback,
# then the byte-integrity torture, transparency, fault injection and apps. Every other test file
# follows, sorted.
ORDER = (
    "tests/unit",
    "tests/router",
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


# What the fake switch reports is what a real one does (sf_swap_locked,
# sf_router_report_switch_time): the SWITCH_DONE frame, the switches-done counter, phase HOST (so
# CONN_INFO says "host" and later bytes count as host bytes) and the same log line. Only the fd
# keeps naming the overlay socket.
_OVERLAY_KEPT = """\
        /* MUTANT overlay-kept: the host connection is closed unused, the overlay socket stays
         * on the fd, and the switch is reported as done. */
        real.close(fd);
        sf_router_report_switch_time(c);
        sf_set_phase(c, SF_P_HOST);
        atomic_store(&sf_last_swap_ms, sf_now_ms());
        sf_count_switch(1);
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
                "preload/router.c",
                "        sf_handoff_begin_locked(c, sf_private_fd(fd));\n",
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
        (Edit("preload/router.c", "    c->leader = cmp < 0;\n", "    c->leader = cmp > 0;\n"),),
    ),
    Mutant(
        "leader-inverted-router",
        "invert the leader rule in the router: a crossing offer is accepted from the follower, "
        "and the lower end's request (not the higher end's) waits for the other side's offer",
        (
            Edit(
                "switchpath/switch.c",
                "        if (!o->answered && tuple_eq(&o->t, &t) && "
                "tuple_local_leads(&theirs)) {\n",
                "        if (!o->answered && tuple_eq(&o->t, &t) && "
                "!tuple_local_leads(&theirs)) {\n",
            ),
            Edit(
                "switchpath/switch.c",
                "    if (!tuple_local_leads(&o->t) && grace > 0 && "
                "!recently_refused(s, &o->key)) {\n",
                "    if (tuple_local_leads(&o->t) && grace > 0 && "
                "!recently_refused(s, &o->key)) {\n",
            ),
        ),
    ),
    Mutant(
        "owner-check-skipped",
        "skip the ownership check: the router still looks the tuple up (the checks counter "
        "grows) but ignores the verdict, so any process gets a host connection for any tuple",
        (
            Edit(
                "switchpath/switch.c",
                "    if (!client_ns_holds(s, c, t, why, sizeof(why))) {\n",
                "    client_ns_holds(s, c, t, why, sizeof(why));\n"
                "    return NULL; /* MUTANT: neither the verdict nor the address */\n"
                "    if (0) {\n",
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
    Mutant(
        "parked-writer-waited-for",
        "the agent never commits for a writer that waits for room on the overlay: the commit "
        "waits until that writer runs again",
        (
            Edit(
                "preload/handoff.c",
                "    if (!have_wmu && !__atomic_load_n(&c->writer_parked, __ATOMIC_SEQ_CST))\n",
                "    if (!have_wmu) /* MUTANT: a parked writer is left to commit itself */\n",
            ),
        ),
    ),
    Mutant(
        "refused-claim-forgotten",
        "the library forgets the claims it said NOT_MINE to: a connection claimed before its "
        "accept waits for the router's next ask",
        (
            Edit(
                "preload/router.c",
                "    atomic_store(&sf_refused_live_until, until);\n",
                "    /* MUTANT: never marked live, so no accept looks */\n",
            ),
        ),
    ),
    Mutant(
        "zerocopy-switched",
        "a connection whose socket has SO_ZEROCOPY on is switched like any other: completions "
        "of the overlay socket's MSG_ZEROCOPY sends are lost at the swap",
        (
            Edit(
                "preload/router.c",
                "    return sf_uses_io_uring() || sf_zerocopy_on(c);\n",
                "    return ((void)c, sf_uses_io_uring()); /* MUTANT: no SO_ZEROCOPY look */\n",
            ),
        ),
    ),
    Mutant(
        "notsent-lowat-raw",
        "a TCP_NOTSENT_LOWAT nobody set is copied as the 0 it reads back: the host connection "
        "takes its own namespace's sysctl instead of the overlay namespace's",
        (
            Edit(
                "preload/swap.c",
                "        if (lowat == 0) {\n",
                "        if (0) { /* MUTANT: 0 copied as it reads back */\n",
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
    caught_by: str = ""  # the test that failed on the mutant (twice) and passes on the original
    why: str = ""  # that failure's first `E` line
    seconds: float = 0.0
    # Failures not counted as a catch: (test, "flaky on the mutant" or "red without the bug").
    discounted: list[tuple[str, str]] = field(default_factory=list)


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


def ensure_venv(venv: Path, log: Path) -> None:
    """A venv of the mutant runs, made once: never the checkout's .venv, which a mutant would
    break. One holds the mutant under test, one the original tree (its verdicts)."""
    if (venv / "bin" / "pytest").exists():
        return
    _log(f"creating {venv} (once)")
    with tempfile.TemporaryDirectory(prefix="sf-mutant-venv-") as tmp:
        scratch_copy(Path(tmp))
        if (
            _run(["/usr/bin/python3", "-m", "venv", str(venv)], log) != 0
            or _run([str(venv / "bin" / "pip"), "install", "-q", f"{tmp}[dev]"], log) != 0
        ):
            shutil.rmtree(venv, ignore_errors=True)
            raise SystemExit(f"mutants: cannot create {venv}; see {log}")


def install(venv: Path, tree: Path, log: Path) -> bool:
    """Install `tree` into `venv` (compiling the library) and check that what got installed is
    that tree: the library's bytes, and every Python file of the package."""
    # The tree's dependencies first (a merge may have added one; the venv was made once), then
    # the tree itself, rebuilt even though its version did not change.
    with (tree / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    deps = [*project.get("dependencies", []), *project.get("optional-dependencies", {})["dev"]]
    if _run([str(venv / "bin" / "pip"), "install", "-q", *deps], log) != 0:
        return False
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--force-reinstall"]
    if _run([*pip, str(tree)], log) != 0:
        return False
    site = subprocess.run(
        [
            str(venv / "bin" / "python"),
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
    """ORDER first, then every other test file of the tree, sorted. The unit and router tests
    never load the library, so for a mutant of the library alone they go last: they cannot catch
    it first, but a survivor must still pass them."""
    ordered = [p for p in ORDER if (tree / p).exists()]
    covered = [tree / p for p in ordered]
    rest = sorted(
        str(p.relative_to(tree))
        for p in (tree / "tests").rglob("test_*.py")
        if not any(p == c or c in p.parents for c in covered)
    )
    files = ordered + rest
    if mutant is not None and all(e.path.startswith("preload/") for e in mutant.edits):
        library_free = ["tests/unit", "tests/router"]
        files = [f for f in files if f not in library_free] + library_free
    return files


FAIL_LINE = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)
# The first line pytest marks `E` in a failure, not its progress line ("E      [100%]").
E_LINE = re.compile(r"^E(?! +\[ *\d+%\]$) +(.+)$", re.M)


@dataclass
class Run:
    rc: int
    failures: list[str]
    why: str


def run_pytest(
    venv: Path, tree: Path, log: Path, args: Sequence[str], timeout: float, first: bool = False
) -> Run:
    """pytest of `venv` on `tree`'s tests; `first`: stop at the first failure (-x)."""
    cmd = [str(venv / "bin" / "pytest"), "-q", "-rfE", "-p", "no:cacheprovider"]
    # The anchor checks read the tree they run in: on a mutated copy they fail by construction.
    cmd.append(f"--deselect={ANCHOR_TESTS}")
    if first:
        cmd.append("-x")
    start = log.stat().st_size if log.exists() else 0
    rc = _run([*cmd, *args], log, cwd=tree, timeout=timeout)
    with log.open() as f:
        f.seek(start)
        out = f.read()
    why = E_LINE.search(out)
    return Run(rc, FAIL_LINE.findall(out), why.group(1).strip()[:160] if why else "")


def collect(venv: Path, tree: Path, log: Path, args: Sequence[str]) -> list[str]:
    """The node ids `args` select, in the order pytest runs them."""
    cmd = [str(venv / "bin" / "pytest"), "-q", "--collect-only", "-p", "no:cacheprovider"]
    cmd.append(f"--deselect={ANCHOR_TESTS}")
    out = tree / ".mutants-collect.txt"
    with out.open("w") as f:
        rc = subprocess.run([*cmd, *args], cwd=tree, stdout=f, stderr=subprocess.STDOUT).returncode
    text = out.read_text()
    with log.open("a") as f:
        f.write(f"\n$ {' '.join([*cmd, *args])}\n{text[-3000:]}")
    return [line for line in text.splitlines() if "::" in line] if rc == 0 else []


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


@dataclass
class Setup:
    original: Path  # the original tree, installed in ORIG_VENV
    extra: Sequence[str]
    targets: Sequence[str] | None
    keep: bool
    timeout: float
    original_tries: int
    # Per test, how it has failed on the original tree during this run (signature()).
    seen_without_bug: dict[str, set[str]] = field(default_factory=dict)


def signature(why: str) -> str:
    """What kind of failure a first `E` line is: its numbers and all but its start dropped, so
    "4 of 21 stayed on the overlay" and "21 of 21 stayed on the overlay" are the same failure."""
    return re.sub(r"\d+", "N", why)[:50]


def passes_without_the_bug(setup: Setup, test: str, why: str, log: Path) -> bool:
    """Whether the original tree does not fail `test` the way the mutant did (`why`): it passes
    in one of `original_tries` runs, or fails otherwise (a load-bound timing check that a slow
    machine misses, say, where the mutant broke the bytes). A failure the original has shown
    during this run is no catch, even when the original happens to pass this time."""
    seen = setup.seen_without_bug.setdefault(test, set())
    for _ in range(setup.original_tries):
        run = run_pytest(ORIG_VENV, setup.original, log, [test, *setup.extra], setup.timeout)
        if run.rc == 0:
            break
        seen.add(signature(run.why))
    return signature(why) not in seen


def run_mutant(m: Mutant, setup: Setup) -> Result:
    """The suite on the mutant, stopping at the first failure. That failure is the catch if the
    test fails again when rerun on the mutant and passes on the original tree; otherwise it is
    noted and the suite goes on after it, so a flaky test neither catches nor hides a mutant."""
    log = LOGS / f"{m.name}.log"
    log.write_text(f"mutant {m.name}: {m.bug}\n")
    t0 = time.monotonic()
    res = Result(m.name, "error")
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
        if not check_compiles(tree, m, log) or not install(VENV, tree, log):
            res.verdict = "build-failed"
            return res
        nodes = collect(VENV, tree, log, [*(setup.targets or test_files(tree, m)), *setup.extra])
        if not nodes:
            res.why = f"no tests collected; see {log}"
            return res
        # Run from `start` on, stopping at the first failure; a failure that does not count
        # as a catch moves `start` past that test.
        start = 0
        while start < len(nodes):
            run = run_pytest(VENV, tree, log, [*nodes[start:], *setup.extra], setup.timeout, True)
            if run.rc == 0:
                break
            if run.rc == -1:
                res.verdict, res.why = "caught", f"suite timed out after {setup.timeout:.0f} s"
                return res
            if run.rc != 1 or not run.failures or run.failures[0] not in nodes[start:]:
                res.why = f"pytest exit {run.rc}; see {log}"
                return res
            test = run.failures[0]
            _log(f"{m.name}: {test} failed ({run.why}); rerunning it on the mutant")
            again = run_pytest(VENV, tree, log, [test, *setup.extra], setup.timeout)
            if again.rc == 0:
                res.discounted.append((test, "flaky on the mutant"))
            elif not passes_without_the_bug(setup, test, run.why, LOGS / "original.log"):
                res.discounted.append((test, "red without the bug"))
            else:
                res.verdict, res.caught_by, res.why = "caught", test, run.why
                return res
            _log(f"{m.name}: {test} not counted ({res.discounted[-1][1]}); the suite goes on")
            start = nodes.index(test, start) + 1
        res.verdict = "survived"
        return res
    finally:
        res.seconds = time.monotonic() - t0
        if setup.keep:
            _log(f"{m.name}: scratch tree kept at {tree}")
        else:
            shutil.rmtree(tree, ignore_errors=True)


def table(results: Sequence[Result]) -> str:
    """A Markdown table: mutant, verdict, the catching test and its failure, time, and the
    failures that were not counted as a catch."""
    rows = [("mutant", "verdict", "caught by", "its failure", "time", "not counted")]
    rows += [
        (
            r.name,
            r.verdict,
            f"`{r.caught_by}`" if r.caught_by else "-",
            r.why.replace("|", "\\|") or "-",
            f"{r.seconds:.0f} s",
            "; ".join(f"`{t}` ({why})" for t, why in r.discounted) or "-",
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
        "--original-tries",
        type=int,
        default=2,
        help="runs a catching test gets on the original tree to pass once (default 2)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=3600,
        help="seconds one pytest run may take (default 3600)",
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
    original = Path(tempfile.mkdtemp(prefix="sf-mutant-original-"))
    results = []
    try:
        with open(f"{VENV}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one mutants run per machine: they share the venvs
            for venv in (VENV, ORIG_VENV):
                ensure_venv(venv, LOGS / "venv.log")
            scratch_copy(original)
            (LOGS / "original.log").write_text("the original tree, for the catching tests\n")
            if not install(ORIG_VENV, original, LOGS / "original.log"):
                raise SystemExit(f"mutants: the original tree does not install; see {LOGS}")
            setup = Setup(original, extra, args.tests, args.keep, args.timeout, args.original_tries)
            for m in chosen:
                _log(f"{m.name}: {m.bug}")
                r = run_mutant(m, setup)
                _log(
                    f"{m.name}: {r.verdict} in {r.seconds:.0f} s {r.caught_by} {r.why} "
                    f"(log {LOGS / (m.name + '.log')})"
                )
                results.append(r)
    finally:
        shutil.rmtree(original, ignore_errors=True)
    print(table(results))
    (LOGS / "results.md").write_text(table(results) + "\n")
    bad = [r for r in results if r.verdict != "caught"]
    if bad:
        _log(f"{len(bad)} of {len(results)} not caught: {', '.join(r.name for r in bad)}")
        return 1
    _log(f"all {len(results)} caught")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
