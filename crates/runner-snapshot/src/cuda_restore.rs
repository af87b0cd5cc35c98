//! The CUDA restore path: reader threads fill a small ring of pinned host buffers from the
//! file, check each chunk, and copy each buffer asynchronously into one device allocation
//! per arena, on a stream of their own; an event per buffer guards its reuse.
//!
//! Traps avoided (see DESIGN.md): candle's device works on the per-thread default stream,
//! whose handle means "the calling thread's stream", so the copies go on a dedicated stream
//! that is synchronized before the tensors are handed over; the pinned buffers are not
//! write-combined, because the CPU reads them back to check the chunks; the arenas are
//! allocated through the model's own `CudaDevice`.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaSlice, CudaStream, DevicePtrMut};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Storage, Tensor};
use half::{bf16, f16};

use super::{io, parse_dtype, RestoreStats, Restored, Snapshot, SnapshotError};

/// Pinned bytes per buffer (`RUNNER_RESTORE_PIECE_KIB` or `_MIB`); each reader thread owns
/// two, so one is copied while the next is read. Pinning costs time in proportion to the
/// bytes, and on an H200 1 MiB restored faster than 2, 4 or 16 MiB.
const PIECE_BYTES: usize = 1 << 20;
const BUFFERS_PER_THREAD: usize = 2;
/// Reader threads at most (`RUNNER_RESTORE_THREADS`).
const MAX_THREADS: usize = 8;

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.parse().ok().filter(|&n| n > 0)
}

/// The CUDA restore paths (`RUNNER_CUDA_RESTORE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CudaRestorePath {
    /// The default: reader threads copy the file into a ring of pinned buffers.
    Pinned,
    /// `mapped`: the snapshot file's page-cache pages are themselves page-locked
    /// (`cuMemHostRegister`, read-only) chunk by chunk and copied from directly, so the CPU
    /// reads each byte once (for its checksum) and copies nothing. On an H200 (2026-11-30)
    /// it restored bit-identically at 12.1 GB/s against the ring's 18.6 GB/s for 2.15 GB:
    /// locking the page cache's pages cost more than copying them.
    Mapped,
    /// `pageable`: read each arena into ordinary memory and upload it with one copy.
    Pageable,
}

pub(crate) fn restore_path() -> CudaRestorePath {
    match std::env::var("RUNNER_CUDA_RESTORE").as_deref() {
        Ok("pageable") => CudaRestorePath::Pageable,
        Ok("mapped") => CudaRestorePath::Mapped,
        _ => CudaRestorePath::Pinned,
    }
}

fn driver_err(what: &str) -> impl Fn(result::DriverError) -> SnapshotError + '_ {
    move |e| SnapshotError::Tensor {
        name: "device".into(),
        message: format!("{what}: {e}"),
    }
}

/// How the reader threads pin their buffers (`RUNNER_RESTORE_PIN`): `alloc` asks the
/// driver for page-locked memory (`cuMemHostAlloc`); `register` maps and touches ordinary
/// memory first and then page-locks it (`cuMemHostRegister`), which takes the driver's
/// lock for less time. Which is faster depends on the driver; the GPU script sweeps both.
fn pin_by_registering() -> bool {
    std::env::var("RUNNER_RESTORE_PIN").is_ok_and(|v| v == "register")
}

/// One page-locked host buffer, freed on drop (after its copy finished).
struct PinnedBuffer {
    ptr: *mut u8,
    len: usize,
    registered: bool,
}

// SAFETY: the buffer is plain host memory owned by one reader thread at a time.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    fn new(len: usize) -> Result<Self, SnapshotError> {
        if pin_by_registering() {
            return Self::registered(len);
        }
        // SAFETY: flags 0 = ordinary (cached, not write-combined) page-locked memory.
        let ptr = unsafe { result::malloc_host(len, 0) }
            .map_err(driver_err("cannot allocate pinned host memory"))?;
        Ok(Self {
            ptr: ptr as *mut u8,
            len,
            registered: false,
        })
    }

    fn registered(len: usize) -> Result<Self, SnapshotError> {
        // SAFETY: a private anonymous mapping, populated now so registering only locks it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(SnapshotError::Tensor {
                name: "device".into(),
                message: format!(
                    "cannot map {len} bytes of host memory: {}",
                    std::io::Error::last_os_error()
                ),
            });
        }
        // SAFETY: `ptr` is a live mapping of `len` bytes; flags 0 = ordinary locking.
        let status = unsafe { sys::cuMemHostRegister_v2(ptr, len, 0) };
        if status != sys::CUresult::CUDA_SUCCESS {
            // SAFETY: the mapping made above, not registered.
            unsafe { libc::munmap(ptr, len) };
            return Err(driver_err("cannot page-lock host memory")(
                result::DriverError(status),
            ));
        }
        Ok(Self {
            ptr: ptr as *mut u8,
            len,
            registered: true,
        })
    }

    fn bytes_mut(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: `ptr` points at `self.len` bytes we own; len is clamped.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len.min(self.len)) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated (or mapped and registered) above; every copy from it was
        // waited for.
        unsafe {
            if self.registered {
                let _ = sys::cuMemHostUnregister(self.ptr as *mut std::ffi::c_void);
                libc::munmap(self.ptr as *mut libc::c_void, self.len);
            } else {
                let _ = result::free_host(self.ptr as *mut std::ffi::c_void);
            }
        }
    }
}

/// A device allocation for one arena, typed as candle will hold it.
enum DeviceArena {
    U8(CudaSlice<u8>),
    U32(CudaSlice<u32>),
    I64(CudaSlice<i64>),
    F32(CudaSlice<f32>),
    F64(CudaSlice<f64>),
    BF16(CudaSlice<bf16>),
    F16(CudaSlice<f16>),
}

macro_rules! each_arena {
    ($arena:expr, $s:ident => $body:expr) => {
        match $arena {
            DeviceArena::U8($s) => $body,
            DeviceArena::U32($s) => $body,
            DeviceArena::I64($s) => $body,
            DeviceArena::F32($s) => $body,
            DeviceArena::F64($s) => $body,
            DeviceArena::BF16($s) => $body,
            DeviceArena::F16($s) => $body,
        }
    };
}

