//! A lab scenario: a conformance case file, or a folder split into `cluster.yaml`,
//! `policies/*.yaml` and `probes.yaml`. Both become one normalised case document, so that
//! the lab, `ward conformance run` and the agents read the same thing.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use policy_model::conformance::{parse_case, Case, Probe, FORMAT};
use serde_yaml::{Mapping, Value};

/// Which client a probe uses beyond the default for its protocol (curl for HTTP/1.1).
/// Lab scenarios may say `client: h2c` or `client: grpc` on a probe; case files never do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    Default,
    H2c,
    Grpc,
}

/// One probe to execute for real.
#[derive(Clone, Debug)]
pub struct LabProbe {
    pub probe: Probe,
    pub client: Client,
    /// `family: ipv6`: the probe goes between the pods' IPv6 addresses.
    pub ipv6: bool,
}

/// A loaded scenario.
pub struct Scenario {
    pub case: Case,
    /// The normalised case document, probes' `client` keys included.
    pub document: Value,
    pub probes: Vec<LabProbe>,
}

impl Scenario {
    /// A scenario folder: `cluster.yaml` and `probes.yaml` side by side.
    pub fn is_folder(path: &Path) -> bool {
        path.join("cluster.yaml").is_file() && path.join("probes.yaml").is_file()
    }

    /// Loads a case file or a scenario folder; `profile` applies the case's variants.
    pub fn load(path: &Path, profile: Option<&str>) -> Result<Scenario> {
        let document = if path.is_dir() {
            folder_document(path)?
        } else {
            let text = fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            serde_yaml::from_str(&text)
                .with_context(|| format!("{}: invalid YAML", path.display()))?
        };
        Scenario::from_document(document, profile)
            .with_context(|| format!("scenario {}", path.display()))
    }

    /// Builds a scenario from a case document (the `client` keys of probes are read and
    /// removed before the strict case parser sees them).
    pub fn from_document(document: Value, profile: Option<&str>) -> Result<Scenario> {
        let mut clients = Vec::new();
        let mut families = Vec::new();
        let mut strict = document.clone();
        if let Some(Value::Sequence(probes)) = strict.get_mut("probes") {
            for (i, p) in probes.iter_mut().enumerate() {
                let client = match p.as_mapping_mut().and_then(|m| m.remove("client")) {
                    None => Client::Default,
                    Some(Value::String(s)) if s == "h2c" => Client::H2c,
                    Some(Value::String(s)) if s == "grpc" => Client::Grpc,
                    Some(Value::String(s)) if s == "curl" => Client::Default,
                    Some(other) => {
                        bail!("probes[{i}].client: {other:?} is not one of curl, h2c, grpc")
                    }
                };
                clients.push(client);
                let ipv6 = match p.as_mapping_mut().and_then(|m| m.remove("family")) {
                    None => false,
                    Some(Value::String(s)) if s == "ipv4" => false,
                    Some(Value::String(s)) if s == "ipv6" => true,
                    Some(other) => {
                        bail!("probes[{i}].family: {other:?} is not one of ipv4, ipv6")
                    }
                };
                families.push(ipv6);
            }
        }
        let text = serde_yaml::to_string(&strict)?;
        let case = parse_case(&text).map_err(|e| anyhow!("{e}"))?;
        let probes = case
            .probes_for(profile)
            .into_iter()
            .enumerate()
            .map(|(i, probe)| LabProbe {
                client: clients.get(i).copied().unwrap_or(Client::Default),
                ipv6: families.get(i).copied().unwrap_or(false),
                probe,
            })
            .collect();
        Ok(Scenario {
            case,
            document,
            probes,
        })
    }
}

/// `cluster.yaml` (the `cluster:` shape, optionally with `semantics:` and `name:`),
/// every manifest under `policies/`, and `probes.yaml` (`probes:`).
fn folder_document(dir: &Path) -> Result<Value> {
    let read = |p: &Path| -> Result<Value> {
        let text = fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_yaml::from_str(&text).with_context(|| format!("{}: invalid YAML", p.display()))
    };
    let cluster_file = read(&dir.join("cluster.yaml"))?;
    let cluster = cluster_file
        .get("cluster")
        .cloned()
        .ok_or_else(|| anyhow!("{}/cluster.yaml: no `cluster:` key", dir.display()))?;
    let mut policies = Vec::new();
    let policy_dir = dir.join("policies");
    if policy_dir.is_dir() {
        for f in yaml_files(&[policy_dir])? {
            let text =
                fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v = serde::Deserialize::deserialize(doc)
                    .map_err(|e| anyhow!("{}: invalid YAML: {e}", f.display()))?;
                if !matches!(v, Value::Null) {
                    policies.push(v);
                }
            }
        }
    }
    let probes = read(&dir.join("probes.yaml"))?
        .get("probes")
        .cloned()
        .ok_or_else(|| anyhow!("{}/probes.yaml: no `probes:` key", dir.display()))?;
    let mut m = Mapping::new();
    m.insert("format".into(), FORMAT.into());
    let name = cluster_file.get("name").cloned().unwrap_or_else(|| {
        Value::from(
            dir.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        )
    });
    m.insert("name".into(), name);
    m.insert(
        "semantics".into(),
        cluster_file
            .get("semantics")
            .cloned()
            .unwrap_or_else(|| "cilium".into()),
    );
    m.insert("cluster".into(), cluster);
    m.insert("policies".into(), Value::Sequence(policies));
    m.insert("probes".into(), probes);
    Ok(Value::Mapping(m))
}

/// The YAML files named by `paths`: files as given, folders searched recursively for
/// `*.yaml` / `*.yml`, in name order.
pub fn yaml_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        let meta = fs::metadata(p).with_context(|| format!("cannot read {}", p.display()))?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot read folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for e in entries {
        if e.is_dir() {
            walk(&e, out)?;
        } else if matches!(e.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
            out.push(e);
        }
    }
    Ok(())
}
