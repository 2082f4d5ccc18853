/* sf_wire.h -- the frames the preload library exchanges with its router and with the peer library.
 *
 * This is the C half of docs/wire.md; src/shuntflow/wire.py is the Python half, and
 * tests/unit/test_wire.py checks that both produce the same bytes. Change all three together.
 * Integers are little-endian (x86-64 and aarch64 hosts only); addresses and ports are kept in
 * network byte order exactly as in struct sockaddr_in, so they are copied, never converted. */
#ifndef SF_WIRE_H
#define SF_WIRE_H

#include <stdint.h>

#define SF_MSG_MAGIC 0x314C4653u  /* "SFL1": library <-> router */
#define SF_PEER_MAGIC 0x32524653u /* "SFR2": router <-> router, authenticated */
#define SF_HOP_MAGIC 0x31484653u  /* "SFH1": library <-> library, first bytes on the host connection */
#define SF_PROTOCOL_VERSION 1

enum sf_msg_type {
    SF_HELLO = 1,
    SF_HELLO_ACK = 2,
    SF_SWITCH_REQ = 3,
    SF_SWITCH_RES = 4,
    SF_CLAIM_REQ = 5,
    SF_CLAIM_RES = 6,
    SF_STATS_REQ = 7,
    SF_CONN_INFO = 8,
    SF_STATS_END = 9,
    SF_SWITCH_DONE = 10,
    SF_SWITCH_CALLS = 11,
    SF_OFFER = 16,
    SF_ANSWER = 17,
};

enum sf_status {
    SF_OK = 0,
    SF_NOT_MINE = 1,
    SF_NO_ROUTE = 2,
    SF_PEER_UNREACHABLE = 3,
    SF_PEER_REFUSED = 4,
    SF_DENIED = 5,
    SF_DUPLICATE = 6,
    SF_INTERNAL = 7,
    SF_BAD_MESSAGE = 8,
    SF_TIMEOUT = 9,
};

enum sf_mode { SF_MODE_OVERLAY = 0, SF_MODE_SLIM = 1, SF_MODE_SHUNTFLOW = 2 };

/* Path reported in CONN_INFO.status. */
enum sf_path { SF_PATH_OVERLAY = 0, SF_PATH_SWITCHING = 1, SF_PATH_HOST = 2, SF_PATH_PINNED = 3 };

struct sf_msg {
    uint32_t magic;
    uint16_t type;
    uint16_t status;
    uint32_t seq;
    uint32_t pid;
    uint32_t local_ip;    /* network order; the library's own end */
    uint32_t remote_ip;   /* network order */
    uint16_t local_port;  /* network order */
    uint16_t remote_port; /* network order */
    uint32_t reserved;
    uint64_t arg;
    uint64_t arg2;
};

/* Router <-> router (the library never sees it; here so both halves of docs/wire.md agree).
 * mac = HMAC-SHA256(cluster key, the 56 bytes before it + the 12-byte underlay binding). */
#define SF_PEER_NONCE_SIZE 16
#define SF_PEER_MAC_SIZE 32
struct sf_peer_msg {
    uint32_t magic;
    uint16_t type;   /* SF_OFFER or SF_ANSWER */
    uint16_t status;
    uint32_t seq;
    uint32_t reserved;
    uint32_t local_ip;    /* network order; the initiator's end */
    uint32_t remote_ip;   /* network order */
    uint16_t local_port;  /* network order */
    uint16_t remote_port; /* network order */
    uint32_t reserved2;
    uint64_t timestamp_ms; /* OFFER: initiator's wall clock, ms since the epoch; ANSWER: echoed */
    uint8_t nonce[SF_PEER_NONCE_SIZE]; /* OFFER: fresh random; ANSWER: the OFFER's */
    uint8_t mac[SF_PEER_MAC_SIZE];
};

enum sf_hop_type { SF_HOP_READY = 1, SF_HOP_SYNC = 2, SF_HOP_ABORT = 3 };
#define SF_HOP_F_SHUT_WR 0x1u

struct sf_hop {
    uint32_t magic;
    uint16_t type;
    uint16_t flags;
    uint64_t seq; /* S: bytes written on the overlay before the switch */
};

_Static_assert(sizeof(struct sf_msg) == 48, "sf_msg is 48 bytes on the wire");
_Static_assert(sizeof(struct sf_hop) == 16, "sf_hop is 16 bytes on the wire");
_Static_assert(sizeof(struct sf_peer_msg) == 88, "sf_peer_msg is 88 bytes on the wire");

#endif
