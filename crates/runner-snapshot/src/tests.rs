use super::*;

fn key() -> CompatKey {
    CompatKey {
        runner_version: "0.1.0".into(),
        candle_version: "0.11.1".into(),
        model_digest: "abc".into(),
        architecture: "tiny-mlp".into(),
        device_kind: "cpu".into(),
        gpu_name: None,
        compute_capability: None,
        driver_version: None,
        dtype_policy: "f32".into(),
    }
}

fn tensors() -> Vec<(String, Tensor)> {
    let cpu = Device::Cpu;
    let a = Tensor::arange(0f32, 1000f32, &cpu)
        .unwrap()
        .reshape((10, 100))
        .unwrap();
    let b = Tensor::arange(0f32, 7f32, &cpu).unwrap();
    let c = a.to_dtype(DType::BF16).unwrap();
    let d = Tensor::arange(0u32, 33u32, &cpu)
        .unwrap()
        .reshape((3, 11))
        .unwrap();
    let e = b.to_dtype(DType::F16).unwrap();
    vec![
        ("layer.weight".into(), a),
        ("layer.bias".into(), b),
        ("half.weight".into(), c),
        ("ids".into(), d),
        ("f16".into(), e),
    ]
}

fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims()
        && a.dtype() == b.dtype()
        && tensor_bytes("a", a).unwrap() == tensor_bytes("b", b).unwrap()
}

#[test]
fn roundtrip_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.rsnap");
    let originals = tensors();
    let report = write(&path, &key(), &originals).unwrap();
    assert_eq!(report.tensors, 5);
    assert_eq!(report.file_bytes, std::fs::metadata(&path).unwrap().len());
    let snap = Snapshot::open(&path).unwrap();
    snap.check_compatible(&key()).unwrap();
    for a in &snap.manifest.arenas {
        assert_eq!(a.offset % ARENA_ALIGN, 0);
    }
    for t in &snap.manifest.tensors {
        assert_eq!(t.offset % TENSOR_ALIGN, 0);
    }
    let (restored, stats) = snap.restore(&Device::Cpu).unwrap();
    assert_eq!(stats.data_bytes, snap.header.data_bytes);
    assert_eq!(restored.len(), originals.len());
    for ((n1, t1), (n2, t2)) in originals.iter().zip(&restored) {
        assert_eq!(n1, n2);
        assert!(same_bits(t1, t2), "{n1} differs");
    }
    // Views compute like the originals.
    let x = Tensor::ones((1, 10), DType::F32, &Device::Cpu).unwrap();
    let y1 = x.matmul(&originals[0].1).unwrap();
    let y2 = x.matmul(&restored[0].1).unwrap();
    assert!(same_bits(&y1, &y2));
    // The arena path (used on GPUs) gives the same tensors, as views.
    let (views, _) = snap.restore_arenas(&Device::Cpu).unwrap();
    for ((n1, t1), (_, t2)) in originals.iter().zip(&views) {
        assert!(same_bits(t1, t2), "{n1} differs in the arena restore");
    }
    // No temporary file left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// Lines of this process's memory map that map `path`.
fn mappings_of(path: &Path) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let name = path.to_str().unwrap();
    maps.lines().filter(|l| l.ends_with(name)).count()
}

