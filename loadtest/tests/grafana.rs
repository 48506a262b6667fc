//! The Grafana dashboard (`deploy/grafana/starling.json`) asks only for what the servers
//! export: a whole deployment runs in-process (control plane with its `/metrics`
//! listener, a data-plane node, the synthetic source) with a small swarm of SDK viewers
//! and a plain-HTTP viewer, until viewer reports are stored and every labelled series
//! the dashboard reads exists; then both `/metrics` outputs are scraped and every
//! PromQL expression of the dashboard (panel targets and the template variable's
//! `label_values` query) is parsed for the metric names and label names it refers to.
//!
//! A name is known when the scrape has a sample of that name, or a `# TYPE` line for
//! it (counters and gauges), or for its histogram when it ends in `_bucket`, `_sum` or
//! `_count`. Metrics under `rate`/`irate`/`increase` must be counters (or histogram
//! series); label names in matchers and in `by (...)` must exist on the metrics the
//! expression reads. Both scrapes also go through `promtool check metrics` (required
//! when `STARLING_REQUIRE_MEDIA=1`, skipped with a message otherwise).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use starling_loadtest::{Deployment, DeploymentConfig, Swarm, SwarmConfig, UploadProfile};

/// Upper bound for waiting on something that should happen (a hang guard, not a timing
/// assertion).
const PATIENCE: Duration = Duration::from_secs(120);

