//! userfaultfd for post-copy: the destination's guest memory is registered so that a touch of
//! a page not yet there blocks the toucher (a vCPU inside KVM, or the synthetic writer) until
//! the engine installs the page with `UFFDIO_COPY`. All the unsafe of post-copy is here.

use crate::page::PAGE_SIZE;
use crate::region::Memory;
use std::ffi::c_void;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;
use userfaultfd::{Event, Uffd, UffdBuilder};

/// userfaultfd could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The kernel refused a userfaultfd (needs root, or vm.unprivileged_userfaultfd=1, to catch
    /// faults taken inside KVM).
    #[error(
        "cannot create a userfaultfd: {0} (post-copy needs root or vm.unprivileged_userfaultfd=1)"
    )]
    Create(String),
    /// Registering or using the range failed.
    #[error("userfaultfd {op} failed on page {page}: {detail}")]
    Op {
        /// The operation.
        op: &'static str,
        /// The page.
        page: u64,
        /// The error.
        detail: String,
    },
}

/// Guest memory whose missing pages are filled in by the engine.
pub struct Userfault {
    uffd: Uffd,
    memory: Arc<Memory>,
}

impl Userfault {
    /// Registers all of `memory` for missing-page faults. Pages already populated (received
    /// during pre-copy rounds) stay as they are and never fault.
    pub fn register(memory: Arc<Memory>) -> Result<Self, UffdError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| UffdError::Create(e.to_string()))?;
        uffd.register(memory.host_addr() as *mut c_void, memory.bytes() as usize)
            .map_err(|e| UffdError::Op {
                op: "UFFDIO_REGISTER",
                page: 0,
                detail: e.to_string(),
            })?;
        Ok(Userfault { uffd, memory })
    }

    fn addr(&self, page: u64) -> Result<*mut c_void, UffdError> {
        if page as usize >= self.memory.pages() {
            return Err(UffdError::Op {
                op: "install",
                page,
                detail: "beyond guest memory".into(),
            });
        }
        Ok((self.memory.host_addr() + page * PAGE_SIZE as u64) as *mut c_void)
    }

    /// Installs a page and wakes whoever waits on it; `false` if the page was already there.
    pub fn install(&self, page: u64, data: &[u8]) -> Result<bool, UffdError> {
        let dst = self.addr(page)?;
        if data.len() < PAGE_SIZE {
            return Err(UffdError::Op {
                op: "install",
                page,
                detail: format!("{} bytes is not a whole page", data.len()),
            });
        }
        // SAFETY: `dst` is one page inside the registered mapping (checked by `addr`), which
        // `self.memory` keeps alive; `data` is at least one readable page. UFFDIO_COPY copies
        // atomically into an unpopulated page and refuses (EEXIST) a populated one, so it can
        // never overwrite memory the guest is using.
        let r = unsafe {
            self.uffd
                .copy(data.as_ptr() as *const c_void, dst, PAGE_SIZE, true)
        };
        self.settle(r, "UFFDIO_COPY", page)
    }

    /// Installs a zero page; `false` if the page was already there.
    pub fn install_zero(&self, page: u64) -> Result<bool, UffdError> {
        let dst = self.addr(page)?;
        // SAFETY: as in `install`: one page of the registered, live mapping, filled only if
        // it is not populated yet.
        let r = unsafe { self.uffd.zeropage(dst, PAGE_SIZE, true) };
        self.settle(r, "UFFDIO_ZEROPAGE", page)
    }

    fn settle(
        &self,
        r: Result<usize, userfaultfd::Error>,
        op: &'static str,
        page: u64,
    ) -> Result<bool, UffdError> {
        match r {
            Ok(_) => Ok(true),
            Err(userfaultfd::Error::CopyFailed(e) | userfaultfd::Error::ZeropageFailed(e))
                if e as i32 == libc::EEXIST =>
            {
                Ok(false)
            }
            Err(e) => Err(UffdError::Op {
                op,
                page,
                detail: e.to_string(),
            }),
        }
    }

    /// Waits up to `timeout` for a fault; returns the faulting page.
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, UffdError> {
        let mut pfd = libc::pollfd {
            fd: self.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if n <= 0 {
            return Ok(None);
        }
        match self.uffd.read_event() {
            Ok(Some(Event::Pagefault { addr, .. })) => {
                let page = (addr as u64 - self.memory.host_addr()) / PAGE_SIZE as u64;
                Ok(Some(page))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(UffdError::Op {
                op: "read",
                page: 0,
                detail: e.to_string(),
            }),
        }
    }

    /// Stops catching faults: from now on missing pages read as zeros (call once every page
    /// has been installed).
    pub fn unregister(&self) -> Result<(), UffdError> {
        self.uffd
            .unregister(
                self.memory.host_addr() as *mut c_void,
                self.memory.bytes() as usize,
            )
            .map_err(|e| UffdError::Op {
                op: "UFFDIO_UNREGISTER",
                page: 0,
                detail: e.to_string(),
            })
    }
}

/// Drops the destination's copies of `pages` (stale: dirtied at the source after they were
/// sent), so that with post-copy a guest access faults the current content in.
pub fn discard(memory: &Memory, pages: &[u64]) -> Result<(), UffdError> {
    for &page in pages {
        if page as usize >= memory.pages() {
            return Err(UffdError::Op {
                op: "discard",
                page,
                detail: "beyond guest memory".into(),
            });
        }
        let addr = (memory.host_addr() + page * PAGE_SIZE as u64) as *mut c_void;
        // SAFETY: one page-aligned page inside the guest mapping, which `memory` owns. For a
        // private anonymous mapping MADV_DONTNEED only drops the page's contents (it reads as
        // missing afterwards); no Rust reference into guest memory exists (all access is by
        // volatile copies), so nothing observes the change unexpectedly.
        let r = unsafe { libc::madvise(addr, PAGE_SIZE, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(UffdError::Op {
                op: "madvise(MADV_DONTNEED)",
                page,
                detail: std::io::Error::last_os_error().to_string(),
            });
        }
    }
    Ok(())
}
