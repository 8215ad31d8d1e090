//! The CustomResourceDefinitions of `cilium.io/v2` CiliumNetworkPolicy and
//! CiliumClusterwideNetworkPolicy, generated from policy-model's wire types.
//!
//! Why not `#[derive(CustomResource)]`: a CNP carries `spec` *or* `specs` (a list of
//! rules), both optional, while the derive makes one required `spec`. Keeping Cilium's
//! object shape is what lets users bring their policies unchanged, so the CRD is
//! assembled here around the schema schemars derives for `CiliumRule` (policy-model,
//! feature `schema`); the rule types stay defined once, in policy-model.
//!
//! The schema is made structural (Kubernetes' rules for CRD schemas): everything inlined,
//! no `additionalProperties` next to `properties`, free-form values marked
//! `x-kubernetes-preserve-unknown-fields`, no defaults (the API server would apply them
//! and change the user's objects).

use policy_model::api::cnp::CiliumRule;
use schemars::generate::SchemaSettings;
use serde_json::{json, Value};

/// One generated CRD: the file name under `deploy/crds/` and its YAML.
pub struct CrdFile {
    pub file: &'static str,
    pub yaml: String,
}

/// The JSON schema of one CNP rule (`spec`, `specs[i]`), structural.
pub fn rule_schema() -> Value {
    let mut generator = SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .into_generator();
    let mut schema = generator.subschema_for::<CiliumRule>().to_value();
    structural(&mut schema);
    schema
}

/// Rewrites a schemars schema into a Kubernetes structural schema (see the module doc).
/// Only schema positions are visited (`properties`, `items`, ...), never keyword values.
fn structural(v: &mut Value) {
    let Value::Object(m) = v else {
        // `true`: anything goes (a `serde_json::Value` field)
        *v = json!({ "x-kubernetes-preserve-unknown-fields": true });
        return;
    };
    for k in [
        "$schema",
        "title",
        "default",
        "examples",
        "definitions",
        "$defs",
    ] {
        m.remove(k);
    }
    if m.contains_key("properties") {
        m.remove("additionalProperties");
    }
    // `type: [T, "null"]` (an `Option`) -> `type: T, nullable: true`
    if let Some(Value::Array(types)) = m.get("type") {
        let non_null: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
        let nullable = non_null.len() < types.len();
        if let [one] = non_null.as_slice() {
            let one = one.clone();
            m.insert("type".into(), one);
            if nullable {
                m.insert("nullable".into(), true.into());
            }
        }
    }
    // an enum that lists null besides its values
    if let Some(Value::Array(values)) = m.get_mut("enum") {
        values.retain(|x| !x.is_null());
    }
    // `{}` (or `{nullable: true}`) is a free-form value (`serde_json::Value`)
    if m.keys().all(|k| k == "nullable" || k == "description") {
        m.insert("x-kubernetes-preserve-unknown-fields".into(), true.into());
    }
    // unsigned formats are not OpenAPI formats Kubernetes knows
    if m.get("format")
        .and_then(Value::as_str)
        .is_some_and(|f| f.starts_with("uint") || f == "int")
    {
        m.remove("format");
    }
    if let Some(Value::Object(props)) = m.get_mut("properties") {
        props.values_mut().for_each(structural);
    }
    for k in ["items", "additionalProperties", "not"] {
        if let Some(sub) = m.get_mut(k) {
            if !sub.is_boolean() || k == "items" {
                structural(sub);
            }
        }
    }
    for k in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(subs)) = m.get_mut(k) {
            subs.iter_mut().for_each(structural);
        }
    }
}

/// The schema of the whole object, shared by CNP and CCNP.
pub fn object_schema() -> Value {
    let rule = rule_schema();
    json!({
        "type": "object",
        "required": ["metadata"],
        "properties": {
            "apiVersion": { "type": "string" },
            "kind": { "type": "string" },
            "metadata": { "type": "object" },
            "spec": rule,
            "specs": { "type": "array", "items": rule },
            "status": status_schema(),
        },
        // Cilium's own rule: one of spec or specs (checked by the API server with CEL).
        "x-kubernetes-validations": [{
            "rule": "has(self.spec) || has(self.specs)",
            "message": "a CiliumNetworkPolicy needs spec or specs",
        }],
    })
}

