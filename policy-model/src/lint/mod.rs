//! `ward policy lint`: practices whose violation silently opens or breaks a cluster, found
//! in manifests before they are applied. Each finding names the file, line, object, field
//! path, a severity and the fix.
//!
//! Without a cluster, whether two policies select the same pods is judged by namespace
//! (a cluster-wide policy may meet any); with one (`--cluster`), by the pods their
//! selectors actually select, and the checks that need pods (CIDRs covering pod or node
//! addresses, selectors that match no pod) run too.

mod checks;
pub mod locate;

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::api::{self, Object};
use crate::cluster::Cluster;
use crate::policy::Policy;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The manifest does not do what it says (or is refused): `ward policy lint` exits 1.
    Error,
    /// Likely not what was meant.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// `Kind namespace/name`.
    pub object: String,
    /// Field path inside the object.
    pub path: String,
    pub severity: Severity,
    /// A short stable name of the check, e.g. `or-peers`.
    pub check: &'static str,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{file}:{line}: ")?,
            (Some(file), None) => write!(f, "{file}: ")?,
            _ => {}
        }
        write!(f, "{} [{}] {}", self.severity, self.check, self.object)?;
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}\n  fix: {}", self.message, self.fix)
    }
}

/// One manifest file's text and name.
pub struct Source {
    pub file: Option<String>,
    pub text: String,
}

/// A parsed object with what it translated to.
pub(crate) struct Item {
    pub object: Object,
    pub policies: Vec<Policy>,
    /// The text of the YAML document the object came from and its first line.
    pub doc: Option<(usize, String)>,
}

/// Finds every listed problem in the manifests (and, with a cluster, against its pods).
pub fn lint(sources: &[Source], cluster: Option<&Cluster>) -> Vec<Finding> {
    let mut items = Vec::new();
    let mut out = Vec::new();
    for s in sources {
        let parsed = api::parse(&s.text, s.file.as_deref());
        let docs: BTreeMap<usize, String> = api::documents(&s.text).into_iter().collect();
        for e in parsed.errors {
            out.push(invalid(&e));
        }
        for o in parsed.objects {
            let doc = o.line.and_then(|l| docs.get(&l).map(|d| (l, d.clone())));
            match o.translate() {
                Ok(policies) => items.push(Item {
                    object: o,
                    policies,
                    doc,
                }),
                Err(errors) => out.extend(errors.iter().map(|e| {
                    let mut f = invalid(e);
                    if let Some((start, text)) = &doc {
                        f.line = Some(locate::line_of(text, *start, &e.path));
                    }
                    f
                })),
            }
        }
    }
    for raw in checks::run(&items, cluster) {
        let item = &items[raw.item];
        out.push(Finding {
            file: item.object.file.clone(),
            line: item
                .doc
                .as_ref()
                .map(|(start, text)| locate::line_of(text, *start, &raw.path))
                .or(item.object.line),
            object: item.object.reference.to_string(),
            path: raw.path,
            severity: raw.severity,
            check: raw.check,
            message: raw.message,
            fix: raw.fix,
        });
    }
    out.sort_by(|a, b| {
        (&a.file, a.line, &a.object, &a.path, a.check)
            .cmp(&(&b.file, b.line, &b.object, &b.path, b.check))
    });
    out.dedup();
    out
}

fn invalid(e: &crate::PolicyError) -> Finding {
    Finding {
        file: e.file.clone(),
        line: e.line,
        object: e.object.clone().unwrap_or_default(),
        path: e.path.clone(),
        severity: Severity::Error,
        check: "invalid",
        message: e.reason.clone(),
        fix: "correct the field; Ward refuses the object and keeps enforcing the others".into(),
    }
}