impl DeviceArena {
    fn alloc(cuda: &CudaDevice, dtype: DType, bytes: usize) -> candle_core::Result<Self> {
        let n = bytes / dtype.size_in_bytes();
        // SAFETY: every byte is written by the restore before the tensors are used.
        unsafe {
            Ok(match dtype {
                DType::U8 => Self::U8(cuda.alloc(n)?),
                DType::U32 => Self::U32(cuda.alloc(n)?),
                DType::I64 => Self::I64(cuda.alloc(n)?),
                DType::F32 => Self::F32(cuda.alloc(n)?),
                DType::F64 => Self::F64(cuda.alloc(n)?),
                DType::BF16 => Self::BF16(cuda.alloc(n)?),
                DType::F16 => Self::F16(cuda.alloc(n)?),
                other => candle_core::bail!("snapshots cannot hold {other:?} tensors"),
            })
        }
    }
    fn into_tensor(self, cuda: &CudaDevice) -> Tensor {
        let storage = each_arena!(self, s => {
            let n = s.len();
            (CudaStorage::wrap_cuda_slice(s, cuda.clone()), n)
        });
        Tensor::from_storage(
            Storage::Cuda(storage.0),
            storage.1,
            BackpropOp::none(),
            false,
        )
    }
}

/// One chunk of one arena: what a reader thread takes next.
struct Job {
    arena: usize,
    chunk: usize,
    /// Offset in the arena, and length.
    start: u64,
    len: u64,
}

/// Where one piece of a chunk goes: its arena, its offset there, its offset in the file, and
/// its length.
#[derive(Clone, Copy)]
struct PieceAt {
    arena: usize,
    offset: u64,
    file: u64,
    len: usize,
}

/// The chunks still to restore, shared by the reader threads; empty for all of them once
/// one has failed.
struct JobQueue {
    jobs: Vec<Job>,
    next: AtomicUsize,
    failed: AtomicBool,
}

impl JobQueue {
    fn take(&self) -> Option<&Job> {
        if self.failed.load(Ordering::Relaxed) {
            return None;
        }
        self.jobs.get(self.next.fetch_add(1, Ordering::Relaxed))
    }
    fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }
    fn len(&self) -> usize {
        self.jobs.len()
    }
    fn largest_chunk(&self) -> usize {
        self.jobs.iter().map(|j| j.len as usize).max().unwrap_or(0)
    }
}

/// What both rings start from.
struct RingStart<'f> {
    started: Instant,
    /// The model's stream, and its context (bound to the restoring thread).
    stream: std::sync::Arc<CudaStream>,
    ctx: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
    /// The copies' own stream.
    copy_stream: std::sync::Arc<CudaStream>,
    jobs: JobQueue,
    threads: usize,
    /// Bytes per pinned buffer.
    piece: usize,
    /// The file for direct reads, where the pieces are whole blocks.
    direct: Option<&'f std::fs::File>,
}

