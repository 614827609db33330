//! Argument-file expansion: one file of N lines, and a file that names
//! others (`@file` inside `@file`), read from a real directory.

use std::fs;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use persistent_worker::argfile;

fn expansion(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut group = c.benchmark_group("argfile");
    for lines in [10usize, 1_000, 100_000] {
        let text: String = (0..lines)
            .map(|i| format!("bazel-out/k8-fastbuild/bin/pkg/file-{i}.txt\n"))
            .collect();
        let name = format!("flat-{lines}");
        fs::write(dir.path().join(&name), &text).expect("writing an argument file");
        group.throughput(Throughput::Bytes(text.len() as u64));
        let args = vec![format!("@{name}")];
        group.bench_with_input(BenchmarkId::new("flat lines", lines), &args, |b, args| {
            b.iter(|| argfile::expand(args, dir.path()).expect("expands"))
        });
    }
    // Ten files of 100 lines, each named by one outer file.
    let outer: String = (0..10)
        .map(|f| {
            let inner: String = (0..100).map(|i| format!("arg-{f}-{i}\n")).collect();
            fs::write(dir.path().join(format!("inner-{f}")), inner).expect("writing");
            format!("@inner-{f}\n")
        })
        .collect();
    fs::write(dir.path().join("outer"), outer).expect("writing");
    group.throughput(Throughput::Elements(1000));
    let args = vec!["@outer".to_owned()];
    group.bench_with_input(BenchmarkId::new("nested", "10x100"), &args, |b, args| {
        b.iter(|| argfile::expand(args, dir.path()).expect("expands"))
    });
    group.finish();
}

criterion_group!(benches, expansion);
criterion_main!(benches);
