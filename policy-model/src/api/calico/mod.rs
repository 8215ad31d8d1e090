//! Calico's `projectcalico.org/v3` NetworkPolicy, GlobalNetworkPolicy and Tier (also as
//! stored in the `crd.projectcalico.org/v1` CRDs), validated as Calico's validator does and
//! translated to the internal form.
//!
//! What they mean (Calico's documentation and code; each conformance case in
//! `cases-calico/` cites the passage it rests on):
//!
//! * Tiers are evaluated in `order` (lower first; a tier without order after the ordered
//!   ones, ties by name; a tier that policies name but no Tier object defines comes after
//!   every defined one). The `default` tier exists without an object, at order 1,000,000.
//! * Inside a tier, policies by `order` (lower first; omitted = after every ordered
//!   policy; ties by name), rules in the order written. `Allow` and `Deny` decide; `Pass`
//!   skips the rest of the tier; `Log` decides nothing (Ward keeps no packet log for it).
//! * A tier with a policy that selects the endpoint in the direction (`types`) and no
//!   decision ends with its `defaultAction` (`Deny`, or `Pass` to the next tier). A tier
//!   that selects nothing is skipped; after the last tier the namespace profile allows.
//! * `types` defaults to `[Ingress]`, `[Egress]` when only egress rules are given, both
//!   when both are.
//! * A NetworkPolicy selects pods of its own namespace; its rule selectors mean the
//!   policy's namespace unless the rule has a `namespaceSelector`. A GlobalNetworkPolicy
//!   selects in every namespace (`namespaceSelector` narrows it).
//! * Rule selectors match endpoints (pods) only; a rule without `selector`,
//!   `namespaceSelector`, `notSelector` and `serviceAccounts` matches every packet,
//!   outside addresses included. `nets`/`notNets` match addresses, pod addresses included.
//!
//! How they sit among Ward's other kinds (Ward's definition; Calico and Cilium never run
//! together, so Calico has no answer for CiliumNetworkPolicy):
//!
//! * AdminNetworkPolicy (and ClusterNetworkPolicy tier Admin) come first, above every
//!   Calico tier, as Calico's own `adminnetworkpolicy` tier does; BaselineAdminNetworkPolicy
//!   (and tier Baseline) come after the last Calico tier.
//! * Ward's namespace tier (Kubernetes NetworkPolicy, CiliumNetworkPolicy and
//!   CiliumClusterwideNetworkPolicy) sits inside Calico's `default` tier at order 1000, as
//!   Calico places Kubernetes NetworkPolicies (ties at 1000 by name, the namespace tier
//!   sorting as `knp.default.`). It decides there as one policy with its own rules (deny
//!   rules win, allows add up, L7 rules are checked per request); when nothing in it
//!   matches, the `default` tier goes on with its next policy. A pod it puts in default
//!   deny is selected by the `default` tier.
//! * Without Calico objects nothing changes: the namespace tier decides as before.
//!
//! What Ward does not enforce is rejected with the field and the reason, never dropped:
//! source ports, ICMP codes, Service matches, `doNotTrack`/`preDNAT` (host endpoints),
//! protocols other than TCP, UDP, SCTP, ICMP and ICMPv6. `ipVersion` (and the single IP
//! family that a rule's CIDRs imply) restricts outside peers exactly; a dual-stack pod has
//! one identity for both of its addresses, so a pod peer matches in both families.

pub mod expr;
mod rules;

use serde::{Deserialize, Serialize};

use crate::error::Errors;
use crate::labels::{well_known, Key, Source};
use crate::policy::{Action, Calico, Kind, ObjectRef, Policy, Subject, Tier};
use crate::selector::{Op, Selector};
use expr::{Expr, Node, Scope};

pub use rules::EntityRule;

/// The order Calico gives its `default` tier.
pub const DEFAULT_TIER_ORDER: f64 = 1_000_000.0;
/// The order of Kubernetes NetworkPolicies (and Ward's namespace tier) in the `default`
/// tier.
pub const NAMESPACE_TIER_ORDER: f64 = 1000.0;
/// The name the namespace tier sorts under at [`NAMESPACE_TIER_ORDER`].
pub const NAMESPACE_TIER_NAME: &str = "knp.default.";
/// The tier a policy without `tier` is in.
pub const DEFAULT_TIER: &str = "default";
/// At most this many alternatives per selector after normal form.
pub const MAX_ALTERNATIVES: usize = 256;
/// Calico's limit on rules per direction.
const MAX_RULES: usize = 1024;

/// `spec` of a NetworkPolicy or GlobalNetworkPolicy (the namespaced kind has no
/// `namespaceSelector` and no host-endpoint fields; `translate` says so by field).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<rules::RuleWire>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<rules::RuleWire>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_not_track: Option<bool>,
    #[serde(default, rename = "preDNAT", skip_serializing_if = "Option::is_none")]
    pub pre_dnat: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_on_forward: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub performance_hints: Option<Vec<String>>,
}

