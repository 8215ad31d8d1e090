//! What a model compiles: every endpoint of the cluster, or one node's.
//!
//! A node's agent enforces the policy of its own endpoints only: their map entries and
//! their L7/DNS rule sets. What those policies say about peers (identities, selectors,
//! the ipcache, named ports of remote pods, FQDN identities) covers the whole cluster in
//! every scope, so the entries of a node-scoped model are exactly the whole-cluster
//! model's entries of that node's endpoints. `ward policy trace`, conformance runs and the
//! lab's own model compile the whole cluster.

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

/// The L7 rule sets of a model by [`L7Id`]. Every `toPorts` entry with rules has a
/// number; its set is built when an endpoint in scope uses it. Sets are shared between a
/// model and its copies.
#[derive(Clone, Debug, Default)]
pub struct L7Sets {
    sets: Vec<Option<Arc<L7Set>>>,
}

/// What an unbuilt number gives: no rule, so nothing is allowed. Entries only carry
/// numbers whose set is built; this keeps a mistake closed.
static NONE: LazyLock<L7Set> =
    LazyLock::new(|| L7Set::new(L7Rules::Http(Vec::new()), String::new()));

impl L7Sets {
    /// Takes the next number (its set not built yet).
    pub(super) fn number(&mut self) -> L7Id {
        self.sets.push(None);
        (self.sets.len() - 1) as L7Id
    }

    pub(super) fn is_built(&self, id: L7Id) -> bool {
        self.sets.get(id as usize).is_some_and(Option::is_some)
    }

    pub(super) fn build(&mut self, id: L7Id, set: L7Set) {
        if let Some(slot) = self.sets.get_mut(id as usize) {
            *slot = Some(Arc::new(set));
        }
    }

    /// The set of a number, shared (None: not built).
    pub(super) fn shared(&self, id: L7Id) -> Option<Arc<L7Set>> {
        self.sets.get(id as usize).cloned().flatten()
    }

    /// Puts a built set under a number.
    pub(super) fn put(&mut self, id: L7Id, set: Arc<L7Set>) {
        if let Some(slot) = self.sets.get_mut(id as usize) {
            *slot = Some(set);
        }
    }

    /// The set of a number (an [`L7Id`] as an index), if built.
    pub fn get(&self, id: usize) -> Option<&L7Set> {
        self.sets.get(id).and_then(|s| s.as_deref())
    }

    /// How many numbers there are (built or not).
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// How many sets are built.
    pub fn built(&self) -> usize {
        self.sets.iter().filter(|s| s.is_some()).count()
    }
}

impl Index<usize> for L7Sets {
    type Output = L7Set;

    /// The set of a number (an unbuilt or unknown one allows nothing).
    fn index(&self, id: usize) -> &L7Set {
        self.sets
            .get(id)
            .and_then(|s| s.as_deref())
            .unwrap_or(&NONE)
    }
}
