//! What the agent tells its operator: logs (every daemon message is a `tracing` event
//! with fields, printed on stderr by the subscriber installed here), metrics, the event
//! stream of drops and audit records, and the audit log.
//!
//! The log filter is `--log-level` (a level or `RUST_LOG`-style directives such as
//! `info,agent::reconcile=debug`), else `RUST_LOG`, else `info`. `--log-format json`
//! prints one JSON object per line (time, level, target, message and the event's fields
//! at the top level) for a log pipeline; `text` is for people.

pub mod audit;
pub mod events;
pub mod metrics;

use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// The filter used when neither `--log-level` nor `RUST_LOG` says otherwise.
pub const DEFAULT_LEVEL: &str = "info";

/// How log lines are printed.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The logging flags every `ward` command takes.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct LogArgs {
    /// Log filter: a level (error, warn, info, debug, trace) or RUST_LOG-style directives
    /// (`info,agent::reconcile=debug`). Without it, RUST_LOG applies [default: info].
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// Log lines as `text` or `json` (one object per line, for log pipelines).
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {value:?} is not a log filter: {source}")]
    Filter {
        what: &'static str,
        value: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a logger is installed already")]
    Installed,
}

/// The filter: `level` (from `--log-level`), else `RUST_LOG`, else [`DEFAULT_LEVEL`].
pub fn filter(level: Option<&str>) -> Result<EnvFilter, Error> {
    let (what, value) = match (level, std::env::var("RUST_LOG")) {
        (Some(l), _) => ("--log-level", l.to_string()),
        (None, Ok(env)) if !env.trim().is_empty() => ("RUST_LOG", env),
        (None, _) => ("the default level", DEFAULT_LEVEL.to_string()),
    };
    EnvFilter::builder()
        .parse(&value)
        .map_err(|source| Error::Filter {
            what,
            value,
            source,
        })
}

/// The subscriber that prints events passing `filter` in `format` to `writer`.
pub fn subscriber<W>(
    filter: EnvFilter,
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .finish(),
        ),
    }
}

/// Installs the process's subscriber (stderr; stdout carries the audit log by default).
pub fn init(args: &LogArgs) -> Result<(), Error> {
    let filter = filter(args.log_level.as_deref())?;
    let ansi = std::io::stderr().is_terminal();
    tracing::subscriber::set_global_default(subscriber(
        filter,
        args.log_format,
        std::io::stderr,
        ansi,
    ))
    .map_err(|_| Error::Installed)
}

/// A log writer into memory, for tests that check what is logged.
#[cfg(test)]
pub(crate) mod capture {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;

        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    impl Captured {
        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::capture::Captured;
    use super::*;

    #[test]
    fn json_lines_carry_the_fields_and_the_filter_applies() {
        let out = Captured::default();
        let filter = EnvFilter::builder().parse("info,agent=debug").unwrap();
        let sub = subscriber(filter, LogFormat::Json, out.clone(), false);
        tracing::subscriber::with_default(sub, || {
            tracing::debug!(target: "agent::reconcile", generation = 7, "published");
            tracing::debug!(target: "other", "not shown");
            tracing::warn!(kind = "pods", "watch failed");
        });
        let lines: Vec<serde_json::Value> = out
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["level"], "DEBUG");
        assert_eq!(lines[0]["message"], "published");
        assert_eq!(lines[0]["generation"], 7);
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["kind"], "pods");
    }

    #[test]
    fn a_bad_filter_is_named() {
        let e = filter(Some("info,=bogus=")).unwrap_err().to_string();
        assert!(e.contains("--log-level"), "{e}");
    }
}
