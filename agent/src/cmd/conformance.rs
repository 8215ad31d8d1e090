//! `ward conformance run`: netpol-oracle cases (and `ward-lab` scenario folders) against
//! the policy model.

use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use policy_model::conformance::{parse_case, ProbeResult};
use serde::Serialize;

use crate::inputs::yaml_files;
use scenario::Scenario;

#[derive(Subcommand)]
pub enum Command {
    /// Run every probe of every case file (or every *.yaml under a folder).
    Run {
        /// Case files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Apply a case's `variants.PROFILE` (e.g. cilium-default: Cilium's own defaults).
        #[arg(long)]
        profile: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Serialize)]
struct CaseReport {
    file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    probes: Vec<ProbeResult>,
}

pub fn run(cmd: Command) -> Result<ExitCode> {
    let Command::Run {
        paths,
        profile,
        format,
    } = cmd;
    let mut reports = Vec::new();
    // a lab scenario folder (cluster.yaml, policies/, probes.yaml) is one case
    let (scenarios, paths): (Vec<PathBuf>, Vec<PathBuf>) =
        paths.into_iter().partition(|p| Scenario::is_folder(p));
    let mut files: Vec<PathBuf> = scenarios;
    files.extend(yaml_files(&paths)?);
    for f in files {
        let file = f.display().to_string();
        let loaded = if Scenario::is_folder(&f) {
            Scenario::load(&f, None)
                .map(|s| s.case)
                .map_err(|e| format!("{e:#}"))
        } else {
            fs::read_to_string(&f)
                .map_err(|e| e.to_string())
                .and_then(|text| parse_case(&text).map_err(|e| e.to_string()))
        };
        let result = loaded.and_then(|case| {
            case.run(profile.as_deref(), Some(&file))
                .map_err(|e| e.to_string())
        });
        reports.push(match result {
            Ok(probes) => CaseReport {
                file,
                error: None,
                probes,
            },
            Err(e) => CaseReport {
                file,
                error: Some(e),
                probes: Vec::new(),
            },
        });
    }
    let passed: usize = reports
        .iter()
        .map(|r| r.probes.iter().filter(|p| p.passed).count())
        .sum();
    // a case that cannot run counts as one failed probe
    let failed: usize = reports
        .iter()
        .map(|r| r.probes.iter().filter(|p| !p.passed).count() + usize::from(r.error.is_some()))
        .sum();
    match format {
        Format::Json => {
            #[derive(Serialize)]
            struct Out<'a> {
                cases: &'a [CaseReport],
                passed: usize,
                failed: usize,
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&Out {
                    cases: &reports,
                    passed,
                    failed
                })?
            );
        }
        Format::Text => {
            for r in &reports {
                if let Some(e) = &r.error {
                    println!("FAIL {}: {e}", r.file);
                }
                for p in r.probes.iter().filter(|p| !p.passed) {
                    let expected = format!("{:?}", p.probe.expect).to_lowercase();
                    match (&p.verdict, &p.error) {
                        (Some(v), _) => println!(
                            "FAIL {} probe {}: {}: expected {expected}, got {}",
                            r.file,
                            p.index,
                            p.probe.describe(),
                            v.summary()
                        ),
                        (None, Some(e)) => println!(
                            "FAIL {} probe {}: {}: {e}",
                            r.file,
                            p.index,
                            p.probe.describe()
                        ),
                        (None, None) => {}
                    }
                }
            }
            println!("{passed} passed, {failed} failed");
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
