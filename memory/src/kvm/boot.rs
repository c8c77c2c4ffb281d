//! How the built-in guest starts: identity-mapped long mode, its parameters and its code in
//! guest memory. The guest's program is `guest/workload.S`, assembled by build.rs.

use crate::page::PAGE_SIZE;
use crate::region::{Memory, MemoryError};
use crate::workload::{per_mille, Layout, Workload};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

/// The guest program, a flat binary loaded at [`CODE_ADDR`].
pub const PROGRAM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/workload.bin"));

const PML4_ADDR: u64 = 0x1000;
const PDPT_ADDR: u64 = 0x2000;
/// Four page directories of 2 MiB pages map the first 4 GiB.
const PD_ADDR: u64 = 0x3000;
const PARAMS_ADDR: u64 = 0x8000;
const CODE_ADDR: u64 = 0x10000;

/// Port the guest writes after each batch of page writes.
pub const PORT_BATCH: u16 = 0x10;
/// Port the guest writes once its memory is filled.
pub const PORT_FILLED: u16 = 0x11;
/// Port the guest writes every 256 pages of the fill.
pub const PORT_FILL_STEP: u16 = 0x12;

/// Present, writable, user-accessible: the program runs at CPL 3 (see [`sregs`]).
const PRESENT_RW_USER: u64 = 0x7;
const HUGE: u64 = 0x80;

/// Writes page tables, the guest's parameters and its program into `memory`.
pub fn load(
    memory: &Memory,
    workload: &Workload,
    layout: &Layout,
    batch: u64,
) -> Result<(), MemoryError> {
    memory.write_u64(PML4_ADDR, PDPT_ADDR | PRESENT_RW_USER);
    let two_mib = 2u64 << 20;
    let pds = workload.memory_bytes.div_ceil(1 << 30);
    for d in 0..pds {
        memory.write_u64(
            PDPT_ADDR + d * 8,
            (PD_ADDR + d * PAGE_SIZE as u64) | PRESENT_RW_USER,
        );
    }
    for i in 0..workload.memory_bytes / two_mib {
        memory.write_u64(PD_ADDR + i * 8, (i * two_mib) | PRESENT_RW_USER | HUGE);
    }
    let params = [
        workload.memory_bytes,
        layout.hot_base * PAGE_SIZE as u64,
        layout.hot_pages,
        layout.cold_base * PAGE_SIZE as u64,
        layout.cold_pages,
        layout.hot_per_mille,
        batch,
        workload.seed,
        per_mille(workload.zero_fraction),
        per_mille(workload.random_fraction),
        per_mille(workload.duplicate_fraction),
    ];
    for (i, v) in params.iter().enumerate() {
        memory.write_u64(PARAMS_ADDR + i as u64 * 8, *v);
    }
    memory.write_bytes(CODE_ADDR, PROGRAM)
}

/// Registers for the first instruction. IOPL 3 lets the CPL 3 program exit with `out`.
pub fn regs() -> kvm_regs {
    kvm_regs {
        rip: CODE_ADDR,
        rflags: 0x3002,
        ..Default::default()
    }
}

/// 64-bit long mode with paging on and flat segments, at CPL 3.
///
/// The program runs in guest user mode because on PVM hosts (`kvm_pvm`, as on these machines)
/// guest supervisor code is emulated an instruction at a time (about 0.3 µs each) while guest
/// user code runs natively; on VMX/SVM hosts both run natively, so CPL 3 costs nothing there.
/// The program never takes an interrupt or an exception, so it needs no IDT, GDT or TSS.
pub fn sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x1b,
        type_: 0xb,
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x23,
        type_: 0x3,
        l: 0,
        db: 1,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 0x8000_0000 | 0x10 | 0x1; // PG | ET | PE
    sregs.efer = 0x500; // LME | LMA
    sregs
}
