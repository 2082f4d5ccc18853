/* owner.h -- does a network namespace hold this TCP connection? One exact-tuple sock_diag
 * query on a NETLINK_SOCK_DIAG socket that was opened inside that namespace (the Python router
 * opens it, src/shuntflow/router/ownership.py, and hands the fd over). The rule is docs/wire.md's
 * "Ownership": ESTABLISHED, CLOSE_WAIT, FIN_WAIT1 or FIN_WAIT2, and still open in some process
 * (a non-zero inode). */
#ifndef SF_OWNER_H
#define SF_OWNER_H

#include <stddef.h>
#include <stdint.h>

#include "peerframe.h" /* struct sf_tuple */

/* 1: the namespace of `diag_fd` holds `t` (t->local_* is that namespace's end).
 * 0: it does not; `why` says why, worded as ownership.py's Verdict reasons.
 * `*seq` is the netlink sequence of this socket, advanced per query (late answers to an earlier
 * query are skipped by it). Waits at most `timeout_ms` for the kernel's answer; a timeout or an
 * error is 0 with the reason. */
int sfo_owns(int diag_fd, uint32_t *seq, const struct sf_tuple *t, int timeout_ms, char *why,
             size_t whylen);

/* 1: the namespace of `diag_fd` holds `t` established, in a listener's queue: not accepted by
 * any process yet. 0 otherwise, also on a timeout or an error. */
int sfo_unaccepted(int diag_fd, uint32_t *seq, const struct sf_tuple *t, int timeout_ms);

#endif
