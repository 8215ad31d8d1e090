//! The `netpol-oracle/v1` case format: a cluster, policies and probes with expected
//! verdicts. Parsing and evaluation are pure; reading files is the caller's job.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use crate::api;
use crate::cluster::{Cluster, EndpointRef};
use crate::compile::{CompileOptions, Model, Scope};
use crate::error::PolicyError;
use crate::http::SimpleRequest;
use crate::policy::Protocol;
use crate::verdict::{Query, TlsProbe, Verdict};

pub const FORMAT: &str = "netpol-oracle/v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Semantics {
    Kubernetes,
    Cilium,
    /// Calico's (`projectcalico.org/v3` policies; Kubernetes NetworkPolicies in the
    /// `default` tier at order 1000, their ipBlocks matching pod addresses as Calico's
    /// `nets` do).
    Calico,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Case {
    pub format: String,
    #[serde(default)]
    pub id: Option<Value>,
    #[serde(default)]
    pub name: String,
    pub semantics: Semantics,
    pub cluster: Cluster,
    #[serde(default)]
    pub policies: Vec<Value>,
    #[serde(default)]
    pub probes: Vec<Probe>,
    #[serde(default)]
    pub variants: BTreeMap<String, Variant>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Variant {
    #[serde(default)]
    pub note: Option<String>,
    #[serde(default)]
    pub probes: Vec<Probe>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Allow,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: Protocol,
    pub expect: Expect,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<ProbeHttp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<ProbeDns>,
    /// A TLS session: `{sni: NAME}`, or `{}` for a ClientHello without SNI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ProbeTls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeHttp {
    #[serde(default = "get")]
    pub method: String,
    #[serde(default = "slash")]
    pub path: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn get() -> String {
    "GET".into()
}

fn slash() -> String {
    "/".into()
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeDns {
    pub query: String,
}

/// The probe's ClientHello: the SNI bytes exactly as written (case included), or none.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeTls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
}

impl Probe {
    /// Probes are the same probe (for variants) when everything but the expectation and
    /// notes is equal.
    fn same_flow(&self, other: &Probe) -> bool {
        self.from == other.from
            && self.to == other.to
            && self.port == other.port
            && self.protocol == other.protocol
            && self.http == other.http
            && self.dns == other.dns
            && self.tls == other.tls
    }

    /// The model's verdict for this probe (a TLS session when `tls` is set).
    pub fn verdict(&self, model: &Model) -> Result<Verdict, String> {
        let q = self.query()?;
        match &self.tls {
            None => model.query(&q),
            Some(t) => model.query_tls(&q, &TlsProbe { sni: t.sni.clone() }),
        }
        .map_err(|e| e.to_string())
    }

    pub fn query(&self) -> Result<Query, String> {
        Ok(Query {
            from: EndpointRef::parse(&self.from)?,
            to: EndpointRef::parse(&self.to)?,
            port: self.port,
            protocol: self.protocol,
            http: self.http.as_ref().map(|h| SimpleRequest {
                method: h.method.clone(),
                path: h.path.clone(),
                host: None,
                headers: h
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            }),
            dns: self.dns.as_ref().map(|d| d.query.clone()),
        })
    }

    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} -> {} {}/{}",
            self.from, self.to, self.protocol, self.port
        );
        if let Some(t) = &self.tls {
            match &t.sni {
                Some(n) => s.push_str(&format!(" TLS SNI {n}")),
                None => s.push_str(" TLS (no SNI)"),
            }
        }
        if let Some(h) = &self.http {
            let scheme = if self.tls.is_some() { "HTTPS" } else { "HTTP" };
            s.push_str(&format!(" {scheme} {} {}", h.method, h.path));
            for (k, v) in &h.headers {
                s.push_str(&format!(" {k}:{v}"));
            }
        }
        if let Some(d) = &self.dns {
            s.push_str(&format!(" DNS {}", d.query));
        }
        s
    }
}

/// A case file could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CaseError {
    #[error("{0}")]
    Parse(String),
    #[error("unsupported format {0:?} (expected {FORMAT})")]
    Format(String),
    #[error("invalid policy: {0}")]
    Policy(PolicyError),
}

/// Parses a case file.
pub fn parse_case(text: &str) -> Result<Case, CaseError> {
    let case: Case = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text))
        .map_err(|e| {
            let path = e.path().to_string();
            CaseError::Parse(format!("{path}: {}", e.into_inner()))
        })?;
    if case.format != FORMAT {
        return Err(CaseError::Format(case.format));
    }
    Ok(case)
}

/// The outcome of one probe.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeResult {
    pub index: usize,
    pub probe: Probe,
    pub passed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Whether CIDR selectors match cluster IPs under a case's semantics and profile.
pub fn options_for(semantics: Semantics, profile: Option<&str>) -> CompileOptions {
    CompileOptions {
        cidr_matches_cluster: matches!(semantics, Semantics::Kubernetes | Semantics::Calico)
            && profile != Some("cilium-default"),
    }
}

impl Case {
    /// The probes in force under a profile: a variant's probes replace the probes of the
    /// same flow.
    pub fn probes_for(&self, profile: Option<&str>) -> Vec<Probe> {
        let mut probes = self.probes.clone();
        if let Some(v) = profile.and_then(|p| self.variants.get(p)) {
            for vp in &v.probes {
                match probes.iter_mut().find(|p| p.same_flow(vp)) {
                    Some(p) => *p = vp.clone(),
                    None => probes.push(vp.clone()),
                }
            }
        }
        probes
    }

    /// Compiles the case. Invalid policies are an error: a case's policies are meant to
    /// be valid.
    pub fn compile(&self, profile: Option<&str>, file: Option<&str>) -> Result<Model, CaseError> {
        self.compile_scoped(profile, file, Scope::Cluster)
    }

    /// Compiles the case for the endpoints of `scope` (a node's, as its agent does).
    pub fn compile_scoped(
        &self,
        profile: Option<&str>,
        file: Option<&str>,
        scope: Scope,
    ) -> Result<Model, CaseError> {
        let mut policies = Vec::new();
        for v in &self.policies {
            let parsed = api::parse_value(v.clone(), file);
            if let Some(e) = parsed.errors.into_iter().next() {
                return Err(CaseError::Policy(e));
            }
            for o in parsed.objects {
                policies.extend(
                    o.translate()
                        .map_err(|mut e| CaseError::Policy(e.remove(0)))?,
                );
            }
        }
        Ok(Model::compile_scoped(
            &self.cluster,
            policies,
            options_for(self.semantics, profile),
            scope,
        ))
    }

    /// Runs every probe.
    pub fn run(
        &self,
        profile: Option<&str>,
        file: Option<&str>,
    ) -> Result<Vec<ProbeResult>, CaseError> {
        let model = self.compile(profile, file)?;
        Ok(self
            .probes_for(profile)
            .into_iter()
            .enumerate()
            .map(|(index, probe)| {
                let verdict = probe.verdict(&model);
                match verdict {
                    Ok(v) => ProbeResult {
                        index,
                        passed: v.allowed == (probe.expect == Expect::Allow),
                        probe,
                        verdict: Some(v),
                        error: None,
                    },
                    Err(e) => ProbeResult {
                        index,
                        probe,
                        passed: false,
                        verdict: None,
                        error: Some(e),
                    },
                }
            })
            .collect())
    }
}
