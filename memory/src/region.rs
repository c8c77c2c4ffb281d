//! Guest RAM as one anonymous mapping (vm-memory), with a bitmap of the pages the host itself
//! wrote: KVM's dirty log only sees the guest's own writes, so writes made by the engine or the
//! VMM are tracked here, as Cloud Hypervisor does.

use crate::page::{PageSet, PAGE_SIZE};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestRegionMmap, MemoryRegionAddress};

/// Guest RAM could not be mapped or accessed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap failed.
    #[error("cannot map {bytes} bytes of guest memory: {detail}")]
    Map {
        /// The size asked for.
        bytes: u64,
        /// Why.
        detail: String,
    },
    /// A page number beyond the guest's memory.
    #[error("page {page} is beyond guest memory ({pages} pages)")]
    OutOfRange {
        /// The page.
        page: u64,
        /// Pages in the guest.
        pages: usize,
    },
}

/// A guest's RAM, mapped at guest-physical address 0.
pub struct Memory {
    region: GuestRegionMmap<AtomicBitmap>,
}

impl Memory {
    /// Maps `bytes` of zeroed memory (lazily allocated).
    pub fn new(bytes: u64) -> Result<Self, MemoryError> {
        let region =
            GuestRegionMmap::from_range(GuestAddress(0), bytes as usize, None).map_err(|e| {
                MemoryError::Map {
                    bytes,
                    detail: e.to_string(),
                }
            })?;
        Ok(Memory { region })
    }

    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.region.size() as u64
    }

    /// Size in pages.
    pub fn pages(&self) -> usize {
        self.region.size() / PAGE_SIZE
    }

    /// Host address of the mapping's first byte (for KVM memslots and userfaultfd).
    pub fn host_addr(&self) -> u64 {
        self.region.as_ptr() as u64
    }

    fn check(&self, page: u64) -> Result<MemoryRegionAddress, MemoryError> {
        if page as usize >= self.pages() {
            return Err(MemoryError::OutOfRange {
                page,
                pages: self.pages(),
            });
        }
        Ok(MemoryRegionAddress(page * PAGE_SIZE as u64))
    }

    /// Copies a page out. The guest may be writing it at the same time; vm-memory's volatile
    /// copy makes that well-defined, and the dirty log catches the write for the next round.
    pub fn read_page(&self, page: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let at = self.check(page)?;
        // Invariant: `check` proved the page lies inside the region and buf is one page.
        self.region
            .read_slice(&mut buf[..PAGE_SIZE], at)
            .expect("page inside the region");
        Ok(())
    }

    /// Writes a page as the host (tracked in the host-write bitmap).
    pub fn write_page(&self, page: u64, data: &[u8]) -> Result<(), MemoryError> {
        let at = self.check(page)?;
        // Invariant: as in read_page.
        self.region
            .write_slice(&data[..PAGE_SIZE], at)
            .expect("page inside the region");
        Ok(())
    }

    /// Reads a `u64` at a guest-physical address below the end of memory.
    pub fn read_u64(&self, addr: u64) -> u64 {
        self.region
            .read_obj(MemoryRegionAddress(addr))
            .unwrap_or_default()
    }

    /// Writes a `u64` as the host (tracked).
    pub fn write_u64(&self, addr: u64, value: u64) {
        // Out-of-range writes are a programming error in the caller; they are dropped.
        let _ = self.region.write_obj(value, MemoryRegionAddress(addr));
    }

    /// Writes bytes as the host (tracked).
    pub fn write_bytes(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.region
            .write_slice(data, MemoryRegionAddress(addr))
            .map_err(|_| MemoryError::OutOfRange {
                page: addr / PAGE_SIZE as u64,
                pages: self.pages(),
            })
    }

    /// Takes and clears the set of pages the host wrote.
    pub fn take_host_writes(&self) -> PageSet {
        PageSet::from_words(self.region.bitmap().get_and_reset(), self.pages())
    }
}

/// Whether a page is all zeros.
pub fn is_zero(page: &[u8]) -> bool {
    let mut words = page.chunks_exact(16);
    // Invariant: chunks_exact yields 16-byte slices, so the conversion cannot fail.
    words.all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_writes_are_tracked_and_taken() {
        let m = Memory::new(8 << 20).unwrap();
        assert_eq!(m.pages(), 2048);
        let mut page = vec![7u8; PAGE_SIZE];
        m.write_page(5, &page).unwrap();
        m.write_u64(0x9000, 42);
        assert_eq!(m.take_host_writes().to_vec(), vec![5, 9]);
        assert!(m.take_host_writes().is_empty());
        page.fill(0);
        m.read_page(5, &mut page).unwrap();
        assert_eq!(page[100], 7);
        assert!(!is_zero(&page));
        assert!(matches!(
            m.read_page(2048, &mut page),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert_eq!(m.read_u64(0x9000), 42);
        assert!(is_zero(&[0u8; PAGE_SIZE]));
    }
}
