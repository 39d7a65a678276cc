//! Hostile checkpoints: mutated safetensors files, shard indexes and PyTorch zips, plus the
//! crafted attacks (a pickle memo bomb, a zip bomb, an unknown global, negative or overlapping
//! header entries). Each must be an error naming the file, never a panic, and no input may make
//! the reader allocate more than a small multiple of the file's own size.

use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use llava_checkpoint::WeightStore;
use llava_io::CountingAllocator;
use llava_io::mutations::mutations;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity")
}

/// Opens `path` and reads every tensor; returns the error text (if any) and the peak heap.
fn read_all(path: &Path) -> (Result<(), String>, usize) {
    let (outcome, peak) = CountingAllocator::peak_during(|| {
        catch_unwind(AssertUnwindSafe(|| {
            let store = WeightStore::open(path).map_err(|e| e.to_string())?;
            let names: Vec<String> = store.names().map(String::from).collect();
            for name in names {
                let shape = store.info(&name).unwrap().shape.clone();
                if let Err(e) = store.read(&name, &shape, None) {
                    // Integer buffers have no float reading; everything else must read.
                    if !e.to_string().contains("unsupported dtype") {
                        return Err(e.to_string());
                    }
                }
            }
            Ok(())
        }))
    });
    match outcome {
        Ok(result) => (result, peak),
        Err(_) => panic!("{}: the reader panicked", path.display()),
    }
}

/// Every mutation of `seed` (written as `name` in a fresh folder) is read without a panic and
/// within `bytes × 64 + 4 MiB` of heap; returns (inputs, errors).
fn survive_mutations(seed: &[u8], name: &str, count: usize, rng: u64) -> (usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    let mut errors = 0;
    for (i, input) in mutations(seed, count, rng).into_iter().enumerate() {
        std::fs::write(&path, &input).unwrap();
        let (result, peak) = read_all(&path);
        let bound = input.len() * 64 + (4 << 20);
        assert!(peak <= bound, "mutation {i} of {name}: {peak} bytes allocated for a {}-byte file", input.len());
        if let Err(e) = result {
            assert!(e.contains(&path.display().to_string()), "mutation {i}: the error names no file: {e}");
            errors += 1;
        }
    }
    (count, errors)
}

#[test]
fn mutated_safetensors_files_are_errors_naming_the_file_never_panics() {
    let _alone = CountingAllocator::exclusive();
    let seed = std::fs::read(fixtures().join("hf-mlp/model-00001-of-00005.safetensors")).unwrap();
    // Mutations land in the JSON header (its first ~2 KB) far more often when the seed is short.
    let header_len = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let short = &seed[..8 + header_len + 4096.min(seed.len() - 8 - header_len)];
    let (_, errors) = survive_mutations(short, "model.safetensors", 300, 1);
    assert!(errors > 100, "most mutations are refused ({errors} of 300)");
    survive_mutations(&seed, "model.safetensors", 100, 2);
}

#[test]
fn mutated_pytorch_zips_are_errors_naming_the_file_never_panics() {
    let _alone = CountingAllocator::exclusive();
    let seed = std::fs::read(fixtures().join("orig-linear/pytorch_model-00002-of-00002.bin")).unwrap();
    let (_, errors) = survive_mutations(&seed, "pytorch_model.bin", 300, 3);
    assert!(errors > 50, "{errors} of 300");
}

#[test]
fn mutated_shard_indexes_are_errors_never_panics() {
    let _alone = CountingAllocator::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("hf-mlp");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let index = dir.path().join("model.safetensors.index.json");
    let seed = std::fs::read(&index).unwrap();
    for (i, input) in mutations(&seed, 200, 4).into_iter().enumerate() {
        std::fs::write(&index, &input).unwrap();
        let (_, peak) = read_all(dir.path());
        assert!(peak < 16 << 20, "mutation {i}: {peak} bytes");
    }
}

