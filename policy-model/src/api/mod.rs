//! Policy objects as users write them, parsed from YAML (multi-document files, top-level
//! lists and `kind: List`), validated, and translated to the internal form.

pub mod anp;
pub mod calico;
pub mod cnp;
pub mod common;
pub mod netpol;

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use crate::error::{Errors, PolicyError};
use crate::policy::{Kind, ObjectRef, Policy};

/// `metadata` of an object: only what Ward needs; everything else is allowed and ignored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CiliumObject {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: Option<cnp::CiliumRule>,
    #[serde(default)]
    specs: Option<Vec<cnp::CiliumRule>>,
    #[serde(default)]
    status: Option<serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NetworkPolicyObject {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: netpol::NetworkPolicySpec,
    #[serde(default)]
    status: Option<serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AdminObject {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: anp::AdminPolicySpec,
    #[serde(default)]
    status: Option<serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CalicoPolicyObject {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: calico::PolicySpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CalicoTierObject {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: calico::TierSpec,
}

/// The typed body of a policy object.
#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    Cilium {
        spec: Option<Box<cnp::CiliumRule>>,
        specs: Option<Vec<cnp::CiliumRule>>,
    },
    NetworkPolicy(Box<netpol::NetworkPolicySpec>),
    Admin(Box<anp::AdminPolicySpec>),
    /// A Calico NetworkPolicy or GlobalNetworkPolicy.
    Calico(Box<calico::PolicySpec>),
    CalicoTier(calico::TierSpec),
}

/// A parsed policy object with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    pub reference: ObjectRef,
    pub body: Body,
    pub file: Option<String>,
    pub line: Option<usize>,
}

impl Object {
    /// Validates and translates the object into internal policies (one per CNP spec).
    /// Every problem is reported; an object with any error yields no policy at all, so
    /// a half-understood object never half-applies.
    pub fn translate(&self) -> Result<Vec<Policy>, Vec<PolicyError>> {
        let mut errs = Errors::default();
        let mut out = Vec::new();
        let ns = self.reference.namespace.as_deref();
        match &self.body {
            Body::Cilium { spec, specs } => {
                if spec.is_none() && specs.is_none() {
                    errs.add("spec", "a CiliumNetworkPolicy needs spec or specs");
                }
                let cnp_ns = match self.reference.kind {
                    Kind::CiliumNetworkPolicy => ns,
                    _ => None,
                };
                if let Some(s) = spec {
                    out.extend(cnp::translate_rule(
                        s,
                        &self.reference,
                        cnp_ns,
                        "spec",
                        &mut errs,
                    ));
                }
                for (i, s) in specs.iter().flatten().enumerate() {
                    out.extend(cnp::translate_rule(
                        s,
                        &self.reference,
                        cnp_ns,
                        &format!("specs[{i}]"),
                        &mut errs,
                    ));
                }
            }
            Body::NetworkPolicy(spec) => match ns {
                Some(ns) => out.extend(netpol::translate(spec, &self.reference, ns, &mut errs)),
                None => errs.add("metadata.namespace", "a NetworkPolicy needs a namespace"),
            },
            Body::Admin(spec) => out.extend(anp::translate(spec, &self.reference, &mut errs)),
            Body::Calico(spec) => match (self.reference.kind, ns) {
                (Kind::CalicoNetworkPolicy, None) => errs.add(
                    "metadata.namespace",
                    "a Calico NetworkPolicy needs a namespace",
                ),
                (kind, ns) => out.extend(calico::translate(
                    spec,
                    &self.reference,
                    ns.filter(|_| kind == Kind::CalicoNetworkPolicy),
                    &mut errs,
                )),
            },
            Body::CalicoTier(spec) => {
                out.extend(calico::translate_tier(spec, &self.reference, &mut errs))
            }
        }
        if self.reference.name.is_empty() {
            errs.add("metadata.name", "a name is required");
        }
        if errs.is_empty() {
            Ok(out)
        } else {
            Err(errs
                .list
                .into_iter()
                .map(|e| PolicyError {
                    file: self.file.clone(),
                    line: self.line,
                    object: Some(self.reference.to_string()),
                    path: e.path,
                    reason: e.reason,
                })
                .collect())
        }
    }
}

