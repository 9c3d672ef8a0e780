//! Run metrics: JSON lines and CSV per epoch, a step log, an SVG plot of the curves, a progress line,
//! and peak resident memory.

use crate::error::{Error, Result};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A flat record of named numbers (one epoch, or one logged step).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Record {
    /// (key, value) in insertion order.
    pub fields: Vec<(String, Value)>,
}

/// A metric value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A number.
    Num(f64),
    /// An integer.
    Int(i64),
    /// A list of numbers (e.g. accuracy at every time-step).
    List(Vec<f64>),
    /// Text.
    Text(String),
}

impl Record {
    /// Empty record.
    pub fn new() -> Self {
        Self::default()
    }
    /// Add a number.
    pub fn num(mut self, k: &str, v: f64) -> Self {
        self.fields.push((k.into(), Value::Num(v)));
        self
    }
    /// Add an integer.
    pub fn int(mut self, k: &str, v: i64) -> Self {
        self.fields.push((k.into(), Value::Int(v)));
        self
    }
    /// Add a list.
    pub fn list(mut self, k: &str, v: Vec<f64>) -> Self {
        self.fields.push((k.into(), Value::List(v)));
        self
    }
    /// Add text.
    pub fn text(mut self, k: &str, v: &str) -> Self {
        self.fields.push((k.into(), Value::Text(v.into())));
        self
    }
    /// A number field.
    pub fn get(&self, k: &str) -> Option<f64> {
        self.fields
            .iter()
            .find(|(n, _)| n == k)
            .and_then(|(_, v)| match v {
                Value::Num(x) => Some(*x),
                Value::Int(i) => Some(*i as f64),
                _ => None,
            })
    }
    /// One JSON object on one line.
    pub fn to_json(&self) -> String {
        let mut s = String::from("{");
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            let _ = write!(s, "{}: ", json_str(k));
            match v {
                Value::Num(x) => s.push_str(&json_num(*x)),
                Value::Int(x) => {
                    let _ = write!(s, "{x}");
                }
                Value::List(xs) => {
                    s.push('[');
                    s.push_str(
                        &xs.iter()
                            .map(|x| json_num(*x))
                            .collect::<Vec<_>>()
                            .join(", "),
                    );
                    s.push(']');
                }
                Value::Text(t) => s.push_str(&json_str(t)),
            }
        }
        s.push('}');
        s
    }
    /// CSV header (lists expand to `key_1..key_n`).
    pub fn csv_header(&self) -> String {
        let mut cols = Vec::new();
        for (k, v) in &self.fields {
            match v {
                Value::List(xs) => cols.extend((1..=xs.len()).map(|i| format!("{k}_{i}"))),
                _ => cols.push(k.clone()),
            }
        }
        cols.join(",")
    }
    /// CSV row matching [`Record::csv_header`].
    pub fn csv_row(&self) -> String {
        let mut cols = Vec::new();
        for (_, v) in &self.fields {
            match v {
                Value::Num(x) => cols.push(format!("{x}")),
                Value::Int(x) => cols.push(format!("{x}")),
                Value::List(xs) => cols.extend(xs.iter().map(|x| format!("{x}"))),
                Value::Text(t) => cols.push(format!("\"{}\"", t.replace('"', "\"\""))),
            }
        }
        cols.join(",")
    }
}

fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Appends records to `<dir>/metrics.jsonl` and `<dir>/metrics.csv`, keeps a step log in
/// `<dir>/steps.jsonl`, and redraws `<dir>/curves.svg` after every epoch.
pub struct MetricsLog {
    dir: PathBuf,
    /// Epoch records so far (also those restored on resume).
    pub epochs: Vec<Record>,
    /// Step records so far.
    pub steps: Vec<Record>,
}

impl MetricsLog {
    /// Open (creating the directory). With `resume`, earlier records are read back so the files and
    /// the plot continue; otherwise existing metric files are replaced.
    pub fn open(dir: &Path, resume: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut log = MetricsLog {
            dir: dir.to_path_buf(),
            epochs: Vec::new(),
            steps: Vec::new(),
        };
        if resume {
            log.epochs = read_jsonl(&dir.join("metrics.jsonl"))?;
            log.steps = read_jsonl(&dir.join("steps.jsonl"))?;
        }
        log.rewrite()?;
        Ok(log)
    }

