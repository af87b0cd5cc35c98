//! File inputs and outputs, as Cog's server handles them: `Path`/`File` inputs arrive as
//! http(s) URLs or data URIs and reach the model as local files; `Path` outputs leave as
//! data URIs, or are uploaded with `PUT` to `--upload-url`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use runner_spec::{FieldType, OutputType, Primitive, Signature, ValidationIssue};
use serde_json::{json, Map, Value};

/// Limits and destinations for files.
#[derive(Debug, Clone)]
pub struct FileConfig {
    /// Where `Path` outputs are uploaded (`PUT {upload_url}/{name}`); data URIs when unset.
    pub upload_url: Option<String>,
    /// Largest file input accepted, downloaded or decoded.
    pub max_input_bytes: u64,
    /// Time limit for downloading one input file.
    pub download_timeout: Duration,
    /// Time limit for uploading one output file.
    pub upload_timeout: Duration,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            upload_url: None,
            // Cog accepts 100 MiB request bodies; a URL may point at something larger.
            max_input_bytes: 512 * 1024 * 1024,
            download_timeout: Duration::from_secs(120),
            upload_timeout: Duration::from_secs(120),
        }
    }
}

fn is_file(p: Primitive) -> bool {
    matches!(p, Primitive::Path | Primitive::File)
}

/// Whether any input of the signature is a file.
pub fn has_file_inputs(signature: &Signature) -> bool {
    fn holds_file(t: &FieldType) -> bool {
        match t {
            FieldType::Prim(p) | FieldType::List(p) => is_file(*p),
            FieldType::Union(ts) => ts.iter().any(holds_file),
        }
    }
    signature.inputs.iter().any(|f| holds_file(&f.ty))
}

/// Whether the output holds files anywhere.
pub fn has_file_outputs(output: &OutputType) -> bool {
    match output {
        OutputType::Prim(p) => is_file(*p),
        OutputType::List(t) | OutputType::Iterator(t) | OutputType::ConcatenateIterator(t) => {
            has_file_outputs(t)
        }
        OutputType::Object(fields) => fields.iter().any(|(_, t, _)| has_file_outputs(t)),
    }
}

fn file_values<'a>(
    signature: &Signature,
    input: &'a Map<String, Value>,
) -> Vec<(String, Vec<&'a str>)> {
    let mut found = Vec::new();
    for field in &signature.inputs {
        let p = match &field.ty {
            FieldType::Prim(p) | FieldType::List(p) => *p,
            FieldType::Union(_) => continue,
        };
        if !is_file(p) {
            continue;
        }
        match input.get(&field.name) {
            Some(Value::String(s)) => found.push((field.name.clone(), vec![s.as_str()])),
            Some(Value::Array(items)) => found.push((
                field.name.clone(),
                items.iter().filter_map(Value::as_str).collect(),
            )),
            _ => {}
        }
    }
    found
}

/// Rejects file inputs that are neither http(s) URLs nor data URIs: the server never reads
/// local files or other schemes on a client's behalf.
pub fn check_file_inputs(
    signature: &Signature,
    input: &Map<String, Value>,
) -> Vec<ValidationIssue> {
    let mut issues = Vec::new();
    for (name, values) in file_values(signature, input) {
        for value in values {
            let scheme = value.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
            match scheme.as_deref() {
                Some("http" | "https") if url::Url::parse(value).is_ok() => {}
                Some("data") => {}
                _ => issues.push(ValidationIssue {
                    loc: vec![json!("body"), json!("input"), json!(name)],
                    msg: format!(
                        "unsupported file URL {:?}: give an http:// or https:// URL or a data: URI",
                        truncate(value, 64)
                    ),
                    kind: "value_error.url.scheme".into(),
                }),
            }
        }
    }
    issues
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n).collect::<String>() + "…"
    }
}

/// An HTTP client that follows redirects only to http(s) URLs.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            if attempt.previous().len() >= 10 {
                attempt.error("too many redirects")
            } else if matches!(attempt.url().scheme(), "http" | "https") {
                attempt.follow()
            } else {
                attempt.error("redirect to a non-http(s) URL")
            }
        }))
        .user_agent(concat!("runner/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a TLS backend is compiled in")
}

