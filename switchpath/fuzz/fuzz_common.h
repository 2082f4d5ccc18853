/* fuzz_common.h -- what the peer-frame harnesses share: the fixed cluster key, abort-on-failure
 * checks, and an independent statement of the MAC (the 56-byte head packed field by field as
 * wire.py packs it, magic and reserved fields canonical, then the binding), so a harness can
 * make MAC-valid frames and judge the library's verdicts without trusting peerframe.c. */
#ifndef SF_FUZZ_COMMON_H
#define SF_FUZZ_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "peerframe.h"

#define CHECK(cond)           \
    do {                      \
        if (!(cond)) abort(); \
    } while (0)

static const uint8_t fuzz_key[] = "a fixed cluster key for the fuzzers, 32+ bytes";
#define FUZZ_KEYLEN (sizeof(fuzz_key) - 1)

static inline uint8_t *put_le(uint8_t *p, uint64_t v, int n) {
    for (int i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8 * i));
    return p + n;
}

/* HMAC-SHA256(key, head || binding) with the head as wire.PeerMsg.head() packs it. */
static inline void fuzz_mac(const struct sf_peer_msg *m, const uint8_t binding[SFP_BINDING_SIZE],
                            uint8_t out[SF_PEER_MAC_SIZE]) {
    uint8_t data[56 + SFP_BINDING_SIZE], *p = data;
    unsigned int len = 0;

    p = put_le(p, SF_PEER_MAGIC, 4);
    p = put_le(p, m->type, 2);
    p = put_le(p, m->status, 2);
    p = put_le(p, m->seq, 4);
    p = put_le(p, 0, 4);
    memcpy(p, &m->local_ip, 4), p += 4; /* network order: copied, never converted */
    memcpy(p, &m->remote_ip, 4), p += 4;
    memcpy(p, &m->local_port, 2), p += 2;
    memcpy(p, &m->remote_port, 2), p += 2;
    p = put_le(p, 0, 4);
    p = put_le(p, m->timestamp_ms, 8);
    memcpy(p, m->nonce, SF_PEER_NONCE_SIZE), p += SF_PEER_NONCE_SIZE;
    memcpy(p, binding, SFP_BINDING_SIZE);
    CHECK(HMAC(EVP_sha256(), fuzz_key, (int)FUZZ_KEYLEN, data, sizeof(data), out, &len) != NULL);
    CHECK(len == SF_PEER_MAC_SIZE);
}

static inline int fuzz_mac_ok(const struct sf_peer_msg *m,
                              const uint8_t binding[SFP_BINDING_SIZE]) {
    uint8_t mac[SF_PEER_MAC_SIZE];
    fuzz_mac(m, binding, mac);
    return memcmp(mac, m->mac, sizeof(mac)) == 0;
}

#endif
