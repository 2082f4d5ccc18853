/* fuzz_libframe.c -- libFuzzer harness for the library frames the router reads (libframe.c).
 *
 * Input: one byte for the number of passed fds (0-3), then the datagram. Beyond "no crash, no
 * sanitizer report" it checks what the router relies on: a frame is accepted exactly when an
 * independent statement of the rules here accepts it, an accepted frame is the input's bytes,
 * a refused one leaves the output alone with a non-empty reason, and the tuple helpers are
 * consistent (mirroring twice is the identity, validity does not depend on the direction). A
 * failed check aborts, which libFuzzer reports as a crash with its input. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "libframe.h"

#define CHECK(cond) \
    do {            \
        if (!(cond)) abort(); \
    } while (0)

static int library_may_send(uint16_t type) {
    switch (type) {
    case SF_HELLO:
    case SF_SWITCH_REQ:
    case SF_CLAIM_RES:
    case SF_CONN_INFO:
    case SF_STATS_END:
    case SF_SWITCH_DONE:
    case SF_SWITCH_CALLS:
        return 1;
    default:
        return 0;
    }
}

static int same_tuple(const struct sf_tuple *a, const struct sf_tuple *b) {
    return a->local_ip == b->local_ip && a->remote_ip == b->remote_ip &&
           a->local_port == b->local_port && a->remote_port == b->remote_port;
}

static void check_tuple(const struct sf_tuple *t) {
    struct sf_tuple m = sfl_mirrored(t), mm = sfl_mirrored(&m);
    CHECK(same_tuple(&mm, t));
    CHECK(m.local_ip == t->remote_ip && m.local_port == t->remote_port);
    int valid = sfl_valid_tuple(t);
    CHECK(valid == sfl_valid_tuple(&m));
    int want = t->local_ip && t->remote_ip && t->local_port && t->remote_port &&
               !(t->local_ip == t->remote_ip && t->local_port == t->remote_port);
    CHECK((valid != 0) == (want != 0));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct sf_msg out, untouched;

    if (size < 1) return 0;
    int nfds = data[0] & 3;
    const uint8_t *buf = data + 1;
    size_t len = size - 1;
    /* A copy of exactly `len` bytes, so ASan sees any read past the datagram. */
    uint8_t *copy = malloc(len ? len : 1);
    if (copy == NULL) return 0;
    memcpy(copy, buf, len);

    memset(&out, 0xA5, sizeof(out));
    untouched = out;
    const char *why = sfl_parse(copy, len, nfds, &out);
    int want_ok = nfds == 0 && len == sizeof(struct sf_msg);
    if (want_ok) {
        uint32_t magic;
        uint16_t type;
        memcpy(&magic, copy, 4);
        memcpy(&type, copy + 4, 2);
        want_ok = magic == SF_MSG_MAGIC && library_may_send(type);
    }
    CHECK((why == NULL) == want_ok);
    if (why != NULL) {
        CHECK(strlen(why) > 0);
        CHECK(memcmp(&out, &untouched, sizeof(out)) == 0);
    } else {
        CHECK(memcmp(&out, copy, sizeof(out)) == 0);
        struct sf_tuple t = sfl_tuple(&out);
        CHECK(t.local_ip == out.local_ip && t.remote_port == out.remote_port);
        check_tuple(&t);
    }
    /* The tuple helpers on any 12 bytes, accepted frame or not. */
    if (len >= sizeof(struct sf_tuple)) {
        struct sf_tuple t;
        memcpy(&t, copy, sizeof(t));
        check_tuple(&t);
    }
    free(copy);
    return 0;
}
