//! A global allocator that counts, per thread, the bytes the Rust side holds and their peak, so
//! a test can assert that a reader's memory is bounded by its input. libtorch's C++ allocations
//! (tensor storage) bypass it; the readers' own buffers (file bytes, decompressed data,
//! decoded arrays) do not.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct Meter;

thread_local! {
    static CURRENT: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn add(delta: i64) {
    let _ = CURRENT.try_with(|c| {
        let now = c.get() + delta;
        c.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            add(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            add(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        add(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            // Old and new blocks may coexist while copying: count the new one first.
            add(new_size as i64);
            add(-(layout.size() as i64));
        }
        p
    }
}

/// Runs `f` and returns its result with the peak bytes it held above the starting level (on
/// this thread).
pub fn peak_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let start = CURRENT.with(|c| c.get());
    PEAK.with(|p| p.set(start));
    let out = f();
    let peak = PEAK.with(|p| p.get());
    (out, (peak - start).max(0) as u64)
}
