//! Calico's ordered tiers in the compiled model: the tier table (Tier objects, the
//! implicit `default` tier, and tiers that policies name without an object), the one order
//! in which every policy is evaluated, and per endpoint and direction the tiers that
//! select it. The meaning is documented in `api::calico`.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::api::calico::{
    DEFAULT_TIER, DEFAULT_TIER_ORDER, NAMESPACE_TIER_NAME, NAMESPACE_TIER_ORDER,
};
use crate::policy::{Action, Calico, Policy, Tier};

/// One Calico tier, in evaluation order in [`super::Model::calico_tiers`].
#[derive(Clone, Debug, PartialEq)]
pub struct CalicoTier {
    pub name: String,
    /// None: after every ordered tier.
    pub order: Option<f64>,
    /// What a flow gets that reaches the end of the tier undecided: `Deny` or `Pass`.
    pub default_action: Action,
    /// Whether a Tier object defines it (the `default` tier always exists). Tiers that
    /// policies name without one come after every defined tier and end in `Deny`.
    pub defined: bool,
}

/// A Calico tier that selects an endpoint in one direction.
#[derive(Clone, Debug, PartialEq)]
pub struct TierEnd {
    /// Index into [`super::Model::calico_tiers`]; the tier's entries carry it in
    /// `rank.0` (the namespace tier's entries belong to the `default` tier).
    pub tier: u32,
    /// `Deny` or `Pass`.
    pub action: Action,
    /// The policies of the tier that select the endpoint in this direction.
    pub selected_by: Vec<u32>,
}

/// The tiers in evaluation order: defined ones by order (none last) then name, then the
/// ones only named by policies.
pub(super) fn tier_table(policies: &[Arc<Policy>]) -> Vec<CalicoTier> {
    let mut tiers: BTreeMap<String, CalicoTier> = BTreeMap::new();
    tiers.insert(
        DEFAULT_TIER.to_string(),
        CalicoTier {
            name: DEFAULT_TIER.to_string(),
            order: Some(DEFAULT_TIER_ORDER),
            default_action: Action::Deny,
            defined: true,
        },
    );
    for p in policies {
        if let Some(Calico::Tier {
            order,
            default_action,
        }) = &p.calico
        {
            tiers.insert(
                p.object.name.clone(),
                CalicoTier {
                    name: p.object.name.clone(),
                    order: *order,
                    default_action: *default_action,
                    defined: true,
                },
            );
        }
    }
    for p in policies {
        if let Some(Calico::Policy { tier, .. }) = &p.calico {
            tiers.entry(tier.clone()).or_insert_with(|| CalicoTier {
                name: tier.clone(),
                order: None,
                default_action: Action::Deny,
                defined: false,
            });
        }
    }
    let mut list: Vec<CalicoTier> = tiers.into_values().collect();
    list.sort_by(|a, b| {
        b.defined
            .cmp(&a.defined)
            .then_with(|| cmp_order(a.order, b.order))
            .then_with(|| a.name.cmp(&b.name))
    });
    list
}

/// Lower order first; None after every number.
fn cmp_order(a: Option<f64>, b: Option<f64>) -> Ordering {
    a.unwrap_or(f64::INFINITY)
        .total_cmp(&b.unwrap_or(f64::INFINITY))
}

/// Where a policy sits in the one evaluation order.
struct Place<'a> {
    section: u8,
    tier: u32,
    order: f64,
    name: &'a str,
    /// Breaks a tie of a Calico policy with the namespace tier (the Calico policy first).
    after: u8,
}

/// The position of every policy in evaluation order: Admin by priority, then the Calico
/// tiers (each by policy order and name, the namespace tier inside `default` at 1000), then
/// Baseline by priority. Ties fall back to kind, name and path. The policies of the
/// namespace tier share one position (they decide together).
pub(super) fn policy_order(policies: &[Arc<Policy>], tiers: &[CalicoTier]) -> Vec<u32> {
    let rank = |name: &str| {
        tiers
            .iter()
            .position(|t| t.name == name)
            .unwrap_or(tiers.len()) as u32
    };
    let default_rank = rank(DEFAULT_TIER);
    let places: Vec<Place> = policies
        .iter()
        .map(|p| place(p, &rank, default_rank))
        .collect();
    let mut idx: Vec<usize> = (0..policies.len()).collect();
    idx.sort_by(|&a, &b| {
        let (x, y) = (&places[a], &places[b]);
        x.section
            .cmp(&y.section)
            .then(x.tier.cmp(&y.tier))
            .then(x.order.total_cmp(&y.order))
            .then(x.name.cmp(y.name))
            .then(x.after.cmp(&y.after))
            .then_with(|| policies[a].object.cmp(&policies[b].object))
            .then_with(|| policies[a].path.cmp(&policies[b].path))
    });
    let mut out = vec![0u32; policies.len()];
    let mut namespace_position = None;
    for (position, i) in idx.into_iter().enumerate() {
        out[i] = if policies[i].tier == Tier::Namespace {
            *namespace_position.get_or_insert(position as u32)
        } else {
            position as u32
        };
    }
    out
}

fn place<'a>(p: &'a Policy, rank: &dyn Fn(&str) -> u32, default_rank: u32) -> Place<'a> {
    match (p.tier, &p.calico) {
        (Tier::Admin, _) => Place {
            section: 0,
            tier: 0,
            order: p.priority as f64,
            name: "",
            after: 0,
        },
        (Tier::Baseline, _) => Place {
            section: 2,
            tier: 0,
            order: p.priority as f64,
            name: "",
            after: 0,
        },
        (_, Some(Calico::Policy { tier, order, name })) => Place {
            section: 1,
            tier: rank(tier),
            order: order.unwrap_or(f64::INFINITY),
            name,
            after: 0,
        },
        (_, Some(Calico::Tier { .. })) => Place {
            section: 1,
            tier: rank(&p.object.name),
            order: f64::NEG_INFINITY,
            name: "",
            after: 0,
        },
        (_, None) => Place {
            section: 1,
            tier: default_rank,
            order: NAMESPACE_TIER_ORDER,
            name: NAMESPACE_TIER_NAME,
            after: 1,
        },
    }
}