    /// A log that writes nothing unless its methods are called (under MPI the ranks other than 0
    /// hold one and never call them: only rank 0 writes the files).
    pub fn unopened(dir: &Path) -> Self {
        MetricsLog {
            dir: dir.to_path_buf(),
            epochs: Vec::new(),
            steps: Vec::new(),
        }
    }

    /// Drop records after `epoch` epochs and `step` steps (a resume from an earlier checkpoint).
    pub fn truncate(&mut self, epochs_done: usize, global_step: u64) -> Result<()> {
        self.epochs
            .retain(|r| r.get("epoch").is_some_and(|e| e as usize <= epochs_done));
        self.steps
            .retain(|r| r.get("step").is_some_and(|s| s as u64 <= global_step));
        self.rewrite()
    }

    fn rewrite(&self) -> Result<()> {
        let jl: String = self.epochs.iter().map(|r| r.to_json() + "\n").collect();
        write_file(&self.dir.join("metrics.jsonl"), jl.as_bytes())?;
        let mut csv = String::new();
        if let Some(r) = self.epochs.first() {
            csv = r.csv_header() + "\n";
        }
        for r in &self.epochs {
            csv += &(r.csv_row() + "\n");
        }
        write_file(&self.dir.join("metrics.csv"), csv.as_bytes())?;
        let sl: String = self.steps.iter().map(|r| r.to_json() + "\n").collect();
        write_file(&self.dir.join("steps.jsonl"), sl.as_bytes())?;
        write_file(
            &self.dir.join("curves.svg"),
            plot_svg(&self.epochs, &self.steps).as_bytes(),
        )
    }

    /// Record a logged training step.
    pub fn step(&mut self, r: Record) -> Result<()> {
        let path = self.dir.join("steps.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        writeln!(f, "{}", r.to_json()).map_err(|e| Error::io(&path, e))?;
        self.steps.push(r);
        Ok(())
    }

    /// Record an epoch and redraw the plot.
    pub fn epoch(&mut self, r: Record) -> Result<()> {
        self.epochs.push(r);
        self.rewrite()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Read back a JSON-lines file written by [`Record::to_json`] (numbers, integers, lists, strings).
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            parse_flat_json(l).ok_or_else(|| {
                Error::format(path, format!("line {}: not a flat JSON object", i + 1))
            })
        })
        .collect()
}

fn parse_flat_json(line: &str) -> Option<Record> {
    let s = line.trim().strip_prefix('{')?.strip_suffix('}')?;
    let b = s.as_bytes();
    let mut i = 0;
    let mut rec = Record::new();
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] as char).is_whitespace() {
            *i += 1
        }
    };
    let parse_str = |i: &mut usize| -> Option<String> {
        if b.get(*i)? != &b'"' {
            return None;
        }
        *i += 1;
        let mut out = String::new();
        let rest = &s[*i..];
        let mut chars = rest.char_indices();
        while let Some((k, c)) = chars.next() {
            match c {
                '"' => {
                    *i += k + 1;
                    return Some(out);
                }
                '\\' => match chars.next()?.1 {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    'u' => {
                        let h: String = (0..4).filter_map(|_| chars.next().map(|x| x.1)).collect();
                        out.push(char::from_u32(u32::from_str_radix(&h, 16).ok()?)?);
                    }
                    c => out.push(c),
                },
                c => out.push(c),
            }
        }
        None
    };
    let parse_num = |i: &mut usize| -> Option<(f64, bool)> {
        let st = *i;
        while *i < b.len() && !matches!(b[*i], b',' | b']' | b' ') {
            *i += 1;
        }
        let t = &s[st..*i];
        if t == "null" {
            return Some((f64::NAN, false));
        }
        let int = !t.contains(['.', 'e', 'E', 'n', 'i']);
        t.parse::<f64>().ok().map(|x| (x, int))
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            break;
        }
        let k = parse_str(&mut i)?;
        skip_ws(&mut i);
        if b.get(i)? != &b':' {
            return None;
        }
        i += 1;
        skip_ws(&mut i);
        let v = match b.get(i)? {
            b'"' => Value::Text(parse_str(&mut i)?),
            b'[' => {
                i += 1;
                let mut xs = Vec::new();
                loop {
                    skip_ws(&mut i);
                    if b.get(i)? == &b']' {
                        i += 1;
                        break;
                    }
                    xs.push(parse_num(&mut i)?.0);
                    skip_ws(&mut i);
                    if b.get(i) == Some(&b',') {
                        i += 1;
                    }
                }
                Value::List(xs)
            }
            _ => match parse_num(&mut i)? {
                (x, true) => Value::Int(x as i64),
                (x, false) => Value::Num(x),
            },
        };
        rec.fields.push((k, v));
        skip_ws(&mut i);
        if i < b.len() {
            if b[i] != b',' {
                return None;
            }
            i += 1;
        }
    }
    Some(rec)
}

