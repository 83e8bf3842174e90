//! After a `cargo bench` run: read criterion's saved results and write comparison charts (SVG)
//! and a `summary.json` with the plotted numbers.
//!
//! Input is what criterion 0.8 saves per benchmark, `<criterion_dir>/<group>/<function>/<parameter>/new/`
//! with `benchmark.json` (the serialized `BenchmarkId`: `group_id`, `function_id`, `value_str`,
//! `throughput` such as `{"Bytes": n}`) and `estimates.json` (`median.point_estimate` in ns per
//! iteration). The ids are read from `benchmark.json` rather than rebuilt from directory names, so
//! criterion's name sanitizing (and its `_1` suffixes) does not matter. Two optional side files
//! written by the harness are merged in: `raftwire-latency.json` (`p50_us`, `p99_us`) and
//! `raftwire-memory.json` (`peak_growth_bytes`) and `raftwire-cpu.json` (`cpu_s_per_iter`: the
//! process's CPU time per iteration, turned into `cpu_ms_per_mib`, `cpu_us_per_element` or
//! `cpu_us_per_iter` here), all keyed like the benchmark ids.
//!
//! Whatever was not measured is left out: a transport that was not compiled in has no series, a
//! chart with no data at all is not written. Unreadable files are reported on stderr and skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::element::{ComposedElement, DashedPathElement};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::{Map, Value, json};

const SIZE: (u32, u32) = (1000, 600);
const MIB: f64 = 1024.0 * 1024.0;
const FONT: &str = "sans-serif";
/// Deepest directory level searched for `new/benchmark.json` (criterion uses group/function/value/new).
const MAX_DEPTH: usize = 6;
const LATENCY_FILE: &str = "raftwire-latency.json";
const MEMORY_FILE: &str = "raftwire-memory.json";
const CPU_FILE: &str = "raftwire-cpu.json";

/// Reads criterion's results under `criterion_dir`, writes the comparison SVGs and `summary.json`
/// into `out_dir` (created if missing) and returns the files written.
pub fn write_summary(criterion_dir: &Path, out_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let results = Results::load(criterion_dir)?;
    fs::create_dir_all(out_dir)?;

    let mut written = Vec::new();
    let charts = [
        append_by_size(&results),
        append_by_window(&results),
        rpc_latency(&results),
        replication(&results, 256, "replication-writes.svg"),
        replication(&results, 16384, "replication-writes-16k.svg"),
        snapshot(&results),
    ];
    for chart in charts.into_iter().flatten() {
        let path = out_dir.join(chart.file_name());
        chart.render(&path)?;
        written.push(path);
    }

    let path = out_dir.join("summary.json");
    let text = serde_json::to_string_pretty(&results.summary_json()).map_err(io::Error::other)?;
    fs::write(&path, text + "\n")?;
    written.push(path);
    Ok(written)
}

// ---------------------------------------------------------------------------------------------
// Reading criterion's output.

/// One benchmark's saved result.
struct Bench {
    group: String,
    function: Option<String>,
    parameter: Option<String>,
    median_ns: f64,
    median_ci_ns: Option<(f64, f64)>,
    mean_ns: Option<f64>,
    bytes_per_iter: Option<f64>,
    elements_per_iter: Option<f64>,
}

impl Bench {
    fn median_s(&self) -> f64 {
        self.median_ns * 1e-9
    }

    fn bytes_per_s(&self) -> Option<f64> {
        self.bytes_per_iter.map(|b| b / self.median_s())
    }

    fn elements_per_s(&self) -> Option<f64> {
        self.elements_per_iter.map(|e| e / self.median_s())
    }
}

/// Side data keyed like the benchmark ids: key -> field -> value.
type SideData = BTreeMap<String, Map<String, Value>>;

struct Results {
    /// Keyed by criterion's full id, `group/function/parameter`.
    benches: BTreeMap<String, Bench>,
    latency: SideData,
    memory: SideData,
    cpu: SideData,
}

