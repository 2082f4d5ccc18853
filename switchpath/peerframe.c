/* peerframe.c -- OFFER and ANSWER, the router <-> router frames of docs/wire.md section 2, made
 * and checked in C for the native switch path.
 *
 * The Python half is src/shuntflow/router/auth.py with shuntflow/wire.py; the two must agree
 * byte for byte (tests/unit/test_switchpath_frames.py makes frames on one side and checks them
 * on the other), so every rule here is the Python one, refusal reasons worded the same.
 *
 * Why the MAC is computed over a head rebuilt from the fields rather than over the 56 bytes as
 * received: the Python side packs magic, reserved and reserved2 itself (the constant, 0, 0), so a
 * frame is authentic there exactly when its MAC matches that canonical head. Hashing the raw
 * bytes would accept and refuse different frames than the Python router does.
 *
 * Why the replay cache is a hash set plus a min-heap on expiry: every accepted nonce must be
 * remembered for as long as its timestamp would still pass the window check (timestamp + window),
 * no longer, and the lookup runs on every OFFER. The heap yields the next nonce to forget in
 * O(log n); the set answers "seen?" in O(1). Both grow by doubling as nonces arrive, the heap
 * to max_nonces entries and the set to twice that many slots, so an idle router does not hold
 * the worst case in memory. When max_nonces are live a new OFFER is
 * refused, never a live nonce evicted: evicting one would reopen it to replay.
 *
 * Only HMAC-SHA256 from libcrypto and its constant-time compare are used: no crypto of our own.
 * The functions are pure but for the replay cache they are handed, so the fuzzers drive them. */

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <time.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/params.h>

#include "peerframe.h"

#define SF_API __attribute__((visibility("default")))

/* The MAC'd bytes: the 56-byte head, then the binding. */
#define SFP_HEAD_SIZE (sizeof(struct sf_peer_msg) - SF_PEER_MAC_SIZE)
#define SFP_MACD_SIZE (SFP_HEAD_SIZE + SFP_BINDING_SIZE)

_Static_assert(SFP_HEAD_SIZE == 56, "the MAC covers the 56 bytes before it");

/* ----------------------------------------------------------------------------------------
 * MAC
 * ---------------------------------------------------------------------------------------- */

/* A keyed HMAC-SHA256 context per thread, made once per cluster key and copied for each frame:
 * the one-shot HMAC() fetched the digest, made a context and keyed it on every frame, 9 % of
 * the initiating router's CPU at 1,000 switches/s. Per thread because the functions are
 * called from any thread (the router's loop, the tests through ctypes); the key it was made
 * for is kept beside it and compared, so a different key gets a new template. */
struct mac_cache {
    EVP_MAC_CTX *tmpl;
    size_t keylen;
    uint8_t key[SFP_KEY_MAX];
};

static pthread_key_t mac_key;
static pthread_once_t mac_once = PTHREAD_ONCE_INIT;
static int mac_key_ok;

static void mac_cache_free(void *p) {
    struct mac_cache *c = p;
    EVP_MAC_CTX_free(c->tmpl);
    OPENSSL_cleanse(c->key, sizeof(c->key));
    free(c);
}

static void mac_key_init(void) { mac_key_ok = pthread_key_create(&mac_key, mac_cache_free) == 0; }

/* This thread's template for `key`, or NULL (no memory, no HMAC in libcrypto): the caller then
 * computes the MAC the one-shot way. */