/// Everything found in one input: the objects that parsed and the errors of those that
/// did not. Values that are not Kubernetes objects (no `apiVersion`) are returned as
/// `other` so that callers can read cluster state from the same files.
#[derive(Debug, Default)]
pub struct Parsed {
    pub objects: Vec<Object>,
    pub errors: Vec<PolicyError>,
    pub other: Vec<(Value, Option<usize>)>,
}

/// Calico's API group and version as users write them.
pub const CALICO_V3: &str = "projectcalico.org/v3";
/// The group and version of the CRDs Calico stores its objects in.
pub const CALICO_CRD: &str = "crd.projectcalico.org/v1";

/// Splits a YAML stream into documents with their first line (1-based).
pub(crate) fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut start = 1;
    let mut cur = String::new();
    for (i, line) in text.lines().enumerate() {
        let is_sep = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if is_sep {
            docs.push((start, std::mem::take(&mut cur)));
            start = i + 2;
            // text after `--- ` on the same line belongs to the next document
            if let Some(rest) = line.get(4..) {
                cur.push_str(rest);
                cur.push('\n');
                start = i + 1;
            }
            continue;
        }
        if line == "..." {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    docs.push((start, cur));
    docs
}

/// Parses every object of a YAML text. `file` is used in error messages.
pub fn parse(text: &str, file: Option<&str>) -> Parsed {
    let mut out = Parsed::default();
    for (start, doc) in documents(text) {
        if doc.trim().is_empty() {
            continue;
        }
        let value: Value = match serde_yaml::from_str(&doc) {
            Ok(v) => v,
            Err(e) => {
                out.errors.push(PolicyError {
                    file: file.map(str::to_string),
                    line: Some(e.location().map_or(start, |l| start + l.line() - 1)),
                    object: None,
                    path: String::new(),
                    reason: format!("invalid YAML: {}", strip_location(&e.to_string())),
                });
                continue;
            }
        };
        collect(value, file, Some(start), &mut out);
    }
    out
}

/// Parses objects from an already-parsed YAML value (a case file's `policies` entries).
pub fn parse_value(value: Value, file: Option<&str>) -> Parsed {
    let mut out = Parsed::default();
    collect(value, file, None, &mut out);
    out
}

fn strip_location(s: &str) -> String {
    match s.find(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s.to_string(),
    }
}

fn collect(value: Value, file: Option<&str>, line: Option<usize>, out: &mut Parsed) {
    match value {
        Value::Null => {}
        Value::Sequence(items) => {
            for item in items {
                collect(item, file, line, out);
            }
        }
        Value::Mapping(ref m) => {
            let kind = m.get("kind").and_then(Value::as_str).unwrap_or_default();
            let has_api = m.contains_key("apiVersion");
            if has_api && kind.ends_with("List") {
                if let Some(Value::Sequence(items)) = m.get("items") {
                    for item in items.clone() {
                        collect(item, file, line, out);
                    }
                }
                return;
            }
            if !has_api {
                out.other.push((value, line));
                return;
            }
            match object(value, file, line) {
                Ok(o) => out.objects.push(o),
                Err(e) => out.errors.push(*e),
            }
        }
        other => out.errors.push(PolicyError {
            file: file.map(str::to_string),
            line,
            object: None,
            path: String::new(),
            reason: format!(
                "expected a Kubernetes object (a mapping), found {}",
                value_kind(&other)
            ),
        }),
    }
}

fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn object(
    value: Value,
    file: Option<&str>,
    line: Option<usize>,
) -> Result<Object, Box<PolicyError>> {
    let get = |k: &str| value.get(k).and_then(Value::as_str).map(str::to_string);
    let api = get("apiVersion").unwrap_or_default();
    let kind_s = get("kind").unwrap_or_default();
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let label = match &namespace {
        Some(ns) => format!("{kind_s} {ns}/{name}"),
        None => format!("{kind_s} {name}"),
    };
    let err = |path: String, reason: String| {
        Box::new(PolicyError {
            file: file.map(str::to_string),
            line,
            object: Some(label.clone()),
            path,
            reason,
        })
    };
    fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, (String, String)> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            (path, strip_location(&e.into_inner().to_string()))
        })
    }
    let (kind, body) = match (api.as_str(), kind_s.as_str()) {
        ("cilium.io/v2", "CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy") => {
            let o: CiliumObject = typed(value).map_err(|(p, r)| err(p, r))?;
            let ccnp = o.kind == "CiliumClusterwideNetworkPolicy";
            if ccnp && namespace.is_some() {
                return Err(err(
                    "metadata.namespace".into(),
                    "a CiliumClusterwideNetworkPolicy is not namespaced".into(),
                ));
            }
            (
                cnp::kind(ccnp, namespace.as_deref()),
                Body::Cilium {
                    spec: o.spec.map(Box::new),
                    specs: o.specs,
                },
            )
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            let o: NetworkPolicyObject = typed(value).map_err(|(p, r)| err(p, r))?;
            (Kind::NetworkPolicy, Body::NetworkPolicy(Box::new(o.spec)))
        }
        ("policy.networking.k8s.io/v1alpha1", "AdminNetworkPolicy" | "BaselineAdminNetworkPolicy") => {
            let o: AdminObject = typed(value).map_err(|(p, r)| err(p, r))?;
            if o.spec.tier.is_some() {
                return Err(err("spec.tier".into(), "tier is a v1alpha2 ClusterNetworkPolicy field".into()));
            }
            let kind = if o.kind == "AdminNetworkPolicy" {
                Kind::AdminNetworkPolicy
            } else {
                Kind::BaselineAdminNetworkPolicy
            };
            (kind, Body::Admin(Box::new(o.spec)))
        }
        ("policy.networking.k8s.io/v1alpha2", "ClusterNetworkPolicy") => {
            let o: AdminObject = typed(value).map_err(|(p, r)| err(p, r))?;
            (Kind::ClusterNetworkPolicy, Body::Admin(Box::new(o.spec)))
        }
        (CALICO_V3 | CALICO_CRD, k) if calico::kind(k).is_some() => {
            let kind = calico::kind(k).unwrap_or(Kind::Tier);
            if kind == Kind::Tier {
                let o: CalicoTierObject = typed(value).map_err(|(p, r)| err(p, r))?;
                (kind, Body::CalicoTier(o.spec))
            } else {
                let o: CalicoPolicyObject = typed(value).map_err(|(p, r)| err(p, r))?;
                if kind == Kind::GlobalNetworkPolicy && namespace.is_some() {
                    return Err(err(
                        "metadata.namespace".into(),
                        "a GlobalNetworkPolicy is not namespaced".into(),
                    ));
                }
                (kind, Body::Calico(Box::new(o.spec)))
            }
        }
        _ => {
            return Err(err(
                String::new(),
                format!(
                    "{api}/{kind_s} is not a policy kind Ward reads (cilium.io/v2 CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy, networking.k8s.io/v1 NetworkPolicy, policy.networking.k8s.io/v1alpha1 AdminNetworkPolicy and BaselineAdminNetworkPolicy, policy.networking.k8s.io/v1alpha2 ClusterNetworkPolicy, projectcalico.org/v3 (or crd.projectcalico.org/v1) NetworkPolicy, GlobalNetworkPolicy and Tier)"
                ),
            ))
        }
    };
    let namespace = match kind {
        Kind::CiliumNetworkPolicy | Kind::NetworkPolicy | Kind::CalicoNetworkPolicy => namespace,
        _ => None,
    };
    Ok(Object {
        reference: ObjectRef {
            kind,
            namespace,
            name,
        },
        body,
        file: file.map(str::to_string),
        line,
    })
}

/// Parses, validates and translates a YAML text: the policies of every valid object and
/// the errors of every invalid one.
pub fn load(text: &str, file: Option<&str>) -> (Vec<Policy>, Vec<PolicyError>, Vec<Object>) {
    let parsed = parse(text, file);
    let mut errors = parsed.errors;
    let mut policies = Vec::new();
    for o in &parsed.objects {
        match o.translate() {
            Ok(p) => policies.extend(p),
            Err(e) => errors.extend(e),
        }
    }
    (policies, errors, parsed.objects)
}