impl Snapshot {
    fn ring_start<'f>(
        &self,
        cuda: &CudaDevice,
        direct: Option<&'f std::fs::File>,
    ) -> Result<RingStart<'f>, SnapshotError> {
        let started = Instant::now();
        let stream = cuda.cuda_stream();
        let ctx = stream.context().clone();
        ctx.bind_to_thread()
            .map_err(driver_err("cannot bind the CUDA context"))?;
        let copy_stream = ctx
            .new_stream()
            .map_err(driver_err("cannot create a copy stream"))?;
        let jobs = self.chunk_jobs();
        let threads = reader_threads(jobs.len());
        let piece = piece_bytes(&jobs);
        Ok(RingStart {
            started,
            stream,
            ctx,
            copy_stream,
            jobs,
            threads,
            piece,
            // Direct reads fill whole blocks: only with pieces of whole blocks.
            direct: direct.filter(|_| piece.is_multiple_of(crate::direct::DIRECT_ALIGN)),
        })
    }

    /// Every data chunk of every arena, in file order: the reader threads' work list.
    fn chunk_jobs(&self) -> JobQueue {
        let mut jobs = Vec::new();
        for (a, arena) in self.manifest.arenas.iter().enumerate() {
            for (c, _) in arena.chunk_checksums.iter().enumerate() {
                let start = c as u64 * arena.chunk_bytes;
                let len = arena.chunk_bytes.min(arena.bytes - start);
                jobs.push(Job {
                    arena: a,
                    chunk: c,
                    start,
                    len,
                });
            }
        }
        JobQueue {
            jobs,
            next: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
        }
    }

    /// The readers' loop, for both rings: takes chunks from `jobs` until none is left, and
    /// hands each piece of at most `piece` bytes to `each_piece`, which reads it, feeds what it
    /// read to the chunk's hasher and sends it on (`false`: stop quietly, another thread
    /// says why). Each chunk is checked once all its pieces are read; the first error stops
    /// every reader.
    fn read_chunks(
        &self,
        jobs: &JobQueue,
        piece: usize,
        mut each_piece: impl FnMut(PieceAt, &mut xxhash_rust::xxh3::Xxh3) -> Result<bool, SnapshotError>,
    ) -> Result<(), SnapshotError> {
        let outcome = (|| {
            while let Some(job) = jobs.take() {
                let arena = &self.manifest.arenas[job.arena];
                let file_base = self.data_offset + arena.offset + job.start;
                let mut hasher = xxhash_rust::xxh3::Xxh3::new();
                let mut done = 0u64;
                while done < job.len {
                    let len = (job.len - done).min(piece as u64) as usize;
                    let at = PieceAt {
                        arena: job.arena,
                        offset: job.start + done,
                        file: file_base + done,
                        len,
                    };
                    if !each_piece(at, &mut hasher)? {
                        return Ok(());
                    }
                    self.advance(len);
                    done += len as u64;
                }
                if hasher.digest() != arena.chunk_checksums[job.chunk] {
                    return Err(self.chunk_error(job.arena, job.chunk));
                }
            }
            Ok(())
        })();
        if outcome.is_err() {
            jobs.fail();
        }
        outcome
    }

    /// `direct`: the snapshot opened for direct reads (`O_DIRECT`), where the restore reads
    /// around the page cache (see [`crate::direct`]).
    pub(crate) fn restore_arenas_pinned(
        &self,
        cuda: &CudaDevice,
        direct: Option<&std::fs::File>,
    ) -> Result<Restored, SnapshotError> {
        if one_copier() {
            return self.restore_arenas_one_copier(cuda, direct);
        }
        let RingStart {
            started,
            stream,
            ctx,
            copy_stream,
            jobs,
            threads,
            piece,
            direct,
        } = self.ring_start(cuda, direct)?;
        // `RUNNER_RESTORE_ALLOC=first` allocates the arenas before the readers pin their
        // buffers, instead of alongside (both take the driver's locks).
        let alloc_first = std::env::var("RUNNER_RESTORE_ALLOC").is_ok_and(|v| v == "first");
        let pinned_alloc_nanos = AtomicUsize::new(0);
        // `RUNNER_RESTORE_MAPPED_THREADS=N` (unmeasured, off by default): N more threads take
        // chunks from the same queue through the mapped path (page-locked where they lie in
        // the page cache, no CPU copy), beside the ring, in case the two are held back by
        // different things.
        let mapped_threads = env_usize("RUNNER_RESTORE_MAPPED_THREADS").unwrap_or(0);
        let mapping = if mapped_threads > 0 {
            self.lockable_mapping()
        } else {
            None
        };
        let (lock_nanos, unlock_nanos) = (AtomicUsize::new(0), AtomicUsize::new(0));
        // The arenas' device addresses, once allocated; the reader threads pin their
        // buffers meanwhile (pinning costs about as much as the device allocation).
        let bases: OnceLock<Option<Vec<u64>>> = OnceLock::new();
        let mut device_alloc = Duration::ZERO;
        let (arenas, results) = std::thread::scope(|scope| {
            let mut allocate = || {
                let alloc_started = Instant::now();
                let allocated = self.alloc_arenas(cuda, &stream);
                device_alloc = alloc_started.elapsed();
                allocated
            };
            let allocated_first = alloc_first.then(&mut allocate);
            if let Some(Err(e)) = allocated_first {
                return (Err(e), Vec::new());
            }
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (jobs, bases, ctx, copy_stream, pinned_alloc_nanos) =
                        (&jobs, &bases, &ctx, &copy_stream, &pinned_alloc_nanos);
                    scope.spawn(move || -> Result<(), SnapshotError> {
                        ctx.bind_to_thread()
                            .map_err(driver_err("cannot bind the CUDA context"))?;
                        let alloc_started = Instant::now();
                        let mut ring = Vec::with_capacity(BUFFERS_PER_THREAD);
                        for _ in 0..BUFFERS_PER_THREAD {
                            let event = ctx
                                .new_event(None)
                                .map_err(driver_err("cannot create a CUDA event"))?;
                            ring.push((PinnedBuffer::new(piece)?, event));
                        }
                        pinned_alloc_nanos.fetch_max(
                            alloc_started.elapsed().as_nanos() as usize,
                            Ordering::Relaxed,
                        );
                        let mut turn = 0usize;
                        let outcome = self.read_chunks(jobs, piece, |at, hasher| {
                            let (buffer, event) = &mut ring[turn % BUFFERS_PER_THREAD];
                            turn += 1;
                            // The copy that last read this buffer must be finished.
                            event
                                .synchronize()
                                .map_err(driver_err("waiting for a copy"))?;
                            let bytes = self.read_piece(direct, buffer, at.len, at.file)?;
                            hasher.update(bytes);
                            // The first piece is read while the arenas are still being
                            // allocated; only the copy waits for them.
                            let Some(bases) = bases.wait() else {
                                return Ok(false); // the allocation failed; it says why
                            };
                            // SAFETY: the destination lies inside the arena's allocation
                            // (offsets validated when the snapshot was opened); the source
                            // stays pinned and untouched until the event recorded after the
                            // copy completes.
                            unsafe {
                                result::memcpy_htod_async(
                                    bases[at.arena] + at.offset,
                                    &*bytes,
                                    copy_stream.cu_stream(),
                                )
                            }
                            .map_err(driver_err("cannot copy to the GPU"))?;
                            event
                                .record(copy_stream)
                                .map_err(driver_err("cannot record a CUDA event"))?;
                            Ok(true)
                        });
                        // No buffer is freed while a copy may still read it.
                        for (_, event) in &ring {
                            let _ = event.synchronize();
                        }
                        outcome
                    })
                })
                .collect();

            let mut handles = handles;
            if let Some(mapping) = &mapping {
                handles.extend(self.spawn_mapped_readers(
                    scope,
                    mapped_threads,
                    (&jobs, &bases, &ctx, &copy_stream),
                    mapping,
                    (&lock_nanos, &unlock_nanos),
                ));
            }
            let allocated = allocated_first.unwrap_or_else(allocate);
            hand_over(allocated, &bases, &copy_stream, handles)
        });
        let (
            tensors,
            RingTimes {
                pipeline,
                read,
                total,
            },
        ) = self.finish_ring(cuda, started, &copy_stream, (), arenas, results)?;
        let sync = read - pipeline;
        tracing::debug!(
            target: "runner::setup",
            "cuda restore: {threads} reader threads x {BUFFERS_PER_THREAD} pinned buffers of {:.2} MiB ({}, {} reads), {} mapped threads (locking {:.1} ms, unlocking {:.1} ms); device alloc {:.1} ms ({}), pinned alloc (slowest thread) {:.1} ms, read + copy {:.1} ms, final sync {:.1} ms; total {:.1} ms",
            piece as f64 / (1u64 << 20) as f64,
            if pin_by_registering() { "registered" } else { "cuMemHostAlloc" },
            if direct.is_some() { "direct" } else { "page-cache" },
            if mapping.is_some() { mapped_threads } else { 0 },
            lock_nanos.into_inner() as f64 / 1e6,
            unlock_nanos.into_inner() as f64 / 1e6,
            device_alloc.as_secs_f64() * 1e3,
            if alloc_first { "first" } else { "alongside the pinning" },
            pinned_alloc_nanos.into_inner() as f64 / 1e6,
            pipeline.as_secs_f64() * 1e3,
            sync.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3
        );
        Ok((tensors, self.device_stats(read, total, direct.is_some())))
    }

    /// The `mapped` path ([`CudaRestorePath::Mapped`]): the file mapped read-only, each
    /// 16 MiB chunk page-locked where it lies in the page cache and copied to the GPU from
    /// there while a CPU thread checks it; the chunks are unlocked once their copies are
    /// done. The tensors are handed over only after every chunk checked out, so bad bytes
    /// never reach the model. Falls back to the ring when the driver cannot lock a
    /// read-only file mapping, or the chunks do not start on page boundaries.
    pub(crate) fn restore_arenas_registered(
        &self,
        cuda: &CudaDevice,
    ) -> Result<Restored, SnapshotError> {
        let started = Instant::now();
        let stream = cuda.cuda_stream();
        let ctx = stream.context().clone();
        ctx.bind_to_thread()
            .map_err(driver_err("cannot bind the CUDA context"))?;
        let Some(mapping) = self.lockable_mapping() else {
            return self.restore_arenas_pinned(cuda, None);
        };
        let copy_stream = ctx
            .new_stream()
            .map_err(driver_err("cannot create a copy stream"))?;

        let jobs = self.chunk_jobs();
        let threads = reader_threads(jobs.len());
        let lock_nanos = AtomicUsize::new(0);
        let unlock_nanos = AtomicUsize::new(0);
        let bases: OnceLock<Option<Vec<u64>>> = OnceLock::new();
        let mut device_alloc = Duration::ZERO;
        let (arenas, results) = std::thread::scope(|scope| {
            let handles = self.spawn_mapped_readers(
                scope,
                threads,
                (&jobs, &bases, &ctx, &copy_stream),
                &mapping,
                (&lock_nanos, &unlock_nanos),
            );

            let alloc_started = Instant::now();
            let allocated = self.alloc_arenas(cuda, &stream);
            device_alloc = alloc_started.elapsed();
            hand_over(allocated, &bases, &copy_stream, handles)
        });
        let (
            tensors,
            RingTimes {
                pipeline,
                read,
                total,
            },
        ) = self.finish_ring(cuda, started, &copy_stream, mapping, arenas, results)?;
        tracing::debug!(
            target: "runner::setup",
            "cuda restore (mapped): {threads} threads locking {} chunks of the mapped file; device alloc {:.1} ms, locking {:.1} ms and unlocking {:.1} ms (all threads together), lock + copy + check {:.1} ms; total {:.1} ms",
            jobs.len(),
            device_alloc.as_secs_f64() * 1e3,
            lock_nanos.into_inner() as f64 / 1e6,
            unlock_nanos.into_inner() as f64 / 1e6,
            pipeline.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3
        );
        Ok((tensors, self.device_stats(read, total, false)))
    }

    /// The snapshot file mapped read-only, where this driver can page-lock it chunk by chunk
    /// (the chunks start on page boundaries, and one locked page says the driver allows
    /// it); `None`, with the reason logged, otherwise.
    fn lockable_mapping(&self) -> Option<ReadOnlyMapping> {
        let page = super::page_size() as u64;
        let aligned = self.manifest.arenas.iter().all(|a| {
            (self.data_offset + a.offset).is_multiple_of(page) && a.chunk_bytes.is_multiple_of(page)
        });
        let file_len = self.data_offset + self.header.data_bytes;
        if !aligned || self.header.data_bytes == 0 {
            tracing::debug!(
                "cuda restore: the chunks are not page-aligned; not locking the mapped file"
            );
            return None;
        }
        let mapping = match ReadOnlyMapping::new(&self.file, file_len as usize) {
            Ok(mapping) => mapping,
            Err(e) => {
                tracing::debug!("cuda restore: cannot map the snapshot ({e})");
                return None;
            }
        };
        let probe = mapping.range(
            self.data_offset as usize,
            page.min(self.header.data_bytes) as usize,
        );
        if let Err(e) = register_read_only(probe) {
            tracing::debug!("cuda restore: cannot page-lock the mapped snapshot ({e})");
            return None;
        }
        unregister(probe);
        Some(mapping)
    }

    /// Starts `n` threads of the mapped path ([`Self::mapped_reader`]) in `scope`, sharing
    /// the reader threads' queue, arena addresses, context and copy stream.
    fn spawn_mapped_readers<'scope, 'env: 'scope>(
        &'env self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        n: usize,
        (jobs, bases, ctx, copy_stream): (
            &'env JobQueue,
            &'env OnceLock<Option<Vec<u64>>>,
            &'env std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
            &'env CudaStream,
        ),
        mapping: &'env ReadOnlyMapping,
        (lock_nanos, unlock_nanos): (&'env AtomicUsize, &'env AtomicUsize),
    ) -> Vec<std::thread::ScopedJoinHandle<'scope, Result<(), SnapshotError>>> {
        (0..n)
            .map(|_| {
                scope.spawn(move || {
                    self.mapped_reader(
                        jobs,
                        bases,
                        ctx,
                        copy_stream,
                        mapping,
                        lock_nanos,
                        unlock_nanos,
                    )
                })
            })
            .collect()
    }

    /// One thread of the mapped path: takes chunks from `jobs`, page-locks each where it
    /// lies in the mapped file, copies it to its arena on `copy_stream`, and checks it
    /// while the GPU reads the same pages; unlocks every chunk once its copy is done.
    #[allow(clippy::too_many_arguments)]
    fn mapped_reader(
        &self,
        jobs: &JobQueue,
        bases: &OnceLock<Option<Vec<u64>>>,
        ctx: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
        copy_stream: &CudaStream,
        mapping: &ReadOnlyMapping,
        lock_nanos: &AtomicUsize,
        unlock_nanos: &AtomicUsize,
    ) -> Result<(), SnapshotError> {
        ctx.bind_to_thread()
            .map_err(driver_err("cannot bind the CUDA context"))?;
        // Chunks locked by this thread, with the event after their copy.
        let mut locked = Vec::new();
        let outcome = (|| loop {
            let Some(job) = jobs.take() else {
                return Ok(());
            };
            let arena = &self.manifest.arenas[job.arena];
            let at = (self.data_offset + arena.offset + job.start) as usize;
            let bytes = mapping.range(at, job.len as usize);
            let lock_started = Instant::now();
            register_read_only(bytes)
                .map_err(driver_err("cannot page-lock the mapped snapshot"))?;
            lock_nanos.fetch_add(
                lock_started.elapsed().as_nanos() as usize,
                Ordering::Relaxed,
            );
            let event = ctx.new_event(None);
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    unregister(bytes);
                    return Err(driver_err("cannot create a CUDA event")(e));
                }
            };
            locked.push((bytes, event));
            let Some(bases) = bases.wait() else {
                return Ok(()); // the allocation failed; it says why
            };
            // SAFETY: the destination lies inside the arena's allocation
            // (offsets validated when the snapshot was opened); the source
            // stays mapped and locked until the event after the copy is
            // waited for below.
            unsafe {
                result::memcpy_htod_async(
                    bases[job.arena] + job.start,
                    bytes,
                    copy_stream.cu_stream(),
                )
            }
            .map_err(driver_err("cannot copy to the GPU"))?;
            let (_, event) = locked.last().expect("just pushed");
            if let Err(e) = event.record(copy_stream) {
                // Without the event, only the stream says when the copy
                // has read the locked pages.
                let _ = copy_stream.synchronize();
                return Err(driver_err("cannot record a CUDA event")(e));
            }
            // Checked while the GPU copies the same pages.
            if xxhash_rust::xxh3::xxh3_64(bytes) != arena.chunk_checksums[job.chunk] {
                return Err(self.chunk_error(job.arena, job.chunk));
            }
            self.advance(bytes.len());
        })();
        if outcome.is_err() {
            jobs.fail();
        }
        // No chunk is unlocked while a copy may still read it.
        let unlock_started = Instant::now();
        for (bytes, event) in locked {
            let _ = event.synchronize();
            unregister(bytes);
        }
        unlock_nanos.fetch_add(
            unlock_started.elapsed().as_nanos() as usize,
            Ordering::Relaxed,
        );
        outcome
    }

    /// The end of every ring: waits for the last copies, then frees `sources` (what the
    /// copies read from), checks every reader's result and makes the tensors.
    fn finish_ring<Sources>(
        &self,
        cuda: &CudaDevice,
        started: Instant,
        copy_stream: &CudaStream,
        sources: Sources,
        arenas: Result<Vec<DeviceArena>, SnapshotError>,
        results: ReaderResults,
    ) -> Result<(Vec<(String, Tensor)>, RingTimes), SnapshotError> {
        let pipeline = started.elapsed();
        copy_stream
            .synchronize()
            .map_err(driver_err("cannot synchronize the copy stream"))?;
        drop(sources);
        let read = started.elapsed();
        let tensors = self.checked_views(cuda, arenas, results)?;
        let total = started.elapsed();
        Ok((
            tensors,
            RingTimes {
                pipeline,
                read,
                total,
            },
        ))
    }

    /// The restored tensors (views into the arenas), once every reader thread succeeded:
    /// the first error otherwise, and the arenas are freed.
    fn checked_views(
        &self,
        cuda: &CudaDevice,
        arenas: Result<Vec<DeviceArena>, SnapshotError>,
        results: ReaderResults,
    ) -> Result<Vec<(String, Tensor)>, SnapshotError> {
        let arenas = arenas?;
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        let arenas: Vec<Tensor> = arenas.into_iter().map(|a| a.into_tensor(cuda)).collect();
        self.views(&arenas)
    }

    fn device_stats(&self, read: Duration, total: Duration, direct: bool) -> RestoreStats {
        RestoreStats {
            data_bytes: self.header.data_bytes,
            read,
            upload: total - read,
            total,
            direct,
            resident: None,
        }
    }

    /// Reads `len` bytes at `at` into a ring buffer ([`Self::read_into`]).
    fn read_piece<'b>(
        &self,
        direct: Option<&std::fs::File>,
        buffer: &'b mut PinnedBuffer,
        len: usize,
        at: u64,
    ) -> Result<&'b mut [u8], SnapshotError> {
        let whole = buffer.len;
        self.read_into(direct, buffer.bytes_mut(whole), len, at)
    }

    /// One device allocation per arena, through the model's own device.
    fn alloc_arenas(
        &self,
        cuda: &CudaDevice,
        stream: &CudaStream,
    ) -> Result<Vec<DeviceArena>, SnapshotError> {
        let mut arenas = Vec::with_capacity(self.manifest.arenas.len());
        for arena in &self.manifest.arenas {
            let dtype = parse_dtype(&arena.dtype).expect("validated");
            arenas.push(
                DeviceArena::alloc(cuda, dtype, arena.bytes as usize).map_err(|e| {
                    SnapshotError::Tensor {
                        name: format!("arena {}", arena.dtype),
                        message: format!("cannot allocate {} bytes on the GPU: {e}", arena.bytes),
                    }
                })?,
            );
        }
        // The allocations may be stream-ordered on candle's stream: finish them before
        // another stream writes into them.
        stream
            .synchronize()
            .map_err(driver_err("cannot synchronize the device"))?;
        Ok(arenas)
    }
}

