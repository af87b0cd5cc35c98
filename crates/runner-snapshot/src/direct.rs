//! Reading a snapshot around the page cache (`O_DIRECT`), for a file the page cache does not
//! hold: the disk then writes straight into the restore's own buffers (the CPU's tensors, or
//! the CUDA ring's pinned buffers) instead of into the page cache and through one more copy.
//!
//! `RUNNER_RESTORE_READ` picks how a restore reads: `cache` (through the page cache: the
//! CPU restore maps it, the CUDA ring copies from it), `direct` (always `O_DIRECT`), or
//! `auto` (the default): `O_DIRECT` where less than half of the snapshot's data is in the
//! page cache and the device is one where direct reads measured faster ([`direct_pays_on`]);
//! the page cache is then filled in the background for the next start. A file system that refuses `O_DIRECT` (tmpfs, some network
//! file systems) gets the page-cache path, whatever the setting.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Buffers, file offsets and lengths of direct reads are multiples of this: the largest
/// logical block size of common disks, and the page size, so page-aligned buffers do.
pub const DIRECT_ALIGN: usize = 4096;

/// How a restore reads the snapshot file (`RUNNER_RESTORE_READ`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// Direct where the file is mostly not in the page cache and the device gains from it.
    Auto,
    /// Always through the page cache.
    Cache,
    /// Always around it.
    Direct,
}

/// The read mode `RUNNER_RESTORE_READ` asks for; anything unknown is `auto`, with a warning.
pub fn read_mode() -> ReadMode {
    match std::env::var("RUNNER_RESTORE_READ").as_deref() {
        Err(_) | Ok("") | Ok("auto") => ReadMode::Auto,
        Ok("cache") => ReadMode::Cache,
        Ok("direct") => ReadMode::Direct,
        Ok(other) => {
            tracing::warn!(
                "RUNNER_RESTORE_READ={other} is not one of auto, cache, direct: using auto"
            );
            ReadMode::Auto
        }
    }
}

/// Whether `auto` reads a cold snapshot directly on this kind of device ("cpu" or "cuda").
///
/// On the CPU it does not. On the 2-core VM (virtio disk, 2026-11-30, page cache dropped
/// before each start; `benches/results/2026-11-30-cpu-cold-restore/`) direct reads of a
/// 538 MB snapshot beat the page-cache path (0.52 s against 0.60 s, 11 of 14 pairs) only
/// while the start-up readahead was broken (one `POSIX_FADV_WILLNEED` for the whole file,
/// which Linux caps at one readahead window: see [`read_ahead`]). With that fixed, the
/// page-cache path is as fast or faster to ready, and it leaves the snapshot in the page
/// cache for the next start and the weights mapped rather than copied. On CUDA it does
/// not until the GPU script has compared both there.
pub fn direct_pays_on(_device_kind: &str) -> bool {
    false
}

/// After a direct restore: asks the kernel, on a thread of its own, to read `len` bytes of
/// the snapshot at `path` from `offset` into the page cache, so the next start restores
/// from memory rather than the disk. Best effort.
pub fn warm_page_cache(path: &Path, offset: u64, len: u64) {
    let Ok(file) = File::open(path) else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("snapshot-warm-cache".into())
        .spawn(move || read_ahead(&file, offset, len));
    if let Err(e) = spawned {
        tracing::debug!("snapshot restore: not warming the page cache ({e})");
    }
}

/// Asks the kernel to read `len` bytes of `file` from `offset` into the page cache, without
/// waiting for them (it waits only while the disk's queue is full).
///
/// One `POSIX_FADV_WILLNEED` for the whole range is not enough: Linux reads at most one
/// readahead window per call (8 MiB on the 2-core VM, often 128 KiB), so a single call for a
/// 538 MB snapshot brought in 1.6 % of it. The range goes in 128 KiB steps instead, the
/// smallest common window.
pub fn read_ahead(file: &File, offset: u64, len: u64) {
    const STEP: u64 = 128 << 10;
    let mut at = offset;
    let end = offset.saturating_add(len);
    while at < end {
        let n = STEP.min(end - at);
        // SAFETY: an advisory call on a descriptor the caller holds open.
        let failed = unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                at as libc::off_t,
                n as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        } != 0;
        if failed {
            return; // best effort: a file system without readahead
        }
        at += n;
    }
}

/// The share of `len` bytes of `file` from `offset` that sits in the page cache (`mincore`
/// over a mapping that is never touched), or `None` where the kernel will not say.
pub fn resident_fraction(file: &File, offset: u64, len: u64) -> Option<f64> {
    if len == 0 {
        return Some(1.0);
    }
    let page = crate::page_size() as u64;
    let start = offset / page * page;
    let map_len = usize::try_from(offset - start + len).ok()?;
    // SAFETY: a read-only shared mapping of a file we hold open, never read through: it only
    // lets mincore ask about the file's pages, and is unmapped below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            start as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return None;
    }
    let pages = map_len.div_ceil(page as usize);
    let mut resident = vec![0u8; pages];
    // SAFETY: `ptr` maps `map_len` bytes; `resident` has one byte per page of them.
    let answered = unsafe { libc::mincore(ptr, map_len, resident.as_mut_ptr()) } == 0;
    // SAFETY: the mapping made above, with nothing derived from it.
    unsafe { libc::munmap(ptr, map_len) };
    answered.then(|| {
        let held = resident.iter().filter(|&&b| b & 1 == 1).count();
        held as f64 / pages as f64
    })
}

