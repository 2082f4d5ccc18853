/* fuzz_peerframe_mac.c -- structure-aware libFuzzer harness: MAC-valid frames, so the checks
 * behind the MAC (window, replay cache, cache bound, ANSWER binding) are reached.
 *
 * Random bytes never carry a valid HMAC, so fuzz_peerframe.c stops at "bad MAC". Here the input
 * is a script: a window, a cache bound, a binding, then 8-byte operations (an OFFER with a
 * nonce from a small set, a clock skew and a step of the clock; an ANSWER to an OFFER; a jump
 * of the clock, also backwards). The harness signs each frame itself (fuzz_common.h), may flip
 * one byte of it and sign again or not, and predicts every verdict from a plain model of the
 * rules (auth.OfferChecker's: a linear list of nonces and their expiries). The library must
 * give the same verdict, reason for reason, and hold as many nonces as the model after each
 * step; any difference aborts. Bounds up to 255 nonces make the hash set grow and shrink. */

#include <inttypes.h>
#include <stdio.h>

#include "fuzz_common.h"

#define MODEL_MAX 256

struct model {
    uint32_t window, max;
    size_t n;
    struct {
        uint8_t nonce[SF_PEER_NONCE_SIZE];
        uint64_t expiry;
    } e[MODEL_MAX];
};

/* The OfferChecker's verdict on a parsed OFFER, into `why`; 1 if accepted. */
static int model_check(struct model *md, const struct sf_peer_msg *m,
                       const uint8_t binding[SFP_BINDING_SIZE], uint64_t now, char *why,
                       size_t whylen) {
    if (!fuzz_mac_ok(m, binding)) return snprintf(why, whylen, "bad MAC"), 0;
    uint64_t ts = m->timestamp_ms;
    uint64_t off = ts >= now ? ts - now : now - ts;
    if (off > md->window) {
        snprintf(why, whylen, "timestamp %s%" PRIu64 " ms off, window %" PRIu32 " ms",
                 ts >= now ? "+" : "-", off, md->window);
        return 0;
    }
    for (size_t i = 0; i < md->n;) {
        if (md->e[i].expiry < now)
            md->e[i] = md->e[--md->n];
        else
            i++;
    }
    for (size_t i = 0; i < md->n; i++)
        if (memcmp(md->e[i].nonce, m->nonce, SF_PEER_NONCE_SIZE) == 0)
            return snprintf(why, whylen, "replayed nonce"), 0;
    if (md->n >= md->max) {
        snprintf(why, whylen, "replay cache full (%" PRIu32 " nonces)", md->max);
        return 0;
    }
    memcpy(md->e[md->n].nonce, m->nonce, SF_PEER_NONCE_SIZE);
    md->e[md->n].expiry = ts > UINT64_MAX - md->window ? UINT64_MAX : ts + md->window;
    md->n++;
    return 1;
}

static void make_nonce(uint8_t idx, uint8_t out[SF_PEER_NONCE_SIZE]) {
    for (int i = 0; i < SF_PEER_NONCE_SIZE; i++) out[i] = (uint8_t)(idx * 37u + (unsigned)i);
    out[0] = idx;
}

static void frame(struct sf_peer_msg *m, uint16_t type, uint16_t status, uint32_t seq,
                  uint64_t ts, uint8_t nonce_idx, const uint8_t binding[SFP_BINDING_SIZE]) {
    memset(m, 0, sizeof(*m));
    m->magic = SF_PEER_MAGIC;
    m->type = type;
    m->status = status;
    m->seq = seq;
    m->local_ip = 0x0100000au; /* 10.0.0.1 in network order */
    m->remote_ip = 0x0200000au;
    m->local_port = 0xe803;    /* 1000 */
    m->remote_port = 0xd007;   /* 2000 */
    m->timestamp_ms = ts;
    make_nonce(nonce_idx, m->nonce);
    fuzz_mac(m, binding, m->mac);
}

