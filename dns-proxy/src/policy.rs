//! Which endpoint sent a query and what its policy allows towards the server it asked.
//! The compiled model is an immutable snapshot; a new one is swapped in atomically and
//! applies from the next query on.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};

use policy_model::flow::{ConnectionPolicy, SideDecision, SidePolicy};
use policy_model::{Direction, Model, Protocol};

use crate::proxy::Transport;

/// Whose queries the proxy sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Transparent node proxy: the client is the endpoint that owns the source IP; both
    /// the client's egress and the server's ingress (when it is an endpoint) apply.
    Node { node: Option<String> },
    /// Standalone forwarder for one endpoint (`ns/pod`), whatever the source address.
    Endpoint(String),
}

/// The policy of one query's connection.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// `ns/pod` (or `node:NAME`) of the client; None when it is no endpoint.
    pub endpoint: Option<String>,
    pub conn: ConnectionPolicy,
}

/// The current model, swapped atomically.
pub struct PolicyStore {
    current: RwLock<Arc<Model>>,
    scope: Scope,
    /// Resolved policies of the model they were resolved with: a query's connection
    /// policy depends only on (client IP in node scope, server, transport) and the model,
    /// so it is computed once per model instead of once per query.
    resolved: Mutex<ResolvedCache>,
    /// In endpoint scope: the port the policy names for the server, checked instead of
    /// the port the server really listens on (`ward dns-proxy --port`).
    port: Option<u16>,
}

/// Client IP (node scope only), server, transport.
type ResolvedKey = (Option<IpAddr>, SocketAddr, Transport);

/// Connections resolved with one model; emptied when another model is asked about.
struct ResolvedCache {
    model: Option<Arc<Model>>,
    map: HashMap<ResolvedKey, Arc<Resolved>>,
}

/// Resolved connections kept per model; past it the cache starts over (many clients in
/// node scope), which costs a resolve per query, never a wrong answer.
const RESOLVED_LIMIT: usize = 4096;

impl PolicyStore {
    pub fn new(model: Arc<Model>, scope: Scope) -> PolicyStore {
        PolicyStore {
            current: RwLock::new(model),
            scope,
            resolved: Mutex::new(ResolvedCache {
                model: None,
                map: HashMap::new(),
            }),
            port: None,
        }
    }

    /// In endpoint scope, checks rules against `port` instead of the server's own port
    /// (a standalone proxy whose upstream listens elsewhere than the policy says).
    pub fn set_policy_port(&mut self, port: Option<u16>) {
        self.port = port;
    }

    pub fn current(&self) -> Arc<Model> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn swap(&self, model: Arc<Model>) {
        match self.current.write() {
            Ok(mut g) => *g = model,
            Err(poisoned) => *poisoned.into_inner() = model,
        }
        // The old model's resolved connections are of no further use.
        let mut cache = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        cache.model = None;
        cache.map.clear();
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The policy for a query from `client` to `server` over `transport`, from the cache
    /// of `model`'s resolved connections.
    pub fn resolve(
        &self,
        model: &Arc<Model>,
        client: IpAddr,
        server: SocketAddr,
        transport: Transport,
    ) -> Arc<Resolved> {
        let key = match self.scope {
            Scope::Node { .. } => (Some(client), server, transport),
            Scope::Endpoint(_) => (None, server, transport),
        };
        let mut cache = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        if !cache.model.as_ref().is_some_and(|m| Arc::ptr_eq(m, model)) {
            // Entries of another model: never reused (the cache holds that model, so its
            // address cannot come back for a new one while entries refer to it).
            cache.map.clear();
            cache.model = Some(model.clone());
        }
        if let Some(r) = cache.map.get(&key) {
            return r.clone();
        }
        let r = Arc::new(self.resolve_uncached(model, client, server, transport));
        if cache.map.len() >= RESOLVED_LIMIT {
            cache.map.clear();
        }
        cache.map.insert(key, r.clone());
        r
    }

    /// The policy for a query from `client` to `server` over `transport`, computed.
    pub fn resolve_uncached(
        &self,
        model: &Model,
        client: IpAddr,
        server: SocketAddr,
        transport: Transport,
    ) -> Resolved {
        let proto = match transport {
            Transport::Udp => Protocol::Udp,
            Transport::Tcp => Protocol::Tcp,
        };
        match &self.scope {
            Scope::Node { node } => {
                let conn = model.connection_policy(
                    client,
                    server.ip(),
                    proto,
                    server.port(),
                    node.as_deref(),
                );
                Resolved {
                    endpoint: model.endpoint_name_of_ip(client),
                    conn,
                }
            }
            Scope::Endpoint(name) => {
                let side = match model.pod_endpoint(name) {
                    Some(ep) => model.side_policy(
                        ep,
                        Direction::Egress,
                        model.identity_of(server.ip(), None),
                        proto,
                        self.port.unwrap_or(server.port()),
                    ),
                    // The endpoint left the model: fail closed.
                    None => SidePolicy {
                        direction: Direction::Egress,
                        endpoint: name.clone(),
                        decision: SideDecision::Deny {
                            reason: format!("endpoint {name} is not in the cluster"),
                        },
                        tls: None,
                    },
                };
                Resolved {
                    endpoint: Some(name.clone()),
                    conn: ConnectionPolicy { sides: vec![side] },
                }
            }
        }
    }
}
