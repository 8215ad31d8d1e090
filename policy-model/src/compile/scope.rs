//! What a model compiles: every endpoint of the cluster, or one node's.
//!
//! A node's agent enforces the policy of its own endpoints: it compiles their entries
//! (what its maps hold) and nothing for the other nodes' endpoints. What those policies
//! say about peers (identities, selectors, the ipcache, named ports of remote pods, FQDN
//! identities) and the L7 rule sets cover the whole cluster in every scope, so the
//! entries of a node-scoped model are exactly the whole-cluster model's entries of that
//! node's endpoints.
//!
//! A proxy that forwards a local pod's flow to a remote endpoint from the node's own
//! address (the DNS proxy) enforces that endpoint's ingress too, as the endpoint's node
//! only sees the node's address: [`Model::connection_policy`] builds the remote
//! endpoint's ingress policy for the flow on demand ([`Model::ingress_policy`]).
//! `ward policy trace`, conformance runs and the lab's own model compile the whole
//! cluster.

use std::ops::Index;
use std::sync::{Arc, LazyLock};

use crate::cluster::Pod;
use crate::l7::{L7Rules, L7Set};

use super::L7Id;

/// Which endpoints a model compiles policy for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every pod and node.
    #[default]
    Cluster,
    /// The pods on the named node and that node's host endpoint.
    Node(String),
}

impl Scope {
    /// The scope of an agent: its node, or the whole cluster when it has none.
    pub fn node(name: Option<&str>) -> Scope {
        match name {
            Some(n) => Scope::Node(n.to_string()),
            None => Scope::Cluster,
        }
    }

    /// Whether a pod's policy is compiled.
    pub fn covers_pod(&self, pod: &Pod) -> bool {
        match self {
            Scope::Cluster => true,
            Scope::Node(n) => pod.node.as_deref() == Some(n.as_str()),
        }
    }

    /// Whether a node's host policy is compiled.
    pub fn covers_node(&self, node: &str) -> bool {
        match self {
            Scope::Cluster => true,
            Scope::Node(n) => n == node,
        }
    }
}

/// The L7 rule sets of a model by [`L7Id`]: one for every `toPorts` entry with rules or a
/// TLS context.
/// Sets are shared between a model and its copies, and a policy change builds only the
/// sets of the policies it changed.
#[derive(Clone, Debug, Default)]
pub struct L7Sets {
    sets: Vec<Arc<L7Set>>,
}

impl L7Sets {
    /// Adds a set; returns its number.
    pub(super) fn push(&mut self, set: Arc<L7Set>) -> L7Id {
        self.sets.push(set);
        (self.sets.len() - 1) as L7Id
    }

    /// The set of a number, shared.
    pub(super) fn shared(&self, id: L7Id) -> Option<Arc<L7Set>> {
        self.sets.get(id as usize).cloned()
    }

    /// The set of a number (an [`L7Id`] as an index).
    pub fn get(&self, id: usize) -> Option<&L7Set> {
        self.sets.get(id).map(|s| &**s)
    }

    /// Every set, in number order.
    pub fn iter(&self) -> impl Iterator<Item = &L7Set> {
        self.sets.iter().map(|s| &**s)
    }

    pub fn len(&self) -> usize {
        self.sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Whether two sets of the same number are one shared set.
    pub fn same(&self, other: &L7Sets, id: usize) -> bool {
        match (self.sets.get(id), other.sets.get(id)) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// What an unknown number gives: no rule, so nothing is allowed (fail closed).
static NONE: LazyLock<L7Set> =
    LazyLock::new(|| L7Set::new(L7Rules::Http(Vec::new()), String::new()));

impl Index<usize> for L7Sets {
    type Output = L7Set;

    /// The set of a number (an unknown one allows nothing).
    fn index(&self, id: usize) -> &L7Set {
        self.sets.get(id).map_or(&NONE, |s| &**s)
    }
}
