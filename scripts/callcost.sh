#!/bin/sh
# What a wrapped data call costs, in each configuration of the library (scripts/callcost.c):
#   scripts/callcost.sh [LIBRARY] [CALLS]     (make callcost builds both and runs this)
# Pinned to one CPU (SF_CPU, default 0). "pinned" is a connection in overlay mode: a final
# phase, whose calls take the same fast path as a switched one; "counting" is one still on the
# overlay before its switch (the threshold is never reached: there is no router).
set -e
lib=${1:-preload/build/libshuntflow.so}
n=${2:-100000}
exe=${CALLCOST:-preload/build/callcost}
cpu=${SF_CPU:-0}
run() {
    name=$1
    shift
    printf '%-22s' "$name"
    env "$@" taskset -c "$cpu" "$exe" "$n"
}
run "no library" X=1
run "no library, 2 threads" SF_IDLE_THREAD=1
run "untracked fd" LD_PRELOAD="$lib"
run "pinned connection" LD_PRELOAD="$lib" SHUNTFLOW_MODE=overlay SHUNTFLOW_OVERLAY=127.0.0.0/8
run "counting connection" LD_PRELOAD="$lib" SHUNTFLOW_MODE=shuntflow \
    SHUNTFLOW_THRESHOLD=1000000000 SHUNTFLOW_ROUTER=/nonexistent/shuntflow.sock \
    SHUNTFLOW_OVERLAY=127.0.0.0/8
