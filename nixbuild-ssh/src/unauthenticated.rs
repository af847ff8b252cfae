//! The budget of unauthenticated connections (pure: no sockets, no clock), in the spirit of
//! OpenSSH's `MaxStartups` and `PerSourceMaxStartups`.
//!
//! A connection holds a place from the moment it is accepted until it authenticates or ends.
//! There are `max_total` places, and one source holds at most `max_per_source` of them (an
//! IPv4 address, or an IPv6 /64, which one machine usually has whole). A newcomer from a
//! source at its limit is refused. A newcomer when every place is taken is not refused,
//! since that would let whoever holds the places lock everyone out: it is admitted, and the
//! oldest connection of the source holding the most places is evicted (among sources holding
//! as many, the one whose oldest connection is the oldest).
//!
//! So an attacker who holds connections open can never keep out an honest client that
//! authenticates quickly: a newcomer is always admitted unless its own source is full, and
//! it is the youngest, the last to be evicted. To push it out before it authenticates, an
//! attacker must open `max_total` new connections in that time, from more than one source.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Where connections come from, as far as the per-source limit is concerned: an IPv4
/// address, or the /64 prefix of an IPv6 address (an IPv4-mapped IPv6 address is IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// An IPv4 address.
    V4(Ipv4Addr),
    /// An IPv6 address with its last 64 bits zero.
    V6(Ipv6Addr),
}

impl Source {
    /// The source `ip` counts against.
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => Source::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
            },
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::V4(v4) => write!(f, "{v4}"),
            Source::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// A place in the budget, held by one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

/// A connection evicted to make room for a newcomer.
#[derive(Debug, PartialEq, Eq)]
pub struct Evicted<T> {
    /// Its place, now free.
    pub ticket: Ticket,
    /// Its source.
    pub source: Source,
    /// Places its source held before the eviction (the most of any source).
    pub source_held: usize,
    /// What was admitted with it.
    pub payload: T,
}

/// What happens to a newcomer.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<T> {
    /// It holds a place.
    Admitted(Ticket),
    /// It holds a place; every place was taken, so `evicted` lost its own.
    AdmittedEvicting {
        /// The newcomer's place.
        ticket: Ticket,
        /// The connection that must now be closed.
        evicted: Evicted<T>,
    },
    /// Its source holds its maximum of places already: close it.
    RefusedPerSource {
        /// The source.
        source: Source,
        /// Places the source holds.
        held: usize,
    },
}

/// The places of unauthenticated connections, each with a payload `T` (what the caller
/// needs to close an evicted connection).
#[derive(Debug)]
pub struct UnauthenticatedBudget<T> {
    max_total: usize,
    max_per_source: usize,
    /// Admissions so far: tickets in admission order, so a smaller one is older.
    next: u64,
    /// Places held, oldest first.
    held: BTreeMap<Ticket, (Source, T)>,
    /// Places held per source (no zero entries).
    per_source: HashMap<Source, usize>,
}

impl<T> UnauthenticatedBudget<T> {
    /// A budget of `max_total` places, at most `max_per_source` for one source (each at
    /// least 1; 0 is taken as 1).
    pub fn new(max_total: usize, max_per_source: usize) -> Self {
        UnauthenticatedBudget {
            max_total: max_total.max(1),
            max_per_source: max_per_source.max(1),
            next: 0,
            held: BTreeMap::new(),
            per_source: HashMap::new(),
        }
    }

    /// Places held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no place is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Places held by `ip`'s source.
    pub fn held_by(&self, ip: IpAddr) -> usize {
        self.per_source.get(&Source::of(ip)).copied().unwrap_or(0)
    }

    /// Admits a connection from `ip`, evicting one when every place is taken, or refuses it
    /// when its source holds its maximum already.
    pub fn admit(&mut self, ip: IpAddr, payload: T) -> Admission<T> {
        let source = Source::of(ip);
        let held = self.per_source.get(&source).copied().unwrap_or(0);
        if held >= self.max_per_source {
            return Admission::RefusedPerSource { source, held };
        }
        let evicted = if self.held.len() >= self.max_total {
            self.evict()
        } else {
            None
        };
        let ticket = Ticket(self.next);
        self.next += 1;
        self.held.insert(ticket, (source, payload));
        *self.per_source.entry(source).or_insert(0) += 1;
        match evicted {
            Some(evicted) => Admission::AdmittedEvicting { ticket, evicted },
            None => Admission::Admitted(ticket),
        }
    }

