//! Data-parallel training: one replica of the trainer per device, gradients averaged with
//! Burn's collective all-reduce (`burn-collective`) after accumulation and before clipping.
//!
//! Every replica holds the same model and optimizer state and applies the same averaged
//! gradients, so they stay identical without ever exchanging weights; a step of `R` replicas on
//! micro-batches `b_0 … b_{R-1}` equals a step of one replica accumulating the same micro-batches
//! (each micro-batch loss is a mean over its own tokens, as the reference's DeepSpeed runs).
//!
//! The collective is Burn's: peers register with the process's collective server of the inner
//! backend, and each gradient tensor goes through `all_reduce(.., Mean)`. That server is one per
//! backend type and process, so one replicated run at a time holds it ([`CollectiveLease`]).

use std::sync::{Mutex, MutexGuard};

use burn::collective::{self, AllReduceStrategy, CollectiveConfig, CollectiveError, PeerId, ReduceOperation};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend, BackendTypes, Device, DeviceId, DeviceOps};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use serde::{Deserialize, Serialize};

/// `training.devices`: a replica count on the backend's devices `0..n`, or the devices by name
/// (`"cuda:0"`, `"cuda:1"`; the part before `:` must name the backend the run uses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Devices {
    Count(usize),
    Named(Vec<String>),
}

impl Default for Devices {
    fn default() -> Self {
        Devices::Count(1)
    }
}

impl Devices {
    /// The single-device default (kept out of saved recipes, so older runs resume unchanged).
    pub fn is_single(&self) -> bool {
        *self == Devices::Count(1)
    }

    /// `(kind, index)` of each device: `Count(n)` is `n` devices of no named kind.
    pub fn parse(&self) -> Result<Vec<(Option<String>, usize)>, String> {
        match self {
            Devices::Count(0) => Err("training.devices: 0 devices; give a count ≥ 1 or a list of names".into()),
            Devices::Count(n) if *n > usize::from(u16::MAX) => {
                Err(format!("training.devices: {n} replicas is too many"))
            }
            Devices::Count(n) => Ok((0..*n).map(|i| (None, i)).collect()),
            Devices::Named(names) if names.is_empty() => {
                Err("training.devices: an empty list; give a count ≥ 1 or names like \"cuda:0\"".into())
            }
            Devices::Named(names) => names
                .iter()
                .map(|name| {
                    let (kind, index) = name.split_once(':').unwrap_or((name.as_str(), "0"));
                    let index = index
                        .parse::<u16>()
                        .map(usize::from)
                        .map_err(|_| format!("training.devices: `{name}` is not `kind:index` (e.g. \"cuda:1\")"))?;
                    if kind.is_empty() {
                        return Err(format!("training.devices: `{name}` names no backend"));
                    }
                    Ok((Some(kind.to_string()), index))
                })
                .collect(),
        }
    }

    /// The backend's devices: device `i` is the one of `first`'s type with index `i` (on
    /// backends with a single device, such as the CPU's, every replica shares it and runs in
    /// its own thread).
    pub fn resolve<B: Backend>(&self, first: &B::Device) -> Result<Vec<B::Device>, String> {
        let type_id = first.id().type_id;
        let parsed = self.parse()?;
        let mut seen = std::collections::BTreeSet::new();
        parsed
            .into_iter()
            .map(|(kind, index)| {
                if kind.is_some() && !seen.insert(index) {
                    return Err(format!("training.devices: device index {index} is listed twice"));
                }
                Ok(B::Device::from_id(DeviceId::new(type_id, index as u16)))
            })
            .collect()
    }
}

/// This replica's place among the run's replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replica {
    /// 0-based; replica 0 writes logs, metrics and checkpoints.
    pub rank: usize,
    pub count: usize,
}

impl Replica {
    pub fn peer(&self) -> PeerId {
        PeerId::from(self.rank as u32)
    }
}

/// Why a replicated step failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("replica {rank}: the collective all-reduce failed ({reason})")]
    Collective { rank: usize, reason: String },
}

fn collective_error(rank: usize) -> impl Fn(CollectiveError) -> ReplicaError {
    move |e| ReplicaError::Collective { rank, reason: format!("{e:?}") }
}

/// Registers replica `rank` of `count` with the collective server of `B` (the inner backend of
/// the autodiff one). Every replica must register before any of them all-reduces; this returns
/// once all have.
///
/// All replicas are in this process: `burn-collective`'s multi-node layer is not used, because
/// in 0.21 every global operation after the first waits for ever (see docs/DISTRIBUTED.md).
pub fn register<B: Backend>(replica: Replica, device: &B::Device) -> Result<(), ReplicaError> {
    let config = CollectiveConfig::default()
        .with_num_devices(replica.count)
        .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2));
    collective::register::<B>(replica.peer(), device.clone(), config).map_err(collective_error(replica.rank))
}

