//! Decode-time speed of the quantized products against the half-precision one, at LLaMA shapes:
//! `cargo run --example quant_speed -p llava-kernels` (prints GB/s of weights read and G
//! weights/s per format, batch-1 rows, the fastest of 30 runs, and the machine's read bandwidth
//! for scale; `RAYON_NUM_THREADS=1` for one core's compute rate).

use std::time::Instant;

use burn::backend::Flex;
use burn::nn::LinearConfig;
use burn::tensor::{DType, Distribution, Tensor};
use llava_kernels::{QuantFormat, QuantLinear, QuantMatrix};

fn main() {
    let device = Default::default();
    println!("memory read bandwidth: {:.1} GB/s", llava_kernels::probe::memory_read_bandwidth_gbs());
    for (k, n) in [(2048, 5632), (4096, 11008)] {
        let x = Tensor::<Flex, 2>::random([1, k], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<Flex, 2>::random([n, k], Distribution::Normal(0.0, 0.02), &device);
        let values = w.to_data().to_vec::<f32>().unwrap();
        // The fastest of 30 runs: this machine's neighbours only ever add time.
        let time = |f: &dyn Fn()| {
            f();
            (0..30)
                .map(|_| {
                    let start = Instant::now();
                    f();
                    start.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        // f16 weight in the loader's layout (transposed view of [out, in]).
        let mut linear = LinearConfig::new(k, n).with_bias(false).init::<Flex>(&device);
        linear.weight = burn::module::Param::from_tensor(w.clone().cast(DType::F16).transpose());
        let x3 = x.clone().unsqueeze::<3>();
        let s = time(&|| {
            let _ = llava_kernels::linear_tokens(&linear, x3.clone()).into_data();
        });
        let bytes = (k * n * 2) as f64;
        println!(
            "[{k} → {n}] f16: {:.3} ms, {:.1} GB/s, {:.2} G weights/s",
            s * 1e3,
            bytes / s / 1e9,
            (k * n) as f64 / s / 1e9
        );
        for format in QuantFormat::ALL {
            // Quantizing the loader's f16 layer (what `--quantize` does at load), and its parts.
            let start = Instant::now();
            let data = linear.weight.val().transpose().into_data();
            let read = start.elapsed().as_secs_f64();
            let _ = QuantLinear::quantize(&linear, format).unwrap();
            let whole = start.elapsed().as_secs_f64() - read;
            drop(data);
            println!(
                "[{k} → {n}] {format}: quantizing the f16 layer {:.1} ms (reading its values out {:.1} ms)",
                whole * 1e3,
                read * 1e3
            );
            let q = QuantMatrix::quantize(format, n, k, &values).unwrap();
            let layer = QuantLinear::<Flex>::new(&q, None, &device);
            let s = time(&|| {
                let _ = layer.forward_rows(x.clone()).into_data();
            });
            let bytes = q.bytes() as f64;
            println!(
                "[{k} → {n}] {format}: {:.3} ms, {:.1} GB/s, {:.2} G weights/s",
                s * 1e3,
                bytes / s / 1e9,
                (k * n) as f64 / s / 1e9
            );
        }
    }
}
