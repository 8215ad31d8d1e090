//! Which endpoint sent a query and what its policy allows towards the server it asked.
//! The compiled model is an immutable snapshot; a new one is swapped in atomically and
//! applies from the next query on.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

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
}

impl PolicyStore {
    pub fn new(model: Arc<Model>, scope: Scope) -> PolicyStore {
        PolicyStore {
            current: RwLock::new(model),
            scope,
        }
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
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The policy for a query from `client` to `server` over `transport`.
    pub fn resolve(
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
                    endpoint: model.endpoint_of_ip(client).map(|e| e.name.clone()),
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
                        server.port(),
                    ),
                    // The endpoint left the model: fail closed.
                    None => SidePolicy {
                        direction: Direction::Egress,
                        endpoint: name.clone(),
                        decision: SideDecision::Deny {
                            reason: format!("endpoint {name} is not in the cluster"),
                        },
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
