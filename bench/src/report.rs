//! Figures, targets, the printed table and `results.json`.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// Statistics of repeated samples, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// Samples.
    pub n: usize,
    /// Median.
    pub median: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Stats {
    /// Of durations.
    pub fn of(d: &[Duration]) -> Stats {
        Stats::of_ms(&d.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>())
    }

    /// Of milliseconds.
    pub fn of_ms(v: &[f64]) -> Stats {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return Stats {
                n: 0,
                median: f64::NAN,
                p99: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            };
        }
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Stats {
            n: v.len(),
            median: if v.len() % 2 == 1 {
                v[v.len() / 2]
            } else {
                (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
            },
            p99: rank(0.99),
            min: v[0],
            max: v[v.len() - 1],
        }
    }

    fn json(&self) -> Value {
        json!({"n": self.n, "median_ms": self.median, "p99_ms": self.p99, "min_ms": self.min, "max_ms": self.max})
    }
}

/// All figures of one run.
#[derive(Debug)]
pub struct Report {
    machine: Value,
    quick: bool,
    figures: Vec<Value>,
    groups: Vec<Value>,
    fails: Vec<String>,
}

impl Report {
    /// With the machine description `bench/run.sh` collected (JSON).
    pub fn new(machine: Option<&str>, quick: bool) -> Report {
        let machine = machine
            .and_then(|m| serde_json::from_str(m).ok())
            .unwrap_or(Value::Null);
        Report {
            machine,
            quick,
            figures: Vec::new(),
            groups: Vec::new(),
            fails: Vec::new(),
        }
    }

    /// A figure with a target `value <= max`. `unit` is "ms", "x", "MiB"...
    pub fn target(&mut self, group: &str, name: &str, value: f64, unit: &str, max: f64, extra: Value) {
        let pass = value <= max;
        println!(
            "  {name:<58} {:>10} {unit:<4} target <= {:<8} {}",
            fmt(value),
            fmt(max),
            if pass { "PASS" } else { "FAIL" }
        );
        if !pass {
            self.fails.push(format!(
                "{group}: {name} = {} {unit} (target <= {})",
                fmt(value),
                fmt(max)
            ));
        }
        self.figures.push(json!({
            "group": group, "name": name, "value": value, "unit": unit,
            "target_max": max, "pass": pass, "detail": extra,
        }));
    }

    /// A boolean target.
    pub fn check(&mut self, group: &str, name: &str, ok: bool, detail: Value) {
        println!(
            "  {name:<58} {:>10} {:<4} {:<18} {}",
            "",
            "",
            "",
            if ok { "PASS" } else { "FAIL" }
        );
        if !ok {
            self.fails.push(format!("{group}: {name} ({detail})"));
        }
        self.figures
            .push(json!({"group": group, "name": name, "pass": ok, "detail": detail}));
    }

    /// A figure without a target.
    pub fn info(&mut self, group: &str, name: &str, value: f64, unit: &str, extra: Value) {
        println!("  {name:<58} {:>10} {unit:<4}", fmt(value));
        self.figures.push(json!({
            "group": group, "name": name, "value": value, "unit": unit, "detail": extra,
        }));
    }

    /// Median and p99 of samples, with optional targets on each.
    pub fn stats(&mut self, group: &str, name: &str, s: Stats, median_max: Option<f64>, p99_max: Option<f64>) {
        let extra = s.json();
        match median_max {
            Some(m) => self.target(group, &format!("{name} median"), s.median, "ms", m, extra.clone()),
            None => self.info(group, &format!("{name} median"), s.median, "ms", extra.clone()),
        }
        match p99_max {
            Some(m) => self.target(group, &format!("{name} p99"), s.p99, "ms", m, extra),
            None => self.info(group, &format!("{name} p99"), s.p99, "ms", extra),
        }
    }

    /// Hand-run and plugin samples of the same work: both medians and the
    /// ratio of medians against `max_ratio` (or informational).
    pub fn ratio(&mut self, group: &str, name: &str, hand: Stats, ours: Stats, max_ratio: Option<f64>) {
        self.ratio_of(group, name, ("by hand", "vmdk"), hand, ours, max_ratio)
    }

    /// [`Report::ratio`] with other names for the two sides.
    pub fn ratio_of(
        &mut self,
        group: &str,
        name: &str,
        (base, ours_label): (&str, &str),
        hand: Stats,
        ours: Stats,
        max_ratio: Option<f64>,
    ) {
        println!(
            "  {name}: {base} median {} p99 {} ms | {ours_label} median {} p99 {} ms (n={})",
            fmt(hand.median),
            fmt(hand.p99),
            fmt(ours.median),
            fmt(ours.p99),
            ours.n
        );
        let r = ours.median / hand.median;
        let extra = json!({base: hand.json(), ours_label: ours.json(), "p99_ratio": ours.p99 / hand.p99});
        let name = format!("{name} ({ours_label} / {base})");
        match max_ratio {
            Some(m) => self.target(group, &name, r, "x", m, extra),
            None => self.info(group, &name, r, "x", extra),
        }
    }

    /// Records how a group went.
    pub fn group_done(&mut self, group: &str, secs: f64, error: Option<String>) {
        if let Some(e) = &error {
            self.fails.push(format!("{group}: the group failed: {e}"));
        }
        self.groups
            .push(json!({"group": group, "seconds": secs, "error": error}));
    }

    /// Prints the misses.
    pub fn summary(&self) {
        let targets = self.figures.iter().filter(|f| f.get("pass").is_some()).count();
        println!(
            "\n=== summary: {} of {targets} targets met ===",
            targets - self.fails.len().min(targets)
        );
        for f in &self.fails {
            println!("  FAIL {f}");
        }
    }

    /// Writes `results.json`.
    pub fn save(&self, out: &Path) -> anyhow::Result<()> {
        if let Some(d) = out.parent() {
            std::fs::create_dir_all(d)?;
        }
        let v = json!({
            "machine": self.machine,
            "quick": self.quick,
            "groups": self.groups,
            "figures": self.figures,
            "failures": self.fails,
        });
        let tmp = out.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&v)?)?;
        std::fs::rename(&tmp, out)?;
        Ok(())
    }
}

/// Three significant digits or so.
pub fn fmt(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_nearest_rank_p99() {
        let v: Vec<f64> = (1..=200).map(f64::from).rev().collect();
        let s = Stats::of_ms(&v);
        assert_eq!((s.n, s.min, s.max), (200, 1.0, 200.0));
        assert_eq!(s.median, 100.5);
        // The 198th of 200 sorted samples: 99% of them are at or below it.
        assert_eq!(s.p99, 198.0);
        let s = Stats::of_ms(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.p99), (2.0, 3.0));
        assert!(Stats::of_ms(&[]).median.is_nan());
    }

    #[test]
    fn a_target_passes_at_or_below_its_limit_only() {
        let mut r = Report::new(None, true);
        r.target("g", "at", 5.0, "ms", 5.0, Value::Null);
        r.target("g", "over", 5.01, "ms", 5.0, Value::Null);
        r.ratio("g", "slower", Stats::of_ms(&[10.0]), Stats::of_ms(&[12.0]), Some(1.1));
        assert_eq!(r.fails.len(), 2, "{:?}", r.fails);
        assert!(r.fails[0].contains("over") && r.fails[1].contains("slower"));
    }
}