impl Results {
    fn load(criterion_dir: &Path) -> io::Result<Results> {
        let mut benches = BTreeMap::new();
        // A missing or unreadable top directory is an error; anything below it is skipped.
        let mut stack = vec![(criterion_dir.to_path_buf(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if depth == 0 => {
                    return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display())));
                }
                Err(e) => {
                    eprintln!("summary: skipping {}: {e}", dir.display());
                    continue;
                }
            };
            for entry in entries.flatten() {
                // `DirEntry::file_type` does not follow symlinks, so links cannot loop the walk.
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = entry.path();
                if entry.file_name() == "new" {
                    if path.join("benchmark.json").is_file() {
                        match read_bench(&path) {
                            Ok(bench) => {
                                benches.insert(bench_key(&bench), bench);
                            }
                            Err(e) => eprintln!("summary: skipping {}: {e}", path.display()),
                        }
                    }
                } else if depth < MAX_DEPTH {
                    stack.push((path, depth + 1));
                }
            }
        }
        Ok(Results {
            benches,
            latency: read_side(&criterion_dir.join(LATENCY_FILE)),
            memory: read_side(&criterion_dir.join(MEMORY_FILE)),
            cpu: read_side(&criterion_dir.join(CPU_FILE)),
        })
    }

    fn get(&self, group: &str, function: &str, parameter: &str) -> Option<&Bench> {
        self.benches.get(&format!("{group}/{function}/{parameter}"))
    }

    /// Benchmarks of `group` that have both a function and a parameter.
    fn group<'a>(&'a self, group: &'a str) -> impl Iterator<Item = (&'a str, &'a str, &'a Bench)> + 'a {
        self.benches
            .values()
            .filter(move |b| b.group == group)
            .filter_map(|b| Some((b.function.as_deref()?, b.parameter.as_deref()?, b)))
    }

    fn side_f64(side: &SideData, key: &str, field: &str) -> Option<f64> {
        side.get(key)?.get(field)?.as_f64()
    }

    fn summary_json(&self) -> Value {
        let mut out = Map::new();
        for (key, b) in &self.benches {
            let mut entry = Map::new();
            entry.insert("group".into(), json!(b.group));
            if let Some(f) = &b.function {
                entry.insert("function".into(), json!(f));
            }
            if let Some(p) = &b.parameter {
                entry.insert("parameter".into(), json!(p));
            }
            entry.insert("median_ns".into(), json!(b.median_ns));
            if let Some((lo, hi)) = b.median_ci_ns {
                entry.insert("median_ci_ns".into(), json!([lo, hi]));
            }
            if let Some(mean) = b.mean_ns {
                entry.insert("mean_ns".into(), json!(mean));
            }
            if let Some(bytes) = b.bytes_per_iter {
                entry.insert("bytes_per_iter".into(), json!(bytes));
            }
            if let Some(elements) = b.elements_per_iter {
                entry.insert("elements_per_iter".into(), json!(elements));
            }
            if let Some(rate) = b.bytes_per_s() {
                entry.insert("throughput_bytes_per_s".into(), json!(rate));
                entry.insert("throughput_mib_per_s".into(), json!(rate / MIB));
            }
            if let Some(rate) = b.elements_per_s() {
                entry.insert("throughput_elements_per_s".into(), json!(rate));
            }
            // CPU per operation: per MiB of payload, per element (a write), else per iteration
            // (one round trip).
            if let Some(cpu) = Self::side_f64(&self.cpu, key, "cpu_s_per_iter") {
                entry.insert("cpu_s_per_iter".into(), json!(cpu));
                match (b.bytes_per_iter, b.elements_per_iter) {
                    (Some(bytes), _) if bytes > 0.0 => {
                        entry.insert("cpu_ms_per_mib".into(), json!(cpu * 1e3 * MIB / bytes));
                    }
                    (_, Some(n)) if n > 0.0 => {
                        entry.insert("cpu_us_per_element".into(), json!(cpu * 1e6 / n));
                    }
                    _ => {
                        entry.insert("cpu_us_per_iter".into(), json!(cpu * 1e6));
                    }
                }
            }
            out.insert(key.clone(), Value::Object(entry));
        }
        for side in [&self.latency, &self.memory] {
            for (key, fields) in side {
                let entry = out
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(entry) = entry {
                    entry.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        Value::Object(out)
    }
}

fn bench_key(b: &Bench) -> String {
    [
        Some(b.group.as_str()),
        b.function.as_deref(),
        b.parameter.as_deref(),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join("/")
}

fn read_json(path: &Path) -> io::Result<Value> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let text = fs::read_to_string(path).map_err(|e| io::Error::new(e.kind(), format!("{name}: {e}")))?;
    serde_json::from_str(&text)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{name}: {e}")))
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Reads one `<...>/new` directory.
fn read_bench(new_dir: &Path) -> io::Result<Bench> {
    let id = read_json(&new_dir.join("benchmark.json"))?;
    let estimates = read_json(&new_dir.join("estimates.json"))?;

    let text = |field: &str| id.get(field).and_then(Value::as_str).map(str::to_string);
    let group = text("group_id").ok_or_else(|| invalid("benchmark.json has no group_id"))?;

    let median = estimates
        .get("median")
        .ok_or_else(|| invalid("estimates.json has no median"))?;
    let median_ns = median
        .get("point_estimate")
        .and_then(Value::as_f64)
        .filter(|ns| ns.is_finite() && *ns > 0.0)
        .ok_or_else(|| invalid("estimates.json has no usable median.point_estimate"))?;
    let bound = |name: &str| median.get("confidence_interval")?.get(name)?.as_f64();
    let median_ci_ns = bound("lower_bound").zip(bound("upper_bound"));
    let mean_ns = estimates
        .get("mean")
        .and_then(|m| m.get("point_estimate"))
        .and_then(Value::as_f64);

    // criterion's `Throughput` enum, serialized externally tagged (`null` when not set).
    let (mut bytes_per_iter, mut elements_per_iter) = (None, None);
    if let Some(Value::Object(t)) = id.get("throughput") {
        let num = |name: &str| t.get(name).and_then(Value::as_f64);
        if let Some(n) = num("Bytes").or_else(|| num("BytesDecimal")) {
            bytes_per_iter = Some(n);
        } else if let Some(bits) = num("Bits") {
            bytes_per_iter = Some(bits / 8.0);
        } else if let Some(n) = num("Elements") {
            elements_per_iter = Some(n);
        } else if let Some(both) = t.get("ElementsAndBytes") {
            elements_per_iter = both.get("elements").and_then(Value::as_f64);
            bytes_per_iter = both.get("bytes").and_then(Value::as_f64);
        }
    }

    let parameter = text("value_str");
    // A snapshot iteration sends one snapshot of the size its parameter names: use that when the
    // harness declared no throughput.
    if group == "snapshot" && bytes_per_iter.is_none() {
        bytes_per_iter = parameter.as_deref().and_then(parse_size).map(|b| b as f64);
    }

    Ok(Bench {
        group,
        function: text("function_id"),
        parameter,
        median_ns,
        median_ci_ns,
        mean_ns,
        bytes_per_iter,
        elements_per_iter,
    })
}

/// Reads a harness side file; absent means no annotations, unreadable is reported and ignored.
fn read_side(path: &Path) -> SideData {
    if !path.exists() {
        return SideData::new();
    }
    match read_json(path) {
        Ok(Value::Object(entries)) => entries
            .into_iter()
            .filter_map(|(key, v)| match v {
                Value::Object(fields) => Some((key, fields)),
                _ => None,
            })
            .collect(),
        Ok(_) => {
            eprintln!("summary: ignoring {}: not a JSON object", path.display());
            SideData::new()
        }
        Err(e) => {
            eprintln!("summary: ignoring {}: {e}", path.display());
            SideData::new()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parameters and labels.

/// `16384B-w64` -> (16384, 64); `256B-c64` -> (256, 64) with `sep` "B-c".
fn parse_pair(parameter: &str, sep: &str) -> Option<(u64, u64)> {
    let (a, b) = parameter.split_once(sep)?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// `64MiB` / `1GiB` / `512KiB` / `100B` -> bytes.
fn parse_size(parameter: &str) -> Option<u64> {
    let units = [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1)];
    units.iter().find_map(|(unit, scale)| {
        let n: u64 = parameter.strip_suffix(unit)?.parse().ok()?;
        n.checked_mul(*scale)
    })
}

fn size_label(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// Three significant digits, with k/M suffixes for large values.
fn fmt_num(v: f64) -> String {
    let (v, suffix) = match v.abs() {
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e4 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let digits = match v.abs() {
        a if a >= 100.0 => 0,
        a if a >= 10.0 => 1,
        _ => 2,
    };
    format!("{v:.digits$}{suffix}")
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{} ms", fmt_num(us / 1000.0))
    } else {
        format!("{} µs", fmt_num(us))
    }
}

/// Subjects in a fixed order (transports, then anything unknown, then the baselines).
fn subject_order(subject: &str) -> (u8, String) {
    let rank = match subject {
        "grpc" => 0,
        "quic" => 1,
        "tcp" => 2,
        "raw-tls" => 8,
        "raw-tls-file" => 8,
        "in-process" => 9,
        "in-process-encoded" => 10,
        _ => 5,
    };
    (rank, subject.to_string())
}

fn sorted_subjects<'a>(subjects: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let set: BTreeSet<_> = subjects.into_iter().map(subject_order).collect();
    set.into_iter().map(|(_, s)| s).collect()
}

struct SubjectStyle {
    color: RGBColor,
    /// Drawn dashed / grey-ish: a reference, not a transport under test.
    baseline: bool,
    label: String,
}

fn subject_style(subject: &str) -> SubjectStyle {
    const EXTRA: [RGBColor; 4] = [
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
    ];
    let (color, baseline, label) = match subject {
        "grpc" => (RGBColor(31, 119, 180), false, "grpc".to_string()),
        "quic" => (RGBColor(255, 127, 14), false, "quic".to_string()),
        "tcp" => (RGBColor(214, 39, 40), false, "tcp".to_string()),
        "raw-tls" => (
            RGBColor(90, 90, 90),
            true,
            "raw-tls (baseline: the wall)".to_string(),
        ),
        "raw-tls-file" => (
            RGBColor(150, 150, 150),
            true,
            "raw-tls-file (baseline: the wall with the files)".to_string(),
        ),
        "in-process" => (
            RGBColor(44, 160, 44),
            true,
            "in-process (baseline: openraft ceiling)".to_string(),
        ),
        "in-process-encoded" => (
            RGBColor(110, 190, 110),
            true,
            "in-process-encoded (baseline: ceiling with payload encoding)".to_string(),
        ),
        other => {
            let hash = other
                .bytes()
                .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
            (EXTRA[hash % EXTRA.len()], false, other.to_string())
        }
    };
    SubjectStyle {
        color,
        baseline,
        label,
    }
}

// ---------------------------------------------------------------------------------------------
// Chart data.

enum Chart {
    Line(LineChart),
    Bars(BarChart),
}

impl Chart {
    fn file_name(&self) -> &str {
        match self {
            Chart::Line(c) => c.file,
            Chart::Bars(c) => c.file,
        }
    }

    fn render(&self, path: &Path) -> io::Result<()> {
        match self {
            Chart::Line(c) => c.render(path),
            Chart::Bars(c) => c.render(path),
        }
    }
}

/// Lines over categorical x positions, log-scaled y.
struct LineChart {
    file: &'static str,
    title: String,
    x_desc: String,
    y_desc: String,
    categories: Vec<String>,
    series: Vec<LineData>,
}

struct LineData {
    subject: String,
    /// (category index, value, annotation).
    points: Vec<(usize, f64, String)>,
}

/// Grouped bars over categories, linear y from zero, optional horizontal reference lines.
struct BarChart {
    file: &'static str,
    title: String,
    x_desc: String,
    y_desc: String,
    categories: Vec<String>,
    series: Vec<BarData>,
    lines: Vec<RefLine>,
}

struct BarData {
    label: String,
    color: RGBAColor,
    /// Per category: value and annotation lines (drawn above the bar, first line on top).
    values: Vec<Option<(f64, Vec<String>)>>,
}

struct RefLine {
    label: String,
    color: RGBColor,
    value: f64,
    /// Only across this category's group of bars; `None`: across the whole chart.
    category: Option<usize>,
}

/// Lines chart where each subject's points come from `value_of(subject, category)`.
fn collect_lines(
    subjects: &[String],
    categories: usize,
    mut value_of: impl FnMut(&str, usize) -> Option<(f64, String)>,
) -> Vec<LineData> {
    subjects
        .iter()
        .map(|subject| LineData {
            subject: subject.clone(),
            points: (0..categories)
                .filter_map(|i| value_of(subject, i).map(|(v, label)| (i, v, label)))
                // Log scale: only positive, finite values can be placed.
                .filter(|p| p.1.is_finite() && p.1 > 0.0)
                .collect(),
        })
        .filter(|s| !s.points.is_empty())
        .collect()
}

/// `append` results as (subject, entry size, window, bytes/s).
/// Only rates that can be placed on a log axis.
fn positive(rate: Option<f64>) -> Option<f64> {
    rate.filter(|r| r.is_finite() && *r > 0.0)
}

fn append_points(results: &Results) -> Vec<(&str, u64, u64, f64)> {
    results
        .group("append")
        .filter_map(|(subject, param, b)| {
            let (size, window) = parse_pair(param, "B-w")?;
            Some((subject, size, window, positive(b.bytes_per_s())?))
        })
        .collect()
}

fn append_by_size(results: &Results) -> Option<Chart> {
    const WINDOW: u64 = 64;
    let points: Vec<_> = append_points(results)
        .into_iter()
        .filter(|p| p.2 == WINDOW)
        .collect();
    let sizes: Vec<u64> = points
        .iter()
        .map(|p| p.1)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let subjects = sorted_subjects(points.iter().map(|p| p.0));
    let series = collect_lines(&subjects, sizes.len(), |subject, i| {
        let p = points.iter().find(|p| p.0 == subject && p.1 == sizes[i])?;
        Some((p.3 / MIB, fmt_num(p.3 / MIB)))
    });
    (!series.is_empty()).then(|| {
        Chart::Line(LineChart {
            file: "append-throughput.svg",
            title: format!("AppendEntries throughput by entry size (window {WINDOW})"),
            x_desc: "Entry size".into(),
            y_desc: "Throughput (MiB/s, log scale)".into(),
            categories: sizes.iter().map(|&s| size_label(s)).collect(),
            series,
        })
    })
}

fn append_by_window(results: &Results) -> Option<Chart> {
    const ENTRY: u64 = 16384;
    let points: Vec<_> = append_points(results)
        .into_iter()
        .filter(|p| p.1 == ENTRY)
        .collect();
    let windows: Vec<u64> = points
        .iter()
        .map(|p| p.2)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let subjects = sorted_subjects(points.iter().map(|p| p.0));
    let series = collect_lines(&subjects, windows.len(), |subject, i| {
        let p = points.iter().find(|p| p.0 == subject && p.2 == windows[i])?;
        Some((p.3 / MIB, fmt_num(p.3 / MIB)))
    });
    (!series.is_empty()).then(|| {
        Chart::Line(LineChart {
            file: "append-windows.svg",
            title: format!(
                "AppendEntries throughput by pipeline window ({} entries)",
                size_label(ENTRY)
            ),
            x_desc: "Window (AppendEntries requests in flight)".into(),
            y_desc: "Throughput (MiB/s, log scale)".into(),
            categories: windows.iter().map(|w| w.to_string()).collect(),
            series,
        })
    })
}

fn replication(results: &Results, entry_size: u64, file: &'static str) -> Option<Chart> {
    let points: Vec<(&str, &str, u64, f64)> = results
        .group("replication")
        .filter_map(|(subject, param, b)| {
            let (size, writers) = parse_pair(param, "B-c")?;
            (size == entry_size).then_some((subject, param, writers, positive(b.elements_per_s())?))
        })
        .collect();
    let writers: Vec<u64> = points
        .iter()
        .map(|p| p.2)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let subjects = sorted_subjects(points.iter().map(|p| p.0));
    let series = collect_lines(&subjects, writers.len(), |subject, i| {
        let p = points.iter().find(|p| p.0 == subject && p.2 == writers[i])?;
        let key = format!("replication/{subject}/{}", p.1);
        let mut label = format!("{}/s", fmt_num(p.3));
        if let Some(p99) = Results::side_f64(&results.latency, &key, "p99_us") {
            label.push_str(&format!(" (p99 {})", fmt_us(p99)));
        }
        Some((p.3, label))
    });
    (!series.is_empty()).then(|| {
        Chart::Line(LineChart {
            file,
            title: format!(
                "Replicated writes/s by concurrent writers ({} entries)",
                size_label(entry_size)
            ),
            x_desc: "Concurrent writers".into(),
            y_desc: "Committed writes/s (log scale)".into(),
            categories: writers.iter().map(|w| w.to_string()).collect(),
            series,
        })
    })
}

fn rpc_latency(results: &Results) -> Option<Chart> {
    const FLOOR: &str = "ping-pong";
    let mut functions: Vec<&str> = Vec::new();
    for (function, _, _) in results.group("rpc").filter(|(f, _, _)| *f != FLOOR) {
        if !functions.contains(&function) {
            functions.push(function);
        }
    }
    // vote, heartbeat first, then anything else in name order.
    functions.sort_by_key(|f| (["vote", "heartbeat"].iter().position(|k| k == f).unwrap_or(2), *f));
    let subjects = sorted_subjects(
        results
            .group("rpc")
            .filter(|(f, _, _)| *f != FLOOR)
            .map(|(_, s, _)| s),
    );

    let mut series = Vec::new();
    for subject in &subjects {
        let style = subject_style(subject);
        let color = if style.baseline {
            style.color.mix(0.7)
        } else {
            style.color.to_rgba()
        };
        let median: Vec<_> = functions
            .iter()
            .map(|f| {
                let us = results.get("rpc", f, subject)?.median_ns / 1000.0;
                Some((us, vec![fmt_us(us)]))
            })
            .collect();
        let p99: Vec<_> = functions
            .iter()
            .map(|f| {
                let us = Results::side_f64(&results.latency, &format!("rpc/{f}/{subject}"), "p99_us")?;
                Some((us, vec![format!("p99 {}", fmt_us(us))]))
            })
            .collect();
        series.push(BarData {
            label: format!("{} median", style.label),
            color,
            values: median,
        });
        if p99.iter().any(Option::is_some) {
            series.push(BarData {
                label: format!("{} p99", style.label),
                color: style.color.mix(0.35),
                values: p99,
            });
        }
    }

    let mut lines = Vec::new();
    if let Some(floor) = results.get("rpc", FLOOR, "raw-tls") {
        let us = floor.median_ns / 1000.0;
        lines.push(RefLine {
            label: format!("raw-tls ping-pong median (floor): {}", fmt_us(us)),
            color: subject_style("raw-tls").color,
            value: us,
            category: None,
        });
    }
    if functions.is_empty() && lines.is_empty() {
        return None;
    }
    let title = if series.iter().any(|s| s.label.ends_with("p99")) {
        "Single RPC round trip: criterion median, harness p99 (lighter)"
    } else {
        "Single RPC round trip: criterion median"
    };
    Some(Chart::Bars(BarChart {
        file: "rpc-latency.svg",
        title: title.into(),
        x_desc: "RPC".into(),
        y_desc: "Round trip (µs)".into(),
        categories: functions.iter().map(|f| f.to_string()).collect(),
        series,
        lines,
    }))
}

fn snapshot(results: &Results) -> Option<Chart> {
    let points: Vec<(&str, &str, u64, f64)> = results
        .group("snapshot")
        .filter_map(|(subject, param, b)| Some((subject, param, parse_size(param)?, b.bytes_per_s()?)))
        .collect();
    if points.is_empty() {
        return None;
    }
    let mut params: Vec<(u64, &str)> = points.iter().map(|p| (p.2, p.1)).collect();
    params.sort();
    params.dedup();
    let subjects = sorted_subjects(points.iter().map(|p| p.0));

    let mut series = Vec::new();
    let mut lines = Vec::new();
    for subject in &subjects {
        let style = subject_style(subject);
        let values: Vec<_> = params
            .iter()
            .map(|(_, param)| {
                let p = points.iter().find(|p| p.0 == subject && p.1 == *param)?;
                let mut notes = vec![format!("{} MiB/s", fmt_num(p.3 / MIB))];
                let key = format!("snapshot/{subject}/{param}");
                if let Some(growth) = Results::side_f64(&results.memory, &key, "peak_growth_bytes") {
                    notes.push(format!("peak mem +{} MiB", fmt_num(growth / MIB)));
                }
                Some((p.3 / MIB, notes))
            })
            .collect();
        if style.baseline {
            for (i, v) in values.iter().enumerate() {
                if let Some((mib, _)) = v {
                    lines.push(RefLine {
                        label: format!("{subject} level (baseline)"),
                        color: style.color,
                        value: *mib,
                        category: Some(i),
                    });
                }
            }
        }
        let color = if style.baseline {
            style.color.mix(0.55)
        } else {
            style.color.to_rgba()
        };
        series.push(BarData {
            label: style.label,
            color,
            values,
        });
    }
    Some(Chart::Bars(BarChart {
        file: "snapshot.svg",
        title: "Snapshot transfer throughput".into(),
        x_desc: "Snapshot size".into(),
        y_desc: "Throughput (MiB/s)".into(),
        categories: params.iter().map(|(size, _)| size_label(*size)).collect(),
        series,
        lines,
    }))
}

// ---------------------------------------------------------------------------------------------
// Rendering.

/// A numeric axis with given tick values: labelled (`bold`) and grid-only (`light`).
struct Ticks<R> {
    inner: R,
    bold: Vec<f64>,
    light: Vec<f64>,
}

impl Ticks<RangedCoordf64> {
    /// Categories at the whole positions `0..n`.
    fn categories(range: Range<f64>, n: usize) -> Self {
        let at: Vec<f64> = (0..n).map(|i| i as f64).collect();
        Ticks {
            inner: range.into(),
            bold: at.clone(),
            light: at,
        }
    }
}

impl<R: Ranged<ValueType = f64>> Ranged for Ticks<R> {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.light.clone()
        } else {
            self.bold.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.inner.range()
    }
}

/// A text label on a white box, placed relative to a chart coordinate.
type Haloed<'a, C, DB> = ComposedElement<C, DB, Rectangle<(i32, i32)>, Text<'a, (i32, i32), String>>;

/// A small label `dy` pixels from `at` (above it when `above`), on a white box so that lines
/// crossing it do not make it unreadable.
fn haloed<'a, C, DB: DrawingBackend>(
    at: C,
    text: String,
    dy: i32,
    above: bool,
    color: RGBColor,
) -> Haloed<'a, C, DB> {
    // The SVG is rendered with the viewer's fonts; ~6.5 px a character at 13 px is a fair guess.
    let half = (6.5 * text.chars().count() as f64 / 2.0).ceil() as i32 + 2;
    let (top, vpos) = if above {
        (dy - 16, VPos::Bottom)
    } else {
        (dy, VPos::Top)
    };
    let style = (FONT, 13)
        .into_font()
        .color(&color)
        .pos(Pos::new(HPos::Center, vpos));
    EmptyElement::at(at)
        + Rectangle::new([(-half, top), (half, top + 16)], WHITE.mix(0.8).filled())
        + Text::new(text, (0, dy), style)
}

fn plot_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("drawing chart: {e}"))
}

/// Maps a categorical x position back to its label (only at whole positions).
fn category_label(categories: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < categories.len() {
        categories[i as usize].clone()
    } else {
        String::new()
    }
}

/// 1-2-5 steps: the largest at or below `v` (`up == false`) or smallest at or above it.
fn nice_125(v: f64, up: bool) -> f64 {
    let decade = 10f64.powf(v.log10().floor());
    let steps = [1.0, 2.0, 5.0, 10.0];
    if up {
        steps
            .iter()
            .map(|s| s * decade)
            .find(|s| *s >= v * (1.0 - 1e-9))
            .unwrap_or(10.0 * decade)
    } else {
        steps
            .iter()
            .rev()
            .map(|s| s * decade)
            .find(|s| *s <= v * (1.0 + 1e-9))
            .unwrap_or(decade)
    }
}

/// Labelled (1, 2, 5 per decade) and light (every integer multiple) grid values in `lo..=hi`.
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let (mut bold, mut light) = (Vec::new(), Vec::new());
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in 1..10 {
            let v = decade * f64::from(m);
            if v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9) {
                if matches!(m, 1 | 2 | 5) {
                    bold.push(v)
                } else {
                    light.push(v)
                }
            }
        }
        decade *= 10.0;
    }
    (bold, light)
}