fn dashboard() -> serde_json::Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/starling.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `expr` of the dashboard (panel targets, nested rows included) with the panel
/// title, and the template variables' query strings.
fn expressions(v: &serde_json::Value) -> (Vec<(String, String)>, Vec<String>) {
    fn walk(v: &serde_json::Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                let title = m
                    .get("title")
                    .and_then(|t| t.as_str())
                    .unwrap_or(title)
                    .to_string();
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr", serde_json::Value::String(e)) => {
                            out.push((title.clone(), e.clone()));
                        }
                        ("templating", _) => {}
                        _ => walk(x, &title, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, title, out)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(v, "", &mut exprs);
    let vars = v["templating"]["list"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter(|x| x["type"] == "query")
                .map(|x| {
                    x["query"]["query"]
                        .as_str()
                        .or(x["query"].as_str())
                        .or(x["definition"].as_str())
                        .unwrap_or_default()
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default();
    (exprs, vars)
}

/// A metric a PromQL expression reads: its name, the label names of its matchers, and
/// the innermost function it is an argument of.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    name: String,
    labels: Vec<String>,
    function: Option<String>,
}

/// What [`parse`] finds in one expression.
#[derive(Debug, Default, PartialEq, Eq)]
struct Parsed {
    selectors: Vec<Selector>,
    /// Labels of `by`, `without`, `on`, `ignoring`, `group_left`, `group_right` lists.
    grouping: Vec<String>,
}

const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: [&str; 13] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Replaces Grafana's variables (`$__rate_interval`, `${x}`, `$x`) by `1m`, which is
/// valid wherever the dashboard uses them (ranges, and label values inside strings).
fn expand_variables(expr: &str) -> String {
    let mut out = String::new();
    let mut it = expr.chars().peekable();
    while let Some(c) = it.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        if it.peek() == Some(&'{') {
            for d in it.by_ref() {
                if d == '}' {
                    break;
                }
            }
        } else {
            while it.peek().is_some_and(|d| is_ident(*d)) {
                it.next();
            }
        }
        out.push_str("1m");
    }
    out
}

/// The metric names, matcher labels and grouping labels of a PromQL expression. Strings,
/// numbers, durations, ranges, functions and keywords are skipped; an identifier
/// followed by `(` is a function or aggregation, any other one a metric name.
fn parse(expr: &str) -> Result<Parsed, String> {
    let chars: Vec<char> = expand_variables(expr).chars().collect();
    let mut p = Parsed::default();
    // Open parentheses: the function each belongs to ("" for grouping and lists).
    let mut stack: Vec<String> = Vec::new();
    // An aggregation whose grouping clause comes before its parenthesis.
    let mut pending: Option<String> = None;
    let mut i = 0;
    let skip_ws = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    let skip_string = |j: usize| -> Result<usize, String> {
        let quote = chars[j];
        let mut k = j + 1;
        while k < chars.len() {
            if chars[k] == '\\' {
                k += 2;
                continue;
            }
            if chars[k] == quote {
                return Ok(k + 1);
            }
            k += 1;
        }
        Err(format!("unterminated string in {expr:?}"))
    };
    let ident_at = |j: usize| {
        let mut k = j;
        while k < chars.len() && is_ident(chars[k]) {
            k += 1;
        }
        (chars[j..k].iter().collect::<String>(), k)
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' || c == '\'' || c == '`' {
            i = skip_string(i)?;
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            // A selector without a name in front ({__name__=...}) is not used here.
            return Err(format!("matcher block without a metric name in {expr:?}"));
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // A number or a duration (5m, 1h30m, 1e3).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let (word, end) = ident_at(i);
            let next = skip_ws(end);
            if GROUPING.contains(&word.as_str()) && chars.get(next) == Some(&'(') {
                // A label list.
                let mut j = next + 1;
                loop {
                    j = skip_ws(j);
                    match chars.get(j) {
                        Some(')') => break,
                        Some(',') => j += 1,
                        Some(d) if is_ident_start(*d) => {
                            let (label, e) = ident_at(j);
                            p.grouping.push(label);
                            j = e;
                        }
                        _ => return Err(format!("bad label list after {word} in {expr:?}")),
                    }
                }
                i = j + 1;
            } else if chars.get(next) == Some(&'(') {
                stack.push(word);
                i = next + 1;
            } else if ["by", "without"].contains(&ident_at(next).0.as_str())
                && !KEYWORDS.contains(&word.as_str())
            {
                // An aggregation with its grouping first (`sum by (le) (...)`): its
                // argument is the parenthesis after the label list.
                pending = Some(word);
                i = next;
            } else if KEYWORDS.contains(&word.as_str()) {
                i = end;
            } else {
                let mut sel = Selector {
                    name: word,
                    labels: Vec::new(),
                    function: stack.iter().rev().find(|f| !f.is_empty()).cloned(),
                };
                i = next;
                if chars.get(i) == Some(&'{') {
                    i += 1;
                    loop {
                        i = skip_ws(i);
                        match chars.get(i) {
                            Some('}') => {
                                i += 1;
                                break;
                            }
                            Some(',') => i += 1,
                            Some(d) if is_ident_start(*d) => {
                                let (label, e) = ident_at(i);
                                sel.labels.push(label);
                                i = skip_ws(e);
                                while i < chars.len() && "=!~".contains(chars[i]) {
                                    i += 1;
                                }
                                i = skip_ws(i);
                                if !chars.get(i).is_some_and(|q| "\"'`".contains(*q)) {
                                    return Err(format!("bad matcher in {expr:?}"));
                                }
                                i = skip_string(i)?;
                            }
                            _ => return Err(format!("bad matcher block in {expr:?}")),
                        }
                    }
                }
                p.selectors.push(sel);
            }
        } else if c == '(' {
            stack.push(pending.take().unwrap_or_default());
            i += 1;
        } else if c == ')' {
            if stack.pop().is_none() {
                return Err(format!("unbalanced ')' in {expr:?}"));
            }
            i += 1;
        } else if "+-*/%^=!<>,".contains(c) {
            i += 1;
        } else {
            return Err(format!("unexpected {c:?} in {expr:?}"));
        }
    }
    if !stack.is_empty() {
        return Err(format!("unbalanced '(' in {expr:?}"));
    }
    Ok(p)
}

/// What one `/metrics` scrape exports.
#[derive(Debug, Default)]
struct Exported {
    /// `# TYPE` lines: family → kind.
    families: BTreeMap<String, String>,
    /// Sample name → label names seen on it.
    samples: BTreeMap<String, BTreeSet<String>>,
}

impl Exported {
    fn add(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(n), Some(k)) = (parts.next(), parts.next()) {
                    self.families.insert(n.to_string(), k.to_string());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = self.samples.entry(line[..end].to_string()).or_default();
            if line[end..].starts_with('{') {
                let block = &line[end + 1..line.find('}').unwrap_or(line.len())];
                // Label names: what precedes each `="`.
                for part in block.split("\",") {
                    if let Some((name, _)) = part.split_once('=') {
                        labels.insert(name.trim().to_string());
                    }
                }
            }
        }
    }

    /// The kind of the series `name` ("counter", "gauge", "histogram" for its
    /// `_bucket`/`_sum`/`_count`), `None` when not exported.
    fn kind(&self, name: &str) -> Option<&str> {
        if let Some(k) = self.families.get(name)
            && k != "histogram"
        {
            return Some(k);
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(f) = name.strip_suffix(suffix)
                && self.families.get(f).map(String::as_str) == Some("histogram")
            {
                return Some("histogram");
            }
        }
        if self.samples.contains_key(name) {
            return Some("untyped");
        }
        None
    }

    /// Label names a series can carry (`le` on histogram buckets even before any sample).
    fn labels(&self, name: &str) -> BTreeSet<String> {
        let mut l = self.samples.get(name).cloned().unwrap_or_default();
        if name.ends_with("_bucket") {
            l.insert("le".into());
        }
        l
    }
}

