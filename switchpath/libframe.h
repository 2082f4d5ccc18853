/* libframe.h -- the router's reading of library frames (docs/wire.md section 1): one datagram,
 * one 48-byte struct sf_msg, a type a library may send, no passed fds. Pure, so the fuzzer can
 * drive it; the client that sent a frame this refuses is closed with the reason. */
#ifndef SF_LIBFRAME_H
#define SF_LIBFRAME_H

#include <stddef.h>
#include <stdint.h>

#include "peerframe.h" /* struct sf_tuple */

/* NULL and *out filled if `buf` (`len` bytes, arriving with `nfds` passed fds) is a frame a
 * library may send; else why not (a static string, as library_channel.py words it). */
const char *sfl_parse(const uint8_t *buf, size_t len, int nfds, struct sf_msg *out);

/* Both ports non-zero, both addresses specified, the two ends different (daemon._valid_tuple). */
int sfl_valid_tuple(const struct sf_tuple *t);

/* The tuple a frame carries, and a frame's tuple seen from the other end. */
struct sf_tuple sfl_tuple(const struct sf_msg *m);
struct sf_tuple sfl_mirrored(const struct sf_tuple *t);

#endif
