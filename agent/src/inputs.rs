//! Reading YAML inputs from files and folders.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use policy_model::api::{self, Object, Parsed};
use policy_model::{Cluster, CompileOptions, Model, PolicyError};
use serde_yaml::Value;

pub use scenario::yaml_files;

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
        let text = fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
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
/// out with a warning on stderr naming each error; the others are enforced.
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
        eprintln!("warning: left out: {e}");
    }
    Ok(Model::compile(&cluster, valid, options))
}

/// Reads a cluster file: the `cluster:` shape on its own, or a whole case file.
pub fn load_cluster(path: &Path) -> Result<Cluster> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: Value =
        serde_yaml::from_str(&text).with_context(|| format!("{}: invalid YAML", path.display()))?;
    let value = match value.get("cluster") {
        Some(c) => c.clone(),
        None => value,
    };
    serde_path_to_error::deserialize(value)
        .map_err(|e| anyhow::anyhow!("{}: {}: {}", path.display(), e.path(), e.inner()))
}