/// `RUNNER_RESTORE_COPIER=one` (unmeasured, off by default): the ring with a single thread
/// talking to the driver. On an H200 (2026-11-30) reading the page cache into pageable
/// buffers scaled to 37.5 GB/s on 8 threads, but the same reads feeding H2D copies topped
/// out at 16–18 GB/s, in runner (8 readers sharing one copy stream) and in PyTorch (a
/// stream per reader) alike, and fell with 16 threads; one suspect is the readers
/// contending for the driver (a copy, an event record and an event wait per piece, from
/// every reader). Here the readers only read and check; they hand each filled buffer to
/// the restoring thread, which issues every copy and event and hands buffers back as their
/// copies finish.
fn one_copier() -> bool {
    std::env::var("RUNNER_RESTORE_COPIER").is_ok_and(|v| v == "one")
}

/// Pinned buffers per reader thread on the one-copier path (`RUNNER_RESTORE_BUFFERS`
/// overrides the total): each reader pins one block and cuts it into these.
const COPIER_BUFFERS_PER_THREAD: usize = 4;

/// A piece of a pinned block: what travels between the readers and the copier.
struct PinnedPiece {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a slice of a pinned block that outlives every piece (the blocks are freed after
// the readers and the copier are done); one thread uses a piece at a time.
unsafe impl Send for PinnedPiece {}

impl PinnedPiece {
    fn bytes(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: `ptr` points at `self.len` bytes of a live block; len is clamped.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len.min(self.len)) }
    }
}

