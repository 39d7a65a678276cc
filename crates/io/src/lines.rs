//! Append-only JSON-lines logs (answers, metrics): one line per record, each written whole with
//! one `write` and flushed. A kill or a full disk can leave only the last line torn (no newline);
//! [`recover`] drops that torn tail and keeps every complete line ([`complete_lines`] reads them
//! without touching the file, [`parse_json`] parses them), and [`truncate_to_lines`]
//! shortens a log in one system call, so no recovery ever empties a file.

use std::io::Write;
use std::path::Path;

/// A log's complete lines after recovery.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every newline-terminated line, without its newline.
    pub lines: Vec<String>,
    /// Bytes of a torn last line that were cut off (0 when the file ended cleanly).
    pub torn_bytes: u64,
}

/// Every complete line of `path` (absent: none), read without changing the file: a torn last
/// line is left out and its length reported. Lines that are not UTF-8 are lossily decoded.
pub fn complete_lines(path: &Path) -> std::io::Result<Recovered> {
    Ok(read_lines(path)?.0)
}

/// [`complete_lines`], also cutting a torn last line off the file itself so appends continue on
/// a line boundary.
pub fn recover(path: &Path) -> std::io::Result<Recovered> {
    let (recovered, complete_bytes) = read_lines(path)?;
    if recovered.torn_bytes > 0 {
        tracing::warn!(
            "{}: dropped a torn last line of {} bytes (an interrupted write); every complete line is kept",
            path.display(),
            recovered.torn_bytes
        );
        std::fs::OpenOptions::new().write(true).open(path)?.set_len(complete_bytes)?;
    }
    Ok(recovered)
}

/// The complete lines of `path` and the length of the part they fill.
fn read_lines(path: &Path) -> std::io::Result<(Recovered, u64)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Recovered::default(), 0)),
        Err(e) => return Err(e),
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let torn_bytes = (bytes.len() - complete) as u64;
    let mut lines: Vec<String> =
        bytes[..complete].split(|&b| b == b'\n').map(|l| String::from_utf8_lossy(l).into_owned()).collect();
    // `split` yields an empty piece after the final newline (the only piece of an empty file).
    lines.pop();
    Ok((Recovered { lines, torn_bytes }, complete as u64))
}

/// Each non-blank line parsed as JSON, with its 0-based index among `lines`, lazily: a line
/// that does not parse is `None` and is named in a warning ending with `consequence` (what the
/// caller does with it, e.g. "kept, and its question asked again").
pub fn parse_json<'a, T: serde::de::DeserializeOwned>(
    path: &'a Path, lines: &'a [String], consequence: &'a str,
) -> impl Iterator<Item = (usize, Option<T>)> + 'a {
    lines.iter().enumerate().filter(|(_, l)| !l.trim().is_empty()).map(move |(i, line)| {
        let parsed = serde_json::from_str(line)
            .map_err(|e| tracing::warn!("{} line {}: does not read ({e}); {consequence}", path.display(), i + 1))
            .ok();
        (i, parsed)
    })
}

/// Shortens `path` to its first `keep` lines (one `ftruncate`: a kill leaves the old length or
/// the new one). Lines past `keep` are the caller's to regenerate, as a resumed run does.
pub fn truncate_to_lines(path: &Path, keep: usize) -> std::io::Result<()> {
    let bytes = std::fs::read(path)?;
    // The end of line `keep`, or the whole file when it has fewer lines.
    let end = match keep.checked_sub(1) {
        None => 0,
        Some(last) => {
            bytes.iter().enumerate().filter(|(_, b)| **b == b'\n').nth(last).map_or(bytes.len(), |(i, _)| i + 1)
        }
    };
    if (end as u64) < bytes.len() as u64 {
        std::fs::OpenOptions::new().write(true).open(path)?.set_len(end as u64)?;
    }
    Ok(())
}

/// A log opened for appending whole lines.
pub struct LineLog {
    file: std::fs::File,
    /// The file's name, for the fault-injection point of each append.
    name: String,
}

impl LineLog {
    /// Opens (or creates) `path` for appending; call [`recover`] first on a resumed log.
    pub fn append(path: &Path) -> std::io::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        Ok(Self { file: std::fs::OpenOptions::new().create(true).append(true).open(path)?, name })
    }

    /// Appends `lines` (each without a newline) with one write, then flushes.
    pub fn write_lines<S: AsRef<str>>(&mut self, lines: &[S]) -> std::io::Result<()> {
        let mut buf = String::new();
        for line in lines {
            debug_assert!(!line.as_ref().contains('\n'));
            buf += line.as_ref();
            buf.push('\n');
        }
        if let Some(point) = crate::fault::armed(&["append", &self.name]) {
            // What a kill in the middle of the write leaves: a torn last line.
            self.file.write_all(&buf.as_bytes()[..buf.len() / 2])?;
            crate::fault::kill(&point);
        }
        self.file.write_all(buf.as_bytes())?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_keeps_every_complete_line_and_drops_only_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        assert!(recover(&path).unwrap().lines.is_empty());
        std::fs::write(&path, "{\"step\":0}\nnot json but complete\n{\"step\":2}\n{\"ste").unwrap();
        // Read-only: the torn tail is left out but stays in the file.
        let read = complete_lines(&path).unwrap();
        assert_eq!((read.lines.len(), read.torn_bytes), (3, 5));
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("{\"ste"));
        let parsed: Vec<(usize, Option<serde_json::Value>)> = parse_json(&path, &read.lines, "kept").collect();
        assert_eq!(
            parsed.iter().map(|(i, v)| (*i, v.is_some())).collect::<Vec<_>>(),
            [(0, true), (1, false), (2, true)]
        );
        let r = recover(&path).unwrap();
        assert_eq!(r.lines, ["{\"step\":0}", "not json but complete", "{\"step\":2}"]);
        assert_eq!(r.torn_bytes, 5);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"step\":0}\nnot json but complete\n{\"step\":2}\n");
        let mut log = LineLog::append(&path).unwrap();
        log.write_lines(&["{\"step\":3}"]).unwrap();
        assert_eq!(recover(&path).unwrap().lines.len(), 4);
        truncate_to_lines(&path, 2).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"step\":0}\nnot json but complete\n");
        truncate_to_lines(&path, 5).unwrap();
        assert_eq!(recover(&path).unwrap().lines.len(), 2);
        truncate_to_lines(&path, 0).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }
}