/// Every problem of `expr` against `exported`.
fn check_expr(exported: &Exported, expr: &str) -> Vec<String> {
    let parsed = match parse(expr) {
        Ok(p) => p,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    if parsed.selectors.is_empty() {
        problems.push(format!("no metric in {expr:?}"));
    }
    let mut all_labels = BTreeSet::new();
    for s in &parsed.selectors {
        let Some(kind) = exported.kind(&s.name) else {
            problems.push(format!("unknown metric {} in {expr:?}", s.name));
            continue;
        };
        let labels = exported.labels(&s.name);
        for l in &s.labels {
            if l != "__name__" && !labels.contains(l) {
                problems.push(format!(
                    "{} has no label {l} (it has {labels:?}) in {expr:?}",
                    s.name
                ));
            }
        }
        if s.function
            .as_deref()
            .is_some_and(|f| ["rate", "irate", "increase"].contains(&f))
            && !["counter", "histogram"].contains(&kind)
        {
            problems.push(format!(
                "{} is a {kind}, not a counter, under {:?} in {expr:?}",
                s.name, s.function
            ));
        }
        if s.function.as_deref() == Some("histogram_quantile") {
            problems.push(format!(
                "histogram_quantile over a bare {} in {expr:?}",
                s.name
            ));
        }
        all_labels.extend(labels);
    }
    for l in &parsed.grouping {
        if !all_labels.contains(l) {
            problems.push(format!(
                "grouping label {l} is on none of the metrics of {expr:?}"
            ));
        }
    }
    if expr.contains("histogram_quantile")
        && !parsed.selectors.iter().any(|s| s.name.ends_with("_bucket"))
    {
        problems.push(format!(
            "histogram_quantile without a _bucket series: {expr:?}"
        ));
    }
    problems
}

/// `label_values(metric, label)`, a Grafana template query.
fn check_variable(exported: &Exported, q: &str) -> Vec<String> {
    let Some(args) = q
        .trim()
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    else {
        return vec![format!(
            "template query is not label_values(metric, label): {q:?}"
        )];
    };
    let Some((sel, label)) = args.rsplit_once(',') else {
        return vec![format!("label_values without a metric: {q:?}")];
    };
    let mut problems = check_expr(exported, sel.trim());
    let name = sel.trim().split('{').next().unwrap_or_default();
    if !exported.labels(name).contains(label.trim()) {
        problems.push(format!("{name} has no label {} ({q:?})", label.trim()));
    }
    problems
}

/// Runs `promtool ARGS` with `text` on stdin; `None` when promtool is not installed
/// (and not required).
fn promtool_run(args: &[&str], text: &str, what: &str) -> Option<std::process::Output> {
    use std::io::Write as _;
    let require = std::env::var("STARLING_REQUIRE_MEDIA").is_ok_and(|v| v == "1");
    let child = std::process::Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if !require => {
            println!("SKIPPED: promtool {what} ({e}; apt-get install prometheus)");
            return None;
        }
        Err(e) => panic!("promtool must be installed (apt-get install prometheus): {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    Some(child.wait_with_output().unwrap())
}

/// `promtool check metrics` on one scrape: no error, no lint warning.
fn promtool(name: &str, text: &str) {
    let Some(out) = promtool_run(
        &["check", "metrics"],
        text,
        &format!("check metrics of the {name}"),
    ) else {
        return;
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool on the {name}: {said}\n---\n{text}"
    );
    println!(
        "promtool check metrics: {name} ok ({} samples)",
        text.lines().filter(|l| !l.starts_with('#')).count()
    );
}

/// The example scrape configuration is valid, and every panel has its own id.
#[test]
fn the_example_prometheus_config_is_valid_and_panel_ids_are_unique() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana");
    let config = dir.join("prometheus.yml");
    assert!(config.exists());
    if let Some(out) = promtool_run(
        &["check", "config", config.to_str().unwrap()],
        "",
        "check config",
    ) {
        assert!(
            out.status.success(),
            "promtool check config: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fn ids(v: &serde_json::Value, out: &mut Vec<u64>) {
        if let Some(panels) = v["panels"].as_array() {
            for p in panels {
                out.push(p["id"].as_u64().expect("panel without an id"));
                ids(p, out);
            }
        }
    }
    let mut all = Vec::new();
    ids(&dashboard(), &mut all);
    let unique: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "duplicate panel ids: {all:?}");
}

#[test]
fn the_parser_finds_names_labels_and_functions() {
    let p = parse(
        "histogram_quantile(0.99, sum by (le, grpc_method) (rate(a_bucket{grpc_method=\"Join\", x=~\"$v\"}[$__rate_interval]))) / on (grpc_method) group_left b + 1e3 * c offset 5m",
    )
    .unwrap();
    assert_eq!(
        p.selectors,
        vec![
            Selector {
                name: "a_bucket".into(),
                labels: vec!["grpc_method".into(), "x".into()],
                function: Some("rate".into()),
            },
            Selector {
                name: "b".into(),
                labels: vec![],
                function: None,
            },
            Selector {
                name: "c".into(),
                labels: vec![],
                function: None,
            },
        ]
    );
    assert_eq!(p.grouping, ["le", "grpc_method", "grpc_method"]);
    assert!(parse("sum(rate(x[5m])").is_err());
    assert!(parse("x{a=\"1\"").is_err());

    let mut e = Exported::default();
    e.add("# TYPE h histogram\nh_bucket{m=\"a\",le=\"1\"} 1\nh_sum{m=\"a\"} 1\nh_count{m=\"a\"} 1\n# TYPE g gauge\ng{b=\"x\"} 1\n# TYPE c_total counter\nc_total 3\n");
    assert!(
        check_expr(
            &e,
            "histogram_quantile(0.5, sum by (le) (rate(h_bucket{m=\"a\"}[1m])))"
        )
        .is_empty()
    );
    assert!(check_expr(&e, "sum(rate(c_total[1m])) / sum(g{b=~\"$x\"})").is_empty());
    let bad = [
        ("rate(nope_total[1m])", "unknown metric nope_total"),
        ("sum(rate(g[1m]))", "g is a gauge"),
        ("sum by (zone) (g)", "grouping label zone"),
        ("g{zone=\"1\"}", "g has no label zone"),
        ("histogram_quantile(0.5, h)", "unknown metric h"),
        (
            "histogram_quantile(0.5, rate(h_sum[1m]))",
            "without a _bucket",
        ),
    ];
    for (expr, want) in bad {
        let problems = check_expr(&e, expr);
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "{expr}: {problems:?}"
        );
    }
    assert!(check_variable(&e, "label_values(g, b)").is_empty());
    assert!(!check_variable(&e, "label_values(g, zone)").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_reads_only_exported_metrics() {
    common::init_tracing();
    let dash = dashboard();
    let (exprs, vars) = expressions(&dash);
    assert!(exprs.len() >= 40, "only {} expressions", exprs.len());
    assert_eq!(vars.len(), 1, "{vars:?}");
    // A datasource variable every panel uses, so the dashboard can be imported anywhere.
    let list = dash["templating"]["list"].as_array().unwrap();
    assert!(
        list.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "no datasource variable"
    );
    let mut unbound = Vec::new();
    fn datasources(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(ds) = m.get("datasource")
                    && ds["uid"] != "${datasource}"
                {
                    out.push(ds.to_string());
                }
                m.values().for_each(|x| datasources(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| datasources(x, out)),
            _ => {}
        }
    }
    datasources(&dash["panels"], &mut unbound);
    assert!(
        unbound.is_empty(),
        "panels not on ${{datasource}}: {unbound:?}"
    );

    let dep = Deployment::start(DeploymentConfig {
        control_metrics: true,
        report_interval: Some(Duration::from_secs(1)),
        ..DeploymentConfig::default()
    })
    .await
    .unwrap();
    let swarm = Swarm::join(
        &dep,
        SwarmConfig {
            peers: 4,
            upload: UploadProfile::uniform(2.0),
            ..SwarmConfig::default()
        },
    )
    .await;
    let b = dep.broadcast().await.unwrap();
    let cp_url = dep.control_metrics_url().unwrap();
    let dp_url = format!("http://{}/metrics", b.node_http_addr);
    // A plain-HTTP viewer: a few bytes of /live/ID (kind="http" series move).
    let live = format!("{}/live/{}", b.node_http_addr, b.id);
    let http_viewer = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(live.split('/').next().unwrap())
            .await
            .unwrap();
        let path = live.split_once('/').unwrap().1;
        s.write_all(format!("GET /{path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < 256 * 1024 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    });

    // Traffic until reports are stored and the series the dashboard reads exist.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let (cp, dp) = loop {
        let cp = common::http_get(&cp_url).await;
        let dp = common::http_get(&dp_url).await;
        let stored = common::metric_sum(&cp, "starling_cp_reports_stored_total", "");
        let http = common::metric_sum(&dp, "starling_dataplane_sent_bytes_total", "kind=\"http\"");
        let viewers = common::metric_sum(&cp, "starling_cp_viewers{", "");
        if stored >= 4.0 && http > 0.0 && viewers >= 4.0 && http_viewer.is_finished() {
            break (cp, dp);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no traffic after {PATIENCE:?}: {stored} reports stored, {http} HTTP bytes, {viewers} peers"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let got = http_viewer.await.unwrap();
    assert!(got > 0);
    swarm.shutdown().await;
    dep.shutdown().await;

    let mut exported = Exported::default();
    exported.add(&cp);
    exported.add(&dp);
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    for (title, expr) in &exprs {
        for p in check_expr(&exported, expr) {
            problems.push(format!("panel {title:?}: {p}"));
        }
        if let Ok(p) = parse(expr) {
            names.extend(p.selectors.into_iter().map(|s| s.name));
        }
    }
    for q in &vars {
        problems.extend(check_variable(&exported, q));
    }
    println!(
        "{} expressions over {} metric names, checked against {} exported families",
        exprs.len(),
        names.len(),
        exported.families.len()
    );
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    let unused: Vec<&String> = exported
        .families
        .keys()
        .filter(|f| {
            !names.contains(*f)
                && !["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|x| names.contains(&format!("{f}{x}")))
        })
        .collect();
    println!("exported, not on the dashboard: {unused:?}");
    // The dashboard covers both servers.
    assert!(names.iter().any(|n| n.starts_with("starling_cp_")));
    assert!(names.iter().any(|n| n.starts_with("starling_dataplane_")));

    promtool("control plane", &cp);
    promtool("data plane", &dp);
}
