//! The consumer side of the `EVENTS` ring buffer, on the kernel's ABI (the layout
//! libbpf's `ring_buffer__consume` reads).
//!
//! Hand-written rather than aya 0.13's `RingBuf`: that one starts with its cached
//! producer position at 0, so on a ring buffer that is pinned and reopened by a new
//! agent process (consumer position no longer 0) it reads records that were never
//! written and, finding zero-length ones, loops without end while holding the datapath
//! (seen as an agent that logs "ready" and then never answers again; aya 0.14 fixed
//! it, but the loader is matched with aya 0.13, see the datapath recipe). This one
//! reads both positions from the shared pages on every drain.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Set in a record's length word while the producer still writes it.
const BUSY_BIT: u32 = 1 << 31;
/// Set in a record's length word when the producer discarded it.
const DISCARD_BIT: u32 = 1 << 30;
/// A record's header: the length word and the page offset word.
const HEADER: u64 = 8;

/// A shared memory mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<libc::c_void>,
    len: usize,
}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize, prot: i32, offset: usize) -> io::Result<Mapping> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mmap offset too large"))?;
        // SAFETY: a fresh shared mapping of the ring buffer map's fd at a kernel-chosen
        // address; the kernel checks length, offset and protection for this map type.
        #[allow(unsafe_code)]
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(ptr)
            .map(|ptr| Mapping { ptr, len })
            .ok_or_else(|| io::Error::other("mmap returned null"))
    }

    /// The 8-byte word at `offset` as an atomic.
    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset + 8 <= self.len && offset.is_multiple_of(8));
        // SAFETY: in bounds and 8-byte aligned (page-aligned mapping, callers pass
        // multiples of 8 below `len`); the kernel updates these words atomically.
        #[allow(unsafe_code)]
        unsafe {
            &*(self
                .ptr
                .as_ptr()
                .cast::<u8>()
                .add(offset)
                .cast::<AtomicU64>())
        }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset + 4 <= self.len && offset.is_multiple_of(4));
        // SAFETY: in bounds and 4-byte aligned (record headers are 8-byte aligned).
        #[allow(unsafe_code)]
        unsafe {
            &*(self
                .ptr
                .as_ptr()
                .cast::<u8>()
                .add(offset)
                .cast::<AtomicU32>())
        }
    }

    fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        debug_assert!(offset + len <= self.len);
        // SAFETY: in bounds of the mapping; a committed record is not written again
        // until the consumer position passes it.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>().add(offset), len)
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value owns; nothing borrows it anymore.
        #[allow(unsafe_code)]
        unsafe {
            libc::munmap(self.ptr.as_ptr(), self.len);
        }
    }
}

// SAFETY: the mapping is plain shared memory accessed through atomics and read-only
// slices; the owner (`Datapath`) serialises consumers behind `&mut self`.
#[allow(unsafe_code)]
unsafe impl Send for Mapping {}
#[allow(unsafe_code)]
unsafe impl Sync for Mapping {}

/// A consumer of a `BPF_MAP_TYPE_RINGBUF` map.
pub struct EventRing {
    /// The consumer page (read-write): the consumer position at offset 0.
    consumer: Mapping,
    /// The producer page, then the data pages mapped twice (read-only): the producer
    /// position at offset 0, records from `page`.
    producer: Mapping,
    page: usize,
    mask: u64,
}

impl EventRing {
    /// Maps the ring buffer of `fd`, whose data area is `size` bytes (a power of two,
    /// a multiple of the page size: the map's `max_entries`).
    pub fn new(fd: BorrowedFd<'_>, size: u32) -> io::Result<EventRing> {
        // SAFETY: sysconf has no preconditions.
        #[allow(unsafe_code)]
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = usize::try_from(page).map_err(|_| io::Error::last_os_error())?;
        let size = size as usize;
        if !size.is_power_of_two() || !size.is_multiple_of(page) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ring buffer size {size} is not a power-of-two multiple of {page}"),
            ));
        }
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + 2 * size, libc::PROT_READ, page)?;
        Ok(EventRing {
            consumer,
            producer,
            page,
            mask: size as u64 - 1,
        })
    }

    /// Hands every committed record to `f`, oldest first, and releases their space.
    /// Stops at a record the producer is still writing. Returns how many were read.
    pub fn drain(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let consumer_pos = self.consumer.u64_at(0);
        let mut cons = consumer_pos.load(Ordering::Acquire);
        let prod = self.producer.u64_at(0).load(Ordering::Acquire);
        let mut read = 0;
        while cons < prod {
            let at = self.page + (cons & self.mask) as usize;
            let header = self.producer.u32_at(at).load(Ordering::Acquire);
            if header & BUSY_BIT != 0 {
                break;
            }
            let len = header & !(BUSY_BIT | DISCARD_BIT);
            if u64::from(len) + HEADER > self.mask + 1 {
                // Not a record the kernel writes; stop rather than read out of bounds.
                break;
            }
            if header & DISCARD_BIT == 0 {
                // The data pages are mapped twice, so a record that wraps is contiguous.
                f(self.producer.bytes(at + HEADER as usize, len as usize));
                read += 1;
            }
            cons += (u64::from(len) + HEADER + 7) & !7;
            consumer_pos.store(cons, Ordering::Release);
        }
        read
    }
}