/// `spec` of a Tier.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_action: Option<String>,
}

/// Parses a selector expression of `scope` into selectors over pod identities (pods
/// only: every alternative requires a pod namespace), or the reason it is invalid.
pub fn selector(text: &str, scope: Scope) -> Result<Vec<Selector>, String> {
    let node = parse(text, scope)?;
    Expr::And(vec![Expr::pod(), Expr::from_node(&node, scope)]).to_selectors(MAX_ALTERNATIVES)
}

/// Parses an expression, refusing `global()` where Calico does (everywhere but a rule's
/// `namespaceSelector`, and there only on its own).
fn parse(text: &str, scope: Scope) -> Result<Node, String> {
    let node = expr::parse(text).map_err(|e| format!("invalid selector {text:?}: {e}"))?;
    if node.uses_global() && (scope != Scope::Namespace || node != Node::Global) {
        return Err(format!(
            "invalid selector {text:?}: global() may only be used alone, in a rule's namespaceSelector"
        ));
    }
    Ok(node)
}

/// The parsed expression of an optional selector field, with its error recorded.
fn field_expr(
    text: &Option<String>,
    scope: Scope,
    path: &str,
    errs: &mut Errors,
) -> Option<Option<Expr>> {
    match text.as_deref().map(str::trim) {
        None | Some("") => Some(None),
        Some(t) => match parse(t, scope) {
            Ok(n) => Some(Some(Expr::from_node(&n, scope))),
            Err(e) => {
                errs.add(path, e);
                None
            }
        },
    }
}

fn in_namespace(ns: &str) -> Expr {
    Expr::lit(
        Key::new(Source::K8s, well_known::POD_NAMESPACE),
        Op::In(vec![ns.to_string()]),
    )
}

/// `types` as given or defaulted: `[ingress, egress]`.
fn types(spec: &PolicySpec, errs: &mut Errors) -> [bool; 2] {
    let has = |r: &Option<Vec<rules::RuleWire>>| r.as_ref().is_some_and(|v| !v.is_empty());
    match &spec.types {
        None => {
            let (i, e) = (has(&spec.ingress), has(&spec.egress));
            [i || !e, e]
        }
        Some(list) => {
            let mut t = [false, false];
            if list.is_empty() || list.len() > 2 {
                errs.add("spec.types", "one or two of Ingress and Egress");
            }
            for (i, v) in list.iter().enumerate() {
                match v.as_str() {
                    "Ingress" if !t[0] => t[0] = true,
                    "Egress" if !t[1] => t[1] = true,
                    "Ingress" | "Egress" => errs.add(format!("spec.types[{i}]"), "listed twice"),
                    other => errs.add(
                        format!("spec.types[{i}]"),
                        format!("{other:?} is not Ingress or Egress"),
                    ),
                }
            }
            t
        }
    }
}

/// A tier name: a DNS label (tiers appear inside other names, so no dots).
fn check_tier_name(name: &str, path: &str, errs: &mut Errors) {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if !ok {
        errs.add(
            path,
            format!(
                "tier name {name:?} is not valid (lower-case letters, digits and '-', at most 63)"
            ),
        );
    }
}

fn check_order(order: Option<f64>, path: &str, errs: &mut Errors) {
    if order.is_some_and(|o| !o.is_finite()) {
        errs.add(path, "order must be a finite number");
    }
}

