// SPDX-License-Identifier: GPL-2.0
// The socket guard: a TCP socket the router hands to a container can only ever be that one
// connection. The router sets SO_MARK = guard_mark on it before handing it over; a container
// cannot change the mark (it belongs to the host's network namespace, CAP_NET_ADMIN there).
// These programs refuse connect(), bind() and listen() on any socket with that mark, whoever
// calls them, so a disconnected host socket (connect(AF_UNSPEC)) cannot be pointed at another
// host-network address, bound to one, or turned into a listener in the host namespace.
//
// Why cgroup programs only: they run in the kernel's own connect/bind paths (TCP Fast Open's
// sendmsg included), attached at the cgroup v2 root, and need neither the BPF LSM nor BTF-typed
// tracing programs, which some kernels refuse to load (this project's CI VM answers EPERM to
// every lsm/fentry/fmod_ret program). listen() has no cgroup hook, so a marked socket may still
// enter LISTEN, but it is deaf: the ingress program drops every packet addressed to a marked
// listener, so no connection ever reaches it.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

// Set by the loader before the programs are loaded (read-only once loaded).
const volatile __u32 guard_mark = 0;

// What was refused, read by the router (memory-mapped .bss) for its status and log.
__u64 refused_connect = 0;
__u64 refused_bind = 0;
__u64 dropped_listen = 0;

static __always_inline int marked(struct bpf_sock *sk)
{
    return sk && guard_mark && sk->mark == guard_mark;
}

SEC("cgroup/connect4")
int guard_connect4(struct bpf_sock_addr *ctx)
{
    if (!marked(ctx->sk))
        return 1;
    __sync_fetch_and_add(&refused_connect, 1);
    return 0;  // the kernel fails connect() with EPERM
}

SEC("cgroup/bind4")
int guard_bind4(struct bpf_sock_addr *ctx)
{
    if (!marked(ctx->sk))
        return 1;
    __sync_fetch_and_add(&refused_bind, 1);
    return 0;  // bind() fails with EPERM
}

SEC("cgroup_skb/ingress")
int guard_ingress(struct __sk_buff *skb)
{
    struct bpf_sock *sk = skb->sk;

    if (!sk)
        return 1;
    sk = bpf_sk_fullsock(sk);
    if (!sk || !marked(sk))
        return 1;
    if (sk->state != BPF_TCP_LISTEN)
        return 1;
    __sync_fetch_and_add(&dropped_listen, 1);
    return 0;  // dropped before TCP sees it
}

char LICENSE[] SEC("license") = "GPL";