static EVP_MAC_CTX *mac_template(const uint8_t *key, size_t keylen) {
    static const uint8_t no_key = 0;
    if (keylen > SFP_KEY_MAX || pthread_once(&mac_once, mac_key_init) != 0 || !mac_key_ok)
        return NULL;
    struct mac_cache *c = pthread_getspecific(mac_key);
    if (c != NULL && c->tmpl != NULL && c->keylen == keylen &&
        CRYPTO_memcmp(c->key, key, keylen) == 0)
        return c->tmpl;
    if (c == NULL) {
        c = calloc(1, sizeof(*c));
        if (c == NULL) return NULL;
        if (pthread_setspecific(mac_key, c) != 0) {
            free(c);
            return NULL;
        }
    }
    EVP_MAC_CTX_free(c->tmpl);
    c->tmpl = NULL;
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (mac == NULL) return NULL;
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(mac);
    EVP_MAC_free(mac); /* the context holds its own reference */
    if (ctx == NULL) return NULL;
    char digest[] = "SHA256";
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
                           OSSL_PARAM_construct_end()};
    /* keylen 0 is the empty key, as Python's hmac takes it: a non-NULL pointer says so. */
    if (!EVP_MAC_init(ctx, keylen ? key : &no_key, keylen, params)) {
        EVP_MAC_CTX_free(ctx);
        return NULL;
    }
    c->tmpl = ctx;
    c->keylen = keylen;
    if (keylen) memcpy(c->key, key, keylen);
    return ctx;
}

/* HMAC-SHA256 of the canonical head of `m` plus `binding`. 0 on success, -1 if libcrypto
 * failed (allocation): callers then treat the frame as not authentic. */
static int peer_mac(const uint8_t *key, size_t keylen, const struct sf_peer_msg *m,
                    const uint8_t binding[SFP_BINDING_SIZE], uint8_t out[SF_PEER_MAC_SIZE]) {
    static const uint8_t no_key = 0;
    struct sf_peer_msg head = *m;
    uint8_t data[SFP_MACD_SIZE];
    unsigned int outlen = 0;

    head.magic = SF_PEER_MAGIC;
    head.reserved = 0;
    head.reserved2 = 0;
    memcpy(data, &head, SFP_HEAD_SIZE);
    memcpy(data + SFP_HEAD_SIZE, binding, SFP_BINDING_SIZE);
    /* HMAC() reads a NULL key as "no key given", not as the empty key Python accepts. */
    if (keylen == 0 || key == NULL) {
        key = &no_key;
        keylen = 0;
    }
    if (keylen > INT32_MAX) return -1;
    EVP_MAC_CTX *tmpl = mac_template(key, keylen);
    if (tmpl != NULL) {
        EVP_MAC_CTX *ctx = EVP_MAC_CTX_dup(tmpl);
        size_t n = 0;
        int ok = ctx != NULL && EVP_MAC_update(ctx, data, sizeof(data)) &&
                 EVP_MAC_final(ctx, out, &n, SF_PEER_MAC_SIZE) && n == SF_PEER_MAC_SIZE;
        EVP_MAC_CTX_free(ctx);
        if (ok) return 0;
    }
    if (HMAC(EVP_sha256(), key, (int)keylen, data, sizeof(data), out, &outlen) == NULL ||
        outlen != SF_PEER_MAC_SIZE)
        return -1;
    return 0;
}

static void peer_sign(const uint8_t *key, size_t keylen, struct sf_peer_msg *m,
                      const uint8_t binding[SFP_BINDING_SIZE]) {
    /* A frame with an all-zero MAC is refused by the peer: the failure surfaces there as a
     * refused switch, and the connection stays on the overlay. */
    if (peer_mac(key, keylen, m, binding, m->mac) != 0) memset(m->mac, 0, sizeof(m->mac));
}

static int peer_verify(const uint8_t *key, size_t keylen, const struct sf_peer_msg *m,
                       const uint8_t binding[SFP_BINDING_SIZE]) {
    uint8_t want[SF_PEER_MAC_SIZE];
    if (peer_mac(key, keylen, m, binding, want) != 0) return 0;
    return CRYPTO_memcmp(want, m->mac, SF_PEER_MAC_SIZE) == 0;
}

/* ----------------------------------------------------------------------------------------
 * Making frames
 * ---------------------------------------------------------------------------------------- */

SF_API uint64_t sfp_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

