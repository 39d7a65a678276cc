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

/// A backend that is compiled in but cannot start on this machine (no GPU driver).
#[derive(Debug, thiserror::Error)]
#[error("--backend {kind}: the backend cannot start on this machine: {reason}. {hint}")]
pub struct BackendUnavailable {
    pub kind: BackendKind,
    pub reason: String,
    pub hint: &'static str,
}

impl BackendKind {
    /// Starts the backend's default device once (one tiny tensor round trip), so that a machine
    /// without the driver it needs gets an error saying so instead of a panic deep inside the
    /// GPU runtime. The CPU backend always starts.
    pub fn check_available(self) -> Result<(), BackendUnavailable> {
        let hint = match self {
            BackendKind::Cpu => return Ok(()),
            BackendKind::Wgpu => {
                "wgpu needs a Vulkan, Metal or DirectX 12 driver; on a machine without a GPU install Mesa's lavapipe (`apt-get install mesa-vulkan-drivers libvulkan1`), or use --backend cpu"
            }
            BackendKind::Cuda => "CUDA needs an NVIDIA GPU with its driver (libcuda) installed; or use --backend cpu",
        };
        let started = match self {
            BackendKind::Cpu => Ok(()),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => start::<Wgpu>(),
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => start::<Cuda>(),
            #[allow(unreachable_patterns)]
            _ => Err("not compiled into this build".to_string()),
        };
        started.map_err(|reason| BackendUnavailable { kind: self, reason, hint })
    }
}

/// One tensor to the default device and back. A panic of the runtime (cubecl starts a device
/// on a thread of its own, whose panic the caller only sees as a closed channel) is caught, kept
/// off the terminal, and its first message returned.
#[allow(dead_code)]
fn start<B: burn::tensor::backend::Backend>() -> Result<(), String> {
    use std::sync::{Arc, Mutex};
    let first: Arc<Mutex<Option<String>>> = Arc::default();
    let seen = first.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.is_none() {
            let text = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the runtime failed to start".into());
            *seen = Some(text);
        }
    }));
    let result = std::panic::catch_unwind(|| {
        let device = B::Device::default();
        burn::tensor::Tensor::<B, 1>::zeros([1], &device).into_data();
    });
    std::panic::set_hook(previous);
    result.map_err(|_| {
        let text = first.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
        // The runtime's message can run over many lines; its first says what failed.
        text.lines().next().unwrap_or("the runtime failed to start").trim().to_string()
    })
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

/// Calls a generic function `$f::<B>(&device, args…)` with the backend `$kind` selects. A GPU
/// backend is started first ([`BackendKind::check_available`]); when it cannot start, the
/// enclosing function returns that error (so it must return a `Result` whose error converts
/// from [`BackendUnavailable`]).
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
            $crate::backend::BackendKind::Wgpu => match $crate::backend::BackendKind::Wgpu.check_available() {
                Ok(()) => $f::<$crate::backend::Wgpu>(&Default::default(), $($arg),*),
                Err(e) => return Err(e.into()),
            },
            #[cfg(feature = "cuda")]
            $crate::backend::BackendKind::Cuda => match $crate::backend::BackendKind::Cuda.check_available() {
                Ok(()) => $f::<$crate::backend::Cuda>(&Default::default(), $($arg),*),
                Err(e) => return Err(e.into()),
            },
            #[allow(unreachable_patterns)]
            other => panic!("backend {other} is not compiled into this build"),
        }
    };
}
