//! `runner bench --cold-start`: starts `runner serve` as a fresh process, again and
//! again, cold from the weights and restored from a snapshot, and reports time to READY
//! and to the first prediction, broken into setup phases, beside the machine's measured
//! read bandwidth.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// One server start, measured.
#[derive(Debug, Clone)]
pub struct StartRun {
    pub ready: f64,
    pub first_prediction: f64,
    /// Setup phases as the server reported them (seconds).
    pub phases: Vec<(String, f64)>,
    /// Time before setup began: process start, runtime, socket.
    pub process_start: f64,
    /// How a restore read the snapshot ("direct" or "page cache"), and the share of its
    /// data the page cache held when it began; `None` for a cold start.
    pub restore_read: Option<(String, Option<f64>)>,
    /// The server's setup log (`/health-check`'s `setup.logs`), line by line: what each
    /// phase did, for reading a GPU run afterwards.
    pub setup_log: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeKind {
    /// From the weights, with the GPU kernel cache that earlier starts (and `runner
    /// snapshot`) left behind.
    Cold,
    /// From the weights on what a fresh machine has: an empty GPU kernel cache, so the
    /// driver compiles candle's kernels again (CUDA only).
    ColdFreshMachine,
    Snapshot,
}

#[derive(Debug, Clone)]
pub struct ModeResult {
    pub mode: &'static str,
    pub kind: ModeKind,
    pub runs: Vec<StartRun>,
}

pub struct BenchOptions<'a> {
    pub dir: &'a Path,
    pub device: &'a str,
    pub runs: usize,
    pub snapshot: PathBuf,
    pub drop_caches: bool,
    /// On CUDA, also start cold on an empty kernel cache (what a fresh machine has).
    pub fresh_machine: bool,
    /// What a cold start loads: `safetensors` or `gguf`.
    pub weights_format: &'a str,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    if xs.is_empty() {
        return 0.0;
    }
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn stats(xs: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let v: Vec<f64> = xs.collect();
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(0.0, f64::max);
    (min, median(v), max)
}

/// Drops the page cache so the next read comes from the disk (needs root).
fn drop_page_cache() -> Result<()> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc_sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .context("--drop-caches needs root (writing /proc/sys/vm/drop_caches)")
}

extern "C" {
    #[link_name = "sync"]
    fn libc_sync();
}

fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut s = rest;
        while let Some((size, r)) = s.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || r.len() < n {
                break;
            }
            out.push_str(&r[..n]);
            s = r.get(n + 2..).unwrap_or("");
        }
        out
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