/// Translates a NetworkPolicy (`namespace` Some) or GlobalNetworkPolicy.
pub fn translate(
    spec: &PolicySpec,
    object: &ObjectRef,
    namespace: Option<&str>,
    errs: &mut Errors,
) -> Option<Policy> {
    let before = errs.list.len();
    let tier = spec
        .tier
        .clone()
        .unwrap_or_else(|| DEFAULT_TIER.to_string());
    check_tier_name(&tier, "spec.tier", errs);
    check_order(spec.order, "spec.order", errs);
    if namespace.is_some() {
        for (set, field) in [
            (spec.namespace_selector.is_some(), "namespaceSelector"),
            (spec.do_not_track.is_some(), "doNotTrack"),
            (spec.pre_dnat.is_some(), "preDNAT"),
            (spec.apply_on_forward.is_some(), "applyOnForward"),
        ] {
            if set {
                errs.add(
                    format!("spec.{field}"),
                    "a GlobalNetworkPolicy field; a NetworkPolicy does not have it",
                );
            }
        }
    }
    for (on, field) in [
        (spec.do_not_track == Some(true), "doNotTrack"),
        (spec.pre_dnat == Some(true), "preDNAT"),
    ] {
        if on {
            errs.add(
                format!("spec.{field}"),
                "applies to host endpoints only, which Ward does not model; the policy would select no pod",
            );
        }
    }
    for (i, h) in spec.performance_hints.iter().flatten().enumerate() {
        if h != "AssumeNeededOnEveryNode" {
            errs.add(
                format!("spec.performanceHints[{i}]"),
                format!("{h:?} is not AssumeNeededOnEveryNode"),
            );
        }
    }
    let types = types(spec, errs);
    let subject = subject(spec, namespace, errs);
    let ctx = rules::Ctx { namespace };
    let mut out_rules = Vec::new();
    for (dir_index, (field, list)) in [("ingress", &spec.ingress), ("egress", &spec.egress)]
        .into_iter()
        .enumerate()
    {
        let list = list.as_deref().unwrap_or_default();
        if list.len() > MAX_RULES {
            errs.add(
                format!("spec.{field}"),
                format!("at most {MAX_RULES} rules"),
            );
        }
        for (i, r) in list.iter().enumerate() {
            let path = format!("spec.{field}[{i}]");
            let dir = crate::policy::Direction::BOTH[dir_index];
            let rule = ctx.rule(r, dir, &path, errs);
            // Rules of a direction `types` leaves out are validated but govern nothing,
            // as in Calico (`ward policy lint` points them out).
            if types[dir_index] {
                out_rules.extend(rule.into_iter().flatten());
            }
        }
    }
    if errs.list.len() > before {
        return None;
    }
    let name = match namespace {
        Some(ns) => format!("{ns}/{}", object.name),
        None => object.name.clone(),
    };
    Some(Policy {
        object: object.clone(),
        path: "spec".into(),
        tier: Tier::Calico,
        priority: 0,
        subject: Subject::AnyPods(subject?),
        default_deny: types,
        rules: out_rules,
        calico: Some(Calico::Policy {
            tier,
            order: spec.order,
            name,
        }),
    })
}

/// The pods a policy selects: `selector` (in its namespace for a NetworkPolicy),
/// `namespaceSelector` and `serviceAccountSelector`, all ANDed.
fn subject(spec: &PolicySpec, namespace: Option<&str>, errs: &mut Errors) -> Option<Vec<Selector>> {
    let sel = field_expr(&spec.selector, Scope::Endpoint, "spec.selector", errs);
    let ns_sel = field_expr(
        &spec.namespace_selector,
        Scope::Namespace,
        "spec.namespaceSelector",
        errs,
    );
    let sa_sel = field_expr(
        &spec.service_account_selector,
        Scope::ServiceAccount,
        "spec.serviceAccountSelector",
        errs,
    );
    for (text, field) in [
        (&spec.namespace_selector, "namespaceSelector"),
        (&spec.service_account_selector, "serviceAccountSelector"),
    ] {
        if text.as_deref().is_some_and(|t| t.contains("global(")) {
            errs.add(
                format!("spec.{field}"),
                "global() may only be used in a rule's namespaceSelector",
            );
            return None;
        }
    }
    let mut all = vec![Expr::pod()];
    if let Some(ns) = namespace {
        all.push(in_namespace(ns));
    }
    all.extend([sel?, ns_sel?, sa_sel?].into_iter().flatten());
    match Expr::And(all).to_selectors(MAX_ALTERNATIVES) {
        Ok(s) => Some(s),
        Err(e) => {
            errs.add("spec.selector", e);
            None
        }
    }
}

/// Translates a Tier.
pub fn translate_tier(spec: &TierSpec, object: &ObjectRef, errs: &mut Errors) -> Option<Policy> {
    let before = errs.list.len();
    check_tier_name(&object.name, "metadata.name", errs);
    check_order(spec.order, "spec.order", errs);
    let default_action = match spec.default_action.as_deref() {
        None | Some("Deny") => Action::Deny,
        Some("Pass") => Action::Pass,
        Some(other) => {
            errs.add(
                "spec.defaultAction",
                format!("{other:?} is not Deny or Pass"),
            );
            Action::Deny
        }
    };
    if object.name == DEFAULT_TIER && spec.order != Some(DEFAULT_TIER_ORDER) {
        errs.add(
            "spec.order",
            format!("the default tier's order must be {DEFAULT_TIER_ORDER}"),
        );
    }
    if errs.list.len() > before {
        return None;
    }
    let order = if object.name == DEFAULT_TIER {
        Some(DEFAULT_TIER_ORDER)
    } else {
        spec.order
    };
    Some(Policy {
        object: object.clone(),
        path: "spec".into(),
        tier: Tier::Calico,
        priority: 0,
        subject: Subject::AnyPods(Vec::new()),
        default_deny: [false, false],
        rules: Vec::new(),
        calico: Some(Calico::Tier {
            order,
            default_action,
        }),
    })
}

/// The kind of a `projectcalico.org/v3` (or `crd.projectcalico.org/v1`) object.
pub fn kind(kind: &str) -> Option<Kind> {
    Some(match kind {
        "NetworkPolicy" => Kind::CalicoNetworkPolicy,
        "GlobalNetworkPolicy" => Kind::GlobalNetworkPolicy,
        "Tier" => Kind::Tier,
        _ => return None,
    })
}