/* Flips byte `at` of the 88 if asked; signs again if asked. */
static void tamper(struct sf_peer_msg *m, const uint8_t *op,
                   const uint8_t binding[SFP_BINDING_SIZE]) {
    if (!(op[6] & 1)) return;
    uint8_t *raw = (uint8_t *)m;
    raw[op[4] % sizeof(*m)] ^= (uint8_t)(op[5] | 1);
    if (op[6] & 2) fuzz_mac(m, binding, m->mac);
}

static int parses(const struct sf_peer_msg *m, uint16_t want) {
    return m->magic == SF_PEER_MAGIC && m->type == want;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static struct model md;
    struct sf_peer_msg m, parsed, offer, answer, expect;
    uint8_t binding[SFP_BINDING_SIZE];
    char why[128], want_why[128];

    if (size < 2 + SFP_BINDING_SIZE) return 0;
    memset(&md, 0, sizeof(md));
    md.window = 50u + data[0];
    md.max = data[1];
    memcpy(binding, data + 2, SFP_BINDING_SIZE);
    struct sfp_replay *r = sfp_replay_new(md.window, md.max);
    CHECK(r != NULL);
    uint64_t now = 1800000000000ull;

    for (size_t off = 2 + SFP_BINDING_SIZE; off + 8 <= size; off += 8) {
        const uint8_t *op = data + off;
        switch (op[0] % 4) {
        case 0:
        case 1: { /* an OFFER */
            now += op[3];
            uint64_t ts = now + (uint64_t)(int64_t)((int8_t)op[2] * 4);
            frame(&m, SF_OFFER, 0, op[7], ts, op[1], binding);
            tamper(&m, op, binding);
            const char *perr = sfp_parse((const uint8_t *)&m, sizeof(m), SF_OFFER, &parsed);
            CHECK((perr == NULL) == parses(&m, SF_OFFER));
            if (perr != NULL) break;
            int ok = model_check(&md, &parsed, binding, now, want_why, sizeof(want_why));
            const char *err =
                sfp_offer_check(r, fuzz_key, FUZZ_KEYLEN, &parsed, binding, now, why, sizeof(why));
            CHECK((err == NULL) == ok);
            if (err != NULL) CHECK(strcmp(err, want_why) == 0);
            CHECK(sfp_replay_size(r) == md.n);
            break;
        }
        case 2: { /* an ANSWER to an OFFER of ours */
            frame(&offer, SF_OFFER, 0, op[7], now, op[1], binding);
            uint16_t status = op[7] & 15;
            sfp_answer_make(fuzz_key, FUZZ_KEYLEN, &offer, status, binding, &answer);
            frame(&expect, SF_ANSWER, status, op[7], now, op[1], binding);
            CHECK(memcmp(&answer, &expect, sizeof(answer)) == 0);
            tamper(&answer, op, binding);
            const char *perr =
                sfp_parse((const uint8_t *)&answer, sizeof(answer), SF_ANSWER, &parsed);
            CHECK((perr == NULL) == parses(&answer, SF_ANSWER));
            /* The check also runs on frames the parser refused: it must stand on its own. */
            const char *want = NULL;
            if (answer.type != SF_ANSWER)
                want = answer.type == SF_OFFER ? "expected ANSWER, got OFFER" : "expected ANSWER";
            else if (!fuzz_mac_ok(&answer, binding))
                want = "ANSWER MAC invalid (peer has another cluster key)";
            else if (answer.seq != offer.seq || answer.local_ip != offer.local_ip ||
                     answer.remote_ip != offer.remote_ip ||
                     answer.local_port != offer.local_port ||
                     answer.remote_port != offer.remote_port ||
                     memcmp(answer.nonce, offer.nonce, SF_PEER_NONCE_SIZE) != 0)
                want = "ANSWER does not match the OFFER";
            const char *err = sfp_answer_check(fuzz_key, FUZZ_KEYLEN, &offer, &answer, binding);
            CHECK((err == NULL) == (want == NULL));
            if (err != NULL) CHECK(strcmp(err, want) == 0);
            break;
        }
        default: /* the clock jumps: nonces age out, or a stepped-back clock keeps them */
            if (op[4] & 1)
                now -= (uint64_t)op[3] * 10u;
            else
                now += (uint64_t)op[3] * 100u;
            break;
        }
    }
    sfp_replay_free(r);
    return 0;
}
