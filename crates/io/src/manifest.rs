//! A folder's list of files with their sizes and SHA-256, written last, checked on reading.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::write_atomically;

/// The manifest's name inside the folder it describes.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Every file of a folder (relative paths with `/`), its size and SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub files: BTreeMap<String, FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

/// Why a folder does not verify, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{0}: no {MANIFEST_FILE} (written last, so the folder was never completed)")]
    Missing(PathBuf),
    #[error("{path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{0}: listed in the manifest but missing")]
    FileMissing(PathBuf),
    #[error("{path}: {found} bytes, the manifest says {expected} (truncated?)")]
    Size { path: PathBuf, expected: u64, found: u64 },
    #[error("{0}: SHA-256 differs from the manifest's (the file changed or was corrupted)")]
    Checksum(PathBuf),
}

impl Manifest {
    /// Hashes every file under `dir` and writes `dir/manifest.json` (atomically, after them all).
    pub fn write(dir: &Path) -> std::io::Result<Manifest> {
        let mut files = BTreeMap::new();
        for (name, path) in list_files(dir)? {
            let (bytes, sha256) = hash_file(&path)?;
            files.insert(name, FileEntry { bytes, sha256 });
        }
        let manifest = Manifest { format: 1, files };
        let json = serde_json::to_string_pretty(&manifest).map_err(std::io::Error::other)?;
        write_atomically(&dir.join(MANIFEST_FILE), |w| w.write_all(json.as_bytes()))?;
        Ok(manifest)
    }

    /// Reads `dir/manifest.json` and checks every file it lists: present, its size, its SHA-256.
    pub fn verify(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ManifestError::Missing(dir.into())),
            Err(e) => return Err(ManifestError::Unreadable { path, reason: e.to_string() }),
        };
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| ManifestError::Unreadable { path: path.clone(), reason: e.to_string() })?;
        for (name, entry) in &manifest.files {
            let file = dir.join(name);
            let found = match std::fs::metadata(&file) {
                Ok(m) => m.len(),
                Err(_) => return Err(ManifestError::FileMissing(file)),
            };
            if found != entry.bytes {
                return Err(ManifestError::Size { path: file, expected: entry.bytes, found });
            }
            let (_, sha256) = hash_file(&file)
                .map_err(|e| ManifestError::Unreadable { path: file.clone(), reason: e.to_string() })?;
            if sha256 != entry.sha256 {
                return Err(ManifestError::Checksum(file));
            }
        }
        Ok(manifest)
    }
}

/// Files under `dir` (recursively), as (`a/b` relative name, path), sorted; the manifest itself
/// and hidden temporary files are left out.
fn list_files(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut pending = vec![(String::new(), dir.to_path_buf())];
    while let Some((prefix, folder)) = pending.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            let relative = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
            if entry.file_type()?.is_dir() {
                pending.push((relative, entry.path()));
            } else if relative != MANIFEST_FILE && !name.starts_with('.') {
                out.push((relative, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    let hex = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((bytes, hex))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_flipped_or_deleted_file_fails_verification_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("llm")).unwrap();
        std::fs::write(dir.path().join("state.json"), b"{\"step\": 3}").unwrap();
        std::fs::write(dir.path().join("llm/weights.bin"), vec![7u8; 5000]).unwrap();
        let manifest = Manifest::write(dir.path()).unwrap();
        assert_eq!(manifest.files.keys().collect::<Vec<_>>(), ["llm/weights.bin", "state.json"]);

        assert_eq!(manifest.files["llm/weights.bin"].bytes, 5000);
        Manifest::verify(dir.path()).unwrap();

        let weights = dir.path().join("llm/weights.bin");
        let mut flipped = vec![7u8; 5000];
        flipped[1234] ^= 0x10;
        std::fs::write(&weights, &flipped).unwrap();
        assert!(matches!(Manifest::verify(dir.path()), Err(ManifestError::Checksum(p)) if p == weights));
        std::fs::write(&weights, vec![7u8; 4000]).unwrap();
        let e = Manifest::verify(dir.path()).unwrap_err();
        assert!(matches!(e, ManifestError::Size { expected: 5000, found: 4000, .. }), "{e}");
        std::fs::remove_file(&weights).unwrap();
        assert!(matches!(Manifest::verify(dir.path()), Err(ManifestError::FileMissing(p)) if p == weights));
        std::fs::remove_file(dir.path().join(MANIFEST_FILE)).unwrap();
        assert!(matches!(Manifest::verify(dir.path()), Err(ManifestError::Missing(_))));
    }
}