#[test]
fn the_cpu_restore_maps_the_file_and_unmaps_it_with_the_last_tensor() {
    assert!(
        allocator_installed(),
        "the test binary installs SnapshotAllocator"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mapped.rsnap");
    let originals = tensors();
    write(&path, &key(), &originals).unwrap();
    let snap = Snapshot::open(&path).unwrap();
    let arenas = snap.manifest.arenas.len();
    let (mut restored, _) = snap.restore_mapped(&Device::Cpu).unwrap();
    let (copied, _) = snap.restore_per_tensor(&Device::Cpu).unwrap();
    drop(snap);
    // One mapping per arena (the kernel may show neighbours as one line).
    assert!((1..=arenas).contains(&mappings_of(&path)));
    for (((n1, t1), (_, t2)), (_, t3)) in originals.iter().zip(&restored).zip(&copied) {
        assert!(same_bits(t1, t2), "{n1} differs in the mapped restore");
        assert!(same_bits(t1, t3), "{n1} differs in the copied restore");
    }
    // A new snapshot renamed over the file, and then the file removed, change nothing for
    // the tensors already restored: they map the old file's pages.
    let other: Vec<(String, Tensor)> = originals
        .iter()
        .map(|(n, t)| (n.clone(), t.zeros_like().unwrap()))
        .collect();
    write(&path, &key(), &other).unwrap();
    std::fs::remove_file(&path).unwrap();
    for ((n1, t1), (_, t2)) in originals.iter().zip(&restored) {
        assert!(same_bits(t1, t2), "{n1} changed under the tensor");
    }
    let x = Tensor::ones((1, 10), DType::F32, &Device::Cpu).unwrap();
    let y1 = x.matmul(&originals[0].1).unwrap();
    let y2 = x.matmul(&restored[0].1).unwrap();
    assert!(same_bits(&y1, &y2));
    // Each arena's mapping goes with the last tensor in it.
    let deleted = PathBuf::from(format!("{} (deleted)", path.display()));
    assert!(mappings_of(&deleted) >= 1);
    while let Some((_, t)) = restored.pop() {
        drop(t);
    }
    assert_eq!(
        mappings_of(&deleted),
        0,
        "every mapping is gone with its tensors"
    );
}

#[test]
fn a_damaged_chunk_is_caught_by_the_mapped_restore_and_nothing_stays_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.rsnap");
    // Three 16 MiB chunks; the last one damaged.
    let t = Tensor::arange(0f32, (10 << 20) as f32, &Device::Cpu).unwrap();
    write(&path, &key(), &[("big".into(), t)]).unwrap();
    flip_bit(&path, 4096 + (40 << 20) - 5);
    let snap = Snapshot::open(&path).unwrap();
    let err = snap.restore_mapped(&Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("data chunk 2 of arena 0"), "{err}");
    assert_eq!(mappings_of(&path), 0);
}

#[test]
fn many_chunks_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.rsnap");
    // 40 MiB of f32: three 16 MiB chunks.
    let t = Tensor::arange(0f32, (10 << 20) as f32, &Device::Cpu).unwrap();
    write(&path, &key(), &[("big".into(), t.clone())]).unwrap();
    let snap = Snapshot::open(&path).unwrap();
    assert_eq!(snap.manifest.arenas[0].chunk_checksums.len(), 3);
    let (restored, _) = snap.restore(&Device::Cpu).unwrap();
    assert!(same_bits(&t, &restored[0].1));
}

/// Whether the temporary directory's file system takes direct reads (tmpfs does not).
fn direct_reads_work(dir: &Path) -> bool {
    let probe = dir.join("probe");
    std::fs::write(&probe, [0u8; 4096]).unwrap();
    let works = direct::open_direct(&probe).is_ok();
    std::fs::remove_file(&probe).unwrap();
    if !works {
        eprintln!("skipped: {} refuses O_DIRECT", dir.display());
    }
    works
}