/// Forgets every registered replica and pending operation of `B`'s collective server: peers
/// waiting in an all-reduce get an error instead of waiting for a replica that died.
pub fn reset<B: Backend>() {
    collective::reset_collective::<B>();
}

static LEASE: Mutex<()> = Mutex::new(());

/// Held for the length of a replicated run: the collective server is one per process.
pub struct CollectiveLease(#[allow(dead_code)] MutexGuard<'static, ()>);

impl CollectiveLease {
    /// Waits for any other replicated run of this process to end.
    pub fn acquire() -> Self {
        CollectiveLease(LEASE.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

/// The most elements one all-reduce carries (256 MiB of f32): the gradients are packed into
/// buckets of this size, so that a step costs a few collective operations, not one per tensor.
pub const BUCKET_ELEMENTS: usize = 64 << 20;

/// Averages `grads` over the replicas, as if one replica had accumulated every replica's
/// micro-batches, and sums `stats` (the step's loss sum and token counts): a trainable parameter
/// some replica has no gradient for (say, the projector on a micro-batch without images) counts
/// as zero there, and one that no replica has a gradient for stays without one (the optimizer
/// leaves it alone, as on one device).
///
/// Everything travels packed, in the order the module visits its parameters (the same on every
/// replica): presence flags, `stats`, then the gradients flattened, in buckets of at most
/// [`BUCKET_ELEMENTS`], each summed by one all-reduce; the gradients are divided by the replica
/// count afterwards.
pub fn all_reduce_step<B: AutodiffBackend, M: Module<B>>(
    replica: Replica, module: &M, mut grads: GradientsParams, stats: &[f64],
) -> Result<(GradientsParams, Vec<f64>), ReplicaError> {
    let device = first_device(module);
    let trainable = trainable_params(module);
    let mut head: Vec<f32> = trainable.iter().map(|p| if grads_contains::<B>(&grads, p) { 1.0 } else { 0.0 }).collect();
    head.extend(stats.iter().map(|&v| v as f32));
    let mut pieces =
        vec![Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(head, [trainable.len() + stats.len()]), &device)];
    for param in &trainable {
        let flat = match take_grad::<B>(&mut grads, param) {
            Some(g) => flatten::<B>(param, g),
            None => Tensor::zeros([param.shape.iter().product::<usize>()], &device),
        };
        pieces.push(flat.cast(burn::tensor::DType::F32));
    }
    // Buckets: consecutive pieces up to BUCKET_ELEMENTS (a larger piece is a bucket of its own).
    let mut reduced: Vec<Tensor<B::InnerBackend, 1>> = Vec::with_capacity(pieces.len());
    let mut bucket: Vec<Tensor<B::InnerBackend, 1>> = Vec::new();
    let mut size = 0;
    let mut flush = |bucket: &mut Vec<Tensor<B::InnerBackend, 1>>| -> Result<(), ReplicaError> {
        if bucket.is_empty() {
            return Ok(());
        }
        let lengths: Vec<usize> = bucket.iter().map(|t| t.dims()[0]).collect();
        let packed = Tensor::cat(std::mem::take(bucket), 0);
        let summed = collective::all_reduce::<B::InnerBackend>(
            replica.peer(),
            packed.into_primitive().tensor(),
            ReduceOperation::Sum,
        )
        .map_err(collective_error(replica.rank))?;
        let summed = Tensor::<B::InnerBackend, 1>::from_primitive(TensorPrimitive::Float(summed));
        let mut start = 0;
        for n in lengths {
            reduced.push(summed.clone().slice(start..start + n));
            start += n;
        }
        Ok(())
    };
    for piece in pieces {
        let n = piece.dims()[0];
        if size + n > BUCKET_ELEMENTS {
            flush(&mut bucket)?;
            size = 0;
        }
        bucket.push(piece);
        size += n;
    }
    flush(&mut bucket)?;
    let mut reduced = reduced.into_iter();
    let head =
        reduced.next().expect("the head piece").into_data().convert::<f32>().into_vec::<f32>().unwrap_or_default();
    let (counts, sums) = head.split_at(trainable.len());
    let mut averaged = GradientsParams::new();
    for ((param, &count), summed) in trainable.iter().zip(counts).zip(reduced) {
        if count > 0.0 {
            let mean = (summed / replica.count as f64).cast(param.dtype);
            register_grad::<B>(&mut averaged, param, unflatten::<B>(param, mean));
        }
    }
    Ok((averaged, sums.iter().map(|&v| f64::from(v)).collect()))
}

/// A trainable parameter, seen from outside the module's type: its id, rank and shape.
struct Trainable {
    id: burn::module::ParamId,
    shape: Vec<usize>,
    dtype: burn::tensor::DType,
}

fn trainable_params<B: AutodiffBackend, M: Module<B>>(module: &M) -> Vec<Trainable> {
    struct Collect(Vec<Trainable>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            if value.is_require_grad() {
                self.0.push(Trainable { id: param.id, shape: value.dims().to_vec(), dtype: value.dtype() });
            }
        }
    }
    let mut collect = Collect(Vec::new());
    module.visit(&mut collect);
    collect.0
}

fn first_device<B: AutodiffBackend, M: Module<B>>(module: &M) -> <B::InnerBackend as BackendTypes>::Device {
    module.devices().into_iter().next().map(|d| d.inner().clone()).unwrap_or_default()
}

// GradientsParams is typed by rank; the parameters here come in every rank, so each helper
// dispatches on it (LLaVA's parameters have rank 1 to 4).
macro_rules! by_rank {
    ($rank:expr, $D:ident => $body:expr) => {
        match $rank {
            1 => {
                const $D: usize = 1;
                $body
            }
            2 => {
                const $D: usize = 2;
                $body
            }
            3 => {
                const $D: usize = 3;
                $body
            }
            _ => {
                const $D: usize = 4;
                $body
            }
        }
    };
}

fn grads_contains<B: AutodiffBackend>(grads: &GradientsParams, p: &Trainable) -> bool {
    by_rank!(p.shape.len(), D => grads.get::<B::InnerBackend, D>(p.id).is_some())
}

type Primitive<B> = <<B as AutodiffBackend>::InnerBackend as BackendTypes>::FloatTensorPrimitive;

fn take_grad<B: AutodiffBackend>(grads: &mut GradientsParams, p: &Trainable) -> Option<Primitive<B>> {
    by_rank!(p.shape.len(), D => grads.remove::<B::InnerBackend, D>(p.id).map(|g| g.into_primitive().tensor()))
}

/// A gradient as one row of numbers.
fn flatten<B: AutodiffBackend>(p: &Trainable, g: Primitive<B>) -> Tensor<B::InnerBackend, 1> {
    by_rank!(p.shape.len(), D => {
        Tensor::<B::InnerBackend, D>::from_primitive(TensorPrimitive::Float(g)).reshape([p.shape.iter().product::<usize>()])
    })
}

/// A row of numbers back in the parameter's shape.
fn unflatten<B: AutodiffBackend>(p: &Trainable, flat: Tensor<B::InnerBackend, 1>) -> Primitive<B> {
    by_rank!(p.shape.len(), D => {
        let mut shape = [1usize; D];
        shape.copy_from_slice(&p.shape[..D]);
        flat.reshape(shape).into_primitive().tensor()
    })
}

fn register_grad<B: AutodiffBackend>(grads: &mut GradientsParams, p: &Trainable, g: Primitive<B>) {
    by_rank!(p.shape.len(), D => {
        grads.register::<B::InnerBackend, D>(p.id, Tensor::from_primitive(TensorPrimitive::Float(g)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_counts_and_names() {
        assert_eq!(Devices::Count(2).parse().unwrap(), vec![(None, 0), (None, 1)]);
        let named = Devices::Named(vec!["cuda:0".into(), "cuda:3".into(), "cpu".into()]);
        assert_eq!(
            named.parse().unwrap(),
            vec![(Some("cuda".into()), 0), (Some("cuda".into()), 3), (Some("cpu".into()), 0)]
        );
        for bad in [Devices::Count(0), Devices::Named(vec![]), Devices::Named(vec!["cuda:x".into()])] {
            let e = bad.parse().unwrap_err();
            assert!(e.starts_with("training.devices"), "{e}");
        }
        let twice = Devices::Named(vec!["cuda:1".into(), "cuda:1".into()]);
        let e = twice.resolve::<llava::backend::Cpu>(&Default::default()).unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn devices_read_from_toml_as_count_or_list() {
        #[derive(Deserialize)]
        struct T {
            devices: Devices,
        }
        let t: T = toml::from_str("devices = 2").unwrap();
        assert_eq!(t.devices, Devices::Count(2));
        let t: T = toml::from_str(r#"devices = ["cuda:0", "cuda:1"]"#).unwrap();
        assert_eq!(t.devices, Devices::Named(vec!["cuda:0".into(), "cuda:1".into()]));
    }
}