SF_API int sfp_binding(int fd, int initiator, uint8_t out[SFP_BINDING_SIZE]) {
    struct sockaddr_in self, peer;
    socklen_t slen = sizeof(self), plen = sizeof(peer);

    if (getsockname(fd, (struct sockaddr *)&self, &slen) != 0) return -errno;
    if (getpeername(fd, (struct sockaddr *)&peer, &plen) != 0) return -errno;
    if (self.sin_family != AF_INET || peer.sin_family != AF_INET) return -EAFNOSUPPORT;
    const struct sockaddr_in *first = initiator ? &self : &peer;
    const struct sockaddr_in *second = initiator ? &peer : &self;
    memcpy(out, &first->sin_addr.s_addr, 4);
    memcpy(out + 4, &first->sin_port, 2);
    memcpy(out + 6, &second->sin_addr.s_addr, 4);
    memcpy(out + 10, &second->sin_port, 2);
    return 0;
}

SF_API int sfp_offer_make(const uint8_t *key, size_t keylen, uint32_t seq,
                          const struct sf_tuple *t, const uint8_t binding[SFP_BINDING_SIZE],
                          struct sf_peer_msg *out) {
    memset(out, 0, sizeof(*out));
    /* 16 bytes is below getrandom's 256-byte atomic size: it fills all or fails, but a signal
     * may still interrupt the wait for the pool's first seeding. */
    for (;;) {
        ssize_t n = getrandom(out->nonce, sizeof(out->nonce), 0);
        if (n == (ssize_t)sizeof(out->nonce)) break;
        if (n < 0 && errno == EINTR) continue;
        return n < 0 ? -errno : -EIO;
    }
    out->magic = SF_PEER_MAGIC;
    out->type = SF_OFFER;
    out->status = SF_OK;
    out->seq = seq;
    out->local_ip = t->local_ip;
    out->remote_ip = t->remote_ip;
    out->local_port = t->local_port;
    out->remote_port = t->remote_port;
    out->timestamp_ms = sfp_now_ms();
    peer_sign(key, keylen, out, binding);
    return 0;
}

SF_API void sfp_answer_make(const uint8_t *key, size_t keylen, const struct sf_peer_msg *offer,
                            uint16_t status, const uint8_t binding[SFP_BINDING_SIZE],
                            struct sf_peer_msg *out) {
    struct sf_peer_msg a;

    memset(&a, 0, sizeof(a));
    a.magic = SF_PEER_MAGIC;
    a.type = SF_ANSWER;
    a.status = status;
    a.seq = offer->seq;
    a.local_ip = offer->local_ip;
    a.remote_ip = offer->remote_ip;
    a.local_port = offer->local_port;
    a.remote_port = offer->remote_port;
    a.timestamp_ms = offer->timestamp_ms;
    memcpy(a.nonce, offer->nonce, sizeof(a.nonce));
    peer_sign(key, keylen, &a, binding);
    *out = a; /* through a copy: `out` may be `offer` */
}

/* ----------------------------------------------------------------------------------------
 * Reading frames
 * ---------------------------------------------------------------------------------------- */

/* "frame type X not allowed here" for the library's types, as wire.PeerMsg.unpack words it. */
static const char *const peer_not_allowed[] = {
    [SF_HELLO] = "frame type HELLO not allowed here",
    [SF_HELLO_ACK] = "frame type HELLO_ACK not allowed here",
    [SF_SWITCH_REQ] = "frame type SWITCH_REQ not allowed here",
    [SF_SWITCH_RES] = "frame type SWITCH_RES not allowed here",
    [SF_CLAIM_REQ] = "frame type CLAIM_REQ not allowed here",
    [SF_CLAIM_RES] = "frame type CLAIM_RES not allowed here",
    [SF_STATS_REQ] = "frame type STATS_REQ not allowed here",
    [SF_CONN_INFO] = "frame type CONN_INFO not allowed here",
    [SF_STATS_END] = "frame type STATS_END not allowed here",
    [SF_SWITCH_DONE] = "frame type SWITCH_DONE not allowed here",
    [SF_SWITCH_CALLS] = "frame type SWITCH_CALLS not allowed here",
};