#[test]
fn the_direct_restore_reads_around_the_page_cache_and_gives_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    if !direct_reads_work(dir.path()) {
        return;
    }
    let path = dir.path().join("direct.rsnap");
    // Three 16 MiB chunks in the f32 arena (the last one short), and arenas whose lengths
    // are not whole blocks.
    let mut originals = tensors();
    let big = Tensor::arange(0f32, ((10 << 20) + 333) as f32, &Device::Cpu).unwrap();
    originals.push(("big".into(), big));
    write(&path, &key(), &originals).unwrap();
    let snap = Snapshot::open(&path).unwrap();
    let (restored, stats) = snap
        .restore_reading(&Device::Cpu, direct::ReadMode::Direct)
        .unwrap();
    assert!(stats.direct, "the restore read directly");
    assert!(stats.resident.is_some(), "mincore answers on this file");
    for ((n1, t1), (n2, t2)) in originals.iter().zip(&restored) {
        assert_eq!(n1, n2);
        assert!(same_bits(t1, t2), "{n1} differs in the direct restore");
    }
    drop(snap);
    // The tensors live in memory of their own: nothing maps the file.
    assert_eq!(mappings_of(&path), 0);
    let x = Tensor::ones((1, 10), DType::F32, &Device::Cpu).unwrap();
    assert!(same_bits(
        &x.matmul(&originals[0].1).unwrap(),
        &x.matmul(&restored[0].1).unwrap()
    ));
    // Asked for the page cache, the same snapshot maps the file.
    let snap = Snapshot::open(&path).unwrap();
    let (mapped, stats) = snap
        .restore_reading(&Device::Cpu, direct::ReadMode::Cache)
        .unwrap();
    assert!(!stats.direct);
    assert!(mappings_of(&path) >= 1);
    for ((n1, t1), (_, t2)) in originals.iter().zip(&mapped) {
        assert!(same_bits(t1, t2), "{n1} differs in the mapped restore");
    }
}

#[test]
fn a_damaged_chunk_is_caught_by_the_direct_restore() {
    let dir = tempfile::tempdir().unwrap();
    if !direct_reads_work(dir.path()) {
        return;
    }
    let path = dir.path().join("bad-direct.rsnap");
    let t = Tensor::arange(0f32, (10 << 20) as f32, &Device::Cpu).unwrap();
    write(&path, &key(), &[("big".into(), t)]).unwrap();
    flip_bit(&path, 4096 + (40 << 20) - 5);
    let snap = Snapshot::open(&path).unwrap();
    let err = snap
        .restore_reading(&Device::Cpu, direct::ReadMode::Direct)
        .unwrap_err()
        .to_string();
    assert!(err.contains("data chunk 2 of arena 0"), "{err}");
}

fn flip_bit(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

fn error_of(path: &Path) -> String {
    match Snapshot::open(path) {
        Err(e) => e.to_string(),
        Ok(s) => match s.restore(&Device::Cpu) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{} was accepted", path.display()),
        },
    }
}

#[test]
fn every_kind_of_damage_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.rsnap");
    write(&good, &key(), &tensors()).unwrap();
    let len = std::fs::metadata(&good).unwrap().len();
    let snap = Snapshot::open(&good).unwrap();
    let data_end = PREAMBLE_BYTES + snap.header.data_bytes;
    drop(snap);
    let copy = |name: &str| {
        let p = dir.path().join(name);
        std::fs::copy(&good, &p).unwrap();
        p
    };

    let p = copy("truncated");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    assert!(error_of(&p).contains("truncated"), "{}", error_of(&p));

    let p = copy("magic");
    flip_bit(&p, 0);
    assert!(error_of(&p).contains("not a runner snapshot"));

    let p = copy("preamble");
    flip_bit(&p, 20); // data offset
    assert!(error_of(&p).contains("corrupt"), "{}", error_of(&p));

    let p = copy("version");
    flip_bit(&p, 8);
    assert!(error_of(&p).contains("format version"), "{}", error_of(&p));

    let p = copy("header");
    flip_bit(&p, data_end + 5);
    assert!(
        error_of(&p).contains("checksum of the preamble, header and manifest"),
        "{}",
        error_of(&p)
    );

    let p = copy("manifest");
    flip_bit(&p, len - 5);
    assert!(
        error_of(&p).contains("checksum of the preamble, header and manifest"),
        "{}",
        error_of(&p)
    );

    let p = copy("data");
    flip_bit(&p, PREAMBLE_BYTES + 100);
    let e = error_of(&p);
    assert!(
        e.contains("data chunk 0 of arena") && e.contains("fails its checksum"),
        "{e}"
    );

    let p = copy("garbage");
    std::fs::write(&p, b"hello").unwrap();
    assert!(error_of(&p).contains("shorter than"), "{}", error_of(&p));

    assert!(error_of(dir.path()).contains("is a directory"));
    let missing = dir.path().join("missing.rsnap");
    assert!(error_of(&missing).contains("cannot open"));
}

