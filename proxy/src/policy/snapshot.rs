//! Snapshots and per-connection resolution.
//!
//! The rule sets for a connection are resolved once, when it is accepted, and re-resolved
//! when a request finds a newer snapshot generation than the one they came from: a policy
//! change applies to the next request, also on kept-alive HTTP/1.1 and HTTP/2
//! connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderName;
use policy_model::compile::IpOwner;
use policy_model::flow::{ConnectionPolicy, SideDecision, SidePolicy};
use policy_model::l7::L7Rules;
use policy_model::tls::TlsSession;
use policy_model::{Direction, Model, Protocol};

use crate::tls::SessionKey;

/// One compiled model with its generation (strictly increasing per store). The model is
/// shared (`Arc`) with whoever published it (the agent hands the same model to the DNS
/// proxy and its status), so publishing never copies it.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub model: Arc<Model>,
}

/// The current snapshot. Readers never block; `publish` swaps atomically.
#[derive(Debug)]
pub struct PolicyStore {
    current: ArcSwap<Snapshot>,
    next: AtomicU64,
    /// The generation in force, for what must react to a change without a request
    /// (upgraded tunnels).
    changes: tokio::sync::watch::Sender<u64>,
}

impl PolicyStore {
    pub fn new(model: impl Into<Arc<Model>>) -> PolicyStore {
        PolicyStore {
            current: ArcSwap::from_pointee(Snapshot {
                generation: 1,
                model: model.into(),
            }),
            next: AtomicU64::new(2),
            changes: tokio::sync::watch::Sender::new(1),
        }
    }

    /// Installs a new model (owned, or shared without a copy); returns its generation.
    pub fn publish(&self, model: impl Into<Arc<Model>>) -> u64 {
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        self.current.store(Arc::new(Snapshot {
            generation,
            model: model.into(),
        }));
        self.changes.send_replace(generation);
        generation
    }

    /// Notified after every `publish`.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn generation(&self) -> u64 {
        self.current.load().generation
    }
}

/// How the rules of a connection are found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Node proxy: both sides of the connection, from the client's IP and the original
    /// destination (`Model::connection_policy`), as seen from `node`.
    Transparent { node: Option<String> },
    /// Standalone reverse proxy in front of one workload: that endpoint's rules in one
    /// direction, the peer being the client (ingress) or the upstream (egress), for
    /// `port` (the policies' port; None: the upstream's port).
    Standalone {
        endpoint: String,
        direction: Direction,
        port: Option<u16>,
    },
}

/// The resolved policy of one connection, tagged with the generation it came from.
#[derive(Clone, Debug)]
pub struct ConnPolicy {
    pub generation: u64,
    pub policy: Arc<ConnectionPolicy>,
    /// Direction for logs and metrics: egress when the client is a local endpoint.
    pub direction: Direction,
    pub source: Peer,
    pub destination: Peer,
    /// Every header name (lower case) the connection's HTTP rules look at (`headers`,
    /// `headerMatches`): a `Connection` option may not remove these.
    pub rule_headers: Vec<HeaderName>,
}

/// What the snapshot knows of one side of a connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Numeric security identity.
    pub identity: u32,
    /// `ns/pod`, `node:NAME`, or None (outside the cluster).
    pub endpoint: Option<String>,
}

