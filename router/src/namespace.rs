//! Room namespaces: a room-name prefix (`"typing:"`, `"notify:"`) with its
//! own options. A room belongs to the namespace with the longest prefix its
//! name starts with, or to the default namespace (the flags' values).
//!
//! # Invariants
//! - Every option is resolved when the table is built: a namespace that does
//!   not set an option has the default namespace's value, so a lookup is a
//!   prefix match and nothing else.
//! - The table is swapped whole ([`Namespaces::replace`], on SIGHUP): a
//!   session, a home or the API reads one table for one decision, and a
//!   change applies to the joins and publishes decided after it.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;

/// One namespace's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// The room-name prefix (`""` for the default namespace).
    pub prefix: Box<str>,
    /// Messages are not stored: acked as soon as sequenced (`"stored":false`),
    /// never waiting for the storage worker, and not in history.
    pub ephemeral: bool,
    /// Above this many users a room sends no presence events and answers
    /// presence with the count only (0: never the list, never events).
    pub presence_max_members: usize,
    /// Clients may publish (false: only the server API does).
    pub client_publish: bool,
    /// Only tokens whose `rooms` claim lists the room may join it (or read
    /// its history and presence); tokens without the claim and anonymous
    /// users may not.
    pub join_requires_claim: bool,
    /// Largest message body, in bytes.
    pub max_body_bytes: usize,
    /// Messages the store keeps per room (0: none; the seq still is).
    pub history_size: usize,
    /// A room's history is dropped this long after its last message.
    pub history_ttl: Duration,
    /// Publishes one connection may make per second to the namespace's
    /// rooms, together (`None`: only the connection's own frame limit).
    pub publish_rate: Option<Rate>,
}

/// A token bucket's rate: `per_s` a second, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_s: u32,
    pub burst: u32,
}

impl Namespace {
    /// The default namespace: today's behaviour, with these flags' values
    /// and the history flags' defaults (1000 messages for a day).
    pub fn default_with(presence_max_members: usize, max_body_bytes: usize) -> Namespace {
        Namespace {
            prefix: "".into(),
            ephemeral: false,
            presence_max_members,
            client_publish: true,
            join_requires_claim: false,
            max_body_bytes,
            history_size: 1000,
            history_ttl: Duration::from_secs(86_400),
            publish_rate: None,
        }
    }
}

/// Every namespace of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Longest prefix first.
    spaces: Vec<Namespace>,
    default: Namespace,
}

impl Table {
    /// A table of `spaces` over `default`; prefixes must differ.
    pub fn new(default: Namespace, mut spaces: Vec<Namespace>) -> Table {
        spaces.sort_by_key(|n| std::cmp::Reverse(n.prefix.len()));
        Table { spaces, default }
    }

    /// The namespace `room` belongs to.
    pub fn of(&self, room: &str) -> &Namespace {
        self.spaces
            .iter()
            .find(|n| room.starts_with(&*n.prefix))
            .unwrap_or(&self.default)
    }

    pub fn default_namespace(&self) -> &Namespace {
        &self.default
    }

    /// The namespaces besides the default one, longest prefix first.
    pub fn spaces(&self) -> &[Namespace] {
        &self.spaces
    }
}

/// The node's namespaces, shared by its shards, its storage worker and its
/// API thread; replaced whole on SIGHUP.
#[derive(Debug, Clone)]
pub struct Namespaces(Arc<ArcSwap<Table>>);

impl Namespaces {
    pub fn new(table: Table) -> Namespaces {
        Namespaces(Arc::new(ArcSwap::from_pointee(table)))
    }

    /// Only the default namespace (no `[namespaces]` configured).
    pub fn only_default(default: Namespace) -> Namespaces {
        Namespaces::new(Table::new(default, Vec::new()))
    }

    /// Only a default namespace that keeps `size` messages per room for
    /// `ttl` (a store on its own: tools and tests).
    pub fn keeping(size: usize, ttl: Duration) -> Namespaces {
        Namespaces::only_default(Namespace {
            history_size: size,
            history_ttl: ttl,
            ..Namespace::default_with(1000, 1 << 16)
        })
    }

    /// The table as it stands.
    pub fn load(&self) -> arc_swap::Guard<Arc<Table>> {
        self.0.load()
    }

    /// The options of `room`'s namespace as they stand.
    pub fn of(&self, room: &str) -> Namespace {
        self.load().of(room).clone()
    }

    pub fn replace(&self, table: Table) {
        self.0.store(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(prefix: &str) -> Namespace {
        Namespace {
            prefix: prefix.into(),
            ephemeral: true,
            ..Namespace::default_with(1000, 64)
        }
    }

    #[test]
    fn the_longest_prefix_wins_and_the_rest_is_default() {
        let t = Table::new(
            Namespace::default_with(1000, 64),
            vec![ns("typing:"), ns("typing:admin:"), ns("t")],
        );
        assert_eq!(&*t.of("typing:admin:x").prefix, "typing:admin:");
        assert_eq!(&*t.of("typing:lobby").prefix, "typing:");
        assert_eq!(&*t.of("team").prefix, "t");
        assert_eq!(&*t.of("lobby").prefix, "");
        assert!(!t.of("lobby").ephemeral);
        assert_eq!(t.spaces().len(), 3);
    }

    #[test]
    fn a_replaced_table_applies_to_the_next_lookup() {
        let n = Namespaces::only_default(Namespace::default_with(1000, 64));
        let held = n.clone();
        assert!(!n.of("typing:x").ephemeral);
        held.replace(Table::new(
            Namespace::default_with(1000, 64),
            vec![ns("typing:")],
        ));
        assert!(n.of("typing:x").ephemeral);
    }
}