/// Replaces every file input with the path of a local copy under `dir`.
pub async fn fetch_inputs(
    signature: &Signature,
    input: &mut Map<String, Value>,
    dir: &Path,
    config: &FileConfig,
    client: &reqwest::Client,
) -> Result<(), String> {
    let mut counter = 0usize;
    let names: Vec<String> = file_values(signature, input)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for name in names {
        let value = input.get_mut(&name).expect("found above");
        let items: Vec<&mut Value> = match value {
            Value::Array(items) => items.iter_mut().collect(),
            v => vec![v],
        };
        for item in items {
            let Some(url) = item.as_str() else { continue };
            counter += 1;
            let sub = dir.join(format!("input-{counter}"));
            std::fs::create_dir_all(&sub)
                .map_err(|e| format!("cannot create {}: {e}", sub.display()))?;
            let path = fetch_one(url, &sub, config, client)
                .await
                .map_err(|e| format!("input `{name}`: {e}"))?;
            *item = Value::String(path.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

async fn fetch_one(
    url: &str,
    dir: &Path,
    config: &FileConfig,
    client: &reqwest::Client,
) -> Result<PathBuf, String> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (mime, bytes) = decode_data_uri(rest, config.max_input_bytes)?;
        let path = dir.join(format!("file{}", extension_for(&mime)));
        std::fs::write(&path, bytes)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        return Ok(path);
    }
    let parsed = url::Url::parse(url).map_err(|e| format!("not a URL ({e})"))?;
    let name = parsed
        .path_segments()
        .and_then(|mut s| s.next_back())
        .map(sanitize_file_name)
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "file".into());
    let path = dir.join(name);
    let download = async {
        let response = client
            .get(parsed.clone())
            .send()
            .await
            .map_err(|e| format!("cannot download {}: {}", redact(&parsed), e.without_url()))?;
        if !response.status().is_success() {
            return Err(format!(
                "cannot download {}: the server answered {}",
                redact(&parsed),
                response.status()
            ));
        }
        if response
            .content_length()
            .is_some_and(|n| n > config.max_input_bytes)
        {
            return Err(format!(
                "{} is larger than the {} byte limit for file inputs",
                redact(&parsed),
                config.max_input_bytes
            ));
        }
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let mut stream = response.bytes_stream();
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                format!(
                    "download of {} broke off: {}",
                    redact(&parsed),
                    e.without_url()
                )
            })?;
            total += chunk.len() as u64;
            if total > config.max_input_bytes {
                return Err(format!(
                    "{} is larger than the {} byte limit for file inputs",
                    redact(&parsed),
                    config.max_input_bytes
                ));
            }
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                .await
                .map_err(|e| cannot_write(&path, &e))?;
        }
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(|e| cannot_write(&path, &e))?;
        Ok(())
    };
    tokio::time::timeout(config.download_timeout, download)
        .await
        .map_err(|_| {
            format!(
                "downloading {} took longer than {:?}",
                redact(&parsed),
                config.download_timeout
            )
        })??;
    Ok(path)
}

/// The URL without its query string (which often holds signatures) for messages.
fn redact(url: &url::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    let _ = u.set_password(None);
    u.to_string()
}

fn sanitize_file_name(name: &str) -> String {
    let decoded = percent_decode(name.as_bytes());
    let name = String::from_utf8_lossy(&decoded);
    name.chars()
        .map(|c| {
            if c.is_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .chars()
        .take(128)
        .collect()
}

fn percent_decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' && i + 2 < input.len() {
            if let Ok(b) = u8::from_str_radix(&String::from_utf8_lossy(&input[i + 1..i + 3]), 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    out
}

/// A failed write of a file input, saying what to do when the disk is full.
fn cannot_write(path: &Path, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) {
        format!(
            "cannot write {}: the disk holding the scratch folder is full; free space there or point TMPDIR at a folder with room",
            path.display()
        )
    } else {
        format!("cannot write {}: {e}", path.display())
    }
}

/// Decodes the part of a data URI after `data:`; returns its media type and bytes.
pub fn decode_data_uri(rest: &str, limit: u64) -> Result<(String, Vec<u8>), String> {
    let (meta, data) = rest
        .split_once(',')
        .ok_or("malformed data URI: no ',' before the data")?;
    let is_base64 = meta.ends_with(";base64");
    let mime = meta
        .trim_end_matches(";base64")
        .split(';')
        .next()
        .filter(|m| !m.is_empty())
        .unwrap_or("text/plain")
        .to_string();
    let too_large = || format!("data URI is larger than the {limit} byte limit for file inputs");
    // Decoded size is at most this (up to 2 bytes over, for base64 padding): refuse clearly
    // oversized data before allocating; the exact check follows the decode.
    let bound = if is_base64 {
        let significant = data.bytes().filter(|b| !b.is_ascii_whitespace()).count() as u64;
        significant.div_ceil(4) * 3
    } else {
        data.len() as u64
    };
    if bound > limit.saturating_add(2) {
        return Err(too_large());
    }
    let bytes = if is_base64 {
        let cleaned: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        // Padding optional, as browsers accept it.
        let lenient = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        lenient
            .decode(cleaned)
            .map_err(|e| format!("malformed data URI: the base64 data does not decode ({e})"))?
    } else {
        percent_decode(data.as_bytes())
    };
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok((mime, bytes))
}

/// A media type for a file name, from its extension.
pub fn mime_for_path(path: &Path) -> &'static str {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("txt") => "text/plain",
        Some("json") => "application/json",
        Some("csv") => "text/csv",
        Some("html" | "htm") => "text/html",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("svg") => "image/svg+xml",
        Some("wav") => "audio/wav",
        Some("mp3") => "audio/mpeg",
        Some("ogg") => "audio/ogg",
        Some("flac") => "audio/flac",
        Some("mp4") => "video/mp4",
        Some("webm") => "video/webm",
        Some("pdf") => "application/pdf",
        Some("zip") => "application/zip",
        Some("safetensors" | "bin") => "application/octet-stream",
        _ => "application/octet-stream",
    }
}

