//! Errors that name where they are: the file (and line, where the YAML parser gives it),
//! the object (kind, namespace, name), the field path and the reason.

use std::fmt;

use serde::Serialize;

/// One problem found in an input object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct PolicyError {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// `Kind namespace/name`, when the object could be identified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// Field path inside the object, e.g. `spec.egress[0].toPorts[0].rules.http[1].path`.
    pub path: String,
    pub reason: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{file}:{line}: ")?,
            (Some(file), None) => write!(f, "{file}: ")?,
            _ => {}
        }
        if let Some(o) = &self.object {
            write!(f, "{o}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.reason)
    }
}

/// Collects field errors while an object is validated and translated.
#[derive(Debug, Default)]
pub struct Errors {
    pub list: Vec<FieldError>,
}

/// A problem at a field path, before the object and file are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub reason: String,
}

impl Errors {
    pub fn add(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.list.push(FieldError {
            path: path.into(),
            reason: reason.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Runs `f`, recording its error at `path`; returns its value on success.
    pub fn check<T>(&mut self, path: &str, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(reason) => {
                self.add(path, reason);
                None
            }
        }
    }
}