/// An SVG with two panels: loss (train steps, train epochs, test) and accuracy (train, test) against
/// epochs.
pub fn plot_svg(epochs: &[Record], steps: &[Record]) -> String {
    let (w, h, pad) = (900.0, 360.0, 50.0);
    let pw = (w - 3.0 * pad) / 2.0;
    let ph = h - 2.0 * pad;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let series = |key: &str, src: &[Record], xkey: &str| -> Vec<(f64, f64)> {
        src.iter()
            .filter_map(|r| Some((r.get(xkey)?, r.get(key)?)))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect()
    };
    type Panel<'a> = (&'a str, Vec<(&'a str, Vec<(f64, f64)>, &'a str)>);
    let panels: [Panel<'_>; 2] = [
        (
            "loss",
            vec![
                ("train (steps)", series("loss", steps, "epoch"), "#9ecae1"),
                ("train", series("train_loss", epochs, "epoch"), "#1f77b4"),
                ("test", series("test_loss", epochs, "epoch"), "#d62728"),
            ],
        ),
        (
            "accuracy (%)",
            vec![
                ("train (steps)", series("acc", steps, "epoch"), "#c7e9c0"),
                ("train", series("train_acc", epochs, "epoch"), "#2ca02c"),
                ("test", series("test_acc", epochs, "epoch"), "#d62728"),
            ],
        ),
    ];
    for (pi, (title, lines)) in panels.iter().enumerate() {
        let x0 = pad + pi as f64 * (pw + pad);
        let pts: Vec<(f64, f64)> = lines.iter().flat_map(|l| l.1.iter().copied()).collect();
        let _ = writeln!(
            svg,
            "<rect x=\"{x0}\" y=\"{pad}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#444\"/>"
        );
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"14\">{title}</text>",
            x0 + pw / 2.0,
            pad - 10.0
        );
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">epoch</text>",
            x0 + pw / 2.0,
            h - 12.0
        );
        if pts.is_empty() {
            continue;
        }
        let (mut xmin, mut xmax, mut ymin, mut ymax) = (0.0f64, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in &pts {
            xmax = xmax.max(x);
            ymin = ymin.min(y);
            ymax = ymax.max(y);
        }
        xmin = xmin.min(pts.iter().map(|p| p.0).fold(f64::MAX, f64::min));
        if xmax <= xmin {
            xmax = xmin + 1.0;
        }
        if ymax <= ymin {
            ymax = ymin + 1.0;
        }
        let sx = |x: f64| x0 + (x - xmin) / (xmax - xmin) * pw;
        let sy = |y: f64| pad + ph - (y - ymin) / (ymax - ymin) * ph;
        for k in 0..=4 {
            let yv = ymin + (ymax - ymin) * k as f64 / 4.0;
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"10\">{:.3}</text>",
                x0 - 4.0,
                sy(yv) + 3.0,
                yv
            );
            let xv = xmin + (xmax - xmin) * k as f64 / 4.0;
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"10\">{:.2}</text>",
                sx(xv),
                pad + ph + 14.0,
                xv
            );
        }
        for (li, (name, line, color)) in lines.iter().enumerate() {
            if line.is_empty() {
                continue;
            }
            let d: Vec<String> = line
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                d.join(" ")
            );
            if line.len() < 30 {
                for &(x, y) in line {
                    let _ = writeln!(
                        svg,
                        "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>",
                        sx(x),
                        sy(y)
                    );
                }
            }
            let ly = pad + 16.0 + li as f64 * 16.0;
            let _ = writeln!(
                svg,
                "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\"/>",
                x0 + pw - 110.0,
                x0 + pw - 92.0
            );
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\">{name}</text>",
                x0 + pw - 88.0,
                ly + 4.0
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A progress line on stderr: a bar on a terminal, a plain line every 10% otherwise.
pub struct Progress {
    label: String,
    total: usize,
    done: usize,
    start: Instant,
    tty: bool,
    last_pct: usize,
    quiet: bool,
}