/// A file extension (with its dot) for a media type, or "" when unknown.
pub fn extension_for(mime: &str) -> &'static str {
    match mime {
        "text/plain" => ".txt",
        "application/json" => ".json",
        "text/csv" => ".csv",
        "image/png" => ".png",
        "image/jpeg" => ".jpg",
        "image/gif" => ".gif",
        "image/webp" => ".webp",
        "audio/wav" | "audio/x-wav" => ".wav",
        "audio/mpeg" => ".mp3",
        "video/mp4" => ".mp4",
        "application/pdf" => ".pdf",
        _ => "",
    }
}

/// Turns the local paths in a model's output into data URIs or uploaded URLs.
pub async fn encode_outputs(
    output_type: &OutputType,
    value: Value,
    prediction_id: &str,
    config: &FileConfig,
    client: &reqwest::Client,
) -> Result<Value, String> {
    Box::pin(encode(output_type, value, prediction_id, config, client)).await
}

async fn encode(
    output_type: &OutputType,
    value: Value,
    prediction_id: &str,
    config: &FileConfig,
    client: &reqwest::Client,
) -> Result<Value, String> {
    match (output_type, value) {
        (OutputType::Prim(p), Value::String(path)) if is_file(*p) => {
            encode_file(Path::new(&path), prediction_id, config, client)
                .await
                .map(Value::String)
        }
        (
            OutputType::List(t) | OutputType::Iterator(t) | OutputType::ConcatenateIterator(t),
            Value::Array(items),
        ) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                out.push(Box::pin(encode(t, item, prediction_id, config, client)).await?);
            }
            Ok(Value::Array(out))
        }
        (OutputType::Object(fields), Value::Object(mut map)) => {
            for (name, t, _) in fields {
                if let Some(v) = map.get_mut(name) {
                    let taken = v.take();
                    *v = Box::pin(encode(t, taken, prediction_id, config, client)).await?;
                }
            }
            Ok(Value::Object(map))
        }
        (_, v) => Ok(v),
    }
}