/// Starts `runner serve`, waits for its ready line, runs one prediction, reads the phases.
fn one_start(
    opts: &BenchOptions,
    snapshot_arg: &str,
    kernel_cache: Option<&Path>,
    input: &Value,
) -> Result<StartRun> {
    let exe = std::env::current_exe().context("finding the runner binary")?;
    let mut command = Command::new(exe);
    if let Some(dir) = kernel_cache {
        command.env("CUDA_CACHE_PATH", dir);
    }
    if let Some(quantize) = crate::QUANTIZE.get().cloned().flatten() {
        command.env("RUNNER_QUANTIZE", quantize);
    }
    let started = Instant::now();
    let mut child = command
        .arg("serve")
        .arg(opts.dir)
        .args([
            "--port",
            "0",
            "--device",
            opts.device,
            "--snapshot",
            snapshot_arg,
        ])
        .args((snapshot_arg != "off").then_some("--require-snapshot"))
        .args(["--log-format", "json", "-q"])
        .env_remove("RUNNER_PORT")
        // A cold start measured must not also write a snapshot beside its predictions.
        .env_remove("RUNNER_SAVE_SNAPSHOT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting runner serve")?;
    let stderr = child.stderr.take().expect("piped");
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let (line, ready) = loop {
        match lines.next() {
            Some(Ok(line)) if line.starts_with("runner: ") => break (line, started.elapsed()),
            Some(Ok(line)) => seen.push(line),
            _ => {
                let _ = child.kill();
                bail!(
                    "runner serve exited before it was ready:\n{}",
                    seen.join("\n")
                );
            }
        }
    };
    let result = (|| {
        if !line.contains("runner: ready") {
            bail!("{line}");
        }
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split([' ', '/']).next())
            .context("no address in the ready line")?
            .to_string();
        let body = json!({"input": input}).to_string();
        let (status, answer) = http(&addr, "POST", "/predictions", Some(&body))?;
        let first_prediction = started.elapsed();
        let answer: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
        if status != 200 || answer["status"] != "succeeded" {
            bail!("the first prediction failed ({status}): {answer}");
        }
        let (_, health) = http(&addr, "GET", "/health-check", None)?;
        let health: Value = serde_json::from_str(&health)?;
        let phases: Vec<(String, f64)> = health["runner"]["setup_phases"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        (
                            p["name"].as_str().unwrap_or("?").to_string(),
                            p["seconds"].as_f64().unwrap_or(0.0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let setup = health["runner"]["setup_time"].as_f64().unwrap_or(0.0);
        let snapshot = &health["runner"]["snapshot"];
        let restore_read = snapshot["read"]
            .as_str()
            .map(|read| (read.to_string(), snapshot["page_cache_resident"].as_f64()));
        let setup_log: Vec<String> = health["setup"]["logs"]
            .as_str()
            .map(|logs| logs.lines().map(str::to_string).collect())
            .unwrap_or_default();
        Ok(StartRun {
            ready: ready.as_secs_f64(),
            first_prediction: first_prediction.as_secs_f64(),
            process_start: (ready.as_secs_f64() - setup).max(0.0),
            phases,
            restore_read,
            setup_log,
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Runs every mode, alternating, so drift on the machine hits all alike. On CUDA a third
/// mode starts cold with an empty kernel cache, as a fresh machine would.
pub fn cold_start(opts: &BenchOptions, input: &Value) -> Result<Vec<ModeResult>> {
    let mode = |mode, kind| ModeResult {
        mode,
        kind,
        runs: Vec::new(),
    };
    let mut modes = Vec::new();
    if opts.device.starts_with("cuda") && opts.fresh_machine {
        modes.push(mode(
            "cold, fresh machine (empty kernel cache)",
            ModeKind::ColdFreshMachine,
        ));
    }
    let cold = match opts.weights_format {
        "gguf" => "cold (gguf)",
        _ => "cold (safetensors)",
    };
    modes.push(mode(cold, ModeKind::Cold));
    modes.push(mode("snapshot", ModeKind::Snapshot));
    let snapshot_arg = opts.snapshot.to_string_lossy().into_owned();
    for i in 0..opts.runs {
        for result in modes.iter_mut() {
            if opts.drop_caches {
                drop_page_cache()?;
            }
            let arg = match result.kind {
                ModeKind::Snapshot => snapshot_arg.as_str(),
                _ => "off",
            };
            let fresh_cache = match result.kind {
                ModeKind::ColdFreshMachine => Some(
                    tempfile::Builder::new()
                        .prefix("runner-bench-kernel-cache")
                        .tempdir()
                        .context("creating an empty kernel cache")?,
                ),
                _ => None,
            };
            let run = one_start(opts, arg, fresh_cache.as_ref().map(|d| d.path()), input)
                .with_context(|| format!("{} run {}", result.mode, i + 1))?;
            eprintln!(
                "bench: {:<20} run {}/{}: ready {:.3}s, first prediction {:.3}s",
                result.mode,
                i + 1,
                opts.runs,
                run.ready,
                run.first_prediction
            );
            result.runs.push(run);
        }
    }
    Ok(modes)
}

/// Sequential read bandwidth of a file from the page cache (read it twice, time the
/// second), in bytes per second: the ceiling for a CPU restore.
pub fn page_cache_read_bandwidth(path: &Path) -> Result<f64> {
    let mut buf = vec![0u8; 16 << 20];
    let mut pass = || -> Result<(u64, Duration)> {
        let mut f = std::fs::File::open(path)?;
        let t = Instant::now();
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        Ok((total, t.elapsed()))
    };
    pass()?;
    let (bytes, t) = pass()?;
    Ok(bytes as f64 / t.as_secs_f64().max(1e-9))
}

/// Read bandwidth of a file the page cache does not hold (dropped first; needs root): four
/// threads each read a quarter in 16 MiB pieces, so the disk has several requests at once.
/// The ceiling for a restore when the page cache is dropped before each start.
pub fn cold_read_bandwidth(path: &Path) -> Result<f64> {
    use std::os::unix::fs::FileExt;
    drop_page_cache()?;
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let quarter = len.div_ceil(4);
    let t = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let readers: Vec<_> = (0..4u64)
            .map(|i| {
                let file = &file;
                scope.spawn(move || -> std::io::Result<()> {
                    let mut buf = vec![0u8; 16 << 20];
                    let (mut at, end) = (i * quarter, ((i + 1) * quarter).min(len));
                    while at < end {
                        let n = buf.len().min((end - at) as usize);
                        file.read_exact_at(&mut buf[..n], at)?;
                        at += n as u64;
                    }
                    Ok(())
                })
            })
            .collect();
        for r in readers {
            r.join().expect("a reader thread panicked")?;
        }
        Ok(())
    })?;
    Ok(len as f64 / t.elapsed().as_secs_f64().max(1e-9))
}

/// Sequential read bandwidth of a whole file into freshly allocated memory, as a restore
/// must do (the kernel faults in and zeroes every new page): bytes per second.
pub fn fresh_memory_read_bandwidth(path: &Path) -> Result<f64> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len() as usize;
    let t = Instant::now();
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)?;
    let elapsed = t.elapsed();
    drop(buf);
    Ok(len as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// The phase timings of a mode: each phase's median over the runs.
fn median_phases(m: &ModeResult) -> Vec<(String, f64)> {
    let Some(first) = m.runs.first() else {
        return Vec::new();
    };
    let mut phases = vec![(
        "process start".to_string(),
        median(m.runs.iter().map(|r| r.process_start).collect()),
    )];
    for (name, _) in &first.phases {
        let values = m
            .runs
            .iter()
            .filter_map(|r| r.phases.iter().find(|(n, _)| n == name).map(|(_, s)| *s))
            .collect();
        phases.push((name.clone(), median(values)));
    }
    phases.push((
        "first prediction".to_string(),
        median(
            m.runs
                .iter()
                .map(|r| r.first_prediction - r.ready)
                .collect(),
        ),
    ));
    phases
}

pub struct Report<'a> {
    pub model: String,
    pub device: String,
    pub machine: String,
    pub weights_bytes: u64,
    pub snapshot_bytes: u64,
    pub page_cache_bytes_per_s: f64,
    /// The same file read into freshly allocated memory, on one thread.
    pub fresh_memory_bytes_per_s: f64,
    pub results: &'a [ModeResult],
    pub caches_dropped: bool,
    /// The snapshot file read with the page cache dropped ([`cold_read_bandwidth`]), when
    /// the bench drops it.
    pub cold_read_bytes_per_s: Option<f64>,
    /// Pinned host-to-device bandwidth (CUDA only): the ceiling for a GPU restore.
    pub pinned_h2d_bytes_per_s: Option<f64>,
}

/// How the snapshot runs' restores read the file (the first run's answer; they all run
/// alike), and the median share of the data the page cache held as each began.
fn restore_reads(c: &Report) -> Option<(String, Option<f64>)> {
    let snap = c.results.iter().find(|m| m.kind == ModeKind::Snapshot)?;
    let how = snap
        .runs
        .iter()
        .find_map(|r| r.restore_read.as_ref())?
        .0
        .clone();
    let resident: Vec<f64> = snap
        .runs
        .iter()
        .filter_map(|r| r.restore_read.as_ref()?.1)
        .collect();
    Some((how, (!resident.is_empty()).then(|| median(resident))))
}

pub fn to_json(c: &Report) -> Value {
    let modes: Vec<Value> = c
        .results
        .iter()
        .map(|m| {
            let (rmin, rmed, rmax) = stats(m.runs.iter().map(|r| r.ready));
            let (fmin, fmed, fmax) = stats(m.runs.iter().map(|r| r.first_prediction));
            json!({
                "mode": m.mode,
                "runs": m.runs.len(),
                "ready_seconds": {"min": rmin, "median": rmed, "max": rmax},
                "first_prediction_seconds": {"min": fmin, "median": fmed, "max": fmax},
                "median_phases": median_phases(m).iter().map(|(n, s)| json!({"name": n, "seconds": s})).collect::<Vec<_>>(),
                // Where "device init" went on CUDA (the "CUDA device opened in …" line).
                "device_open": m.runs.iter().filter_map(|r| r.setup_log.iter().find(|l| l.starts_with("CUDA device opened"))).collect::<Vec<_>>(),
                "setup_logs": m.runs.iter().map(|r| &r.setup_log).collect::<Vec<_>>(),
            })
        })
        .collect();
    let restore = restore_bandwidth(c);
    json!({
        "model": c.model,
        "device": c.device,
        "machine": c.machine,
        "page_cache": if c.caches_dropped { "dropped before each start" } else { "warm" },
        "weights_bytes": c.weights_bytes,
        "snapshot_data_bytes": c.snapshot_bytes,
        "page_cache_read_gb_per_s": c.page_cache_bytes_per_s / 1e9,
        "fresh_memory_read_gb_per_s": c.fresh_memory_bytes_per_s / 1e9,
        "snapshot_restore_gb_per_s": restore / 1e9,
        "restore_vs_page_cache": restore / c.page_cache_bytes_per_s.max(1.0),
        "cold_read_gb_per_s": c.cold_read_bytes_per_s.map(|b| b / 1e9),
        "restore_vs_cold_read": c.cold_read_bytes_per_s.map(|b| restore / b.max(1.0)),
        "restore_reads": restore_reads(c).map(|r| r.0),
        "page_cache_resident_at_restore": restore_reads(c).and_then(|r| r.1),
        "pinned_h2d_gb_per_s": c.pinned_h2d_bytes_per_s.map(|b| b / 1e9),
        "restore_vs_pinned_h2d": c.pinned_h2d_bytes_per_s.map(|b| restore / b.max(1.0)),
        "speedup_ready": speedup(c, ModeKind::Cold, |r| r.ready).unwrap_or(0.0),
        "speedup_first_prediction": speedup(c, ModeKind::Cold, |r| r.first_prediction).unwrap_or(0.0),
        "speedup_first_prediction_vs_fresh_machine": speedup(c, ModeKind::ColdFreshMachine, |r| r.first_prediction),
        "modes": modes,
    })
}

/// How many times faster the snapshot mode is than `baseline` (medians); `None` when either
/// mode was not run.
fn speedup(c: &Report, baseline: ModeKind, f: impl Fn(&StartRun) -> f64) -> Option<f64> {
    let med = |kind: ModeKind| {
        c.results
            .iter()
            .find(|m| m.kind == kind)
            .map(|m| median(m.runs.iter().map(&f).collect()))
    };
    Some(med(baseline)? / med(ModeKind::Snapshot)?.max(1e-9))
}

/// Bytes per second of the restore phase, median over the snapshot runs.
fn restore_bandwidth(c: &Report) -> f64 {
    let Some(snap) = c.results.iter().find(|m| m.kind == ModeKind::Snapshot) else {
        return 0.0;
    };
    let t = median(
        snap.runs
            .iter()
            .filter_map(|r| {
                r.phases
                    .iter()
                    .find(|(n, _)| n == "snapshot restore")
                    .map(|(_, s)| *s)
            })
            .collect(),
    );
    c.snapshot_bytes as f64 / t.max(1e-9)
}

pub fn to_table(c: &Report) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "cold start vs snapshot · model {} · device {} · {}\npage cache {} · weights {:.1} MB · snapshot data {:.1} MB\n\n",
        c.model,
        c.device,
        c.machine,
        if c.caches_dropped { "dropped before each start" } else { "warm" },
        c.weights_bytes as f64 / 1e6,
        c.snapshot_bytes as f64 / 1e6
    ));
    out.push_str(&format!(
        "{:<42} {:>5} {:>26} {:>26}\n",
        "mode", "runs", "ready s (min/med/max)", "1st prediction s (min/med/max)"
    ));
    for m in c.results {
        let (a, b, d) = stats(m.runs.iter().map(|r| r.ready));
        let (e, f, g) = stats(m.runs.iter().map(|r| r.first_prediction));
        out.push_str(&format!(
            "{:<42} {:>5} {:>26} {:>26}\n",
            m.mode,
            m.runs.len(),
            format!("{a:.3}/{b:.3}/{d:.3}"),
            format!("{e:.3}/{f:.3}/{g:.3}")
        ));
    }
    out.push_str("\nmedian phases (s):\n");
    for m in c.results {
        let phases: Vec<String> = median_phases(m)
            .iter()
            .map(|(n, s)| format!("{n} {s:.3}"))
            .collect();
        out.push_str(&format!("  {:<40} {}\n", m.mode, phases.join(" · ")));
    }
    let restore = restore_bandwidth(c);
    out.push_str(&format!(
        "\nsnapshot restore {:.2} GB/s · page-cache read ceiling {:.2} GB/s · {:.0}% of the ceiling\n",
        restore / 1e9,
        c.page_cache_bytes_per_s / 1e9,
        100.0 * restore / c.page_cache_bytes_per_s.max(1.0)
    ));
    out.push_str(&format!(
        "(the same file read on one thread into freshly allocated memory: {:.2} GB/s)\n",
        c.fresh_memory_bytes_per_s / 1e9
    ));
    if let Some(cold) = c.cold_read_bytes_per_s {
        out.push_str(&format!(
            "cold-file read ceiling {:.2} GB/s (the snapshot read by 4 threads, page cache dropped) · restore at {:.0}% of it\n",
            cold / 1e9,
            100.0 * restore / cold.max(1.0)
        ));
    }
    if let Some((how, resident)) = restore_reads(c) {
        out.push_str(&format!(
            "restores read {}{}\n",
            if how == "direct" {
                "around the page cache (O_DIRECT)"
            } else {
                "through the page cache"
            },
            resident
                .map(|r| format!(
                    "; {:.0}% of the data was in it as they began (median)",
                    r * 100.0
                ))
                .unwrap_or_default()
        ));
    }
    let copying = std::env::var("RUNNER_RESTORE_CPU").is_ok_and(|v| v == "copy");
    if c.pinned_h2d_bytes_per_s.is_none() && !copying {
        out.push_str(
            "(the CPU restore maps the snapshot instead of copying it, so it can pass the read \
             ceiling; RUNNER_RESTORE_CPU=copy measures a copying restore)\n",
        );
    }
    if let Some(h2d) = c.pinned_h2d_bytes_per_s {
        out.push_str(&format!(
            "pinned host-to-device ceiling {:.2} GB/s · restore at {:.0}% of it\n",
            h2d / 1e9,
            100.0 * restore / h2d.max(1.0)
        ));
    }
    out.push_str(&format!(
        "speedup from the snapshot: {:.2}x to ready, {:.2}x to the first prediction\n",
        speedup(c, ModeKind::Cold, |r| r.ready).unwrap_or(0.0),
        speedup(c, ModeKind::Cold, |r| r.first_prediction).unwrap_or(0.0)
    ));
    if let Some(fresh) = speedup(c, ModeKind::ColdFreshMachine, |r| r.first_prediction) {
        out.push_str(&format!(
            "against a fresh machine's cold start (empty kernel cache): {fresh:.2}x to the first prediction\n"
        ));
    }
    out
}

/// A horizontal stacked-bar chart of each mode's median phases, as SVG.
pub fn to_svg(c: &Report) -> String {
    const COLORS: [&str; 8] = [
        "#9ca3af", "#60a5fa", "#f59e0b", "#34d399", "#a78bfa", "#f87171", "#fbbf24", "#4b5563",
    ];
    let rows: Vec<(&str, Vec<(String, f64)>)> = c
        .results
        .iter()
        .map(|m| (m.mode, median_phases(m)))
        .collect();
    let longest = rows
        .iter()
        .map(|(_, p)| p.iter().map(|(_, s)| s).sum::<f64>())
        .fold(0.0, f64::max)
        .max(1e-6);
    let (left, width, bar, gap) = (170.0, 560.0, 28.0, 22.0);
    let mut names: Vec<String> = Vec::new();
    for (_, phases) in &rows {
        for (n, _) in phases {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let color = |n: &str| COLORS[names.iter().position(|x| x == n).unwrap_or(0) % COLORS.len()];
    let height =
        70.0 + rows.len() as f64 * (bar + gap) + 20.0 * names.len().div_ceil(3) as f64 + 20.0;
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">
<title>runner cold start vs snapshot: {model}</title>
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="20" font-size="14" font-weight="bold">Time to first prediction: {model} on {device}</text>
<text x="10" y="38" fill="#4b5563">{machine}; median of the runs; page cache {cache}</text>
"##,
        w = left + width + 90.0,
        model = c.model,
        device = c.device,
        machine = c.machine,
        cache = if c.caches_dropped { "dropped" } else { "warm" },
    );
    for (i, (mode, phases)) in rows.iter().enumerate() {
        let y = 55.0 + i as f64 * (bar + gap);
        svg.push_str(&format!(
            r#"<text x="10" y="{}">{mode}</text>
"#,
            y + bar * 0.65
        ));
        let mut x = left;
        for (name, s) in phases {
            let w = s / longest * width;
            svg.push_str(&format!(
                r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{bar}" fill="{}"><title>{name}: {s:.3} s</title></rect>
"#,
                color(name)
            ));
            x += w;
        }
        let total: f64 = phases.iter().map(|(_, s)| s).sum();
        svg.push_str(&format!(
            r#"<text x="{:.1}" y="{}">{total:.3} s</text>
"#,
            x + 6.0,
            y + bar * 0.65
        ));
    }
    let legend_y = 55.0 + rows.len() as f64 * (bar + gap) + 10.0;
    for (i, n) in names.iter().enumerate() {
        let (col, row) = (i % 3, i / 3);
        let x = 10.0 + col as f64 * 240.0;
        let y = legend_y + row as f64 * 20.0;
        svg.push_str(&format!(
            r#"<rect x="{x}" y="{y}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{n}</text>
"#,
            color(n),
            x + 18.0,
            y + 10.0
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

/// A short description of this machine (CPU model, cores, memory, kernel). The kernel says
/// what the numbers ran under: GPU machines here run in a Firecracker microVM or under
/// gVisor, whose kernel (always "4.4.0") proxies file reads and GPU driver calls.
pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| format!("{:.0} GB RAM", kb / 1e6))
        .unwrap_or_default();
    let kernel = kernel_description(
        std::fs::read_to_string("/proc/sys/kernel/osrelease").ok(),
        std::fs::read_to_string("/proc/version").ok(),
    );
    format!("{cpu}, {cores} cores, {mem}{kernel}")
}

/// `, Linux RELEASE`, marked as gVisor where `/proc/version` is gVisor's fixed one.
fn kernel_description(release: Option<String>, version: Option<String>) -> String {
    let Some(release) = release
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
    else {
        return String::new();
    };
    // gVisor reports this kernel, built on this date, whatever the host runs.
    let gvisor = release == "4.4.0"
        && version.is_some_and(|v| v.contains("#1 SMP Sun Jan 10 15:06:54 PST 2016"));
    format!(", Linux {release}{}", if gvisor { " (gVisor)" } else { "" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_is_named_and_gvisor_recognised() {
        let gvisor = Some("Linux version 4.4.0 #1 SMP Sun Jan 10 15:06:54 PST 2016\n".into());
        assert_eq!(
            kernel_description(Some("4.4.0\n".into()), gvisor),
            ", Linux 4.4.0 (gVisor)"
        );
        assert_eq!(
            kernel_description(
                Some("6.18.44-fc-v657\n".into()),
                Some("Linux version 6.18.44-fc-v657 (gcc 12) #1 SMP".into())
            ),
            ", Linux 6.18.44-fc-v657"
        );
        assert_eq!(kernel_description(None, None), "");
        assert!(machine_description().contains(" cores, "));
    }
}