/// The pieces no copy is reading: readers take them, the copier gives them back.
struct FreePieces {
    free: std::sync::Mutex<(Vec<PinnedPiece>, bool)>,
    returned: std::sync::Condvar,
}

impl FreePieces {
    fn new() -> Self {
        Self {
            free: std::sync::Mutex::new((Vec::new(), false)),
            returned: std::sync::Condvar::new(),
        }
    }
    /// A free piece; `None` once closed (the restore stopped).
    fn take(&self) -> Option<PinnedPiece> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if free.1 {
                return None;
            }
            if let Some(piece) = free.0.pop() {
                return Some(piece);
            }
            free = self.returned.wait(free).unwrap_or_else(|e| e.into_inner());
        }
    }
    fn give(&self, piece: PinnedPiece) {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .push(piece);
        self.returned.notify_one();
    }
    fn close(&self) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.returned.notify_all();
    }
}

/// A filled piece on its way to the GPU.
struct Filled {
    piece: PinnedPiece,
    at: PieceAt,
}

impl Snapshot {
    /// The one-copier ring ([`one_copier`]): reader threads read and check pieces into
    /// pinned buffers and send them here; this thread copies each to its arena on a
    /// stream of its own, records an event after it, and returns the buffer to the readers
    /// once the event has passed. Same checks and hand-over as the ring.
    fn restore_arenas_one_copier(
        &self,
        cuda: &CudaDevice,
        direct: Option<&std::fs::File>,
    ) -> Result<Restored, SnapshotError> {
        use std::sync::mpsc;
        let RingStart {
            started,
            stream,
            ctx,
            copy_stream,
            jobs,
            threads,
            piece,
            direct,
        } = self.ring_start(cuda, direct)?;
        let per_thread = env_usize("RUNNER_RESTORE_BUFFERS")
            .map(|total| total.div_ceil(threads))
            .unwrap_or(COPIER_BUFFERS_PER_THREAD);
        let free = FreePieces::new();
        // The readers' pinned blocks, freed when everything below has finished.
        let blocks = std::sync::Mutex::new(Vec::with_capacity(threads));
        let pinned_alloc_nanos = AtomicUsize::new(0);
        let (filled_tx, filled_rx) = mpsc::channel::<Filled>();
        let mut device_alloc = Duration::ZERO;
        let mut waits = 0usize;
        let (arenas, results) = std::thread::scope(|scope| {
            let readers: Vec<_> = (0..threads)
                .map(|_| {
                    let (jobs, free, blocks, filled_tx, ctx) =
                        (&jobs, &free, &blocks, filled_tx.clone(), &ctx);
                    let pinned_alloc_nanos = &pinned_alloc_nanos;
                    scope.spawn(move || -> Result<(), SnapshotError> {
                        ctx.bind_to_thread()
                            .map_err(driver_err("cannot bind the CUDA context"))?;
                        let alloc_started = Instant::now();
                        let block = PinnedBuffer::new(piece * per_thread);
                        pinned_alloc_nanos.fetch_max(
                            alloc_started.elapsed().as_nanos() as usize,
                            Ordering::Relaxed,
                        );
                        let block = match block {
                            Ok(block) => block,
                            Err(e) => {
                                jobs.fail();
                                return Err(e);
                            }
                        };
                        for i in 0..per_thread {
                            free.give(PinnedPiece {
                                // SAFETY: inside the block of piece * per_thread bytes.
                                ptr: unsafe { block.ptr.add(i * piece) },
                                len: piece,
                            });
                        }
                        blocks.lock().unwrap_or_else(|e| e.into_inner()).push(block);
                        // A `false` stops the reader quietly: the copier stopped, and says why.
                        self.read_chunks(jobs, piece, |at, hasher| {
                            let Some(mut buffer) = free.take() else {
                                return Ok(false);
                            };
                            // The whole piece as room: a direct read fills whole blocks.
                            let read =
                                self.read_into(direct, buffer.bytes(piece), at.len, at.file)?;
                            hasher.update(read);
                            Ok(filled_tx.send(Filled { piece: buffer, at }).is_ok())
                        })
                    })
                })
                .collect();
            drop(filled_tx);

            let alloc_started = Instant::now();
            let allocated = self.alloc_arenas(cuda, &stream);
            device_alloc = alloc_started.elapsed();
            let mut arenas = match allocated {
                Ok(arenas) => arenas,
                Err(e) => {
                    free.close();
                    drop(filled_rx);
                    jobs.fail();
                    for reader in readers {
                        let _ = reader.join();
                    }
                    return (Err(e), Vec::new());
                }
            };
            let mut guards = Vec::with_capacity(arenas.len());
            let mut bases = Vec::with_capacity(arenas.len());
            for a in arenas.iter_mut() {
                let (ptr, guard) = each_arena!(a, s => s.device_ptr_mut(&copy_stream));
                bases.push(ptr);
                guards.push(guard);
            }
            let copied =
                self.copy_filled(&ctx, &copy_stream, &bases, &filled_rx, &free, &mut waits);
            if copied.is_err() {
                jobs.fail();
            }
            // Readers waiting for a buffer or sending one stop now.
            free.close();
            drop(filled_rx);
            let mut results: ReaderResults = readers
                .into_iter()
                .map(|h| h.join().expect("a snapshot reader thread panicked"))
                .collect();
            if let Err(e) = copied {
                results.insert(0, Err(e));
            }
            drop(guards);
            (Ok(arenas), results)
        });
        let (
            tensors,
            RingTimes {
                pipeline,
                read,
                total,
            },
        ) = self.finish_ring(cuda, started, &copy_stream, blocks, arenas, results)?;
        tracing::debug!(
            target: "runner::setup",
            "cuda restore (one copier): {threads} reader threads x {per_thread} pinned buffers of {:.2} MiB ({} reads); device alloc {:.1} ms, pinned alloc (slowest thread) {:.1} ms, the copier waited for a copy {waits} times, read + copy {:.1} ms; total {:.1} ms",
            piece as f64 / (1u64 << 20) as f64,
            if direct.is_some() { "direct" } else { "page-cache" },
            device_alloc.as_secs_f64() * 1e3,
            pinned_alloc_nanos.into_inner() as f64 / 1e6,
            pipeline.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3
        );
        Ok((tensors, self.device_stats(read, total, direct.is_some())))
    }

