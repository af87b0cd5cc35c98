//! Helpers for end-to-end tests: the real `runner` binary, a real socket on 127.0.0.1,
//! and a minimal HTTP/1.1 client (so tests depend on nothing but std).
#![allow(dead_code)]

pub mod fixtures;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const RUNNER: &str = env!("CARGO_BIN_EXE_runner");

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The MiniLM model directory, with a clear failure when its weights were not fetched.
pub fn minilm_dir() -> PathBuf {
    let dir = repo_root().join("models/all-minilm-l6-v2");
    assert!(
        dir.join("weights/model.safetensors").is_file(),
        "MiniLM weights are missing: run scripts/fetch-minilm.sh (or scripts/test.sh, which fetches them)"
    );
    dir
}

/// A `runner serve` process on a free port; killed when dropped.
pub struct Server {
    child: Child,
    pub addr: String,
    /// The ready line (or the setup-failed line).
    pub status_line: String,
    stderr_lines: mpsc::Receiver<String>,
}

impl Server {
    /// The server process's resident memory, in KiB (Linux).
    #[allow(dead_code)]
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The server process's peak resident memory so far, in KiB (Linux).
    #[allow(dead_code)]
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// A KiB field of the server process's /proc status (0 when unreadable).
    #[allow(dead_code)]
    fn status_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }

    /// How many of the server process's memory mappings map `path` (Linux).
    pub fn mappings_of(&self, path: &Path) -> usize {
        let maps =
            std::fs::read_to_string(format!("/proc/{}/maps", self.child.id())).unwrap_or_default();
        let name = path.to_str().unwrap();
        maps.lines().filter(|l| l.ends_with(name)).count()
    }

    /// Starts `runner serve DIR --port 0 ARGS` and waits for its ready or setup-failed line.
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        Self::start_with(Command::new(RUNNER), dir, args)
    }

    /// [`Server::start`] through another command (e.g. a shell that moves itself into a
    /// cgroup and then `exec`s runner), given with the runner binary as its last argument.
    pub fn start_with(command: Command, dir: &Path, args: &[&str]) -> Server {
        let mut command = command;
        let mut child = command
            .arg("serve")
            .arg(dir)
            .args(["--port", "0", "--device", "cpu"])
            .args(args)
            .env_remove("RUNNER_PORT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runner starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if line.starts_with("runner: ") {
                        let addr = line
                            .split("http://")
                            .nth(1)
                            .and_then(|r| r.split([' ', '/']).next())
                            .expect("address in the status line")
                            .to_string();
                        return Server {
                            child,
                            addr,
                            status_line: line,
                            stderr_lines: rx,
                        };
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "runner did not report ready in time; stderr:\n{}",
                        seen.join("\n")
                    );
                }
            }
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http(&self.addr, "GET", path, None, &[])
    }

    pub fn post_json(&self, path: &str, body: &str) -> (u16, String) {
        http(
            &self.addr,
            "POST",
            path,
            Some(body),
            &[("Content-Type", "application/json")],
        )
    }

    pub fn predict(&self, input: serde_json::Value) -> (u16, serde_json::Value) {
        let (status, body) = self.post_json(
            "/predictions",
            &serde_json::json!({ "input": input }).to_string(),
        );
        (
            status,
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}")),
        )
    }

    /// POSTs a prediction body from another thread; join the handle for (status, body).
    pub fn predict_in_background(&self, body: &str) -> std::thread::JoinHandle<(u16, String)> {
        let (addr, body) = (self.addr.clone(), body.to_string());
        std::thread::spawn(move || {
            http(
                &addr,
                "POST",
                "/predictions",
                Some(&body),
                &[("Content-Type", "application/json")],
            )
        })
    }

    /// What `/health-check` says of a `--save-snapshot` save once it has ended (or after
    /// 2 minutes of `saving`).
    #[allow(dead_code)]
    pub fn finished_snapshot_save(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let health: serde_json::Value =
                serde_json::from_str(&self.get("/health-check").1).unwrap();
            let save = health["runner"]["snapshot_save"].clone();
            if save["status"] != "saving" || Instant::now() > deadline {
                return save;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM, as a supervisor stopping the server does.
    #[allow(dead_code)]
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Whether the process exits within `limit`.
    #[allow(dead_code)]
    pub fn exits_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Everything the server wrote on stderr since it became ready (or since the last call).
    pub fn drain_stderr(&self) -> Vec<String> {
        self.stderr_lines.try_iter().collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let r = request(
        addr,
        method,
        path,
        &headers,
        Some(body.unwrap_or("").as_bytes()),
    );
    (r.status, r.body)
}

/// A response: status, lower-cased headers, body (de-chunked).
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: std::collections::HashMap<String, String>,
    pub body: String,
}

/// One HTTP/1.1 request with `Connection: close`, read to the end (so an event stream is
/// read until the server closes it).
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
) -> Response {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        stream.write_all(b).unwrap();
    }
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: std::collections::HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
}

/// Runs the `runner` binary to completion: (exit code, stdout, stderr).
pub fn runner(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(RUNNER)
        .args(args)
        .output()
        .expect("runner runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A tiny-mlp model directory with generated weights (`runner generate`): `layers`
/// hidden-to-hidden layers of `hidden` x `hidden` f32, computing in `dtype`.
#[allow(dead_code)]
pub fn generated_tiny_mlp(hidden: usize, layers: usize, dtype: &str) -> tempfile::TempDir {
    let d = scratch_model("tiny-mlp");
    let weights = d.path().join("weights");
    let (code, _, stderr) = runner(&[
        "generate",
        "tiny-mlp",
        weights.to_str().unwrap(),
        "--hidden-size",
        &hidden.to_string(),
        "--layers",
        &layers.to_string(),
        "--dtype",
        dtype,
    ]);
    assert_eq!(code, 0, "{stderr}");
    d
}

/// Cuts the last `bytes` bytes off a file (a download that stopped early).
#[allow(dead_code)]
pub fn cut_short(path: &Path, bytes: u64) {
    let len = std::fs::metadata(path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len - bytes)
        .unwrap();
}

/// Copies a committed model directory (cog.yaml only) into a temporary folder.
pub fn scratch_model(name: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo_root().join("models").join(name).join("cog.yaml"),
        d.path().join("cog.yaml"),
    )
    .unwrap();
    d
}

pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("an array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}