/// `status`: the `Valid` condition Ward writes; anything else (Cilium's per-node status
/// of a migrated object) is kept as it is.
fn status_schema() -> Value {
    json!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "properties": {
            "conditions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["type", "status"],
                    "properties": {
                        "type": { "type": "string" },
                        "status": { "type": "string", "enum": ["True", "False", "Unknown"] },
                        "lastTransitionTime": { "type": "string", "format": "date-time" },
                        "reason": { "type": "string" },
                        "message": { "type": "string" },
                    },
                },
            },
        },
    })
}

fn crd(kind: &str, plural: &str, singular: &str, scope: &str, short: &[&str]) -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{plural}.cilium.io"),
            "labels": { "app.kubernetes.io/part-of": "ward" },
        },
        "spec": {
            "group": "cilium.io",
            "names": {
                "kind": kind,
                "listKind": format!("{kind}List"),
                "plural": plural,
                "singular": singular,
                "shortNames": short,
                "categories": ["cilium", "ciliumpolicy"],
            },
            "scope": scope,
            "versions": [{
                "name": "v2",
                "served": true,
                "storage": true,
                "subresources": { "status": {} },
                "additionalPrinterColumns": [
                    {
                        "name": "Valid",
                        "type": "string",
                        "jsonPath": ".status.conditions[?(@.type==\"Valid\")].status",
                    },
                    { "name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp" },
                ],
                "schema": { "openAPIV3Schema": object_schema() },
            }],
        },
    })
}

/// Both CRDs, as committed under `deploy/crds/` (`cargo xtask crds` writes them).
pub fn crds() -> Result<Vec<CrdFile>, serde_yaml::Error> {
    let header = "# Generated by `cargo xtask crds` from policy-model's types; do not edit.\n";
    let cnp = crd(
        "CiliumNetworkPolicy",
        "ciliumnetworkpolicies",
        "ciliumnetworkpolicy",
        "Namespaced",
        &["cnp", "ciliumnp"],
    );
    let ccnp = crd(
        "CiliumClusterwideNetworkPolicy",
        "ciliumclusterwidenetworkpolicies",
        "ciliumclusterwidenetworkpolicy",
        "Cluster",
        &["ccnp"],
    );
    Ok(vec![
        CrdFile {
            file: "ciliumnetworkpolicies.cilium.io.yaml",
            yaml: format!("{header}{}", serde_yaml::to_string(&cnp)?),
        },
        CrdFile {
            file: "ciliumclusterwidenetworkpolicies.cilium.io.yaml",
            yaml: format!("{header}{}", serde_yaml::to_string(&ccnp)?),
        },
    ])
}

