//! Reading YAML inputs from files and folders.

use std::fs;
use std::path::{Path, PathBuf};

use policy_model::api::{self, Object, Parsed};
use policy_model::{Cluster, CompileOptions, Model, PolicyError};
use serde_yaml::Value;

/// Why inputs could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid YAML: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{path}: {field}: {reason}")]
    Cluster {
        path: PathBuf,
        field: String,
        reason: String,
    },
    /// A file or folder of YAML files could not be listed (the walk the lab shares).
    #[error(transparent)]
    Files(Box<scenario::Error>),
}

type Result<T> = std::result::Result<T, Error>;

fn read_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// The YAML files named by `paths`: files as given, folders searched recursively for
/// `*.yaml` / `*.yml`, in name order (the scenario crate's walk, which `ward-lab` reads
/// its scenario folders with too).
pub fn yaml_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    scenario::yaml_files(paths).map_err(|e| Error::Files(Box::new(e)))
}

/// Every policy object in the given files (case files contribute their `policies`).
pub struct Loaded {
    pub objects: Vec<Object>,
    pub errors: Vec<PolicyError>,
    pub files: usize,
}

pub fn load_policies(paths: &[PathBuf]) -> Result<Loaded> {
    let files = yaml_files(paths)?;
    let mut loaded = Loaded {
        objects: Vec::new(),
        errors: Vec::new(),
        files: files.len(),
    };
    for f in &files {
        let text = fs::read_to_string(f).map_err(read_error(f))?;
        let name = f.display().to_string();
        let parsed = api::parse(&text, Some(&name));
        absorb(parsed, &name, &mut loaded);
    }
    Ok(loaded)
}

fn absorb(parsed: Parsed, file: &str, loaded: &mut Loaded) {
    loaded.objects.extend(parsed.objects);
    loaded.errors.extend(parsed.errors);
    for (value, line) in parsed.other {
        // a conformance case: its policies
        if let Some(Value::Sequence(items)) = value.get("policies") {
            for item in items {
                let p = api::parse_value(item.clone(), Some(file));
                absorb(p, file, loaded);
            }
        } else if value.get("cluster").is_none() && value.get("pods").is_none() {
            loaded.errors.push(PolicyError {
                file: Some(file.to_string()),
                line,
                object: None,
                path: String::new(),
                reason:
                    "not a Kubernetes object (no apiVersion), a cluster file or a conformance case"
                        .into(),
            });
        }
    }
}

/// Loads a cluster file and policy manifests and compiles them. Invalid objects are left
/// out with a warning (a log event) naming each error; the others are enforced.
pub fn compile_model(
    cluster: &Path,
    policies: &[PathBuf],
    options: CompileOptions,
) -> Result<Model> {
    let cluster = load_cluster(cluster)?;
    let loaded = load_policies(policies)?;
    let mut valid = Vec::new();
    let mut errors = loaded.errors;
    for o in &loaded.objects {
        match o.translate() {
            Ok(p) => valid.extend(p),
            Err(e) => errors.extend(e),
        }
    }
    for e in &errors {
        tracing::warn!(error = %e, "left out");
    }
    Ok(Model::compile(&cluster, valid, options))
}

/// Reads a cluster file: the `cluster:` shape on its own, or a whole case file.
pub fn load_cluster(path: &Path) -> Result<Cluster> {
    let text = fs::read_to_string(path).map_err(read_error(path))?;
    let value: Value = serde_yaml::from_str(&text).map_err(|source| Error::Yaml {
        path: path.to_path_buf(),
        source,
    })?;
    let value = match value.get("cluster") {
        Some(c) => c.clone(),
        None => value,
    };
    serde_path_to_error::deserialize(value).map_err(|e| Error::Cluster {
        path: path.to_path_buf(),
        field: e.path().to_string(),
        reason: e.inner().to_string(),
    })
}
