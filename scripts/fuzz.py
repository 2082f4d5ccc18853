"""Runs the libFuzzer harnesses of switchpath/fuzz/ (`make fuzz`; a short run is part of the
unit tests, tests/unit/test_switchpath_fuzz.py).

Seeds come from the Python half of the wire format (shuntflow.wire): valid frames of every type,
and OFFER/ANSWER frames signed with the harnesses' fixed key, so the fuzzers start past the
length, magic and MAC checks that random bytes would take long to pass. Each run gets a fresh
corpus directory (new inputs go there, the repository stays clean) and stops at the first crash;
libFuzzer then writes the input to `crash-*` in the work directory and exits non-zero.

    python scripts/fuzz.py                      # every fuzzer, 1,000,000 inputs each
    python scripts/fuzz.py --runs 20000 fuzz_libframe
"""

from __future__ import annotations

import argparse
import hashlib
import re
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shuntflow.wire import Msg, MsgType, PeerMsg, Status, Tuple4, underlay_binding

ROOT = Path(__file__).resolve().parents[1]
FUZZ_DIR = ROOT / "switchpath" / "build" / "fuzz"
FUZZERS = ("fuzz_libframe", "fuzz_peerframe", "fuzz_peerframe_mac")
# fuzz/fuzz_common.h's key: the seeds must carry MACs the harnesses accept.
FUZZ_KEY = b"a fixed cluster key for the fuzzers, 32+ bytes"
# The structure-aware harness runs a script of 8-byte steps per input; longer inputs only
# repeat what shorter ones reach, at a hundredth of the speed.
MAX_LEN = {"fuzz_peerframe_mac": 512}


def seeds(name: str) -> list[bytes]:
    """Seed inputs for fuzzer `name`, in its input layout (see each harness's comment)."""
    t = Tuple4.parse("10.244.1.5:43210", "10.244.2.7:6379")
    binding = underlay_binding(("198.18.0.1", 40000), ("198.18.0.2", 7890))
    if name == "fuzz_libframe":
        out = [b"\0" + Msg(ty, Status.OK, 3, 42, t, 1, 2).pack() for ty in MsgType]
        return [*out, b"\1" + out[0], b"\0" + out[0][:47]]
    offer = PeerMsg(MsgType.OFFER, Status.OK, 7, t, 1_800_000_000_000, bytes(range(16)))
    signed = offer.signed(FUZZ_KEY, binding)
    if name == "fuzz_peerframe":
        answer = PeerMsg(MsgType.ANSWER, Status.OK, 7, t, offer.timestamp_ms, offer.nonce)
        skew = struct.pack("<h", 10)
        return [
            b"\0" + binding + skew + signed.pack(),
            b"\1" + binding + skew + answer.signed(FUZZ_KEY, binding).pack(),
        ]
    if name == "fuzz_peerframe_mac":
        head = bytes([50, 4]) + binding
        steps = [
            bytes([0, 1, 0, 5, 0, 0, 0, 7]),  # an OFFER, nonce 1
            bytes([0, 1, 0, 5, 0, 0, 0, 7]),  # its replay
            bytes([1, 2, 200, 9, 13, 4, 1, 9]),  # a skewed OFFER, one byte flipped
            bytes([2, 3, 0, 0, 40, 1, 3, 2]),  # an ANSWER, a byte flipped and signed again
            bytes([3, 0, 0, 9, 0, 0, 0, 0]),  # the clock moves on
        ]
        return [head + b"".join(steps), head + steps[0] * 6]
    raise ValueError(f"unknown fuzzer {name}")


@dataclass
class Result:
    name: str
    returncode: int
    stats: str  # libFuzzer's final "#N DONE cov: ... exec/s: ..." line, or its last line
    output: str


def run(name: str, runs: int, workdir: Path, seed: int = 0) -> Result:
    """One fuzzer for `runs` inputs from its seeds; workdir receives the corpus and crashes."""
    corpus = workdir / f"{name}-corpus"
    seed_dir = workdir / f"{name}-seeds"
    corpus.mkdir(parents=True, exist_ok=True)
    seed_dir.mkdir(parents=True, exist_ok=True)
    for data in seeds(name):
        (seed_dir / hashlib.sha1(data).hexdigest()).write_bytes(data)
    cmd = [str(FUZZ_DIR / name), f"-runs={runs}", f"-seed={seed}"]
    if name in MAX_LEN:
        cmd.append(f"-max_len={MAX_LEN[name]}")
    proc = subprocess.run(
        [*cmd, str(corpus), str(seed_dir)],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = proc.stderr.splitlines()
    done = [ln for ln in lines if re.match(r"#\d+\s+DONE", ln)]
    return Result(
        name, proc.returncode, done[-1] if done else (lines[-1] if lines else ""), proc.stderr
    )


def build() -> None:
    subprocess.run(["make", "-s", "-C", str(ROOT / "switchpath"), "fuzz"], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=1_000_000, help="inputs per fuzzer")
    ap.add_argument("--seed", type=int, default=0, help="libFuzzer's random seed (0: random)")
    ap.add_argument("fuzzers", nargs="*", default=list(FUZZERS))
    args = ap.parse_args()
    build()
    failed = 0
    for name in args.fuzzers:
        with tempfile.TemporaryDirectory(prefix=f"sf-{name}-") as tmp:
            res = run(name, args.runs, Path(tmp), args.seed)
            print(f"{name}: {res.stats}", flush=True)
            if res.returncode != 0:
                failed += 1
                kept = Path(tempfile.mkdtemp(prefix=f"sf-{name}-crash-"))
                for crash in Path(tmp).glob("crash-*"):
                    (kept / crash.name).write_bytes(crash.read_bytes())
                print(res.output[-4000:], file=sys.stderr)
                print(
                    f"{name}: FAILED (exit {res.returncode}); inputs kept in {kept}",
                    file=sys.stderr,
                )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
