# heliotrope's built-in KVM guest: fills its memory, then dirties pages at a host-paced rate.
#
# Runs in 64-bit long mode with identity-mapped 2 MiB pages (set up by the host, see boot.rs).
# Layout (guest physical): page tables 0x1000-0x6fff, parameters at PARAMS, status at STATUS,
# this code at 0x10000, the working memory from 1 MiB to the end of RAM.
#
# Every state this program needs lives in registers or guest memory, so that a migrated guest
# carries on exactly where it was paused. It never takes an interrupt and has no stack.
#
# Ports (host exits): FILL_STEP after every 256 pages filled (lets the host pause mid-fill),
# FILLED once memory is filled, BATCH after every batch of writes (the host sleeps there to
# pace the dirty rate, and pauses the vCPU there).

.set PARAMS,      0x8000
.set P_MEM_END,   PARAMS + 0
.set P_HOT_BASE,  PARAMS + 8
.set P_HOT_PAGES, PARAMS + 16
.set P_COLD_BASE, PARAMS + 24
.set P_COLD_PAGES,PARAMS + 32
.set P_HOT_PM,    PARAMS + 40
.set P_BATCH,     PARAMS + 48
.set P_SEED,      PARAMS + 56
.set P_ZERO_PM,   PARAMS + 64
.set P_RANDOM_PM, PARAMS + 72
.set P_DUP_PM,    PARAMS + 80

.set STATUS,      0x9000
.set S_COUNTER,   STATUS + 0
.set S_CHECKSUM,  STATUS + 8
.set S_PHASE,     STATUS + 16
.set S_LAST_PAGE, STATUS + 24

.set PORT_BATCH,     0x10
.set PORT_FILLED,    0x11
.set PORT_FILL_STEP, 0x12

.set WORK_BASE, 0x100000
.set GOLDEN, 0x9E3779B97F4A7C15

.code64
.globl _start
_start:
    cmpq $1, S_PHASE
    je run

# ---- fill: each page gets zero, random, duplicate or text content, chosen by a hash of its address
    mov $WORK_BASE, %rdi
fill_page:
    cmp P_MEM_END, %rdi
    jae filled
    # rax = splitmix64(page ^ seed)
    mov %rdi, %rax
    xor P_SEED, %rax
    mov $GOLDEN, %rcx
    add %rcx, %rax
    mov %rax, %rbx
    shr $30, %rbx
    xor %rbx, %rax
    mov $0xBF58476D1CE4E5B9, %rcx
    imul %rcx, %rax
    mov %rax, %rbx
    shr $27, %rbx
    xor %rbx, %rax
    mov %rax, %r12            # r12 = page hash
    xor %edx, %edx
    mov $1000, %rcx
    div %rcx                  # rdx = hash % 1000
    mov P_ZERO_PM, %rcx
    cmp %rcx, %rdx
    jb next_page              # zero page: leave it untouched
    add P_RANDOM_PM, %rcx
    cmp %rcx, %rdx
    jb random_page
    add P_DUP_PM, %rcx
    cmp %rcx, %rdx
    jb dup_page
# text-like page: the page's address, then a repeating low-entropy pattern
    mov %rdi, (%rdi)
    mov $1, %rcx
text_loop:
    mov %rcx, %rax
    and $7, %rax
    mov $0x0101010101010101, %rbx
    imul %rbx, %rax
    mov $0x6568742065676170, %rbx   # "page the"
    add %rbx, %rax
    mov %rax, (%rdi,%rcx,8)
    inc %rcx
    cmp $512, %rcx
    jb text_loop
    jmp next_page
dup_page:
    # one of 16 template pages: a xorshift stream seeded by the template's number
    mov %r12, %rax
    shr $20, %rax
    and $15, %rax
    inc %rax
    mov $GOLDEN, %rbx
    imul %rbx, %rax
    jmp stream
random_page:
    mov %r12, %rax
    or $1, %rax
stream:
    xor %ecx, %ecx
stream_loop:
    mov %rax, %rbx
    shl $13, %rbx
    xor %rbx, %rax
    mov %rax, %rbx
    shr $7, %rbx
    xor %rbx, %rax
    mov %rax, %rbx
    shl $17, %rbx
    xor %rbx, %rax
    mov %rax, (%rdi,%rcx,8)
    inc %rcx
    cmp $512, %rcx
    jb stream_loop
next_page:
    add $4096, %rdi
    test $0xfffff, %rdi       # every 256 pages, let the host pause us
    jnz fill_page
    mov $PORT_FILL_STEP, %dx
    out %al, %dx
    jmp fill_page
filled:
    movq $1, S_PHASE
    mov P_SEED, %r13
    or $1, %r13               # r13 = xorshift state for choosing pages
    xor %r14, %r14            # r14 = cold sweep cursor (page index)
    mov $PORT_FILLED, %dx
    out %al, %dx

# ---- run: batches of page writes; a write goes to the hot set with probability HOT_PM/1000,
# otherwise to the next page of a slow sweep over the cold region
run:
    mov P_BATCH, %r15
write_one:
    mov %r13, %rax
    shl $13, %rax
    xor %rax, %r13
    mov %r13, %rax
    shr $7, %rax
    xor %rax, %r13
    mov %r13, %rax
    shl $17, %rax
    xor %rax, %r13
    mov %r13, %rax
    xor %edx, %edx
    mov $1000, %rcx
    div %rcx
    cmp P_HOT_PM, %rdx
    jae cold
    mov %r13, %rax
    shr $12, %rax
    xor %edx, %edx
    divq P_HOT_PAGES
    mov %rdx, %rdi
    shl $12, %rdi
    add P_HOT_BASE, %rdi
    jmp write
cold:
    mov %r14, %rdi
    shl $12, %rdi
    add P_COLD_BASE, %rdi
    inc %r14
    cmp P_COLD_PAGES, %r14
    jb write
    xor %r14, %r14
write:
    mov S_COUNTER, %rax
    inc %rax
    mov %rax, S_COUNTER
    mov %r13, %rbx
    shr $40, %rbx
    and $0xff8, %rbx
    mov %rax, (%rdi,%rbx)     # the counter, at a pseudo-random offset of the page
    mov S_CHECKSUM, %rbx
    rol $7, %rbx
    xor %rax, %rbx
    xor %rdi, %rbx
    mov %rbx, S_CHECKSUM
    mov %rdi, S_LAST_PAGE
    dec %r15
    jnz write_one
    mov $PORT_BATCH, %dx
    out %al, %dx
    jmp run
