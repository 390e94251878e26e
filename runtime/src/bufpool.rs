//! Per-core buffer pool: two size classes, bounded free lists, no locks (`!Send`).

use std::cell::RefCell;
use std::rc::Rc;

struct Inner {
    small_size: usize,
    large_size: usize,
    keep: usize,
    small: Vec<Vec<u8>>,
    large: Vec<Vec<u8>>,
}

/// Cheap to clone; lives on one worker.
#[derive(Clone)]
pub struct BufPool(Rc<RefCell<Inner>>);

impl BufPool {
    /// `small` is the first buffer a connection gets, `large` the one it grows to; up to
    /// `keep` free buffers of each class are kept for reuse.
    pub fn new(small: usize, large: usize, keep: usize) -> Self {
        BufPool(Rc::new(RefCell::new(Inner {
            small_size: small,
            large_size: large.max(small),
            keep,
            small: Vec::new(),
            large: Vec::new(),
        })))
    }

    pub fn small_size(&self) -> usize {
        self.0.borrow().small_size
    }

    pub fn large_size(&self) -> usize {
        self.0.borrow().large_size
    }

    /// An empty buffer with capacity of the small (or large) class.
    pub fn get(&self, large: bool) -> Vec<u8> {
        let mut p = self.0.borrow_mut();
        let size = if large { p.large_size } else { p.small_size };
        let list = if large { &mut p.large } else { &mut p.small };
        list.pop().unwrap_or_else(|| Vec::with_capacity(size))
    }

    /// Return a buffer; it is dropped if the list is full or it is of a foreign size.
    pub fn put(&self, mut buf: Vec<u8>) {
        let mut p = self.0.borrow_mut();
        buf.clear();
        let keep = p.keep;
        let list = if buf.capacity() == p.large_size {
            &mut p.large
        } else if buf.capacity() == p.small_size {
            &mut p.small
        } else {
            return;
        };
        if list.len() < keep {
            list.push(buf);
        }
    }

    /// Free buffers held now (small, large).
    pub fn idle(&self) -> (usize, usize) {
        let p = self.0.borrow();
        (p.small.len(), p.large.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuse_and_bounds() {
        let p = BufPool::new(8, 32, 1);
        let a = p.get(false);
        assert_eq!(a.capacity(), 8);
        let ptr = a.as_ptr();
        p.put(a);
        let b = p.get(false);
        assert_eq!(b.as_ptr(), ptr, "buffer reused");
        p.put(b);
        p.put(Vec::with_capacity(8)); // over `keep`: dropped
        assert_eq!(p.idle(), (1, 0));
        p.put(Vec::with_capacity(5)); // foreign size: dropped
        assert_eq!(p.idle(), (1, 0));
        assert_eq!(p.get(true).capacity(), 32);
    }
}
