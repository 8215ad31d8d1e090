//! The command lines of `docs/runbooks/*.md` parsed by the real command line: every
//! `ward observe` and `ward policy show` (in code blocks and inline), and every
//! `hubble observe` with `ward` in place of `hubble` (the runbooks say Hubble's flags
//! are accepted as written), so the pages cannot drift from the flags.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::SystemTime;

use clap::Parser;

use crate::{cmd, Cli, Command};

/// Shell words of a command line, quotes removed, up to a redirection, pipe or comment.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut started = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                started = true;
            }
            (None, '>' | '|' | '#') => break,
            (None, c) if c.is_whitespace() => {
                if started {
                    out.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            (None, c) => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(cur);
    }
    out
}

/// Every command line of a Markdown page: lines of code blocks (joined over trailing
/// backslashes) and inline code spans.
fn command_lines(page: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in page.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            let l = line.trim();
            if let Some(head) = l.strip_suffix('\\') {
                pending.push_str(head.trim_end());
                pending.push(' ');
                continue;
            }
            pending.push_str(l);
            out.push(std::mem::take(&mut pending));
        } else {
            out.extend(line.split('`').skip(1).step_by(2).map(str::to_string));
        }
    }
    out
}

#[test]
fn every_runbook_command_line_parses_with_the_real_flags() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/runbooks");
    let (mut observe, mut show, mut hubble) = (0, 0, 0);
    let mut pages: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    pages.sort();
    for page in pages {
        let text = std::fs::read_to_string(&page).unwrap();
        for line in command_lines(&text) {
            let mut w = words(&line);
            match w.first().map(String::as_str) {
                Some("hubble") if w.get(1).is_some_and(|x| x == "observe") => {
                    hubble += 1;
                    w[0] = "ward".into();
                }
                Some("ward") => {}
                _ => continue,
            }
            let what = format!("{}: {line}", page.display());
            let ours = match w.get(1).map(String::as_str) {
                Some("observe") => true,
                Some("policy") => w.get(2).is_some_and(|x| x == "show"),
                _ => false,
            };
            if !ours {
                continue;
            }
            let cli = Cli::try_parse_from(&w).unwrap_or_else(|e| panic!("{what}:\n{e}"));
            match cli.command {
                Command::Observe(a) => {
                    observe += 1;
                    a.filter(SystemTime::now())
                        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
                }
                Command::Policy {
                    command: cmd::policy::Command::Show(a),
                } => {
                    show += 1;
                    a.selection().unwrap_or_else(|e| panic!("{what}: {e:#}"));
                }
                _ => {}
            }
        }
    }
    // the pages hold this many at least: a parser that found none would pass vacuously
    assert!(observe >= 20, "{observe} ward observe lines");
    assert!(show >= 8, "{show} ward policy show lines");
    assert!(hubble >= 10, "{hubble} hubble observe lines");
}

#[test]
fn words_split_as_a_shell_does() {
    assert_eq!(
        words(r#"ward policy show -l 'tier in (a, b)' --graph svg > x.svg"#),
        vec![
            "ward",
            "policy",
            "show",
            "-l",
            "tier in (a, b)",
            "--graph",
            "svg"
        ]
    );
    assert_eq!(
        words("ward observe -f # comment"),
        vec!["ward", "observe", "-f"]
    );
    assert_eq!(words(r#"a "" b"#), vec!["a", "", "b"]);
    assert_eq!(
        command_lines("x `ward a` y `b`\n```\nward c \\\n  d\n```\n"),
        vec!["ward a", "b", "ward c d"]
    );
}
