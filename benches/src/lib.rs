//! Benchmarks for infergate; see benches/benches/.
