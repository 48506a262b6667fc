//! Aligned text tables and the human units `starling-admin` prints (bytes, durations,
//! percentages, kbps): a header, rows of cells, each column as wide as its widest cell,
//! text columns left-aligned and figures right-aligned.

/// How a column is aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table being built; [`Table::render`] lays it out.
#[derive(Debug)]
pub struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(columns: &[(&'static str, Align)]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Appends a row (missing cells are empty, extra cells dropped).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The lines of the table, header first, columns separated by two spaces, no
    /// trailing spaces.
    pub fn render(&self) -> Vec<String> {
        let cell = |r: &Vec<String>, i: usize| r.get(i).map_or("", String::as_str).to_string();
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| cell(r, i).chars().count())
                    .chain(std::iter::once(self.columns[i].0.len()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<String>| {
            let mut out = String::new();
            for (i, c) in cells.iter().enumerate() {
                if i > 0 {
                    out.push_str("  ");
                }
                let pad = widths[i].saturating_sub(c.chars().count());
                match self.columns[i].1 {
                    Align::Left => {
                        out.push_str(c);
                        out.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        out.extend(std::iter::repeat_n(' ', pad));
                        out.push_str(c);
                    }
                }
            }
            out.trim_end().to_string()
        };
        let mut out = vec![line(self.columns.iter().map(|c| c.0.to_string()).collect())];
        for r in &self.rows {
            out.push(line((0..self.columns.len()).map(|i| cell(r, i)).collect()));
        }
        out
    }
}

/// Bytes in SI units: `950 B`, `12.3 kB`, `4.56 MB`, `1.20 GB`, `3.40 TB`.
#[allow(clippy::cast_precision_loss)] // display only
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1000.0;
    let mut unit = 0;
    while v >= 999.95 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if v < 100.0 {
        format!("{v:.2} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Seconds as `45s`, `12m05s`, `3h02m`, `2d04h`.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // rounded, clamped
pub fn duration_s(s: f64) -> String {
    let s = if s.is_finite() {
        s.max(0.0).round() as u64
    } else {
        0
    };
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A ratio as a percentage with one decimal (`87.5%`).
pub fn percent(r: f64) -> String {
    format!("{:.1}%", r * 100.0)
}

/// A ratio as a percentage with two decimals (`0.25%`), for small ones.
pub fn percent2(r: f64) -> String {
    format!("{:.2}%", r * 100.0)
}

/// Milliseconds, `-` when unknown (0).
pub fn ms_or_dash(ms: u32) -> String {
    if ms == 0 {
        "-".into()
    } else {
        format!("{ms} ms")
    }
}

/// A string cut to `max` characters (`…` marks the cut).
pub fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_units_read_well() {
        let mut t = Table::new(&[("NAME", Align::Left), ("N", Align::Right)]);
        t.row(vec!["a".into(), "1000".into()]);
        t.row(vec!["longer".into(), "7".into()]);
        assert_eq!(
            t.render(),
            vec!["NAME       N", "a       1000", "longer     7"]
        );
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1_000), "1.00 kB");
        assert_eq!(bytes(123_456), "123.5 kB");
        assert_eq!(bytes(999_999), "1.00 MB");
        assert_eq!(bytes(4_560_000_000), "4.56 GB");
        assert_eq!(duration_s(45.4), "45s");
        assert_eq!(duration_s(725.0), "12m05s");
        assert_eq!(duration_s(10_920.0), "3h02m");
        assert_eq!(duration_s(187_200.0), "2d04h");
        assert_eq!(percent(0.875), "87.5%");
        assert_eq!(ms_or_dash(0), "-");
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("abc", 4), "abc");
    }
}