    /// The copier's loop: copies each filled piece to its arena, and gives pieces back as
    /// their copies finish (waiting for the oldest copy only when no piece is waiting to be
    /// copied). Returns once every reader has hung up and every copy has finished.
    fn copy_filled(
        &self,
        ctx: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
        copy_stream: &CudaStream,
        bases: &[u64],
        filled: &std::sync::mpsc::Receiver<Filled>,
        free: &FreePieces,
        waits: &mut usize,
    ) -> Result<(), SnapshotError> {
        use std::sync::mpsc::TryRecvError;
        let mut in_flight = std::collections::VecDeque::new();
        let mut spare_events = Vec::new();
        let outcome = (|| loop {
            while let Some((_, event)) = in_flight.front() {
                if !copy_finished(event)? {
                    break;
                }
                let (piece, event) = in_flight.pop_front().expect("a front");
                free.give(piece);
                spare_events.push(event);
            }
            let next = match filled.try_recv() {
                Ok(next) => next,
                Err(TryRecvError::Empty) => {
                    if let Some((piece, event)) = in_flight.pop_front() {
                        event
                            .synchronize()
                            .map_err(driver_err("waiting for a copy"))?;
                        *waits += 1;
                        free.give(piece);
                        spare_events.push(event);
                        continue;
                    }
                    match filled.recv() {
                        Ok(next) => next,
                        Err(_) => return Ok(()),
                    }
                }
                Err(TryRecvError::Disconnected) => return Ok(()),
            };
            let Filled { mut piece, at } = next;
            // SAFETY: the destination lies inside the arena's allocation (offsets validated
            // when the snapshot was opened); the piece stays pinned and untouched until the
            // event recorded after the copy has passed.
            unsafe {
                result::memcpy_htod_async(
                    bases[at.arena] + at.offset,
                    &*piece.bytes(at.len),
                    copy_stream.cu_stream(),
                )
            }
            .map_err(driver_err("cannot copy to the GPU"))?;
            let event = match spare_events.pop() {
                Some(event) => event,
                None => ctx
                    .new_event(None)
                    .map_err(driver_err("cannot create a CUDA event"))?,
            };
            event
                .record(copy_stream)
                .map_err(driver_err("cannot record a CUDA event"))?;
            in_flight.push_back((piece, event));
        })();
        // No piece goes back (or its block is freed) while a copy may still read it.
        for (piece, event) in in_flight {
            if event.synchronize().is_ok() {
                free.give(piece);
            }
        }
        outcome
    }