/// A file's bytes, 1 MiB at a time; a read error ends the stream with that error.
fn file_chunks(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static {
    futures_util::stream::unfold(Some(file), |file| async move {
        use tokio::io::AsyncReadExt;
        let mut file = file?;
        let mut chunk = vec![0u8; 1 << 20];
        match file.read(&mut chunk).await {
            Ok(0) => None,
            Ok(n) => {
                chunk.truncate(n);
                Some((Ok(chunk), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

async fn encode_file(
    path: &Path,
    prediction_id: &str,
    config: &FileConfig,
    client: &reqwest::Client,
) -> Result<String, String> {
    let unreadable = |e: std::io::Error| {
        format!(
            "the model's output file {} cannot be read: {e}",
            path.display()
        )
    };
    let mime = mime_for_path(path);
    match &config.upload_url {
        None => {
            let bytes = tokio::fs::read(path).await.map_err(unreadable)?;
            Ok(format!(
                "data:{mime};base64,{}",
                base64::engine::general_purpose::STANDARD.encode(&bytes)
            ))
        }
        Some(base) => {
            // Streamed from disk: an output may be gigabytes (a training's weights).
            let file = tokio::fs::File::open(path).await.map_err(unreadable)?;
            let length = file.metadata().await.map_err(unreadable)?.len();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "output".into());
            let endpoint = if base.ends_with('/') {
                base.clone()
            } else {
                format!("{base}/")
            };
            let url = format!("{endpoint}{name}");
            let response = client
                .put(&url)
                .header("content-type", mime)
                .header("content-length", length)
                .header("x-prediction-id", prediction_id)
                .body(reqwest::Body::wrap_stream(file_chunks(file)))
                .timeout(config.upload_timeout)
                .send()
                .await
                .map_err(|e| format!("uploading {name} failed: {}", e.without_url()))?;
            if !response.status().is_success() {
                return Err(format!(
                    "uploading {name} failed: the upload server answered {}",
                    response.status()
                ));
            }
            let location = response
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .unwrap_or_else(|| response.url().to_string());
            Ok(match url::Url::parse(&location) {
                Ok(mut u) => {
                    u.set_query(None);
                    u.to_string()
                }
                Err(_) => location,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_uris_decode_with_limits() {
        let (mime, bytes) = decode_data_uri("text/plain;base64,aGVsbG8=", 100).unwrap();
        assert_eq!(
            (mime.as_str(), bytes.as_slice()),
            ("text/plain", &b"hello"[..])
        );
        let (mime, bytes) = decode_data_uri(",a%20b", 100).unwrap();
        assert_eq!(
            (mime.as_str(), bytes.as_slice()),
            ("text/plain", &b"a b"[..])
        );
        // Unpadded base64 is accepted, as browsers do.
        assert_eq!(
            decode_data_uri("text/plain;base64,aGVsbG8", 100).unwrap().1,
            b"hello"
        );
        assert!(decode_data_uri("text/plain;base64,!!!!", 100)
            .unwrap_err()
            .contains("base64"));
        assert!(decode_data_uri("no-comma", 100)
            .unwrap_err()
            .contains("malformed"));
        assert!(decode_data_uri("text/plain;base64,aGVsbG8=", 2)
            .unwrap_err()
            .contains("limit"));
    }

    /// A deterministic sweep over data URIs (a fuzzer's worth of inputs, replayable in
    /// `cargo test`): random strings never panic and never decode past the limit, and
    /// random bytes survive base64 (padded or not, with whitespace) and percent encoding.
    #[test]
    fn data_uri_sweep_respects_limits_and_round_trips() {
        use base64::Engine as _;
        // A fixed seed, so a failure replays exactly.
        let mut rng =
            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0xD1B5_4A32_D192_ED03);
        let mut next = move || rand::Rng::random::<u64>(&mut rng);
        let alphabet: Vec<char> = "aGVsbG8+/=%0fF;,: \n\tbase64text/plainé🙂"
            .chars()
            .collect();
        for round in 0..5000 {
            let len = (next() % 40) as usize;
            let s: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let limit = next() % 24;
            let outcome = std::panic::catch_unwind(|| decode_data_uri(&s, limit));
            match outcome {
                Err(_) => panic!("round {round}: {s:?} panicked"),
                Ok(Ok((_, bytes))) => {
                    assert!(
                        bytes.len() as u64 <= limit,
                        "round {round}: {s:?} beat limit {limit}"
                    )
                }
                Ok(Err(_)) => {}
            }

            let bytes: Vec<u8> = (0..next() % 64).map(|_| next() as u8).collect();
            let mut b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
            if next() % 2 == 0 {
                b64 = b64.trim_end_matches('=').to_string();
            }
            if !b64.is_empty() && next() % 2 == 0 {
                let at = (next() % b64.len() as u64) as usize;
                b64.insert(at, '\n');
            }
            let (_, back) = decode_data_uri(&format!("application/octet-stream;base64,{b64}"), 64)
                .unwrap_or_else(|e| panic!("round {round}: {b64:?}: {e}"));
            assert_eq!(back, bytes, "round {round}: base64 {b64:?}");
            let pct: String = bytes.iter().map(|b| format!("%{b:02X}")).collect();
            let (_, back) = decode_data_uri(&format!(",{pct}"), 64 * 3).unwrap();
            assert_eq!(back, bytes, "round {round}: percent-encoded");
        }
        // The bound holds exactly at the edge: 5 bytes unpadded need a limit of 5.
        assert!(decode_data_uri(";base64,aGVsbG8", 4).is_err());
        assert_eq!(decode_data_uri(";base64,aGVsbG8", 6).unwrap().1, b"hello");
    }

    #[test]
    fn only_http_and_data_schemes_pass() {
        let sig = runner_models::files::signature();
        for (url, ok) in [
            ("https://example.com/a.txt", true),
            ("http://127.0.0.1:9/a", true),
            ("data:,x", true),
            ("file:///etc/passwd", false),
            ("/etc/passwd", false),
            ("ftp://example.com/a", false),
            ("gopher://x", false),
        ] {
            let mut m = Map::new();
            m.insert("source".into(), json!(url));
            assert_eq!(check_file_inputs(&sig, &m).is_empty(), ok, "{url}");
        }
    }

    #[test]
    fn file_names_are_safe() {
        assert_eq!(sanitize_file_name("a%20b.txt"), "a_b.txt");
        assert_eq!(sanitize_file_name("..%2F..%2Fetc"), "_.._etc");
        assert_eq!(sanitize_file_name("..."), "");
    }
}
