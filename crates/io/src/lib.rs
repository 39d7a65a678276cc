//! Files that survive a kill, a full disk or a flipped bit: what every output of the project is
//! written with.
//!
//! - [`write_atomically`]: one file, written to a temporary file beside it and renamed over it, so
//!   the final name holds the old content or the new, never a torn mix.
//! - [`AtomicDir`]: a multi-file output (a checkpoint, a model folder) written in a temporary
//!   folder, given a [`Manifest`] of every file's size and SHA-256 (written last), then renamed
//!   into place: the folder is complete or absent.
//! - [`lines`]: append-only JSON-lines logs (answers, metrics) whose recovery keeps every complete
//!   line and drops only a torn tail.
//! - [`join_inside`]: a path read from a data file, resolved inside its root folder.
//! - [`activity`]: what the process is doing, for the out-of-memory message.
//! - [`fault`]: named kill points inside every write, for the tests that kill a run during each one.
//! - [`mutations`] and [`CountingAllocator`]: mutated inputs and the peak heap of a piece of code, for tests that bound allocations.
//!
//! ```
//! use llava_io::{AtomicDir, Manifest};
//! let root = tempfile::tempdir()?;
//! let out = root.path().join("model");
//! let dir = AtomicDir::create(&out)?;
//! std::fs::write(dir.path().join("config.json"), b"{}")?;
//! dir.commit()?;
//! Manifest::verify(&out)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod activity;
mod atomic;
mod counting;
mod dir;
pub mod fault;
pub mod lines;
mod manifest;
pub mod mutations;
mod paths;

pub use atomic::write_atomically;
pub use counting::CountingAllocator;
pub use dir::AtomicDir;
pub use manifest::{MANIFEST_FILE, Manifest, ManifestError};
pub use paths::{PathError, join_inside};