    /// Reads `len` bytes at `at` into `room` (a pinned piece): directly where `direct` is
    /// given (a piece the kernel turns down is read through the page cache instead), else
    /// through the page cache (into ordinary memory first with [`bounce`]).
    fn read_into<'b>(
        &self,
        direct: Option<&std::fs::File>,
        room: &'b mut [u8],
        len: usize,
        at: u64,
    ) -> Result<&'b mut [u8], SnapshotError> {
        let failed = io(&self.path, "cannot read the snapshot's data");
        if let Some(file) = direct {
            let whole = len
                .next_multiple_of(crate::direct::DIRECT_ALIGN)
                .min(room.len());
            match crate::direct::read_direct(file, &mut room[..whole], len, at) {
                Ok(()) => return Ok(&mut room[..len]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::InvalidInput
                        || e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(failed(e)),
            }
        }
        if bounce() {
            STAGING.with(|staging| {
                let mut staging = staging.borrow_mut();
                if staging.len() < len {
                    staging.resize(len, 0);
                }
                self.file
                    .read_exact_at(&mut staging[..len], at)
                    .map_err(failed)?;
                room[..len].copy_from_slice(&staging[..len]);
                Ok::<(), SnapshotError>(())
            })?;
            return Ok(&mut room[..len]);
        }
        self.file
            .read_exact_at(&mut room[..len], at)
            .map_err(failed)?;
        Ok(&mut room[..len])
    }
}

/// `RUNNER_RESTORE_BOUNCE=on` (unmeasured, off by default): the ring's readers read each
/// piece through the page cache into ordinary memory and copy it into the pinned buffer
/// themselves. On the H200 (gVisor, 2026-11-30) 8 threads read the page cache at 37.5 GB/s
/// into ordinary buffers but the pinned pipeline ran at 16 GB/s: if the kernel is what is
/// slow at filling pinned pages, a copy by the reader (memory bandwidth) gets round it.
/// `read_ceiling.py`'s column (e) measures the same in PyTorch.
fn bounce() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("RUNNER_RESTORE_BOUNCE").is_ok_and(|v| v == "on"))
}