#[test]
fn snapshots_of_something_else_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.rsnap");
    write(&path, &key(), &tensors()).unwrap();
    let snap = Snapshot::open(&path).unwrap();
    type Change = fn(&mut CompatKey);
    let cases: Vec<(Change, &str)> = vec![
        (
            |k| k.model_digest = "other".into(),
            "model (spec and weights)",
        ),
        (|k| k.runner_version = "9.9.9".into(), "runner version"),
        (|k| k.device_kind = "cuda".into(), "device kind"),
        (|k| k.gpu_name = Some("NVIDIA H100".into()), "GPU"),
        (|k| k.dtype_policy = "bf16".into(), "dtype policy"),
        (|k| k.architecture = "bert".into(), "architecture"),
    ];
    for (change, field) in cases {
        let mut expected = key();
        change(&mut expected);
        let e = snap.check_compatible(&expected).unwrap_err().to_string();
        assert!(e.contains(&format!("another {field}")), "{e}");
    }
}

#[test]
fn two_writers_never_mix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.rsnap");
    let big = Tensor::arange(0f32, (4 << 20) as f32, &Device::Cpu).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let (path, t) = (path.clone(), (&big + i as f64).unwrap());
            std::thread::spawn(move || write(&path, &key(), &[("w".into(), t)]).unwrap())
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (restored, _) = Snapshot::open(&path)
        .unwrap()
        .restore(&Device::Cpu)
        .unwrap();
    let first: f32 = restored[0].1.get(0).unwrap().to_scalar().unwrap();
    let expected = (&big + first as f64).unwrap();
    assert!(
        same_bits(&expected, &restored[0].1),
        "one writer's complete file"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary files left"
    );
}

/// A sink that runs out of space after `room` bytes, like a full disk.
struct FullDisk {
    inner: std::io::Cursor<Vec<u8>>,
    room: usize,
}

