/* fuzz_peerframe.c -- libFuzzer harness for the router <-> router frames (peerframe.c) as they
 * arrive from the network: any bytes, checked with a fixed key.
 *
 * Input: a flags byte (which frame type is expected), 12 bytes of underlay binding, 2 bytes of
 * clock skew, then the frame. Each input goes through sfp_parse, then sfp_offer_check (a cache
 * per input, so a crash replays from its input alone) or sfp_answer_check against a fixed
 * OFFER. Beyond sanitizer reports it checks: a parsed frame is the input's 88 bytes with the
 * magic and the wanted type, a refusal leaves the output alone, and nothing is ever accepted
 * whose MAC an independent computation (fuzz_common.h) does not confirm. Random bytes almost
 * never carry a valid MAC; fuzz_peerframe_mac.c reaches the checks behind it. */

#include <stdio.h>

#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct sf_peer_msg m, untouched, offer;
    uint8_t binding[SFP_BINDING_SIZE];
    char why[128];

    if (size < 1 + SFP_BINDING_SIZE + 2) return 0;
    uint16_t want = (data[0] & 1) ? SF_ANSWER : SF_OFFER;
    memcpy(binding, data + 1, SFP_BINDING_SIZE);
    int16_t skew;
    memcpy(&skew, data + 1 + SFP_BINDING_SIZE, 2);
    size_t off = 1 + SFP_BINDING_SIZE + 2, len = size - off;
    uint8_t *frame = malloc(len ? len : 1); /* exactly `len` bytes: ASan sees overreads */
    if (frame == NULL) return 0;
    memcpy(frame, data + off, len);

    memset(&m, 0x5A, sizeof(m));
    untouched = m;
    const char *err = sfp_parse(frame, len, want, &m);
    if (err != NULL) {
        CHECK(strlen(err) > 0);
        CHECK(memcmp(&m, &untouched, sizeof(m)) == 0);
        free(frame);
        return 0;
    }
    CHECK(len == sizeof(m) && memcmp(&m, frame, sizeof(m)) == 0);
    CHECK(m.magic == SF_PEER_MAGIC && m.type == want);
    free(frame);

    if (want == SF_OFFER) {
        struct sfp_replay *r = sfp_replay_new(1000, 4);
        CHECK(r != NULL);
        uint64_t now = m.timestamp_ms + (uint64_t)(int64_t)skew;
        err = sfp_offer_check(r, fuzz_key, FUZZ_KEYLEN, &m, binding, now, why, sizeof(why));
        CHECK(err == NULL || strlen(err) > 0);
        CHECK(err != NULL || fuzz_mac_ok(&m, binding));
        CHECK(sfp_replay_size(r) == (err == NULL ? 1u : 0u));
        if (err == NULL) { /* the same frame again: a replay */
            err = sfp_offer_check(r, fuzz_key, FUZZ_KEYLEN, &m, binding, now, why, sizeof(why));
            CHECK(err != NULL && strcmp(err, "replayed nonce") == 0);
        }
        sfp_replay_free(r);
    } else {
        struct sf_tuple t = {m.local_ip, m.remote_ip, m.local_port, m.remote_port};
        CHECK(sfp_offer_make(fuzz_key, FUZZ_KEYLEN, m.seq, &t, binding, &offer) == 0);
        CHECK(fuzz_mac_ok(&offer, binding));
        /* The fuzzer's ANSWER echoes a fresh random nonce only by a MAC forgery. */
        err = sfp_answer_check(fuzz_key, FUZZ_KEYLEN, &offer, &m, binding);
        CHECK(err != NULL);
    }
    return 0;
}