/// Writes both CRDs into `dir` (the hidden `ward kube crds DIR`).
pub fn write(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for f in crds().map_err(std::io::Error::other)? {
        std::fs::write(dir.join(f.file), f.yaml)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use std::path::{Path, PathBuf};

    use super::*;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn validator() -> jsonschema::Validator {
        jsonschema::validator_for(&object_schema()).unwrap()
    }

    fn yaml_docs(path: &Path) -> Vec<Value> {
        let text = std::fs::read_to_string(path).unwrap();
        text.split("\n---")
            .filter_map(|d| serde_yaml::from_str::<Value>(d).ok())
            .filter(|v| !v.is_null())
            .collect()
    }

    fn is_cilium(v: &Value) -> bool {
        v["apiVersion"] == "cilium.io/v2"
    }

    fn schema_errors(v: &Value) -> Vec<String> {
        validator()
            .iter_errors(v)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect()
    }

    #[test]
    fn the_committed_crds_are_what_the_types_generate() {
        for f in crds().unwrap() {
            let path = repo().join("deploy/crds").join(f.file);
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == f.yaml,
                "{} differs from the types: run `cargo xtask crds`",
                path.display()
            );
        }
    }

    #[test]
    fn the_schema_is_structural_enough_for_the_api_server() {
        // every object schema with properties has a type, no additionalProperties beside
        // properties, no $ref, no anyOf/oneOf of types
        fn walk(v: &Value, path: &str) {
            if let Value::Object(m) = v {
                assert!(!m.contains_key("$ref"), "$ref at {path}");
                if m.contains_key("properties") {
                    assert_eq!(m.get("type"), Some(&json!("object")), "type at {path}");
                    assert!(!m.contains_key("additionalProperties"), "at {path}");
                }
                let typed = m.contains_key("type")
                    || m.contains_key("x-kubernetes-int-or-string")
                    || m.contains_key("x-kubernetes-preserve-unknown-fields");
                if path.ends_with(".items")
                    || path.contains(".properties.") && !path.ends_with(".properties")
                {
                    assert!(typed, "no type at {path}: {v}");
                }
                for (k, sub) in m {
                    walk(sub, &format!("{path}.{k}"));
                }
            }
        }
        walk(&object_schema(), "");
    }

    #[test]
    fn every_cilium_policy_of_the_conformance_cases_and_examples_is_accepted() {
        let cases = repo().join("conformance/cases");
        let mut n = 0;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&cases)
            .unwrap_or_else(|e| panic!("{}: {e}", cases.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.extend(
            std::fs::read_dir(repo().join("deploy/examples"))
                .unwrap()
                .map(|e| e.unwrap().path()),
        );
        for f in files {
            for doc in yaml_docs(&f) {
                let policies: Vec<Value> = match doc.get("policies") {
                    Some(Value::Array(p)) => p.clone(),
                    _ => vec![doc.clone()],
                };
                for p in policies.iter().filter(|p| is_cilium(p)) {
                    let errs = schema_errors(p);
                    assert!(
                        errs.is_empty(),
                        "{}: {}: {errs:?}",
                        f.display(),
                        p["metadata"]["name"]
                    );
                    n += 1;
                }
            }
        }
        assert!(n > 30, "only {n} CNPs/CCNPs found");
    }

    #[test]
    fn every_example_passes_wards_validation() {
        let dir = repo().join("deploy/examples");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let (_, errors, objects) =
                policy_model::api::load(&text, Some(&path.display().to_string()));
            assert!(errors.is_empty(), "{errors:?}");
            for o in &objects {
                assert!(
                    o.translate().is_ok(),
                    "{}: {:?}",
                    o.reference,
                    o.translate()
                );
            }
            n += objects.len();
        }
        assert!(n >= 12, "{n}");
    }

    /// What Ward's validation rejects and the schema can express is rejected by both.
    #[test]
    fn the_schema_rejects_what_validation_rejects() {
        let base = json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "p", "namespace": "a"},
            "spec": {"endpointSelector": {}}
        });
        let ports: Vec<Value> = (0..41)
            .map(|i| json!({"port": (1000 + i).to_string()}))
            .collect();
        let bad: Vec<(&str, Value)> = vec![
            (
                "unknown protocol",
                json!({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "HTTP"}]}]}]}),
            ),
            (
                "unknown entity",
                json!({"endpointSelector": {}, "egress": [{"toEntities": ["nowhere"]}]}),
            ),
            (
                "unknown operator",
                json!({"endpointSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}}),
            ),
            (
                "too many ports",
                json!({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": ports}]}]}),
            ),
            (
                "a list where a rule goes",
                json!({"endpointSelector": {}, "ingress": {"fromEndpoints": []}}),
            ),
            (
                "ports as a string",
                json!({"endpointSelector": {}, "ingress": [{"toPorts": "80"}]}),
            ),
        ];
        for (what, spec) in bad {
            let mut o = base.clone();
            o["spec"] = spec;
            assert!(!schema_errors(&o).is_empty(), "schema accepts {what}");
            let yaml: serde_yaml::Value = serde_json::from_value(o.clone()).unwrap();
            let parsed = policy_model::api::parse_value(yaml, None);
            let rejected = !parsed.errors.is_empty()
                || parsed.objects.iter().any(|ob| ob.translate().is_err());
            assert!(rejected, "validation accepts {what}");
        }
        assert!(schema_errors(&base).is_empty());
    }

    #[test]
    fn the_prometheus_rule_carries_the_same_groups_as_the_rules_file() {
        let dir = repo().join("deploy/prometheus");
        let plain = &yaml_docs(&dir.join("ward.rules.yaml"))[0];
        let op = &yaml_docs(&dir.join("prometheusrule.yaml"))[0];
        assert_eq!(&op["spec"], plain);
        // every alert links a runbook that exists
        for r in plain["groups"][0]["rules"].as_array().unwrap() {
            let url = r["annotations"]["runbook_url"].as_str().unwrap();
            assert!(repo().join(url).is_file(), "{url}");
        }
    }
}
