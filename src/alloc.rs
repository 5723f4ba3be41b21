//! The allocator sfr's programs use: mimalloc, told to keep freed memory.
//!
//! glibc maps every allocation above its threshold afresh and returns it on free, so each
//! batch-sized tensor pays its page faults again (on this project's 2-core VM they cost as much
//! as the arithmetic of an input-gradient pass). A binary opts in with
//!
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: sfr::alloc::Allocator = sfr::alloc::ALLOCATOR;
//! fn main() { sfr::alloc::configure(); /* ... */ }
//! ```

/// The global allocator type.
pub type Allocator = mimalloc::MiMalloc;

/// The global allocator.
pub const ALLOCATOR: Allocator = mimalloc::MiMalloc;

/// Keep freed pages for reuse instead of returning them to the OS after a delay (the process
/// peak stays what it was; the steady state stops faulting pages in).
pub fn configure() {
    // SAFETY: setting an option is a plain store in mimalloc's option table.
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
    }
}

/// `mi_option_purge_delay` of mimalloc's `mimalloc.h` (v2 and v3: option 15, just before
/// `mi_option_use_numa_nodes`, which the Rust binding names); the binding does not export it.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = libmimalloc_sys::mi_option_use_numa_nodes - 1;

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_option_sits_between_its_neighbours() {
        // mimalloc v3's default purge delay is 1000 ms (`src/options.c`): the option we set is
        // that one.
        // SAFETY: reading an option.
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(super::PURGE_DELAY) },
            1000
        );
        super::configure();
        // SAFETY: reading an option.
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(super::PURGE_DELAY) },
            -1
        );
    }
}