impl Mode {
    /// Resolves the policy of a connection from `peer` to `orig_dst` in `snap`.
    pub fn resolve(&self, snap: &Snapshot, peer: SocketAddr, orig_dst: SocketAddr) -> ConnPolicy {
        let m = &snap.model;
        let (policy, direction) = match self {
            Mode::Transparent { node } => {
                let p = m.connection_policy(
                    peer.ip(),
                    orig_dst.ip(),
                    Protocol::Tcp,
                    orig_dst.port(),
                    node.as_deref(),
                );
                let dir = if p.sides.iter().any(|s| s.direction == Direction::Egress) {
                    Direction::Egress
                } else {
                    Direction::Ingress
                };
                (p, dir)
            }
            Mode::Standalone {
                endpoint,
                direction,
                port,
            } => {
                let port = port.unwrap_or(orig_dst.port());
                let remote = match direction {
                    Direction::Ingress => peer,
                    Direction::Egress => orig_dst,
                };
                let side = match m.pod_endpoint(endpoint) {
                    Some(ep) => {
                        let peer_id = m.identity_of(remote.ip(), None);
                        m.side_policy(ep, *direction, peer_id, Protocol::Tcp, port)
                    }
                    None => SidePolicy {
                        direction: *direction,
                        endpoint: endpoint.clone(),
                        decision: SideDecision::Deny {
                            reason: format!("endpoint {endpoint} is not in the cluster state"),
                        },
                        tls: None,
                    },
                };
                (ConnectionPolicy { sides: vec![side] }, *direction)
            }
        };
        let node = match self {
            Mode::Transparent { node } => node.as_deref(),
            Mode::Standalone { .. } => None,
        };
        ConnPolicy {
            generation: snap.generation,
            rule_headers: rule_headers(m, &policy),
            policy: Arc::new(policy),
            direction,
            source: describe(m, peer, node),
            destination: describe(m, orig_dst, node),
        }
    }
}

impl ConnPolicy {
    /// The same connection with `policy` for its requests (an intercepted session's).
    pub fn with_policy(mut self, model: &Model, policy: ConnectionPolicy) -> ConnPolicy {
        self.rule_headers = rule_headers(model, &policy);
        self.policy = Arc::new(policy);
        self
    }

    /// The policy of the requests of an intercepted session: the session decided again
    /// by its SNI on `model`. When that no longer intercepts with the contexts the
    /// session was set up with, every further request is denied.
    pub fn intercepted(mut self, model: &Model, s: &SessionKey) -> ConnPolicy {
        let (direction, endpoint) = self
            .policy
            .sides
            .first()
            .map_or((self.direction, String::new()), |s| {
                (s.direction, s.endpoint.clone())
            });
        let denial = match model.tls_session(&self.policy, s.sni.as_deref()) {
            TlsSession::Intercept(i)
                if i.terminating == s.terminating && i.originating == s.originating =>
            {
                self.rule_headers = rule_headers(model, &i.policy);
                self.policy = Arc::new(i.policy);
                return self;
            }
            TlsSession::Intercept(_) => {
                "the session's rule now names other TLS material: new connections use it".into()
            }
            TlsSession::Splice { .. } => "the session is no longer intercepted".into(),
            TlsSession::Reset { reason, .. } => {
                let here = format!("{direction} of {endpoint}: ");
                reason.strip_prefix(&here).unwrap_or(&reason).to_string()
            }
        };
        self.policy = Arc::new(ConnectionPolicy {
            sides: vec![SidePolicy {
                direction,
                endpoint,
                decision: SideDecision::Deny { reason: denial },
                tls: None,
            }],
        });
        self.rule_headers = Vec::new();
        self
    }
}

/// The header names the HTTP rules of `p` name, once each.
fn rule_headers(m: &Model, p: &ConnectionPolicy) -> Vec<HeaderName> {
    let mut out: Vec<HeaderName> = Vec::new();
    for side in &p.sides {
        let SideDecision::Rules { sets, .. } = &side.decision else {
            continue;
        };
        for s in sets {
            let Some(L7Rules::Http(rules)) = m.l7.get(s.l7 as usize).map(|set| &set.rules) else {
                continue;
            };
            for r in rules {
                let names = r.headers.iter().map(|h| h.name.as_str());
                let matches = r.header_matches.iter().map(|h| h.name.as_str());
                for n in names.chain(matches) {
                    if let Ok(n) = HeaderName::from_bytes(n.as_bytes()) {
                        if !out.contains(&n) {
                            out.push(n);
                        }
                    }
                }
            }
        }
    }
    out
}

fn describe(m: &Model, addr: SocketAddr, node: Option<&str>) -> Peer {
    let idx = m.identity_of(addr.ip(), node);
    let endpoint = match m.owner(addr.ip()) {
        IpOwner::Pod(p) => m.cluster.pods.get(p).map(|p| p.id()),
        IpOwner::Node(n) => m.cluster.nodes.get(n).map(|n| format!("node:{}", n.name)),
        IpOwner::World(_) => None,
    };
    Peer {
        identity: m.identities.get(idx).id,
        endpoint,
    }
}
