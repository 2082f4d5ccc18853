# Which overlay connections may be switched at all: allow and deny rules from the router's
# config, enforced by the router on every SWITCH_REQ and every OFFER, never by the library.
#
# Why "either end" matching: a switch may start at the client or at the server (whichever end
# crosses the threshold first), and the two routers must reach the same decision from their
# own views of the tuple. A rule that matches either end of the connection is symmetric; a
# deny rule for a server port therefore keeps that service's connections on the overlay, from
# whichever side they are asked for.

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from shuntflow.wire import Endpoint, Tuple4

_ANY = ipaddress.IPv4Network("0.0.0.0/0")


class PolicyError(ValueError):
    """A rule that cannot be parsed; one line for the user."""


@dataclass(frozen=True)
class Rule:
    net: ipaddress.IPv4Network
    first_port: int
    last_port: int
    text: str

    @staticmethod
    def parse(text: str) -> Rule:
        """`CIDR`, `CIDR:PORT`, `CIDR:LOW-HIGH`, `*:PORT` or `:PORT` (any address)."""
        raw = text.strip()
        addr, sep, ports = raw.rpartition(":") if ":" in raw else (raw, "", "")
        try:
            net = _ANY if addr in ("", "*") else ipaddress.IPv4Network(addr, strict=False)
        except ValueError:
            why = f"{addr!r} is not an IPv4 address or CIDR"
            raise PolicyError(f"policy rule {text!r}: {why}") from None
        first, last = 0, 65535
        if sep:
            low, dash, high = ports.partition("-")
            try:
                first = int(low)
                last = int(high) if dash else first
            except ValueError:
                why = f"{ports!r} is not a port or range"
                raise PolicyError(f"policy rule {text!r}: {why}") from None
            if not 1 <= first <= last <= 65535:
                raise PolicyError(f"policy rule {text!r}: ports must be 1..65535, low <= high")
        elif addr in ("", "*"):
            raise PolicyError(f"policy rule {text!r}: give a CIDR, a port, or both")
        return Rule(net, first, last, raw)

    def matches_end(self, ep: Endpoint) -> bool:
        return ep.ip in self.net and self.first_port <= ep.port <= self.last_port

    def matches(self, t: Tuple4) -> bool:
        return self.matches_end(t.local) or self.matches_end(t.remote)


@dataclass(frozen=True)
class Policy:
    """Deny wins; an empty allow list allows everything not denied."""

    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()

    @staticmethod
    def parse(allow: tuple[str, ...], deny: tuple[str, ...]) -> Policy:
        return Policy(tuple(Rule.parse(r) for r in allow), tuple(Rule.parse(r) for r in deny))

    def refusal(self, t: Tuple4) -> str | None:
        """None if `t` may be switched, else the reason (names the rule)."""
        for rule in self.deny:
            if rule.matches(t):
                return f"policy: deny rule {rule.text}"
        if self.allow and not any(rule.matches(t) for rule in self.allow):
            return "policy: no allow rule matches"
        return None

    def describe(self) -> dict[str, list[str]]:
        return {"allow": [r.text for r in self.allow], "deny": [r.text for r in self.deny]}
