//! A small metrics registry rendered in the Prometheus text exposition
//! format 0.0.4: counters, gauges and histograms with labels, one
//! process-wide registry ([`global`]). Every metric is named `vmdk_...`;
//! `docs/operations.md` lists them.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Mutex, OnceLock};

/// Content type of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the duration histograms' buckets: from a
/// millisecond for a cached lookup to minutes for an eagerzeroedthick create.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Hist {
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

type Labels = Vec<(String, String)>;

#[derive(Debug)]
struct Family {
    help: String,
    kind: Kind,
    values: BTreeMap<Labels, f64>,
    hists: BTreeMap<Labels, Hist>,
}

/// A set of metric families.
#[derive(Debug, Default)]
pub struct Registry {
    families: Mutex<BTreeMap<String, Family>>,
}

/// The process-wide registry both daemons expose on `/metrics`.
pub fn global() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::default)
}

fn labels(l: &[(&str, &str)]) -> Labels {
    l.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn render_labels(l: &Labels, extra: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = l.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

impl Registry {
    fn with_family<T>(&self, name: &str, help: &str, kind: Kind, f: impl FnOnce(&mut Family) -> T) -> T {
        let mut fams = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let fam = fams.entry(name.to_owned()).or_insert_with(|| Family {
            help: help.to_owned(),
            kind,
            values: BTreeMap::new(),
            hists: BTreeMap::new(),
        });
        debug_assert_eq!(fam.kind, kind, "metric {name} registered as two kinds");
        f(fam)
    }

    /// Declares a family so that it is shown (with no samples) before its
    /// first value.
    pub fn describe_counter(&self, name: &str, help: &str) {
        self.with_family(name, help, Kind::Counter, |_| ());
    }

    /// Adds `by` to a counter.
    pub fn inc_counter(&self, name: &str, help: &str, l: &[(&str, &str)], by: f64) {
        self.with_family(name, help, Kind::Counter, |f| {
            *f.values.entry(labels(l)).or_default() += by
        });
    }

    /// Sets a gauge.
    pub fn set_gauge(&self, name: &str, help: &str, l: &[(&str, &str)], v: f64) {
        self.with_family(name, help, Kind::Gauge, |f| {
            f.values.insert(labels(l), v);
        });
    }

    /// Replaces all of a gauge family's samples (e.g. one per state).
    pub fn replace_gauges(&self, name: &str, help: &str, samples: &[(Vec<(&str, &str)>, f64)]) {
        self.with_family(name, help, Kind::Gauge, |f| {
            f.values = samples.iter().map(|(l, v)| (labels(l), *v)).collect();
        });
    }

    /// Records one observation in a histogram with [`DURATION_BUCKETS`].
    pub fn observe(&self, name: &str, help: &str, l: &[(&str, &str)], v: f64) {
        self.with_family(name, help, Kind::Histogram, |f| {
            let h = f.hists.entry(labels(l)).or_insert_with(|| Hist {
                buckets: vec![0; DURATION_BUCKETS.len()],
                ..Hist::default()
            });
            for (i, le) in DURATION_BUCKETS.iter().enumerate() {
                if v <= *le {
                    h.buckets[i] += 1;
                }
            }
            h.sum += v;
            h.count += 1;
        });
    }

    /// The value of a counter or gauge sample, if it exists (for tests and
    /// for the daemons' own checks).
    pub fn value(&self, name: &str, l: &[(&str, &str)]) -> Option<f64> {
        let fams = self.families.lock().unwrap_or_else(|e| e.into_inner());
        fams.get(name)?.values.get(&labels(l)).copied()
    }

    /// The whole registry in the text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let fams = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for (name, f) in fams.iter() {
            let _ = writeln!(
                out,
                "# HELP {name} {}",
                f.help.replace('\\', "\\\\").replace('\n', "\\n")
            );
            let _ = writeln!(out, "# TYPE {name} {}", f.kind.name());
            for (l, v) in &f.values {
                let _ = writeln!(out, "{name}{} {}", render_labels(l, None), number(*v));
            }
            for (l, h) in &f.hists {
                for (le, n) in DURATION_BUCKETS.iter().zip(&h.buckets) {
                    let _ = writeln!(out, "{name}_bucket{} {n}", render_labels(l, Some(("le", &number(*le)))));
                }
                let _ = writeln!(
                    out,
                    "{name}_bucket{} {}",
                    render_labels(l, Some(("le", "+Inf"))),
                    h.count
                );
                let _ = writeln!(out, "{name}_sum{} {}", render_labels(l, None), number(h.sum));
                let _ = writeln!(out, "{name}_count{} {}", render_labels(l, None), h.count);
            }
        }
        out
    }
}