static const char *wrong_type(uint16_t want, uint16_t got) {
    if (want == SF_OFFER)
        return got == SF_ANSWER ? "expected OFFER, got ANSWER" : "expected OFFER";
    return got == SF_OFFER ? "expected ANSWER, got OFFER" : "expected ANSWER";
}

SF_API const char *sfp_parse(const uint8_t *buf, size_t len, uint16_t want,
                             struct sf_peer_msg *out) {
    struct sf_peer_msg m;

    /* Static strings cannot carry the size or the magic: the words are wire.py's, the number
     * is the caller's to log. */
    if (len != sizeof(m)) return "peer frame is not 88 bytes, expected 88";
    memcpy(&m, buf, sizeof(m));
    if (m.magic != SF_PEER_MAGIC) return "bad magic";
    if (m.type != SF_OFFER && m.type != SF_ANSWER) {
        if (m.type < sizeof(peer_not_allowed) / sizeof(peer_not_allowed[0]) &&
            peer_not_allowed[m.type] != NULL)
            return peer_not_allowed[m.type];
        return "unknown frame type";
    }
    if (m.type != want) return wrong_type(want, m.type); /* peer.py's own check after unpack */
    *out = m;
    return NULL;
}

static int same_binding_fields(const struct sf_peer_msg *a, const struct sf_peer_msg *b) {
    return a->seq == b->seq && a->local_ip == b->local_ip && a->remote_ip == b->remote_ip &&
           a->local_port == b->local_port && a->remote_port == b->remote_port &&
           memcmp(a->nonce, b->nonce, sizeof(a->nonce)) == 0;
}

SF_API const char *sfp_answer_check(const uint8_t *key, size_t keylen,
                                    const struct sf_peer_msg *offer,
                                    const struct sf_peer_msg *answer,
                                    const uint8_t binding[SFP_BINDING_SIZE]) {
    if (answer->type != SF_ANSWER) return wrong_type(SF_ANSWER, answer->type);
    if (!peer_verify(key, keylen, answer, binding))
        return "ANSWER MAC invalid (peer has another cluster key)";
    /* The echoed timestamp is MAC'd but not compared, as in auth.answer_matches: the nonce
     * alone already names one OFFER. */
    if (!same_binding_fields(offer, answer)) return "ANSWER does not match the OFFER";
    return NULL;
}

/* ----------------------------------------------------------------------------------------
 * Replay cache
 * ---------------------------------------------------------------------------------------- */

struct nonce_entry {
    uint64_t expiry; /* timestamp + window: forgotten once now is past it */
    uint8_t nonce[SF_PEER_NONCE_SIZE];
};

struct sfp_replay {
    uint32_t window_ms;
    uint32_t max_nonces;
    uint64_t seed;       /* per cache, so slot positions cannot be predicted from nonces */
    size_t count;        /* live nonces, in both the heap and the set */
    size_t heap_cap;     /* entries allocated in heap */
    struct nonce_entry *heap; /* min-heap on expiry */
    size_t slots_cap;    /* power of two, at least 2 x count: linear probing stays short */
    uint8_t (*slots)[SF_PEER_NONCE_SIZE];
    uint8_t *used;
};

