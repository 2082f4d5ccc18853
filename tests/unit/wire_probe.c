/* wire_probe.c -- prints the bytes the C half of docs/wire.md produces, for test_wire.py.
 *
 * Fixed sample values go into struct sf_msg / struct sf_hop exactly as the preload library
 * fills them (addresses and ports copied in network order from a sockaddr_in), then the raw
 * bytes are printed in hex, with offsetof/sizeof of every field, so the Python half
 * (src/shuntflow/wire.py) can be compared byte for byte. Output, one item per line:
 *   msg <hex>     calls <hex> (a SWITCH_CALLS frame)     peer <hex> (MAC bytes a placeholder)
 *   hop <hex>
 *   off <struct>.<field> <offset> <size>     enum <PyEnum>.<NAME> <value> */
#include <arpa/inet.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "sf_wire.h"

static void hex(const char *label, const void *p, size_t n) {
    const unsigned char *b = p;
    printf("%s ", label);
    for (size_t i = 0; i < n; i++) printf("%02x", b[i]);
    printf("\n");
}

#define OFF(type, field) \
    printf("off " #type "." #field " %zu %zu\n", offsetof(struct type, field), \
           sizeof(((struct type *)0)->field))

static void fill(struct sf_msg *m, uint32_t magic, uint16_t type, uint16_t status) {
    struct sockaddr_in local, remote;
    memset(m, 0, sizeof *m);
    memset(&local, 0, sizeof local);
    memset(&remote, 0, sizeof remote);
    inet_pton(AF_INET, "198.19.1.2", &local.sin_addr);
    inet_pton(AF_INET, "198.19.2.3", &remote.sin_addr);
    local.sin_port = htons(40001);
    remote.sin_port = htons(80);
    m->magic = magic;
    m->type = type;
    m->status = status;
    m->seq = 0x81020304u;
    m->pid = 4242;
    memcpy(&m->local_ip, &local.sin_addr, 4);
    memcpy(&m->remote_ip, &remote.sin_addr, 4);
    m->local_port = local.sin_port;
    m->remote_port = remote.sin_port;
    m->arg = 0x1122334455667788ull;
    m->arg2 = 12345678901ull;
}

