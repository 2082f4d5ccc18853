/* libframe.c -- the router's checks on each datagram a library sends it (docs/wire.md section 1),
 * in C for the native switch path.
 *
 * The Python half is LibraryClient.on_readable and _dispatch in
 * src/shuntflow/router/library_channel.py with wire.Msg.unpack: passed fds first, then the size,
 * the magic, a known type, a type a library may send. A refused frame closes that one client
 * with the reason, so the words are the Python ones and tests/unit/test_switchpath_frames.py
 * sends the same datagrams to both and compares. Which frame may come when (HELLO first, only
 * one HELLO) is the channel's state, not this file's.
 *
 * Why reasons are static strings, with tables for the sizes and types: the caller may keep the
 * pointer past the next frame (a log line, a close reason) and nothing here allocates. The two
 * values a table cannot hold, a bad magic and an unknown type, keep the Python prefix ("bad
 * magic", "unknown frame type") without the number. */

#include <string.h>

#include "libframe.h"

#define SF_API __attribute__((visibility("default")))

_Static_assert(sizeof(struct sf_msg) == 48, "the sizes below say 48");

#define SHORT(n) "frame is " #n " bytes, expected 48"

/* What library_channel.py says of a datagram of 0..47 bytes (0: SEQPACKET delivers an empty
 * datagram as a 0-byte read; a hangup, also 0 bytes, is the caller's to tell apart first). */
static const char *const short_frame[48] = {
    "empty frame (0 bytes), expected 48",
    SHORT(1), SHORT(2), SHORT(3), SHORT(4), SHORT(5), SHORT(6), SHORT(7), SHORT(8), SHORT(9),
    SHORT(10), SHORT(11), SHORT(12), SHORT(13), SHORT(14), SHORT(15), SHORT(16), SHORT(17),
    SHORT(18), SHORT(19), SHORT(20), SHORT(21), SHORT(22), SHORT(23), SHORT(24), SHORT(25),
    SHORT(26), SHORT(27), SHORT(28), SHORT(29), SHORT(30), SHORT(31), SHORT(32), SHORT(33),
    SHORT(34), SHORT(35), SHORT(36), SHORT(37), SHORT(38), SHORT(39), SHORT(40), SHORT(41),
    SHORT(42), SHORT(43), SHORT(44), SHORT(45), SHORT(46), SHORT(47),
};

/* Per type: NULL if a library may send it, else why not. Router -> library types are known
 * to wire.py but refused by the channel's dispatch; the peer types are refused by
 * Msg.unpack already. */
static const char *const type_refusal[] = {
    [SF_HELLO] = NULL,
    [SF_HELLO_ACK] = "frame type HELLO_ACK may not come from a library",
    [SF_SWITCH_REQ] = NULL,
    [SF_SWITCH_RES] = "frame type SWITCH_RES may not come from a library",
    [SF_CLAIM_REQ] = "frame type CLAIM_REQ may not come from a library",
    [SF_CLAIM_RES] = NULL,
    [SF_STATS_REQ] = "frame type STATS_REQ may not come from a library",
    [SF_CONN_INFO] = NULL,
    [SF_STATS_END] = NULL,
    [SF_SWITCH_DONE] = NULL,
    [SF_SWITCH_CALLS] = NULL,
    [SF_OFFER] = "frame type OFFER not allowed here",
    [SF_ANSWER] = "frame type ANSWER not allowed here",
};

static int known_type(uint16_t type) {
    return (type >= SF_HELLO && type <= SF_SWITCH_CALLS) || type == SF_OFFER || type == SF_ANSWER;
}

SF_API const char *sfl_parse(const uint8_t *buf, size_t len, int nfds, struct sf_msg *out) {
    struct sf_msg m;

    /* Before the size: a frame that smuggles an fd is an offence whatever else it is. */
    if (nfds > 0) return "library passed file descriptors to the router";
    if (len < sizeof(m)) return short_frame[len];
    /* The Python reader asks for 49 bytes: exactly 49 arrive untruncated, more set MSG_TRUNC. */
    if (len == sizeof(m) + 1) return "frame is 49 bytes, expected 48";
    if (len > sizeof(m)) return "frame is more than 48 bytes, expected 48";
    memcpy(&m, buf, sizeof(m));
    if (m.magic != SF_MSG_MAGIC) return "bad magic";
    if (!known_type(m.type)) return "unknown frame type";
    if (type_refusal[m.type] != NULL) return type_refusal[m.type];
    *out = m;
    return NULL;
}

SF_API int sfl_valid_tuple(const struct sf_tuple *t) {
    return t->local_port != 0 && t->remote_port != 0 && t->local_ip != 0 && t->remote_ip != 0 &&
           (t->local_ip != t->remote_ip || t->local_port != t->remote_port);
}

SF_API struct sf_tuple sfl_tuple(const struct sf_msg *m) {
    struct sf_tuple t = {
        .local_ip = m->local_ip,
        .remote_ip = m->remote_ip,
        .local_port = m->local_port,
        .remote_port = m->remote_port,
    };
    return t;
}

SF_API struct sf_tuple sfl_mirrored(const struct sf_tuple *t) {
    struct sf_tuple m = {
        .local_ip = t->remote_ip,
        .remote_ip = t->local_ip,
        .local_port = t->remote_port,
        .remote_port = t->local_port,
    };
    return m;
}