impl Write for FullDisk {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.inner.position() as usize + buf.len() > self.room {
            return Err(std::io::Error::from_raw_os_error(28));
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Seek for FullDisk {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

#[test]
fn a_full_disk_is_reported_and_leaves_no_valid_file() {
    let mut sink = FullDisk {
        inner: std::io::Cursor::new(Vec::new()),
        room: 6000,
    };
    let err = write_to(&mut sink, Path::new("x.rsnap"), &key(), &tensors()).unwrap_err();
    match err {
        SnapshotError::Io { source, .. } => assert!(is_disk_full(&source)),
        other => panic!("{other}"),
    }
    // What reached the "disk" has no preamble: it never validates.
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("partial.rsnap");
    std::fs::write(&partial, sink.inner.get_ref()).unwrap();
    assert!(Snapshot::open(&partial).is_err());

    // The public writer cleans up its temporary file when writing fails.
    let blocked = dir.path().join("blocker");
    std::fs::write(&blocked, b"a file where a folder should be").unwrap();
    let e = write(&blocked.join("m.rsnap"), &key(), &tensors()).unwrap_err();
    assert!(e.to_string().contains("cannot create"), "{e}");
}

/// A deterministic mutation sweep (a fuzzer's worth of damage, replayable in `cargo test`):
/// flipped bits, truncations and overwritten words anywhere in a real snapshot. Opening and
/// restoring must never panic, and whatever opens must restore the original bits exactly.
#[test]
fn random_damage_never_panics_and_never_restores_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.rsnap");
    let originals = tensors();
    write(&path, &key(), &originals).unwrap();
    let good = std::fs::read(&path).unwrap();
    // A fixed seed, so a failure replays exactly.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x9E37_79B9_7F4A_7C15);
    let mut next = move || rand::Rng::random::<u64>(&mut rng);
    let damaged = dir.path().join("damaged.rsnap");
    let (mut refused, mut identical) = (0, 0);
    for round in 0..3000 {
        let mut bytes = good.clone();
        let kind = next() % 4;
        match kind {
            0 => {
                for _ in 0..=next() % 4 {
                    let at = (next() % bytes.len() as u64) as usize;
                    bytes[at] ^= 1 << (next() % 8);
                }
            }
            1 => bytes.truncate((next() % bytes.len() as u64) as usize),
            2 => {
                let at = (next() % (bytes.len() as u64 - 8)) as usize;
                let word = match next() % 3 {
                    0 => u64::MAX,
                    1 => 0,
                    _ => next(),
                };
                bytes[at..at + 8].copy_from_slice(&word.to_le_bytes());
            }
            _ => {
                // Damage within the first 4 KiB: preamble, header and manifest.
                let at = (next() % 4096.min(bytes.len() as u64)) as usize;
                bytes[at] = (next() & 0xFF) as u8;
            }
        }
        // The preamble's unused tail (up to the 4 KiB-aligned data) is padding that nothing
        // reads; every other byte is covered by a checksum or a length check.
        let padding = PREAMBLE_USED + 8..PREAMBLE_BYTES as usize;
        let covered_change = bytes.len() != good.len()
            || bytes
                .iter()
                .zip(&good)
                .enumerate()
                .any(|(i, (a, b))| a != b && !padding.contains(&i));
        std::fs::write(&damaged, &bytes).unwrap();
        let outcome = std::panic::catch_unwind(|| {
            let snap = Snapshot::open(&damaged)?;
            snap.check_compatible(&key())?;
            snap.restore(&Device::Cpu).map(|(t, _)| t)
        });
        match outcome {
            Err(_) => panic!("round {round} (mutation kind {kind}) panicked"),
            Ok(Err(_)) => refused += 1,
            Ok(Ok(_)) if covered_change => {
                panic!("round {round} (mutation kind {kind}): damage was not noticed")
            }
            Ok(Ok(restored)) => {
                assert_eq!(restored.len(), originals.len(), "round {round}");
                for ((n1, t1), (n2, t2)) in originals.iter().zip(&restored) {
                    assert_eq!(n1, n2, "round {round}");
                    assert!(
                        same_bits(t1, t2),
                        "round {round}: {n1} restored wrong bytes"
                    );
                }
                identical += 1;
            }
        }
    }
    // Most mutations land outside the padding (the sweep is not vacuous).
    assert!(
        refused > 1500,
        "only {refused} of 3000 refused ({identical} identical)"
    );
}

/// A restored tensor is a view into its dtype's arena: its bytes are the view's alone.
#[test]
fn a_views_bytes_are_only_the_views() {
    let arena = Tensor::arange(0u32, 12, &Device::Cpu)
        .unwrap()
        .reshape((3, 4))
        .unwrap();
    let middle_row = arena.narrow(0, 1, 1).unwrap();
    let want: Vec<u8> = (4u32..8).flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(tensor_bytes("row", &middle_row).unwrap(), want);
    let second_column = arena.narrow(1, 1, 1).unwrap();
    let want: Vec<u8> = [1u32, 5, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(tensor_bytes("column", &second_column).unwrap(), want);
    // Every dtype a snapshot stores, read straight from storage, as its little-endian bits.
    let halves = arena
        .to_dtype(DType::BF16)
        .unwrap()
        .narrow(0, 2, 1)
        .unwrap();
    let want: Vec<u8> = (8..12)
        .flat_map(|v| half::bf16::from_f32(v as f32).to_bits().to_le_bytes())
        .collect();
    assert_eq!(tensor_bytes("bf16 row", &halves).unwrap(), want);
    let floats = arena.to_dtype(DType::F64).unwrap().narrow(0, 0, 1).unwrap();
    let want: Vec<u8> = (0..4).flat_map(|v| (v as f64).to_le_bytes()).collect();
    assert_eq!(tensor_bytes("f64 row", &floats).unwrap(), want);
}
