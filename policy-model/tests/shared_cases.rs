//! Every conformance case of the repository (`conformance/cases`, `conformance/cases-calico`)
//! passes in the model. Without them this test fails rather than pass on nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use policy_model::conformance::parse_case;

fn run(folder: &str) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../conformance")
        .join(folder);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut failed = Vec::new();
    let mut probes = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let case = parse_case(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let results = case
            .run(None, f.to_str())
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for r in results {
            probes += 1;
            if !r.passed {
                failed.push(format!(
                    "{}: {} expected {:?}: {}",
                    f.display(),
                    r.probe.describe(),
                    r.probe.expect,
                    r.verdict
                        .map_or(r.error.unwrap_or_default(), |v| v.to_string())
                ));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert!(probes > 0);
    probes
}

#[test]
fn calico_cases_pass() {
    eprintln!("{} probes", run("cases-calico"));
}

#[test]
fn kubernetes_and_cilium_cases_pass() {
    eprintln!("{} probes", run("cases"));
}