    /// Frees `ticket`'s place (its connection authenticated or ended) and returns its
    /// payload; `None` when it holds none (evicted, or freed already).
    pub fn release(&mut self, ticket: Ticket) -> Option<T> {
        let (source, payload) = self.held.remove(&ticket)?;
        self.forget(source);
        Some(payload)
    }

    /// Frees the oldest place of the source holding the most.
    fn evict(&mut self) -> Option<Evicted<T>> {
        let most = self.per_source.values().copied().max()?;
        // The first in age order whose source holds the most is that source's oldest, and
        // of the sources holding as many, the one with the oldest connection.
        let ticket = self
            .held
            .iter()
            .find(|(_, (source, _))| self.per_source.get(source) == Some(&most))
            .map(|(ticket, _)| *ticket)?;
        let (source, payload) = self.held.remove(&ticket)?;
        self.forget(source);
        Some(Evicted {
            ticket,
            source,
            source_held: most,
            payload,
        })
    }

    fn forget(&mut self, source: Source) {
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// What a test expects of one admission: admitted, admitted evicting the connection
    /// admitted under this name, or refused for its source.
    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        In,
        Evicting(&'static str),
        Refused,
    }
    use Outcome::*;

    /// Admits each (name, address) in turn and checks the outcome; returns the tickets by
    /// name for the connections still admitted.
    fn run(
        budget: &mut UnauthenticatedBudget<&'static str>,
        steps: &[(&'static str, &str, Outcome)],
    ) -> HashMap<&'static str, Ticket> {
        let mut tickets = HashMap::new();
        for (i, (name, addr, expected)) in steps.iter().enumerate() {
            let got = match budget.admit(ip(addr), name) {
                Admission::Admitted(t) => {
                    tickets.insert(*name, t);
                    In
                }
                Admission::AdmittedEvicting { ticket, evicted } => {
                    tickets.insert(*name, ticket);
                    tickets.remove(evicted.payload);
                    Evicting(evicted.payload)
                }
                Admission::RefusedPerSource { .. } => Refused,
            };
            assert_eq!(&got, expected, "step {i}: {name} from {addr}");
        }
        tickets
    }

    #[test]
    fn sources_ipv4_by_address_ipv6_by_64_prefix() {
        let table = [
            ("127.0.0.1", "127.0.0.1"),
            ("::ffff:10.1.2.3", "10.1.2.3"),
            ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
            ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
            ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
            ("::1", "::/64"),
        ];
        for (addr, source) in table {
            assert_eq!(Source::of(ip(addr)).to_string(), source, "{addr}");
        }
        assert_eq!(
            Source::of(ip("2001:db8::1")),
            Source::of(ip("2001:db8::ffff:1"))
        );
        assert_ne!(Source::of(ip("10.0.0.1")), Source::of(ip("10.0.0.2")));
    }

    #[test]
    fn a_source_at_its_limit_is_refused_others_are_not() {
        let mut b = UnauthenticatedBudget::new(10, 2);
        run(
            &mut b,
            &[
                ("a1", "10.0.0.1", In),
                ("a2", "10.0.0.1", In),
                ("a3", "10.0.0.1", Refused),
                ("b1", "10.0.0.2", In),
                ("a4", "::ffff:10.0.0.1", Refused),
            ],
        );
        assert_eq!(b.len(), 3);
        assert_eq!(b.held_by(ip("10.0.0.1")), 2);
        assert_eq!(
            b.admit(ip("10.0.0.1"), "x"),
            Admission::RefusedPerSource {
                source: Source::of(ip("10.0.0.1")),
                held: 2
            }
        );
    }

    #[test]
    fn ipv6_addresses_of_one_64_share_a_limit() {
        let mut b = UnauthenticatedBudget::new(10, 2);
        run(
            &mut b,
            &[
                ("a", "2001:db8:0:1::1", In),
                ("b", "2001:db8:0:1::2", In),
                ("c", "2001:db8:0:1:ffff:ffff:ffff:ffff", Refused),
                ("d", "2001:db8:0:2::1", In),
            ],
        );
    }

    #[test]
    fn when_full_the_oldest_of_the_source_holding_most_is_evicted() {
        let mut b = UnauthenticatedBudget::new(5, 3);
        run(
            &mut b,
            &[
                ("x1", "10.0.0.9", In),
                ("a1", "10.0.0.1", In),
                ("a2", "10.0.0.1", In),
                ("b1", "10.0.0.2", In),
                ("a3", "10.0.0.1", In),
                // Full: 10.0.0.1 holds 3, the most; its oldest goes, not the older x1.
                ("c1", "10.0.0.3", Evicting("a1")),
                // 10.0.0.1 holds 2 now, still the most.
                ("d1", "10.0.0.4", Evicting("a2")),
                // Every source holds 1: the oldest of all goes.
                ("e1", "10.0.0.5", Evicting("x1")),
                ("f1", "10.0.0.6", Evicting("b1")),
                ("g1", "10.0.0.7", Evicting("a3")),
                ("h1", "10.0.0.8", Evicting("c1")),
            ],
        );
        assert_eq!(b.len(), 5);
    }

    #[test]
    fn among_sources_holding_as_many_the_one_with_the_oldest_goes_first() {
        let mut b = UnauthenticatedBudget::new(4, 2);
        run(
            &mut b,
            &[
                ("b1", "10.0.0.2", In),
                ("a1", "10.0.0.1", In),
                ("a2", "10.0.0.1", In),
                ("b2", "10.0.0.2", In),
                ("c1", "10.0.0.3", Evicting("b1")),
                ("d1", "10.0.0.4", Evicting("a1")),
            ],
        );
    }

    #[test]
    fn the_per_source_limit_comes_before_eviction() {
        let mut b = UnauthenticatedBudget::new(2, 1);
        run(
            &mut b,
            &[
                ("a1", "10.0.0.1", In),
                ("b1", "10.0.0.2", In),
                // Full, but a's source is at its limit: refused, nobody evicted.
                ("a2", "10.0.0.1", Refused),
                ("c1", "10.0.0.3", Evicting("a1")),
                // a's place went with the eviction.
                ("a3", "10.0.0.1", Evicting("b1")),
            ],
        );
    }

    #[test]
    fn release_on_authentication_or_close_frees_the_place_once() {
        let mut b = UnauthenticatedBudget::new(2, 2);
        let t = run(&mut b, &[("a1", "10.0.0.1", In), ("a2", "10.0.0.1", In)]);
        assert_eq!(b.release(t["a1"]), Some("a1"));
        assert_eq!(b.release(t["a1"]), None, "a second release frees nothing");
        assert_eq!(b.len(), 1);
        assert_eq!(b.held_by(ip("10.0.0.1")), 1);
        // The freed place is taken without evicting anyone.
        let t2 = run(&mut b, &[("a3", "10.0.0.1", In)]);
        assert_eq!(b.release(t["a2"]), Some("a2"));
        assert_eq!(b.release(t2["a3"]), Some("a3"));
        assert!(b.is_empty());
        assert_eq!(b.held_by(ip("10.0.0.1")), 0);
    }

    #[test]
    fn an_evicted_connection_has_nothing_to_release() {
        let mut b = UnauthenticatedBudget::new(1, 1);
        let first = match b.admit(ip("10.0.0.1"), "a") {
            Admission::Admitted(t) => t,
            other => panic!("{other:?}"),
        };
        match b.admit(ip("10.0.0.2"), "b") {
            Admission::AdmittedEvicting { evicted, .. } => {
                assert_eq!(evicted.ticket, first);
                assert_eq!(evicted.source, Source::of(ip("10.0.0.1")));
                assert_eq!(evicted.source_held, 1);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(b.release(first), None);
        assert_eq!(b.len(), 1);
    }

    /// The attack of issue 14: sources holding every place, one of them at its limit, and a
    /// newcomer from elsewhere is admitted each time while whatever it evicts is an
    /// attacker's. Held connections can never push the newcomer out: it is the youngest.
    #[test]
    fn held_connections_never_keep_a_newcomer_out() {
        let mut b = UnauthenticatedBudget::new(64, 8);
        let mut attackers = 0;
        for i in 0..1000u32 {
            let addr = if i % 10 == 0 {
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3 + (i / 10 % 100) as u8))
            } else {
                ip("127.0.0.2")
            };
            if !matches!(
                b.admit(addr, "attacker"),
                Admission::RefusedPerSource { .. }
            ) {
                attackers += 1;
            }
        }
        assert!(attackers > 64);
        assert_eq!(b.len(), 64);
        assert!(b.held_by(ip("127.0.0.2")) <= 8);
        for round in 0..3u8 {
            // The attacker takes the place back between honest connections.
            if b.len() < 64 {
                assert!(matches!(
                    b.admit(
                        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 200 + round)),
                        "attacker"
                    ),
                    Admission::Admitted(_)
                ));
            }
            let honest = match b.admit(ip("127.0.0.1"), "honest") {
                Admission::AdmittedEvicting { ticket, evicted } => {
                    assert_eq!(evicted.payload, "attacker");
                    ticket
                }
                other => panic!("the honest client was not admitted: {other:?}"),
            };
            // Authenticated: its place is still its own.
            assert_eq!(b.release(honest), Some("honest"));
        }
    }
}