int main(void) {
    struct sf_msg m;
    fill(&m, SF_MSG_MAGIC, SF_SWITCH_RES, SF_DUPLICATE);
    hex("msg", &m, sizeof m);

    /* The peer frame with a fixed nonce and a placeholder MAC (bytes 0xA0..0xBF): Python must
     * lay out the same 56 bytes ahead of it; the MAC itself is computed only by Python. */
    struct sf_msg src;
    fill(&src, SF_MSG_MAGIC, 0, 0);
    struct sf_peer_msg pm;
    memset(&pm, 0, sizeof pm);
    pm.magic = SF_PEER_MAGIC;
    pm.type = SF_ANSWER;
    pm.status = SF_PEER_REFUSED;
    pm.seq = src.seq;
    pm.local_ip = src.local_ip;
    pm.remote_ip = src.remote_ip;
    pm.local_port = src.local_port;
    pm.remote_port = src.remote_port;
    pm.timestamp_ms = 1764140000123ull;
    for (int i = 0; i < SF_PEER_NONCE_SIZE; i++) pm.nonce[i] = (uint8_t)(0x10 + i);
    for (int i = 0; i < SF_PEER_MAC_SIZE; i++) pm.mac[i] = (uint8_t)(0xA0 + i);
    hex("peer", &pm, sizeof pm);

    /* SWITCH_CALLS as window.c fills it: a failed switch, longest call 1.5 s, 7 calls timed. */
    struct sf_msg calls;
    fill(&calls, SF_MSG_MAGIC, SF_SWITCH_CALLS, SF_TIMEOUT);
    calls.seq = 0;
    calls.pid = 0;
    calls.arg = 1500000;
    calls.arg2 = 7;
    hex("calls", &calls, sizeof calls);

    struct sf_hop h = {.magic = SF_HOP_MAGIC, .type = SF_HOP_SYNC, .flags = SF_HOP_F_SHUT_WR,
                       .seq = 0x0102030405060708ull};
    hex("hop", &h, sizeof h);

    OFF(sf_msg, magic);
    OFF(sf_msg, type);
    OFF(sf_msg, status);
    OFF(sf_msg, seq);
    OFF(sf_msg, pid);
    OFF(sf_msg, local_ip);
    OFF(sf_msg, remote_ip);
    OFF(sf_msg, local_port);
    OFF(sf_msg, remote_port);
    OFF(sf_msg, reserved);
    OFF(sf_msg, arg);
    OFF(sf_msg, arg2);
    OFF(sf_peer_msg, magic);
    OFF(sf_peer_msg, type);
    OFF(sf_peer_msg, status);
    OFF(sf_peer_msg, seq);
    OFF(sf_peer_msg, reserved);
    OFF(sf_peer_msg, local_ip);
    OFF(sf_peer_msg, remote_ip);
    OFF(sf_peer_msg, local_port);
    OFF(sf_peer_msg, remote_port);
    OFF(sf_peer_msg, reserved2);
    OFF(sf_peer_msg, timestamp_ms);
    OFF(sf_peer_msg, nonce);
    OFF(sf_peer_msg, mac);
    OFF(sf_hop, magic);
    OFF(sf_hop, type);
    OFF(sf_hop, flags);
    OFF(sf_hop, seq);
    printf("size sf_msg %zu\nsize sf_hop %zu\n", sizeof(struct sf_msg), sizeof(struct sf_hop));
    printf("size sf_peer_msg %zu\n", sizeof(struct sf_peer_msg));
    printf("const %u %u %u %d\n", SF_MSG_MAGIC, SF_PEER_MAGIC, SF_HOP_MAGIC, SF_PROTOCOL_VERSION);
    printf("enum MsgType.HELLO %d\n", (int)SF_HELLO);
    printf("enum MsgType.HELLO_ACK %d\n", (int)SF_HELLO_ACK);
    printf("enum MsgType.SWITCH_REQ %d\n", (int)SF_SWITCH_REQ);
    printf("enum MsgType.SWITCH_RES %d\n", (int)SF_SWITCH_RES);
    printf("enum MsgType.CLAIM_REQ %d\n", (int)SF_CLAIM_REQ);
    printf("enum MsgType.CLAIM_RES %d\n", (int)SF_CLAIM_RES);
    printf("enum MsgType.STATS_REQ %d\n", (int)SF_STATS_REQ);
    printf("enum MsgType.CONN_INFO %d\n", (int)SF_CONN_INFO);
    printf("enum MsgType.STATS_END %d\n", (int)SF_STATS_END);
    printf("enum MsgType.SWITCH_DONE %d\n", (int)SF_SWITCH_DONE);
    printf("enum MsgType.SWITCH_CALLS %d\n", (int)SF_SWITCH_CALLS);
    printf("enum MsgType.OFFER %d\n", (int)SF_OFFER);
    printf("enum MsgType.ANSWER %d\n", (int)SF_ANSWER);
    printf("enum Status.OK %d\n", (int)SF_OK);
    printf("enum Status.NOT_MINE %d\n", (int)SF_NOT_MINE);
    printf("enum Status.NO_ROUTE %d\n", (int)SF_NO_ROUTE);
    printf("enum Status.PEER_UNREACHABLE %d\n", (int)SF_PEER_UNREACHABLE);
    printf("enum Status.PEER_REFUSED %d\n", (int)SF_PEER_REFUSED);
    printf("enum Status.DENIED %d\n", (int)SF_DENIED);
    printf("enum Status.DUPLICATE %d\n", (int)SF_DUPLICATE);
    printf("enum Status.INTERNAL %d\n", (int)SF_INTERNAL);
    printf("enum Status.BAD_MESSAGE %d\n", (int)SF_BAD_MESSAGE);
    printf("enum Status.TIMEOUT %d\n", (int)SF_TIMEOUT);
    printf("enum Mode.OVERLAY %d\n", (int)SF_MODE_OVERLAY);
    printf("enum Mode.SLIM %d\n", (int)SF_MODE_SLIM);
    printf("enum Mode.SHUNTFLOW %d\n", (int)SF_MODE_SHUNTFLOW);
    printf("enum Path.OVERLAY %d\n", (int)SF_PATH_OVERLAY);
    printf("enum Path.SWITCHING %d\n", (int)SF_PATH_SWITCHING);
    printf("enum Path.HOST %d\n", (int)SF_PATH_HOST);
    printf("enum Path.PINNED %d\n", (int)SF_PATH_PINNED);
    printf("enum HopType.READY %d\n", (int)SF_HOP_READY);
    printf("enum HopType.SYNC %d\n", (int)SF_HOP_SYNC);
    printf("enum HopType.ABORT %d\n", (int)SF_HOP_ABORT);
    printf("flag HOP_F_SHUT_WR %u\n", SF_HOP_F_SHUT_WR);
    return 0;
}
