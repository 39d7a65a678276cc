//! Deterministic mutations of a valid input (bit flips, truncations, overwritten or duplicated
//! spans, numbers swapped for extreme ones): the inputs of the parsers' hostile-input tests,
//! the same on every run, so a failure reproduces from its index.

/// `count` variants of `seed`, each a few mutations deep.
pub fn mutations(seed: &[u8], count: usize, rng_seed: u64) -> Vec<Vec<u8>> {
    let mut rng = XorShift(rng_seed | 1);
    (0..count)
        .map(|_| {
            let mut v = seed.to_vec();
            for _ in 0..1 + rng.below(3) {
                mutate(&mut v, &mut rng);
            }
            v
        })
        .collect()
}

/// Numbers a hostile file would hold where a size goes.
const EXTREME_NUMBERS: [&str; 8] =
    ["0", "-1", "4294967296", "18446744073709551615", "99999999999999999999", "1e308", "NaN", "-0.5"];

fn mutate(v: &mut Vec<u8>, rng: &mut XorShift) {
    if v.is_empty() {
        v.push(rng.next() as u8);
        return;
    }
    let at = rng.below(v.len());
    match rng.below(7) {
        0 => v[at] ^= 1 << rng.below(8),
        1 => v.truncate(at),
        2 => v[at] = [0x00, 0xff, 0x7f, 0x80][rng.below(4)],
        3 => {
            // Overwrite a span with a copy of another one.
            let from = rng.below(v.len());
            let len = rng.below(16).min(v.len() - at).min(v.len() - from);
            let span = v[from..from + len].to_vec();
            v[at..at + len].copy_from_slice(&span);
        }
        4 => {
            // Duplicate a span in place (repeated keys, entries, tokens).
            let len = rng.below(64).min(v.len() - at);
            let span = v[at..at + len].to_vec();
            v.splice(at..at, span);
        }
        5 => {
            // Swap the next decimal number for an extreme one.
            if let Some(start) = (at..v.len()).find(|&i| v[i].is_ascii_digit()) {
                let end = (start..v.len()).find(|&i| !v[i].is_ascii_digit()).unwrap_or(v.len());
                let n = EXTREME_NUMBERS[rng.below(EXTREME_NUMBERS.len())].as_bytes().to_vec();
                v.splice(start..end, n);
            } else {
                v[at] = b'9';
            }
        }
        _ => {
            // Set a little-endian u32 to something large.
            let end = (at + 4).min(v.len());
            let big = [0xffu8, 0xff, 0xff, 0x7f];
            v[at..end].copy_from_slice(&big[..end - at]);
        }
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mutations_are_deterministic_and_differ_from_the_seed() {
        let seed = br#"{"shape": [64, 128], "data_offsets": [0, 32768]}"#;
        let a = super::mutations(seed, 50, 7);
        assert_eq!(a, super::mutations(seed, 50, 7));
        assert!(a.iter().filter(|m| m.as_slice() != seed).count() >= 45);
    }
}