thread_local! {
    /// A reader thread's ordinary buffer for [`bounce`]: one piece, reused.
    static STAGING: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether the copy before `event` has finished, without waiting.
fn copy_finished(
    event: &candle_core::cuda_backend::cudarc::driver::CudaEvent,
) -> Result<bool, SnapshotError> {
    event
        .try_is_complete()
        .map_err(driver_err("asking whether a copy finished"))
}

/// How long a ring took: reading and copying (until the last copy was issued), until the
/// last copy finished, and in all.
struct RingTimes {
    pipeline: Duration,
    read: Duration,
    total: Duration,
}

/// What the reader threads report, one result each.
type ReaderResults = Vec<Result<(), SnapshotError>>;

/// Gives the reader threads the arenas' device addresses once they are allocated (or tells
/// them the allocation failed), and waits for them; the arenas are not touched by the host
/// meanwhile.
fn hand_over(
    allocated: Result<Vec<DeviceArena>, SnapshotError>,
    bases: &OnceLock<Option<Vec<u64>>>,
    copy_stream: &CudaStream,
    readers: Vec<std::thread::ScopedJoinHandle<'_, Result<(), SnapshotError>>>,
) -> (Result<Vec<DeviceArena>, SnapshotError>, ReaderResults) {
    let mut arenas = match allocated {
        Ok(arenas) => arenas,
        Err(e) => {
            let _ = bases.set(None);
            for h in readers {
                let _ = h.join();
            }
            return (Err(e), Vec::new());
        }
    };
    let mut guards = Vec::with_capacity(arenas.len());
    let mut pointers = Vec::with_capacity(arenas.len());
    for a in arenas.iter_mut() {
        let (ptr, guard) = each_arena!(a, s => s.device_ptr_mut(copy_stream));
        pointers.push(ptr);
        guards.push(guard);
    }
    let _ = bases.set(Some(pointers));
    let results = readers
        .into_iter()
        .map(|h| h.join().expect("a snapshot reader thread panicked"))
        .collect();
    drop(guards);
    (Ok(arenas), results)
}

/// Bytes per pinned buffer: [`PIECE_BYTES`] (`RUNNER_RESTORE_PIECE_KIB` or `_MIB`), at most
/// the largest chunk.
fn piece_bytes(jobs: &JobQueue) -> usize {
    env_usize("RUNNER_RESTORE_PIECE_KIB")
        .map(|k| k << 10)
        .or_else(|| env_usize("RUNNER_RESTORE_PIECE_MIB").map(|m| m << 20))
        .unwrap_or(PIECE_BYTES)
        .min(jobs.largest_chunk().max(1))
}

/// Reader threads for `jobs` chunks: the cores, at most [`MAX_THREADS`]
/// (`RUNNER_RESTORE_THREADS` overrides).
fn reader_threads(jobs: usize) -> usize {
    env_usize("RUNNER_RESTORE_THREADS")
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(MAX_THREADS)
        })
        .min(jobs.max(1))
}

/// The whole snapshot file mapped read-only and shared: its pages are the page cache's.
struct ReadOnlyMapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a read-only mapping; the threads only read it.
unsafe impl Sync for ReadOnlyMapping {}

impl ReadOnlyMapping {
    fn new(file: &std::fs::File, len: usize) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared read-only mapping of `len` bytes of an open file; the
        // snapshot's length was checked against the file when it was opened.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr as *mut u8,
            len,
        })
    }

    fn range(&self, at: usize, len: usize) -> &[u8] {
        assert!(at.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: inside the live mapping (asserted); nothing writes to it.
        unsafe { std::slice::from_raw_parts(self.ptr.add(at), len) }
    }
}

impl Drop for ReadOnlyMapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `new`; every registration of it was undone before the drop.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Page-locks host memory the GPU will only read (`CU_MEMHOSTREGISTER_READ_ONLY`, which a
/// read-only file mapping needs).
fn register_read_only(bytes: &[u8]) -> Result<(), result::DriverError> {
    // SAFETY: `bytes` is live mapped memory; it is unregistered before it is unmapped.
    let status = unsafe {
        sys::cuMemHostRegister_v2(
            bytes.as_ptr() as *mut std::ffi::c_void,
            bytes.len(),
            sys::CU_MEMHOSTREGISTER_READ_ONLY,
        )
    };
    match status {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        other => Err(result::DriverError(other)),
    }
}

fn unregister(bytes: &[u8]) {
    // SAFETY: registered by `register_read_only`; no copy from it is still in flight.
    let _ = unsafe { sys::cuMemHostUnregister(bytes.as_ptr() as *mut std::ffi::c_void) };
}

/// Pinned host-to-device copy bandwidth of `cuda`'s GPU, in bytes per second: the ceiling
/// for a restore (256 MiB copied four times on a stream of its own, after one warm-up copy).
pub(crate) fn pinned_h2d_bandwidth(cuda: &CudaDevice) -> Result<f64, SnapshotError> {
    const BYTES: usize = 256 << 20;
    const COPIES: usize = 4;
    let ctx = cuda.cuda_stream().context().clone();
    ctx.bind_to_thread()
        .map_err(driver_err("cannot bind the CUDA context"))?;
    let stream = ctx
        .new_stream()
        .map_err(driver_err("cannot create a copy stream"))?;
    let mut host = PinnedBuffer::new(BYTES)?;
    host.bytes_mut(BYTES).fill(1);
    // SAFETY: the copies below write every byte before anything reads it.
    let mut device =
        unsafe { stream.alloc::<u8>(BYTES) }.map_err(driver_err("cannot allocate GPU memory"))?;
    let (dst, guard) = device.device_ptr_mut(&stream);
    let copy = |host: &mut PinnedBuffer| {
        // SAFETY: both buffers hold BYTES bytes; the host buffer outlives the copies (the
        // stream is synchronized before it is dropped).
        unsafe { result::memcpy_htod_async(dst, &*host.bytes_mut(BYTES), stream.cu_stream()) }
            .map_err(driver_err("cannot copy to the GPU"))
    };
    copy(&mut host)?;
    stream
        .synchronize()
        .map_err(driver_err("cannot synchronize"))?;
    let started = Instant::now();
    for _ in 0..COPIES {
        copy(&mut host)?;
    }
    stream
        .synchronize()
        .map_err(driver_err("cannot synchronize"))?;
    let seconds = started.elapsed().as_secs_f64();
    drop(guard);
    Ok((BYTES * COPIES) as f64 / seconds.max(1e-9))
}
