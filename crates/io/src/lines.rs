//! Append-only JSON-lines logs (answers, metrics): one line per record, each written whole with
//! one `write` and flushed. A kill or a full disk can leave only the last line torn (no newline);
//! [`recover`] drops that torn tail and keeps every complete line, and [`truncate_to_lines`]
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

/// Reads `path` (absent: no lines), cutting a torn last line off the file itself so appends
/// continue on a line boundary. Lines that are not UTF-8 are kept, lossily decoded.
pub fn recover(path: &Path) -> std::io::Result<Recovered> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Recovered::default()),
        Err(e) => return Err(e),
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let torn_bytes = (bytes.len() - complete) as u64;
    if torn_bytes > 0 {
        tracing::warn!(
            "{}: dropped a torn last line of {torn_bytes} bytes (an interrupted write); every complete line is kept",
            path.display()
        );
        std::fs::OpenOptions::new().write(true).open(path)?.set_len(complete as u64)?;
    }
    let lines =
        bytes[..complete].split(|&b| b == b'\n').map(|l| String::from_utf8_lossy(l).into_owned()).collect::<Vec<_>>();
    // `split` yields an empty piece after the final newline.
    let lines = if lines.last().is_some_and(|l| l.is_empty()) { lines[..lines.len() - 1].to_vec() } else { lines };
    Ok(Recovered { lines, torn_bytes })
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
        let point = format!("append:{}", self.name);
        if crate::fault::armed(&point) {
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
