//! The backends a run can choose at run time (`--backend cpu|wgpu|cuda`).
//!
//! The CPU backend is Burn's Flex (pure Rust, multi-threaded gemm); docs/backends.md records why
//! it is the default. wgpu is compiled in by default (feature `wgpu`); CUDA only with the `cuda`
//! feature, so the default build needs no CUDA toolkit.

use std::fmt;
use std::str::FromStr;

/// The CPU backend (feature `flex`, on by default; `with_backend!` needs it).
#[cfg(feature = "flex")]
pub type Cpu = burn::backend::Flex;
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu;
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    #[default]
    Cpu,
    Wgpu,
    Cuda,
}

impl BackendKind {
    /// Whether this build includes the backend.
    pub fn compiled(self) -> bool {
        match self {
            BackendKind::Cpu => cfg!(feature = "flex"),
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The fastest backend this build has: CUDA, then the CPU. (wgpu is not preferred over the
    /// CPU automatically: on a machine without a GPU it runs on a software rasteriser.)
    pub fn fastest() -> Self {
        if cfg!(feature = "cuda") { BackendKind::Cuda } else { BackendKind::Cpu }
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let kind = match s {
            "cpu" | "flex" => BackendKind::Cpu,
            "wgpu" => BackendKind::Wgpu,
            "cuda" => BackendKind::Cuda,
            other => return Err(format!("unknown backend `{other}` (cpu, wgpu, cuda)")),
        };
        if !kind.compiled() {
            return Err(format!("backend `{s}` is not compiled into this build (enable the cargo feature `{s}`)"));
        }
        Ok(kind)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        })
    }
}

/// Calls a generic function `$f::<B>(&device, args…)` with the backend `$kind` selects.
///
/// ```ignore
/// llava::with_backend!(kind, run_forward(&args))
/// ```
#[macro_export]
macro_rules! with_backend {
    ($kind:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $kind {
            $crate::backend::BackendKind::Cpu => $f::<$crate::backend::Cpu>(&Default::default(), $($arg),*),
            #[cfg(feature = "wgpu")]
            $crate::backend::BackendKind::Wgpu => $f::<$crate::backend::Wgpu>(&Default::default(), $($arg),*),
            #[cfg(feature = "cuda")]
            $crate::backend::BackendKind::Cuda => $f::<$crate::backend::Cuda>(&Default::default(), $($arg),*),
            #[allow(unreachable_patterns)]
            other => panic!("backend {other} is not compiled into this build"),
        }
    };
}
