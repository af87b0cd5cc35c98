//! A Cog-style model directory: `cog.yaml` plus the files its `weights:` list names.
//!
//! Weight sources are local files or folders relative to the model directory (bare paths
//! or `file://`); runner never downloads weights. No source may resolve outside the model
//! directory, symlinks included.

use std::path::{Path, PathBuf};

use crate::config::{CogConfig, ConfigError};

#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    #[error("{}: not a model directory: {reason}", path.display())]
    NotADirectory { path: PathBuf, reason: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The files found through `weights:`, by role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightsLayout {
    /// Every file the weight sources provide (after include/exclude), sorted.
    pub files: Vec<PathBuf>,
    /// `model.safetensors.index.json`, when the weights are sharded.
    pub safetensors_index: Option<PathBuf>,
    /// The `.safetensors` files, sorted.
    pub safetensors: Vec<PathBuf>,
    /// The `.gguf` files, sorted.
    pub gguf: Vec<PathBuf>,
}

impl WeightsLayout {
    /// The weight file with this exact file name (e.g. `config.json`), the shallowest when
    /// several share it (a sentence-transformers folder also holds `1_Pooling/config.json`).
    pub fn file_named(&self, name: &str) -> Option<&Path> {
        self.files
            .iter()
            .filter(|p| p.file_name().is_some_and(|n| n == name))
            .min_by_key(|p| p.components().count())
            .map(PathBuf::as_path)
    }
}

/// An opened model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub root: PathBuf,
    pub config: CogConfig,
    pub weights: WeightsLayout,
}

impl ModelDir {
    pub fn open(path: &Path) -> Result<Self, ModelDirError> {
        let root = path
            .canonicalize()
            .map_err(|e| ModelDirError::NotADirectory {
                path: path.to_path_buf(),
                reason: format!("{e}"),
            })?;
        if !root.is_dir() {
            return Err(ModelDirError::NotADirectory {
                path: path.to_path_buf(),
                reason: "it is a file; pass the folder that holds cog.yaml".into(),
            });
        }
        let cog_yaml = root.join("cog.yaml");
        if !cog_yaml.exists() {
            return Err(ModelDirError::NotADirectory {
                path: path.to_path_buf(),
                reason:
                    "no cog.yaml in it; create one with at least `run: \"candle:<architecture>\"`"
                        .into(),
            });
        }
        let config = CogConfig::load(&cog_yaml)?;
        let weights = resolve_weights(&root, &config)?;
        Ok(ModelDir {
            root,
            config,
            weights,
        })
    }

    /// A short name for messages: the directory's name.
    pub fn name(&self) -> String {
        self.root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    }
}

fn resolve_weights(root: &Path, config: &CogConfig) -> Result<WeightsLayout, ConfigError> {
    let mut files = Vec::new();
    for (i, entry) in config.weights.iter().enumerate() {
        for (j, source) in entry.sources.iter().enumerate() {
            let key = if entry.sources.len() == 1 {
                format!("weights[{i}].source.uri")
            } else {
                format!("weights[{i}].source[{j}].uri")
            };
            let err = |message: String| ConfigError {
                file: config.path.clone(),
                line: Some(source.line).filter(|&l| l > 0),
                key: key.clone(),
                message,
            };
            let uri = source.uri.as_str();
            let relative = match uri.split_once("://") {
                None => uri,
                Some(("file", rest)) => rest,
                Some((scheme, _)) => {
                    return Err(err(format!(
                        "`{key}: {uri}`: runner reads weights only from the model directory, not from {scheme}:// sources; download them into the directory and point `uri` at that path (e.g. ./weights)"
                    )))
                }
            };
            let candidate = root.join(relative);
            let resolved = candidate.canonicalize().map_err(|e| {
                err(format!(
                    "`{key}: {uri}`: {} ({e}); put the weights there or fix the path",
                    candidate.display()
                ))
            })?;
            if !resolved.starts_with(root) {
                return Err(err(format!(
                    "`{key}: {uri}` resolves to {}, outside the model directory {}; weight paths must stay inside it",
                    resolved.display(),
                    root.display()
                )));
            }
            let mut found = Vec::new();
            collect_files(&resolved, &mut found).map_err(|e| {
                err(format!(
                    "`{key}: {uri}`: cannot list {}: {e}",
                    resolved.display()
                ))
            })?;
            for file in found {
                // Symlinks inside a source must not lead outside the directory either.
                let real = file
                    .canonicalize()
                    .map_err(|e| err(format!("{}: {e}", file.display())))?;
                if !real.starts_with(root) {
                    return Err(err(format!(
                        "{} links to {}, outside the model directory; copy the file in instead",
                        file.display(),
                        real.display()
                    )));
                }
                let rel = file
                    .strip_prefix(&resolved)
                    .unwrap_or(&file)
                    .to_string_lossy()
                    .replace('\\', "/");
                let rel = if rel.is_empty() {
                    file.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned()
                } else {
                    rel
                };
                let included =
                    source.include.is_empty() || source.include.iter().any(|p| glob_match(p, &rel));
                let excluded = source.exclude.iter().any(|p| glob_match(p, &rel));
                if included && !excluded {
                    files.push(file);
                }
            }
        }
    }
    files.sort();
    files.dedup();
    let safetensors_index = files
        .iter()
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(".safetensors.index.json"))
        })
        .cloned();
    let with_extension = |ext: &str| -> Vec<PathBuf> {
        files
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .cloned()
            .collect()
    };
    let safetensors = with_extension("safetensors");
    let gguf = with_extension("gguf");
    Ok(WeightsLayout {
        files,
        safetensors_index,
        safetensors,
        gguf,
    })
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with('.') {
            continue; // .cache, .git and editor files are never weights
        }
        if p.is_dir() {
            collect_files(&p, out)?;
        } else if p.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