/// What a restore decided about direct reads, and what it saw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReadPlan {
    pub direct: bool,
    /// The share of the snapshot's data in the page cache when the restore looked (`None`
    /// where the kernel would not say).
    pub resident: Option<f64>,
}

/// Whether a restore onto `device_kind` in `mode` reads the data of `file` (`len` bytes
/// from `offset`) directly: see [`ReadMode`].
pub fn plan(file: &File, offset: u64, len: u64, device_kind: &str, mode: ReadMode) -> ReadPlan {
    // Asked even where the mode decides alone: benchmarks report it.
    let resident = resident_fraction(file, offset, len);
    let direct = reads_direct(mode, device_kind, || resident);
    ReadPlan { direct, resident }
}

/// The rule of [`ReadMode`]: `auto` reads directly where that pays on the device and less
/// than half of the data is cached. `resident` is asked only where the answer depends on it.
fn reads_direct(mode: ReadMode, device_kind: &str, resident: impl FnOnce() -> Option<f64>) -> bool {
    match mode {
        ReadMode::Cache => false,
        ReadMode::Direct => true,
        ReadMode::Auto => direct_pays_on(device_kind) && resident().is_some_and(|r| r < 0.5),
    }
}

/// Whether a restore of the snapshot at `path` onto `device_kind` will read it directly, as
/// [`plan`] decides, asked before the snapshot is opened (the engine asks, so that it does not
/// read ahead into the page cache what a restore will read around it). The page cache is
/// asked only where the answer depends on it, so start-up pays nothing for it by default.
pub fn will_read_direct(path: &Path, device_kind: &str) -> bool {
    reads_direct(read_mode(), device_kind, || {
        let file = File::open(path).ok()?;
        let len = file.metadata().ok()?.len();
        resident_fraction(&file, 0, len)
    })
}

/// Opens `path` for direct reads; an error where the file system refuses them.
pub fn open_direct(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Reads `len` bytes at `offset` into the start of `buf` with direct reads: `offset` and the
/// address of `buf` must be multiples of [`DIRECT_ALIGN`], and `buf` must hold `len` rounded
/// up to one (the bytes past `len` are whatever the file holds there, or untouched past its
/// end).
pub fn read_direct(file: &File, buf: &mut [u8], len: usize, offset: u64) -> std::io::Result<()> {
    let want = len.next_multiple_of(DIRECT_ALIGN);
    if !offset.is_multiple_of(DIRECT_ALIGN as u64)
        || !(buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
        || buf.len() < want
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a direct read needs an aligned offset and buffer",
        ));
    }
    let mut done = 0usize;
    while done < len {
        match file.read_at(&mut buf[done..want], offset + done as u64) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the file ends {} bytes early", len - done),
                ))
            }
            // A short read that stops off a block boundary can only be the file's end.
            Ok(n) if done + n < len && !n.is_multiple_of(DIRECT_ALIGN) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the file ends {} bytes early", len - done - n),
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn direct_reads_return_the_files_bytes_up_to_its_end_and_refuse_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let bytes: Vec<u8> = (0..3 * DIRECT_ALIGN + 100)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        let Ok(file) = open_direct(&path) else {
            eprintln!("skipped: the temporary directory's file system refuses O_DIRECT");
            return;
        };
        let memory = crate::Mapping::anonymous(4 * DIRECT_ALIGN)
            .unwrap()
            .unwrap();
        // SAFETY: the mapping's whole capacity is ours while `memory` lives.
        let buf = unsafe { std::slice::from_raw_parts_mut(memory.as_mut_ptr(), memory.capacity()) };
        // The tail: not a whole block, read up to the file's end.
        let at = 2 * DIRECT_ALIGN;
        read_direct(&file, buf, DIRECT_ALIGN + 100, at as u64).unwrap();
        assert_eq!(&buf[..DIRECT_ALIGN + 100], &bytes[at..]);
        // Past the end: refused, saying how much is missing.
        let err = read_direct(&file, buf, DIRECT_ALIGN + 101, at as u64).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
        // Unaligned offsets and buffers are refused rather than handed to the kernel.
        let err = read_direct(&file, buf, 10, 1).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        let err = read_direct(&file, &mut buf[1..], 10, 0).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }

    #[test]
    fn residency_sees_pages_leave_and_enter_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let len = 64 * DIRECT_ALIGN;
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![1u8; len]).unwrap();
        f.sync_all().unwrap();
        let file = File::open(&path).unwrap();
        // SAFETY: advisory calls on a descriptor we own.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let Some(cold) = resident_fraction(&file, 0, len as u64) else {
            eprintln!("skipped: mincore does not answer here");
            return;
        };
        let mut sink = vec![0u8; len];
        file.read_exact_at(&mut sink, 0).unwrap();
        let warm = resident_fraction(&file, 0, len as u64).unwrap();
        assert_eq!(warm, 1.0, "a file just read is in the page cache");
        // tmpfs cannot drop its pages; elsewhere a synced, dropped file is (mostly) gone.
        assert!(cold <= 1.0);
        assert_eq!(resident_fraction(&file, 0, 0), Some(1.0));
    }
}