fn fmt_axis(v: f64) -> String {
    match v.abs() {
        a if a >= 1e6 => format!("{}M", v / 1e6),
        a if a >= 1e4 => format!("{}k", v / 1e3),
        a if a >= 1.0 => format!("{v:.0}"),
        _ => format!("{v}"),
    }
}

/// Legend sample for a dashed series.
fn dashed_legend(
    color: RGBColor,
) -> impl Fn((i32, i32)) -> DashedPathElement<std::vec::IntoIter<(i32, i32)>, i32> {
    move |(x, y)| DashedPathElement::new(vec![(x, y), (x + 22, y)], 6, 4, color.stroke_width(3))
}

impl LineChart {
    /// Per point: label above (true) or below it. Within a category the highest point is labelled
    /// above, the lowest below, one in between on the side with more room (in log distance).
    fn label_sides(&self) -> Vec<Vec<bool>> {
        let at = |s: usize, i: usize| self.series[s].points.iter().find(|p| p.0 == i).map(|p| p.1);
        self.series
            .iter()
            .enumerate()
            .map(|(s, series)| {
                series
                    .points
                    .iter()
                    .map(|&(i, v, _)| {
                        let others = || {
                            (0..self.series.len())
                                .filter(|&o| o != s)
                                .filter_map(|o| at(o, i))
                        };
                        let above = others()
                            .filter(|&o| o >= v)
                            .map(|o| (o / v).ln())
                            .reduce(f64::min);
                        let below = others().filter(|&o| o < v).map(|o| (v / o).ln()).reduce(f64::min);
                        match (above, below) {
                            (None, _) => true,
                            (Some(_), None) => false,
                            (Some(up), Some(down)) => up > down,
                        }
                    })
                    .collect()
            })
            .collect()
    }

