/* peerframe.h -- the router <-> router frame (docs/wire.md section 2) on the native switch path:
 * making and checking OFFER and ANSWER, with the cluster key's HMAC-SHA256 (libcrypto) and the
 * replay cache. The Python half is src/shuntflow/router/auth.py; tests check the two agree
 * byte for byte. Pure functions of their inputs plus the replay cache: no sockets here, so the
 * fuzzer can drive them. */
#ifndef SF_PEERFRAME_H
#define SF_PEERFRAME_H

#include <stddef.h>
#include <stdint.h>

#include "sf_wire.h"

#define SFP_BINDING_SIZE 12
#define SFP_KEY_MAX 1024

/* An overlay connection as the frames carry it: addresses and ports in network order. */
struct sf_tuple {
    uint32_t local_ip, remote_ip;
    uint16_t local_port, remote_port;
};

/* The 12 never-sent bytes that tie a frame to the underlay TCP connection it travels on:
 * initiator address and port, responder address and port, network order. `initiator` says
 * whether `fd` is the initiating end. 0 on success, -errno on failure. */
int sfp_binding(int fd, int initiator, uint8_t out[SFP_BINDING_SIZE]);

/* A fresh OFFER: the wall clock now, 16 random bytes of nonce, signed. 0, or -errno when no
 * randomness could be had (the caller then refuses to offer). */
int sfp_offer_make(const uint8_t *key, size_t keylen, uint32_t seq, const struct sf_tuple *t,
                   const uint8_t binding[SFP_BINDING_SIZE], struct sf_peer_msg *out);

/* The ANSWER to `offer`, bound to it by echoing its seq, tuple, timestamp and nonce. */
void sfp_answer_make(const uint8_t *key, size_t keylen, const struct sf_peer_msg *offer,
                     uint16_t status, const uint8_t binding[SFP_BINDING_SIZE],
                     struct sf_peer_msg *out);

/* Copies 88 received bytes into `out` if they are a frame of type `want` with the right magic;
 * else returns why not (a static string). Checks no MAC. */
const char *sfp_parse(const uint8_t *buf, size_t len, uint16_t want, struct sf_peer_msg *out);

/* NULL if `answer` is the authentic answer to our `offer`, else why not. */
const char *sfp_answer_check(const uint8_t *key, size_t keylen, const struct sf_peer_msg *offer,
                             const struct sf_peer_msg *answer,
                             const uint8_t binding[SFP_BINDING_SIZE]);

/* Incoming OFFERs: MAC, timestamp within the window, each nonce accepted once. */
struct sfp_replay;
struct sfp_replay *sfp_replay_new(uint32_t window_ms, uint32_t max_nonces);
void sfp_replay_free(struct sfp_replay *r);
size_t sfp_replay_size(const struct sfp_replay *r);

/* NULL if `offer` is accepted (its nonce is now remembered until timestamp + window), else why
 * not, written into `why` (as auth.OfferChecker words it: "bad MAC", "timestamp +N ms off,
 * window W ms", "replayed nonce", "replay cache full (N nonces)"). */
const char *sfp_offer_check(struct sfp_replay *r, const uint8_t *key, size_t keylen,
                            const struct sf_peer_msg *offer,
                            const uint8_t binding[SFP_BINDING_SIZE], uint64_t now_ms, char *why,
                            size_t whylen);

uint64_t sfp_now_ms(void); /* wall clock, ms since the epoch */

#endif