static uint64_t mix64(uint64_t x) {
    /* The splitmix64 finalizer: spreads every input bit over the slot index. Not a MAC: only
     * nonces of MAC-valid OFFERs ever reach the set, so flooding it takes the cluster key. */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static size_t slot_of(const struct sfp_replay *r, const uint8_t nonce[SF_PEER_NONCE_SIZE]) {
    uint64_t a, b;
    memcpy(&a, nonce, 8);
    memcpy(&b, nonce + 8, 8);
    return (size_t)(mix64(a ^ r->seed) ^ mix64(b + r->seed)) & (r->slots_cap - 1);
}

/* The slot holding `nonce`, or (not found) the empty slot where it would go. */
static size_t set_find(const struct sfp_replay *r, const uint8_t nonce[SF_PEER_NONCE_SIZE],
                       int *found) {
    size_t i = slot_of(r, nonce);
    while (r->used[i]) {
        if (memcmp(r->slots[i], nonce, SF_PEER_NONCE_SIZE) == 0) {
            *found = 1;
            return i;
        }
        i = (i + 1) & (r->slots_cap - 1);
    }
    *found = 0;
    return i;
}

static void set_insert(struct sfp_replay *r, const uint8_t nonce[SF_PEER_NONCE_SIZE]) {
    int found;
    size_t i = set_find(r, nonce, &found);
    if (found) return;
    memcpy(r->slots[i], nonce, SF_PEER_NONCE_SIZE);
    r->used[i] = 1;
}

static void set_remove(struct sfp_replay *r, const uint8_t nonce[SF_PEER_NONCE_SIZE]) {
    int found;
    size_t mask = r->slots_cap - 1;
    size_t hole = set_find(r, nonce, &found);
    if (!found) return;
    /* Backward-shift deletion: pull later members of the probe run into the hole when their
     * home slot allows it, so lookups never need tombstones. */
    size_t j = hole;
    for (;;) {
        r->used[hole] = 0;
        for (;;) {
            j = (j + 1) & mask;
            if (!r->used[j]) return;
            size_t home = slot_of(r, r->slots[j]);
            /* Stays put if its home lies cyclically in (hole, j]. */
            int stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
            if (!stays) break;
        }
        memcpy(r->slots[hole], r->slots[j], SF_PEER_NONCE_SIZE);
        r->used[hole] = 1;
        hole = j;
    }
}

static int set_grow(struct sfp_replay *r, size_t cap) {
    uint8_t (*old_slots)[SF_PEER_NONCE_SIZE] = r->slots;
    uint8_t *old_used = r->used;
    size_t old_cap = r->slots_cap;
    uint8_t (*slots)[SF_PEER_NONCE_SIZE] = calloc(cap, SF_PEER_NONCE_SIZE);
    uint8_t *used = calloc(cap, 1);

    if (slots == NULL || used == NULL) {
        free(slots);
        free(used);
        return -1;
    }
    r->slots = slots;
    r->used = used;
    r->slots_cap = cap;
    for (size_t i = 0; i < old_cap; i++)
        if (old_used[i]) set_insert(r, old_slots[i]);
    free(old_slots);
    free(old_used);
    return 0;
}

static void heap_swap(struct nonce_entry *h, size_t a, size_t b) {
    struct nonce_entry t = h[a];
    h[a] = h[b];
    h[b] = t;
}

static void heap_push(struct sfp_replay *r, uint64_t expiry,
                      const uint8_t nonce[SF_PEER_NONCE_SIZE]) {
    struct nonce_entry *h = r->heap;
    size_t i = r->count;

    h[i].expiry = expiry;
    memcpy(h[i].nonce, nonce, SF_PEER_NONCE_SIZE);
    while (i > 0 && h[(i - 1) / 2].expiry > h[i].expiry) {
        heap_swap(h, i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
    r->count++;
}

static void heap_pop(struct sfp_replay *r) {
    struct nonce_entry *h = r->heap;
    size_t n = --r->count, i = 0;

    h[0] = h[n];
    for (;;) {
        size_t l = 2 * i + 1, m = i;
        if (l < n && h[l].expiry < h[m].expiry) m = l;
        if (l + 1 < n && h[l + 1].expiry < h[m].expiry) m = l + 1;
        if (m == i) break;
        heap_swap(h, i, m);
        i = m;
    }
}

/* Room for one more nonce: doubles the heap and the set as needed, never past max_nonces. */
static int replay_reserve(struct sfp_replay *r) {
    if (r->count + 1 > r->heap_cap) {
        size_t cap = r->heap_cap ? r->heap_cap * 2 : 64;
        if (cap > r->max_nonces) cap = r->max_nonces;
        struct nonce_entry *h = realloc(r->heap, cap * sizeof(*h));
        if (h == NULL) return -1;
        r->heap = h;
        r->heap_cap = cap;
    }
    if ((r->count + 1) * 2 > r->slots_cap && set_grow(r, r->slots_cap * 2) != 0) return -1;
    return 0;
}

SF_API struct sfp_replay *sfp_replay_new(uint32_t window_ms, uint32_t max_nonces) {
    struct sfp_replay *r = calloc(1, sizeof(*r));

    if (r == NULL) return NULL;
    r->window_ms = window_ms;
    r->max_nonces = max_nonces;
    /* A fixed seed if no randomness: it only spreads nonces, the cache stays correct. */
    if (getrandom(&r->seed, sizeof(r->seed), GRND_NONBLOCK) != (ssize_t)sizeof(r->seed))
        r->seed = 0x5346523253465232ULL;
    if (set_grow(r, 64) != 0) {
        free(r);
        return NULL;
    }
    return r;
}

SF_API void sfp_replay_free(struct sfp_replay *r) {
    if (r == NULL) return;
    free(r->heap);
    free(r->slots);
    free(r->used);
    free(r);
}

SF_API size_t sfp_replay_size(const struct sfp_replay *r) { return r->count; }

static const char *refuse(char *why, size_t whylen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static const char *refuse(char *why, size_t whylen, const char *fmt, ...) {
    va_list ap;
    if (why == NULL || whylen == 0) return "offer refused";
    va_start(ap, fmt);
    vsnprintf(why, whylen, fmt, ap);
    va_end(ap);
    return why;
}

SF_API const char *sfp_offer_check(struct sfp_replay *r, const uint8_t *key, size_t keylen,
                                   const struct sf_peer_msg *offer,
                                   const uint8_t binding[SFP_BINDING_SIZE], uint64_t now_ms,
                                   char *why, size_t whylen) {
    uint64_t ts = offer->timestamp_ms;
    int found;

    /* peer.py refuses anything but an OFFER before the checker: an ANSWER made for this very
     * connection carries a valid MAC too. */
    if (offer->type != SF_OFFER) return refuse(why, whylen, "%s", wrong_type(SF_OFFER, offer->type));
    if (!peer_verify(key, keylen, offer, binding)) return refuse(why, whylen, "bad MAC");
    /* The skew is unsigned arithmetic on each side of now: any 64-bit timestamp is a valid
     * input and Python's integers do not overflow either. */
    if (ts >= now_ms ? ts - now_ms > r->window_ms : now_ms - ts > r->window_ms)
        return refuse(why, whylen, "timestamp %c%" PRIu64 " ms off, window %" PRIu32 " ms",
                      ts >= now_ms ? '+' : '-', ts >= now_ms ? ts - now_ms : now_ms - ts,
                      r->window_ms);
    while (r->count > 0 && r->heap[0].expiry < now_ms) {
        set_remove(r, r->heap[0].nonce);
        heap_pop(r);
    }
    set_find(r, offer->nonce, &found);
    if (found) return refuse(why, whylen, "replayed nonce");
    if (r->count >= r->max_nonces)
        return refuse(why, whylen, "replay cache full (%" PRIu32 " nonces)", r->max_nonces);
    /* Out of memory is refused as a full cache would be: fail-open, the switch does not
     * happen and the connection stays on the overlay. */
    if (replay_reserve(r) != 0)
        return refuse(why, whylen, "replay cache full (%zu nonces)", r->count);
    set_insert(r, offer->nonce);
    /* ts <= now + window here, so only a clock near 2^64 ms could overflow: saturate. */
    heap_push(r, ts > UINT64_MAX - r->window_ms ? UINT64_MAX : ts + r->window_ms, offer->nonce);
    return NULL;
}