    fn render(&self, path: &Path) -> io::Result<()> {
        let values = self.series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
        let (min, max) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        // Room below for labels under points and above for the legend.
        let lo = nice_125(min / 1.5, false);
        let hi = nice_125(max * 4.0, true);
        let (bold, light) = log_ticks(lo, hi);
        let n = self.categories.len();

        let root = SVGBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, (FONT, 26))
            .margin(20)
            .x_label_area_size(55)
            .y_label_area_size(80)
            .build_cartesian_2d(
                Ticks::categories(-0.4..(n as f64 - 0.6), n),
                Ticks {
                    inner: LogCoord::from((lo..hi).log_scale()),
                    bold,
                    light,
                },
            )
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc(self.x_desc.as_str())
            .y_desc(self.y_desc.as_str())
            .x_label_formatter(&|x| category_label(&self.categories, *x))
            .y_label_formatter(&|y| fmt_axis(*y))
            .axis_desc_style((FONT, 18))
            .label_style((FONT, 15))
            .bold_line_style(RGBColor(200, 200, 200))
            .light_line_style(RGBColor(238, 238, 238))
            .draw()
            .map_err(plot_err)?;

        for series in &self.series {
            let style = subject_style(&series.subject);
            let color = style.color;
            let coords: Vec<(f64, f64)> = series.points.iter().map(|p| (p.0 as f64, p.1)).collect();
            let anno = if style.baseline {
                chart
                    .draw_series(DashedLineSeries::new(
                        coords.clone(),
                        10,
                        6,
                        color.stroke_width(2),
                    ))
                    .map_err(plot_err)?
            } else {
                chart
                    .draw_series(LineSeries::new(coords.clone(), color.stroke_width(3)))
                    .map_err(plot_err)?
            };
            anno.label(style.label.as_str());
            if style.baseline {
                anno.legend(dashed_legend(color));
            } else {
                anno.legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (22, 0)], color.stroke_width(3))
                        + Circle::new((11, 0), 4, color.filled())
                });
            }
            let marker = if style.baseline {
                color.stroke_width(2)
            } else {
                color.filled()
            };
            chart
                .draw_series(coords.iter().map(|&c| Circle::new(c, 4, marker)))
                .map_err(plot_err)?;
        }
        // Labels last, over every line.
        let above = self.label_sides();
        for (series, above) in self.series.iter().zip(&above) {
            let color = subject_style(&series.subject).color;
            let labels = series.points.iter().zip(above).map(|((i, v, label), &up)| {
                haloed((*i as f64, *v), label.clone(), if up { -8 } else { 8 }, up, color)
            });
            chart.draw_series(labels).map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(180, 180, 180))
            .label_font((FONT, 15))
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)
    }
}