/// Sets `vmdk_build_info{version,program} 1`.
pub fn build_info(program: &str, version: &str) {
    global().set_gauge(
        "vmdk_build_info",
        "Build of the running program; always 1.",
        &[("program", program), ("version", version)],
        1.0,
    );
}

/// The name of the agent operations histogram.
pub const AGENT_OPERATION_DURATION: &str = "vmdk_agent_operation_duration_seconds";

/// Records one agent operation (`create`, `get`, `list`, `remove`,
/// `attach`, `detach`, `formatted`, `version`) and how it ended (`ok` or
/// `error`), whether the agent is `vmdk-agent serve` or embedded in the plugin.
pub fn agent_operation(op: &str, ok: bool, seconds: f64) {
    global().observe(
        AGENT_OPERATION_DURATION,
        "Time the agent took for an operation, by operation and result.",
        &[("op", op), ("result", if ok { "ok" } else { "error" })],
        seconds,
    );
}

/// `vmdk_volumes{state}`, counted from a listing of the agent's volumes,
/// which can be slow (it reads each volume's files), so it is redone only
/// when a mutating call may have changed it ([`VolumeCensus::mark_dirty`])
/// or when older than [`VolumeCensus::MAX_AGE`]; other scrapes show the
/// last count.
#[derive(Debug, Default)]
pub struct VolumeCensus {
    last: tokio::sync::Mutex<Option<std::time::Instant>>,
    dirty: std::sync::atomic::AtomicBool,
}

/// The name of the volumes gauge.
pub const VOLUMES: &str = "vmdk_volumes";

impl VolumeCensus {
    /// Longest time a count is shown without a new listing.
    pub const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(60);

    /// The process-wide census.
    pub fn global() -> &'static VolumeCensus {
        static C: OnceLock<VolumeCensus> = OnceLock::new();
        C.get_or_init(VolumeCensus::default)
    }

    /// The next scrape lists again.
    pub fn mark_dirty(&self) {
        self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lists again with `list` when the count is stale, and sets the gauge.
    pub async fn refresh<F, Fut>(&self, list: F)
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<vmdk_protocol::VolumeInfo>, String>>,
    {
        let mut last = self.last.lock().await;
        let dirty = self.dirty.swap(false, std::sync::atomic::Ordering::SeqCst);
        if !dirty && last.is_some_and(|t| t.elapsed() < Self::MAX_AGE) {
            return;
        }
        match list().await {
            Ok(vols) => {
                let attached = vols
                    .iter()
                    .filter(|v| v.status == vmdk_protocol::AttachStatus::Attached)
                    .count();
                let detached = vols.len() - attached;
                global().replace_gauges(
                    VOLUMES,
                    "Volumes the agent knows, by state (attached to a VM, or detached).",
                    &[
                        (vec![("state", "attached")], attached as f64),
                        (vec![("state", "detached")], detached as f64),
                    ],
                );
                *last = Some(std::time::Instant::now());
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot list volumes for the vmdk_volumes gauge; showing the last count");
                self.mark_dirty();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let r = Registry::default();
        r.inc_counter("vmdk_x_total", "Xs.", &[("method", "Create"), ("result", "ok")], 1.0);
        r.inc_counter("vmdk_x_total", "Xs.", &[("method", "Create"), ("result", "ok")], 2.0);
        r.set_gauge("vmdk_g", "G.", &[("state", "a\"b")], 4.0);
        r.observe("vmdk_d_seconds", "D.", &[("op", "create")], 0.02);
        r.observe("vmdk_d_seconds", "D.", &[("op", "create")], 400.0);
        let t = r.render();
        assert!(
            t.contains("# TYPE vmdk_x_total counter\nvmdk_x_total{method=\"Create\",result=\"ok\"} 3\n"),
            "{t}"
        );
        assert!(t.contains("vmdk_g{state=\"a\\\"b\"} 4\n"), "{t}");
        assert!(t.contains("# TYPE vmdk_d_seconds histogram\n"), "{t}");
        assert!(
            t.contains("vmdk_d_seconds_bucket{op=\"create\",le=\"0.01\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("vmdk_d_seconds_bucket{op=\"create\",le=\"0.025\"} 1\n"),
            "{t}"
        );
        assert!(t.contains("vmdk_d_seconds_bucket{op=\"create\",le=\"300\"} 1\n"), "{t}");
        assert!(
            t.contains("vmdk_d_seconds_bucket{op=\"create\",le=\"+Inf\"} 2\n"),
            "{t}"
        );
        assert!(t.contains("vmdk_d_seconds_count{op=\"create\"} 2\n"), "{t}");
        assert_eq!(
            r.value("vmdk_x_total", &[("method", "Create"), ("result", "ok")]),
            Some(3.0)
        );
    }
}
