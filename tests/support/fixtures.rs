//! A loopback fixture server for end-to-end tests: a webhook receiver (that can fail on
//! purpose), a file host for URL inputs and an upload target for file outputs.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A failure "status" that never answers: the connection stays open for a minute.
pub const HANG: u16 = 1;
/// A failure "status" that closes the connection without an answer.
pub const DROP: u16 = 2;

#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub answered: u16,
}

#[derive(Default)]
pub struct FixtureState {
    pub requests: Vec<Received>,
    /// Per hook path: how many requests still get an error, and which status
    /// ([`HANG`] and [`DROP`] are not statuses: see there).
    pub failures: HashMap<String, (u32, u16)>,
    pub files: HashMap<String, Vec<u8>>,
}

pub struct Fixtures {
    pub addr: String,
    state: Arc<Mutex<FixtureState>>,
}

impl Fixtures {
    pub fn start() -> Fixtures {
        Self::start_on("127.0.0.1:0")
    }
    /// On a given address (e.g. a port that refused connections until now).
    pub fn start_on(addr: &str) -> Fixtures {
        let listener = TcpListener::bind(addr).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(Mutex::new(FixtureState::default()));
        let st = Arc::clone(&state);
        let base = format!("http://{addr}");
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let st = Arc::clone(&st);
                let base = base.clone();
                std::thread::spawn(move || {
                    let _ = serve_fixture(stream, &st, &base);
                });
            }
        });
        Fixtures { addr, state }
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn lock(&self) -> std::sync::MutexGuard<'_, FixtureState> {
        self.state.lock().unwrap()
    }
    pub fn received(&self, path: &str) -> Vec<Received> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }
}

fn serve_fixture(
    stream: TcpStream,
    state: &Mutex<FixtureState>,
    base: &str,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;

    let hostile = path.clone();
    let mut extra_headers = String::new();
    let mut out_body = Vec::new();
    let status = {
        let mut st = state.lock().unwrap();
        let status = if let Some(name) = path.strip_prefix("/files/") {
            match st.files.get(name) {
                Some(content) if method == "GET" => {
                    out_body = content.clone();
                    200
                }
                _ if name == "redirect-to-file" => {
                    extra_headers.push_str("Location: file:///etc/passwd\r\n");
                    302
                }
                _ => 404,
            }
        } else if let Some(name) = path.strip_prefix("/upload/") {
            let name = name.split('?').next().unwrap_or(name).to_string();
            st.files.insert(format!("uploaded/{name}"), body.clone());
            extra_headers.push_str(&format!(
                "Location: {base}/files/uploaded/{name}?signature=x\r\n"
            ));
            201
        } else {
            match st.failures.get_mut(&path) {
                Some((left, status)) if *left > 0 => {
                    *left -= 1;
                    *status
                }
                _ => 200,
            }
        };
        st.requests.push(Received {
            method,
            path,
            headers,
            body,
            answered: status,
        });
        status
    };
    let mut stream = stream;
    // Hostile file servers: one that never stops sending, one that never sends.
    if hostile == "/files/endless" {
        stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n")?;
        let chunk = vec![b'x'; 64 * 1024];
        loop {
            stream.write_all(&chunk)?; // until runner hangs up
        }
    }
    if hostile == "/files/stall" {
        stream.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nConnection: close\r\n\r\nabc",
        )?;
        std::thread::sleep(Duration::from_secs(60));
        return Ok(());
    }
    match status {
        HANG => {
            std::thread::sleep(Duration::from_secs(60));
            return Ok(());
        }
        DROP => return Ok(()),
        _ => {}
    }
    write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n",
        out_body.len()
    )?;
    stream.write_all(&out_body)?;
    Ok(())
}
