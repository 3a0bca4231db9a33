//! How both daemons log: to the journal when systemd started them, else to
//! stderr as text or JSON lines. See `docs/operations.md`.
//!
//! * Each request runs in a span named `request` with the fields
//!   `operation` (Docker method or agent route), `volume` and, for
//!   Mount/Unmount, `mount_id`; every event logged while serving it
//!   carries them.
//! * Each mutating call ends with one audit event, target [`AUDIT`], with
//!   `caller`, `operation`, `volume` and `result` ([`audit`]).
//! * The filter is `VMDK_LOG` (tracing's `EnvFilter` syntax, e.g.
//!   `debug` or `info,vmdk_plugin=debug`).

use std::str::FromStr;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The target of audit events.
pub const AUDIT: &str = "audit";

/// Where and how log lines go (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// The journal when systemd started the process (its stderr is the
    /// journal stream, or `INVOCATION_ID` is set), else text on stderr.
    #[default]
    Auto,
    /// Human-readable lines on stderr.
    Text,
    /// One JSON object per line on stderr, with the current span's fields
    /// under `span` and the event's under `fields`.
    Json,
    /// The systemd journal (native protocol), with each field as a
    /// journal field.
    Journald,
}

/// A `--log-format` value that is none of the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown log format {0:?}; valid formats are auto, text, json, journald")]
pub struct LogFormatError(pub String);

impl FromStr for LogFormat {
    type Err = LogFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::Auto),
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            "journald" | "journal" => Ok(Self::Journald),
            _ => Err(LogFormatError(s.to_owned())),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Text => "text",
            Self::Json => "json",
            Self::Journald => "journald",
        })
    }
}

/// Whether systemd started this process with its stderr connected to the
/// journal: `JOURNAL_STREAM` (`device:inode`) names stderr's file, as
/// systemd.exec(5) describes; or `INVOCATION_ID` is set (a unit whose
/// output systemd collects).
pub fn under_systemd() -> bool {
    if let Ok(v) = std::env::var("JOURNAL_STREAM") {
        if let Some((dev, ino)) = v.split_once(':') {
            if let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) {
                if dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino) {
                    return true;
                }
            }
        }
    }
    std::env::var_os("INVOCATION_ID").is_some_and(|v| !v.is_empty())
}

/// Logging settings of one program.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// `--log-format`.
    pub format: LogFormat,
    /// The filter when `VMDK_LOG` is unset, e.g. `info`.
    pub default_filter: String,
    /// A short-lived command (admin CLI): no timestamps or targets in text.
    pub command: bool,
    /// The journal's `SYSLOG_IDENTIFIER`, e.g. `vmdk-plugin`.
    pub identifier: &'static str,
}

/// Which output [`init`] chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOutput {
    /// Text lines on stderr.
    Text,
    /// JSON lines on stderr.
    Json,
    /// The systemd journal.
    Journald,
}

fn filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_env("VMDK_LOG").unwrap_or_else(|_| EnvFilter::new(default))
}

/// Installs the global subscriber; returns where logs go. With
/// [`LogFormat::Journald`] (or `Auto` under systemd) but no journal socket,
/// falls back to text on stderr and says so.
pub fn init(opts: &LogOptions) -> LogOutput {
    let want_journal = match opts.format {
        LogFormat::Journald => true,
        LogFormat::Auto => under_systemd(),
        _ => false,
    };
    let mut journal_error = None;
    if want_journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_syslog_identifier(opts.identifier.to_owned());
                tracing_subscriber::registry()
                    .with(layer.with_filter(filter(&opts.default_filter)))
                    .init();
                return LogOutput::Journald;
            }
            Err(e) => journal_error = Some(e),
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let out = if opts.format == LogFormat::Json {
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr)
                    .with_filter(filter(&opts.default_filter)),
            )
            .init();
        LogOutput::Json
    } else if opts.command {
        // An admin command's audit events also go to the journal when
        // there is one, so that changes made by hand are on record with
        // the daemons' own.
        let journal = tracing_journald::layer().ok().map(|l| {
            l.with_syslog_identifier(opts.identifier.to_owned())
                .with_filter(tracing_subscriber::filter::Targets::new().with_target(AUDIT, tracing::Level::INFO))
        });
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .without_time()
                    .with_target(false)
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr)
                    .with_filter(filter(&opts.default_filter)),
            )
            .with(journal)
            .init();
        LogOutput::Text
    } else {
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr)
                    .with_filter(filter(&opts.default_filter)),
            )
            .init();
        LogOutput::Text
    };
    if let Some(e) = journal_error {
        tracing::warn!(error = %e, "cannot connect to the systemd journal; logging to stderr instead");
    }
    out
}

/// The span one request runs in. `volume` and `mount_id` start empty and
/// are filled in by the handler once it has decoded the request
/// ([`record_request`]).
pub fn request_span(operation: &str) -> tracing::Span {
    tracing::info_span!(
        "request",
        operation = %operation,
        volume = tracing::field::Empty,
        mount_id = tracing::field::Empty
    )
}

/// Records the volume (and mount ID, if any) in the current request span.
pub fn record_request(volume: &str, mount_id: &str) {
    let span = tracing::Span::current();
    if !volume.is_empty() {
        span.record("volume", volume);
    }
    if !mount_id.is_empty() {
        span.record("mount_id", mount_id);
    }
}

/// Logs the audit event of a mutating call: who asked, for what, and how
/// it ended (`ok`, or the error text).
pub fn audit(caller: &str, operation: &str, volume: &str, result: Result<(), &str>) {
    match result {
        Ok(()) => tracing::info!(
            target: AUDIT,
            audit = true,
            caller,
            operation,
            volume,
            result = "ok",
            "{operation} {volume} by {caller}: ok"
        ),
        Err(e) => tracing::info!(
            target: AUDIT,
            audit = true,
            caller,
            operation,
            volume,
            result = "error",
            error = e,
            "{operation} {volume} by {caller}: refused: {e}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_name_the_valid_ones() {
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!("Text".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert_eq!("".parse::<LogFormat>().unwrap(), LogFormat::Auto);
        assert_eq!("journald".parse::<LogFormat>().unwrap(), LogFormat::Journald);
        let e = "yaml".parse::<LogFormat>().unwrap_err().to_string();
        assert!(
            e.contains("\"yaml\"") && e.contains("auto, text, json, journald"),
            "{e}"
        );
    }
}