/// A safetensors file whose header is `header` (JSON) followed by `data_bytes` zero bytes.
fn safetensors_with(dir: &Path, header: &str, data_bytes: usize) -> PathBuf {
    let path = dir.join("model.safetensors");
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_bytes, 0);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn crafted_safetensors_headers_are_refused_naming_the_tensor() {
    let _alone = CountingAllocator::exclusive();
    let dir = tempfile::tempdir().unwrap();
    for (header, expect) in [
        (r#"{"w": {"dtype": "F32", "shape": [64, -1], "data_offsets": [0, 256]}}"#, "not a size"),
        (
            r#"{"a": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}, "b": {"dtype": "F32", "shape": [32], "data_offsets": [64, 192]}}"#,
            "overlap",
        ),
        (r#"{"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}"#, "end before they start"),
        (
            r#"{"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 16], "data_offsets": [0, 256]}}"#,
            "does not match",
        ),
        (r#"{"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 18446744073709551615]}}"#, "ends at byte"),
    ] {
        let path = safetensors_with(dir.path(), header, 256);
        let (result, _) = read_all(&path);
        let e = result.unwrap_err();
        assert!(e.contains(expect) && e.contains("model.safetensors"), "{header}: {e}");
    }
}

/// A zip (as torch.save writes it) holding `archive/data.pkl` = `pickle` and extra entries.
fn torch_zip(dir: &Path, pickle: &[u8], entries: &[(&str, Vec<u8>, bool)]) -> PathBuf {
    let path = dir.join("pytorch_model.bin");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let deflated = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(pickle).unwrap();
    for (name, bytes, compress) in entries {
        zip.start_file(format!("archive/{name}"), if *compress { deflated } else { stored }).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
    path
}

/// `{"w": _rebuild_tensor_v2(storage('FloatStorage', key '0'), 0, (n,), (1,))}` as protocol 2.
fn state_dict_pickle(n: u32) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'X'];
    p.extend_from_slice(&1u32.to_le_bytes());
    p.push(b'w');
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    // Persistent id ('storage', torch.FloatStorage, '0', 'cpu', n).
    p.extend_from_slice(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ");
    p.extend_from_slice(&n.to_le_bytes());
    p.extend_from_slice(b"tQK\x00J");
    p.extend_from_slice(&n.to_le_bytes());
    p.extend_from_slice(b"\x85K\x01\x85\x89N");
    p.extend_from_slice(b"tRs.");
    p
}

#[test]
fn a_crafted_state_dict_reads_and_its_attacks_are_refused() {
    let _alone = CountingAllocator::exclusive();
    let dir = tempfile::tempdir().unwrap();
    // The crafted pickle itself is valid: a 16-float tensor.
    let path = torch_zip(dir.path(), &state_dict_pickle(16), &[("data/0", vec![0u8; 64], false)]);
    let store = WeightStore::open(&path).unwrap();
    assert_eq!(store.read_f32("w", &[16]).unwrap(), vec![0.0; 16]);

    // An unknown global is refused by name, not skipped.
    let evil = [&b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R."[..]].concat();
    let e = WeightStore::open(&torch_zip(dir.path(), &evil, &[])).unwrap_err().to_string();
    assert!(e.contains("builtins.eval") && e.contains("pytorch_model.bin"), "{e}");

    // A memo bomb: a list of two copies of the last one, forty times over (2^40 values from 300 bytes).
    let mut bomb = vec![0x80, 2, b']', b'q', 0];
    for _ in 0..40 {
        bomb.extend_from_slice(b"(h\x00h\x00lq\x00");
    }
    bomb.push(b'.');
    let path = torch_zip(dir.path(), &bomb, &[]);
    let (result, peak) = CountingAllocator::peak_during(|| WeightStore::open(&path));
    let e = result.unwrap_err().to_string();
    assert!(e.contains("memo bomb"), "{e}");
    assert!(peak < 16 << 20, "{peak} bytes for the memo bomb");

    // A zip bomb: a storage that inflates 1000-fold, and a data.pkl that does.
    let path = torch_zip(dir.path(), &state_dict_pickle(64 << 20), &[("data/0", vec![0u8; 256 << 20], true)]);
    let (result, peak) = read_all(&path);
    assert!(result.unwrap_err().contains("zip bomb"));
    assert!(peak < 16 << 20, "{peak} bytes for a zip bomb");
    let mut big_pickle = state_dict_pickle(16);
    big_pickle.pop();
    big_pickle.extend(std::iter::repeat_n(b'N', 200 << 20));
    big_pickle.push(b'.');
    let path = dir.path().join("pytorch_model.bin");
    {
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let deflated = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("archive/data.pkl", deflated).unwrap();
        zip.write_all(&big_pickle).unwrap();
        zip.finish().unwrap();
    }
    drop(big_pickle);
    let (result, peak) = read_all(&path);
    assert!(result.unwrap_err().contains("zip bomb"));
    assert!(peak < 128 << 20, "{peak} bytes for a pickle zip bomb");

    // A tensor claiming more than its storage holds.
    let path = torch_zip(dir.path(), &state_dict_pickle(1 << 30), &[("data/0", vec![0u8; 64], false)]);
    let e = read_all(&path).0.unwrap_err();
    assert!(e.contains("its tensors need") && e.contains("data/0"), "{e}");
}