impl Progress {
    /// Start a progress line over `total` units (images).
    pub fn new(label: &str, total: usize, quiet: bool) -> Self {
        Progress {
            label: label.into(),
            total,
            done: 0,
            start: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            last_pct: 0,
            quiet,
        }
    }
    /// Advance by `n` units and show `msg` (e.g. loss and accuracy).
    pub fn inc(&mut self, n: usize, msg: &str) {
        self.done += n;
        if self.quiet {
            return;
        }
        let el = self.start.elapsed().as_secs_f64();
        let rate = self.done as f64 / el.max(1e-9);
        let eta = (self.total.saturating_sub(self.done)) as f64 / rate.max(1e-9);
        let frac = self.done as f64 / self.total.max(1) as f64;
        if self.tty {
            let width = 24;
            let filled = ((frac * width as f64) as usize).min(width);
            eprint!(
                "\r{} [{}{}] {}/{} {msg} {:.0} img/s ETA {}   ",
                self.label,
                "#".repeat(filled),
                "-".repeat(width - filled),
                self.done,
                self.total,
                rate,
                fmt_secs(eta)
            );
            let _ = std::io::stderr().flush();
        } else {
            let pct = (frac * 10.0) as usize * 10;
            if pct > self.last_pct && pct < 100 {
                self.last_pct = pct;
                eprintln!(
                    "{} {pct:>3}% {}/{} {msg} {:.0} img/s ETA {}",
                    self.label,
                    self.done,
                    self.total,
                    rate,
                    fmt_secs(eta)
                );
            }
        }
    }
    /// Finish the line; returns (seconds, units per second).
    pub fn finish(&mut self) -> (f64, f64) {
        let el = self.start.elapsed().as_secs_f64();
        if self.tty && !self.quiet {
            eprintln!();
        }
        (el, self.done as f64 / el.max(1e-9))
    }
}

/// `1h02m03s` / `2m03s` / `3s`.
pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m{:02}s", s / 3600, (s / 60) % 60, s % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let r = Record::new()
            .int("epoch", 3)
            .num("loss", 0.25)
            .list("acc_t", vec![1.5, 2.0])
            .text("mode", "on\"line");
        let j = r.to_json();
        let back = parse_flat_json(&j).unwrap();
        assert_eq!(back, r);
        assert_eq!(r.csv_header(), "epoch,loss,acc_t_1,acc_t_2,mode");
    }

    #[test]
    fn metrics_log_writes_files_and_resumes() {
        let dir = std::env::temp_dir().join(format!("empf-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let mut log = MetricsLog::open(&dir, false).unwrap();
            log.step(
                Record::new()
                    .int("step", 1)
                    .num("epoch", 0.5)
                    .num("loss", 1.0)
                    .num("acc", 50.0),
            )
            .unwrap();
            log.epoch(
                Record::new()
                    .int("epoch", 1)
                    .num("train_loss", 0.9)
                    .num("test_acc", 90.0),
            )
            .unwrap();
            log.epoch(
                Record::new()
                    .int("epoch", 2)
                    .num("train_loss", 0.5)
                    .num("test_acc", 95.0),
            )
            .unwrap();
        }
        let mut log = MetricsLog::open(&dir, true).unwrap();
        assert_eq!(log.epochs.len(), 2);
        log.truncate(1, 1).unwrap();
        assert_eq!(log.epochs.len(), 1);
        let svg = std::fs::read_to_string(dir.join("curves.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("polyline"));
        let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
        assert_eq!(csv.lines().count(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
