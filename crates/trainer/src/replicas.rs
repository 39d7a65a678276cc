//! Data-parallel training: one replica of the trainer per device, gradients averaged with
//! Burn's collective all-reduce (`burn-collective`) after accumulation and before clipping.
//!
//! Every replica holds the same model and optimizer state and applies the same averaged
//! gradients, so they stay identical without ever exchanging weights; a step of `R` replicas on
//! micro-batches `b_0 … b_{R-1}` equals a step of one replica accumulating the same micro-batches
//! (each micro-batch loss is a mean over its own tokens, as the reference's DeepSpeed runs).
//!
//! The collective is Burn's: peers register with the process's collective server of the inner
//! backend, and each step's gradients go through `all_reduce(.., Sum)` packed in a few buckets
//! ([`all_reduce_step`]). That server is one per backend type and process, so one replicated run
//! at a time holds it ([`CollectiveLease`]).

use std::sync::{Mutex, MutexGuard};

use burn::collective::{self, AllReduceStrategy, CollectiveConfig, CollectiveError, PeerId, ReduceOperation};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::DType;
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
    replica: Replica, module: &M, grads: GradientsParams, stats: &[f64],
) -> Result<(GradientsParams, Vec<f64>), ReplicaError> {
    let device = module.devices().into_iter().next().map(|d| d.inner().clone()).unwrap_or_default();
    let mut pack = Pack::<B> { grads, flags: Vec::new(), pieces: Vec::new(), device: device.clone() };
    module.visit(&mut pack);
    let Pack { mut flags, pieces, .. } = pack;
    let trainable = flags.len();
    flags.extend(stats.iter().map(|&v| v as f32));
    let head = Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(flags, [trainable + stats.len()]), &device);
    let mut reduced = Vec::with_capacity(pieces.len() + 1);
    // Buckets: consecutive pieces up to BUCKET_ELEMENTS (a larger piece is a bucket of its own).
    let mut bucket = Vec::new();
    let mut size = 0;
    for piece in std::iter::once(head).chain(pieces) {
        let n = piece.dims()[0];
        if size + n > BUCKET_ELEMENTS && !bucket.is_empty() {
            all_reduce_bucket::<B::InnerBackend>(replica, std::mem::take(&mut bucket), &mut reduced)?;
            size = 0;
        }
        bucket.push(piece);
        size += n;
    }
    all_reduce_bucket::<B::InnerBackend>(replica, bucket, &mut reduced)?;
    let mut reduced = reduced.into_iter();
    let head = reduced.next().map(|t| t.into_data().convert::<f32>().into_vec::<f32>().unwrap_or_default());
    let head = head.unwrap_or_default();
    let (counts, sums) = head.split_at(trainable.min(head.len()));
    let mut unpack = Unpack::<B> {
        counts: counts.iter(),
        summed: reduced,
        replicas: replica.count as f64,
        averaged: GradientsParams::new(),
    };
    module.visit(&mut unpack);
    Ok((unpack.averaged, sums.iter().map(|&v| f64::from(v)).collect()))
}

/// Sums one bucket of pieces over the replicas and appends the pieces, summed, to `reduced`.
fn all_reduce_bucket<B: Backend>(
    replica: Replica, bucket: Vec<Tensor<B, 1>>, reduced: &mut Vec<Tensor<B, 1>>,
) -> Result<(), ReplicaError> {
    let lengths: Vec<usize> = bucket.iter().map(|t| t.dims()[0]).collect();
    let packed = Tensor::cat(bucket, 0);
    let summed = collective::all_reduce::<B>(replica.peer(), packed.into_primitive().tensor(), ReduceOperation::Sum)
        .map_err(collective_error(replica.rank))?;
    let summed = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(summed));
    let mut start = 0;
    for n in lengths {
        reduced.push(summed.clone().slice(start..start + n));
        start += n;
    }
    Ok(())
}

/// Visits the trainable parameters in order: each one's gradient flattened to f32 (zeros where
/// there is none) and a presence flag.
struct Pack<B: AutodiffBackend> {
    grads: GradientsParams,
    flags: Vec<f32>,
    pieces: Vec<Tensor<B::InnerBackend, 1>>,
    device: <B::InnerBackend as BackendTypes>::Device,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Pack<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            return;
        }
        let n = value.shape().num_elements();
        let (flag, flat) = match self.grads.remove::<B::InnerBackend, D>(param.id) {
            Some(g) => (1.0, g.reshape([n]).cast(DType::F32)),
            None => (0.0, Tensor::zeros([n], &self.device)),
        };
        self.flags.push(flag);
        self.pieces.push(flat);
    }
}

/// Visits the trainable parameters in the same order: the summed gradient divided by the
/// replica count, in the parameter's shape and dtype, where some replica had one.
struct Unpack<'a, B: AutodiffBackend> {
    counts: std::slice::Iter<'a, f32>,
    summed: std::vec::IntoIter<Tensor<B::InnerBackend, 1>>,
    replicas: f64,
    averaged: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Unpack<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            return;
        }
        let (Some(&count), Some(summed)) = (self.counts.next(), self.summed.next()) else { return };
        if count > 0.0 {
            let mean = (summed / self.replicas).cast(value.dtype()).reshape(value.dims());
            self.averaged.register::<B::InnerBackend, D>(param.id, mean);
        }
    }
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