impl BarChart {
    fn render(&self, path: &Path) -> io::Result<()> {
        let bar_max = self
            .series
            .iter()
            .flat_map(|s| s.values.iter().flatten().map(|v| v.0));
        let max = bar_max
            .chain(self.lines.iter().map(|l| l.value))
            .fold(0.0, f64::max);
        // Headroom for the value labels and the legend.
        let top = if max > 0.0 { max * 1.45 } else { 1.0 };
        let n = self.categories.len().max(1);

        let root = SVGBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, (FONT, 26))
            .margin(20)
            .x_label_area_size(55)
            .y_label_area_size(80)
            .build_cartesian_2d(
                Ticks::categories(-0.5..(n as f64 - 0.5), self.categories.len()),
                0.0..top,
            )
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc(self.x_desc.as_str())
            .y_desc(self.y_desc.as_str())
            .x_label_formatter(&|x| category_label(&self.categories, *x))
            .y_label_formatter(&|y| fmt_axis(*y))
            .axis_desc_style((FONT, 18))
            .label_style((FONT, 15))
            .bold_line_style(RGBColor(215, 215, 215))
            .light_line_style(RGBColor(247, 247, 247))
            .draw()
            .map_err(plot_err)?;

        const GROUP_WIDTH: f64 = 0.8;
        let slot = GROUP_WIDTH / self.series.len().max(1) as f64;
        let mut notes = Vec::new();
        for (s, series) in self.series.iter().enumerate() {
            let x0 = |i: usize| i as f64 - GROUP_WIDTH / 2.0 + s as f64 * slot + slot * 0.06;
            let bars: Vec<(f64, f64)> = series
                .values
                .iter()
                .enumerate()
                .filter_map(|(i, v)| Some((x0(i), v.as_ref()?.0)))
                .collect();
            if bars.is_empty() {
                continue;
            }
            let color = series.color;
            chart
                .draw_series(
                    bars.iter()
                        .map(|&(x, v)| Rectangle::new([(x, 0.0), (x + slot * 0.88, v)], color.filled())),
                )
                .map_err(plot_err)?
                .label(series.label.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 22, y + 6)], color.filled()));
            // Annotation lines stacked upwards from the bar top, the first line highest.
            for (i, v) in series.values.iter().enumerate() {
                if let Some((value, lines)) = v {
                    for (k, line) in lines.iter().rev().enumerate() {
                        notes.push(((x0(i) + slot * 0.44, *value), line.clone(), -4 - 16 * k as i32));
                    }
                }
            }
        }

        let mut labelled = BTreeSet::new();
        for line in &self.lines {
            let (x_start, x_end) = match line.category {
                Some(i) => (
                    i as f64 - GROUP_WIDTH / 2.0 - 0.04,
                    i as f64 + GROUP_WIDTH / 2.0 + 0.04,
                ),
                None => (-0.5, n as f64 - 0.5),
            };
            let coords = vec![(x_start, line.value), (x_end, line.value)];
            let anno = chart
                .draw_series(DashedLineSeries::new(coords, 10, 6, line.color.stroke_width(2)))
                .map_err(plot_err)?;
            // Per-category lines of the same meaning share one legend entry.
            if labelled.insert(line.label.clone()) {
                anno.label(line.label.as_str()).legend(dashed_legend(line.color));
            }
        }

        // Labels last, over the reference lines.
        chart
            .draw_series(
                notes
                    .into_iter()
                    .map(|(at, text, dy)| haloed(at, text, dy, true, BLACK)),
            )
            .map_err(plot_err)?;

        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(180, 180, 180))
            .label_font((FONT, 15))
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)
    }
}
