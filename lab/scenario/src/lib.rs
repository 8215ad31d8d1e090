//! A lab scenario: a conformance case file, or a folder split into `cluster.yaml`,
//! `policies/*.yaml` and `probes.yaml`. Both become one normalised case document, so that
//! the lab, `ward conformance run` and the agents read the same thing.

use std::fs;
use std::path::{Path, PathBuf};

use policy_model::conformance::{parse_case, Case, CaseError, Probe, FORMAT};
use serde_yaml::{Mapping, Value};

/// Why a scenario (or a folder of YAML files) could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid YAML: {source}", path.display())]
    Yaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{}: no `{key}:` key", path.display())]
    MissingKey { path: PathBuf, key: &'static str },
    /// A probe's `client` or `family` names no known choice.
    #[error("probes[{index}].{field}: {value} is not one of {choices}")]
    ProbeOption {
        index: usize,
        field: &'static str,
        value: String,
        choices: String,
    },
    #[error("{0}")]
    Case(#[from] CaseError),
    #[error("the normalised case does not serialise: {0}")]
    Serialise(serde_yaml::Error),
    /// Any of the above, for the scenario at `path`.
    #[error("scenario {}: {source}", path.display())]
    Scenario { path: PathBuf, source: Box<Error> },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn yaml(path: &Path, text: &str) -> Result<Value> {
    serde_yaml::from_str(text).map_err(|source| Error::Yaml {
        path: path.to_path_buf(),
        source,
    })
}

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
            folder_document(path)
        } else {
            read_text(path).and_then(|text| yaml(path, &text))
        };
        document
            .and_then(|d| Scenario::from_document(d, profile))
            .map_err(|e| Error::Scenario {
                path: path.to_path_buf(),
                source: Box::new(e),
            })
    }

    /// Builds a scenario from a case document (the `client` keys of probes are read and
    /// removed before the strict case parser sees them).
    pub fn from_document(document: Value, profile: Option<&str>) -> Result<Scenario> {
        let mut clients = Vec::new();
        let mut families = Vec::new();
        let mut strict = document.clone();
        if let Some(Value::Sequence(probes)) = strict.get_mut("probes") {
            for (i, p) in probes.iter_mut().enumerate() {
                let client = take_option(
                    p,
                    i,
                    "client",
                    &[
                        ("curl", Client::Default),
                        ("h2c", Client::H2c),
                        ("grpc", Client::Grpc),
                    ],
                )?;
                clients.push(client.unwrap_or(Client::Default));
                let ipv6 = take_option(p, i, "family", &[("ipv4", false), ("ipv6", true)])?;
                families.push(ipv6.unwrap_or(false));
            }
        }
        let text = serde_yaml::to_string(&strict).map_err(Error::Serialise)?;
        let case = parse_case(&text)?;
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

/// Removes the lab option `field` from probe `index` (`p`) and returns the value of the
/// choice it names, or None when the probe has none.
fn take_option<T: Copy>(
    p: &mut Value,
    index: usize,
    field: &'static str,
    choices: &[(&str, T)],
) -> Result<Option<T>> {
    let Some(given) = p.as_mapping_mut().and_then(|m| m.remove(field)) else {
        return Ok(None);
    };
    let chosen = choices
        .iter()
        .find(|(name, _)| given.as_str() == Some(name))
        .map(|(_, v)| *v);
    chosen.map(Some).ok_or_else(|| Error::ProbeOption {
        index,
        field,
        value: format!("{given:?}"),
        choices: choices
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// `cluster.yaml` (the `cluster:` shape, optionally with `semantics:` and `name:`),
/// every manifest under `policies/`, and `probes.yaml` (`probes:`).
fn folder_document(dir: &Path) -> Result<Value> {
    let read = |p: &Path| read_text(p).and_then(|text| yaml(p, &text));
    let key = |file: &Path, v: &Value, key: &'static str| {
        v.get(key).cloned().ok_or_else(|| Error::MissingKey {
            path: file.to_path_buf(),
            key,
        })
    };
    let cluster_path = dir.join("cluster.yaml");
    let cluster_file = read(&cluster_path)?;
    let cluster = key(&cluster_path, &cluster_file, "cluster")?;
    let mut policies = Vec::new();
    let policy_dir = dir.join("policies");
    if policy_dir.is_dir() {
        for f in yaml_files(&[policy_dir])? {
            let text = read_text(&f)?;
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v = serde::Deserialize::deserialize(doc).map_err(|source| Error::Yaml {
                    path: f.clone(),
                    source,
                })?;
                if !matches!(v, Value::Null) {
                    policies.push(v);
                }
            }
        }
    }
    let probes_path = dir.join("probes.yaml");
    let probes = key(&probes_path, &read(&probes_path)?, "probes")?;
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
        let meta = fs::metadata(p).map_err(|source| Error::Read {
            path: p.clone(),
            source,
        })?;
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
        .map_err(|source| Error::Read {
            path: dir.to_path_buf(),
            source,
        })?
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_default_scenario_loads_with_its_clients() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/lab");
        let s = Scenario::load(&dir, None).unwrap();
        assert!(s.probes.len() >= 20);
        assert!(s.probes.iter().any(|p| p.client == Client::Grpc));
        assert!(s.probes.iter().any(|p| p.client == Client::H2c));
        assert!(s.probes.iter().any(|p| p.ipv6), "IPv6 probes");
        assert!(!s.case.cluster.dns.is_empty());
        // the stored document keeps the clients, so `check` sees them too
        let again = Scenario::from_document(s.document.clone(), None).unwrap();
        assert_eq!(
            again
                .probes
                .iter()
                .filter(|p| p.client != Client::Default)
                .count(),
            s.probes
                .iter()
                .filter(|p| p.client != Client::Default)
                .count()
        );
    }

    #[test]
    fn an_unknown_client_is_an_error_naming_the_probe() {
        let doc: Value = serde_yaml::from_str(
            "format: netpol-oracle/v1\nsemantics: cilium\ncluster: {}\nprobes:\n- {from: a/b, to: a/c, port: 1, expect: allow, client: telnet}\n",
        )
        .unwrap();
        let e = Scenario::from_document(doc, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("probes[0].client"), "{e}");
    }

    #[test]
    fn the_probe_family_is_read_and_checked() {
        let doc = |family: &str| -> Value {
            serde_yaml::from_str(&format!(
                "format: netpol-oracle/v1\nsemantics: cilium\ncluster: {{}}\nprobes:\n- {{from: a/b, to: a/c, port: 1, expect: allow}}\n- {{from: a/b, to: a/c, port: 1, expect: allow, family: {family}}}\n"
            ))
            .unwrap()
        };
        let s = Scenario::from_document(doc("ipv6"), None).unwrap();
        assert_eq!(
            s.probes.iter().map(|p| p.ipv6).collect::<Vec<_>>(),
            [false, true]
        );
        let s = Scenario::from_document(doc("ipv4"), None).unwrap();
        assert!(s.probes.iter().all(|p| !p.ipv6));
        let e = Scenario::from_document(doc("ipx"), None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("probes[1].family"), "{e}");
    }

    #[test]
    fn a_folder_without_probes_names_the_file_and_the_key() {
        let dir = std::env::temp_dir().join(format!("ward-scenario-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cluster.yaml"), "cluster: {}\n").unwrap();
        fs::write(dir.join("probes.yaml"), "checks: []\n").unwrap();
        let e = Scenario::load(&dir, None).err().unwrap().to_string();
        fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains("probes.yaml: no `probes:` key"), "{e}");
        assert!(e.starts_with("scenario "), "{e}");
    }
}