/// Glob matching for include/exclude: `*` within a path segment, `**` across segments,
/// `?` one character. A pattern without `/` matches the file name at any depth, as Cog's.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    fn matches(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (None, Some(_)) => false,
            (Some(b'*'), _) if p.get(1) == Some(&b'*') => {
                let rest = p[2..].strip_prefix(b"/").unwrap_or(&p[2..]);
                (0..=s.len()).any(|i| matches(rest, &s[i..]))
            }
            (Some(b'*'), _) => (0..=s.len())
                .take_while(|&i| i == 0 || s[i - 1] != b'/')
                .any(|i| matches(&p[1..], &s[i..])),
            (Some(b'?'), Some(c)) if *c != b'/' => matches(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => matches(&p[1..], &s[1..]),
            _ => false,
        }
    }
    if pattern.contains('/') {
        matches(pattern.trim_start_matches("./").as_bytes(), path.as_bytes())
    } else {
        let name = path.rsplit('/').next().unwrap_or(path);
        matches(pattern.as_bytes(), name.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }

    const YAML: &str = "model: local/m\nrun: candle:bert\nweights:\n  - name: w\n    target: /src/weights\n    source:\n      uri: URI\n";

    #[test]
    fn globs() {
        assert!(glob_match("*.safetensors", "a/b/model.safetensors"));
        assert!(glob_match("**/*.json", "a/b/c.json"));
        assert!(glob_match("sub/*.json", "sub/c.json"));
        assert!(!glob_match("sub/*.json", "sub/x/c.json"));
        assert!(glob_match("model-?.bin", "model-1.bin"));
    }

    #[test]
    fn finds_weights_by_role() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "cog.yaml", &YAML.replace("URI", "./weights"));
        write(d.path(), "weights/model.safetensors", "x");
        write(d.path(), "weights/config.json", "{}");
        write(d.path(), "weights/.cache/junk", "x");
        let m = ModelDir::open(d.path()).unwrap();
        assert_eq!(m.weights.files.len(), 2);
        assert_eq!(m.weights.safetensors.len(), 1);
        assert!(m.weights.file_named("config.json").is_some());
    }

    #[test]
    fn paths_may_not_escape() {
        let outer = tempfile::tempdir().unwrap();
        let d = outer.path().join("model");
        std::fs::create_dir(&d).unwrap();
        write(outer.path(), "secret/model.safetensors", "x");
        write(&d, "cog.yaml", &YAML.replace("URI", "../secret"));
        let e = ModelDir::open(&d).unwrap_err().to_string();
        assert!(
            e.contains("outside the model directory") && e.contains("weights[0].source.uri"),
            "{e}"
        );

        write(&d, "cog.yaml", &YAML.replace("URI", "./missing"));
        let e = ModelDir::open(&d).unwrap_err().to_string();
        assert!(e.contains("cog.yaml:7") && e.contains("missing"), "{e}");

        write(&d, "cog.yaml", &YAML.replace("URI", "hf://org/repo"));
        let e = ModelDir::open(&d).unwrap_err().to_string();
        assert!(e.contains("hf://"), "{e}");

        #[cfg(unix)]
        {
            std::fs::create_dir_all(d.join("w")).unwrap();
            std::os::unix::fs::symlink(
                outer.path().join("secret/model.safetensors"),
                d.join("w/model.safetensors"),
            )
            .unwrap();
            write(&d, "cog.yaml", &YAML.replace("URI", "./w"));
            let e = ModelDir::open(&d).unwrap_err().to_string();
            assert!(e.contains("outside the model directory"), "{e}");
        }
    }

    #[test]
    fn missing_cog_yaml() {
        let d = tempfile::tempdir().unwrap();
        let e = ModelDir::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("no cog.yaml"), "{e}");
    }
}
