//! Benchmarks live in `benches/field.rs`; run `cargo bench -p phiseal-benches`.
