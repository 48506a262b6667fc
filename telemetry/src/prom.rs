//! The Prometheus text exposition writer (format 0.0.4) shared by both servers: one
//! `# HELP`/`# TYPE` head per family, samples with escaped label values, cumulative
//! histograms (`_bucket{le=..}`, `_sum`, `_count`). It only formats: the servers keep
//! their own counters and decide what to expose.

use std::fmt::{Display, Write as _};

/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The type of a metric family (`# TYPE` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Escapes a label value (backslash, double quote, line feed).
pub fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// An exposition being written: call [`Exposition::family`] once per metric name, then
/// its samples; [`Exposition::finish`] returns the text.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty exposition with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Exposition {
            out: String::with_capacity(capacity),
        }
    }

    /// Starts the family `name`: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    /// One sample of `name` with `labels` (values escaped here).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// A counter family with one unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, value: impl Display) {
        self.family(name, Kind::Counter, help);
        self.sample(name, &[], value);
    }

    /// A gauge family with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl Display) {
        self.family(name, Kind::Gauge, help);
        self.sample(name, &[], value);
    }

    /// The samples of one histogram series of the family `name` (started with
    /// [`Exposition::family`] and [`Kind::Histogram`]): `buckets` are (upper bound,
    /// cumulative count), then `+Inf` (= `count`), `_sum` and `_count`.
    pub fn histogram<B: Display>(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        buckets: &[(B, u64)],
        sum: impl Display,
        count: u64,
    ) {
        for (le, cum) in buckets {
            let _ = write!(self.out, "{name}_bucket");
            self.labels(labels, Some(le));
            let _ = writeln!(self.out, " {cum}");
        }
        let _ = write!(self.out, "{name}_bucket");
        self.labels(labels, Some(&"+Inf"));
        let _ = writeln!(self.out, " {count}");
        let _ = write!(self.out, "{name}_sum");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {sum}");
        let _ = write!(self.out, "{name}_count");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {count}");
    }

    /// The text written so far.
    pub fn finish(self) -> String {
        self.out
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&dyn Display>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            let _ = write!(self.out, "{k}=\"{}\"", escape(v));
        }
        if let Some(le) = le {
            if !labels.is_empty() {
                self.out.push(',');
            }
            let _ = write!(self.out, "le=\"{le}\"");
        }
        self.out.push('}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn families_and_samples() {
        let mut e = Exposition::default();
        e.family("x_total", Kind::Counter, "Xs.");
        e.sample("x_total", &[("a", "1"), ("b", "q\"")], 3);
        e.gauge("g", "G.", 1.5);
        assert_eq!(
            e.finish(),
            "# HELP x_total Xs.\n# TYPE x_total counter\nx_total{a=\"1\",b=\"q\\\"\"} 3\n\
             # HELP g G.\n# TYPE g gauge\ng 1.5\n"
        );
    }

    #[test]
    fn histogram_with_and_without_labels() {
        let mut e = Exposition::default();
        e.histogram("h", &[], &[(1, 2), (5, 3)], 7, 4);
        e.histogram("h", &[("m", "x")], &[(0.5, 1)], 0.25, 1);
        assert_eq!(
            e.finish(),
            "h_bucket{le=\"1\"} 2\nh_bucket{le=\"5\"} 3\nh_bucket{le=\"+Inf\"} 4\nh_sum 7\nh_count 4\n\
             h_bucket{m=\"x\",le=\"0.5\"} 1\nh_bucket{m=\"x\",le=\"+Inf\"} 1\nh_sum{m=\"x\"} 0.25\nh_count{m=\"x\"} 1\n"
        );
    }
}
